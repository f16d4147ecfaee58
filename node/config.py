"""NodeConfig: every setting of a cache node, with its one default, in six sections.

``cfg.name`` and ``cfg.listen`` say who the node is and where it serves; ``cfg.storage``,
``cfg.limits``, ``cfg.mesh``, ``cfg.webrtc``, ``cfg.security`` and ``cfg.metrics`` hold the
rest. Each field's docstring is its ``--help`` text and its comment in the sample config.
CLI flags, ``LMCACHE_MESH_<KEY>`` environment variables and TOML keys are derived from the
fields by :mod:`.settings` (one key per setting, e.g. ``memory`` for
``storage.memory_bytes``; TOML takes it in its section, ``[storage]``, or flat as earlier
releases did, and ``data-dir`` or ``data_dir``). Precedence: flags > environment > TOML file >
defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcache_mesh.mesh.costs import WIRE_CODECS

from .settings import Schema, setting

ENV_PREFIX = "LMCACHE_MESH_"
NOT_SETTINGS = frozenset({"CONFIG", "LOG", "SKIP_ENGINES", "SKIP_NETNS"})
"""``LMCACHE_MESH_*`` variables that are not node settings: the config file's path, the log
level of the adapters in an engine's processes, and the test suite's switches"""
DEFAULT_PORT = 7700
MESH_PROFILES = ("lan", "wan", "local")
CURVE_MODES = ("auto", "on", "off")


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "lmcache-mesh")


def split_seed(seed: str) -> tuple[str, str]:
    """``NAME@tcp://HOST:PORT`` → (name, address); a bare address has no name ("")."""
    name, at, address = seed.partition("@")
    return (name, address) if at and "://" not in name else ("", seed)


def _check_range(owner: object, path: str, low: int, high: int | None = None) -> None:
    """ValueError naming ``path`` (``section.field``), its value and the allowed range."""
    value = getattr(owner, path.rpartition(".")[2])
    if value < low or (high is not None and value > high):
        allowed = f"in [{low}, {high}]" if high is not None else (f"> {low - 1}" if low == 1 else f">= {low}")
        raise ValueError(f"{path} must be {allowed}, got {value}")


@dataclass(frozen=True, slots=True)
class StorageSettings:
    """Where chunks are kept: the memory tier, the disk tier behind it, and the write-back
    between them."""

    data_dir: str = setting(default_factory=default_data_dir, metavar="DIR")
    """Directory of the disk tier and node state, locked against a second node (by default
    lmcache-mesh under $XDG_DATA_HOME, else under ~/.local/share)."""
    memory_bytes: int = setting(1 << 30, key="memory")
    """Memory tier budget in bytes, e.g. 512MiB or 4GiB (S3-FIFO eviction; evictions are
    written back to disk). More: more hits at memory speed, less memory for the engine."""
    disk_bytes: int = setting(4 << 30, key="disk")
    """Disk tier budget in bytes, e.g. 4GiB (LRU eviction); 0 turns the disk tier off. More:
    more hits survive eviction from memory and restarts, at disk speed."""
    writeback_queue_bytes: int = setting(256 << 20, key="writeback-queue")
    """Bytes of memory evictions queued for the disk writer; beyond it write-backs are dropped
    (counted). More: fewer drops under bursts, more memory held by evicted chunks."""
    persist_on_shutdown: bool = True
    """On a clean stop, write the memory tier back to disk; off: a faster stop that loses what
    only memory held."""
    shm_dir: str = setting("/dev/shm", metavar="DIR")
    """tmpfs directory of the shared-memory arena holding the memory tier: engines on this host
    (any that can open the file, which only this node's user can) read hits from it and write
    chunks into it instead of sending them through a socket. "" (or a directory without room
    for the memory budget) turns it off: chunks then travel as socket frames."""

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "disk_bytes", "writeback_queue_bytes"):
            _check_range(self, f"storage.{name}", 0)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    """Bounds on what one request, one client and all of them together may ask of the node;
    past them a request gets TOO_LARGE or BUSY instead of taking the node's memory."""

    max_record_bytes: int = setting(256 << 20, key="max-record")
    """Largest chunk payload accepted, in bytes; larger PUTs get TOO_LARGE. Must hold one chunk
    of the engines' KV (256 tokens of a 70B-class model in bf16: 80 MiB); engine adapters
    check it when they start. More lets one request pin more memory."""
    max_header_bytes: int = setting(1 << 20, key="max-header")
    """Largest request header accepted (a msgpack frame), in bytes."""
    max_request_bytes: int = setting(256 << 20, key="max-request")
    """Largest sum of payloads in one request or reply, in bytes (also bounds one WebRTC
    message); at least max-record. A longer hit comes back in several replies, never as misses."""
    max_keys_per_request: int = setting(4096, key="max-keys")
    """Most keys or records in one request. More: fewer round trips for long prompts, more work
    per request."""
    max_inflight_requests: int = setting(256, key="max-inflight")
    """Requests that wait (disk reads, peers) at once across all clients; past it, BUSY at
    once. More: more parallel slow requests, more memory and tasks held."""
    max_inflight_per_peer: int = 64
    """Requests one party (a client key; without keys, a sending host on tcp://; a connection
    for nodes and on ipc://) may have waiting on disk or peers; more get BUSY, so nobody takes
    every slot."""
    max_inflight_bytes_per_peer: int = 1 << 30
    """Reply bytes queued for one party (a client key; without keys, a sending host on
    tcp://, a connection on ipc://) and not sent yet; past it its GETs get BUSY. Bounds the
    memory a slow reader holds."""
    max_inflight_bytes: int = 4 << 30
    """Reply bytes queued for all parties together; past it GETs get BUSY. Bounds what many
    slow readers hold."""
    lease_seconds: int = setting(30, key="lease-timeout")
    """Seconds a shared-memory read (or a slot reserved for a write, or a save announced
    before it lands) stays valid unless released (or committed) sooner: what an engine that
    was killed can hold. Chunks being saved are visible to lookups meanwhile."""

    def __post_init__(self) -> None:
        for f in (
            "max_record_bytes",
            "max_header_bytes",
            "max_request_bytes",
            "max_keys_per_request",
            "max_inflight_requests",
            "max_inflight_per_peer",
            "max_inflight_bytes_per_peer",
            "max_inflight_bytes",
            "lease_seconds",
        ):
            _check_range(self, f"limits.{f}", 1)
        if self.max_request_bytes < self.max_record_bytes:
            raise ValueError(
                f"limits.max_request_bytes ({self.max_request_bytes}) must be at least limits.max_record_bytes "
                f"({self.max_record_bytes}): a request must be able to carry one record"
            )


@dataclass(frozen=True, slots=True)
class MeshSettings:
    """How the node takes part in the mesh: its zone, its seeds, the address peers use, chunk
    replication and membership timings."""

    zone: str = "default"
    """Failure zone (rack, site); replicas go to distinct zones where possible."""
    join: tuple[str, ...] = setting((), metavar="ADDR")
    """Seed node addresses of the mesh to join, tcp://HOST:PORT (NAME@tcp://HOST:PORT with
    CurveZMQ: NAME as in the allow-list). None: a mesh of one, until `lmcache-node join`."""
    advertise: str = setting("", metavar="ADDR")
    """Address peers use to reach this node; default: the first tcp:// listen address
    (listening on 0.0.0.0: this machine's address on its outbound route)."""
    replicas: int = 2
    """Copies of each chunk kept on its ring owners (distinct zones where possible), 1-16.
    More: chunks survive more failures, at that many times the mesh's storage and traffic."""
    profile: str = setting("lan", key="mesh-profile", metavar="PROFILE")
    """Membership timings: lan (1 s probes), wan (5 s, for edge links) or local (0.2 s, one
    machine). Faster: failures found sooner, more probe traffic and false suspicions on slow
    links."""
    nat: bool = False
    """Behind NAT: accept no inbound peer connections; reach the mesh through the first join
    seed (the relay) and WebRTC."""
    wire_codec: str = setting("auto", metavar="CODEC")
    """How raw chunks travel from peers: auto (re-encoded losslessly, zstd, for peers whose
    measured bandwidth is below about 57 MB/s, where the bytes saved outweigh encoding and
    decoding, and over WebRTC), raw (always as stored) or zstd (always)."""

    def __post_init__(self) -> None:
        _check_range(self, "mesh.replicas", 1, 16)
        if self.wire_codec not in WIRE_CODECS:
            raise ValueError(
                f"mesh.wire_codec must be one of {', '.join(WIRE_CODECS)}, got {self.wire_codec!r}"
            )
        if self.profile not in MESH_PROFILES:
            raise ValueError(f"mesh.profile must be one of {', '.join(MESH_PROFILES)}, got {self.profile!r}")
        for ep in (*(split_seed(j)[1] for j in self.join), *([self.advertise] if self.advertise else [])):
            if not ep.startswith("tcp://"):
                raise ValueError(f"mesh.join/advertise: peer address {ep!r} must be tcp://HOST:PORT")
        if self.nat and not self.join:
            raise ValueError("mesh.nat: a node behind NAT needs --join SEED (its first relay)")
        if self.nat and self.advertise:
            raise ValueError("mesh.nat: a node behind NAT has no address to advertise (drop --advertise)")


@dataclass(frozen=True, slots=True)
class WebRTCSettings:
    """WebRTC links between nodes that cannot reach each other directly (NAT): ICE servers,
    candidate addresses, channels, and the secret members prove themselves with."""

    mesh_secret: str = setting("", metavar="SECRET")
    """Shared secret members prove themselves with, the same on every node: every gossip
    datagram carries an HMAC of it (others are dropped, counted in status), and WebRTC peers
    an HMAC bound to the DTLS session. Empty: unauthenticated gossip, and a WebRTC peer need
    only be a live member. With CurveZMQ the keys authenticate instead."""
    ice_servers: tuple[str, ...] = setting((), metavar="URL")
    """STUN/TURN servers for WebRTC, stun:HOST:PORT or turn:HOST:PORT; none: host candidates
    only (a LAN)."""
    turn_username: str = setting("", metavar="USER")
    """TURN user name."""
    turn_password: str = setting("", metavar="PASSWORD")
    """TURN password."""
    host_addresses: tuple[str, ...] = setting((), key="webrtc-host-addresses", metavar="ADDR")
    """Local addresses offered as WebRTC host candidates (127.0.0.1 for loopback tests); none:
    every interface."""
    channels: int = setting(4, key="webrtc-channels")
    """Data channels per WebRTC link, 1-64. More: large transfers spread over more SCTP
    streams, more per-link state."""

    def __post_init__(self) -> None:
        _check_range(self, "webrtc.channels", 1, 64)
        for url in self.ice_servers:
            if not url.startswith(("stun:", "turn:", "turns:")):
                raise ValueError(f"webrtc.ice_servers: {url!r} must be a stun:, turn: or turns: URL")


@dataclass(frozen=True, slots=True)
class SecuritySettings:
    """CurveZMQ on tcp://: this node's key pair and the allow-list of keys that may connect."""

    curve: str = setting("auto", metavar="MODE")
    """CurveZMQ on tcp://: auto (on when a key or allow-list is given or exists), on, or off."""
    key_file: str = setting("", key="key", metavar="FILE")
    """This node's CurveZMQ key pair (lmcache-node keygen); default: DATA_DIR/node.key_secret."""
    authorized_keys: str = setting("", metavar="FILE")
    """Allow-list of public keys that may connect (reread on SIGHUP); default:
    DATA_DIR/authorized_keys."""
    insecure: bool = False
    """Listen on a non-loopback address with neither CurveZMQ nor a mesh secret (a closed
    network); without it such a node refuses to start. Anyone who can reach the port may
    gossip, read and write."""

    def __post_init__(self) -> None:
        if self.curve not in CURVE_MODES:
            raise ValueError(f"security.curve must be one of {', '.join(CURVE_MODES)}, got {self.curve!r}")


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """The Prometheus endpoint (/metrics)."""

    port: int = setting(0, key="metrics-port", metavar="PORT")
    """Serve Prometheus metrics on this HTTP port; 0 = off."""
    host: str = setting("127.0.0.1", key="metrics-host", metavar="HOST")
    """Address the metrics endpoint binds (0.0.0.0: every interface, for a scraper elsewhere)."""

    def __post_init__(self) -> None:
        _check_range(self, "metrics.port", 0, 65535)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Settings of one cache node (the daemon, or an embedded :class:`Node`)."""

    name: str = ""
    """Node name, unique in the mesh; default: HOST:PORT."""
    listen: tuple[str, ...] = setting((f"tcp://127.0.0.1:{DEFAULT_PORT}",), metavar="ADDR")
    """Endpoints to serve on, tcp://HOST:PORT or ipc:///PATH (a tcp port of 0 picks a free
    one)."""
    storage: StorageSettings = field(default_factory=StorageSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    mesh: MeshSettings = field(default_factory=MeshSettings)
    webrtc: WebRTCSettings = field(default_factory=WebRTCSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    def __post_init__(self) -> None:
        for ep in self.listen:
            if not (ep.startswith("tcp://") or ep.startswith("ipc://")):
                raise ValueError(f"listen: endpoint {ep!r} must start with tcp:// or ipc://")

    @property
    def key_path(self) -> Path:
        key_file = self.security.key_file
        return Path(key_file).expanduser() if key_file else self.storage.data_path / "node.key_secret"

    @property
    def authorized_keys_path(self) -> Path:
        if self.security.authorized_keys:
            return Path(self.security.authorized_keys).expanduser()
        return self.storage.data_path / "authorized_keys"

    def curve_enabled(self) -> bool:
        """Whether tcp:// runs CurveZMQ: on, off, or (auto) when a key or allow-list is given
        or exists — a mistyped path must fail loudly, never fall back to no authentication."""
        sec = self.security
        if sec.curve != "auto":
            return sec.curve == "on"
        return bool(sec.key_file or sec.authorized_keys) or any(
            p.exists() for p in (self.key_path, self.authorized_keys_path)
        )

    def with_(self, **changes: Any) -> NodeConfig:
        """This config with ``changes`` by field name: a section, or any one setting
        (``cfg.with_(disk_bytes=0)`` changes ``storage.disk_bytes``)."""
        return SETTINGS.replace(self, changes)

    # loading

    @classmethod
    def load(
        cls,
        config_file: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        overrides_from: str = "--",
    ) -> NodeConfig:
        """Merge TOML file < environment (``None``: ``os.environ``) < ``overrides`` (flags, by
        key) over the defaults. Raises ValueError naming the source, the key and the bad value."""
        return SETTINGS.load(config_file, env, overrides, overrides_from)

    @classmethod
    def from_environment(
        cls, config_file: str | None = None, overrides: Mapping[str, Any] | None = None
    ) -> NodeConfig:
        """As ``lmcache-node run`` configures a node: the config file (``config_file``, else
        ``LMCACHE_MESH_CONFIG``) < ``LMCACHE_MESH_*`` < ``overrides`` (flags)."""
        return cls.load(config_file or os.environ.get(ENV_PREFIX + "CONFIG"), os.environ, overrides)

    @classmethod
    def default_of(cls, name: str) -> Any:
        """The default of the setting whose field is ``name`` (``memory_bytes``)."""
        return SETTINGS.default_of(name)

    @classmethod
    def sample_toml(cls, values: Mapping[str, Any] | None = None) -> str:
        """A config file documenting every setting: ``values`` (by key) are set, every other
        setting is shown commented out at its default."""
        return SETTINGS.sample_toml(SAMPLE_HEADER, values)


SETTINGS: Schema[NodeConfig] = Schema(NodeConfig, ENV_PREFIX, NOT_SETTINGS)
"""Flags, environment variables, TOML keys, ``--help`` and the sample file of NodeConfig."""

SAMPLE_HEADER = """\
lmcache-node configuration (lmcache-node run --config FILE, or LMCACHE_MESH_CONFIG).
Every setting is also a flag (--KEY) and an environment variable (LMCACHE_MESH_KEY);
flags win over the environment, which wins over this file. The sections below are the
canonical layout; flat keys are read too, and a file with a [node] table (as earlier
releases wrote them) is read from that table only.
"""
