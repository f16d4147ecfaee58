"""The worker side of ``MeshConnector``: move chunk KV between the mesh and the paged blocks.

Loads run in ``start_load_kv`` before the forward pass (all layers at once; on CPU there is
no copy engine to overlap with). Saves run in ``wait_for_save`` after it: the chunks are
copied out of the paged blocks right away (the blocks may be reused after this step) and
stored by a background thread. A chunk that does not arrive, or does not match this
namespace and size, is never written: its blocks are reported so vLLM recomputes them.
"""

from __future__ import annotations

import atexit
import functools
import logging
import re
import warnings
from typing import Any

import torch

from lmcache_mesh.node.calls import Reservation
from lmcache_mesh.node.keys import chunk_keys
from lmcache_mesh.node.protocol import Cost
from lmcache_mesh.node.records import ChunkRecord

from ..saver import Saver
from ..store import MeshStore
from .layout import Kind, PagedLayout, slots_of
from .metadata import LoadSpec, MeshConnectorMetadata, SaveSpec

logger = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_order(names: list[str]) -> list[str]:
    """Layer names in model order (by their first number: model.layers.<i>.self_attn.attn)."""

    def index(name: str) -> tuple[int, str]:
        m = _LAYER_INDEX.search(name)
        return (int(m.group(1)) if m else 1 << 30, name)

    return sorted(names, key=index)


class WorkerSide:
    def __init__(
        self,
        namespace: bytes,
        descriptor: dict[str, Any],
        chunk_tokens: int,
        block_size: int,
        store: MeshStore,
        max_pending_save_bytes: int,
        split_kind: Kind = "NHD",
    ) -> None:
        self.namespace = namespace
        self.descriptor = descriptor
        self.chunk_tokens = chunk_tokens
        self.block_size = block_size
        self.store = store
        self.split_kind = split_kind
        self.saver = Saver("lmcache-vllm-save", max_pending_save_bytes)
        atexit.register(self.saver.close)  # a worker that exits normally finishes its saves first
        self.layers: list[torch.Tensor] = []
        self.layout: PagedLayout | None = None
        self.chunk_bytes = 0
        self._failed_blocks: set[int] = set()
        self._failed_reqs: set[str] = set()  # loads that failed this step: their KV is not to be saved
        self.stats = {
            "loaded_tokens": 0,
            "failed_tokens": 0,
            "bad_chunks": 0,
            "saved_chunks": 0,
            "dropped_saves": 0,
        }

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = layer_order(list(kv_caches))
        self.layers = [kv_caches[n] for n in names]
        self.layout = PagedLayout.detect(self.layers[0], self.block_size, self.split_kind)
        lay = self.layout
        if (len(self.layers), lay.kv_heads, lay.head_size) != (
            self.descriptor["n_layers"],
            self.descriptor["n_kv_heads"],
            self.descriptor["head_size"],
        ):
            raise ValueError(
                f"KV tensors ({len(self.layers)} layers, {lay}) do not match the model's layout {self.descriptor}"
            )
        itemsize = self.layers[0].element_size()
        self.chunk_bytes = len(self.layers) * 2 * self.chunk_tokens * lay.kv_heads * lay.head_size * itemsize
        logger.info(
            "MeshConnector worker: %d layers, %s layout, %.2f MB per chunk",
            len(self.layers),
            lay.kind,
            self.chunk_bytes / 1e6,
        )

    # loads

    def load(self, meta: MeshConnectorMetadata) -> None:
        for spec in meta.loads:
            try:
                loaded = self._load_one(spec)
            except Exception as exc:  # a broken load must never break the step: recompute instead
                logger.warning("load of %s failed: %s: %s", spec.req_id, type(exc).__name__, exc)
                loaded = spec.start
            if loaded < spec.end:
                self._failed_reqs.add(spec.req_id)
                self.stats["failed_tokens"] += spec.end - loaded
                first_block, last_block = loaded // self.block_size, -(-spec.end // self.block_size)
                self._failed_blocks.update(spec.block_ids[first_block:last_block])

    def _load_one(self, spec: LoadSpec) -> int:
        """Write tokens ``start .. end - 1``; returns the end of what was written."""
        assert self.layout is not None
        c = self.chunk_tokens
        first, last = spec.start // c, -(-spec.end // c)
        keys = chunk_keys(self.namespace, spec.tokens[: last * c], c)[first:last]
        written = spec.start
        cost = Cost(spec.recompute_s, self.chunk_bytes) if spec.recompute_s > 0 and self.chunk_bytes else None
        # On the node's host the records are views into its shared memory, unchanged while the
        # lease lasts: each is verified in place and copied once, into the paged blocks.
        with self.store.read(keys, cost) as lease:
            for i, record in enumerate(lease.records):
                chunk = first + i
                if record is None:
                    break
                if not self._belongs(record):
                    self.stats["bad_chunks"] += 1
                    logger.warning("dropping chunk %s: not of this model and layout", record.key.hex())
                    break
                payload = lease.payload(i)
                if payload is None:
                    break  # failed its checksum (counted): recompute from here
                lo, hi = max(spec.start, chunk * c), min(spec.end, (chunk + 1) * c)
                kv = self._as_tensor(payload)  # [layers, 2, C, heads, head_size]
                slots = slots_of(spec.block_ids, self.block_size, lo, hi)
                rows = slice(lo - chunk * c, hi - chunk * c)
                for layer, paged in enumerate(self.layers):
                    k, v = kv[layer, 0, rows].to(paged.device), kv[layer, 1, rows].to(paged.device)
                    self.layout.write_slots(paged, slots.to(paged.device), k, v)
                written = hi
        self.stats["loaded_tokens"] += written - spec.start
        return written

    def _belongs(self, record: ChunkRecord) -> bool:
        h = record.header
        expected = (self.namespace, self.chunk_tokens, self.chunk_bytes)
        return bool((h.namespace, h.tokens, h.length) == expected)

    def _as_tensor(self, payload: memoryview) -> torch.Tensor:
        assert self.layout is not None
        with warnings.catch_warnings():  # a read-only buffer: we only read from it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(payload, dtype=torch.uint8)
        lay = self.layout
        shape = (len(self.layers), 2, self.chunk_tokens, lay.kv_heads, lay.head_size)
        return flat.view(self.layers[0].dtype).view(shape)

    def take_failed_blocks(self) -> set[int]:
        """Blocks this step failed to load (called once per step, after the saves)."""
        failed, self._failed_blocks = self._failed_blocks, set()
        self._failed_reqs.clear()
        return failed

    # saves

    def save(self, meta: MeshConnectorMetadata) -> None:
        for spec in meta.saves:
            if spec.req_id in self._failed_reqs:
                # This step's forward ran over blocks the failed load left unwritten: what it
                # computed after them is wrong, and vLLM will recompute it. Never store it.
                self.stats["dropped_saves"] += 1
                continue
            nbytes = spec.count * self.chunk_bytes
            if not self.saver.has_room(nbytes):
                self.saver.count_dropped()
                self.stats["dropped_saves"] += 1
                continue
            keys = chunk_keys(self.namespace, spec.tokens, self.chunk_tokens)[
                spec.first : spec.first + spec.count
            ]
            # Announced now, landed by the saver: the next request's lookup (in the scheduler,
            # or another engine's) counts these chunks already, and its load waits for them. On
            # the node's host the chunks are gathered straight into the slots it reserved.
            reservation = self.store.reserve(keys, [self.chunk_bytes] * len(keys))
            slots = self.store.reserved_slots(reservation, self.chunk_bytes)
            try:
                payloads = self._gather(spec, slots)
            except Exception as exc:  # never fail the step over a save
                logger.warning("could not copy the KV of %s to save it: %s", spec.req_id, exc)
                self.store.cancel(reservation)
                continue
            job = functools.partial(self._put, keys, payloads, reservation, slots is not None)
            if not self.saver.submit(job, nbytes):
                self.stats["dropped_saves"] += 1
                self.store.cancel(reservation)

    def _gather(self, spec: SaveSpec, into: list[memoryview] | None) -> list[torch.Tensor]:
        """Chunks ``first ..`` of a request as canonical tensors ``[layers, 2, C, heads, head_size]``,
        copied out of the paged blocks: into ``into`` (the node's reserved slots) when given."""
        assert self.layout is not None
        per_chunk = self.chunk_tokens // self.block_size
        out = []
        for i, chunk in enumerate(range(spec.first, spec.first + spec.count)):
            blocks = torch.as_tensor(
                spec.block_ids[chunk * per_chunk : (chunk + 1) * per_chunk], dtype=torch.int64
            )
            pairs = [torch.stack(self.layout.read_blocks(paged, blocks)) for paged in self.layers]
            if into is None:
                out.append(torch.stack(pairs).to("cpu").contiguous())
                continue
            dst = self._as_tensor(into[i])
            torch.stack([p.to("cpu") for p in pairs], out=dst)
            out.append(dst)
        return out

    def _put(
        self, keys: list[bytes], chunks: list[torch.Tensor], reservation: Reservation | None, written: bool
    ) -> None:
        meta = {
            "tokens": self.chunk_tokens,
            "layout": self.descriptor,
            "dtype": self.descriptor["dtype"],
            "shape": list(chunks[0].shape),
        }
        payloads = [chunk.view(torch.uint8).reshape(-1).numpy() for chunk in chunks]
        try:
            if written:  # already in the reserved slots: checksum them where they are, commit
                self.store.commit_written(keys, payloads, self.namespace, meta, reservation)
            else:
                self.store.put_payloads(keys, payloads, self.namespace, meta, reservation)
        except Exception:
            self.store.cancel(reservation)  # lookups must stop counting what will not land
            raise
        self.stats["saved_chunks"] += len(keys)

    def close(self) -> None:
        self.saver.close()
