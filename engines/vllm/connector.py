"""``MeshConnector``: vLLM's v1 KV connector backed by the mesh.

vLLM makes one instance per role and process: the SCHEDULER instance (engine core) asks the
mesh how much of each prompt it holds and plans loads and saves; the WORKER instance (each
worker) moves the bytes. They share nothing but the metadata vLLM carries between them.
Loads and saves move layer by layer beside the forward pass, hits held on peers load between
steps, and commits run on a background thread, so no request waits on the mesh beyond a
lookup's deadline; a load that fails is recomputed by vLLM.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from ..prefill import PrefillRate
from ..store import MeshStore
from .config import VllmMeshConfig
from .events import BlockChain, EventsIngest
from .identity import chunk_bytes, engine_namespace
from .metadata import MeshConnectorMetadata
from .scheduler import SchedulerSide
from .worker import WorkerSide

logger = logging.getLogger(__name__)


LOG_LEVEL_VARIABLE = "LMCACHE_MESH_LOG"


def show_our_logs() -> None:
    """vLLM sets up its own loggers only: in its processes ours would go unseen below WARNING.
    Unless the application set up logging itself, log to stderr at ``LMCACHE_MESH_LOG``
    (default INFO)."""
    ours = logging.getLogger("lmcache_mesh")
    if ours.handlers or logging.getLogger().handlers:
        return
    name = os.environ.get(LOG_LEVEL_VARIABLE, "INFO").upper()
    level = logging.getLevelName(name)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [lmcache_mesh] %(message)s"))
    ours.addHandler(handler)
    ours.setLevel(level if isinstance(level, int) else logging.INFO)
    if not isinstance(level, int):
        logger.warning(
            "%s=%s is not a log level (DEBUG, INFO, WARNING, ERROR): using INFO", LOG_LEVEL_VARIABLE, name
        )


class MeshConnector(KVConnectorBase_V1):  # type: ignore[misc]  # vllm is not type-checked
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        show_our_logs()
        self.config = VllmMeshConfig.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        self.namespace, self.descriptor = engine_namespace(vllm_config, self.config)
        block_size = vllm_config.cache_config.block_size
        if self.config.node is None:
            logger.warning(
                "MeshConnector without a 'node': the scheduler and each worker embed a node of their own "
                "and share nothing; set kv_connector_extra_config.node to a running lmcache-node"
            )
        self.store = MeshStore(self.config.store_config())
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        self.ingest: EventsIngest | None = None
        if role == KVConnectorRole.SCHEDULER:
            # A cache may forget between lookup and load: vLLM should recompute then, not fail.
            self._kv_transfer_config.kv_load_failure_policy = self.config.load_failure_policy
            prefill = PrefillRate(self.config.prefill_tokens_per_s) if self.config.cost_aware else None
            # A node that cannot hold one chunk would turn every save into a refusal: say so now.
            self.store.check_chunk_bytes(chunk_bytes(self.descriptor, self.config.chunk_tokens))
            self.scheduler = SchedulerSide(
                self.namespace,
                self.config.chunk_tokens,
                block_size,
                self.store,
                prefill,
                chunk_bytes(self.descriptor, self.config.chunk_tokens),
                self.config.async_loads,
                self.config.tails,
            )
            self.ingest = _start_ingest(vllm_config, self.config, self.namespace, self.store)
        else:
            self.worker = WorkerSide(
                self.namespace,
                self.descriptor,
                self.config.chunk_tokens,
                block_size,
                self.store,
                self.config.max_pending_save_bytes,
                _split_kind(),
                self.config.layerwise,
                self.config.pin_shared_memory,
                self.config.codec,
            )
        logger.info(
            "MeshConnector (%s): namespace %s, %d tokens/chunk, node %s",
            role.name.lower(),
            self.namespace.hex(),
            self.config.chunk_tokens,
            self.config.node or "embedded",
        )

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped save is only a future miss

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        # Per-layer waits and copies are Python between layers: a full CUDA graph would skip them.
        return bool(VllmMeshConfig.from_extra(extra_config).layerwise)

    # scheduler side

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.scheduler is not None
        return self.scheduler.matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        assert self.scheduler is not None
        self.scheduler.after_alloc(request, list(blocks.get_block_ids()[0]), num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        assert self.scheduler is not None
        return self.scheduler.build_meta(scheduler_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self.scheduler is not None
        self.scheduler.finished(request)
        return False, None

    # worker side

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        assert self.worker is not None
        self.worker.register(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if self.worker is not None and isinstance(meta, MeshConnectorMetadata) and meta.loads:
            self.worker.load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self.worker is not None:
            self.worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if self.worker is not None and isinstance(meta, MeshConnectorMetadata) and meta.saves:
            self.worker.save_layer(meta, layer_name)

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if self.worker is not None and isinstance(meta, MeshConnectorMetadata):
            self.worker.end_step(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, self.worker.finished_loads() if self.worker is not None else None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_failed_blocks() if self.worker is not None else set()

    def shutdown(self) -> None:
        if self.ingest is not None:
            self.ingest.close()
        if self.worker is not None:
            self.worker.close()
        self.store.close()


def _split_kind() -> Any:
    """How an older vLLM orders a 5-D cache's heads and tokens ("NHD" unless it says "HND")."""
    try:
        from vllm.distributed.kv_transfer.kv_connector import utils

        return "HND" if str(utils.get_kv_cache_layout()) == "HND" else "NHD"
    except Exception:  # newer vLLM: packed 4-D caches, where this does not apply
        return "NHD"


def _connectable(endpoint: str) -> str:
    """The address a subscriber connects to for a publisher's bind address (tcp://*:5557)."""
    return endpoint.replace("://*", "://127.0.0.1").replace("://[::]", "://[::1]")


def _start_ingest(
    vllm_config: Any, config: VllmMeshConfig, namespace: bytes, store: MeshStore
) -> EventsIngest | None:
    """Follow this engine's own KV events into the mesh index, if it publishes them."""
    events = getattr(vllm_config, "kv_events_config", None)
    if not config.ingest_events or events is None or not events.enable_kv_cache_events:
        return None
    if events.publisher != "zmq" or config.node is None:
        logger.warning("KV events are on but not ingested: they need the zmq publisher and a node address")
        return None
    engine = config.engine_name or f"vllm-{vllm_config.kv_transfer_config.engine_id[:8]}"
    chain = BlockChain(namespace, config.chunk_tokens)
    replay = _connectable(events.replay_endpoint) if events.replay_endpoint else None
    ingest = EventsIngest(
        _connectable(events.endpoint),
        chain,
        lambda add, remove: store.announce_engine(engine, add, remove),
        topic=events.topic,
        replay_endpoint=replay,
    )
    logger.info("MeshConnector: KV events of %s from %s feed the mesh index", engine, events.endpoint)
    return ingest.start()
