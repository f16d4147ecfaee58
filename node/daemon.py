"""The ``lmcache-node run`` daemon: a Node, its server and metrics, until a signal.

SIGTERM or SIGINT stops reading new requests, lets those in flight finish, writes the
memory tier back to disk (``persist_on_shutdown``) and waits for every disk write.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import sys

from .config import NodeConfig
from .metrics import NodeMetrics
from .node import VERSION, Node
from .service import NodeServer
from .sizes import format_size

logger = logging.getLogger("lmcache_mesh.node.daemon")


def _warn_if_disk_budget_exceeds_free_space(config: NodeConfig) -> None:
    if config.disk_bytes <= 0:
        return
    try:
        free = shutil.disk_usage(config.data_path).free
    except OSError:
        return
    if config.disk_bytes > free:
        logger.warning(
            "disk budget %s exceeds the %s free at %s; writes beyond that fail and are counted",
            format_size(config.disk_bytes),
            format_size(free),
            config.data_path,
        )


async def serve(node: Node, metrics: NodeMetrics) -> int:
    server = NodeServer(node, observe=metrics.observe)
    bound = await server.start()
    cfg = node.config
    disk = f"disk {format_size(cfg.disk_bytes)} at {cfg.data_path}" if cfg.disk_bytes else "no disk tier"
    report = node.open()
    print(
        f"lmcache-node {cfg.name} v{VERSION} serving on {' '.join(bound)} "
        f"(memory {format_size(cfg.memory_bytes)}, {disk}; recovered {report.recovered} chunks, "
        f"discarded {report.discarded})",
        flush=True,
    )
    if cfg.metrics_port:
        print(f"metrics on http://{cfg.metrics_host}:{cfg.metrics_port}/metrics", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("lmcache-node: shutting down", flush=True)
    await server.stop()
    written = await asyncio.to_thread(node.close)
    print(f"lmcache-node: stopped; wrote {written} memory records back to disk", flush=True)
    return 0


def run(config: NodeConfig) -> int:
    """Run a node in the foreground until SIGTERM/SIGINT; returns the exit code."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if config.disk_bytes > 0:
        config.data_path.mkdir(parents=True, exist_ok=True)
        _warn_if_disk_budget_exceeds_free_space(config)
    node = Node(config)
    node.open()  # recovery before we accept requests; fails fast if the data dir is locked
    metrics = NodeMetrics(node)
    try:
        if config.metrics_port:
            metrics.serve(config.metrics_host, config.metrics_port)
        return asyncio.run(serve(node, metrics))
    finally:
        metrics.close()
        node.close()
