"""What proving membership costs: sealed gossip and sealed requests against the open mesh.

1. **Simulation** (the real Membership and MeshAgent on a seeded in-process network, LAN
   profile): N nodes converge, then run one push-pull period in steady state; bytes/s each
   node sends and CPU per node (process CPU over the window / N / window), with every
   datagram sealed by the mesh secret (16-byte HMAC-SHA256 tag) and without, same seeds.
2. **Real daemons** (``lmcache-node run`` on loopback): two meshes of two nodes, one open
   (no secret), one with ``--mesh-secret`` (sealed gossip and sealed request headers between
   members). A 128-key chain is held by one node; the other, holding none of it, answers a
   mesh-wide LOOKUP (asking the owners: sealed WHO_HAS) and a mesh-wide GET of 16 chunks of
   64 KiB (fetched from the holder: sealed GET). Rounds alternate open/sealed (the machine
   is shared and noisy); the table shows medians of per-round p50s and the sealed/open ratio.

Prints a table, writes JSON and a PNG chart of the ratios.

    python bench/bench_trust.py [--n 100] [--rounds 5] [--reps 300] [--out bench/results/trust.json]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import time
from pathlib import Path
from typing import Any

from benchlib import latency, machine_info, start_mesh_daemon, wait_for, write_results
from rich.progress import track

from lmcache_mesh.engines.cli import chart
from lmcache_mesh.engines.cli.launch import Daemon
from lmcache_mesh.engines.cli.tables import Column, add_rows, render, table
from lmcache_mesh.mesh.config import MeshConfig, push_pull_scale
from lmcache_mesh.mesh.simulation import Simulation
from lmcache_mesh.node import ChunkRecord, Client, chunk_keys, namespace_id

SECRET = b"bench-trust-mesh-secret"
NS = namespace_id(b"bench-trust", {"engine": "bench"}, chunk_tokens=16)
CHAIN = chunk_keys(NS, list(range(16 * 128)), chunk_tokens=16)
GET_KEYS = 16
GETS_PER_ROUND = 30
FETCH_CHUNK = 16 << 10
SETTLE_S = 10.0


def simulate(n: int, seed: int, sealed: bool) -> dict[str, Any]:
    """One seeded cluster of ``n``: convergence, then steady-state bytes and CPU per node."""
    cfg = MeshConfig.lan()
    sim = Simulation(n, seed, config=cfg, mesh_secret=SECRET if sealed else b"")
    took = sim.converge(120.0, 0.5)
    if took is None:
        raise RuntimeError(f"N={n} seed {seed} ({'sealed' if sealed else 'open'}) did not converge")
    sim.net.run_for(SETTLE_S)
    window = push_pull_scale(cfg.push_pull_interval_s, n)
    cpu = time.process_time()
    traffic = sim.traffic(window)
    cpu = time.process_time() - cpu
    return {
        "converged_s": took,
        "bytes_per_node_s": traffic.bytes_per_node_s,
        "cpu_us_per_node_s": cpu / n / window * 1e6,
        "window_s": window,
    }


def bench_simulation(n: int, seeds: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"open": [], "sealed": []}
    for seed in track(range(seeds), description=f"simulating N={n}"):
        for mode in ("open", "sealed"):
            runs[mode].append(simulate(n, seed, mode == "sealed"))
    out: dict[str, Any] = {"n": n, "seeds": seeds}
    for mode, rs in runs.items():
        out[mode] = {
            k: statistics.median(r[k] for r in rs)
            for k in ("converged_s", "bytes_per_node_s", "cpu_us_per_node_s")
        }
    out["ratios"] = {k: out["sealed"][k] / out["open"][k] for k in out["open"]}
    return out


def fetch_sets(rounds: int) -> list[list[bytes]]:
    """Distinct keys for every GET of every round: a fetched chunk stays on the asker, so
    each GET asks for chunks only the holder has."""
    n = rounds * (GETS_PER_ROUND + 5) * GET_KEYS
    keys = chunk_keys(namespace_id(b"bench-trust-get", {"engine": "bench"}, 16), list(range(16 * n)), 16)
    return [keys[i : i + GET_KEYS] for i in range(0, n, GET_KEYS)]


def _mesh(base: int, sealed: bool, fetched: list[list[bytes]]) -> tuple[Daemon, Daemon]:
    extra = ("--mesh-secret", SECRET.decode()) if sealed else ()
    holder = start_mesh_daemon(base, None, "--replicas", "1", *extra)
    asker = start_mesh_daemon(base + 1, holder.tcp, "--replicas", "1", *extra)
    if wait_for(lambda: holder.alive_members() == 2 and asker.alive_members() == 2, 30) is None:
        raise RuntimeError("the two daemons never saw each other")
    with Client(holder.tcp) as c:
        c.put_records([ChunkRecord.build(k, bytes([i % 251]) * 4096, NS) for i, k in enumerate(CHAIN)])
        for keys in fetched:
            c.put_records([ChunkRecord.build(k, bytes([i]) * FETCH_CHUNK, NS) for i, k in enumerate(keys)])
    with Client(asker.tcp) as c:  # the asker holds none of it; owners know every key
        if wait_for(lambda: c.lookup(CHAIN) == len(CHAIN), 30) is None:
            raise RuntimeError("the chain never became visible from the asker")
    return holder, asker


def _round(asker: Daemon, reps: int, fetch: list[list[bytes]]) -> dict[str, float]:
    with Client(asker.tcp, timeout_s=5.0) as c:

        def lookup() -> None:
            if c.lookup(CHAIN) != len(CHAIN):
                raise RuntimeError("LOOKUP missed")

        sets = iter(fetch)

        def get() -> None:
            if any(r is None for r in c.get_records(next(sets))):
                raise RuntimeError("GET missed")

        found = latency(lookup, reps)
        fetched = latency(get, GETS_PER_ROUND, warmup=5)
    return {
        "lookup_p50_ms": found["p50_ms"],
        "lookup_p99_ms": found["p99_ms"],
        "get16_p50_ms": fetched["p50_ms"],
    }


def bench_daemons(rounds: int, reps: int) -> dict[str, Any]:
    sets = fetch_sets(rounds)
    per_round = GETS_PER_ROUND + 5
    meshes = {"open": _mesh(150, False, sets), "sealed": _mesh(152, True, sets)}
    try:
        per: dict[str, list[dict[str, float]]] = {"open": [], "sealed": []}
        for i in track(range(rounds), description="daemons: open/sealed rounds"):
            for mode in ("open", "sealed") if i % 2 == 0 else ("sealed", "open"):
                per[mode].append(_round(meshes[mode][1], reps, sets[i * per_round : (i + 1) * per_round]))
        out: dict[str, Any] = {"rounds": rounds, "reps": reps}
        for mode, rs in per.items():
            out[mode] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        out["ratios"] = {k: out["sealed"][k] / out["open"][k] for k in out["open"]}
        return out
    finally:
        for holder, asker in meshes.values():
            asker.stop()
            holder.stop()


def bench_stopped_holder(trials: int) -> dict[str, Any]:
    """Sealed mesh of three, two replicas: GETs from a node holding none of the chunks, whose
    holders (and owners) are the other two, with both running and with one SIGSTOPped (the
    read hedges to the other). First GET of fresh chunks each time; timeout 2 s."""
    extra = ("--mesh-secret", SECRET.decode(), "--replicas", "2")
    a = start_mesh_daemon(160, None, *extra)
    b = start_mesh_daemon(161, a.tcp, *extra)
    c = start_mesh_daemon(162, a.tcp, *extra)
    try:
        if wait_for(lambda: all(d.alive_members() == 3 for d in (a, b, c)), 30) is None:
            raise RuntimeError("the three daemons never saw each other")
        ns = namespace_id(b"bench-trust-stopped", {"engine": "bench"}, 16)
        keys = chunk_keys(ns, list(range(16 * 4096)), 16)
        with Client(b.tcp) as writer:
            writer.put_records(
                [ChunkRecord.build(k, bytes([i % 251]) * FETCH_CHUNK, ns) for i, k in enumerate(keys)]
            )
        with Client(a.tcp, timeout_s=5.0) as asker:
            # only chunks held by b and c (a is neither writer nor owner): 8 per GET
            where = asker.locate(keys)[1]
            theirs = [k for k, hs in zip(keys, where, strict=True) if sorted(hs) == ["node161", "node162"]]
            sets = [theirs[i : i + 8] for i in range(0, len(theirs) - 7, 8)]
            if len(sets) < 2 * trials:
                raise RuntimeError(f"only {len(sets)} sets of chunks held by exactly the two others")
            out: dict[str, Any] = {}
            for mode in ("running", "stopped"):
                if mode == "stopped":
                    c.proc.send_signal(signal.SIGSTOP)
                took, hits = [], 0
                for part in sets[:trials] if mode == "running" else sets[trials : 2 * trials]:
                    started = time.perf_counter()
                    got = asker.get_records(part, timeout_s=2.0)
                    took.append(1000 * (time.perf_counter() - started))
                    hits += sum(r is not None for r in got)
                out[mode] = {
                    "p50_ms": statistics.median(took),
                    "max_ms": max(took),
                    "hit_ratio": hits / (8 * trials),
                }
            c.proc.send_signal(signal.SIGCONT)
            out["ratio_p50"] = out["stopped"]["p50_ms"] / out["running"]["p50_ms"]
            out["hedged_fetches"] = a.stats()["mesh"].get("hedged_fetches", 0)
            out["hedged_lookups"] = a.stats()["mesh"].get("hedged_lookups", 0)
            return out
    finally:
        c.proc.send_signal(signal.SIGCONT)
        for d in (c, b, a):
            d.stop()


def report(sim: dict[str, Any], live: dict[str, Any], stopped: dict[str, Any] | None = None) -> str:
    rows = [
        (f"sim N={sim['n']}: membership bytes/s per node", sim["open"]["bytes_per_node_s"], sim["sealed"]["bytes_per_node_s"], sim["ratios"]["bytes_per_node_s"]),
        (f"sim N={sim['n']}: CPU µs per node per s", sim["open"]["cpu_us_per_node_s"], sim["sealed"]["cpu_us_per_node_s"], sim["ratios"]["cpu_us_per_node_s"]),
        (f"sim N={sim['n']}: convergence s", sim["open"]["converged_s"], sim["sealed"]["converged_s"], sim["ratios"]["converged_s"]),
        ("daemons: mesh-wide LOOKUP of 128 keys, p50 ms", live["open"]["lookup_p50_ms"], live["sealed"]["lookup_p50_ms"], live["ratios"]["lookup_p50_ms"]),
        ("daemons: mesh-wide LOOKUP of 128 keys, p99 ms", live["open"]["lookup_p99_ms"], live["sealed"]["lookup_p99_ms"], live["ratios"]["lookup_p99_ms"]),
        ("daemons: GET of 16 remote chunks (16 KiB), p50 ms", live["open"]["get16_p50_ms"], live["sealed"]["get16_p50_ms"], live["ratios"]["get16_p50_ms"]),
    ]  # fmt: skip
    t = table(
        Column("measure"), "open", "sealed", "sealed/open", title="What proving membership costs (same run)"
    )
    add_rows(t, [(name, f"{a:.3g}", f"{b:.3g}", f"{r:.3f}") for name, a, b, r in rows])
    text = render(t)
    if stopped is None:
        return text
    h = table(
        Column("GET of 8 chunks held by two others (timeout 2 s)"),
        "p50 ms",
        "max ms",
        "hits",
        title="Hedged reads",
    )
    for mode in ("running", "stopped"):
        r = stopped[mode]
        label = "both holders running" if mode == "running" else "one holder SIGSTOPped"
        add_rows(h, [(label, f"{r['p50_ms']:.1f}", f"{r['max_ms']:.1f}", f"{r['hit_ratio']:.0%}")])
    return text + "\n\n" + render(h)


def draw(sim: dict[str, Any], live: dict[str, Any], path: Path) -> None:
    if not chart.available():
        print(chart.MISSING)
        return
    labels = ["gossip bytes/s", "gossip CPU", "convergence", "LOOKUP p50", "LOOKUP p99", "GET p50"]
    values = [
        sim["ratios"]["bytes_per_node_s"], sim["ratios"]["cpu_us_per_node_s"], sim["ratios"]["converged_s"],
        live["ratios"]["lookup_p50_ms"], live["ratios"]["lookup_p99_ms"], live["ratios"]["get16_p50_ms"],
    ]  # fmt: skip
    blue, green = (66, 133, 244), (52, 168, 83)
    chart.write_bar_chart(
        path, values, [blue] * 3 + [green] * 3, labels=labels,
        title="Sealed membership and requests, × the open mesh", y_title="sealed / open (1 = free)",
        legend=[(f"simulation, N={sim['n']}", blue), ("real daemons", green)],
        value_labels=[f"{v:.2f}" for v in values],
    )  # fmt: skip
    print(f"chart written to {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="simulated nodes")
    ap.add_argument("--seeds", type=int, default=3, help="simulated clusters per mode")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds on the daemons")
    ap.add_argument("--reps", type=int, default=300, help="LOOKUPs per round")
    ap.add_argument("--trials", type=int, default=20, help="GETs with a holder running, then stopped")
    ap.add_argument("--out", type=Path, default=Path("bench/results/trust.json"))
    args = ap.parse_args(argv)
    sim = bench_simulation(args.n, args.seeds)
    live = bench_daemons(args.rounds, args.reps)
    stopped = bench_stopped_holder(args.trials)
    print(report(sim, live, stopped))
    write_results(
        {"machine": machine_info(), "simulation": sim, "daemons": live, "stopped_holder": stopped}, args.out
    )
    draw(sim, live, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
