"""The ``lmcache-node run`` daemon: a Node, its server and metrics, until a signal.

SIGTERM or SIGINT stops reading new requests, lets those in flight finish, writes the
memory tier back to disk (``persist_on_shutdown``) and waits for every disk write.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import ipaddress
import logging
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from lmcache_mesh.mesh.cluster import PROFILES, Cluster
from lmcache_mesh.mesh.coordinator import MeshCoordinator
from lmcache_mesh.mesh.membership import State
from lmcache_mesh.node.config import NodeConfig, split_seed
from lmcache_mesh.node.endpoints import Routers
from lmcache_mesh.node.keyring import MEMBER, Keyring, Principal, Role, Sender, read_key_pair
from lmcache_mesh.node.metrics import NodeMetrics, RequestLatency
from lmcache_mesh.node.node import VERSION, Node
from lmcache_mesh.node.peers import NodeHoldings, PeerPool
from lmcache_mesh.node.protocol import AttachWire, mesh_envelope, route_to, signal_message
from lmcache_mesh.node.records import ChunkRecord
from lmcache_mesh.node.service import MeshParts, NodeServer
from lmcache_mesh.node.sizes import format_count, format_size
from lmcache_mesh.transports.addresses import reachability, webrtc_address
from lmcache_mesh.transports.base import GossipTransport
from lmcache_mesh.transports.curve import CurveClient
from lmcache_mesh.transports.relay import Uplink
from lmcache_mesh.transports.seal import HeaderSeal, SealedGossip
from lmcache_mesh.transports.webrtc import WebRTCConfig, WebRTCPeering
from lmcache_mesh.transports.zmq import CurveFor, Sealer, ZmqDatagramTransport, reuse_frame_buffers

logger = logging.getLogger(__name__)

PEER_TIMEOUT_S = 2.0
"""The longest one call to a peer may take (a late peer is a miss, never an engine's error)."""


def _warn_if_disk_budget_exceeds_free_space(config: NodeConfig) -> None:
    storage = config.storage
    if storage.disk_bytes <= 0:
        return
    try:
        free = shutil.disk_usage(storage.data_path).free
    except OSError:
        return
    if storage.disk_bytes > free:
        logger.warning(
            "disk budget %s exceeds the %s free at %s; writes beyond that fail and are counted",
            format_size(storage.disk_bytes),
            format_size(free),
            storage.data_path,
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
    if config.mesh.advertise:
        return str(config.mesh.advertise)
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


def _place(node: Node, bound: list[str], keyring: Keyring | None) -> str | None:
    """This node's name (set on ``node``) and its address in the mesh; None: no mesh (ipc only)."""
    cfg = node.config
    if keyring is not None:
        node.name = keyring.name
    if cfg.mesh.nat:
        # No address of our own: peers reach us as webrtc://RELAY/NAME through the first seed.
        tcp = next((b for b in bound if b.startswith("tcp://")), None)
        if not cfg.name and keyring is None:
            node.name = f"{socket.gethostname()}:{tcp.rpartition(':')[2] if tcp else 'nat'}"
        return str(webrtc_address(split_seed(cfg.mesh.join[0])[1], node.name))
    address = advertised_address(cfg, bound)
    if address is None:
        logger.warning("no tcp:// endpoint: this node serves local clients only and joins no mesh")
        return None
    if not cfg.name and keyring is None:
        node.name = f"{socket.gethostname()}:{address.rpartition(':')[2]}"
    return address


def _webrtc_config(cfg: NodeConfig) -> WebRTCConfig:
    return WebRTCConfig(
        ice_servers=cfg.webrtc.ice_servers,
        turn_username=cfg.webrtc.turn_username or None,
        turn_password=cfg.webrtc.turn_password or None,
        host_addresses=cfg.webrtc.host_addresses,
        channels=cfg.webrtc.channels,
        max_message_bytes=cfg.limits.max_request_bytes + (1 << 20),
    )


def _webrtc_available(cfg: NodeConfig) -> bool:
    if importlib.util.find_spec("aiortc") is not None:
        return True
    if cfg.mesh.nat:
        raise SystemExit(
            "lmcache-node: --nat needs WebRTC: pip install -e '.[webrtc]' in the lmcache-mesh checkout"
        )
    logger.info("WebRTC is off (no aiortc): members behind NAT are unreachable from here")
    return False


class _Mesh:
    """A node's mesh parts, built in dependency order (constructors do no I/O), started and
    stopped together."""

    def __init__(self, node: Node, address: str, keyring: Keyring | None) -> None:
        cfg = node.config
        weight = max((cfg.storage.memory_bytes + cfg.storage.disk_bytes) / (1 << 30), 0.01)

        def curve(endpoint: str) -> CurveClient:
            # Whose key to expect at an address is what the membership says lives there.
            assert keyring is not None
            return keyring.client_for(endpoint, self.cluster.name_at)

        curve_for = curve if keyring is not None else None
        secret = cfg.webrtc.mesh_secret.encode()
        # Without CurveZMQ, members prove themselves with the mesh secret: on every gossip
        # datagram, and on the header of every request they send each other.
        headers = HeaderSeal(secret) if keyring is None and secret else None
        seal = headers.seal if headers is not None else None
        gossip: GossipTransport = ZmqDatagramTransport(
            address, mesh_envelope, route_to, curve=curve_for, seal=seal
        )
        sealed = SealedGossip(gossip, secret) if headers is not None else None
        self.cluster = Cluster(
            node.name,
            address,
            cfg.mesh.zone,
            weight,
            PROFILES[cfg.mesh.profile](),
            sealed or gossip,
            seed_address=keyring.remember_seed if keyring is not None else lambda seed: split_seed(seed)[1],
        )
        self.peering: WebRTCPeering[Principal] | None = None
        if _webrtc_available(cfg):
            self.peering = WebRTCPeering(
                lambda: self.cluster.name,
                lambda: self.cluster.membership.me.address,
                self.cluster.live_address,
                lambda to, signal: self.cluster.transport.send_message(to, [signal_message(signal)]),
                keyring.node_principal if keyring is not None else lambda name: MEMBER,
                _webrtc_config(cfg),
                # With CurveZMQ keys, each pair of nodes proves itself with a secret only the
                # two can compute; otherwise with the shared --mesh-secret.
                keyring.pair_secret if keyring is not None else cfg.webrtc.mesh_secret.encode(),
                accept_offers=cfg.mesh.nat,
            )
            self.cluster.subscribe(on_gone=self.peering.forget)
        self.uplink = self._uplink(node, curve_for, seal) if cfg.mesh.nat else None
        self._preload: asyncio.Future[Any] | None = None
        """aiortc's import, started off the loop by :meth:`start`."""
        self.coordinator: MeshCoordinator[ChunkRecord] = MeshCoordinator(
            self.cluster,
            NodeHoldings(node),
            PeerPool(PEER_TIMEOUT_S, links=self.peering, curve=curve_for, seal=seal),
            replicas=cfg.mesh.replicas,
            wire_codec=cfg.mesh.wire_codec,
        )
        sections: dict[str, Callable[[], dict[str, Any]]] = {}
        proof = "curve" if keyring is not None else "mesh secret" if sealed is not None else "none"
        sections["gossip"] = lambda: {
            "proof": proof,
            "rejected": sealed.rejected if sealed is not None else 0,
        }
        if self.peering is not None:
            sections["webrtc"] = self.peering.stats
        if self.uplink is not None:
            uplink = self.uplink
            sections["relay"] = lambda: {
                "via": uplink.relay,
                "attached": uplink.attached,
                "switches": uplink.switches,
            }
        self.parts = MeshParts(
            self.cluster, self.coordinator, self.peering.on_signal if self.peering else None, sections
        )

    def _uplink(self, node: Node, curve: CurveFor | None, seal: Sealer | None) -> Uplink:
        cfg = node.config

        def relays() -> list[str]:
            """Seeds first, then direct members, live ones before the rest."""
            direct = sorted(
                (m for m in self.cluster.membership.members.values() if reachability(m.address) == "direct"),
                key=lambda m: (m.state is not State.ALIVE, m.state is not State.SUSPECT, m.name),
            )
            seeds = [self.cluster.seed_address(j) for j in cfg.mesh.join]
            return list(dict.fromkeys([*seeds, *(m.address for m in direct)]))

        return Uplink(
            node.name,
            relays,
            AttachWire(seal),
            lambda relay: self.cluster.readdress(webrtc_address(relay, node.name)),
            cfg.limits.max_header_bytes + cfg.limits.max_record_bytes,
            curve=curve,
        )

    def start(self, node: Node, server: NodeServer) -> None:
        loop = asyncio.get_running_loop()
        cfg = node.config
        if self.peering is not None:
            # aiortc takes ~0.7 s to import: do it now, off the loop, not on the first link's clock.
            self._preload = loop.run_in_executor(None, importlib.import_module, "aiortc")

            async def serve(frames: list[Any], reply: Any, principal: Principal, link: Any) -> None:
                await server.take(frames, reply, Sender(principal, conn=link))

            self.peering.start(serve)
        if self.uplink is not None:
            self.uplink.start(self.cluster.seed_address(cfg.mesh.join[0]), server.take_relayed)
        node.store.watch_forgotten(_on_loop(loop, self.coordinator.directory.removed))
        self.coordinator.start()
        self.cluster.start(loop, cfg.mesh.join)

    async def stop(self) -> None:
        if self._preload is not None:
            await asyncio.gather(self._preload, return_exceptions=True)
        await self.coordinator.aclose()
        await self.cluster.leave()
        if self.uplink is not None:
            await self.uplink.aclose()
        if self.peering is not None:
            await self.peering.aclose()


async def serve(node: Node, keyring: Keyring | None = None) -> int:
    cfg = node.config
    routers = Routers(cfg, keyring)
    bound = routers.bind()
    metrics: NodeMetrics | None = None
    try:
        address = _place(node, bound, keyring)
        mesh = _Mesh(node, address, keyring) if address is not None else None
        latency = RequestLatency()
        server = NodeServer(
            node, observe=latency.observe, keyring=keyring, routers=routers, mesh=mesh.parts if mesh else None
        )
        metrics = NodeMetrics(server.status, latency)
        if cfg.metrics.port:
            metrics.serve(cfg.metrics.host, cfg.metrics.port)
        await server.start()
        if mesh is not None:
            mesh.start(node, server)
        return await _until_signalled(node, server, mesh, keyring)
    finally:
        if metrics is not None:
            metrics.close()
        routers.close()  # after a clean stop already closed: this is for a failed start


async def _until_signalled(
    node: Node, server: NodeServer, mesh: _Mesh | None, keyring: Keyring | None
) -> int:
    cfg = node.config
    bound = server.routers.bound
    storage = cfg.storage
    disk = (
        f"disk {format_size(storage.disk_bytes)} at {storage.data_path}"
        if storage.disk_bytes
        else "no disk tier"
    )
    report = node.open()
    print(
        f"lmcache-node {node.name} v{VERSION} serving on {' '.join(bound)} "
        f"(memory {format_size(storage.memory_bytes)}, {disk}; recovered {report.recovered} chunks, "
        f"discarded {report.discarded})",
        flush=True,
    )
    arena = node.store.arena
    if arena is not None:
        print(
            f"shared memory: {arena.path} ({format_size(arena.capacity)}); engines on this host map it",
            flush=True,
        )
    elif storage.shm_dir:
        print(f"shared memory off: {node.shm_off_reason}; chunks travel as frames", flush=True)
    if mesh is not None:
        joining = f"; joining {' '.join(cfg.mesh.join)}" if cfg.mesh.join else ""
        if cfg.mesh.nat:
            joining += " (behind NAT: relayed, WebRTC for data)"
        print(
            f"mesh: {node.name} at {mesh.cluster.membership.me.address} ({cfg.mesh.profile} timings){joining}",
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
    if cfg.metrics.port:
        print(f"metrics on http://{cfg.metrics.host}:{cfg.metrics.port}/metrics", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if keyring is not None:
        loop.add_signal_handler(signal.SIGHUP, _reload_keys, keyring)
    taken: list[str] = []
    if mesh is not None:

        def name_taken(address: str) -> None:  # a live member answered to our name
            taken.append(address)
            stop.set()

        mesh.cluster.membership.on_conflict = name_taken
    await stop.wait()
    print("lmcache-node: shutting down", flush=True)
    if mesh is not None:
        await mesh.stop()
    await server.stop()
    written = await asyncio.to_thread(node.close)
    print(f"lmcache-node: stopped; wrote {format_count(written, 'memory record')} back to disk", flush=True)
    if taken:
        print(
            f"lmcache-node: the name {node.name!r} belongs to a live member at {taken[0]}: this node "
            "did not join; start it with another --name (or stop that member first)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


def configure_logging() -> None:
    """The daemon's log format; called before the config is read, so that its warnings
    (e.g. an unknown LMCACHE_MESH_* variable) look like every other line."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("aioice").setLevel(logging.WARNING)  # it logs every ICE check at INFO


def refuse_open_mesh(config: NodeConfig, keyring: Keyring | None) -> None:
    """Protected mode: a node reachable from other machines must prove membership (CurveZMQ
    keys, or the mesh secret on every gossip datagram), or be told ``--insecure`` (a closed
    network), which it then says in every start's log and in ``status``. SystemExit otherwise."""
    exposed = [ep for ep in config.listen if ep.startswith("tcp://") and not _loopback(ep)]
    if not exposed or keyring is not None or config.webrtc.mesh_secret:
        return
    if config.security.insecure:
        logger.warning(
            "x INSECURE (--insecure): listening at %s with neither CurveZMQ keys nor a mesh "
            "secret: anyone who reaches it can gossip (declare members dead, take their names), "
            "read and write",
            ", ".join(exposed),
        )
        return
    raise SystemExit(
        f"lmcache-node: refusing to listen at {', '.join(exposed)} with neither CurveZMQ keys nor "
        "a mesh secret: anyone who reaches it could gossip (declare members dead, take their "
        "names), read and write.\n  Set a mesh secret, the same on every node (--mesh-secret, or "
        "LMCACHE_MESH_MESH_SECRET), or keys (lmcache-node keygen; README 'Security'); or\n  "
        "--insecure on a closed network; or listen on 127.0.0.1 only"
    )


def _loopback(endpoint: str) -> bool:
    host = endpoint[len("tcp://") :].rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(config: NodeConfig) -> int:
    """Run a node in the foreground until SIGTERM/SIGINT; returns the exit code."""
    configure_logging()
    reuse_frame_buffers()  # our own process: received chunks reuse heap pages
    if config.storage.disk_bytes > 0:
        config.storage.data_path.mkdir(parents=True, exist_ok=True)
        _warn_if_disk_budget_exceeds_free_space(config)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a SIGHUP during recovery must not kill the node
    keyring = load_keyring(config)
    refuse_open_mesh(config, keyring)
    node = Node(config)
    node.open()  # recovery before we accept requests; fails fast if the data dir is locked
    try:
        return asyncio.run(serve(node, keyring))
    finally:
        node.close()
