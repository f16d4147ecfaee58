"""Fuzzing mesh datagrams: Message.decode, News.from_wire, and a Membership fed garbage.

A datagram either decodes into a message whose every field has its type and range, or
raises MalformedMessage; a Membership counts and drops a malformed datagram without any
other effect, and survives every well-formed one (never raising, only sending datagrams
that decode).
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from hypothesis import event, given

from lmcache_mesh.mesh.config import MeshConfig
from lmcache_mesh.mesh.errors import MalformedMessage
from lmcache_mesh.mesh.membership import Member, Membership, State
from lmcache_mesh.mesh.messages import (
    MAX_INCARNATION,
    MAX_MESSAGE_BYTES,
    MESH_VERSION,
    Kind,
    Message,
    MsgType,
    News,
)

from .strategies import FUZZ, Fuzz, fuzzed, is_int, pack

U64 = 2**64 - 1
NAMES = ["y", "x", "z", "w", "", "x" * 200]
"""Member names: "x" is the membership under test, "y" and "z" its peers."""
ADDRESSES = ["ay", "ax", "az", "", "tcp://127.0.0.1:7700"]
INCARNATIONS = [0, 1, 2, 7, 2**32, U64]


def news_wire(fz: Fuzz) -> Any:
    """A broadcast list, mostly valid; else a field broken, too few fields, or junk."""
    raw: list[Any] = [
        fz.pick([int(k) for k in Kind]),
        fz.pick(NAMES),
        fz.pick(INCARNATIONS),
        fz.pick(ADDRESSES),
        fz.pick(["default", "z1", ""]),
        fz.pick([1.0, 0.5, 3, 999_999.0]),
        fz.pick(NAMES),
    ]
    if fz.often():
        return raw
    kind = fz.below(4)
    if kind < 2:
        raw[fz.below(7)] = fz.pick([0, 4, -1, True, 1.5, None, "", 0.0, 1e6, math.nan, math.inf, b"y"])
    elif kind == 2:
        raw = raw[: fz.below(7)] if fz.below(2) else [*raw, fz.junk()]
    else:
        raw[fz.below(7)] = fz.junk()
    return raw


TOO_BIG = b"\x00" * (MAX_MESSAGE_BYTES + 1)


def message_map(fz: Fuzz) -> dict[str, Any]:
    m: dict[str, Any] = {
        "v": MESH_VERSION,
        "t": fz.pick([int(t) for t in MsgType]),
        "src": fz.pick(NAMES),
        "sa": fz.pick(ADDRESSES),
    }
    for _ in range(fz.below(4)):
        name = fz.pick(["seq", "tg", "ta", "r", "st", "g"])
        if name == "seq":
            m[name] = fz.pick([1, 0, 7, -1, U64, -(2**63)])
        elif name in ("tg", "ta"):
            m[name] = fz.pick(NAMES if name == "tg" else ADDRESSES)
        elif name == "r":
            m[name] = fz.pick([False, True, 1, None, "yes"])
        else:
            m[name] = [news_wire(fz) for _ in range(fz.below(4))]
    if not fz.often(3):  # one field broken or missing
        name = fz.pick(["v", "t", "src", "sa", "seq", "tg", "ta", "st", "g"])
        if fz.below(2):
            m.pop(name, None)
        else:
            m[name] = fz.pick([0, 2, 7, -1, True, None, "", "1", 1.0, [], {}]) if fz.below(2) else fz.junk()
    return m


def datagram(fz: Fuzz) -> bytes:
    kind = fz.below(10)
    if kind < 6:
        return pack(message_map(fz))
    if kind < 8:
        return fz.mutate(pack(message_map(Fuzz(fz.raw(24)))))
    if kind == 8:
        return pack(fz.junk()) if fz.below(8) else TOO_BIG
    return fz.raw(64)


def check_news(n: News) -> None:
    assert isinstance(n.kind, Kind) and isinstance(n.name, str) and n.name
    assert is_int(n.incarnation) and 0 <= n.incarnation <= U64
    assert all(isinstance(s, str) for s in (n.address, n.zone, n.origin))
    assert isinstance(n.weight, float) and 0 < n.weight < 1e6


@FUZZ
@given(fuzzed(datagram))
def test_any_datagram_decodes_to_a_valid_message_or_is_malformed(data: bytes) -> None:
    try:
        msg = Message.decode(data)
    except MalformedMessage:
        event("malformed")
        return
    # only MalformedMessage may escape: anything else fails the test here
    event(f"decoded {msg.type.name}")
    m = msgpack.unpackb(data, raw=False)
    assert isinstance(m, dict) and m["v"] == MESH_VERSION and msg.type == m["t"]
    assert isinstance(msg.type, MsgType) and msg.src == m["src"] and isinstance(msg.src, str) and msg.src
    assert all(isinstance(s, str) for s in (msg.src_addr, msg.target, msg.target_addr))
    assert is_int(msg.seq) and msg.seq == m.get("seq", 0)
    assert len(msg.gossip) == len(m.get("g", [])) and len(msg.state) == len(m.get("st", []))
    for n in (*msg.gossip, *msg.state):
        check_news(n)
    again = Message.decode(msg.encode())  # what we decode, we can send on
    assert again.encode() == msg.encode()


def broadcast(fz: Fuzz) -> Any:
    return news_wire(fz) if fz.below(8) else fz.pick([fz.junk(), tuple(news_wire(fz)), None])


@FUZZ
@given(fuzzed(broadcast))
def test_any_broadcast_is_news_or_malformed(raw: Any) -> None:
    try:
        n = News.from_wire(raw)
    except MalformedMessage:
        event("malformed")
        return
    event(f"news {n.kind.name}")
    assert isinstance(raw, list) and len(raw) >= 7
    check_news(n)
    assert (n.name, n.incarnation, n.address, n.zone, n.origin) == (raw[1], raw[2], raw[3], raw[4], raw[6])
    assert News.from_wire(n.to_wire()) == n


# a Membership fed the same datagrams


def member_table(m: Membership) -> dict[str, tuple[Any, ...]]:
    return {
        name: (x.address, x.zone, x.weight, x.incarnation, x.state, x.since) for name, x in m.members.items()
    }


def membership() -> tuple[Membership, list[tuple[str, State | None]]]:
    """'x' at 'ax', which knows 'y' (alive) and 'z' (suspect); and the changes it reports."""
    changes: list[tuple[str, State | None]] = []

    def on_change(member: Member, old: State | None) -> None:
        changes.append((member.name, old))

    m = Membership(MeshConfig.local(), "x", "ax", on_change=on_change)
    m.start(0.0)
    news = [
        News(Kind.ALIVE, "y", 1, "ay", "z1", 1.0, "y"),
        News(Kind.ALIVE, "z", 0, "az", "z2", 1.0, "z"),
        News(Kind.SUSPECT, "z", 0, origin="y"),
    ]
    m.on_message("ay", Message(MsgType.GOSSIP, "y", "ay", gossip=news).encode(), 0.5)
    assert m.members["z"].state is State.SUSPECT
    changes.clear()
    return m, changes


def decodes_all(out: list[tuple[str, bytes]]) -> None:
    for address, data in out:
        assert isinstance(address, str)
        Message.decode(data)  # what we send must be a valid datagram


@FUZZ
@given(fuzzed(datagram))
def test_a_membership_drops_garbage_without_effect_and_survives_the_rest(data: bytes) -> None:
    m, changes = membership()
    # our own state: incarnation, health, news queued for gossip (internal), timers
    table, me = member_table(m), (m.me.incarnation, m.awareness, len(m._queue), m.next_wakeup())
    counters = dict(m.counters)
    try:
        msg: Message | None = Message.decode(data)
    except MalformedMessage:
        msg = None
    out = m.on_message("az", data, 1.0)  # documented: never raises
    assert m.counters["messages_in"] == counters["messages_in"] + 1
    assert m.counters["bytes_in"] == counters["bytes_in"] + len(data)
    if msg is None or msg.src == "x":  # garbage, or a datagram claiming to be from ourselves
        counted = {"messages_in": 1, "bytes_in": len(data), "malformed": int(msg is None)}
        checked = msg is not None and msg.type is MsgType.PING and msg.target == "x" and msg.src_addr != "ax"
        if checked:  # another node under our name asks who holds it: answered and counted, no more
            assert msg is not None
            event("a node under our name")
            assert [(to, Message.decode(d).type, Message.decode(d).seq) for to, d in out] == [
                (msg.src_addr, MsgType.ACK, msg.seq)
            ]
            counted.update(name_conflicts=1, messages_out=1, bytes_out=len(out[0][1]))
        else:
            event("malformed" if msg is None else "from ourselves")
            assert out == []
        assert changes == []
        assert m.counters == {name: n + counted.get(name, 0) for name, n in counters.items()}
        assert member_table(m) == table
        assert (m.me.incarnation, m.awareness, len(m._queue), m.next_wakeup()) == me
        return
    event(f"{msg.type.name}: {len(out)} out, {len(changes)} changes")
    assert m.counters["malformed"] == counters["malformed"]
    decodes_all(out)
    assert m.me.incarnation >= me[0] and m.num_alive() == len(m.alive_members())
    assert all(0 <= x.incarnation <= U64 for x in m.members.values())
    decodes_all(m.tick(40.0))  # and it keeps working: every timer is due (probe, gossip, push-pull)


@pytest.mark.parametrize("kind", [Kind.SUSPECT, Kind.ALIVE], ids=["suspect", "alive"])
def test_a_refute_at_the_highest_incarnation_still_encodes(kind: Kind) -> None:
    """Found by this fuzzer: news of us at 2**64-1 made us refute at 2**64, which msgpack
    cannot encode. Incarnations above MAX_INCARNATION are now malformed, and ours never
    passes it (a refute there cannot outbid it: nobody honest gets near 2**62)."""
    m, _ = membership()
    with pytest.raises(MalformedMessage):
        News.from_wire(News(kind, "x", U64, "ax", "default", 1.0, "y").to_wire())
    news = News(kind, "x", MAX_INCARNATION, "ax", "default", 1.0, "y")
    decodes_all(m.on_message("ay", Message(MsgType.PUSH_PULL, "y", "ay", state=[news]).encode(), 1.0))
    assert m.me.incarnation == 0  # an implausible jump (see membership.MAX_INCARNATION_STEP): dropped
    m.me.incarnation = MAX_INCARNATION - 1  # as if we had got there step by step
    decodes_all(m.on_message("ay", Message(MsgType.PUSH_PULL, "y", "ay", state=[news]).encode(), 1.0))
    assert m.me.incarnation == MAX_INCARNATION
    for t in (1.5, 3.0, 40.0):
        decodes_all(m.tick(t))
