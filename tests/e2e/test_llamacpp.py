"""The llama.cpp adapter with real llama-cpp-python engines and a real node daemon."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmcache_mesh.node import ChunkRecord, Client, chunk_keys, tail_key

from ..helpers import Daemon, free_port
from .llama import CHUNK, greedy, meshed, next_logits, next_logits_split, plain, prompt, require, write_models

require("llama_cpp")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def engines(daemon: Daemon) -> Iterator[Any]:
    """Make MeshLlamas on the test's daemon; all are closed afterwards."""
    made: list[Any] = []

    def make(model: Path, **kw: Any) -> Any:
        llm = meshed(model, kw.pop("node", daemon.ipc), **kw)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.close()


def never_ending(llm: Any) -> Any:
    """A logits processor that keeps ``llm`` from ending its answer early."""

    def no_eos(input_ids: Any, scores: Any) -> Any:
        scores[llm.token_eos()] = -np.inf
        return scores

    return no_eos


def cache(llm: Any, tokens: list[int]) -> None:
    """Run ``tokens`` through a mesh engine and wait until its chunks are stored."""
    llm.create_completion(tokens, max_tokens=1, temperature=0.0)
    assert llm.mesh.flush(30)


@pytest.mark.parametrize("flash_attn", [False, True])
def test_a_hit_gives_the_same_greedy_output_and_logits(models, engines, flash_attn: bool) -> None:  # type: ignore[no-untyped-def]
    tokens = prompt(300)  # 4 full chunks and a tail of 44
    cache(engines(models["tiny"], flash_attn=flash_attn), tokens[: 4 * CHUNK])

    hit = engines(models["tiny"], flash_attn=flash_attn)
    reference = plain(models["tiny"], flash_attn=flash_attn)
    assert greedy(hit, tokens) == greedy(reference, tokens)
    assert hit.mesh.stats.hit_tokens == 4 * CHUNK

    # Restored KV + the rest equals computing the same two batches without the mesh, exactly;
    # against one 300-token batch only float noise of the batch split remains.
    hit_again = engines(models["tiny"], flash_attn=flash_attn)
    logits = next_logits(hit_again, tokens)
    # and the tail the first hit stored (its context: the prompt and what it generated)
    assert hit_again.mesh.stats.hit_tokens == 4 * CHUNK + 32
    split = next_logits_split(reference, tokens, 4 * CHUNK + 32)
    if flash_attn:  # the tail's KV was computed in another batch ([256:300]): flash attention's float noise
        np.testing.assert_allclose(logits, split, atol=2e-3)
    else:
        np.testing.assert_array_equal(logits, split)
    one_batch = next_logits(plain(models["tiny"], flash_attn=flash_attn), tokens)
    np.testing.assert_allclose(logits, one_batch, atol=2e-2)
    assert logits.argmax() == one_batch.argmax()


def test_a_prompt_sharing_k_chunks_reuses_exactly_k(models, engines) -> None:  # type: ignore[no-untyped-def]
    first = prompt(5 * CHUNK + 10)
    cache(engines(models["tiny"]), first)
    second = first[: 3 * CHUNK] + prompt(2 * CHUNK + 10, seed=9)[1:] + [7]
    llm = engines(models["tiny"])
    assert greedy(llm, second) == greedy(plain(models["tiny"]), second)
    assert llm.mesh.stats.hit_tokens == 3 * CHUNK


def test_a_prompt_differing_in_its_first_token_reuses_nothing(models, engines) -> None:  # type: ignore[no-untyped-def]
    first = prompt(4 * CHUNK)
    cache(engines(models["tiny"]), first)
    llm = engines(models["tiny"])
    other = [first[0], first[1] + 1, *first[2:]]
    assert greedy(llm, other) == greedy(plain(models["tiny"]), other)
    assert llm.mesh.stats.lookups == 1 and llm.mesh.stats.hit_tokens == 0


def test_another_model_of_the_same_shape_reuses_nothing(models, engines) -> None:  # type: ignore[no-untyped-def]
    tokens = prompt(4 * CHUNK + 1)
    tiny = engines(models["tiny"])
    cache(tiny, tokens)
    twin = engines(models["twin"])
    assert twin.mesh.namespace != tiny.mesh.namespace
    assert greedy(twin, tokens) == greedy(plain(models["twin"]), tokens)
    assert twin.mesh.stats.hit_tokens == 0


@pytest.mark.parametrize(
    ("cached_with", "used_with"),
    [
        ({"flash_attn": False}, {"flash_attn": True}),  # V transposed vs not
        ({}, {"type_k": 0, "type_v": 0}),  # KV cache f16 vs f32 (GGML_TYPE_F32 = 0)
        ({}, {"rope_freq_base": 500.0}),  # same layout, other positions' K
    ],
    ids=["v-layout", "kv-type", "rope"],
)
def test_another_kv_layout_never_mixes(models, engines, cached_with, used_with) -> None:  # type: ignore[no-untyped-def]
    tokens = prompt(4 * CHUNK + 1)
    first = engines(models["tiny"], **cached_with)
    cache(first, tokens)
    other = engines(models["tiny"], **used_with)
    assert other.mesh.namespace != first.mesh.namespace
    assert greedy(other, tokens) == greedy(plain(models["tiny"], **used_with), tokens)
    assert other.mesh.stats.hit_tokens == 0 and other.mesh.stats.lookups == 1


def test_a_chunk_of_another_namespace_under_a_right_key_is_not_restored(models, engines, daemon) -> None:  # type: ignore[no-untyped-def]
    tokens = prompt(3 * CHUNK + 1)
    llm = engines(models["tiny"])
    keys = chunk_keys(llm.mesh.namespace, tokens, CHUNK)
    forged = ChunkRecord.build(keys[0], b"\x01" * llm.mesh.chunk_bytes, b"\x02" * 16, {"tokens": CHUNK})
    with Client(daemon.tcp) as c:
        c.put_records([forged])
    assert greedy(llm, tokens) == greedy(plain(models["tiny"]), tokens)
    assert llm.mesh.stats.bad_chunks == 1 and llm.mesh.stats.hit_tokens == 0


def test_an_unreachable_node_means_recompute_never_an_error(models, engines) -> None:  # type: ignore[no-untyped-def]
    tokens = prompt(3 * CHUNK + 5)
    llm = engines(models["tiny"], node=f"tcp://127.0.0.1:{free_port()}", mesh={"lookup_timeout_s": 0.2})
    assert greedy(llm, tokens) == greedy(plain(models["tiny"]), tokens)
    assert greedy(llm, prompt(3 * CHUNK + 5, seed=4)) == greedy(
        plain(models["tiny"]), prompt(3 * CHUNK + 5, seed=4)
    )
    assert llm.mesh.flush(30)
    assert llm.mesh.store.stats.failures >= 1 and llm.mesh.stats.hit_tokens == 0


def test_streaming_chat_reuses_a_cached_conversation(models, engines) -> None:  # type: ignore[no-untyped-def]
    messages = [
        {"role": "system", "content": "You are a test. " * 40},
        {"role": "user", "content": "Say something about caches. " * 10},
    ]
    first = engines(models["tiny"])
    text = first.create_chat_completion(messages, max_tokens=8, temperature=0.0)["choices"][0]["message"][
        "content"
    ]
    assert first.mesh.flush(30)
    second = engines(models["tiny"])
    chunks = second.create_chat_completion(messages, max_tokens=8, temperature=0.0, stream=True)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == text
    assert second.mesh.stats.hit_tokens >= 2 * CHUNK


def test_the_next_turn_reuses_the_generated_tokens(models, engines) -> None:  # type: ignore[no-untyped-def]
    tokens = prompt(2 * CHUNK + 20)
    first = engines(models["tiny"])
    no_eos = never_ending(first)
    first.create_completion(tokens, max_tokens=120, temperature=0.0, logits_processor=[no_eos])
    assert first.mesh.flush(30)
    held = first.input_ids[: first.n_tokens].tolist()  # prompt + the generated tokens it evaluated
    assert len(held) >= 4 * CHUNK
    follow_up = held + prompt(30, seed=5)[1:]
    second = engines(models["tiny"])
    assert greedy(second, follow_up) == greedy(plain(models["tiny"]), follow_up)
    # its full chunks, then the tail the first turn stored: all of it but < 16 tokens
    assert second.mesh.stats.hit_tokens == len(held) // 16 * 16
    assert second.mesh.stats.tail_tokens == len(held) // 16 * 16 - (len(held) // CHUNK) * CHUNK


def test_cutting_a_real_blob_and_joining_it_gives_the_same_bytes(models, engines) -> None:  # type: ignore[no-untyped-def]
    from lmcache_mesh.engines.llamacpp import seqstate
    from lmcache_mesh.engines.llamacpp.reuse import read_sequence

    for flash_attn in (False, True):
        llm = engines(models["tiny"], flash_attn=flash_attn)
        llm.eval(prompt(3 * CHUNK))
        blob = read_sequence(llm)
        state = seqstate.parse(blob)
        assert state.layout == llm.mesh.layout
        joined = seqstate.join(state.layout, seqstate.split(state, CHUNK, 0, 3), CHUNK)
        assert joined.tobytes() == blob.tobytes()


def test_a_failed_attach_leaves_a_working_plain_llama(models) -> None:  # type: ignore[no-untyped-def]
    from llama_cpp import Llama

    from lmcache_mesh.engines.llamacpp import LlamaMeshConfig, attach

    llm = plain(models["tiny"])
    tokens = prompt(2 * CHUNK)
    expected = greedy(llm, tokens)
    with pytest.raises(Exception, match="bogus"):
        attach(llm, LlamaMeshConfig(node="bogus://nowhere"))
    assert type(llm) is Llama
    assert greedy(llm, tokens) == expected


def test_a_save_queue_holds_only_the_new_chunks(models, engines) -> None:  # type: ignore[no-untyped-def]
    tokens = prompt(6 * CHUNK)
    first = engines(models["tiny"])
    cache(first, tokens[: 5 * CHUNK])
    # Room for one chunk and a half: the sixth chunk alone fits, the whole context would not.
    llm = engines(models["tiny"], mesh={"max_pending_save_bytes": first.mesh.chunk_bytes * 3 // 2})
    llm.create_completion(tokens, max_tokens=1, temperature=0.0)
    assert llm.mesh.flush(30)
    stats = llm.mesh.snapshot()
    assert stats["hit_tokens"] == 5 * CHUNK
    assert stats["saver"]["dropped"] == 0 and stats["saved_chunks"] == 1


def test_a_repeated_prompt_recomputes_less_than_one_tail_granule(models, engines) -> None:  # type: ignore[no-untyped-def]
    tokens = prompt(4 * CHUNK + 44)  # 4 full chunks and 44 tokens more: a tail of 32 is stored
    cache(engines(models["tiny"]), tokens)
    llm = engines(models["tiny"])
    assert greedy(llm, tokens) == greedy(plain(models["tiny"]), tokens)
    assert llm.mesh.stats.hit_tokens == 4 * CHUNK + 32 and llm.mesh.stats.tail_tokens == 32
    # restored chunks + tail + the rest = the same two batches computed without the mesh, exactly
    again = engines(models["tiny"])
    logits = next_logits(again, tokens)
    assert again.mesh.stats.hit_tokens == 4 * CHUNK + 32
    np.testing.assert_array_equal(logits, next_logits_split(plain(models["tiny"]), tokens, 4 * CHUNK + 32))


def test_a_prompt_differing_inside_the_tail_reuses_up_to_the_difference(models, engines) -> None:  # type: ignore[no-untyped-def]
    tokens = prompt(4 * CHUNK + 44)
    cache(engines(models["tiny"]), tokens)
    other = tokens[: 4 * CHUNK + 20] + [t + 1 for t in tokens[4 * CHUNK + 20 :]]
    llm = engines(models["tiny"])
    assert greedy(llm, other) == greedy(plain(models["tiny"]), other)
    assert llm.mesh.stats.hit_tokens == 4 * CHUNK + 16  # the difference at 20: one granule of the tail


def test_a_prompt_shorter_than_a_chunk_is_reused_from_its_tail(models, engines) -> None:  # type: ignore[no-untyped-def]
    tokens = prompt(CHUNK - 10)
    cache(engines(models["tiny"]), tokens)
    llm = engines(models["tiny"])
    assert greedy(llm, tokens) == greedy(plain(models["tiny"]), tokens)
    assert llm.mesh.stats.hit_tokens == (CHUNK - 10) // 16 * 16


def test_tails_off_reuses_whole_chunks_only(models, engines) -> None:  # type: ignore[no-untyped-def]
    tokens = prompt(4 * CHUNK + 44)
    first = engines(models["tiny"], mesh={"tail_tokens": 0})
    cache(first, tokens)
    assert first.mesh.stats.saved_tails == 0
    llm = engines(models["tiny"], mesh={"tail_tokens": 0})
    assert greedy(llm, tokens) == greedy(plain(models["tiny"]), tokens)
    assert llm.mesh.stats.hit_tokens == 4 * CHUNK


def test_a_tail_is_never_served_as_a_full_chunk(models, engines, daemon) -> None:  # type: ignore[no-untyped-def]
    tokens = prompt(2 * CHUNK + 40)
    first = engines(models["tiny"])
    cache(first, tokens)
    ns, keys = first.mesh.namespace, chunk_keys(first.mesh.namespace, tokens, CHUNK)
    with Client(daemon.tcp) as c:
        tail = c.get_records([tail_key(keys[1])])[0]
        assert tail is not None and tail.header.tokens == 32
        # the stored tail, put again under the key of the second full chunk
        c.put_records([ChunkRecord.build(keys[1], bytes(tail.payload), ns, {"tokens": tail.header.tokens})])
    llm = engines(models["tiny"])
    assert greedy(llm, tokens) == greedy(plain(models["tiny"]), tokens)
    assert llm.mesh.stats.bad_chunks == 1 and llm.mesh.stats.hit_tokens == CHUNK


def test_a_sibling_reuses_the_prompts_tail_when_the_answer_filled_its_chunk(models, engines) -> None:  # type: ignore[no-untyped-def]
    tokens = prompt(4 * CHUNK + 40)
    first = engines(models["tiny"])
    no_eos = never_ending(first)
    first.create_completion(tokens, max_tokens=40, temperature=0.0, logits_processor=[no_eos])
    assert first.mesh.flush(30)
    assert first.n_tokens >= 5 * CHUNK  # the answer filled chunk 4: it is stored whole, with the answer
    # another question after the same opening: chunk 4 misses, the prompt's own tail serves
    sibling = tokens[: 4 * CHUNK + 36] + prompt(20, seed=7)[1:]
    llm = engines(models["tiny"])
    assert greedy(llm, sibling) == greedy(plain(models["tiny"]), sibling)
    assert llm.mesh.stats.hit_tokens == 4 * CHUNK + 32 and llm.mesh.stats.tail_tokens == 32


def test_chunks_stored_with_zstd_are_smaller_and_any_reader_restores_them(models, engines, daemon) -> None:  # type: ignore[no-untyped-def]
    tokens = prompt(4 * CHUNK + 1)
    writer = engines(models["tiny"], mesh={"codec": "zstd"})
    cache(writer, tokens)
    keys = chunk_keys(writer.mesh.namespace, tokens, CHUNK)
    with Client(daemon.tcp) as c:
        stored = c.get_records(keys)
    assert all(r is not None and r.header.codec == "zstd" for r in stored)
    assert sum(r.header.length for r in stored) < 4 * writer.mesh.chunk_bytes
    reader = engines(models["tiny"])  # stores raw itself, decodes what it finds
    assert greedy(reader, tokens) == greedy(plain(models["tiny"]), tokens)
    assert reader.mesh.stats.hit_tokens == 4 * CHUNK and reader.mesh.stats.bad_chunks == 0


def test_a_chunk_that_does_not_decode_is_dropped_and_recomputed(models, engines, daemon) -> None:  # type: ignore[no-untyped-def]
    tokens = prompt(3 * CHUNK + 1)
    llm = engines(models["tiny"])
    keys = chunk_keys(llm.mesh.namespace, tokens, CHUNK)
    garbage = ChunkRecord.build(
        keys[0], b"\x01" * 1000, llm.mesh.namespace, {"tokens": CHUNK, "codec": "zstd"}
    )
    with Client(daemon.tcp) as c:
        c.put_records([garbage])
    assert greedy(llm, tokens) == greedy(plain(models["tiny"]), tokens)
    assert llm.mesh.stats.bad_chunks == 1 and llm.mesh.stats.hit_tokens == 0


def kl_divergence(want: np.ndarray, got: np.ndarray) -> float:
    """KL(p_want || p_got) of the next-token distributions of two logit vectors."""
    p, q = (
        np.exp(x - x.max()) / np.exp(x - x.max()).sum()
        for x in (want.astype(np.float64), got.astype(np.float64))
    )
    return float(np.sum(p * (np.log(p + 1e-300) - np.log(q + 1e-300))))


@pytest.mark.parametrize(
    ("codec", "ratio", "max_kl"), [("int8", 0.53, 1e-3), ("fp8", 0.53, 1e-2), ("int4", 0.3, 0.1)]
)
def test_a_lossy_codec_is_shared_only_by_engines_that_opted_in(
    models, engines, daemon, codec, ratio, max_kl
) -> None:  # type: ignore[no-untyped-def]
    tokens = prompt(4 * CHUNK + 1)
    writer = engines(models["tiny"], mesh={"codec": codec})
    cache(writer, tokens)
    keys = chunk_keys(writer.mesh.namespace, tokens, CHUNK)
    with Client(daemon.tcp) as c:
        stored = c.get_records(keys)
    assert all(r is not None and r.header.codec == codec for r in stored)
    assert sum(r.header.length for r in stored) <= ratio * 4 * writer.mesh.chunk_bytes

    plain_engine = engines(models["tiny"])  # did not opt in: another namespace, never a lossy chunk
    assert plain_engine.mesh.namespace != writer.mesh.namespace
    want = next_logits(plain_engine, tokens)
    assert plain_engine.mesh.stats.hit_tokens == 0 and plain_engine.mesh.stats.lookups == 1

    reader = engines(models["tiny"], mesh={"codec": codec})
    got = next_logits(reader, tokens)
    assert reader.mesh.stats.hit_tokens == 4 * CHUNK and reader.mesh.stats.bad_chunks == 0
    assert 0 < kl_divergence(want, got) < max_kl  # lossy (not the engine's own KV), and close


def test_a_lossy_chunk_in_a_namespace_without_its_codec_is_dropped(models, engines, daemon) -> None:  # type: ignore[no-untyped-def]
    """A record claiming a lossy codec under a raw engine's keys (forged or misfiled) is never
    decoded into that engine's context."""
    tokens = prompt(3 * CHUNK + 1)
    lossy = engines(models["tiny"], mesh={"codec": "int8"})
    cache(lossy, tokens)
    llm = engines(models["tiny"])
    with Client(daemon.tcp) as c:
        (record,) = c.get_records(chunk_keys(lossy.mesh.namespace, tokens, CHUNK)[:1])
        assert record is not None
        key = chunk_keys(llm.mesh.namespace, tokens, CHUNK)[0]
        meta = {"tokens": CHUNK, "codec": "int8"}
        c.put_records([ChunkRecord.build(key, bytes(record.payload), llm.mesh.namespace, meta)])
    assert greedy(llm, tokens) == greedy(plain(models["tiny"]), tokens)
    assert llm.mesh.stats.bad_chunks == 1 and llm.mesh.stats.hit_tokens == 0


def test_a_chain_of_mixed_codecs_is_restored_whole(models, engines, daemon) -> None:  # type: ignore[no-untyped-def]
    """Within one namespace a chain may hold raw and zstd chunks (one engine of each, or a
    lossy engine's chunk stored raw because its values were past the codec's range)."""
    tokens = prompt(4 * CHUNK + 1)
    cache(engines(models["tiny"]), tokens[: 2 * CHUNK])
    cache(engines(models["tiny"], mesh={"codec": "zstd"}), tokens)
    reader = engines(models["tiny"])
    keys = chunk_keys(reader.mesh.namespace, tokens, CHUNK)
    with Client(daemon.tcp) as c:
        codecs = [r.header.codec for r in c.get_records(keys) if r is not None]
    assert codecs == ["raw", "raw", "zstd", "zstd"]
    assert greedy(reader, tokens) == greedy(plain(models["tiny"]), tokens)
    assert reader.mesh.stats.hit_tokens == 4 * CHUNK
