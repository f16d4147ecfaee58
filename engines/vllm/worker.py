"""The worker side of ``MeshConnector``: move chunk KV between the mesh and the paged blocks.

A step's transfers run layer by layer, beside the forward pass:

* **Loads** (``start_load_kv``, before the forward): each hit is read under a lease and
  verified whole first, so what fails is known before a block is written (and reported for
  recompute); then a copy thread writes the layers in order into the paged blocks while the
  forward runs, and ``wait_for_layer_load`` waits for its own layer only. Until vLLM has been
  seen waiting on every layer in a forward (it skips the waits, e.g., when a CUDA graph
  replays) the layers are all written before the forward instead.
* **Asynchronous loads** (hits held on peers, by default): read and written by a loader
  thread between steps, so a slow fetch never stalls the batch; ``get_finished`` tells vLLM
  when a request's KV is in.
* **Saves**: announced to the node (RESERVE) at the step's first ``save_kv_layer``, so the
  next lookup counts them; each layer's completed chunks are copied out (on the node's host,
  into the slots it reserved in its shared memory) as soon as the layer has run.
  ``wait_for_save`` waits for the copies (vLLM may reuse the blocks after this step) and
  hands the commit to a background thread.

A chunk that does not arrive, or does not match this namespace and size, is never written:
its blocks are reported so vLLM recomputes them.
"""

from __future__ import annotations

import atexit
import functools
import logging
import re
import threading
import warnings
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import torch

from lmcache_mesh.node.calls import Reservation
from lmcache_mesh.node.codecs import CodecError
from lmcache_mesh.node.kvformat import KVGeometry
from lmcache_mesh.node.protocol import Cost
from lmcache_mesh.node.records import ChunkRecord
from lmcache_mesh.node.shm import Lease

from ..codec import codec_meta, decoded, encoded_runs, not_readable
from ..saver import Saver
from ..store import MeshStore
from .chain import Chain
from .layout import Kind, PagedLayout, slots_of
from .metadata import LoadSpec, MeshConnectorMetadata, SaveSpec
from .transfer import Copies, forward_mark, forward_waits_for, pin_host_memory

logger = logging.getLogger(__name__)

_ELEMENTS = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}
"""KV types the codecs take, by torch dtype"""

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_order(names: list[str]) -> list[str]:
    """Layer names in model order (by their first number: model.layers.<i>.self_attn.attn)."""

    def index(name: str) -> tuple[int, str]:
        m = _LAYER_INDEX.search(name)
        return (int(m.group(1)) if m else 1 << 30, name)

    return sorted(names, key=index)


def _by_tokens(
    keys: list[bytes], chunks: list[torch.Tensor], payloads: list[Any]
) -> list[tuple[int, list[bytes], list[Any]]]:
    """Runs of records of one token count (chunks, then a prompt's tail blocks)."""
    runs: list[tuple[int, list[bytes], list[Any]]] = []
    for key, chunk, payload in zip(keys, chunks, payloads, strict=True):
        tokens = chunk.shape[2]
        if runs and runs[-1][0] == tokens:
            runs[-1][1].append(key)
            runs[-1][2].append(payload)
        else:
            runs.append((tokens, [key], [payload]))
    return runs


def _submit(pool: futures.ThreadPoolExecutor, job: Callable[..., Any], *args: Any) -> futures.Future[Any]:
    """Run ``job`` on ``pool`` in inference mode, as vLLM runs the forward: the tensors made
    there (views of the node's slots included) may only be written in it."""

    def run() -> Any:
        with torch.inference_mode():
            return job(*args)

    return pool.submit(run)


@dataclass
class _Piece:
    """The rows of one verified chunk that go into a request's slots."""

    kv: torch.Tensor
    """the chunk, ``[layers, 2, C, heads, head_size]`` (a view into the lease's bytes)"""
    slots: torch.Tensor
    rows: slice


@dataclass
class _Load:
    spec: LoadSpec
    lease: Lease
    pieces: list[_Piece]
    end: int
    """the end of what the pieces write (``spec.end`` unless a chunk was missing or bad)"""


@dataclass
class _Save:
    spec: SaveSpec
    keys: list[bytes]
    reservation: Reservation | None
    chunks: list[torch.Tensor]
    """destinations, ``[layers, 2, C, heads, head_size]``: the node's slots, or host tensors"""
    blocks: list[list[int]]
    """per chunk, its block ids"""
    in_slots: bool
    nbytes: int


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
        layerwise: bool = True,
        pin_shared_memory: bool = True,
        codec: str = "raw",
    ) -> None:
        self.namespace = namespace
        self.descriptor = descriptor
        self.chunk_tokens = chunk_tokens
        self.block_size = block_size
        self.store = store
        self.split_kind = split_kind
        self.layerwise = layerwise
        self.pin_shared_memory = pin_shared_memory
        self.codec = codec
        """what this engine stores (raw where its KV type has no codec: set at register)"""
        self.geometry: KVGeometry | None = None
        self.saver = Saver("lmcache-vllm-save", max_pending_save_bytes)
        atexit.register(self.saver.close)  # a worker that exits normally finishes its saves first
        # One copy thread keeps a step's layer copies in layer order; async loads have their
        # own thread, so a slow fetch never holds up a step's copies.
        self._copier = futures.ThreadPoolExecutor(1, thread_name_prefix="lmcache-vllm-copy")
        self._loader = futures.ThreadPoolExecutor(1, thread_name_prefix="lmcache-vllm-load")
        self.layers: list[torch.Tensor] = []
        self._index: dict[str, int] = {}
        self.layout: PagedLayout | None = None
        self.chunk_bytes = 0
        self._lock = threading.Lock()
        self._failed_blocks: set[int] = set()
        self._failed_reqs: set[str] = set()  # loads that failed this step: their KV is not to be saved
        self._seen_waiting = False  # vLLM waited on every layer in a forward: loads may pipeline
        self._waited: set[int] = set()  # layers waited on in this step's forward
        self._step_loads: list[_Load] = []
        self._layer_loaded: list[futures.Future[Any]] = []
        self._saves: list[_Save] | None = None
        self._layer_saved: dict[int, futures.Future[Any]] = {}
        # Copies issued by the copy thread, the loader thread and the forward's own thread
        # (on CUDA each on its own stream; see transfer.py). Set at register().
        self._copied = self._loaded = self._inline = Copies(torch.device("cpu"))
        self._async_done: list[tuple[LoadSpec, int]] = []
        self.stats = {
            "loaded_tokens": 0,
            "failed_tokens": 0,
            "bad_chunks": 0,
            "saved_chunks": 0,
            "dropped_saves": 0,
            "pipelined_loads": 0,
            "async_loads": 0,
        }

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = layer_order(list(kv_caches))
        self.layers = [kv_caches[n] for n in names]
        self._index = {n: i for i, n in enumerate(names)}
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
        device = self.layers[0].device
        self._copied, self._loaded, self._inline = Copies(device), Copies(device), Copies(device)
        if device.type == "cuda" and self.pin_shared_memory:
            for mapping in self.store.shared_mappings():
                pin_host_memory(mapping)
        itemsize = self.layers[0].element_size()
        self.chunk_bytes = len(self.layers) * 2 * self.chunk_tokens * lay.kv_heads * lay.head_size * itemsize
        element = _ELEMENTS.get(self.layers[0].dtype)
        if element is not None:
            width = lay.kv_heads * lay.head_size
            self.geometry = KVGeometry(
                len(self.layers), self.chunk_tokens, width, width, element, interleaved=True
            )
        elif self.codec != "raw":
            logger.warning(
                "codec %s takes f16/bf16/f32 KV, not %s: storing raw", self.codec, self.layers[0].dtype
            )
            self.codec = "raw"
        logger.info(
            "MeshConnector worker: %d layers, %s layout, %.2f MB per chunk",
            len(self.layers),
            lay.kind,
            self.chunk_bytes / 1e6,
        )

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.stats[name] += n

    # loads

    def load(self, meta: MeshConnectorMetadata) -> None:
        """Start this step's loads: asynchronous ones on the loader thread, the others verified
        now and written layer by layer beside the forward (or all at once, before it)."""
        loads = []
        for spec in meta.loads:
            if spec.asynchronous:
                self._count("async_loads")
                _submit(self._loader, self._load_between_steps, spec)
                continue
            try:
                load = self._prepare(spec)
            except Exception as exc:  # a broken load must never break the step: recompute instead
                logger.warning("load of %s failed: %s: %s", spec.req_id, type(exc).__name__, exc)
                self._report(spec, spec.start, this_step=True)
                continue
            self._report(spec, load.end, this_step=True)
            loads.append(load)
        if not loads:
            return
        if self.layerwise and self._seen_waiting:
            logger.debug("writing %d loads layer by layer beside the forward", len(loads))
            self._count("pipelined_loads", len(loads))
            self._step_loads = loads
            self._layer_loaded = [
                _submit(self._copier, self._write_layer_beside, loads, i) for i in range(len(self.layers))
            ]
            return
        try:
            self._inline.run(lambda: self._write_layers(loads))
        except Exception as exc:
            self._broken(loads, exc)
        finally:
            self._inline.finish()  # the copies read the leased bytes: done before they are let go
            for load in loads:
                load.lease.release()

    def _prepare(self, spec: LoadSpec) -> _Load:
        """Read a load's chunks under a lease and verify them; the pieces to write, in order,
        up to the first chunk missing, of another model, or failing its checksum."""
        chain = Chain.of(self.namespace, spec.tokens, self.chunk_tokens, self.block_size)
        first = chain.at(spec.start)
        keys = chain.keys[first:]
        cost = Cost(spec.recompute_s, self.chunk_bytes) if spec.recompute_s > 0 and self.chunk_bytes else None
        # On the node's host the records are views into its shared memory, unchanged while the
        # lease lasts: each is verified in place and copied once, into the paged blocks.
        lease = self.store.read(keys, cost)
        load = _Load(spec, lease, [], spec.start)
        device = self.layers[0].device
        try:
            for i, record in enumerate(lease.records):
                n = first + i  # the record's place in the prompt's chain
                if record is None:
                    break
                tokens, begins = chain.tokens(n), chain.start(n)
                refused = self._refused(record, tokens)
                if refused:
                    self._count("bad_chunks")
                    logger.warning("dropping chunk %s: %s", record.key.hex(), refused)
                    break
                payload = lease.payload(i)
                if payload is None:
                    break  # failed its checksum (counted): recompute from here
                try:
                    geometry = self.geometry if tokens == self.chunk_tokens else None
                    payload = memoryview(decoded(record.header, payload, self._bytes(tokens), geometry))
                except CodecError as exc:
                    self._count("bad_chunks")
                    logger.warning("dropping chunk %s: %s", record.key.hex(), exc)
                    break
                lo, hi = max(spec.start, begins), min(spec.end, begins + tokens)
                slots = slots_of(spec.block_ids, self.block_size, lo, hi).to(device)
                load.pieces.append(
                    _Piece(self._as_tensor(payload, tokens), slots, slice(lo - begins, hi - begins))
                )
                load.end = hi
        except BaseException:
            lease.release()
            raise
        return load

    def _write_layers(self, loads: list[_Load]) -> None:
        for layer in range(len(self.layers)):
            self._write_layer(loads, layer)

    def _write_layer_beside(self, loads: list[_Load], layer: int) -> Any:
        """On the copy thread: one layer of this step's loads; the event the forward waits on."""
        return self._copied.run(lambda: self._write_layer(loads, layer))

    def _write_layer(self, loads: list[_Load], layer: int) -> None:
        assert self.layout is not None
        paged = self.layers[layer]
        for load in loads:
            for piece in load.pieces:
                # K and V of the layer in one copy to the device (none on the CPU); from the
                # node's page-locked shared memory, an asynchronous DMA transfer.
                kv = piece.kv[layer, :, piece.rows].to(paged.device, non_blocking=True)
                self.layout.write_slots(paged, piece.slots, kv[0], kv[1])

    def wait_layer(self, layer_name: str) -> None:
        """Before the forward runs a layer: wait until this step's loads wrote it."""
        layer = self._index.get(layer_name)
        if layer is None:
            return
        self._waited.add(layer)
        if self._layer_loaded:
            written = self._layer_loaded[layer]
            futures.wait([written])
            if written.exception() is None:
                forward_waits_for(written.result())  # the host goes on; the device waits

    def _finish_loads(self) -> None:
        """The step's pipelined loads are written (or reported failed) and their leases released."""
        if not self._layer_loaded:
            return
        futures.wait(self._layer_loaded)
        loads, done = self._step_loads, self._layer_loaded
        self._step_loads, self._layer_loaded = [], []
        self._copied.finish()
        try:
            unwaited = sorted(set(range(len(self.layers))) - self._waited)
            error = next((f.exception() for f in done if f.exception() is not None), None)
            if unwaited:
                # The forward may have read these layers before they were written: what it
                # computed from them is not to be trusted. vLLM recomputes; from now on the
                # layers are written before the forward.
                logger.warning(
                    "vLLM ran %d layers without waiting for their loads: loading all layers before "
                    "the forward from now on",
                    len(unwaited),
                )
                self.layerwise = False
                self._broken(loads, RuntimeError("layers not waited on"))
            elif error is not None:
                self._broken(loads, error)
        finally:
            for load in loads:
                load.lease.release()

    def _load_between_steps(self, spec: LoadSpec) -> None:
        """An asynchronous load, on the loader thread: the request waits outside the batch."""
        loaded = spec.start
        try:
            load = self._prepare(spec)
            try:
                self._loaded.run(lambda: self._write_layers([load]))
                loaded = load.end
            finally:
                self._loaded.finish()  # written on the device before the bytes are let go and vLLM is told
                load.lease.release()
        except Exception as exc:
            logger.warning("load of %s failed: %s: %s", spec.req_id, type(exc).__name__, exc)
        with self._lock:
            self._async_done.append((spec, loaded))

    def finished_loads(self) -> set[str] | None:
        """Requests whose asynchronous loads ended since the last call (their failed blocks
        are reported in the same step)."""
        with self._lock:
            done, self._async_done = self._async_done, []
        for spec, loaded in done:
            logger.debug(
                "loaded %d of %d tokens of %s between steps",
                loaded - spec.start,
                spec.end - spec.start,
                spec.req_id,
            )
            self._report(spec, loaded, this_step=False)
        return {spec.req_id for spec, _ in done} or None

    def _report(self, spec: LoadSpec, loaded: int, this_step: bool) -> None:
        """Count a load that wrote tokens ``start .. loaded - 1``; the rest is vLLM's to recompute."""
        self._count("loaded_tokens", loaded - spec.start)
        if loaded >= spec.end:
            return
        self._count("failed_tokens", spec.end - loaded)
        if this_step:
            self._failed_reqs.add(spec.req_id)
        first_block, last_block = loaded // self.block_size, -(-spec.end // self.block_size)
        self._failed_blocks.update(spec.block_ids[first_block:last_block])

    def _broken(self, loads: list[_Load], exc: BaseException) -> None:
        """Writing these loads failed part way: none of their blocks is to be used."""
        logger.warning("loading KV into the paged blocks failed: %s: %s", type(exc).__name__, exc)
        for load in loads:  # undo what was counted for them, then count them failed
            self._count("loaded_tokens", -(load.end - load.spec.start))
            self._count("failed_tokens", -(load.spec.end - load.end))
            self._report(load.spec, load.spec.start, this_step=True)

    def _refused(self, record: ChunkRecord, tokens: int) -> str | None:
        """Why a fetched record must not be loaded here as one of ``tokens`` tokens (a whole
        chunk, or one tail block), or None."""
        h = record.header
        if h.namespace != self.namespace or h.tokens != tokens:
            return "not of this model and layout"
        if h.codec == "raw" and h.length != self._bytes(tokens):
            return f"{h.length} bytes, not a record of this layout ({self._bytes(tokens)})"
        return not_readable(h, self.codec)

    def _shape(self, tokens: int) -> tuple[int, ...]:
        """A record of ``tokens`` tokens: ``[layers, 2, tokens, heads, head_size]``."""
        assert self.layout is not None
        return (len(self.layers), 2, tokens, self.layout.kv_heads, self.layout.head_size)

    def _bytes(self, tokens: int) -> int:
        return self.chunk_bytes // self.chunk_tokens * tokens

    def _as_tensor(self, payload: memoryview, tokens: int) -> torch.Tensor:
        with warnings.catch_warnings():  # a read-only buffer: we only read from it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(payload, dtype=torch.uint8)
        return flat.view(self.layers[0].dtype).view(self._shape(tokens))

    def take_failed_blocks(self) -> set[int]:
        """Blocks this step failed to load (called once per step, after the saves)."""
        self._finish_loads()
        failed, self._failed_blocks = self._failed_blocks, set()
        self._failed_reqs.clear()
        return failed

    # saves

    def save_layer(self, meta: MeshConnectorMetadata, layer_name: str) -> None:
        """After the forward ran a layer: copy its part of this step's saves out."""
        layer = self._index.get(layer_name)
        if layer is None or not meta.saves or layer in self._layer_saved:
            return
        if self._saves is None:
            self._saves = self._begin_saves(meta)
        if self._saves:
            ran = forward_mark(self.layers[layer].device)  # the layer's KV is complete once this passes
            self._layer_saved[layer] = _submit(self._copier, self._copy_out_beside, self._saves, layer, ran)

    def end_step(self, meta: MeshConnectorMetadata) -> None:
        """After the forward: the loads are done, the saves copied out and handed over."""
        self._finish_loads()
        if len(self._waited) == len(self.layers) and not self._seen_waiting:
            self._seen_waiting = True
            if self.layerwise:
                logger.info(
                    "MeshConnector worker: vLLM waits on each layer: loads are written layer by layer"
                )
        self._waited.clear()
        try:
            if meta.saves:
                self._finish_saves(meta)
        finally:
            self._saves, self._layer_saved = None, {}

    def _begin_saves(self, meta: MeshConnectorMetadata) -> list[_Save]:
        """Announce this step's saves (lookups count them from now on) and give each chunk a
        destination: the slot the node reserved for it, or a host tensor."""
        saves = []
        for spec in meta.saves:
            if spec.req_id in self._failed_reqs:
                # This step's forward runs over blocks the failed load left unwritten: what it
                # computes after them is wrong, and vLLM will recompute it. Never store it.
                self._count("dropped_saves")
                continue
            chain = Chain.of(self.namespace, spec.tokens, self.chunk_tokens, self.block_size)
            records = range(spec.first, spec.first + spec.count)
            sizes = [self._bytes(chain.tokens(i)) for i in records]
            nbytes = sum(sizes)
            if not self.saver.has_room(nbytes):
                self.saver.count_dropped()
                self._count("dropped_saves")
                continue
            keys = [chain.keys[i] for i in records]
            # Encoded chunks have other sizes: they are announced when they are put.
            raw = self.codec == "raw"
            reservation = self.store.reserve(keys, sizes) if raw else None
            slots = self.store.reserved_slots(reservation, sizes) if raw else None
            if slots is not None:
                chunks = [
                    self._as_tensor(slot, chain.tokens(i)) for slot, i in zip(slots, records, strict=True)
                ]
            else:
                chunks = [
                    torch.empty(self._shape(chain.tokens(i)), dtype=self.layers[0].dtype) for i in records
                ]
            b = self.block_size
            blocks = [spec.block_ids[chain.start(i) // b : chain.start(i + 1) // b] for i in records]
            saves.append(_Save(spec, keys, reservation, chunks, blocks, slots is not None, nbytes))
        return saves

    def _copy_out_beside(self, saves: list[_Save], layer: int, ran: Any) -> Any:
        return self._copied.run(lambda: self._copy_out(saves, layer), after=ran)

    def _copy_out(self, saves: list[_Save], layer: int) -> None:
        assert self.layout is not None
        paged = self.layers[layer]
        for save in saves:
            for dst, blocks in zip(save.chunks, save.blocks, strict=True):
                self.layout.read_blocks_into(paged, blocks, dst[layer, 0], dst[layer, 1])

    def _finish_saves(self, meta: MeshConnectorMetadata) -> None:
        saves = self._saves if self._saves is not None else self._begin_saves(meta)
        futures.wait(self._layer_saved.values())
        try:
            self._copied.finish()  # in the slots (or host tensors) before they are committed
            for f in self._layer_saved.values():
                f.result()
            unsaved = [layer for layer in range(len(self.layers)) if layer not in self._layer_saved]
            if unsaved:  # layers vLLM ran without telling us

                def copy_unsaved() -> None:
                    for layer in unsaved:
                        self._copy_out(saves, layer)

                self._inline.run(copy_unsaved, after=forward_mark(self.layers[0].device))
                self._inline.finish()
        except Exception as exc:  # never fail the step over a save
            logger.warning("could not copy KV out of the paged blocks to save it: %s", exc)
            for save in saves:
                self.store.cancel(save.reservation)
            return
        for save in saves:
            if save.spec.req_id in self._failed_reqs:  # a pipelined load of it broke
                self._count("dropped_saves")
                self.store.cancel(save.reservation)
                continue
            job = functools.partial(self._put, save.keys, save.chunks, save.reservation, save.in_slots)
            if not self.saver.submit(job, save.nbytes):
                self._count("dropped_saves")
                self.store.cancel(save.reservation)

    def _put(
        self, keys: list[bytes], chunks: list[torch.Tensor], reservation: Reservation | None, written: bool
    ) -> None:
        payloads = [chunk.view(torch.uint8).reshape(-1).numpy() for chunk in chunks]
        try:
            if self.codec == "raw":  # all of the reservation at once: chunks and tail blocks
                records = [
                    ChunkRecord.build(k, p, self.namespace, self._meta(chunk.shape[2]))
                    for k, p, chunk in zip(keys, payloads, chunks, strict=True)
                ]
                self.store.commit_records(records, reservation, written)
            else:  # encoded here, on the save thread; tail blocks stay raw (a block is small)
                for tokens, run_keys, run in _by_tokens(keys, chunks, payloads):
                    codec = self.codec if tokens == self.chunk_tokens else "raw"
                    for used, coded_keys, coded in encoded_runs(codec, run_keys, run, self.geometry):
                        meta = codec_meta(self._meta(tokens), used, self._bytes(tokens))
                        self.store.put_payloads(coded_keys, coded, self.namespace, meta)
        except Exception:
            self.store.cancel(reservation)  # lookups must stop counting what will not land
            raise
        self._count("saved_chunks", len(keys))

    def _meta(self, tokens: int) -> dict[str, Any]:
        return {
            "tokens": tokens,
            "layout": self.descriptor,
            "dtype": self.descriptor["dtype"],
            "shape": list(self._shape(tokens)),
        }

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
        self._copier.shutdown(wait=True)
        self.saver.close()
