"""What each sender may do: roles, tenants and per-connection limits, in-process.

Requests go through ``NodeServer.take`` with a given sender, as the ROUTER loop hands
them over after the CurveZMQ handshake named the key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from lmcache_mesh.node import ChunkRecord, Node, NodeConfig
from lmcache_mesh.node.config import LimitsSettings, StorageSettings
from lmcache_mesh.node.errors import ErrorCode, MeshError
from lmcache_mesh.node.keyring import TRUSTED, Principal, Role, Sender
from lmcache_mesh.node.protocol import Op, Reply, decode_reply, get_results, put_request, request_header
from lmcache_mesh.node.service import NodeServer
from lmcache_mesh.node.tenants import scoped_key
from lmcache_mesh.node.tiers import DiskTier

from ..helpers import payload

ACME = Sender(Principal("engine-acme", Role.CLIENT, tenant="acme"), conn="acme")
GLOBEX = Sender(Principal("engine-globex", Role.CLIENT, tenant="globex"), conn="globex")
SHARED = Sender(Principal("engine", Role.CLIENT), conn="shared")
FRONT = Sender(Principal("front", Role.CLIENT, any_tenant=True), conn="front")
OPS = Sender(Principal("ops", Role.ADMIN, any_tenant=True), conn="ops")
PEER = Sender(Principal("node-b", Role.NODE), conn="node-b")


class Harness:
    def __init__(self, tmp_path: Path, **limits: Any) -> None:
        storage = StorageSettings(data_dir=str(tmp_path), disk_bytes=0)
        self.node = Node(NodeConfig(name="n", listen=(), storage=storage, limits=LimitsSettings(**limits)))
        self.node.open()
        self.server = NodeServer(self.node)
        self._ids = iter(range(1, 1 << 30))

    async def call(
        self, sender: Sender, op: Op, frames: Sequence[Any] = (), timeout_ms: int = 2000, **fields: Any
    ) -> Reply:
        replies: list[list[Any]] = []

        async def reply_to(out: Any) -> None:
            replies.append([bytes(f) for f in out])

        header = request_header(op, next(self._ids), timeout_ms, **fields)
        await self.server.take([header, *frames], reply_to, sender)
        for _ in range(200):  # a request that may wait runs in a task
            if replies:
                break
            await asyncio.sleep(0.01)
        return decode_reply(replies[0])

    async def put(self, sender: Sender, records: list[ChunkRecord], **fields: Any) -> Reply:
        f, frames = put_request(records)
        return await self.call(sender, Op.PUT, list(frames), **f, **fields)

    async def get(self, sender: Sender, keys: list[bytes], **fields: Any) -> list[bytes | None]:
        reply = await self.call(sender, Op.GET, keys=keys, **fields)
        records, bad = get_results(reply, keys)
        assert bad == 0
        return [None if r is None else bytes(r.payload) for r in records]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_tenants_see_only_their_own_chunks(tmp_path: Path, ns: bytes, keys: list[bytes]) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        await h.put(ACME, [ChunkRecord.build(k, payload(i), ns) for i, k in enumerate(keys[:3])])
        assert await h.get(ACME, keys[:3]) == [payload(0), payload(1), payload(2)]
        for other in (GLOBEX, SHARED):
            assert await h.get(other, keys[:3]) == [None] * 3
            assert (await h.call(other, Op.LOOKUP, keys=keys[:3])).fields["hits"] == 0
            assert (await h.call(other, Op.DELETE, keys=keys[:3])).fields["deleted"] == 0
        # stored under scoped keys, labelled with the tenant; the client key itself is unused
        assert h.node.lookup([scoped_key("acme", k) for k in keys[:3]]) == 3 and h.node.lookup(keys[:1]) == 0
        assert scoped_key("", keys[0]) not in (keys[0], scoped_key("acme", keys[0]))
        (rec,) = h.node.get_records([scoped_key("acme", keys[0])])
        assert rec is not None and rec.header.tenant == "acme"
        # a front end that may name tenants reaches acme's chunks only by naming acme
        assert await h.get(FRONT, keys[:1]) == [None]
        assert await h.get(FRONT, keys[:1], tenant="acme") == [payload(0)]
        stats = h.node.stats()["tenants"]
        assert stats["acme"]["records"]["memory"] == 3 and stats["acme"]["requests"]["hits"] >= 3
        assert stats["globex"]["requests"]["hits"] == 0

    run(main())


def test_a_client_cannot_forge_a_tenant_label_or_name_another_tenant(
    tmp_path: Path, ns: bytes, keys: list[bytes]
) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        forged = ChunkRecord.build(keys[0], payload(0), ns)
        forged = ChunkRecord(
            type(forged.header)(**{**_fields(forged.header), "tenant": "acme"}), forged.payload
        )
        await h.put(SHARED, [forged])
        (rec,) = h.node.get_records([scoped_key("", keys[0])])
        assert rec is not None and rec.header.tenant == ""  # relabelled: the sender's tenant
        with pytest.raises(MeshError) as info:
            await h.get(GLOBEX, keys[:1], tenant="acme")
        assert info.value.code is ErrorCode.FORBIDDEN
        assert await h.get(ACME, keys[:1], tenant="acme") == [None]  # its own tenant: fine, and empty
        # a member passes records on as stored: scoped keys, labelled (a replica of acme's chunk)
        replica = ChunkRecord(
            type(forged.header)(**{**_fields(forged.header), "key": keys[1]}), forged.payload
        )
        await h.put(PEER, [replica], replica=True, scoped=True)
        (rec,) = h.node.get_records([keys[1]])
        assert rec is not None and rec.header.tenant == "acme"
        assert await h.get(ACME, keys[1:2]) == [None]  # and no client key names a stored key

    run(main())


def test_knowing_a_tenants_name_and_prompt_is_not_enough(
    tmp_path: Path, ns: bytes, keys: list[bytes]
) -> None:
    """No client names a stored key: sending acme's scoped keys from elsewhere hits nothing."""

    async def main() -> None:
        h = Harness(tmp_path)
        await h.put(ACME, [ChunkRecord.build(k, payload(i), ns) for i, k in enumerate(keys[:2])])
        forged_keys = [scoped_key("acme", k) for k in keys[:2]]
        for intruder in (SHARED, FRONT, OPS, GLOBEX):
            assert await h.get(intruder, forged_keys) == [None, None]
            assert (await h.call(intruder, Op.LOOKUP, keys=forged_keys)).fields["hits"] == 0
            assert (await h.call(intruder, Op.DELETE, keys=forged_keys)).fields["deleted"] == 0
        for intruder in (SHARED, FRONT, OPS, GLOBEX):
            await h.put(intruder, [ChunkRecord.build(k, b"POISON", ns) for k in forged_keys])
            with pytest.raises(MeshError) as info:  # only members send keys as stored
                await h.call(intruder, Op.GET, keys=forged_keys, scoped=True)
            assert info.value.code is ErrorCode.FORBIDDEN
        assert await h.get(ACME, keys[:2]) == [payload(0), payload(1)]  # untouched

    run(main())


def _fields(header: Any) -> dict[str, Any]:
    return {name: getattr(header, name) for name in header.__dataclass_fields__}


@pytest.mark.parametrize(
    ("sender", "op", "fields"),
    [
        (ACME, Op.STATS, {}),
        (ACME, Op.JOIN, {"seeds": ["tcp://127.0.0.1:1"]}),
        (ACME, Op.WHO_HAS, {"keys": []}),
        (ACME, Op.ANNOUNCE, {"holder": "node-x", "add": [], "remove": []}),  # only its engine (route)
        (ACME, Op.ATTACH, {"name": "edge"}),
        (OPS, Op.WHO_HAS, {"keys": []}),
        (PEER, Op.ATTACH, {"name": "not-node-b"}),  # a node attaches under its own name only
    ],
)
def test_roles_limit_operations(tmp_path: Path, sender: Sender, op: Op, fields: dict[str, Any]) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        with pytest.raises(MeshError) as info:
            await h.call(sender, op, **fields)
        assert info.value.code is ErrorCode.FORBIDDEN
        assert h.server.forbidden == 1

    run(main())


def test_one_way_messages_from_a_client_are_dropped_without_effect(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        replies: list[Any] = []

        async def reply_to(out: Any) -> None:
            replies.append(out)

        gossip = [request_header(Op.MESH, 1, 1000, **{"from": "tcp://127.0.0.9:1"}), b"\x80"]
        await h.server.take(gossip, reply_to, ACME)
        assert replies == [] and h.node.errors["FORBIDDEN"] == 1 and h.server.forbidden == 1
        assert (await h.call(OPS, Op.STATS)).fields["stats"]["security"]["forbidden"] == 1
        assert (await h.call(TRUSTED_SENDER, Op.PING)).fields["name"] == "n"

    run(main())


TRUSTED_SENDER = Sender(TRUSTED, conn="local")


class StalledDisk(DiskTier):
    def read(self, key: bytes) -> ChunkRecord | None:
        time.sleep(0.3)
        return super().read(key)


def test_one_connection_cannot_take_all_slots(tmp_path: Path, ns: bytes, keys: list[bytes]) -> None:
    """Past its in-flight bound a connection gets BUSY at once; others are still served."""

    async def main() -> None:
        h = Harness(tmp_path, max_inflight_per_peer=2)
        h.node.store.disk = StalledDisk(tmp_path, 1 << 20)
        h.node.store.disk.open()
        record = ChunkRecord.build(scoped_key("", keys[0]), payload(0), ns)
        assert h.node.store.disk.submit(record) and h.node.store.disk.flush(10)
        slow = [asyncio.create_task(h.get(SHARED, keys[:1])) for _ in range(2)]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(MeshError) as info:
            await h.get(SHARED, keys[:1])
        assert info.value.code is ErrorCode.BUSY and time.monotonic() - started < 0.25
        assert await h.get(ACME, keys[1:2]) == [None]  # another connection still gets in
        assert [await t for t in slow] == [[payload(0)], [payload(0)]]
        assert await h.get(SHARED, keys[:1]) == [payload(0)]  # slots came back
        assert h.server.busy == 1 and h.node.errors["BUSY"] == 1

    run(main())


def test_a_get_reply_is_bounded_by_the_request_size_limit_and_says_where_it_stopped(
    tmp_path: Path, ns: bytes, keys: list[bytes]
) -> None:
    async def main() -> None:
        h = Harness(tmp_path, max_request_bytes=12_000, max_record_bytes=8_000)
        await h.put(SHARED, [ChunkRecord.build(k, payload(i), ns) for i, k in enumerate(keys[:2])])
        assert await h.get(SHARED, keys[:3]) == [payload(0), payload(1), None]
        for i in range(2, 5):
            await h.put(SHARED, [ChunkRecord.build(keys[i], payload(i), ns)])
        reply = await h.call(SHARED, Op.GET, keys=keys[:5])
        records, _ = get_results(reply, keys[:5])
        assert [r is not None for r in records] == [True, True, False, False, False]  # 4 KiB each
        assert reply.fields["next"] == 2  # the client asks again from the third key
        assert await h.get(SHARED, keys[2:5]) == [payload(2), payload(3), None]

    run(main())


def test_a_disk_read_past_its_deadline_keeps_its_slot_until_it_ends(
    tmp_path: Path, ns: bytes, keys: list[bytes]
) -> None:
    """Requests that time out cannot pile up disk reads: the read holds its slot until done."""

    async def main() -> None:
        h = Harness(tmp_path, max_inflight_per_peer=1)
        h.node.store.disk = StalledDisk(tmp_path, 1 << 20)
        h.node.store.disk.open()
        record = ChunkRecord.build(scoped_key("", keys[0]), payload(0), ns)
        assert h.node.store.disk.submit(record) and h.node.store.disk.flush(10)
        with pytest.raises(MeshError) as info:
            await h.call(SHARED, Op.GET, keys=keys[:1], timeout_ms=50)
        assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
        with pytest.raises(MeshError) as info:
            await h.call(SHARED, Op.GET, keys=keys[:1])  # the abandoned read still runs
        assert info.value.code is ErrorCode.BUSY
        await asyncio.sleep(0.4)
        assert await h.get(SHARED, keys[:1]) == [payload(0)]
        assert h.server.flow.busy_slots == 0 and not h.server.flow.inflight

    run(main())


def test_a_client_key_cannot_mark_its_puts_as_replicas() -> None:
    """Issue 17 (9): ``replica=true`` from a client key would store chunks that are never
    replicated; only members send replicas, so the flag is dropped for anyone else."""
    from lmcache_mesh.node.admission import admit
    from lmcache_mesh.node.protocol import Limits
    from lmcache_mesh.node.requests import decode_request

    record = ChunkRecord.build(b"k" * 16, b"v" * 64, b"n" * 16)
    fields, payloads = put_request([record])
    frames = [request_header(Op.PUT, 7, 1000, replica=True, **fields), *payloads]
    for sender, replica in ((ACME, False), (SHARED, False), (PEER, True)):
        assert admit(decode_request(frames, Limits()), sender).body.replica is replica
