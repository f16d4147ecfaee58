"""Side by side with llama-cpp-python's own server: `lmcache-node serve` + nodes against
`python -m llama_cpp.server` with its cache off, `--cache_type ram` and `--cache_type disk`.

All real: the same model (SmolLM2-135M-Instruct from the registry by default) in every
server (8k context, logits of the last token only, all cores), the official ``openai``
client, streaming chat completions, greedy, 8 tokens each.
TTFT is the time from sending a request to the first chunk that carries text. All servers
are up together and each workload runs on one system after another (the order rotating), so
that the machine's drift falls on all of them alike:

* chat: 3 users, a shared ~550-token system prompt (a guide to an island), 3 rounds each with
  the model's own answers in the growing history, users taking turns;
* document QA: one ~4k-token document, 5 questions about it, one after another;
* no reuse: 4 prompts of ~1k tokens nobody asked before (what reuse machinery costs);
* restart: the server is stopped and started again (the node, for the mesh, keeps running;
  the disk cache keeps its folder), then 3 more questions about the document;
* second server: the first server stops and another starts (the mesh: on a second node of
  the mesh; the others: a process of their own, as on another machine) and gets 3 questions
  about the document the first one read;
* the same ~1.8k-token prompt (real text and a question) asked once on the first server and
  again, word for word, on the second: for the mesh, a hit down to its tail against a cold
  prefill.

Median, mean and p90 per workload, the first request of each ("cold"), and the mean's ratio
to the plain server (cache off). Writes JSON and a chart (``bench/results/bench_servers.*``).

Run:  python bench/bench_servers.py                 (about 14 min on 2 cores)
      python bench/bench_servers.py --quick         (fewer questions, about 7 min)
      python bench/bench_servers.py --model FILE.gguf
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import (
    Comparison,
    ServerProcess,
    ask,
    free_port,
    machine_info,
    rotated,
    start_mesh_pair,
    summarise,
    write_results,
)

from lmcache_mesh.engines.cli.demo import QUESTIONS, _guide, _words
from lmcache_mesh.engines.cli.launch import Daemon

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_servers.json"
SYSTEMS = ("plain", "ram", "disk", "mesh")
LABELS = {
    "plain": "llama_cpp.server",
    "ram": "llama_cpp.server --cache_type ram",
    "disk": "llama_cpp.server --cache_type disk",
    "mesh": "lmcache-node serve + node",
}
WORKLOAD_LABELS = {
    "chat": "multi-turn chat",
    "docqa": "document QA",
    "noreuse": "no reuse",
    "once": "~1.8k-token prompt, first ask",
    "restart": "after a restart",
    "second": "second server",
    "again": "~1.8k-token prompt again, second server",
}
COLOURS = {"plain": (150, 150, 150), "ram": (240, 170, 60), "disk": (200, 110, 60), "mesh": (52, 120, 200)}
# the mean: after a restart or on a second server the first question pays for the document,
# the next ones find it in the server's own context; a median of 3 would hide that cost
COMPARISON = Comparison(LABELS, WORKLOAD_LABELS, COLOURS, base="plain", metric="mean",
                        title="TTFT, streaming chat through the openai client (same model, same prompts)")  # fmt: skip
N_CTX = 8192
MAX_TOKENS = 8
HOST = "127.0.0.1"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def server(system: str, model: Path, workdir: Path, threads: int, node: str | None = None) -> ServerProcess:
    """The server process of ``system`` (not started yet)."""
    port = free_port(HOST)
    if system == "mesh":
        assert node is not None
        cmd = [sys.executable, "-m", "lmcache_mesh.engines.cli", "serve", "--model", str(model),
               "--host", HOST, "--port", str(port), "--node", node, "--n-ctx", str(N_CTX),
               "--threads", str(threads), "--log-level", "warning"]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", HOST,
               "--port", str(port), "--n_ctx", str(N_CTX), "--n_threads", str(threads),
               "--n_threads_batch", str(threads), "--verbose", "false",
               # its default (true) keeps logits for every prompt token: a slower prefill than
               # serve's, and states of n_ctx x vocab floats (1.6 GB at 8k) in its caches
               "--logits_all", "false"]  # fmt: skip
        if system in ("ram", "disk"):
            cmd += ["--cache", "true", "--cache_type", system]
    # the disk cache lives in the working directory (.cache/llama_cache): it survives a restart
    return ServerProcess(LABELS[system], cmd, workdir, port, env={"OMP_NUM_THREADS": str(threads)}, host=HOST)


def document_question(document: str, question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{document}\n\nQuestion: {question}"}]


@dataclass
class Workloads:
    """The prompts every system gets, the same for all."""

    users: int
    rounds: int
    questions: int
    after: int
    unique: int
    system_prompt: str = field(default_factory=lambda: _guide(400))
    document: str = field(default_factory=lambda: _guide(2800))
    # its own opening, so it shares no chunk with the document
    repeated: str = field(default_factory=lambda: "Read this guide, then answer. " + _guide(1250))

    def question(self, i: int) -> str:
        return QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" (asked again, #{i})")

    def chat(self, server: ServerProcess) -> list[float]:
        histories = [[{"role": "system", "content": self.system_prompt}] for _ in range(self.users)]
        took = []
        for r in range(self.rounds):
            for u, history in enumerate(histories):
                history.append({"role": "user", "content": self.question(3 * u + r)})
                ttft, answer = ask(server, history, MAX_TOKENS)
                history.append({"role": "assistant", "content": answer})
                took.append(ttft)
        return took

    def repeat(self, server: ServerProcess) -> list[float]:
        return [ask(server, document_question(self.repeated, self.question(0)), MAX_TOKENS)[0]]

    def docqa(self, server: ServerProcess, first: int, n: int) -> list[float]:
        return [
            ask(server, document_question(self.document, self.question(first + i)), MAX_TOKENS)[0]
            for i in range(n)
        ]

    def noreuse(self, server: ServerProcess, salt: int) -> list[float]:
        # every system gets its own unseen prompts: a cache filled by an earlier system's run
        # (the node stays up across systems only within one) must not turn these into hits
        return [
            ask(server, [{"role": "user", "content": _words(700, 1000 * salt + i)}], MAX_TOKENS)[0]
            for i in range(self.unique)
        ]


@dataclass
class System:
    """One system under test: its server (and, for the mesh, its two nodes)."""

    name: str
    model: Path
    root: Path
    threads: int
    nodes: list[Daemon] = field(default_factory=list)
    server: ServerProcess | None = None

    def start(self, which: str) -> ServerProcess:
        """Server ``one`` (on the first node) or ``two`` (the second server: on the second node)."""
        if self.name == "mesh" and not self.nodes:
            self.nodes = start_mesh_pair(71)
        node = self.nodes[0 if which == "one" else 1].tcp if self.nodes else None
        self.server = server(self.name, self.model, self.root / which, self.threads, node).start()
        return self.server

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        for d in self.nodes:
            d.stop()


def run(systems: list[System], w: Workloads) -> dict[str, dict[str, list[float]]]:
    """Every workload on every system, side by side: all servers are up together and each
    workload runs on one system after another (the order rotating), so that the machine's
    drift falls on all of them alike."""
    samples: dict[str, dict[str, list[float]]] = {s.name: {} for s in systems}

    def each(workload: str, call: Callable[[ServerProcess, int], list[float]], turn: int) -> None:
        for s in rotated(systems, turn):
            log(f"  {LABELS[s.name]}: {WORKLOAD_LABELS[workload]}")
            assert s.server is not None
            samples[s.name][workload] = call(s.server, systems.index(s))

    for s in systems:
        s.start("one")
    each("chat", lambda srv, _: w.chat(srv), 0)
    each("docqa", lambda srv, _: w.docqa(srv, 0, w.questions), 1)
    each("noreuse", w.noreuse, 2)
    each("once", lambda srv, _: w.repeat(srv), 3)
    for s in systems:  # the nodes stay up; the disk cache keeps its folder
        assert s.server is not None
        s.server.stop()
        s.server.start()
    each("restart", lambda srv, _: w.docqa(srv, w.questions, w.after), 4)
    for s in systems:  # the first servers go: what they computed is in their caches (or lost)
        assert s.server is not None
        s.server.stop()
        s.start("two")
    each("second", lambda srv, _: w.docqa(srv, w.questions + w.after, w.after), 5)
    each("again", lambda srv, _: w.repeat(srv), 6)
    return samples


def resolve_model(name: str) -> Path:
    if name == "smollm2":
        from lmcache_mesh.engines.llamacpp.smollm2 import smollm2_path

        return smollm2_path()
    path = Path(name)
    if not path.is_file():
        raise SystemExit(f"--model {name}: no such GGUF file (or: smollm2)")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (default) or a GGUF file")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and questions")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2)), help="llama.cpp threads")
    ap.add_argument(
        "--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ", ".join(SYSTEMS)
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    model = resolve_model(args.model)
    systems = [s for s in args.systems.split(",") if s]
    if "plain" not in systems or any(s not in SYSTEMS for s in systems):
        raise SystemExit(f"--systems: a subset of {', '.join(SYSTEMS)} that includes plain (the baseline)")
    w = Workloads(users=3, rounds=2 if args.quick else 3, questions=3 if args.quick else 5,
                  after=2 if args.quick else 3, unique=2 if args.quick else 4)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-servers-") as root:
        running = [System(name, model, Path(root) / name, args.threads) for name in systems]
        try:
            samples = run(running, w)
        finally:
            for s in running:
                s.close()
    cells = summarise(samples, base="plain", metric=COMPARISON.metric)
    print(COMPARISON.table(cells, systems))
    write_results(
        {"machine": machine_info(model=model.name, threads=args.threads), "workloads": cells}, args.out
    )
    COMPARISON.chart(cells, systems, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
