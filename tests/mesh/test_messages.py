"""Mesh datagrams: golden bytes, round trips, and every malformed variant's error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import msgpack
import pytest

from lmcache_mesh.mesh.errors import MalformedMessage
from lmcache_mesh.mesh.messages import Message

DATA = Path(__file__).parent / "data"


def _golden_messages() -> dict[str, Message]:
    spec = importlib.util.spec_from_file_location("make_golden_mesh", DATA / "make_golden.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.golden_messages()  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", ["ping", "ping_req", "push_pull"])
def test_golden_round_trip(name: str) -> None:
    msg = _golden_messages()[name]
    data = (DATA / f"{name}_v1.bin").read_bytes()
    assert msg.encode() == data
    assert Message.decode(data) == msg


def _map(**m: object) -> bytes:
    return msgpack.packb({"v": 1, "t": 1, "src": "n1", "sa": "tcp://x:1", **m})


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1]), "must be a msgpack map"),
        (_map(v=2), r"mesh version 2 not supported; must be in range \[1, 1\]"),
        (_map(t=99), "unknown message type 99"),
        (_map(src=""), "src, sa, tg and ta must be strings"),
        (_map(seq="x"), "seq must be an int"),
        (_map(g="x"), "field 'g' must be a list"),
        (_map(g=[[9, "n", 0, "", "", 1.0, ""]]), "unknown broadcast kind 9"),
        (_map(g=[[1, "n", -1, "", "", 1.0, ""]]), "incarnation must be an int in \\[0, 2\\*\\*62\\]"),
        (_map(g=[[1, "n", 0, "", "", 0, ""]]), "weight must be a number in"),
        (_map(g=[[1, "n", 0]]), "broadcast must be a list of 7 fields"),
        (b"\x00" * (5 << 20), "exceeds"),
    ],
)
def test_malformed_datagrams(data: bytes, message: str) -> None:
    with pytest.raises(MalformedMessage, match=message):
        Message.decode(data)
