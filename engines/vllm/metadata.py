"""What the scheduler-side connector tells the workers each step (pickled across processes)."""

from __future__ import annotations

from dataclasses import dataclass, field

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
except ImportError:  # the worker's data path runs without vLLM too (bench/gpu_dataplane.py)

    class KVConnectorMetadata:  # type: ignore[no-redef]
        pass


@dataclass
class LoadSpec:
    """Load tokens ``start .. end - 1`` of a request from the mesh into its blocks."""

    req_id: str
    tokens: list[int]
    """the prompt up to the end of the last record needed (for the keys: whole chunks, then
    whole tail blocks)"""
    block_ids: list[int]
    start: int
    end: int
    recompute_s: float = 0.0
    """what recomputing one chunk costs the engine (0: unknown): the fetch gives up past it"""
    asynchronous: bool = False
    """loaded between steps (the request waits outside the batch until ``get_finished`` says)"""


@dataclass
class SaveSpec:
    """Store records ``first .. first + count - 1`` of a request's chain (whole chunks, then
    whole tail blocks), all computed by now."""

    req_id: str
    tokens: list[int]
    """the prompt up to the end of the last record to store"""
    block_ids: list[int]
    first: int
    count: int


@dataclass
class MeshConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]  # vllm is not type-checked
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
