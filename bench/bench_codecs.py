"""What each record codec costs and keeps: size, speed, and quality on a real model.

Quality, all real: SmolLM2-135M-Instruct (llama-cpp-python, 1 thread) on a real text, the
Python standard library's own documentation (``pydoc_data.topics``, every topic in sorted
order). For each of ``--windows`` windows of the text, the prefix (``--prefix`` tokens,
whole chunks of 256) is cached through a ``MeshLlama`` with the codec under test into an
``lmcache-node run`` daemon; a second ``MeshLlama`` with the same codec restores it from
the daemon (the adapter's own fetch, decode and restore) and then evaluates the next
``--score`` tokens one at a time. The baseline is a plain ``llama_cpp.Llama`` that computed
the prefix itself, in the same run. Per codec:

* perplexity of those tokens, and its change against the baseline (the issue's targets:
  8-bit within 1%, 4-bit within 3%);
* mean KL divergence of the next-token distributions from the baseline's, and top-1
  agreement (same argmax);
* greedy agreement: the first ``--greedy`` tokens generated after the prefix (the
  completion path), the share equal to the baseline's before the first difference;
* size: bytes stored for the prefix's chunks against raw.

A row "recomputed" is the control: the same engine computing the prefix in batches of 32
tokens instead of 512 (no codec), against the baseline (on this CPU llama.cpp gives
bit-identical KV, so every difference in the other rows is the codec's).

The KV types are the model's f16 and, for the lossless codec's size, bf16 too (llama.cpp's
``type_k``/``type_v``).

Speed: encode and decode, one thread, on the real KV and on chunks (256 tokens, bf16, vLLM's
``[layers, 2, tokens, heads x dim]``) of Llama-3-8B, Llama-3-70B, Qwen2.5-7B and Mistral-7B
geometries (random values: speed only), against a memcpy of the same bytes in the same run.
Medians of ``--reps``.

Prints tables, writes JSON to ``bench/results/bench_codecs.json`` and charts to
``docs/bench-codecs.png`` (size and perplexity change) and ``docs/bench-codecs-speed.png``.

With ``--vllm``, also vLLM's greedy agreement per codec on the same model turned into a
Hugging Face checkpoint (one engine per codec stores the prefixes and loads them back).

Run:  python bench/bench_codecs.py            (about 15 minutes; --vllm about 5 more)
      python bench/bench_codecs.py --quick    (2 windows, fewer reps)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from lmcache_mesh.engines.cli import chart  # noqa: E402
from lmcache_mesh.engines.cli.tables import Column, render, table  # noqa: E402
from lmcache_mesh.engines.llamacpp.smollm2 import smollm2_path  # noqa: E402
from lmcache_mesh.node import Client, chunk_keys  # noqa: E402
from lmcache_mesh.node.codecs import CODECS, decode, encode  # noqa: E402
from lmcache_mesh.node.kvformat import KVGeometry  # noqa: E402

CHUNK = 256
GGML_BF16 = 30
ENGINE_KW: dict[str, Any] = {"n_ctx": 4096, "n_threads": 1, "n_threads_batch": 1, "verbose": False}
GEOMETRIES = {  # layers, KV heads x head dim
    "Llama-3-8B": (32, 8 * 128),
    "Llama-3-70B": (80, 8 * 128),
    "Qwen2.5-7B": (28, 4 * 128),
    "Mistral-7B": (32, 8 * 128),
}
TARGETS = {"int8": 0.01, "fp8": 0.01, "int4": 0.03}
"""largest perplexity change allowed (relative)"""
SIZE_TARGETS = {"zstd": 1 / 1.2, "int8": 0.53, "fp8": 0.53, "int4": 0.3}


def text_tokens(llm: Any) -> list[int]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    return list(llm.tokenize(text.encode(), add_bos=False))


def windows(
    tokens: list[int], bos: int, count: int, prefix: int, score: int
) -> list[tuple[list[int], list[int]]]:
    """``count`` (prefix, continuation) pairs spread over the text, each prefix led by BOS."""
    span = prefix - 1 + score
    stride = (len(tokens) - span) // max(1, count)
    out = []
    for i in range(count):
        part = tokens[i * stride : i * stride + span]
        out.append(([bos, *part[: prefix - 1]], part[prefix - 1 :]))
    return out


def last_logits(llm: Any) -> np.ndarray:
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float64)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - math.log(float(np.exp(x).sum()))


def score_after(llm: Any, continuation: list[int]) -> list[np.ndarray]:
    """Log-probabilities after each of ``continuation[:-1]``, evaluated one at a time (the
    context already holds the prefix): the predictions of ``continuation[1:]``."""
    out = []
    for token in continuation[:-1]:
        llm.eval([token])
        out.append(log_softmax(last_logits(llm)))
    return out


def greedy(llm: Any, prefix: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(prefix, top_k=1, temp=0.0, reset=True):
        out.append(int(token))
        if len(out) == n:
            break
    return out


class Scores:
    """Per-position comparison of a run's predictions with the baseline's."""

    def __init__(self) -> None:
        self.nll: list[float] = []
        self.base_nll: list[float] = []
        self.kl: list[float] = []
        self.top1: list[int] = []
        self.greedy: list[float] = []

    def add(self, want: list[np.ndarray], got: list[np.ndarray], continuation: list[int]) -> None:
        for j, (p, q) in enumerate(zip(want, got, strict=True)):
            target = continuation[j + 1]
            self.base_nll.append(-p[target])
            self.nll.append(-q[target])
            self.kl.append(float(np.sum(np.exp(p) * (p - q))))
            self.top1.append(int(np.argmax(p) == np.argmax(q)))

    def add_greedy(self, want: list[int], got: list[int]) -> None:
        same = next((i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b), len(want))
        self.greedy.append(same / len(want))

    def row(self, **extra: Any) -> dict[str, Any]:
        ppl, base_ppl = math.exp(statistics.fmean(self.nll)), math.exp(statistics.fmean(self.base_nll))
        return {
            "perplexity": ppl,
            "baseline_perplexity": base_ppl,
            "perplexity_change": ppl / base_ppl - 1,
            "mean_kl": statistics.fmean(self.kl),
            "top1_agreement": statistics.fmean(self.top1),
            "greedy_agreement": statistics.fmean(self.greedy),
            **extra,
        }


def quality(args: argparse.Namespace, node: str, kv_type: int | None) -> dict[str, Any]:
    from llama_cpp import Llama

    from lmcache_mesh.engines.llamacpp import LlamaMeshConfig, MeshLlama

    model = str(smollm2_path())
    kw = {**ENGINE_KW, **({"type_k": kv_type, "type_v": kv_type} if kv_type is not None else {})}
    plain = Llama(model_path=model, **kw)
    pairs = windows(text_tokens(plain), plain.token_bos(), args.windows, args.prefix, args.score)
    base = []
    for prefix, continuation in pairs:
        plain.reset()
        plain.eval(prefix)
        base.append((score_after(plain, continuation), greedy(plain, prefix, args.greedy)))
    plain.close()
    rows: dict[str, Any] = {}
    # The control: the same engine computing the prefix in batches of 32 instead of 512.
    other = Llama(model_path=model, **{**kw, "n_batch": 32, "n_ubatch": 32})
    floor = Scores()
    for (prefix, continuation), (want, want_greedy) in zip(pairs, base, strict=True):
        other.reset()
        other.eval(prefix)
        floor.add(want, score_after(other, continuation), continuation)
        floor.add_greedy(want_greedy, greedy(other, prefix, args.greedy))
    other.close()
    rows["recomputed"] = floor.row(size_ratio=1.0, stored_chunks=0, restored_tokens=0)
    for codec in args.codecs:
        mesh = LlamaMeshConfig(node=node, chunk_tokens=CHUNK, codec=codec, tenant=f"bench-{codec}-{kv_type}")
        writer = MeshLlama(model_path=model, mesh=mesh, **kw)
        for prefix, _ in pairs:
            writer.create_completion(prefix, max_tokens=1, temperature=0.0)
        assert writer.mesh.flush(120), "saves did not finish"
        with Client(node, tenant=mesh.tenant or "") as client:
            stored = [
                r.header.length
                for prefix, _ in pairs
                for r in client.get_records(chunk_keys(writer.mesh.namespace, prefix, CHUNK))
                if r is not None
            ]
        raw_bytes = len(pairs) * (args.prefix // CHUNK) * writer.mesh.chunk_bytes
        writer.close()
        reader = MeshLlama(model_path=model, mesh=mesh, **kw)
        scores = Scores()
        for (prefix, continuation), (want, want_greedy) in zip(pairs, base, strict=True):
            reader.reset()
            restored = reader.mesh.before_prefill(prefix)
            if restored != len(prefix):
                raise RuntimeError(f"{codec}: restored {restored} of {len(prefix)} tokens")
            scores.add(want, score_after(reader, continuation), continuation)
            reader.reset()
            scores.add_greedy(want_greedy, greedy(reader, prefix, args.greedy))
        rows[codec] = scores.row(
            size_ratio=sum(stored) / raw_bytes,
            stored_chunks=len(stored),
            restored_tokens=reader.mesh.stats.hit_tokens,
        )
        reader.close()
        print(
            f"  {codec:5s} ppl {rows[codec]['perplexity']:.4f} (base {rows[codec]['baseline_perplexity']:.4f})  size {rows[codec]['size_ratio']:.3f}",
            flush=True,
        )
    return rows


def vllm_agreement(args: argparse.Namespace, node: str) -> dict[str, Any]:
    """Greedy agreement on vLLM (SmolLM2 turned into a Hugging Face checkpoint, f32 on this
    CPU): per codec one engine stores the windows' prefixes, then asks each prefix again —
    vLLM's own prefix cache is off, so the prefix is loaded from the mesh, decoded — and the
    first ``--greedy`` tokens are compared with an engine without the connector."""
    import tempfile

    from bench_vllm import Engine
    from transformers import AutoTokenizer

    from lmcache_mesh.engines.vllm.smollm2 import write_checkpoint

    checkpoint = write_checkpoint(Path(tempfile.gettempdir()) / "lmcache-mesh-bench" / "smollm2-hf")
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    from pydoc_data.topics import topics

    text = tokenizer("\n\n".join(topics[name] for name in sorted(topics)), add_special_tokens=False)[
        "input_ids"
    ]
    pairs = windows(list(text), tokenizer.bos_token_id or 1, args.windows, args.prefix, args.score)
    prompts = [prefix for prefix, _ in pairs]
    max_len = args.prefix + args.greedy + 64
    plain = Engine("vllm", checkpoint, None, max_len, core=0)
    try:
        want = [plain.generate(p, args.greedy)["tokens"] for p in prompts]
    finally:
        plain.close()
    rows: dict[str, Any] = {}
    for codec in args.codecs:
        engine = Engine(
            f"vllm-{codec}",
            checkpoint,
            node,
            max_len,
            core=0,
            extra={"codec": codec, "tenant": f"bench-vllm-{codec}"},
        )
        try:
            for p in prompts:
                engine.generate(p, 1)
            time.sleep(2.0)  # the saves land
            got = [engine.generate(p, args.greedy) for p in prompts]
        finally:
            engine.close()
        agree = [
            next((i for i, (a, b) in enumerate(zip(w, g["tokens"], strict=True)) if a != b), len(w)) / len(w)
            for w, g in zip(want, got, strict=True)
        ]
        rows[codec] = {
            "greedy_agreement": statistics.fmean(agree),
            "cached_tokens": [g["cached"] for g in got],
        }
        print(
            f"  vllm {codec:5s} greedy agreement {rows[codec]['greedy_agreement']:.3f} cached {rows[codec]['cached_tokens']}",
            flush=True,
        )
    return rows


def median_seconds(call: Any, reps: int) -> float:
    took = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        took.append(time.perf_counter() - start)
    return statistics.median(took)


def codec_speeds(payload: np.ndarray, geometry: KVGeometry, reps: int) -> dict[str, Any]:
    """Encode and decode speeds of every codec on ``payload``, with a memcpy of it as the baseline."""
    target = np.empty_like(payload)
    memcpy = median_seconds(lambda: np.copyto(target, payload), reps)
    row: dict[str, Any] = {"chunk_bytes": payload.nbytes, "memcpy_gb_s": payload.nbytes / memcpy / 1e9}
    for codec in CODECS[1:]:
        packed = encode(codec, payload, geometry)
        enc = median_seconds(lambda c=codec: encode(c, payload, geometry), reps)
        dec = median_seconds(lambda c=codec, p=packed: decode(c, p, geometry), reps)
        row[codec] = {
            "encode_gb_s": payload.nbytes / enc / 1e9,
            "decode_gb_s": payload.nbytes / dec / 1e9,
            "size_ratio": packed.nbytes / payload.nbytes,
        }
    return row


def speed(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(0)
    for name, (layers, channels) in GEOMETRIES.items():
        geometry = KVGeometry(layers, CHUNK, channels, channels, "bf16", interleaved=True)
        values = torch.randn(geometry.elements, generator=gen) * torch.rand(channels, generator=gen).repeat(
            geometry.elements // channels
        )
        payload = values.bfloat16().view(torch.uint8).numpy()
        out[name] = codec_speeds(payload, geometry, args.reps)
        print(f"  {name}: {payload.nbytes / 2**20:.0f} MiB per chunk", flush=True)
    return out


def quality_table(rows: dict[str, Any], title: str) -> str:
    t = table(Column("codec"), "size x raw", "perplexity", "change", "mean KL", "top-1 agree",
              "greedy agree", title=title)  # fmt: skip
    for codec, r in rows.items():
        t.add_row(codec, f"{r['size_ratio']:.3f}", f"{r['perplexity']:.4f}", f"{100 * r['perplexity_change']:+.2f}%",
                  f"{r['mean_kl']:.5f}", f"{r['top1_agreement']:.3f}", f"{r['greedy_agreement']:.3f}")  # fmt: skip
    return render(t)


def speed_table(rows: dict[str, Any]) -> str:
    t = table(Column("geometry"), Column("codec"), "encode GB/s", "decode GB/s", "size x raw", "decode / memcpy",
              title="Codec speed per core (256-token bf16 chunks, vLLM layout; random values: sizes of zstd not meaningful)")  # fmt: skip
    for name, row in rows.items():
        for codec in CODECS[1:]:
            c = row[codec]
            t.add_row(name, codec, f"{c['encode_gb_s']:.2f}", f"{c['decode_gb_s']:.2f}", f"{c['size_ratio']:.3f}",
                      f"{c['decode_gb_s'] / row['memcpy_gb_s']:.3f}")  # fmt: skip
        t.add_row(name, "memcpy", f"{row['memcpy_gb_s']:.2f}", f"{row['memcpy_gb_s']:.2f}", "1.000", "1.000")
    return render(t)


COLOURS = {
    "raw": (150, 150, 150),
    "zstd": (70, 130, 180),
    "int8": (60, 160, 90),
    "fp8": (230, 150, 40),
    "int4": (200, 70, 70),
}


def charts(result: dict[str, Any], folder: Path) -> None:
    if not chart.available():
        print(chart.MISSING)
        return
    rows = result["quality"]["f16"]
    codecs = [c for c in rows if c in COLOURS]
    chart.write_bar_chart(
        folder / "bench-codecs.png", [rows[c]["size_ratio"] for c in codecs], [COLOURS[c] for c in codecs],
        labels=codecs, title="SmolLM2 f16 KV: stored size x raw, and perplexity change (labels)",
        y_title="size / raw (lower is smaller)",
        value_labels=[f"{rows[c]['size_ratio']:.2f}x, {100 * rows[c]['perplexity_change']:+.2f}%" for c in codecs],
    )  # fmt: skip
    speed_rows = result["speed"]
    values, colours, labels = [], [], []
    for name, row in speed_rows.items():
        for i, codec in enumerate(CODECS[1:]):
            values.append(row[codec]["decode_gb_s"])
            colours.append(COLOURS[codec])
            labels.append(name if i == 1 else "")
    chart.write_bar_chart(
        folder / "bench-codecs-speed.png", values, colours, labels=labels, width=1000,
        title="Decode speed per core, GB/s of raw KV (256-token bf16 chunks)", y_title="GB/s",
        legend=[(c, COLOURS[c]) for c in CODECS[1:]], value_labels=[f"{v:.1f}" for v in values],
    )  # fmt: skip
    print(f"charts written to {folder / 'bench-codecs.png'} and {folder / 'bench-codecs-speed.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 windows, 3 reps")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument(
        "--prefix", type=int, default=1024, help="tokens of each window's cached prefix (whole chunks)"
    )
    parser.add_argument("--score", type=int, default=128, help="tokens scored after each prefix")
    parser.add_argument("--greedy", type=int, default=32, help="greedy tokens compared after each prefix")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=CODECS)
    parser.add_argument(
        "--vllm", action="store_true", help="also vLLM's greedy agreement per codec (about 5 min more)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_codecs.json")
    parser.add_argument("--charts", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    args = parser.parse_args()
    if args.quick:
        args.windows, args.reps = 2, 3
    if args.prefix % CHUNK:
        parser.error(f"--prefix must be whole chunks of {CHUNK}")
    daemon = benchlib.start_mesh_daemon(71, None, memory="2GiB")
    try:
        print("quality, f16 KV:", flush=True)
        result: dict[str, Any] = {"quality": {"f16": quality(args, daemon.tcp, None)}}
        print("sizes, bf16 KV:", flush=True)
        bf16_args = argparse.Namespace(
            **{**vars(args), "codecs": [c for c in args.codecs if c in ("raw", "zstd")]}
        )
        result["quality"]["bf16"] = quality(bf16_args, daemon.tcp, GGML_BF16)
        if args.vllm:
            print("vLLM greedy agreement:", flush=True)
            result["vllm"] = vllm_agreement(args, daemon.tcp)
    finally:
        daemon.stop()
    print("speed:", flush=True)
    result["speed"] = speed(args)
    result["targets"] = {
        codec: {
            "perplexity_change_max": TARGETS.get(codec),
            "size_ratio_max": SIZE_TARGETS.get(codec),
            "size_ok": result["quality"]["f16"][codec]["size_ratio"] <= SIZE_TARGETS[codec]
            if codec in SIZE_TARGETS
            else None,
            "perplexity_ok": abs(result["quality"]["f16"][codec]["perplexity_change"]) <= TARGETS[codec]
            if codec in TARGETS
            else None,
        }
        for codec in result["quality"]["f16"]
        if codec in CODECS
    }
    result["setup"] = {k: v for k, v in vars(args).items() if k not in ("out", "charts")} | {
        "model": "SmolLM2-135M-Instruct Q4_1 (llama-cpp-python)",
        "text": "pydoc_data.topics (the standard library's documentation), topics in sorted order",
        "chunk_tokens": CHUNK,
    }
    result["machine"] = benchlib.machine_info()
    print(
        quality_table(
            result["quality"]["f16"], "SmolLM2, f16 KV: stored prefix restored through the mesh vs computed"
        )
    )
    print(quality_table(result["quality"]["bf16"], "SmolLM2, bf16 KV (lossless sizes)"))
    if "vllm" in result:
        t = table(Column("codec"), "greedy agree", Column("tokens loaded per prompt"),
                  title="vLLM on SmolLM2 (f32 KV): greedy tokens equal to vLLM alone, before the first difference")  # fmt: skip
        for codec, r in result["vllm"].items():
            t.add_row(codec, f"{r['greedy_agreement']:.3f}", " ".join(map(str, r["cached_tokens"])))
        print(render(t))
    print(speed_table(result["speed"]))
    benchlib.write_results(result, args.out)
    charts(result, args.charts)


if __name__ == "__main__":
    main()
