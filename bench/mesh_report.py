"""The tables of bench_mesh.py: one formatter per section, and the whole report.

Kept apart from the measurements so that either can change alone; the figures come in as the
JSON-ready dicts ``bench_mesh.run`` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from benchlib import latency_table

from lmcache_mesh.engines.cli.tables import Column, render, table


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _report_convergence(rows: Sequence[dict[str, Any]]) -> list[str]:
    t = table(
        "N", "loss", "seeds", "conv p50", "max", "99% p50", "join KB", "B/s/node", "max node", "peak/mean",
        "table", "table B", Column(""),
    )  # fmt: skip
    for r in rows:
        first = r["cases"][0]
        st = first.get("steady", {})
        join = first.get("join_bytes_per_node")
        t.add_row(
            str(r["n"]),
            f"{r['loss']:.0%}",
            str(r["seeds"]),
            fmt(r["converged_median_s"], ".2f"),
            fmt(r["converged_max_s"], ".2f"),
            fmt(r["pairs99_median_s"], ".2f"),
            fmt(None if join is None else join / 1e3, ".1f"),
            fmt(st.get("bytes_per_node_s"), ".0f"),
            fmt(st.get("max_node_bytes_s"), ".0f"),
            fmt(st.get("peak_second_over_mean"), ".1f"),
            fmt(first.get("member_table_entries"), ".0f"),
            fmt(first.get("member_table_wire_bytes"), ".0f"),
            f"({r['not_converged']} did not converge)" if r["not_converged"] else "",
        )
    return [
        "1. membership convergence (LAN profile, delay 1-10 ms, all start at t=0 and join via n0; virtual s)",
        "  conv = every node sees every node ALIVE; 99% = 99% of (observer, member) pairs ALIVE;",
        "  join KB = bytes each node sent until conv; steady = from conv+10 s for one push-pull period",
        "  (each node's full-state sync counted once); peak/mean = busiest 1 s of the window / mean second",
        render(t),
    ]


def _report_detection(rows: Sequence[dict[str, Any]]) -> list[str]:
    t = table(
        "N", "trials", "1st suspect", "1st dead", "min", "all dead", "max", "suspect->all dead", "max",
        "bound min..max", "1st dead = model", Column(""),
    )  # fmt: skip
    for r in rows:
        t.add_row(
            str(r["n"]),
            str(r["trials"]),
            fmt(r["first_suspect_median_s"], ".2f"),
            fmt(r["first_dead_median_s"], ".2f"),
            fmt(r["first_dead_min_s"], ".1f"),
            fmt(r["all_dead_median_s"], ".2f"),
            fmt(r["all_dead_max_s"], ".1f"),
            fmt(r["suspect_to_all_dead_median_s"], ".2f"),
            fmt(r["suspect_to_all_dead_max_s"], ".1f"),
            f"{r['suspicion_min_s']:.1f} .. {r['suspicion_max_s']:.1f}",
            f"{r['first_dead_matches_push_pull_model']} of {r['trials']}",
            f"({r['undetected']} undetected)" if r["undetected"] else "",
        )
    return [
        "2. failure detection (LAN, no loss, one crash per seeded cluster at a random point of the",
        "   push-pull cycle; virtual seconds after the crash; medians unless marked)",
        render(t),
        "  (bound = mesh.config.suspicion_bounds(cfg, N); model = the next push-pull round (all nodes in",
        "   lockstep), clamped to [1st suspect + min, 1st suspect + max]; '=' means within 1 s)",
    ]


def _report_false_positives(rows: Sequence[dict[str, Any]]) -> list[str]:
    t = table(
        "N", "loss", "virt s", "DEAD", "members", "per node-h", "suspicions", "episodes", "ep/node-h",
        "refutes", "suspect@end",
    )  # fmt: skip
    for r in rows:
        for case in r["cases"]:
            f = case.get("after_convergence")
            if f is None:
                continue
            t.add_row(
                str(r["n"]),
                f"{r['loss']:.0%}",
                f"{f['virtual_s']:.0f}",
                str(f["dead_transitions"]),
                str(f["members_falsely_dead"]),
                f"{f['fp_per_node_hour']:.3f}",
                str(f["suspect_transitions"]),
                str(f["suspicion_episodes"]),
                f"{f['suspicion_episodes_per_node_hour']:.1f}",
                str(f["refutes"]),
                str(f["suspect_at_end"]),
            )
    return [
        "2b. false positives: no crash, after convergence (first seed of each convergence case)",
        render(t),
        "  (DEAD: transitions of healthy nodes, any observer; episodes: distinct (member, incarnation) suspected)",
    ]


def _report_ring(rows: Sequence[dict[str, Any]]) -> list[str]:
    t = table(
        "N", "vnodes", "max/mean", "min/mean", "share max/mean", "moved", "ideal", "x ideal", "stray",
        "build ms", "owners() us",
    )  # fmt: skip
    for r in rows:
        t.add_row(
            str(r["n"]),
            str(r["vnodes"]),
            f"{r['max_over_mean']:.3f}",
            f"{r['min_over_mean']:.3f}",
            f"{r['max_share_over_mean']:.3f}",
            f"{r['moved_fraction']:.4f}",
            f"{r['ideal_moved_fraction']:.4f}",
            f"{r['moved_over_ideal']:.2f}",
            str(r["moved_not_to_newcomer"]),
            f"{r['build_ms']:.2f}",
            f"{r['owners_us_per_call']:.2f}",
        )
    return [
        "3. ring balance (primary owner of random 16-byte keys)",
        render(t),
        "  (moved: keys whose primary changes when member N+1 joins; stray: moved elsewhere than to it)",
    ]


def _report_index(rows: Sequence[dict[str, Any]]) -> list[str]:
    t = table(
        "holders/key", "ids from", "structure B/key", "with key objects B/key", "peak while adding B/key"
    )
    for r in rows:
        t.add_row(
            str(r["holders_per_key"]),
            str(r["holder_ids_from"]),
            f"{r['structure_bytes_per_key']:.1f}",
            f"{r['with_key_objects_bytes_per_key']:.1f}",
            f"{r['peak_bytes_per_key_while_adding']:.1f}",
        )
    return [
        f"4. HolderIndex memory ({rows[0]['keys']} keys, tracemalloc; one add() of all keys per holder)",
        render(t),
        f"  (a 16-byte key object itself is {rows[0]['key_object_bytes_per_key']:.1f} B)",
    ]


def _report_live(m: dict[str, Any]) -> list[str]:
    lat = latency_table(
        (f"LOOKUP {m['chain_keys']} keys local=True on node1 (baseline)", m["lookup_local_node1"]),
        (f"LOOKUP {m['chain_keys']} keys mesh-wide on node5", m["lookup_mesh_node5"]),
        (f"LOOKUP {m['chain_keys']} keys mesh-wide on node1 (holder)", m["lookup_mesh_node1"]),
        ("PING node5 (round-trip floor)", m["ping_node5"]),
    )
    return [
        f"5. real mesh: {m['nodes']} daemons on 127.0.0.1..{m['nodes']}, --mesh-profile local, "
        f"{m['chain_keys']}-key chain of {m['chunk_bytes'] >> 10} KiB chunks PUT on node1",
        f"  all see 5 alive {m['all_alive_after_s']:.2f} s after node5 started; PUT chain {m['put_chain_ms']:.1f} ms; "
        f"node5 locates all keys after {m['locate_all_after_s']:.2f} s; holders/key {m['holders_per_key_mean']:.2f}",
        lat,
        f"  mesh-wide / local LOOKUP: p50 x{m['lookup_mesh_over_local_p50']:.1f}, "
        f"p99 x{m['lookup_mesh_over_local_p99']:.1f}",
        f"  GET {m['chain_keys']} keys on node4 ({m['get_node4_local_before']} held locally before): "
        f"cold {m['get_cold_ms']:.2f} ms, again {m['get_warm_ms']:.2f} ms (x{m['get_cold_over_warm']:.1f}); "
        f"local after: {m['get_node4_local_after']}; node1 (all local) {m['get_local_node1_ms']:.2f} ms",
        f"  daemon exit codes after SIGTERM: {m['exit_codes']}",
    ]


def format_report(r: dict[str, Any]) -> str:
    m = r["machine"]
    out = [
        f"lmcache-mesh benchmark{' (quick)' if r['quick'] else ''}: {m['platform']}, {m['cpu_count']} CPUs, "
        f"Python {m['python']}, msgpack {m['msgpack']}, libzmq {m['libzmq']}",
    ]
    parts: list[tuple[str, Callable[[Any], list[str]]]] = [
        ("convergence", _report_convergence),
        ("detection", _report_detection),
        ("convergence", _report_false_positives),
        ("ring", _report_ring),
        ("index", _report_index),
        ("live", _report_live),
    ]
    for key, fmt in parts:
        if key in r:
            out += ["", *fmt(r[key])]
    walls = ", ".join(f"{k} {v:.1f} s" for k, v in r["section_wall_s"].items())
    out.append(f"\nelapsed {r['elapsed_s']:.1f} s ({walls})")
    return "\n".join(out)
