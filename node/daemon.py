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
from .config import NodeConfig, split_seed
from .coordinator import MeshCoordinator
from .keyring import Keyring, Role, read_key_pair
from .metrics import NodeMetrics
from .node import VERSION, Node
from .peering import WebRTCPeering
from .relay import Uplink
from .service import NodeServer
from .sizes import format_count, format_size

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
        host = _outbound_address()
        logger.warning(
            "listening on all interfaces; advertising %s to peers (set --advertise to choose)", host
        )
    return f"tcp://{host}:{port}"


def _outbound_address() -> str:
    """This machine's address on the route out (the host name often resolves to 127.0.1.1,
    which peers cannot reach); the host name's address if there is no route."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))  # UDP: no packet is sent, only a route chosen
        address: str = probe.getsockname()[0]
    except OSError:
        address = socket.gethostbyname(socket.gethostname())
    finally:
        probe.close()
    if address.startswith("127."):
        logger.warning("x the only address found is %s: peers on other machines cannot reach it", address)
    return address


def load_keyring(config: NodeConfig) -> Keyring | None:
    """The node's CurveZMQ keyring, or None when CurveZMQ is off; SystemExit saying what is wrong."""
    if not config.curve_enabled():
        return None
    try:
        key_name, keys = read_key_pair(config.key_path)
        keyring = Keyring(config.name or key_name, keys, config.authorized_keys_path)
    except ValueError as exc:
        raise SystemExit(
            f"lmcache-node: CurveZMQ: {exc}\n  (create keys with `lmcache-node keygen`; see README "
            "'Security'; --curve off runs without)"
        ) from None
    me = keyring.own_entry()
    if me is None or me.role is not Role.NODE:
        raise SystemExit(
            f"lmcache-node: CurveZMQ: this node's public key {keys.public} is not in "
            f"{config.authorized_keys_path} as a node; add the line\n  {keys.public} {keyring.name or 'NAME'} node"
        )
    if config.name and config.name != me.name:
        raise SystemExit(
            f"lmcache-node: --name {config.name!r} differs from this key's name {me.name!r} in "
            f"{config.authorized_keys_path}: peers find a node's key by its name"
        )
    keyring.name = me.name
    return keyring


def _reload_keys(keyring: Keyring) -> None:
    try:
        n = keyring.reload()
        logger.info("- reloaded %s: %d keys allowed", keyring.allow_list, n)
    except ValueError as exc:
        logger.error("x kept the previous allow-list: %s", exc)


def _start_cluster(node: Node, bound: list[str], keyring: Keyring | None) -> Cluster | None:
    cfg = node.config
    if keyring is not None:
        node.name = keyring.name
    if cfg.nat:
        # No address of our own: peers reach us as webrtc://RELAY/NAME through the first seed.
        tcp = next((b for b in bound if b.startswith("tcp://")), None)
        if not cfg.name and keyring is None:
            node.name = f"{socket.gethostname()}:{tcp.rpartition(':')[2] if tcp else 'nat'}"
        address = webrtc_address(split_seed(cfg.join[0])[1], node.name)
    else:
        direct = advertised_address(cfg, bound)
        if direct is None:
            logger.warning("no tcp:// endpoint: this node serves local clients only and joins no mesh")
            return None
        address = direct
        if not cfg.name and keyring is None:
            node.name = f"{socket.gethostname()}:{address.rpartition(':')[2]}"
    weight = max((cfg.memory_bytes + cfg.disk_bytes) / (1 << 30), 0.01)
    curve = keyring.client_for if keyring is not None else None
    cluster = Cluster(node.name, address, cfg.zone, weight, PROFILES[cfg.mesh_profile](), curve=curve)
    if keyring is not None:
        keyring.name_of = cluster.name_at
        cluster.seed_address = keyring.remember_seed
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


def _start_webrtc(
    node: Node, cluster: Cluster, server: NodeServer, keyring: Keyring | None
) -> WebRTCPeering | None:
    """WebRTC links to (or, behind NAT, from) other members; None if aiortc is missing."""
    if importlib.util.find_spec("aiortc") is None:
        if node.config.nat:
            raise SystemExit(
                "lmcache-node: --nat needs WebRTC: pip install -e '.[webrtc]' in the lmcache-mesh checkout"
            )
        logger.info("WebRTC is off (no aiortc): members behind NAT are unreachable from here")
        return None
    # aiortc takes ~0.7 s to import: do it now, off the loop, not on the first link's clock.
    asyncio.get_running_loop().run_in_executor(None, importlib.import_module, "aiortc")
    peering = WebRTCPeering(
        cluster,
        server,
        _webrtc_config(node.config),
        # With CurveZMQ keys, each pair of nodes proves itself with a secret only the two can
        # compute; otherwise with the shared --mesh-secret.
        keyring.pair_secret if keyring is not None else node.config.mesh_secret.encode(),
        accept_offers=node.config.nat,
        principal_of=keyring.node_principal if keyring is not None else None,
    )
    server.peering = peering
    cluster.on_gone.append(peering.forget)
    node.stats_sources["webrtc"] = peering.stats
    return peering


def _start_uplink(node: Node, cluster: Cluster, server: NodeServer, keyring: Keyring | None) -> Uplink:
    cfg = node.config

    def relays() -> list[str]:
        """Seeds first, then direct members, live ones before the rest."""
        direct = sorted(
            (m for m in cluster.membership.members.values() if reachability(m.address) == "direct"),
            key=lambda m: (m.state is not State.ALIVE, m.state is not State.SUSPECT, m.name),
        )
        seeds = [cluster.seed_address(j) for j in cfg.join]
        return list(dict.fromkeys([*seeds, *(m.address for m in direct)]))

    uplink = Uplink(
        node.name,
        relays,
        server.take_relayed,
        lambda relay: cluster.readdress(webrtc_address(relay, node.name)),
        cfg.max_header_bytes + cfg.max_record_bytes,
        curve=keyring.client_for if keyring is not None else None,
    )
    uplink.start(cluster.seed_address(cfg.join[0]))
    node.stats_sources["relay"] = lambda: {
        "via": uplink.relay,
        "attached": uplink.attached,
        "switches": uplink.switches,
    }
    return uplink


async def serve(node: Node, metrics: NodeMetrics, keyring: Keyring | None = None) -> int:
    server = NodeServer(node, observe=metrics.observe, keyring=keyring)
    bound = await server.start()
    cfg = node.config
    cluster = _start_cluster(node, bound, keyring)
    coordinator = None
    peering = None
    uplink = None
    if cluster is not None:
        peering = _start_webrtc(node, cluster, server, keyring)
        if cfg.nat:
            uplink = _start_uplink(node, cluster, server, keyring)
        else:
            node.stats_sources["relaying"] = lambda: {
                "attached": server.relay.names(),
                "forwarded": server.relay.forwarded,
            }
        coordinator = MeshCoordinator(node, cluster, replicas=cfg.replicas)
        coordinator.peers.links = peering
        coordinator.peers.curve = keyring.client_for if keyring is not None else None
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
    if keyring is not None:
        print(
            f"security: CurveZMQ on tcp:// as {keyring.name} (key {keyring.keys.public}); "
            f"allow-list {keyring.allow_list} (SIGHUP rereads it)",
            flush=True,
        )
    elif any(ep.startswith("tcp://") for ep in bound):
        print(
            "security: CurveZMQ is off: anyone who can reach the tcp:// port can read and write "
            "(lmcache-node keygen turns it on)",
            flush=True,
        )
    if cfg.metrics_port:
        print(f"metrics on http://{cfg.metrics_host}:{cfg.metrics_port}/metrics", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if keyring is not None:
        loop.add_signal_handler(signal.SIGHUP, _reload_keys, keyring)
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
    print(f"lmcache-node: stopped; wrote {format_count(written, 'memory record')} back to disk", flush=True)
    return 0


def configure_logging() -> None:
    """The daemon's log format; called before the config is read, so that its warnings
    (e.g. an unknown LMCACHE_MESH_* variable) look like every other line."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("aioice").setLevel(logging.WARNING)  # it logs every ICE check at INFO


def run(config: NodeConfig) -> int:
    """Run a node in the foreground until SIGTERM/SIGINT; returns the exit code."""
    configure_logging()
    if config.disk_bytes > 0:
        config.data_path.mkdir(parents=True, exist_ok=True)
        _warn_if_disk_budget_exceeds_free_space(config)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a SIGHUP during recovery must not kill the node
    keyring = load_keyring(config)
    node = Node(config)
    node.open()  # recovery before we accept requests; fails fast if the data dir is locked
    metrics = NodeMetrics(node)
    try:
        if config.metrics_port:
            metrics.serve(config.metrics_host, config.metrics_port)
        return asyncio.run(serve(node, metrics, keyring))
    finally:
        metrics.close()
        node.close()
