"""Record codecs: lossless round trips, lossy ones within their error bounds, and payloads
that do not decode are refused."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from lmcache_mesh.node.codecs import LOSSY, CodecError, check_codec, decode, encode
from lmcache_mesh.node.kvformat import KVGeometry

torch = pytest.importorskip("torch")


def flat(n: int, dtype: str = "f16") -> KVGeometry:
    """A geometry of ``n`` elements (one layer, K and V of 32 channels)."""
    return KVGeometry(1, n // 64, 32, 32, dtype)


def kv_like(n: int, dtype: str, seed: int = 0) -> np.ndarray:
    """Values shaped like KV: a few scales per row, so exponents repeat and mantissas do not."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(0, 1, (n // 64, 64)) * rng.choice([0.05, 0.5, 2.0], (n // 64, 1))
    return rows.astype(dtype).reshape(-1).view(np.uint8)


@pytest.mark.parametrize(("dtype", "name"), [("float16", "f16"), ("float32", "f32")])
def test_zstd_gives_back_the_same_bytes_and_is_smaller_on_kv(dtype: str, name: str) -> None:
    raw = kv_like(64 * 1024, dtype)
    packed = encode("zstd", raw, flat(64 * 1024, name))
    assert packed.nbytes < raw.nbytes
    assert bytes(decode("zstd", packed, flat(64 * 1024, name))) == raw.tobytes()


def test_incompressible_planes_are_stored_as_they_are() -> None:
    raw = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)
    packed = encode("zstd", raw, flat(2048))
    assert packed.nbytes <= raw.nbytes + 16
    assert bytes(decode("zstd", packed, flat(2048))) == raw.tobytes()


def test_raw_is_the_payload_itself() -> None:
    raw = kv_like(1024, "float16")
    assert encode("raw", raw, flat(1024)) is raw
    assert bytes(decode("raw", raw, flat(1024))) == raw.tobytes()
    with pytest.raises(CodecError, match="expected"):
        decode("raw", raw, flat(2048))


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
        decode("zstd", mutate(encode("zstd", raw, flat(4096)).tobytes()), flat(4096))


def test_a_payload_of_another_size_is_refused() -> None:
    raw = kv_like(4096, "float16")
    with pytest.raises(CodecError, match="expected"):
        decode("zstd", encode("zstd", raw, flat(4096)), flat(8192))
    with pytest.raises(CodecError, match="unknown codec"):
        decode("lz9", raw, flat(4096))
    with pytest.raises(ValueError, match="codec must be one of"):
        check_codec("int3")


# lossy codecs

GEOMETRIES = [
    KVGeometry(3, 64, 128, 128, "f16"),  # llama.cpp, V by token
    KVGeometry(3, 64, 192, 64, "f16", v_trans=True),  # llama.cpp, V transposed
    KVGeometry(2, 64, 128, 128, "bf16", interleaved=True),  # vLLM [layers, 2, tokens, channels]
    KVGeometry(2, 32, 64, 64, "f32"),
]
BOUNDS = {"int8": 0.5 / 127, "fp8": 1 / 16, "int4": 0.5 / 15}
"""largest error of one value, relative to its group's range (int8: half a step of max|x|/127;
fp8: half of e4m3's 3-bit mantissa; int4: half a step of (max - min)/15), before the element
type's own rounding"""
TYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


def kv_tensor(geometry: KVGeometry, seed: int = 0) -> torch.Tensor:
    """KV-like values: per-channel offsets and scales (K's outlier channels), a few big rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(geometry.elements, generator=g)
    x[::97] *= 20
    return x.to(TYPES[geometry.dtype])


def as_bytes(x: torch.Tensor) -> np.ndarray:
    return x.view(torch.uint8).numpy()


@pytest.mark.parametrize(
    "geometry",
    GEOMETRIES,
    ids=lambda g: f"{g.dtype}{'-vt' if g.v_trans else ''}{'-il' if g.interleaved else ''}",
)
@pytest.mark.parametrize("codec", LOSSY)
def test_lossy_codecs_round_trip_within_their_bound(codec: str, geometry: KVGeometry) -> None:
    x = kv_tensor(geometry)
    packed = encode(codec, as_bytes(x), geometry)
    assert packed.nbytes < x.nbytes * (0.3 if codec == "int4" else 0.53) * geometry.element_bytes / 2 + 16
    y = torch.frombuffer(bytearray(decode(codec, packed, geometry)), dtype=x.dtype)
    # every value within its group's bound: check against the whole payload's largest group
    k, v = geometry.parts(x.float())
    ky, vy = geometry.parts(y.float())
    for want, got in ((k, ky), (v, vy)):
        spread = float(want.abs().max()) * (2 if codec == "int4" else 1)
        type_ulp = float(want.abs().max()) * (2**-8 if geometry.dtype == "bf16" else 2**-11)
        assert float((want - got).abs().max()) <= spread * BOUNDS[codec] + 2 * type_ulp
    assert (
        float((x.float() - y.float()).norm() / x.float().norm())
        < {"int8": 0.02, "fp8": 0.05, "int4": 0.2}[codec]
    )


def test_int4_groups_k_by_channel_and_v_by_token() -> None:
    """A K channel that is large everywhere (an outlier channel) costs the other channels
    nothing: K's groups run along tokens. V's run along channels, so a large token is alone."""
    geometry = KVGeometry(1, 64, 64, 64, "f32")
    x = torch.randn(geometry.elements) * 0.01
    k, v = geometry.parts(x)
    k[:, :, 5] += 100.0  # one K channel
    v[:, 7, :] += 100.0  # one V token
    y = torch.frombuffer(
        bytearray(decode("int4", encode("int4", as_bytes(x), geometry), geometry)), dtype=torch.float32
    )
    ky, vy = geometry.parts(y)
    others_k = [c for c in range(64) if c != 5]
    others_v = [t for t in range(64) if t != 7]
    assert float((ky[:, :, others_k] - k[:, :, others_k]).abs().max()) < 0.01
    assert float((vy[:, others_v] - v[:, others_v]).abs().max()) < 0.01


def test_zero_groups_and_tiny_values_survive() -> None:
    geometry = KVGeometry(1, 64, 64, 64, "f32")
    x = torch.zeros(geometry.elements)
    x[:64] = 1e-6
    for codec in LOSSY:
        y = torch.frombuffer(
            bytearray(decode(codec, encode(codec, as_bytes(x), geometry), geometry)), dtype=torch.float32
        )
        assert float(y[64:].abs().max()) == 0.0
        assert float((y[:64] - 1e-6).abs().max()) < 1e-6 * 0.1


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_values_a_lossy_codec_cannot_hold_are_refused_on_encode(bad: float) -> None:
    """(The adapters then store the chunk raw.)"""
    geometry = KVGeometry(1, 64, 64, 64, "f32")
    x = torch.randn(geometry.elements)
    x[100] = bad
    for codec in LOSSY:
        with pytest.raises(ValueError, match="beyond"):
            encode(codec, as_bytes(x), geometry)


@pytest.mark.parametrize("codec", LOSSY)
def test_lossy_payloads_that_do_not_match_are_refused(codec: str) -> None:
    geometry = GEOMETRIES[0]
    good = encode(codec, as_bytes(kv_tensor(geometry)), geometry).tobytes()
    other = KVGeometry(3, 64, 128, 128, "bf16")
    for data, geo, message in [
        (good[:-1], geometry, "expected"),
        (good + b"\0", geometry, "expected"),
        (b"\x02" + good[1:], geometry, "does not match"),  # version
        (good[:1] + b"\x09" + good[2:], geometry, "does not match"),  # codec id
        (good, other, "does not match"),  # written for f16, read as bf16
        (good, KVGeometry(3, 64, 128, 64, "f16"), "expected"),
    ]:
        with pytest.raises(CodecError, match=message):
            decode(codec, data, geo)
    # another lossy codec's payload
    for other_codec in LOSSY:
        if other_codec != codec:
            with pytest.raises(CodecError):
                decode(other_codec, good, geometry)


def test_a_forged_scale_that_decodes_to_infinity_is_refused() -> None:
    geometry = GEOMETRIES[0]
    data = bytearray(encode("int8", as_bytes(kv_tensor(geometry)), geometry).tobytes())
    data[8:10] = (
        torch.tensor([float("inf")], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    )  # K's first scale
    with pytest.raises(CodecError, match="non-finite"):
        decode("int8", bytes(data), geometry)


def test_e4m3_codes_decode_as_torch_decodes_them() -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    finite = (codes & 0x7F) != 0x7F
    from lmcache_mesh.node.quant import _e4m3_as_f16

    ours = _e4m3_as_f16(codes).float() * 256
    theirs = codes.view(torch.float8_e4m3fn).float()
    assert torch.equal(ours[finite], theirs[finite])


def test_records_re_encoded_for_the_wire_decode_to_the_same_bytes() -> None:
    from lmcache_mesh.node.codecs import decode_lossless
    from lmcache_mesh.node.records import ChunkRecord
    from lmcache_mesh.node.wirecodec import reencoded

    raw = kv_like(64 * 1024, "float16")
    kv = ChunkRecord.build(bytes(16), raw.tobytes(), bytes(16), {"dtype": "f16", "tokens": 64})
    ints = ChunkRecord.build(b"\x01" * 16, raw.tobytes(), bytes(16), {"dtype": "uint8"})
    lossy = ChunkRecord.build(
        b"\x02" * 16, raw.tobytes()[:4096], bytes(16), {"dtype": "f16", "codec": "int8"}
    )
    out, saved = reencoded([kv, None, ints, lossy], "zstd")
    first = out[0]
    assert first is not None and first.header.codec == "zstd" and first.header.raw_length == raw.nbytes
    assert first.header.wire_coded and not kv.header.wire_coded
    from lmcache_mesh.node.records import RecordHeader

    assert RecordHeader.decode(first.header.encode()) == first.header  # the mark survives the trip
    assert saved == raw.nbytes - first.nbytes > 0
    assert ChunkRecord.verified(first.header, first.payload) is not None  # its own checksum
    assert bytes(decode_lossless("zstd", first.payload, first.header.raw_length)) == raw.tobytes()
    assert out[1:] == [None, ints, lossy]  # not float, or under another codec: as they are
    assert first.header.key == kv.header.key and first.header.namespace == kv.header.namespace
