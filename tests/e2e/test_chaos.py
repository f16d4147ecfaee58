"""Chaos (issue 17): a small sealed mesh under load while things go wrong, all at once.

Four daemons with a mesh secret and three replicas: A and B large and steady, C with a 4 MiB
memory tier over a data dir on a 6 MiB file system (its disk budget says 1 GiB), D killed
with SIGKILL halfway and restarted on its data dir. Writers PUT through A and C, a reader
GETs through B, while outsiders send forged unsealed and sealed-but-wrong gossip and an
oversized request, and C is stopped (SIGSTOP) for two seconds. Afterwards:

- no read ever returned wrong bytes (and no checksum failed);
- every chunk A acknowledged is in A; every chunk C acknowledged is readable through the
  mesh (C may evict by policy when its disk is full, but each chunk went to three owners,
  at least one of them A or B);
- the forged messages changed nothing (four members, each at its own address);
- C counted the full file system (its budget shrank), dropped nothing it acknowledged, and
  every node's RSS stayed bounded.
"""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import zmq

from lmcache_mesh.mesh.errors import ErrorCode, MeshError
from lmcache_mesh.mesh.messages import Kind, Message, MsgType, News
from lmcache_mesh.node import ChunkRecord, Client, chunk_keys, namespace_id
from lmcache_mesh.node.protocol import Op, mesh_envelope, request_header
from lmcache_mesh.transports.seal import HeaderSeal

from ..conftest import DaemonFactory
from ..helpers import Daemon, free_port
from .test_mesh import PROFILE, members, wait_until

SECRET = "chaos-mesh-secret"
COMMON = (
    "--mesh-secret",
    SECRET,
    "--replicas",
    "3",
    *PROFILE,
    "--max-record",
    "4MiB",
    "--max-request",
    "8MiB",
)
CHUNK = 16 << 10
BATCHES = 400
"""per writer: 1,600 chunks, 25 MiB (A's memory holds both writers' chunks; C's cannot)"""
RUN_S = 16.0
MAX_RSS_BYTES = 700 << 20


def rss(d: Daemon) -> int:
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small file system here ({done.stderr.decode().strip()}); run as root")


def outsider(to: str, frames: list[bytes]) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 500)
    sock.connect(to)
    sock.send_multipart(frames)
    sock.close()


def forge_all(daemons: list[Daemon]) -> None:
    """Unsealed gossip, and gossip in an envelope sealed with a guessed secret."""
    guess = HeaderSeal(b"guessed")
    for d in daemons:
        for victim in ("node111", "node112"):
            bad = [
                News(Kind.DEAD, victim, 1 << 40, origin="attacker"),
                News(Kind.ALIVE, victim, 3, "tcp://127.0.0.99:1", "z0", 1.0, victim),
                News(Kind.ALIVE, "ghost", 0, "tcp://127.0.0.99:2", "z0", 60000.0, "ghost"),
            ]
            datagram = Message(MsgType.GOSSIP, "attacker", "tcp://127.0.0.99:1", gossip=bad).encode()
            envelope = mesh_envelope("tcp://127.0.0.99:1")
            outsider(d.tcp, [envelope, datagram])
            outsider(d.tcp, [guess.seal(envelope), datagram])


def oversized(to: Daemon) -> str:
    """A request of 3 x 3 MiB frames against an 8 MiB request limit: the reply's error code."""
    import msgpack

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(to.tcp)
    try:
        sock.send_multipart([request_header(Op.GET, 1, 5000, keys=[]), *([b"\0" * (3 << 20)] * 3)])
        if not sock.poll(10_000):
            return "no answer"
        reply = msgpack.unpackb(sock.recv_multipart()[0])
        return "ok" if reply["ok"] else ErrorCode(reply["code"]).name
    finally:
        sock.close()


@pytest.mark.timeout(180)
def test_a_sealed_mesh_under_load_survives_kills_stops_a_full_disk_and_forgeries(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    hosts = {n: f"127.0.0.{n}" for n in (110, 111, 112, 113)}
    ports = {n: free_port(h) for n, h in hosts.items()}

    def start(n: int, *extra: str, data_dir: Path | None = None) -> Daemon:
        return daemon_factory(
            "--name", f"node{n}", "--zone", f"z{n % 2}", *COMMON, *extra,
            tcp=f"tcp://{hosts[n]}:{ports[n]}", ipc=False, data_dir=data_dir,
        )  # fmt: skip

    small = tmp_path / "small-disk"
    tmpfs(small, "6m")
    try:
        a = start(110, "--memory", "256MiB", "--disk", "0")
        b = start(111, "--memory", "256MiB", "--disk", "0", "--join", a.tcp)
        c = start(112, "--memory", "4MiB", "--disk", "1GiB", "--join", a.tcp, data_dir=small)
        d_dir = tmp_path / "d"
        d = start(113, "--memory", "64MiB", "--disk", "64MiB", "--join", a.tcp, data_dir=d_dir)
        nodes = [a, b, c, d]
        assert wait_until(lambda: all(len(members(n)) == 4 for n in nodes), 30) is not None
        _chaos(a, b, c, d, start, d_dir, nodes)
    finally:  # lazily: C still runs until the fixture stops it
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


def _chaos(a: Daemon, b: Daemon, c: Daemon, d: Daemon, start, d_dir: Path, nodes: list[Daemon]) -> None:  # type: ignore[no-untyped-def]
    ns = namespace_id(b"chaos", {"engine": "test"}, 16)
    expected: dict[bytes, bytes] = {}
    acked: dict[str, list[bytes]] = {"a": [], "c": []}
    refused = {"a": 0, "c": 0}
    wrong: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    peak = {n.name: 0 for n in nodes}

    def writer(label: str, node: Daemon, seed: int) -> None:
        rng = random.Random(seed)
        began = time.monotonic()
        with Client(node.tcp, timeout_s=3.0) as cl:
            i = 0
            while not stop.is_set() and i < BATCHES:
                time.sleep(max(0.0, began + i * RUN_S / BATCHES - time.monotonic()))  # spread over the run
                keys = chunk_keys(ns, [seed, i] + list(range(16 * 4)), 16)[-4:]
                batch = [ChunkRecord.build(k, rng.randbytes(CHUNK), ns) for k in keys]
                i += 1
                try:
                    cl.put_records(batch)
                except MeshError:
                    refused[label] += 1  # BUSY, a stopped node: not acknowledged, nothing to check
                    continue
                with lock:
                    for r in batch:
                        expected[r.key] = bytes(r.payload)
                    acked[label] += [r.key for r in batch]

    def reader() -> None:
        rng = random.Random(3)
        with Client(b.tcp, timeout_s=3.0) as cl:
            while not stop.is_set():
                with lock:
                    pool = list(expected)
                if not pool:
                    time.sleep(0.05)
                    continue
                keys = rng.sample(pool, min(8, len(pool)))
                try:
                    got = cl.get_records(keys)
                except MeshError:
                    continue
                for k, r in zip(keys, got, strict=True):
                    if r is not None and bytes(r.payload) != expected[k]:
                        wrong.append(k.hex())
            if cl.checksum_failures:
                wrong.append(f"{cl.checksum_failures} checksum failures")

    def watch() -> None:
        while not stop.is_set():
            for n in nodes:
                if n.proc.poll() is None:
                    peak[n.name] = max(peak[n.name], rss(n))
            time.sleep(0.25)

    threads = [
        threading.Thread(target=writer, args=("a", a, 1)),
        threading.Thread(target=writer, args=("c", c, 2)),
        threading.Thread(target=reader),
        threading.Thread(target=watch),
    ]
    for t in threads:
        t.start()
    started = time.monotonic()
    try:
        time.sleep(2.0)
        forge_all(nodes)
        answer = oversized(a)
        if answer != "TOO_LARGE":
            errors.append(f"oversized request answered {answer!r}")
        time.sleep(1.0)
        c.proc.send_signal(signal.SIGSTOP)
        time.sleep(2.0)
        c.proc.send_signal(signal.SIGCONT)
        time.sleep(2.0)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        time.sleep(2.0)
        forge_all([a, b, c])
        again = start(113, "--memory", "64MiB", "--disk", "64MiB", "--join", a.tcp, data_dir=d_dir)
        nodes[3] = again
        time.sleep(max(0.0, RUN_S - (time.monotonic() - started)))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    a, b, c, d = nodes
    assert not errors, errors
    assert not wrong, f"wrong bytes served: {wrong[:5]}"
    assert len(acked["a"]) >= 40 and len(acked["c"]) >= 40, {k: len(v) for k, v in acked.items()}
    assert wait_until(lambda: all(len(members(n)) == 4 for n in nodes), 30) is not None
    for n in nodes:
        view = members(n)
        assert set(view) == {"node110", "node111", "node112", "node113"}, view  # no ghost
        for m in nodes:
            assert view[m.name]["address"] == m.tcp and view[m.name]["state"] == "alive"
    with Client(a.tcp, timeout_s=30.0) as cl:
        mine = cl.get_records(acked["a"], local=True)
        missing = [k for k, r in zip(acked["a"], mine, strict=True) if r is None]
        assert not missing, f"{len(missing)} of {len(acked['a'])} chunks A acknowledged are gone"
        theirs = [cl.get_records(acked["c"][i : i + 64]) for i in range(0, len(acked["c"]), 64)]
        got = [r for part in theirs for r in part]
        missing = [k for k, r in zip(acked["c"], got, strict=True) if r is None]
        assert not missing, f"{len(missing)} of {len(acked['c'])} chunks C acknowledged are unreadable"
        for k, r in zip([*acked["a"], *acked["c"]], [*mine, *got], strict=True):
            assert r is not None and bytes(r.payload) == expected[k]
    disk = c.stats()["tiers"]["disk"]
    print(
        f"\nchaos: acknowledged A {len(acked['a'])}, C {len(acked['c'])} chunks; refused {refused}; "
        f"C's disk {disk['used_bytes'] >> 10} KiB, budget lowered {disk['budget_lowered']} times, "
        f"evictions {disk['evictions']}; peak RSS "
        + ", ".join(f"{name} {b >> 20} MiB" for name, b in peak.items())
    )
    assert disk["budget_lowered"] >= 1 and disk["writeback_dropped"] == 0, disk
    assert disk["used_bytes"] <= 6 << 20
    for n in nodes[:3]:
        assert peak[n.name] < MAX_RSS_BYTES, f"{n.name}: RSS {peak[n.name] >> 20} MiB"
