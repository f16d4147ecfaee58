"""CurveZMQ between real daemons: who gets in, what each key may do, tenants, reloading."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from lmcache_mesh.node import ChunkRecord, Client, calls, chunk_keys, namespace_id
from lmcache_mesh.node.calls import Call
from lmcache_mesh.node.errors import DeadlineExceeded, Forbidden
from lmcache_mesh.node.keyring import read_key_pair, write_key_pair
from lmcache_mesh.node.protocol import Op
from lmcache_mesh.transports.curve import CurveClient, CurveKeyPair

from ..conftest import DaemonFactory
from ..helpers import Daemon, free_port, node_command, payload, require
from .test_mesh import PROFILE, members, wait_until

NS = namespace_id(b"secure-model", {"engine": "test"}, chunk_tokens=16)
KEYS = chunk_keys(NS, list(range(16 * 4)), chunk_tokens=16)
SHUT_OUT_S = 1.5
"""How long a refused client waits for an answer that never comes."""


def keygen(*args: str) -> str:
    """Run ``lmcache-node keygen``; returns the allow-list line it prints."""
    out = subprocess.run(
        node_command("keygen", *args), capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout.strip().splitlines()[-1]


class Cluster:
    """Key files of two nodes, two tenants' engines, an operator and an outsider."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.allow = root / "authorized_keys"
        lines = [keygen("--name", n, "--data-dir", str(root / n)) for n in ("node-a", "node-b")]
        for name, extra in (("engine-acme", "acme"), ("engine-globex", "globex"), ("ops", None)):
            role = ["--role", "admin"] if extra is None else ["--role", "client", "--tenant", extra]
            lines.append(keygen("--name", name, *role, "--out", str(root / f"{name}.key_secret")))
        self.allow.write_text("# the cluster's allow-list\n" + "\n".join(lines) + "\n")
        write_key_pair(root / "outsider.key_secret", "outsider")  # never listed

    def keys(self, name: str) -> CurveKeyPair:
        return read_key_pair(self.root / f"{name}.key_secret")[1]

    def node_key(self, node: str) -> str:
        return read_key_pair(self.root / node / "node.key_secret")[1].public

    def client(
        self, who: str, daemon: Daemon, node: str, timeout_s: float = 10.0, tenant: str = ""
    ) -> Client:
        curve = CurveClient(self.keys(who), self.node_key(node))
        return Client(daemon.tcp, timeout_s=timeout_s, curve=curve, tenant=tenant)


@pytest.fixture
def secured(tmp_path: Path, daemon_factory: DaemonFactory) -> tuple[Cluster, Daemon, Daemon]:
    c = Cluster(tmp_path)
    common = ("--authorized-keys", str(c.allow), "--disk", "0", *PROFILE)
    port_a = free_port("127.0.0.21")
    a = daemon_factory(*common, data_dir=tmp_path / "node-a", tcp=f"tcp://127.0.0.21:{port_a}")
    b = daemon_factory(
        *common, "--join", f"node-a@{a.tcp}", data_dir=tmp_path / "node-b", tcp="tcp://127.0.0.22:0"
    )
    assert "CurveZMQ on tcp:// as node-a" in a.output
    ok = wait_until(lambda: all(len(members(d)) == 2 for d in (a, b)), 30)
    assert ok is not None, "the two nodes never found each other over CurveZMQ"
    return c, a, b


def shut_out(client: Client) -> bool:
    """True when ``client`` gets no answer at all (its connection was refused)."""
    with client:
        try:
            client.ping(timeout_s=SHUT_OUT_S)
        except DeadlineExceeded:
            return True
    return False


def test_unknown_or_missing_keys_get_nothing_and_the_node_counts_them(
    secured: tuple[Cluster, Daemon, Daemon],
) -> None:
    c, a, _ = secured
    with c.client("engine-acme", a, "node-a") as acme:
        acme.put(KEYS[0], payload(0), NS)
    outsider = CurveClient(read_key_pair(c.root / "outsider.key_secret")[1], c.node_key("node-a"))
    for client in (
        Client(a.tcp, timeout_s=SHUT_OUT_S, curve=outsider),  # a key nobody listed
        Client(a.tcp, timeout_s=SHUT_OUT_S),  # no CurveZMQ at all
        Client(
            a.tcp, timeout_s=SHUT_OUT_S, curve=CurveClient(c.keys("ops"), c.node_key("node-b"))
        ),  # wrong server
    ):
        with client:
            # each call ends at its deadline: the send must not wait for a handshake that
            # never completes (it blocked for 600 s once, on a loaded machine)
            for call in (
                client.ping,
                client.stats,
                lambda c=client: c.get([KEYS[0]]),
                lambda c=client: c.put(KEYS[1], payload(1), NS),
            ) * 3:
                started = time.monotonic()
                with pytest.raises(DeadlineExceeded):
                    call()
                assert time.monotonic() - started < SHUT_OUT_S + 1.0
    with a.client() as local:  # ipc://: the owner's socket file
        stats = local.stats()
        assert local.lookup([KEYS[1]], local=True) == 0  # the refused PUT stored nothing
    assert stats["security"]["curve"] is True
    assert stats["security"]["connections_refused"] >= 2
    assert stats["security"]["allowed_keys"] == 5


def test_with_keys_everything_works_and_the_mesh_runs_encrypted(
    secured: tuple[Cluster, Daemon, Daemon], tmp_path: Path
) -> None:
    c, a, b = secured
    with c.client("engine-acme", a, "node-a") as acme_a, c.client("engine-acme", b, "node-b") as acme_b:
        acme_a.put(KEYS[0], payload(0), NS)
        # node-b asks node-a (an owner or the holder) over CurveZMQ for acme's chunk
        got = acme_b.get([KEYS[0]])[0]
        assert got is not None and bytes(got) == payload(0)
        assert acme_b.lookup([KEYS[0]]) == 1
    with c.client("ops", b, "node-b") as ops:
        stats = ops.stats()
    assert {m["name"] for m in stats["members"]} == {"node-a", "node-b"}
    assert stats["tenants"]["acme"]["requests"]["gets"] >= 1
    assert "hits" in stats["tenants"]["acme"]["requests"]
    # the CLI reaches a node over CurveZMQ with --key/--server-key
    out = subprocess.run(
        node_command(
            "status",
            "--node",
            b.tcp,
            "--key",
            str(c.root / "ops.key_secret"),
            "--server-key",
            str(c.root / "node-b" / "node.key"),
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "CurveZMQ on" in out.stdout and "acme" in out.stdout


def test_tenants_cannot_hit_read_or_enumerate_each_other(secured: tuple[Cluster, Daemon, Daemon]) -> None:
    c, a, b = secured
    with c.client("engine-acme", a, "node-a") as acme, c.client("engine-globex", a, "node-a") as globex:
        acme.put_records([ChunkRecord.build(k, payload(i), NS) for i, k in enumerate(KEYS)])
        assert acme.lookup(KEYS) == len(KEYS)
        # the same keys (same model, same prompt) from another tenant: nothing, anywhere
        assert globex.lookup(KEYS) == 0
        assert globex.get(KEYS) == [None] * len(KEYS)
        assert globex.locate(KEYS)[0] == 0
        assert globex.delete(KEYS) == 0
        assert acme.lookup(KEYS) == len(KEYS)  # globex's delete touched nothing of acme's
        with pytest.raises(Forbidden):
            globex.stats()  # no enumeration, not even counts
        globex.tenant = "acme"  # naming the other tenant is refused
        with pytest.raises(Forbidden):
            globex.get(KEYS)
        globex.tenant = ""
        # globex's own chunk under the same key is its own
        globex.put(KEYS[0], payload(99), NS)
        assert bytes(globex.get([KEYS[0]])[0] or b"") == payload(99)
        assert bytes(acme.get([KEYS[0]])[0] or b"") == payload(0)
    with c.client("engine-acme", b, "node-b") as acme_b, c.client("engine-globex", b, "node-b") as globex_b:
        assert acme_b.lookup(KEYS) == len(KEYS)  # through the mesh, still acme's
        assert globex_b.lookup(KEYS[1:]) == 0
    with a.client() as local:
        tenants = local.stats()["tenants"]
    assert tenants["acme"]["records"]["memory"] >= 1 and tenants["globex"]["records"]["memory"] >= 1
    assert all(len(t) <= 64 for t in tenants)  # names only, never keys


def test_the_allow_list_is_reread_on_sighup(secured: tuple[Cluster, Daemon, Daemon]) -> None:
    c, a, _ = secured
    outsider_keys = read_key_pair(c.root / "outsider.key_secret")[1]
    outsider = CurveClient(outsider_keys, c.node_key("node-a"))
    assert shut_out(Client(a.tcp, curve=outsider))
    lines = c.allow.read_text().splitlines()
    kept = [ln for ln in lines if "engine-globex" not in ln]
    c.allow.write_text("\n".join([*kept, f"{outsider_keys.public} outsider client tenant=acme"]) + "\n")
    with c.client("engine-globex", a, "node-a", timeout_s=SHUT_OUT_S) as globex:
        globex.ping()  # connected while still listed
        a.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "keys allowed" in a.output, 10) is not None
        with pytest.raises(DeadlineExceeded):
            globex.ping()  # its open connection gets nothing more
    with Client(a.tcp, timeout_s=10, curve=outsider) as newcomer:
        assert newcomer.ping()["name"] == "node-a"
    # a broken allow-list keeps the previous one: nobody is locked out by a typo
    c.allow.write_text("this is not a key line\n")
    a.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "kept the previous allow-list" in a.output, 10) is not None
    with Client(a.tcp, timeout_s=10, curve=outsider) as newcomer:
        newcomer.ping()


def test_a_node_refuses_to_start_with_a_key_missing_from_the_allow_list(tmp_path: Path) -> None:
    allow = tmp_path / "authorized_keys"
    allow.write_text(keygen("--name", "other", "--data-dir", str(tmp_path / "other")) + "\n")
    keygen("--name", "lonely", "--data-dir", str(tmp_path / "lonely"))
    out = subprocess.run(
        node_command("run", "--data-dir", str(tmp_path / "lonely"), "--authorized-keys", str(allow)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "is not in" in out.stderr and "lonely node" in out.stderr
    # and keygen never overwrites a key
    again = subprocess.run(
        node_command("keygen", "--name", "lonely", "--data-dir", str(tmp_path / "lonely")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode != 0 and "never overwritten" in again.stderr


def test_a_client_key_cannot_use_mesh_operations(secured: tuple[Cluster, Daemon, Daemon]) -> None:
    c, a, _ = secured
    with c.client("engine-acme", a, "node-a") as acme:
        with pytest.raises(Forbidden):
            acme.join(["tcp://127.0.0.99:1"])
        with pytest.raises(Forbidden):
            acme._run(calls.who_has([KEYS[0]]))  # what owners tell each other
        with pytest.raises(Forbidden):
            acme._run(
                Call(Op.ATTACH, {"name": "node-a", "token": "t"}, lambda reply: None)
            )  # taking a node's relay slot


@pytest.mark.timeout(180)
def test_a_node_behind_nat_joins_a_curve_mesh_and_proves_itself_with_its_key(
    tmp_path: Path, daemon_factory: DaemonFactory
) -> None:
    """Relaying (ATTACH under its own name), signaling and the WebRTC proof all run on keys:
    the link's proof is an HMAC under a secret only the two nodes' keys can compute."""
    require("aiortc")
    names = ("seed", "cloud", "edge")
    allow = tmp_path / "authorized_keys"
    allow.write_text("\n".join(keygen("--name", n, "--data-dir", str(tmp_path / n)) for n in names) + "\n")
    common = (
        "--authorized-keys",
        str(allow),
        "--disk",
        "0",
        *PROFILE,
        "--webrtc-host-addresses",
        "127.0.0.1",
    )
    seed = daemon_factory(*common, data_dir=tmp_path / "seed")
    join = ("--join", f"seed@{seed.tcp}")
    cloud = daemon_factory(*common, *join, data_dir=tmp_path / "cloud")
    edge = daemon_factory(*common, *join, "--nat", data_dir=tmp_path / "edge")
    ok = wait_until(
        lambda: all(
            sum(m["state"] == "alive" for m in members(d).values()) == 3 for d in (seed, cloud, edge)
        ),
        40,
    )
    assert ok is not None, "the NAT node never joined the CurveZMQ mesh"
    ns = namespace_id(b"nat-curve", {"engine": "test"}, chunk_tokens=4)
    (key,) = chunk_keys(ns, list(range(4)), chunk_tokens=4)
    record = ChunkRecord.build(key, bytes([3]) * (1 << 20), ns)
    with edge.client(timeout_s=30) as c:
        c.put_records([record], replica=True)  # held by the edge only

    def fetched() -> bool:
        with cloud.client(timeout_s=30) as c:
            (got,) = c.get_records([key])
        return got is not None and bytes(got.payload) == bytes(record.payload)

    assert wait_until(fetched, 60) is not None, "the cloud node never fetched the edge's record"
    with cloud.client() as c:
        webrtc = c.stats()["mesh"]["webrtc"]
    assert "edge" in webrtc["links_out"] and webrtc.get("webrtc_auth_failures", 0) == 0
