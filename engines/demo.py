"""``lmcache-node demo``: a 3-node mesh, two llama.cpp engines, chats that share a prompt.

Starts three real nodes on loopback, generates a small random-weight GGUF, runs two engines
on different nodes, and sends multi-turn conversations that share a long system prompt,
alternating engines and starting each request from an empty context, so every reused token
comes through the mesh. Prints, per request, the time to first token and where the reused
KV came from (the engine's own node, or a peer node), a summary of cold vs hit, and writes a
PNG bar chart.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcache_mesh.node.client import Client
from lmcache_mesh.node.sizes import format_count

from .pngplot import write_bar_chart

COLOURS = {"cold": (150, 150, 150), "local node": (52, 120, 200), "peer node": (60, 170, 90)}
STARTUP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path | None = None
    """where the nodes' data and the model go (default: a temporary directory, removed after)"""
    conversations: int = 3
    turns: int = 2
    system_tokens: int = 768
    """words in the shared system prompt (about one token each)"""
    preset: str = "mid"
    chunk_tokens: int = 128
    threads: int = 1
    plot: Path = Path("lmcache-demo.png")


@dataclass
class Row:
    conversation: int
    turn: int
    engine: str
    prompt_tokens: int
    reused_tokens: int
    ttft_ms: float
    source: str


class _Node:
    """One ``lmcache-node run`` subprocess; its output is kept for error messages."""

    def __init__(self, name: str, root: Path, join: str | None) -> None:
        self.name = name
        self.ipc = f"ipc://{root / (name + '.sock')}"
        cmd = [
            sys.executable, "-m", "lmcache_mesh.engines.cli", "run", "--name", name,
            "--listen", "tcp://127.0.0.1:0", "--listen", self.ipc, "--data-dir", str(root / name),
            "--memory", "512MiB", "--disk", "0", "--mesh-profile", "local", "--curve", "off",
            "--metrics-port", "0", *(["--join", join] if join else []),
        ]  # fmt: skip
        # The demo's nodes take no settings from the caller's LMCACHE_MESH_* (a config file
        # could join them to a real mesh; a metrics port would clash between the three).
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_MESH_")}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[str] = []
        self.tcp = ""
        started = threading.Event()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if "serving on " in line and not self.tcp:
                    self.tcp = line.split("serving on ", 1)[1].split()[0]
                    started.set()
            started.set()

        threading.Thread(target=pump, daemon=True).start()
        if not started.wait(STARTUP_TIMEOUT_S) or not self.tcp:
            self.stop()
            raise RuntimeError(f"node {name} did not start:\n" + "".join(self.lines[-20:]))

    def stats(self) -> dict[str, Any]:
        with Client(self.ipc, timeout_s=5.0) as c:
            stats: dict[str, Any] = c.stats()
        return stats

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class _FirstTokenClock:
    """A llama.cpp logits processor that only notes when it is first called: once the prompt
    is evaluated, before the first token is sampled, detokenised or streamed."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first: float | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.first is None:
            self.first = time.perf_counter()
        return scores

    def seconds(self) -> float:
        if self.first is None:  # llama-cpp-python stopped calling logits processors
            raise RuntimeError("llama.cpp never asked for the first token's logits: TTFT unknown")
        return self.first - self.started


def _progress(done: int, total: int, what: str) -> None:
    width = 30
    filled = width * done // max(total, 1)
    print(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what:<40}",
        end="",
        file=sys.stderr,
        flush=True,
    )


def _peer_hits(node: _Node) -> int:
    """Chunks the node has fetched from peers so far (the rest of its hits are its own)."""
    return int(node.stats()["mesh"].get("remote_hits", 0))


def _words(n: int, seed: int) -> str:
    import numpy as np  # here, not at import: `lmcache-node status` (health checks) stays quick

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return " ".join("".join(rng.choice(letters, rng.integers(2, 6))) for _ in range(n))


def run_demo(cfg: DemoConfig) -> list[Row]:
    from .llamacpp import LlamaMeshConfig, MeshLlama
    from .llamacpp.tinymodel import PRESETS, write_model

    root = Path(tempfile.mkdtemp(prefix="lmc-demo-", dir="/tmp")) if cfg.workdir is None else cfg.workdir
    root.mkdir(parents=True, exist_ok=True)
    nodes: list[_Node] = []
    engines: dict[str, Any] = {}
    try:
        print("starting 3 nodes on 127.0.0.1 ...", file=sys.stderr, flush=True)
        nodes.append(_Node("demo-1", root, None))
        for name in ("demo-2", "demo-3"):
            nodes.append(_Node(name, root, nodes[0].tcp))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not all(sum(m["state"] == "alive" for m in n.stats()["members"]) == 3 for n in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the 3 nodes did not find each other")
            time.sleep(0.2)
        print(f"writing a random-weight model ({cfg.preset}) ...", file=sys.stderr, flush=True)
        model = write_model(root / "demo.gguf", PRESETS[cfg.preset])
        placement = {"engine A": nodes[0], "engine B": nodes[2]}
        for label, node in placement.items():
            engines[label] = MeshLlama(
                model_path=str(model),
                n_ctx=4096,
                n_threads=cfg.threads,
                n_threads_batch=cfg.threads,
                verbose=False,
                mesh=LlamaMeshConfig(node=node.ipc, chunk_tokens=cfg.chunk_tokens),
            )
        # One short request per engine first: the first call into llama.cpp pays one-time costs
        # (allocations, thread start) that belong to neither cold nor hit. It is cut shorter
        # than a chunk, so nothing of it is stored or reused.
        print("warming up the engines ...", file=sys.stderr, flush=True)
        for llm in engines.values():
            llm.reset()
            warm = llm.tokenize(_words(8, 99).encode())[: max(1, cfg.chunk_tokens - 2)]
            llm.create_completion(warm, max_tokens=1, temperature=0.0)
        system = _words(cfg.system_tokens, 0)
        history = {c: [{"role": "system", "content": system}] for c in range(cfg.conversations)}
        order = [(t, c) for t in range(cfg.turns) for c in range(cfg.conversations)]
        rows: list[Row] = []
        labels = list(engines)
        for i, (turn, conv) in enumerate(order):
            label = labels[i % len(labels)]  # alternate: each request may land on another engine
            llm, node = engines[label], placement[label]
            _progress(i, len(order), f"conversation {conv + 1}, turn {turn + 1} on {label}")
            history[conv].append({"role": "user", "content": _words(40, 100 * conv + turn + 1)})
            llm.reset()  # an empty context: whatever is reused comes through the mesh
            before_reused, before_peer = llm.mesh.stats.hit_tokens, _peer_hits(node)
            clock = _FirstTokenClock()
            reply = llm.create_chat_completion(
                history[conv], max_tokens=12, temperature=0.0, logits_processor=[clock]
            )
            ttft = clock.seconds()
            answer = reply["choices"][0]["message"].get("content") or "ok"
            history[conv].append({"role": "assistant", "content": answer})
            peer = _peer_hits(node)
            reused = llm.mesh.stats.hit_tokens - before_reused
            source = "cold" if reused == 0 else "peer node" if peer > before_peer else "local node"
            rows.append(
                Row(
                    conv + 1,
                    turn + 1,
                    f"{label} @ {node.name}",
                    llm.mesh.prompt_tokens,
                    reused,
                    1000 * ttft,
                    source,
                )
            )
            for other in engines.values():
                other.mesh.flush(10.0)  # the next request must find what this one stored
        _progress(len(order), len(order), "done")
        print(file=sys.stderr)
        return rows
    finally:
        for llm in engines.values():
            llm.close()
        for node in nodes:
            node.stop()
        if cfg.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def report(rows: list[Row]) -> str:
    lines = [
        f"{'#':>2}  {'conv':>4}  {'turn':>4}  {'engine':<22} {'prompt':>6}  {'reused':>6}  {'TTFT ms':>8}  from",
        "-" * 72,
    ]
    for i, r in enumerate(rows, 1):
        lines.append(
            f"{i:>2}  {r.conversation:>4}  {r.turn:>4}  {r.engine:<22} {r.prompt_tokens:>6}  "
            f"{r.reused_tokens:>6}  {r.ttft_ms:>8.0f}  {r.source}"
        )
    cold = [r.ttft_ms for r in rows if r.source == "cold"]
    hit = [r.ttft_ms for r in rows if r.source != "cold"]
    lines.append("-" * 72)
    if cold and hit:
        c, h = statistics.median(cold), statistics.median(hit)
        lines.append(
            f"median TTFT: cold {c:.0f} ms ({format_count(len(cold), 'request')}), with a mesh hit "
            f"{h:.0f} ms ({format_count(len(hit), 'request')}): {c / max(h, 1e-9):.1f}x faster"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> str:
    try:
        write_bar_chart(
            path,
            [r.ttft_ms for r in rows],
            [COLOURS[r.source] for r in rows],
            title="time to first token (ms) per request",
            labels=[str(i) for i in range(1, len(rows) + 1)],
            x_title="request # (as in the table)",
            legend=list(COLOURS.items()),
        )
    except OSError as exc:
        return f"plot not written: {exc}"
    return f"plot: {path}"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the nodes and engines are stopped on the way out


def add_demo_parser(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="run a 3-node mesh and two llama.cpp engines on a generated model; show TTFT cold vs hit",
        description="Needs the [llama] extra. Takes about 20 s on 2 cores.",
    )
    d = DemoConfig()
    demo.add_argument("--conversations", type=int, default=d.conversations, metavar="N")
    demo.add_argument("--turns", type=int, default=d.turns, metavar="N")
    demo.add_argument(
        "--system-tokens", type=int, default=d.system_tokens, metavar="N", help="shared prompt length"
    )
    demo.add_argument(
        "--preset", default=d.preset, help="generated model size: tiny or mid (default: %(default)s)"
    )
    demo.add_argument("--chunk-tokens", type=int, default=d.chunk_tokens, metavar="N")
    demo.add_argument(
        "--threads", type=int, default=d.threads, metavar="N", help="llama.cpp threads per engine"
    )
    demo.add_argument("--plot", type=Path, default=d.plot, metavar="FILE.png")
    demo.add_argument("--workdir", type=Path, metavar="DIR", help="keep the nodes' data and the model here")


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, RuntimeError, OSError) as exc:  # missing, or its native library is
        print(
            f"lmcache-node demo: error: llama-cpp-python is not usable ({exc}); install the llama extra:\n"
            "  CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF\" pip install -e '.[llama]'   # in the lmcache-mesh checkout",
            file=sys.stderr,
        )
        return 1
    cfg = DemoConfig(
        workdir=args.workdir,
        conversations=args.conversations,
        turns=args.turns,
        system_tokens=args.system_tokens,
        preset=args.preset,
        chunk_tokens=args.chunk_tokens,
        threads=args.threads,
        plot=args.plot,
    )
    if cfg.conversations < 1 or cfg.turns < 1 or cfg.system_tokens < 1:
        raise ValueError("--conversations, --turns and --system-tokens must be positive")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        rows = run_demo(cfg)
    except KeyboardInterrupt:
        print("\ninterrupted; the demo's nodes and engines are stopped", file=sys.stderr)
        return 130
    print(report(rows))
    print(plot(rows, cfg.plot))
    return 0
