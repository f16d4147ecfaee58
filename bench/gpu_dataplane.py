"""The vLLM worker's data path on a GPU: a hit loaded into paged CUDA KV, against the pinned
host-to-device ceiling and against the prefill it replaces, all measured in one run.

A real ``lmcache-node run`` on this host (its memory tier in shared memory), the worker's own
code (``engines/vllm/worker.py``: RESERVE, per-layer copies out of the paged tensor, commit;
then a verified read under a lease and per-layer copies into the paged blocks, beside a
forward that waits on each layer), with the KV geometry of Llama-3-8B in bf16 (32 layers,
8 KV heads of 128; 256-token chunks, 16-token blocks) and a 4096-token prompt:

* **load, all layers first**: what the worker does until vLLM is seen waiting on layers;
* **load, layer by layer**: per-layer copies on the worker's stream, each layer's event
  waited on by the forward's stream (here: an empty forward, so this is the copy time);
* **pinned host->device**: ``copy_`` from page-locked memory of the same bytes (the ceiling);
* **prefill**: a random-weight Llama of the same geometry (transformers, bf16, SDPA) run
  over the same prompt length on the same device.

Every loaded block is compared with what was saved (a mismatch fails the run). Prints a
table, writes JSON and a PNG chart. Targets: load >= 0.5x the pinned ceiling, and a 4k-token
load <= 0.25x its prefill time.

Run:  python bench/gpu_dataplane.py             (CUDA: Llama-3-8B geometry, 4096 tokens)
      python bench/gpu_dataplane.py --small     (any device, CPU included: a small geometry,
                                                 what CI runs so this never rots)

A GPU machine without internet and without this project's dependencies: on a machine with
the registry, ``python bench/gpu_dataplane.py --fetch-wheels gpu-wheels --python 3.12`` (the
GPU machine's Python), copy the folder along, and run there with ``--wheels gpu-wheels``:
the wheels are installed into a private folder, and the checkout is imported from source.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("node", "mesh", "transports", "engines")
NEEDS = ["pyzmq", "msgpack", "xxhash", "numpy", "prometheus-client", "rich", "cachetools"]
"""What the node and the worker import (torch and transformers the GPU machines carry)."""


def fetch_wheels(folder: Path, python: str) -> int:
    """Download wheels of :data:`NEEDS` (and their dependencies) for CPython ``python`` on x86_64."""
    version = python.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", version,
           "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
           "--implementation", "cp", "-d", str(folder), *NEEDS]  # fmt: skip
    return subprocess.call(cmd)


def bootstrap(wheels: Path | None) -> None:
    """Make ``lmcache_mesh`` and its dependencies importable without installing anything:
    the checkout through a folder of links, the wheels into a private folder (for the node
    subprocess too, through PYTHONPATH)."""
    paths = []
    if importlib.util.find_spec("zmq") is None:
        if wheels is None:
            raise SystemExit("pyzmq is missing: install the project, or bring wheels (--wheels; see --help)")
        target = Path(tempfile.mkdtemp(prefix="lmc-wheels-"))
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links",
                               str(wheels), "--target", str(target), *NEEDS[:3], *NEEDS[4:]])  # fmt: skip
        paths.append(str(target))
    if importlib.util.find_spec("lmcache_mesh") is None:
        links = Path(tempfile.mkdtemp(prefix="lmc-src-"))
        (links / "lmcache_mesh").mkdir()
        (links / "lmcache_mesh" / "__init__.py").write_text("")
        for name in PACKAGES:
            (links / "lmcache_mesh" / name).symlink_to(ROOT / name)
        paths.append(str(links))
    if paths:
        sys.path[:0] = paths
        os.environ["PYTHONPATH"] = os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])


@dataclass(frozen=True)
class Geometry:
    """A Llama's shape (what transformers builds) and the prompt length measured with it."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tokens: int

    @property
    def head_size(self) -> int:
        return self.hidden // self.heads


LLAMA3_8B = Geometry("Llama-3-8B", 32, 4096, 32, 8, 14336, 128256, 4096)
SMALL = Geometry("small", 4, 256, 4, 2, 512, 1024, 1024)
CHUNK_TOKENS = 256
BLOCK = 16
TARGETS = {"load_vs_pinned_h2d": 0.5, "load_vs_prefill": 0.25}


def median_s(run: Any, reps: int, sync: Any) -> float:
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(geometry: Geometry, device_name: str, reps: int) -> dict[str, Any]:
    import torch

    from lmcache_mesh.engines.cli import launch
    from lmcache_mesh.engines.store import MeshStore, StoreConfig
    from lmcache_mesh.engines.vllm.metadata import LoadSpec, MeshConnectorMetadata, SaveSpec
    from lmcache_mesh.engines.vllm.worker import WorkerSide
    from lmcache_mesh.node.keys import chunk_keys, namespace_id

    device = torch.device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = geometry
    dtype = torch.bfloat16
    chunks = g.tokens // CHUNK_TOKENS
    blocks = g.tokens // BLOCK
    bytes_per_token = g.layers * 2 * g.kv_heads * g.head_size * 2
    total = g.tokens * bytes_per_token
    descriptor = {
        "n_layers": g.layers,
        "n_kv_heads": g.kv_heads,
        "head_size": g.head_size,
        "dtype": "bfloat16",
    }
    names = [f"model.layers.{i}.self_attn.attn" for i in range(g.layers)]
    kv = {n: torch.randn(2, 2 * blocks + 1, BLOCK, g.kv_heads, g.head_size, dtype=dtype, device=device)
          for n in names}  # fmt: skip
    saved_blocks, load_blocks = list(range(1, blocks + 1)), list(range(blocks + 1, 2 * blocks + 1))
    tokens = list(range(7, 7 + g.tokens))
    memory = max(2 * total, 256 << 20)
    node = launch.start("--memory", str(memory), "--disk", "0", ipc=True, isolate=True, ping=True)
    try:
        assert node.ipc is not None
        store = MeshStore(StoreConfig(node=node.ipc, fetch_timeout_s=60, put_timeout_s=60))
        ns = namespace_id(b"gpu-dataplane", descriptor, chunk_tokens=CHUNK_TOKENS)
        worker = WorkerSide(ns, descriptor, CHUNK_TOKENS, BLOCK, store, 4 * total)
        worker.register(kv)
        print(
            f"[save] {chunks} chunks of {worker.chunk_bytes / 2**20:.1f} MiB through the worker ...",
            flush=True,
        )
        save = MeshConnectorMetadata(saves=[SaveSpec("saved", tokens, saved_blocks, 0, chunks)])
        for n in names:
            worker.save_layer(save, n)
        worker.end_step(save)
        keys = chunk_keys(ns, tokens, CHUNK_TOKENS)
        deadline = time.monotonic() + 120
        while store.lookup(keys, local=True) < chunks and time.monotonic() < deadline:
            time.sleep(0.05)
        if store.lookup(keys, local=True) < chunks:
            raise RuntimeError("the saves did not land on the node within 120 s")
        load = MeshConnectorMetadata(loads=[LoadSpec("hit", tokens, load_blocks, 0, g.tokens)])

        def load_all_first() -> None:
            worker.load(load)
            worker.take_failed_blocks()

        def load_layerwise() -> None:
            worker.load(load)
            for n in names:  # the forward: each layer waits for its loads
                worker.wait_layer(n)
            worker.end_step(MeshConnectorMetadata())
            if worker.take_failed_blocks():
                raise RuntimeError("a pipelined load failed")

        print("[load] all layers first, then layer by layer ...", flush=True)
        first_s = median_s(load_all_first, reps, sync)
        load_layerwise()  # vLLM is seen waiting on every layer: loads pipeline from now on
        layerwise_s = median_s(load_layerwise, reps, sync)
        if worker.stats["pipelined_loads"] < reps:
            raise RuntimeError(f"loads were not pipelined: {worker.stats}")
        for n in names:
            if not torch.equal(kv[n][:, saved_blocks], kv[n][:, load_blocks]):
                raise RuntimeError(f"loaded KV differs from the saved KV in {n}")
        transport = store.transport
        worker.close()
        store.close()
    finally:
        node.stop()
    print("[ceiling] pinned host->device copies of the same bytes ...", flush=True)
    pinned = torch.empty(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
    pinned.fill_(1)
    target = torch.empty(total, dtype=torch.uint8, device=device)
    pinned_s = median_s(lambda: target.copy_(pinned, non_blocking=True), max(reps, 3), sync)
    print("[prefill] a random-weight Llama of the same geometry ...", flush=True)
    prefill_s = prefill_seconds(g, device, reps, sync)
    load_s = min(first_s, layerwise_s)
    return {
        "geometry": {**asdict(g), "head_size": g.head_size}, "device": device_name, "device_name": _device_name(device),
        "bytes": total, "chunks": chunks, "transport": transport,
        "load_all_first_s": first_s, "load_layerwise_s": layerwise_s, "pinned_h2d_s": pinned_s,
        "prefill_s": prefill_s, "load_gbps": total / load_s / 1e9, "pinned_h2d_gbps": total / pinned_s / 1e9,
        "ratios": {"load_vs_pinned_h2d": pinned_s / load_s, "load_vs_prefill": load_s / prefill_s},
    }  # fmt: skip


def prefill_seconds(g: Geometry, device: Any, reps: int, sync: Any) -> float:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=g.hidden, intermediate_size=g.intermediate, num_hidden_layers=g.layers,
                         num_attention_heads=g.heads, num_key_value_heads=g.kv_heads, head_dim=g.head_size,
                         vocab_size=g.vocab, max_position_embeddings=2 * g.tokens)  # fmt: skip
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    ids = torch.randint(0, g.vocab, (1, g.tokens), device=device)
    with torch.inference_mode():
        model(ids[:, : min(256, g.tokens)], use_cache=True)  # warm up kernels
        seconds = median_s(lambda: model(ids, use_cache=True), reps, sync)
    return seconds


def _device_name(device: Any) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def report(r: dict[str, Any]) -> str:
    from lmcache_mesh.engines.cli.tables import Column, render, table

    t = table(Column("path"), "seconds", "GB/s", "× pinned H2D", "× prefill")
    total, prefill = r["bytes"], r["prefill_s"]
    for label, key in (("load, all layers first", "load_all_first_s"), ("load, layer by layer", "load_layerwise_s"),
                       ("pinned host->device copy", "pinned_h2d_s"), ("prefill (transformers)", "prefill_s")):  # fmt: skip
        s = r[key]
        gbps = f"{total / s / 1e9:.2f}" if key != "prefill_s" else ""
        t.add_row(
            label, f"{s:.4f}", gbps, f"{r['pinned_h2d_s'] / s:.2f}" if gbps else "", f"{s / prefill:.3f}"
        )
    g = r["geometry"]
    head = (f"{g['name']} geometry, {g['tokens']} tokens ({total / 2**20:.0f} MiB of KV), "
            f"{r['device_name']}, node over {r['transport']}")  # fmt: skip
    return head + "\n" + render(t)


def draw(r: dict[str, Any], path: Path) -> None:
    from lmcache_mesh.engines.cli import chart

    if not chart.available():
        print(chart.MISSING)
        return
    values = [r["ratios"]["load_vs_pinned_h2d"], r["ratios"]["load_vs_prefill"]]
    chart.write_bar_chart(path, values, [(40, 110, 200), (200, 120, 60)],
                          labels=["load GB/s / pinned H2D GB/s", "load time / prefill time"],
                          title=f"A {r['geometry']['tokens']}-token hit into paged KV on {r['device_name']}",
                          y_title="ratio (same run)", width=800, height=420)  # fmt: skip
    print(f"chart written to {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a small geometry (any device; what CI runs)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--reps", type=int, default=5, help="runs per measurement (median reported)")
    parser.add_argument("--wheels", type=Path, help="a folder of wheels for what this machine lacks")
    parser.add_argument("--fetch-wheels", type=Path, metavar="DIR", help="download those wheels and exit")
    parser.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="with --fetch-wheels: the GPU machine's Python version")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_dataplane.json")
    args = parser.parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels(args.fetch_wheels, args.python)
    bootstrap(args.wheels)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    geometry = SMALL if args.small or device == "cpu" else LLAMA3_8B
    result = measure(geometry, device, args.reps)
    print(report(result))
    verdicts = {}
    for name, target in TARGETS.items():
        value = result["ratios"][name]
        ok = value >= target if name == "load_vs_pinned_h2d" else value <= target
        verdicts[name] = {"value": round(value, 3), "target": target, "pass": ok}
        sign = ">=" if name == "load_vs_pinned_h2d" else "<="
        print(f"{name}: {value:.3f} (target {sign} {target}) {'PASS' if ok else 'FAIL'}"
              + ("" if device == "cuda" else "  (targets are for a GPU; on the CPU this checks the path)"))  # fmt: skip
    result["targets"] = verdicts
    from benchlib import machine_info, write_results

    result["machine"] = machine_info(reps=args.reps)
    write_results(result, args.out)
    draw(result, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
