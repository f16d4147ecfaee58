"""The ``lmcache-node run`` daemon: a Node, its server and metrics, until a signal.

SIGTERM or SIGINT stops reading new requests, lets those in flight finish, writes the
memory tier back to disk (``persist_on_shutdown``) and waits for every disk write.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import shutil
import signal
import socket
import sys
from collections.abc import Callable

from lmcache_mesh.mesh.membership import State
from lmcache_mesh.transports.addresses import reachability, webrtc_address
from lmcache_mesh.transports.webrtc import WebRTCConfig

from .cluster import PROFILES, Cluster
from .config import NodeConfig
from .coordinator import MeshCoordinator
from .metrics import NodeMetrics
from .node import VERSION, Node
from .peering import WebRTCPeering
from .relay import Uplink
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


def _on_loop(
    loop: asyncio.AbstractEventLoop, fn: Callable[[list[bytes]], None]
) -> Callable[[list[bytes]], None]:
    """``fn`` made safe to call from any thread: it runs on ``loop`` (dropped once the loop is closed)."""

    def call(keys: list[bytes]) -> None:
        try:
            loop.call_soon_threadsafe(fn, keys)
        except RuntimeError:
            pass  # shutting down: the mesh no longer needs to hear of it

    return call


def advertised_address(config: NodeConfig, bound: list[str]) -> str | None:
    """The tcp:// address peers should use for this node (None: ipc only, no mesh)."""
    if config.advertise:
        return config.advertise
    tcp = next((b for b in bound if b.startswith("tcp://")), None)
    if tcp is None:
        return None
    host, _, port = tcp[len("tcp://") :].rpartition(":")
    if host in ("0.0.0.0", "*", "[::]", "::"):
        host = socket.gethostbyname(socket.gethostname())
        logger.warning(
            "listening on all interfaces; advertising %s to peers (set --advertise to choose)", host
        )
    return f"tcp://{host}:{port}"


def _start_cluster(node: Node, bound: list[str]) -> Cluster | None:
    cfg = node.config
    if cfg.nat:
        # No address of our own: peers reach us as webrtc://RELAY/NAME through the first seed.
        tcp = next((b for b in bound if b.startswith("tcp://")), None)
        if not cfg.name:
            node.name = f"{socket.gethostname()}:{tcp.rpartition(':')[2] if tcp else 'nat'}"
        address = webrtc_address(cfg.join[0], node.name)
    else:
        direct = advertised_address(cfg, bound)
        if direct is None:
            logger.warning("no tcp:// endpoint: this node serves local clients only and joins no mesh")
            return None
        address = direct
        if not cfg.name:
            node.name = f"{socket.gethostname()}:{address.rpartition(':')[2]}"
    weight = max((cfg.memory_bytes + cfg.disk_bytes) / (1 << 30), 0.01)
    cluster = Cluster(node.name, address, cfg.zone, weight, PROFILES[cfg.mesh_profile]())
    node.cluster = cluster
    cluster.start(asyncio.get_running_loop(), cfg.join)
    return cluster


def _webrtc_config(cfg: NodeConfig) -> WebRTCConfig:
    return WebRTCConfig(
        ice_servers=cfg.ice_servers,
        turn_username=cfg.turn_username or None,
        turn_password=cfg.turn_password or None,
        host_addresses=cfg.webrtc_host_addresses,
        channels=cfg.webrtc_channels,
        max_message_bytes=cfg.max_request_bytes + (1 << 20),
    )


def _start_webrtc(node: Node, cluster: Cluster, server: NodeServer) -> WebRTCPeering | None:
    """WebRTC links to (or, behind NAT, from) other members; None if aiortc is missing."""
    if importlib.util.find_spec("aiortc") is None:
        if node.config.nat:
            raise SystemExit("lmcache-node: --nat needs WebRTC: pip install 'lmcache-mesh[webrtc]'")
        logger.info("WebRTC is off (no aiortc): members behind NAT are unreachable from here")
        return None
    # aiortc takes ~0.7 s to import: do it now, off the loop, not on the first link's clock.
    asyncio.get_running_loop().run_in_executor(None, importlib.import_module, "aiortc")
    peering = WebRTCPeering(
        cluster,
        server,
        _webrtc_config(node.config),
        node.config.mesh_secret.encode(),
        accept_offers=node.config.nat,
    )
    server.peering = peering
    cluster.on_gone.append(peering.forget)
    node.stats_sources["webrtc"] = peering.stats
    return peering


def _start_uplink(node: Node, cluster: Cluster, server: NodeServer) -> Uplink:
    cfg = node.config

    def relays() -> list[str]:
        """Seeds first, then direct members, live ones before the rest."""
        direct = sorted(
            (m for m in cluster.membership.members.values() if reachability(m.address) == "direct"),
            key=lambda m: (m.state is not State.ALIVE, m.state is not State.SUSPECT, m.name),
        )
        return list(dict.fromkeys([*cfg.join, *(m.address for m in direct)]))

    uplink = Uplink(
        node.name,
        relays,
        server.take_relayed,
        lambda relay: cluster.readdress(webrtc_address(relay, node.name)),
        cfg.max_header_bytes + cfg.max_record_bytes,
    )
    uplink.start(cfg.join[0])
    node.stats_sources["relay"] = lambda: {
        "via": uplink.relay,
        "attached": uplink.attached,
        "switches": uplink.switches,
    }
    return uplink


async def serve(node: Node, metrics: NodeMetrics) -> int:
    server = NodeServer(node, observe=metrics.observe)
    bound = await server.start()
    cfg = node.config
    cluster = _start_cluster(node, bound)
    coordinator = None
    peering = None
    uplink = None
    if cluster is not None:
        peering = _start_webrtc(node, cluster, server)
        if cfg.nat:
            uplink = _start_uplink(node, cluster, server)
        else:
            node.stats_sources["relaying"] = lambda: {
                "attached": server.relay.names(),
                "forwarded": server.relay.forwarded,
            }
        coordinator = MeshCoordinator(node, cluster, replicas=cfg.replicas)
        coordinator.peers.links = peering
        cluster.on_gone.append(coordinator.forget)
        cluster.on_joined.append(lambda _name: coordinator.ring_changed())
        server.coordinator = node.coordinator = coordinator
        node.store.on_forgotten = _on_loop(asyncio.get_running_loop(), coordinator.removed)
        coordinator.start()
    disk = f"disk {format_size(cfg.disk_bytes)} at {cfg.data_path}" if cfg.disk_bytes else "no disk tier"
    report = node.open()
    print(
        f"lmcache-node {node.name} v{VERSION} serving on {' '.join(bound)} "
        f"(memory {format_size(cfg.memory_bytes)}, {disk}; recovered {report.recovered} chunks, "
        f"discarded {report.discarded})",
        flush=True,
    )
    if cluster is not None:
        joining = f"; joining {' '.join(cfg.join)}" if cfg.join else ""
        if cfg.nat:
            joining += " (behind NAT: relayed, WebRTC for data)"
        print(
            f"mesh: {node.name} at {cluster.membership.me.address} ({cfg.mesh_profile} timings){joining}",
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
    if coordinator is not None:
        await coordinator.flush()
        await coordinator.aclose()
    if cluster is not None:
        await cluster.leave()
    if uplink is not None:
        await uplink.aclose()
    if peering is not None:
        await peering.aclose()
    await server.stop()
    written = await asyncio.to_thread(node.close)
    print(f"lmcache-node: stopped; wrote {written} memory records back to disk", flush=True)
    return 0


def run(config: NodeConfig) -> int:
    """Run a node in the foreground until SIGTERM/SIGINT; returns the exit code."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("aioice").setLevel(logging.WARNING)  # it logs every ICE check at INFO
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
