"""Record codecs: lossless round trips, and payloads that do not decode are refused."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from lmcache_mesh.node.codecs import CodecError, check_codec, decode, encode


def kv_like(n: int, dtype: str, seed: int = 0) -> np.ndarray:
    """Values shaped like KV: a few scales per row, so exponents repeat and mantissas do not."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(0, 1, (n // 64, 64)) * rng.choice([0.05, 0.5, 2.0], (n // 64, 1))
    return rows.astype(dtype).reshape(-1).view(np.uint8)


@pytest.mark.parametrize(("dtype", "size"), [("float16", 2), ("float32", 4)])
def test_zstd_gives_back_the_same_bytes_and_is_smaller_on_kv(dtype: str, size: int) -> None:
    raw = kv_like(64 * 1024, dtype)
    packed = encode("zstd", raw, size)
    assert packed.nbytes < raw.nbytes
    assert bytes(decode("zstd", packed, raw.nbytes)) == raw.tobytes()


def test_incompressible_planes_are_stored_as_they_are() -> None:
    raw = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)
    packed = encode("zstd", raw, 2)
    assert packed.nbytes <= raw.nbytes + 16
    assert bytes(decode("zstd", packed, raw.nbytes)) == raw.tobytes()


def test_raw_is_the_payload_itself() -> None:
    raw = kv_like(1024, "float16")
    assert encode("raw", raw, 2) is raw
    assert bytes(decode("raw", raw, raw.nbytes)) == raw.tobytes()
    with pytest.raises(CodecError, match="expected"):
        decode("raw", raw, raw.nbytes + 2)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:-1], "shorter|trailing|decode"),
        (lambda b: b + b"\0", "trailing"),
        (lambda b: b"\x09" + b[1:], "v9"),
        (lambda b: b[:6] + struct.pack("<BI", 1, 5) + b"junk!" + b[11:], "decode|holds|trailing|shorter"),
        (lambda b: b[:3], "decode"),
    ],
)
def test_payloads_that_do_not_decode_are_refused(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    raw = kv_like(4096, "float16")
    with pytest.raises(CodecError, match=message):
        decode("zstd", mutate(encode("zstd", raw, 2).tobytes()), raw.nbytes)


def test_a_payload_of_another_size_is_refused() -> None:
    raw = kv_like(4096, "float16")
    with pytest.raises(CodecError, match="expected"):
        decode("zstd", encode("zstd", raw, 2), raw.nbytes * 2)
    with pytest.raises(CodecError, match="unknown codec"):
        decode("lz9", raw, raw.nbytes)
    with pytest.raises(ValueError, match="codec must be one of"):
        check_codec("int3")
