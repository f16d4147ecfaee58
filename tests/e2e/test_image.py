"""The container image's node, run as the image runs it, without a container runtime.

No registry is reachable here to pull the image's base, so the image cannot be built. What it
adds to Python is its configuration, and that is run for real: the config file the
Dockerfile's own ``sample-config`` command writes, the image's ``/run/lmcache-mesh`` and
``/var/lib/lmcache-mesh`` (a private mount namespace puts fresh directories there, the volume
a host directory), its network (a fresh network namespace: 0.0.0.0:7700 and :9109 clash with
nothing), its user (uid 10001; where this checkout or Python sits under a directory others
cannot enter, e.g. /root, the namespace opens a way to just those paths), its HEALTHCHECK
command, its STOPSIGNAL, and a restart on the same volume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..deploy.test_deploy import ENV_PREFIX, dockerfile, image_env
from ..helpers import payload
from ..netns import require_netns

UID = 10001
STARTUP_TIMEOUT_S = 60.0
SETUP = r"""
set -e
ip link set lo up
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=755 tmpfs /var/lib
mkdir -p /run/lmcache-mesh /run/image /var/lib/lmcache-mesh
eval "$UNBLOCK"
mount --bind "$VOLUME" /var/lib/lmcache-mesh
cp "$CONFIG" /run/image/lmcache-node.toml
chmod 644 /run/image/lmcache-node.toml
chown "$RUN_AS:$RUN_AS" /run/lmcache-mesh /var/lib/lmcache-mesh
cd /
exec setpriv --reuid "$RUN_AS" --regid "$RUN_AS" --clear-groups \
    env -i PATH=/usr/bin:/bin HOME=/var/lib/lmcache-mesh PYTHONUNBUFFERED=1 \
    LMCACHE_MESH_CONFIG=/run/image/lmcache-node.toml "$PYTHON" -m lmcache_mesh.engines.cli run --name image-node
"""


def unblock(paths: list[Path]) -> str:
    """Shell lines (run in the private mount namespace) that let any user reach ``paths``:
    each directory on the way that others cannot enter is covered by an open tmpfs holding
    only the entries on the way, bound back from the original."""
    ways: dict[Path, set[str]] = {}
    for path in paths:
        parts = Path(os.path.realpath(path)).parts
        for i in range(1, len(parts)):
            parent = Path(*parts[:i])
            if not parent.stat().st_mode & 0o001:
                ways.setdefault(parent, set()).add(parts[i])
    lines = []
    for n, (parent, children) in enumerate(sorted(ways.items(), key=lambda kv: len(kv[0].parts))):
        hidden = f"/run/unblock/{n}"
        lines += [
            f"mkdir -p {hidden}",
            f"mount --bind {parent} {hidden}",
            f"mount -t tmpfs -o mode=755 tmpfs {parent}",
        ]
        for child in sorted(children):
            make = "mkdir" if (parent / child).is_dir() else "touch"
            lines += [f"{make} {parent / child}", f"mount --bind {hidden}/{child} {parent / child}"]
    return "\n".join(lines)


def python_paths() -> list[Path]:
    import lmcache_mesh.node

    return [
        Path(sys.executable),
        Path(os.path.realpath(sys.executable)),
        Path(sys.prefix),
        Path(sys.base_prefix),
        Path(lmcache_mesh.node.__file__).parent.parent,
    ]


class ImageNode:
    """One run of the image's node in its own mount and network namespaces."""

    def __init__(self, volume: Path, config: Path, run_as: int) -> None:
        env = {
            **os.environ,
            "VOLUME": str(volume),
            "CONFIG": str(config),
            "RUN_AS": str(run_as),
            "PYTHON": sys.executable,
            "UNBLOCK": unblock(python_paths()) if run_as else "",
        }
        self.run_as = run_as
        # unshare execs the shell in the new namespaces, which execs the node: one pid
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--net", "sh", "-c", SETUP],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        started = threading.Event()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if "serving on" in line:
                    started.set()
            started.set()

        threading.Thread(target=pump, daemon=True).start()
        if not started.wait(STARTUP_TIMEOUT_S) or self.proc.poll() is not None:
            self.kill()
            raise AssertionError("the image's node did not start:\n" + self.output())

    def output(self) -> str:
        return "".join(self.lines)

    def inside(
        self, argv: list[str], as_image_user: bool = False, stdin: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the node's namespaces, as the image's user if asked."""
        user = ["setpriv", "--reuid", str(self.run_as), "--regid", str(self.run_as), "--clear-groups"]
        return subprocess.run(
            ["nsenter", "-t", str(self.proc.pid), "-m", "-n", *(user if as_image_user else []), *argv],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
            input=stdin,
        )

    def python(self, code: str, stdin: str = "") -> str:
        done = self.inside([sys.executable, "-c", code], stdin=stdin)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)  # the image's STOPSIGNAL
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def client_code(body: str) -> str:
    return (
        "import json, sys\nfrom lmcache_mesh.node import Client, chunk_keys, namespace_id\n"
        "ns = namespace_id(b'image-test', {'engine': 'test', 'dtype': 'f16'}, chunk_tokens=16)\n"
        "keys = chunk_keys(ns, list(range(16 * 4)), chunk_tokens=16)\n"
        "with Client('tcp://127.0.0.1:7700') as c:\n" + "".join(f"    {ln}\n" for ln in body.splitlines())
    )


def test_the_image_configuration_serves_passes_its_health_check_and_keeps_its_volume(tmp_path: Path) -> None:
    require_netns("unshare", "setpriv", "nsenter")
    env = image_env(tmp_path)
    config = Path(env[ENV_PREFIX + "CONFIG"])
    volume = tmp_path / "volume"
    volume.mkdir()
    run_as = UID
    health = re.search(r"HEALTHCHECK [^\[]*?CMD (\[[^\n]*\])", dockerfile(), re.S)
    assert health is not None
    health_argv = json.loads(health.group(1))
    assert health_argv[0] == "lmcache-node"
    health_argv = [sys.executable, "-m", "lmcache_mesh.engines.cli", *health_argv[1:]]

    node = ImageNode(volume, config, run_as)
    try:
        assert re.search(r"serving on tcp://\S+:7700 ipc:///run/lmcache-mesh/node.sock", node.output()), node.output()
        check = node.inside(health_argv, as_image_user=True)
        assert check.returncode == 0, check.stdout + check.stderr
        status = json.loads(check.stdout)
        assert status["node"]["name"] == "image-node"
        assert status["tiers"]["disk"]["capacity_bytes"] > 0  # the volume holds a disk tier
        sent = [payload(i, 64 << 10).hex() for i in range(4)]
        node.python(
            client_code(
                "for k, p in zip(keys, json.load(sys.stdin)):\n"
                "    c.put(k, bytes.fromhex(p), namespace=ns, meta={'tokens': 16})\n"
                "assert c.lookup(keys, local=True) == 4"
            ),
            stdin=json.dumps(sent),
        )
        metrics = node.python(
            "import urllib.request\n"
            "print(urllib.request.urlopen('http://127.0.0.1:9109/metrics', timeout=10).read().decode())"
        )
        assert 'lmcache_tenant_requests_total{kind="puts",tenant="default"} 4.0' in metrics, metrics[-3000:]
        assert node.stop() == 0, node.output()
        assert "stopped" in node.output()
    finally:
        node.kill()

    files = [p for p in volume.rglob("*") if p.is_file()]
    assert files, "the node wrote nothing to its volume"
    assert all(p.stat().st_uid == run_as for p in files), [(p, p.stat().st_uid) for p in files]

    # a new container on the same volume serves what the last one stored
    node = ImageNode(volume, config, run_as)
    try:
        deadline = time.monotonic() + 30
        while node.inside(health_argv, as_image_user=True).returncode != 0:
            assert time.monotonic() < deadline, node.output()
            time.sleep(0.5)
        got = node.python(client_code("print(json.dumps([bytes(p).hex() for p in c.get(keys)]))"))
        assert json.loads(got) == sent
        assert node.stop() == 0, node.output()
    finally:
        node.kill()
    shutil.rmtree(volume, ignore_errors=True)
