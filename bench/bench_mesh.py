"""Benchmark of the mesh: membership (simulated), ring, holder index, and a real 5-daemon mesh.

What it measures:

1. **Membership convergence vs N** (10, 100, 500 nodes; LAN profile; the real Membership and
   MeshAgent over a seeded :class:`InProcNetwork` with 1-10 ms delay, on its virtual clock:
   ``lmcache_mesh.mesh.simulation.Simulation``).
   Every node starts at t=0 and joins through n0. Convergence is the virtual time at which
   every node first sees every other node ALIVE; it is tracked in O(1) per state change
   through ``Membership.on_change`` (a per-observer count of peers seen alive), so 500 nodes
   need no O(N^2) scan; also when 99% of (observer, member) pairs are ALIVE. Median/max
   over seeds (5/3/1 at 0% loss; fewer for N=100 under loss, where one seed costs up to a
   minute of CPU), at 0%, 5% and 10% loss (N=500: 0% only unless ``--n500-loss``).
   Cost, from the first seed: bytes each node sent until convergence (the join storm);
   bytes/s per node over a steady-state window that starts 10 s after convergence and
   lasts one push-pull period for that N (so each node's full-state sync is counted once),
   from the network's ``bytes_by_sender``; the busiest second of the window against the
   mean second; member-table entries per node and the wire size of one full table (a
   push-pull message).
2. **Failure detection** (N=10 and 100, LAN profile, no loss): in a converged cluster,
   after 10 s plus a random part of one push-pull period (so the crash falls anywhere in the
   push-pull cycle), crash one node (agent stopped, address detached) and record the
   virtual time until the first suspicion anywhere, the first DEAD anywhere and until every
   other node sees it DEAD; one crash per seeded cluster, median/max over trials, against
   ``suspicion_bounds`` (the Lifeguard min/max suspicion timeout), and against a model in
   which only push-pull rounds shrink a suspicion (see the report).
   **False positives** (2b): the first seed of every convergence case keeps running after
   convergence (N=100 at 5% and 10% loss: 300 virtual seconds) with no crash, so every
   DEAD transition is of a healthy node: count them (per node-hour), plus suspicions,
   suspicion episodes (distinct member+incarnation) and refutations.
3. **Ring balance**: N=10 and 100 members, vnodes 1/16/64/128/256: primary owner
   (``owners(key, 1)``) of 100k random 16-byte keys; max/mean and min/mean keys per node,
   max/mean hash-space share (``HashRing.shares``); the fraction of keys whose primary
   changes when an (N+1)th member joins, against the ideal 1/(N+1), and how many of those
   moved somewhere other than the new member (should be 0); ring build time (median of 5)
   and the cost of one ``owners()`` call.
4. **Index memory**: tracemalloc around a :class:`HolderIndex` holding 200k keys with 2
   holders each (one ``add`` of all keys per holder): bytes per key for the index structure
   alone (keys already in memory), and with the 16-byte key objects it keeps alive; for
   reference with 1 holder, and with holder ids >= 100 (a bitmask above the small-int
   cache, as in a 100+ node mesh).
5. **Real mesh**: five ``python -m lmcache_mesh.engines.cli run`` daemons on 127.0.0.1..5
   (``--mesh-profile local --disk 0``, 2..5 ``--join`` node 1), a 128-key chain of 4 KiB
   chunks PUT on node 1, then: time until node 5's ``Client.locate`` shows all 128 keys;
   ``Client.lookup(keys)`` on node 5 (mesh-wide: asks each key's ring owner) and on node 1
   (mesh-wide, all keys local) against ``Client.lookup(keys, local=True)`` on node 1 (local
   baseline), p50/p90/p99 over 1000 calls (333 for node 1 mesh-wide); PING as the
   round-trip floor; a mesh-wide GET of the chain from node 4 cold (fetched from peers,
   once) and again (now cached locally; median of 11), and on node 1 (all local). Daemons
   get SIGTERM in a ``finally``.

Everything simulated is deterministic for a given seed; wall-clock figures (ring build,
owners(), section 5) depend on the machine and its load.

It prints a table and writes JSON (machine info, settings, every case) to
``bench/results/bench_mesh.json`` unless ``--out`` says otherwise.

Run:  python bench/bench_mesh.py              (full run, about 3.5 minutes on 2 cores)
      python bench/bench_mesh.py --quick      (smoke check, about 1 minute: N <= 100, fewer
                                               seeds, trials, keys and calls)
      python bench/bench_mesh.py --only ring,index   (some sections: convergence, detection,
                                               ring, index, live)
      python bench/bench_mesh.py --n500-loss  (also N=500 at 5% and 10% loss: minutes more)
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import random
import statistics
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchlib import (
    latency,
    machine_info,
    start_mesh_daemon,
    wait_for,
    write_results,
)
from mesh_report import fmt, format_report

from lmcache_mesh.engines.cli.launch import Daemon, wait_for_mesh
from lmcache_mesh.mesh.config import MeshConfig, push_pull_scale, suspicion_bounds
from lmcache_mesh.mesh.index import HolderIndex
from lmcache_mesh.mesh.membership import Member, State
from lmcache_mesh.mesh.ring import HashRing, RingMember
from lmcache_mesh.mesh.simulation import DEFAULT_DELAY_S, Listener, Simulation
from lmcache_mesh.node import ChunkRecord, Client, chunk_keys, namespace_id

KIB = 1 << 10
CONVERGE_TIMEOUT_S = 120.0  # virtual
SETTLE_S = 10.0  # virtual seconds after convergence before a window or a crash
STEP_S = 0.25  # virtual seconds between predicate checks
RING_VNODES = (1, 16, 64, 128, 256)
RING_SIZES = (10, 100)
CHAIN_KEYS = 128
CHUNK_TOKENS = 256
CHAIN_PAYLOAD = 4 * KIB
MESH_NODES = 5
MESH_WAIT_S = 30.0
GET_REPS = 11  # warm GETs timed (median)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_mesh.json"


@dataclass(frozen=True)
class Settings:
    converge_plan: tuple[tuple[int, float, int], ...]  # (N, loss, seeds)
    detect_trials: dict[int, int]  # N -> crash trials
    fp_nodes: int
    fp_seconds: float  # virtual seconds after convergence (the first seed of that case)
    fp_losses: tuple[float, ...]
    ring_keys: int
    index_keys: int
    lookup_reps: int
    n500_loss: bool = False


FULL = Settings(
    converge_plan=(
        (10, 0.0, 5),
        (10, 0.05, 5),
        (10, 0.10, 5),
        (100, 0.0, 3),
        (100, 0.05, 2),
        (100, 0.10, 1),
        (500, 0.0, 1),
    ),  # fmt: skip
    detect_trials={10: 9, 100: 5},
    fp_nodes=100,
    fp_seconds=300.0,
    fp_losses=(0.05, 0.10),
    ring_keys=100_000,
    index_keys=200_000,
    lookup_reps=1000,
)
QUICK = Settings(
    converge_plan=(
        (10, 0.0, 3),
        (10, 0.05, 3),
        (10, 0.10, 3),
        (100, 0.0, 1),
        (100, 0.05, 1),
        (100, 0.10, 1),
    ),  # fmt: skip
    detect_trials={10: 3, 100: 2},
    fp_nodes=100,
    fp_seconds=100.0,
    fp_losses=(0.05, 0.10),
    ring_keys=20_000,
    index_keys=50_000,
    lookup_reps=200,
)


# --------------------------------------------------------------------------- small helpers


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _max(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


# --------------------------------------------------------------------------- simulation helpers


def churn_since(c: Simulation, since: float, refutes_before: int) -> dict[str, Any]:
    """False suspicions and deaths after ``since`` (no node has crashed: every one is false)."""
    seconds = c.net.time() - since
    after = [t for t in c.transitions if t.at > since]
    dead = [t for t in after if t.state is State.DEAD]
    suspects = [t for t in after if t.state is State.SUSPECT]
    node_hours = c.n * seconds / 3600.0
    return {
        "virtual_s": seconds,
        "dead_transitions": len(dead),
        "members_falsely_dead": len({t.member for t in dead}),
        "fp_per_node_hour": len(dead) / node_hours,
        "suspect_transitions": len(suspects),
        "suspicion_episodes": len({(t.member, t.incarnation) for t in suspects}),
        "suspicion_episodes_per_node_hour": len({(t.member, t.incarnation) for t in suspects}) / node_hours,
        "refutes": c.counter("refutes") - refutes_before,
        "suspect_at_end": c.in_state(State.SUSPECT),
        "datagrams_lost_total": c.net.stats.lost,
        "datagrams_sent_total": c.net.stats.sent,
    }


# --------------------------------------------------------------------------- 1. convergence


def converge_case(n: int, loss: float, seed: int, after_s: float) -> dict[str, Any]:
    """One seeded cluster: convergence, join cost; if ``after_s`` > 0 also run that long after
    convergence: steady-state bytes over one push-pull period (from +10 s), false positives."""
    cfg = MeshConfig.lan()
    c = Simulation(n, seed, loss, cfg)
    wall = time.perf_counter()
    took = c.converge(CONVERGE_TIMEOUT_S, STEP_S)
    joined = [t for t in c.transitions if took is None or t.at <= took]
    out: dict[str, Any] = {
        "n": n,
        "loss": loss,
        "seed": seed,
        "converged_s": took,
        "pairs99_s": c.pairs99_at,
        "join_bytes_per_node": c.bytes_at_convergence / n if took is not None else None,
        "suspect_transitions_before_convergence": sum(t.state is State.SUSPECT for t in joined),
        "dead_transitions_before_convergence": sum(t.state is State.DEAD for t in joined),
        "cpu_s_to_converge": time.perf_counter() - wall,
    }
    if after_s <= 0 or took is None:
        return out
    refutes = c.counter("refutes")
    pp = push_pull_scale(cfg.push_pull_interval_s, n)
    c.net.run_for(SETTLE_S)
    out["push_pull_period_s"] = pp
    out["steady"] = asdict(c.traffic(pp))
    c.net.run_for(max(0.0, after_s - SETTLE_S - pp))
    out["after_convergence"] = churn_since(c, took, refutes)
    out["member_table_entries"] = c.table_entries()
    out["member_table_wire_bytes"] = c.table_wire_bytes("n0")
    out["cpu_s_total"] = time.perf_counter() - wall
    return out


def _after_s(s: Settings, n: int, loss: float) -> float:
    """How long the first seed of a case runs after convergence."""
    steady = SETTLE_S + float(push_pull_scale(MeshConfig.lan().push_pull_interval_s, n))
    return max(steady, s.fp_seconds) if (n == s.fp_nodes and loss in s.fp_losses) else steady


def bench_convergence(s: Settings, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    plan = [*s.converge_plan, *(((500, 0.05, 1), (500, 0.10, 1)) if s.n500_loss else ())]
    for n, loss, seeds in plan:
        start = time.perf_counter()
        cases = [
            converge_case(n, loss, 1000 + k, _after_s(s, n, loss) if k == 0 else 0.0) for k in range(seeds)
        ]
        times = [cs["converged_s"] for cs in cases]
        row: dict[str, Any] = {
            "n": n,
            "loss": loss,
            "seeds": seeds,
            "converged_median_s": _median(times),
            "converged_max_s": _max(times),
            "pairs99_median_s": _median([cs["pairs99_s"] for cs in cases]),
            "not_converged": sum(t is None for t in times),
            "cases": cases,
        }
        rows.append(row)
        log(
            f"  N={n} loss={loss:.0%}: converged {fmt(row['converged_median_s'], '.2f')} s "
            f"(cpu {time.perf_counter() - start:.1f} s)"
        )
    return rows


# --------------------------------------------------------------------------- 2. failure detection


@dataclass
class _Detection:
    victim: str
    observers: int
    crashed_at: float | None = None
    first_suspect: float | None = None
    first_dead: float | None = None
    all_dead: float | None = None
    dead_seen: int = 0

    def listen(self, now: Callable[[], float]) -> Listener:
        def on_change(_observer: str, member: Member, old: State | None) -> None:
            if member.name != self.victim or self.crashed_at is None:
                return
            t = now() - self.crashed_at
            if member.state is State.SUSPECT and self.first_suspect is None:
                self.first_suspect = t
            elif member.state is State.DEAD and old is not State.DEAD:
                self.dead_seen += 1
                self.first_dead = t if self.first_dead is None else self.first_dead
                if self.dead_seen == self.observers:
                    self.all_dead = t

        return on_change


def next_push_pull(cfg: MeshConfig, n: int, after: float) -> float:
    """Next push-pull round at or after ``after``: every node started at t=0, so all nodes
    push-pull together at ``interval``, then every ``push_pull_scale(interval, n)``."""
    first, period = float(cfg.push_pull_interval_s), float(push_pull_scale(cfg.push_pull_interval_s, n))
    return first if after <= first else first + period * math.ceil((after - first) / period)


def detection_trial(n: int, seed: int) -> dict[str, Any]:
    """Converge, settle 10 s plus a random part of one push-pull period, crash one random
    non-seed node; times are virtual seconds after the crash."""
    cfg = MeshConfig.lan()
    rng = random.Random(seed)
    c = Simulation(n, seed, 0.0, cfg)
    d = _Detection(f"n{rng.randrange(1, n)}", observers=n - 1)
    c.listeners.append(d.listen(c.net.time))
    if c.converge(CONVERGE_TIMEOUT_S, STEP_S) is None:
        return {"n": n, "seed": seed, "converged": False}
    c.net.run_for(SETTLE_S + rng.uniform(0, push_pull_scale(cfg.push_pull_interval_s, n)))
    failures = c.counter("probe_failures")
    d.crashed_at = c.net.time()
    c.crash(d.victim)
    _, high = suspicion_bounds(cfg, n)
    c.run_until(lambda: d.all_dead is not None, timeout_s=high + 60.0, step_s=STEP_S)
    return {
        "n": n,
        "seed": seed,
        "victim": d.victim,
        "crashed_at_s": d.crashed_at,
        "first_suspect_s": d.first_suspect,
        "first_dead_s": d.first_dead,
        "all_dead_s": d.all_dead,
        "next_push_pull_s": next_push_pull(cfg, n, d.crashed_at) - d.crashed_at,
        "probe_failures": c.counter("probe_failures") - failures,
    }


def push_pull_model(case: dict[str, Any], low: float, high: float) -> float | None:
    """When the first DEAD is expected if only push-pull rounds shrink suspicions:
    the next push-pull round, clamped to [first suspicion + min, first suspicion + max]."""
    suspect, pp = case.get("first_suspect_s"), case.get("next_push_pull_s")
    if suspect is None or pp is None:
        return None
    return float(min(max(pp, suspect + low), suspect + high))


def _matches_model(case: dict[str, Any], low: float, high: float, within_s: float = 1.0) -> bool:
    model, dead = push_pull_model(case, low, high), case.get("first_dead_s")
    return model is not None and dead is not None and abs(dead - model) <= within_s


def bench_detection(s: Settings, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    for n, trials in s.detect_trials.items():
        cfg = MeshConfig.lan()
        low, high = suspicion_bounds(cfg, n)
        cases = [detection_trial(n, 2000 + k) for k in range(trials)]
        for c in cases:
            c["push_pull_model_s"] = push_pull_model(c, low, high)
        gap = [
            c["all_dead_s"] - c["first_suspect_s"]
            for c in cases
            if c.get("all_dead_s") is not None and c.get("first_suspect_s") is not None
        ]
        first_dead = [c.get("first_dead_s") for c in cases]
        row = {
            "n": n,
            "trials": trials,
            "suspicion_min_s": low,
            "suspicion_max_s": high,
            "probe_interval_s": cfg.probe_interval_s,
            "first_suspect_median_s": _median([c.get("first_suspect_s") for c in cases]),
            "first_dead_median_s": _median(first_dead),
            "first_dead_min_s": min((v for v in first_dead if v is not None), default=None),
            "all_dead_median_s": _median([c.get("all_dead_s") for c in cases]),
            "all_dead_max_s": _max([c.get("all_dead_s") for c in cases]),
            "suspect_to_all_dead_median_s": _median(gap),
            "suspect_to_all_dead_max_s": _max(gap),
            "first_dead_matches_push_pull_model": sum(_matches_model(c, low, high) for c in cases),
            "undetected": sum(c.get("all_dead_s") is None for c in cases),
            "cases": cases,
        }
        rows.append(row)
        log(f"  detection N={n}: all dead after {fmt(row['all_dead_median_s'], '.1f')} s (median)")
    return rows


# --------------------------------------------------------------------------- 3. ring


def _ring_members(n: int) -> list[RingMember]:
    return [RingMember(f"node{i}") for i in range(n)]


def _build_time(members: list[RingMember], vnodes: int, reps: int = 5) -> float:
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        HashRing(members, vnodes)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def ring_case(n: int, vnodes: int, keys: Sequence[bytes]) -> dict[str, Any]:
    members = _ring_members(n)
    ring = HashRing(members, vnodes)
    start = time.perf_counter()
    primary = [ring.owners(k, 1)[0] for k in keys]
    owners_us = (time.perf_counter() - start) / len(keys) * 1e6
    counts = Counter(primary)
    mean = len(keys) / n
    per_node = [counts.get(m.name, 0) for m in members]
    shares = ring.shares()
    newcomer = RingMember(f"node{n}")
    grown = HashRing([*members, newcomer], vnodes)
    after = [grown.owners(k, 1)[0] for k in keys]
    moved = sum(1 for a, b in zip(primary, after, strict=True) if a != b)
    misplaced = sum(1 for a, b in zip(primary, after, strict=True) if a != b and b != newcomer.name)
    return {
        "n": n,
        "vnodes": vnodes,
        "keys": len(keys),
        "max_over_mean": max(per_node) / mean,
        "min_over_mean": min(per_node) / mean,
        "max_share_over_mean": max(shares.values()) * n,
        "moved_fraction": moved / len(keys),
        "ideal_moved_fraction": 1.0 / (n + 1),
        "moved_over_ideal": (moved / len(keys)) * (n + 1),
        "moved_not_to_newcomer": misplaced,
        "build_ms": _build_time(members, vnodes) * 1e3,
        "owners_us_per_call": owners_us,
    }


def bench_ring(s: Settings, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rng = random.Random(4000)
    keys = [rng.randbytes(16) for _ in range(s.ring_keys)]
    rows = []
    for n in RING_SIZES:
        for vnodes in RING_VNODES:
            rows.append(ring_case(n, vnodes, keys))
        log(f"  ring N={n} done")
    return rows


# --------------------------------------------------------------------------- 4. index memory


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def index_memory(nkeys: int, holders: int, holder_id_offset: int) -> dict[str, Any]:
    """Bytes per key of a HolderIndex with ``holders`` holders per key (one ``add`` of all
    keys per holder, as announcements arrive).

    ``holder_id_offset`` holders are registered first (with no keys) so that the measured
    holders get ids that high: their bitmasks are then big ints rather than cached small ints.
    """
    rng = random.Random(5000)
    tracemalloc.start()
    try:
        base = _traced()
        keys = [rng.randbytes(16) for _ in range(nkeys)]
        with_keys = _traced()
        index = HolderIndex(max_keys=nkeys * 2)
        for i in range(holder_id_offset):
            index.add(f"idle{i}", [])
        before_index = _traced()
        tracemalloc.reset_peak()
        for h in range(holders):
            index.add(f"holder{h}", keys)
        built = _traced()
        peak = tracemalloc.get_traced_memory()[1]
        if len(index) != nkeys or len(index.holders(keys[0])) != holders:
            raise RuntimeError("HolderIndex lost keys or holders")
        list_bytes = sys.getsizeof(keys)
        del keys
        final = _traced()
    finally:
        tracemalloc.stop()
    return {
        "keys": nkeys,
        "holders_per_key": holders,
        "holder_ids_from": holder_id_offset,
        "structure_bytes_per_key": (built - before_index) / nkeys,
        "with_key_objects_bytes_per_key": (final - base) / nkeys,
        "key_object_bytes_per_key": (with_keys - base - list_bytes) / nkeys,
        "peak_bytes_per_key_while_adding": (peak - before_index) / nkeys,
    }


def bench_index(s: Settings, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = [index_memory(s.index_keys, h, offset) for h, offset in ((1, 0), (2, 0), (2, 100))]
    log("  index done")
    return rows


# --------------------------------------------------------------------------- 5. real mesh


def _chain() -> tuple[bytes, list[bytes], list[ChunkRecord]]:
    ns = namespace_id(b"bench-mesh", {"engine": "bench"}, CHUNK_TOKENS)
    keys = chunk_keys(ns, list(range(CHAIN_KEYS * CHUNK_TOKENS)), CHUNK_TOKENS)
    records = [
        ChunkRecord.build(k, i.to_bytes(4, "little") * (CHAIN_PAYLOAD // 4), ns) for i, k in enumerate(keys)
    ]
    return ns, keys, records


def _timed_get(client: Client, keys: Sequence[bytes], records: Sequence[ChunkRecord]) -> float:
    start = time.perf_counter()
    got = client.get(keys)
    took = time.perf_counter() - start
    bad = sum(g is None or bytes(g) != bytes(r.payload) for g, r in zip(got, records, strict=True))
    if bad:
        raise RuntimeError(f"mesh GET returned {bad} misses or wrong payloads of {len(keys)}")
    return took


def _measure_mesh(nodes: dict[int, Daemon], s: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    converged = wait_for_mesh(list(nodes.values()), MESH_WAIT_S, step_s=0.1)
    if converged is None:
        raise RuntimeError("the 5 daemons did not all see each other alive")
    out["all_alive_after_s"] = converged
    _, keys, records = _chain()
    first, last, reader = nodes[1], nodes[MESH_NODES], nodes[MESH_NODES - 1]
    with first.client() as c1, last.client() as c5, reader.client() as c4:
        start = time.monotonic()
        c1.put_records(records)
        out["put_chain_ms"] = (time.monotonic() - start) * 1e3
        out["locate_all_after_s"] = wait_for(lambda: c5.locate(keys)[0] == len(keys), MESH_WAIT_S)
        if out["locate_all_after_s"] is None:
            raise RuntimeError(f"node{MESH_NODES} never located all {len(keys)} keys")
        holders = c5.locate(keys)[1]
        out["holders_per_key_mean"] = statistics.mean(len(h) for h in holders)
        log("  mesh: timing LOOKUP ...")
        out["lookup_local_node1"] = latency(_checked_lookup(c1, keys, local=True), s.lookup_reps)
        out["lookup_mesh_node5"] = latency(_checked_lookup(c5, keys, local=False), s.lookup_reps)
        out["lookup_mesh_node1"] = latency(_checked_lookup(c1, keys, local=False), max(1, s.lookup_reps // 3))
        out["ping_node5"] = latency(c5.ping, s.lookup_reps)
        local_before = sum(r is not None for r in c4.get_records(keys, local=True))
        out["get_node4_local_before"] = local_before
        out["get_cold_ms"] = _timed_get(c4, keys, records) * 1e3
        out["get_warm_ms"] = statistics.median(_timed_get(c4, keys, records) for _ in range(GET_REPS)) * 1e3
        out["get_node4_local_after"] = sum(r is not None for r in c4.get_records(keys, local=True))
        out["get_local_node1_ms"] = (
            statistics.median(_timed_get(c1, keys, records) for _ in range(GET_REPS)) * 1e3
        )
        out["mesh_stats_node4"] = c4.stats().get("mesh")
    return out


def _checked_lookup(client: Client, keys: Sequence[bytes], local: bool) -> Callable[[], None]:
    def call() -> None:
        hits = client.lookup(keys, local=local)
        if hits != len(keys):
            raise RuntimeError(f"LOOKUP (local={local}) found {hits} of {len(keys)}")

    return call


def bench_live_mesh(s: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    nodes: dict[int, Daemon] = {}
    exit_codes: dict[str, int | None] = {}
    try:
        nodes[1] = start_mesh_daemon(1, None)
        for i in range(2, MESH_NODES + 1):
            nodes[i] = start_mesh_daemon(i, nodes[1].tcp)
        log(f"  mesh: {MESH_NODES} daemons started")
        out = _measure_mesh(nodes, s, log)
    finally:
        for i, d in nodes.items():
            exit_codes[f"node{i}"] = d.stop()
    out["exit_codes"] = exit_codes
    out.update(nodes=MESH_NODES, chain_keys=CHAIN_KEYS, chunk_bytes=CHAIN_PAYLOAD)
    out["lookup_mesh_over_local_p50"] = (
        out["lookup_mesh_node5"]["p50_ms"] / out["lookup_local_node1"]["p50_ms"]
    )
    out["lookup_mesh_over_local_p99"] = (
        out["lookup_mesh_node5"]["p99_ms"] / out["lookup_local_node1"]["p99_ms"]
    )
    out["get_cold_over_warm"] = out["get_cold_ms"] / out["get_warm_ms"]
    out["bad_exit"] = [n for n, code in exit_codes.items() if code != 0]
    return out


# --------------------------------------------------------------------------- run


def _section(name: str, fn: Callable[[], Any], log: Callable[[str], None], timings: dict[str, float]) -> Any:
    log(f"{name} ...")
    start = time.monotonic()
    result = fn()
    timings[name] = time.monotonic() - start
    return result


SECTIONS = ("convergence", "detection", "ring", "index", "live")


def run(s: Settings, quick: bool, sections: Sequence[str], log: Callable[[str], None]) -> dict[str, Any]:
    started = time.monotonic()
    t: dict[str, float] = {}
    result: dict[str, Any] = {
        "benchmark": "bench_mesh",
        "quick": quick,
        "settings": {**asdict(s), "detect_trials": {str(k): v for k, v in s.detect_trials.items()}},
        "machine": machine_info(msgpack=".".join(map(str, __import__("msgpack").version))),
        "lan_config": asdict(MeshConfig.lan()),
        "sim_delay_s": DEFAULT_DELAY_S,
    }
    steps: dict[str, Callable[[Settings, Callable[[str], None]], Any]] = {
        "convergence": bench_convergence,
        "detection": bench_detection,
        "ring": bench_ring,
        "index": bench_index,
        "live": bench_live_mesh,
    }
    for i, name in enumerate(SECTIONS, start=1):
        if name in sections:
            result[name] = _section(f"{i}. {name}", functools.partial(steps[name], s, log), log, t)
    result["section_wall_s"] = t
    result["elapsed_s"] = time.monotonic() - started
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smoke run: N <= 100, fewer seeds, keys and calls")
    p.add_argument("--n500-loss", action="store_true", help="also converge N=500 at 5%% and 10%% loss (slow)")
    p.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="JSON results path (default: bench/results/bench_mesh.json)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    s = QUICK if args.quick else FULL
    if args.n500_loss:
        s = Settings(**{**asdict(s), "n500_loss": True})

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    sections = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"bench_mesh: unknown section(s) {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    result = run(s, args.quick, sections, log)
    print(format_report(result))
    write_results(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
