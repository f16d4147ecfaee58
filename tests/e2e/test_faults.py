"""Faults under load: five real daemons, three client processes, a SIGKILL and a corrupt file.

While three worker processes (``load_worker.py``) PUT and GET deterministic payloads through
three of the nodes, a fourth node is killed with SIGKILL and restarted on the same data dir
and address, and record files of another (running) node are corrupted on disk. Whatever
happens, a GET must return a miss or exactly the bytes that were put — never other bytes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from lmcache_mesh.mesh.ring import HashRing, RingMember
from lmcache_mesh.node.tenants import scoped_key
from lmcache_mesh.node.tiers.disk import decode_file_header

from ..helpers import Daemon, free_port, kill_all, start_daemon
from .load_worker import key_of, payload_of

WORKER = Path(__file__).with_name("load_worker.py")
BASE = 60  # nodes on 127.0.0.60 .. 127.0.0.64 (other e2e tests use other hosts)
N_NODES = 5
REPLICAS = 2
VICTIM = 3  # index of the node that is killed and restarted
CORRUPTED = 2  # index of the node whose record files are corrupted
LOADED = (0, 2, 4)  # the nodes the workers talk to (never the victim)
LOAD_S = 16.0
BEFORE_KILL_S = 5.0
DOWN_S = 3.0
N_CORRUPT = 3
MAX_PUTS = 400
CLIENT_TIMEOUT_S = 5.0
MEMORY, DISK = "1MiB", "256MiB"  # a small memory tier: most records live in *.rec files on disk
RING_WEIGHT = ((1 << 20) + (256 << 20)) / (1 << 30)


def node_args(i: int) -> list[str]:
    return [
        "--name",
        f"node{BASE + i}",
        "--zone",
        f"z{i % 2}",
        "--memory",
        MEMORY,
        "--disk",
        DISK,
        "--replicas",
        str(REPLICAS),
        "--mesh-profile",
        "local",
    ]


def wait_until(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.2) -> float | None:
    """Seconds until ``predicate`` held, or None; bounded in time and in tries."""
    start = time.monotonic()
    for _ in range(int(timeout_s / step_s) + 1):
        try:
            if predicate():
                return time.monotonic() - start
        except Exception:  # a node busy or restarting: ask again
            pass
        if time.monotonic() - start > timeout_s:
            break
        time.sleep(step_s)
    return None


def all_alive(nodes: Sequence[Daemon]) -> bool:
    for d in nodes:
        with d.client(timeout_s=3.0) as c:
            states = [m["state"] for m in c.stats()["members"]]
        if len(states) != len(nodes) or any(s != "alive" for s in states):
            return False
    return True


CLIENT_KEY_OF = {
    scoped_key("", key_of(w, i)): key_of(w, i) for w in range(len(LOADED)) for i in range(MAX_PUTS)
}
"""The workers' keys by the key the nodes store them under (the default tenant's scoping)."""


def corrupt_records(data_dir: Path, n: int) -> list[bytes]:
    """Flip bytes in the middle of the payload of the ``n`` oldest record files; their
    (clients') keys."""
    files = sorted(data_dir.glob("chunks/*/*.rec"), key=lambda p: p.stat().st_mtime)
    keys: list[bytes] = []
    for path in files:
        if len(keys) == n:
            break
        try:
            data = path.read_bytes()
            header, offset = decode_file_header(data, len(data))
        except Exception:  # being replaced or removed right now: take another
            continue
        middle = offset + header.length // 2
        with open(path, "r+b") as f:
            f.seek(middle)
            chunk = f.read(16)
            f.seek(middle)
            f.write(bytes(b ^ 0xFF for b in chunk))
            f.flush()
            os.fsync(f.fileno())
        keys.append(CLIENT_KEY_OF[header.key])
    return keys


def tally(events: Iterable[Sequence[Any]]) -> dict[str, int]:
    out = {"gets": 0, "hit": 0, "miss": 0, "error": 0, "wrong": 0}
    for e in events:
        out["gets"] += 1
        out[e[2]] += 1
    return out


def pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}" if whole else "-"


def window_table(
    log: list[Sequence[Any]],
    windows: list[tuple[str, float, float]],
    victim_owned: Callable[[int, int], bool],
) -> tuple[str, dict[str, dict[str, int]]]:
    rows: dict[str, dict[str, int]] = {}
    lines = [
        f"{'window':<22}{'secs':>6}{'gets':>7}{'hits':>7}{'miss':>7}{'err':>6}{'wrong':>7}"
        f"{'miss%':>8}{'err%':>7}{'fetched miss%':>15}{'victim-owned':>14}{'miss+err%':>10}"
        f"{'p50 ms':>8}{'max ms':>8}"
    ]
    for name, lo, hi in windows:
        events = [e for e in log if lo <= e[0] < hi]
        t = tally(events)
        v = tally(e for e in events if victim_owned(e[3], e[4]))
        o = tally(e for e in events if e[1] == "other")
        ms = sorted(e[5] for e in events)
        rows[name] = {
            **t,
            "fetched_gets": o["gets"],
            "fetched_miss": o["miss"],
            "victim_gets": v["gets"],
            "victim_miss": v["miss"],
            "victim_error": v["error"],
            "max_ms": int(ms[-1]) if ms else 0,
        }
        lines.append(
            f"{name:<22}{hi - lo:>6.1f}{t['gets']:>7}{t['hit']:>7}{t['miss']:>7}{t['error']:>6}{t['wrong']:>7}"
            f"{pct(t['miss'], t['gets']):>8}{pct(t['error'], t['gets']):>7}"
            f"{pct(o['miss'], o['gets']):>15}{v['gets']:>14}{pct(v['miss'] + v['error'], v['gets']):>10}"
            f"{ms[len(ms) // 2] if ms else 0:>8.0f}{ms[-1] if ms else 0:>8.0f}"
        )
    return "\n".join(lines), rows


def test_mesh_serves_only_exact_bytes_through_a_kill_a_restart_and_a_corrupt_file(
    tmp_path: Path, record_property: Callable[[str, Any], None]
) -> None:
    hosts = [f"127.0.0.{BASE + i}" for i in range(N_NODES)]
    addrs = [f"tcp://{h}:{free_port(h)}" for h in hosts]
    dirs = [tmp_path / f"node{BASE + i}" for i in range(N_NODES)]
    daemons: list[Daemon] = []  # every daemon ever started, for the finally
    workers: list[subprocess.Popen[bytes]] = []
    try:
        nodes: list[Daemon] = [start_daemon(dirs[0], *node_args(0), tcp=addrs[0], ipc=False)]
        daemons.append(nodes[0])
        seed = nodes[0].tcp
        for i in range(1, N_NODES):
            nodes.append(start_daemon(dirs[i], *node_args(i), "--join", seed, tcp=addrs[i], ipc=False))
            daemons.append(nodes[-1])
        assert [d.tcp for d in nodes] == addrs
        assert wait_until(lambda: all_alive(nodes), 40) is not None, "the mesh did not converge"
        time.sleep(1.0)  # let every ring settle

        summaries = [tmp_path / f"worker{w}.json" for w in range(len(LOADED))]
        for w, i in enumerate(LOADED):
            cmd = [sys.executable, str(WORKER), addrs[i], str(w), str(len(LOADED)), str(summaries[w])]
            cmd += [
                "--duration",
                str(LOAD_S),
                "--max-puts",
                str(MAX_PUTS),
                "--timeout",
                str(CLIENT_TIMEOUT_S),
            ]
            workers.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        load_started = time.time()

        # Before: a steady load on a healthy mesh.
        time.sleep(BEFORE_KILL_S)
        with nodes[CORRUPTED].client() as c:
            failures_before = c.stats()["counters"]["checksum_failures"]

        # The fault: SIGKILL one node; while it is down, corrupt record files of another.
        victim = nodes[VICTIM]
        t_kill = time.time()
        victim.stop(signal.SIGKILL)
        time.sleep(1.0)
        corrupted = corrupt_records(dirs[CORRUPTED], N_CORRUPT)
        assert corrupted, f"no record files on disk under {dirs[CORRUPTED]}: the disk tier was not used"
        t_corrupt = time.time()
        time.sleep(max(0.0, DOWN_S - (time.time() - t_kill)))

        # Restart it on the same data dir and address; it rejoins through the seed.
        restarted: Daemon | None = None
        for _ in range(5):  # the address may take a moment to be free again
            try:
                restarted = start_daemon(
                    dirs[VICTIM], *node_args(VICTIM), "--join", seed, tcp=addrs[VICTIM], ipc=False
                )
                break
            except RuntimeError:
                time.sleep(1.0)
        assert restarted is not None, "the killed node could not be restarted"
        daemons.append(restarted)
        nodes[VICTIM] = restarted
        t_restarted = time.time()
        rejoin_s = wait_until(lambda: all_alive(nodes), 40)
        assert rejoin_s is not None, "the restarted node did not rejoin"
        t_rejoined = time.time()

        # Every worker finishes by itself, within a bound.
        outputs = []
        for p in workers:
            try:
                out, _ = p.communicate(timeout=LOAD_S + 60)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate(timeout=10)
            outputs.append(out.decode(errors="replace"))
        load_ended = time.time()
        assert all(p.returncode == 0 for p in workers), "\n---\n".join(outputs)
        results = [json.loads(s.read_text()) for s in summaries]

        # Nothing but exact bytes, and a load that really went through the mesh.
        totals = {k: sum(r["counts"][k] for r in results) for k in results[0]["counts"]}
        wrong = [s for r in results for s in r["wrong_samples"]]
        assert totals["wrong"] == 0, wrong
        assert all(r["client_checksum_failures"] == 0 for r in results), [
            r["client_checksum_failures"] for r in results
        ]
        assert all("crash" not in r for r in results), [r.get("crash") for r in results]
        samples = [r["error_samples"] for r in results]
        assert totals["puts"] >= 30, (totals, samples)
        assert totals["hit"] >= 60, (totals, samples)

        # The restarted node serves again, and found its files on disk again.
        with restarted.client() as c:
            assert c.ping()["name"] == f"node{BASE + VICTIM}"
            recovery = c.stats()["node"]["recovery"]
        assert recovery["recovered"] > 0, recovery  # it was an owner of ~2/5 of all chunks
        assert recovery["discarded"] == 0, recovery  # writes are atomic: SIGKILL leaves no torn file

        # The node with corrupt files keeps serving: each corrupted key reads as a miss or
        # as exactly its bytes (from memory, a re-fetch or a replica), never as the bad bytes.
        local_reads: list[str] = []
        with nodes[CORRUPTED].client(timeout_s=10.0) as c:
            for key in corrupted:
                got = c.get_records([key], local=True)[0]
                local_reads.append(
                    "miss" if got is None else "exact" if got.payload == payload_of(key) else "WRONG"
                )
                got = c.get_records([key])[0]  # mesh-wide: the replicas still have it
                assert got is None or bytes(got.payload) == payload_of(key)
            assert c.checksum_failures == 0  # the node never sent bytes that fail their checksum
            failures = c.stats()["counters"]["checksum_failures"] - failures_before
        assert nodes[CORRUPTED].proc.poll() is None, "the node with corrupt files died"
        assert "WRONG" not in local_reads, local_reads
        # A local miss is a detected corruption; and with a 1 MiB memory tier, at least one of
        # the (oldest) corrupted records was read from disk since, by a worker or just now.
        assert failures >= 1, (local_reads, failures)

        mesh: dict[str, int] = {}
        for d in nodes:
            with d.client() as c:
                for name, value in c.stats()["mesh"].items():
                    if name in ("remote_hits", "remote_misses", "replicated", "repaired", "peer_errors"):
                        mesh[name] = mesh.get(name, 0) + int(value)
        assert mesh.get("replicated", 0) > 0 and mesh.get("remote_hits", 0) > 0, mesh

        # Which keys the victim owns: the ring the nodes use (weight: (memory + disk) / GiB),
        # checked against the shares the nodes report; if they differ, that column stays empty.
        ring = HashRing(RingMember(f"node{BASE + i}", f"z{i % 2}", RING_WEIGHT) for i in range(N_NODES))
        with nodes[0].client() as c:
            reported = {m["name"]: m["ring_share"] for m in c.stats()["members"]}
        ring_known = all(abs(reported.get(n, -1.0) - s) < 1e-3 for n, s in ring.shares().items())
        victim_name = f"node{BASE + VICTIM}"

        def victim_owned(worker: int, i: int) -> bool:
            return ring_known and victim_name in ring.owners(scoped_key("", key_of(worker, i)), REPLICAS)

        log = sorted((e for r in results for e in r["log"]), key=lambda e: e[0])
        windows = [
            ("before kill", load_started, t_kill),
            ("down (kill..restart)", t_kill, t_restarted),
            ("rejoining", t_restarted, t_rejoined),
            ("after rejoin", t_rejoined, load_ended),
        ]
        table, rows = window_table(log, windows, victim_owned)
        report = (
            f"{table}\n"
            f"totals {totals}; mesh {mesh}; corrupted {len(corrupted)} files at +{t_corrupt - load_started:.1f} s, "
            f"local reads {local_reads}, checksum failures counted {failures}; "
            f"rejoin took {rejoin_s:.1f} s; recovery {recovery}; "
            f"errors {[r['errors'] for r in results]} {samples}"
        )
        print("\n" + report)
        record_property("fault_windows", rows)
        record_property("fault_report", report)

        # The fault may cost misses and errors, but the mesh serves hits before and after it.
        assert rows["before kill"]["hit"] > 0, rows
        assert sum(rows[w]["hit"] for w in ("rejoining", "after rejoin")) > 0, rows
    finally:
        for p in workers:
            if p.poll() is None:
                p.kill()
            try:
                p.communicate(timeout=10)
            except Exception:
                pass
        kill_all(daemons)
