"""Network namespaces for tests that need real network shapes: NAT, slow links.

``Topology`` builds namespaces joined to the test's own (root) namespace by veth pairs and
removes everything on close. Needs root, ``ip`` (iproute2), ``tc`` for slow links and
``iptables`` for NAT (the README's test command installs it). Without them the tests fail with the reason,
unless ``LMCACHE_MESH_SKIP_NETNS=1`` asks to skip them.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Sequence

import pytest


def require_netns(*tools: str) -> None:
    missing = [t for t in ("ip", *tools) if shutil.which(t) is None]
    why = None
    if os.geteuid() != 0:
        why = "network namespaces need root"
    elif missing:
        why = f"missing {', '.join(missing)} (apt-get install iproute2 iptables)"
    if why is None:
        return
    if os.environ.get("LMCACHE_MESH_SKIP_NETNS") == "1":
        pytest.skip(why)
    pytest.fail(f"{why}; or set LMCACHE_MESH_SKIP_NETNS=1 to skip the network-namespace tests", pytrace=False)


def sh(*args: str, ns: str | None = None) -> None:
    cmd = [*(["ip", "netns", "exec", ns] if ns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")


class Topology:
    """Namespaces and links made by one test; ``close()`` removes them all."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid() % 10000}{random.randrange(100)}"
        self.subnet = random.randrange(100, 250)
        self._next_net = 0
        self.namespaces: list[str] = []
        self.root_links: list[str] = []

    def namespace(self, role: str) -> str:
        ns = f"lmc{role}{self.tag}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
        return ns

    def link(self, a: str | None, b: str) -> tuple[str, str, str, str]:
        """A veth pair between namespace ``a`` (None: root) and ``b`` on a fresh /24.

        Returns (a's device, a's address, b's device, b's address).
        """
        net = f"10.{self.subnet}.{self._next_net}"
        self._next_net += 1
        da, db = f"va{self.tag}{self._next_net}", f"vb{self.tag}{self._next_net}"
        sh("ip", "link", "add", da, "type", "veth", "peer", "name", db)
        if a is None:
            self.root_links.append(da)
        else:
            sh("ip", "link", "set", da, "netns", a)
        sh("ip", "link", "set", db, "netns", b)
        for ns, dev, host in ((a, da, 1), (b, db, 2)):
            sh("ip", "addr", "add", f"{net}.{host}/24", "dev", dev, ns=ns)
            sh("ip", "link", "set", dev, "up", ns=ns)
        return da, f"{net}.1", db, f"{net}.2"

    def limit(self, device: str, rate: str, ns: str | None = None) -> None:
        """Shape what ``device`` sends to ``rate`` (e.g. ``2mbit``): a slow link."""
        sh(
            "tc",
            "qdisc",
            "add",
            "dev",
            device,
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "16kb",
            "latency",
            "400ms",
            ns=ns,
        )

    def nat_router(self, router: str, inside: str, outside: str, inside_net_gw: str, edge: str) -> None:
        """``router`` masquerades ``edge``'s traffic out of ``outside`` and lets nothing in
        that ``edge`` did not start (a home router)."""
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=router)
        sh("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", outside, "-j", "MASQUERADE", ns=router)
        sh(
            "iptables",
            "-A",
            "FORWARD",
            "-i",
            outside,
            "-o",
            inside,
            "-m",
            "state",
            "--state",
            "ESTABLISHED,RELATED",
            "-j",
            "ACCEPT",
            ns=router,
        )
        sh("iptables", "-A", "FORWARD", "-i", outside, "-o", inside, "-j", "DROP", ns=router)
        sh("ip", "route", "add", "default", "via", inside_net_gw, ns=edge)

    def route(self, ns: str | None, dest: str, via: str) -> None:
        sh("ip", "route", "add", dest, "via", via, ns=ns)

    def exec_prefix(self, ns: str) -> Sequence[str]:
        return ["ip", "netns", "exec", ns]

    def close(self) -> None:
        for dev in self.root_links:
            subprocess.run(["ip", "link", "del", dev], capture_output=True, timeout=30)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
