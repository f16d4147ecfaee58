"""Side by side with llama-cpp-python's own server: `lmcache-node serve` + nodes against
`python -m llama_cpp.server` with its cache off, `--cache_type ram` and `--cache_type disk`.

All real: the same model (SmolLM2-135M-Instruct from the registry by default) in every
server (8k context, logits of the last token only, all cores), the official ``openai``
client, streaming chat completions, greedy, 8 tokens each.
TTFT is the time from sending a request to the first chunk that carries text. The systems
run one after another through the same workloads:

* chat: 3 users, a shared ~550-token system prompt (a guide to an island), 3 rounds each with
  the model's own answers in the growing history, users taking turns;
* document QA: one ~4k-token document, 5 questions about it, one after another;
* no reuse: 4 prompts of ~1k tokens nobody asked before (what reuse machinery costs);
* restart: the server is stopped and started again (the node, for the mesh, keeps running;
  the disk cache keeps its folder), then 3 more questions about the document;
* second server: another server (the mesh: on a second node of the mesh; the others: a
  process of their own, as on another machine) gets 3 questions about the document the
  first one read.

Medians and p90 per workload, the first request of each ("cold"), and median ratios to the
plain server (cache off). Writes JSON and a chart (``bench/results/bench_servers.*``).

Run:  python bench/bench_servers.py                 (about 8 min on 2 cores)
      python bench/bench_servers.py --quick         (fewer questions, about 4 min)
      python bench/bench_servers.py --model FILE.gguf
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import (
    Comparison,
    ServerProcess,
    ask,
    free_port,
    machine_info,
    start_mesh_daemon,
    summarise,
    wait_for,
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
    "restart": "after a restart",
    "second": "second server",
}
COLOURS = {"plain": (150, 150, 150), "ram": (240, 170, 60), "disk": (200, 110, 60), "mesh": (52, 120, 200)}
COMPARISON = Comparison(LABELS, WORKLOAD_LABELS, COLOURS, base="plain",
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


def run_system(
    system: str, model: Path, root: Path, w: Workloads, threads: int, salt: int
) -> dict[str, list[float]]:
    """Every workload on one system; its servers (and nodes) are stopped before it returns."""
    nodes: list[Daemon] = []
    servers: list[ServerProcess] = []
    try:
        node: str | None = None
        second_node: str | None = None
        if system == "mesh":
            nodes.append(start_mesh_daemon(71, None, memory="2GiB"))
            nodes.append(start_mesh_daemon(72, nodes[0].tcp, memory="2GiB"))
            if wait_for(lambda: all(d.alive_members() == 2 for d in nodes), 30) is None:
                raise RuntimeError("the two nodes did not see each other in 30 s")
            node, second_node = nodes[0].tcp, nodes[1].tcp
        first = server(system, model, root / system / "one", threads, node)
        servers.append(first.start())
        out: dict[str, list[float]] = {}
        log(f"  {LABELS[system]}: chat")
        out["chat"] = w.chat(first)
        log(f"  {LABELS[system]}: document QA")
        out["docqa"] = w.docqa(first, 0, w.questions)
        log(f"  {LABELS[system]}: no reuse")
        out["noreuse"] = w.noreuse(first, salt)
        log(f"  {LABELS[system]}: restart")
        first.stop()
        first.start()
        out["restart"] = w.docqa(first, w.questions, w.after)
        log(f"  {LABELS[system]}: second server")
        second = server(system, model, root / system / "two", threads, second_node)
        servers.append(second.start())
        out["second"] = w.docqa(second, w.questions + w.after, w.after)
        return out
    finally:
        for s in servers:
            s.stop()
        for d in nodes:
            d.stop()


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
    samples: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-servers-") as root:
        for salt, system in enumerate(systems):
            log(f"{LABELS[system]} ({salt + 1}/{len(systems)})")
            samples[system] = run_system(system, model, Path(root), w, args.threads, salt)
    cells = summarise(samples, base="plain")
    print(COMPARISON.table(cells, systems))
    write_results(
        {"machine": machine_info(model=model.name, threads=args.threads), "workloads": cells}, args.out
    )
    COMPARISON.chart(cells, systems, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
