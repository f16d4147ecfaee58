"""Cost-aware fetching with a real engine: over a slow link it recomputes, over a fast one it fetches.

The chunks sit on a cloud node; the engine's own node is an edge node (``--nat``: it owns
no ring range, so nothing is copied to it behind the test's back) that reaches the cloud
node over a veth link. The slow case shapes the cloud's side of that link to 2 Mbit/s
(``tc tbf``): fetching a prompt's chunks then takes far longer than the engine's measured
prefill, and the adapter must recompute instead of waiting.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from ..helpers import Daemon, kill_all, require, start_daemon
from ..netns import Topology, require_netns
from .llama import greedy, meshed, plain, prompt, write_models

COMMON = (
    "--memory",
    "128MiB",
    "--disk",
    "0",
    "--mesh-profile",
    "local",
    "--replicas",
    "1",
    "--mesh-secret",
    "cost",
)
"""(the cloud node listens beyond loopback, in its namespace: it must prove membership)"""


def mesh_stats(d: Daemon) -> dict[str, Any]:
    with d.client() as c:
        stats: dict[str, Any] = c.stats()["mesh"]
    return stats


def run(tmp_path: Path, rate: str | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Returns (engine stats after the first shared prompt, after the second, edge node's mesh stats)."""
    require("llama_cpp")
    require_netns("tc")
    models = write_models(tmp_path)
    topo = Topology()
    daemons: list[Daemon] = []
    engines: list[Any] = []
    try:
        cloud_ns = topo.namespace("c")
        _, root_ip, cloud_dev, cloud_ip = topo.link(None, cloud_ns)
        if rate is not None:
            topo.limit(cloud_dev, rate, ns=cloud_ns)  # what the cloud node sends us is slow
        cloud = start_daemon(
            tmp_path / "cloud",
            "--name",
            "cloud",
            *COMMON,
            tcp=f"tcp://{cloud_ip}:0",
            prefix=tuple(topo.exec_prefix(cloud_ns)),
        )
        daemons.append(cloud)
        edge = start_daemon(tmp_path / "edge", "--name", "edge", "--nat", "--join", cloud.tcp, *COMMON)
        daemons.append(edge)
        deadline = time.monotonic() + 30
        while len(mesh_stats(cloud).get("relaying", {}).get("attached", [])) < 1:
            assert time.monotonic() < deadline, "edge never attached to the cloud node"
            time.sleep(0.2)
        time.sleep(1.0)  # membership settles

        writer = meshed(models["tiny"], cloud.ipc)  # ipc:// reaches the cloud node without the link
        engines.append(writer)
        shared = [prompt(320, seed=1), prompt(320, seed=2)]
        for p in shared:
            greedy(writer, p, n=1)
        assert writer.mesh.flush()

        engine = meshed(models["tiny"], edge.ipc)
        engines.append(engine)
        greedy(engine, prompt(320, seed=99), n=1)  # a cold prompt: the engine measures its prefill rate
        assert engine.mesh.prefill.tokens_per_s is not None
        reference = plain(models["tiny"])
        snapshots = []
        for p in shared:
            assert greedy(engine, p) == greedy(reference, p)  # same text, fetched or recomputed
            snapshots.append(engine.mesh.snapshot())
            time.sleep(1.5)  # let a fetch that was cut off drain from the shaped link
        return snapshots[0], snapshots[1], mesh_stats(edge)
    finally:
        for e in engines:
            e.close()
        kill_all(daemons)
        topo.close()


@pytest.mark.timeout(240)
def test_over_a_slow_link_the_engine_recomputes_instead_of_waiting(tmp_path: Path) -> None:
    first, second, edge = run(tmp_path, "2mbit")
    assert first["hit_tokens"] == 0 and second["hit_tokens"] == 0
    recompute_s = 320 / first["prefill_tokens_per_s"]
    # The first fetch was tried (the link was not measured yet) and cut off near the time
    # recomputing takes; the second was never started.
    assert edge["cost_cut_off_fetches"] >= 1
    assert first["fetch_seconds"] < recompute_s + 1.0
    assert edge["cost_skip_chunks"] >= 1
    assert second["fetch_seconds"] - first["fetch_seconds"] < 0.05


@pytest.mark.timeout(240)
def test_over_a_fast_link_the_engine_fetches(tmp_path: Path) -> None:
    first, second, edge = run(tmp_path, None)
    assert first["hit_tokens"] == 320 // 64 * 64 and second["hit_tokens"] == 2 * (320 // 64 * 64)
    assert edge["cost_fetch_chunks"] >= 10 and edge.get("cost_skip_chunks", 0) == 0
