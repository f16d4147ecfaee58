"""NodeConfig: every setting of a cache node, with its one default.

CLI flags, ``LMCACHE_MESH_<KEY>`` environment variables and TOML keys are all derived from
the fields below (the key is the flag name; TOML accepts ``data-dir`` or ``data_dir``).
Precedence: flags > environment > TOML file > defaults.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .sizes import format_size, parse_size

log = logging.getLogger(__name__)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line else lines


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file as a table; ValueError naming ``what`` and the file if unreadable or invalid."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid TOML: {exc}") from None


def split_seed(seed: str) -> tuple[str, str]:
    """``NAME@tcp://HOST:PORT`` → (name, address); a bare address has no name ("")."""
    name, at, address = seed.partition("@")
    return (name, address) if at and "://" not in name else ("", seed)


if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "LMCACHE_MESH_"
NOT_SETTINGS = frozenset({"CONFIG", "SKIP_ENGINES", "SKIP_NETNS"})
"""``LMCACHE_MESH_*`` variables that are not node settings: the config file's path and the
test suite's switches"""
DEFAULT_PORT = 7700


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "lmcache-mesh")


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


def _parse_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"expected a list of strings (or a comma-separated string), got {value!r}")


def _parse_int(value: Any) -> int:
    if isinstance(value, (bool, float)):
        raise ValueError(f"expected an integer, got {value!r}")
    return int(value)


def _opt(
    key: str, help: str, parse: Callable[[Any], Any] = str, metavar: str | None = None, **kw: Any
) -> Any:
    return field(metadata={"key": key, "help": help, "parse": parse, "metavar": metavar}, **kw)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Settings of one cache node (the daemon, or an embedded :class:`Node`)."""

    name: str = _opt("name", "node name, unique in the mesh; default: HOST:PORT", default="")
    listen: tuple[str, ...] = _opt(
        "listen",
        "endpoint(s) to serve on, tcp://HOST:PORT or ipc:///PATH; repeat or comma-separate",
        _parse_list,
        "ADDR",
        default=(f"tcp://127.0.0.1:{DEFAULT_PORT}",),
    )
    data_dir: str = _opt(
        "data-dir",
        "directory of the disk tier and node state",
        metavar="DIR",
        default_factory=default_data_dir,
    )
    memory_bytes: int = _opt(
        "memory", "memory tier budget, e.g. 512MiB, 4GiB", parse_size, "SIZE", default=1 << 30
    )
    disk_bytes: int = _opt(
        "disk", "disk tier budget, e.g. 4GiB; 0 turns the disk tier off", parse_size, "SIZE", default=4 << 30
    )
    zone: str = _opt("zone", "failure zone (rack, site); replicas go to distinct zones", default="default")
    join: tuple[str, ...] = _opt(
        "join",
        "seed node address(es) of the mesh to join, tcp://HOST:PORT (NAME@tcp://HOST:PORT with "
        "CurveZMQ: NAME as in the allow-list); repeat or comma-separate",
        _parse_list,
        "ADDR",
        default=(),
    )
    advertise: str = _opt(
        "advertise",
        "address peers use to reach this node; default: the first tcp:// listen address "
        "(listening on 0.0.0.0: this machine's address on its outbound route)",
        metavar="ADDR",
        default="",
    )
    replicas: int = _opt(
        "replicas",
        "copies of each chunk kept on its ring owners (distinct zones where possible)",
        _parse_int,
        "N",
        default=2,
    )
    mesh_profile: str = _opt(
        "mesh-profile",
        "membership timings: lan, wan (edge links) or local (one machine)",
        metavar="PROFILE",
        default="lan",
    )
    nat: bool = _opt(
        "nat",
        "behind NAT: accept no inbound peer connections; reach the mesh through a --join seed "
        "(the relay) and WebRTC",
        _parse_bool,
        "BOOL",
        default=False,
    )
    mesh_secret: str = _opt(
        "mesh-secret",
        "shared secret WebRTC peers prove membership with (HMAC bound to the DTLS session); "
        "empty: a peer need only be a live member",
        metavar="SECRET",
        default="",
    )
    ice_servers: tuple[str, ...] = _opt(
        "ice-servers",
        "STUN/TURN servers for WebRTC, stun:HOST:PORT or turn:HOST:PORT; none: host candidates only",
        _parse_list,
        "URL",
        default=(),
    )
    turn_username: str = _opt("turn-username", "TURN user name", metavar="USER", default="")
    turn_password: str = _opt("turn-password", "TURN password", metavar="PASSWORD", default="")
    webrtc_host_addresses: tuple[str, ...] = _opt(
        "webrtc-host-addresses",
        "local addresses offered as WebRTC host candidates (127.0.0.1 for loopback tests); "
        "none: every interface",
        _parse_list,
        "ADDR",
        default=(),
    )
    webrtc_channels: int = _opt(
        "webrtc-channels", "data channels per WebRTC link", _parse_int, "N", default=4
    )
    curve: str = _opt(
        "curve",
        "CurveZMQ on tcp://: auto (on when a key or allow-list is given or exists), on, or off",
        metavar="MODE",
        default="auto",
    )
    key_file: str = _opt(
        "key",
        "this node's CurveZMQ key pair (lmcache-node keygen); default: DATA_DIR/node.key_secret",
        metavar="FILE",
        default="",
    )
    authorized_keys: str = _opt(
        "authorized-keys",
        "allow-list of public keys that may connect (reread on SIGHUP); default: DATA_DIR/authorized_keys",
        metavar="FILE",
        default="",
    )
    metrics_port: int = _opt(
        "metrics-port", "serve Prometheus metrics on this HTTP port; 0 = off", _parse_int, "PORT", default=0
    )
    metrics_host: str = _opt(
        "metrics-host", "address the metrics endpoint binds", metavar="HOST", default="127.0.0.1"
    )
    max_record_bytes: int = _opt(
        "max-record",
        "largest chunk payload accepted; larger PUTs get a TOO_LARGE error",
        parse_size,
        "SIZE",
        default=64 << 20,
    )
    max_header_bytes: int = _opt(
        "max-header", "largest request header accepted (msgpack frame)", parse_size, "SIZE", default=1 << 20
    )
    max_request_bytes: int = _opt(
        "max-request", "largest sum of payloads in one request", parse_size, "SIZE", default=256 << 20
    )
    max_keys_per_request: int = _opt(
        "max-keys", "most keys or records in one request", _parse_int, "N", default=4096
    )
    max_inflight_requests: int = _opt(
        "max-inflight",
        "requests that wait (disk reads, peers) at once across all clients; past it, BUSY at once",
        _parse_int,
        "N",
        default=256,
    )
    max_inflight_per_peer: int = _opt(
        "max-inflight-per-peer",
        "requests one connection may have waiting (disk, mesh); more get BUSY",
        _parse_int,
        "N",
        default=64,
    )
    max_inflight_bytes_per_peer: int = _opt(
        "max-inflight-bytes-per-peer",
        "payload bytes one connection may have waiting; more get BUSY",
        parse_size,
        "SIZE",
        default=1 << 30,
    )
    writeback_queue_bytes: int = _opt(
        "writeback-queue",
        "bytes of memory evictions queued for the disk writer; beyond it write-backs are dropped (counted)",
        parse_size,
        "SIZE",
        default=256 << 20,
    )
    persist_on_shutdown: bool = _opt(
        "persist-on-shutdown",
        "on clean shutdown, write the memory tier back to disk",
        _parse_bool,
        "BOOL",
        default=True,
    )

    def __post_init__(self) -> None:
        if not 1 <= self.replicas <= 16:
            raise ValueError(f"replicas must be in [1, 16], got {self.replicas}")
        if self.mesh_profile not in ("lan", "wan", "local"):
            raise ValueError(f"mesh_profile must be lan, wan or local, got {self.mesh_profile!r}")
        for ep in (*(split_seed(j)[1] for j in self.join), *([self.advertise] if self.advertise else [])):
            if not ep.startswith("tcp://"):
                raise ValueError(f"join/advertise: peer address {ep!r} must be tcp://HOST:PORT")
        for ep in self.listen:
            if not (ep.startswith("tcp://") or ep.startswith("ipc://")):
                raise ValueError(f"listen: endpoint {ep!r} must start with tcp:// or ipc://")
        for name in ("memory_bytes", "disk_bytes", "writeback_queue_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in (
            "max_record_bytes",
            "max_header_bytes",
            "max_request_bytes",
            "max_keys_per_request",
            "max_inflight_requests",
            "max_inflight_per_peer",
            "max_inflight_bytes_per_peer",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.nat and not self.join:
            raise ValueError("nat: a node behind NAT needs --join SEED (its first relay)")
        if self.nat and self.advertise:
            raise ValueError("nat: a node behind NAT has no address to advertise (drop --advertise)")
        if not 1 <= self.webrtc_channels <= 64:
            raise ValueError(f"webrtc_channels must be in [1, 64], got {self.webrtc_channels}")
        for url in self.ice_servers:
            if not url.startswith(("stun:", "turn:", "turns:")):
                raise ValueError(f"ice_servers: {url!r} must be a stun:, turn: or turns: URL")
        if self.curve not in ("auto", "on", "off"):
            raise ValueError(f"curve must be auto, on or off, got {self.curve!r}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def key_path(self) -> Path:
        return Path(self.key_file).expanduser() if self.key_file else self.data_path / "node.key_secret"

    @property
    def authorized_keys_path(self) -> Path:
        if self.authorized_keys:
            return Path(self.authorized_keys).expanduser()
        return self.data_path / "authorized_keys"

    def curve_enabled(self) -> bool:
        """Whether tcp:// runs CurveZMQ: on, off, or (auto) when a key or allow-list is given
        or exists — a mistyped path must fail loudly, never fall back to no authentication."""
        if self.curve != "auto":
            return self.curve == "on"
        return bool(self.key_file or self.authorized_keys) or any(
            p.exists() for p in (self.key_path, self.authorized_keys_path)
        )

    # loading

    @classmethod
    def options(cls) -> list[tuple[str, str, dict[str, Any]]]:
        """``(field name, key, metadata)`` for every setting, in declaration order."""
        return [(f.name, f.metadata["key"], dict(f.metadata)) for f in fields(cls)]

    @classmethod
    def default_of(cls, name: str) -> Any:
        f = next(f for f in fields(cls) if f.name == name)
        if f.default is MISSING:
            return f.default_factory()  # type: ignore[operator]
        return f.default

    @classmethod
    def _closest_key(cls, key: str) -> str | None:
        """The setting an unknown ``key`` most likely meant, if any is close."""
        close = difflib.get_close_matches(key, [k for _, k, _ in cls.options()], n=1)
        return close[0] if close else None

    @classmethod
    def _known_key(cls, key: str, source: str) -> str:
        """``key`` with ``_`` as ``-``; ValueError naming the closest setting if unknown."""
        keys = [k for _, k, _ in cls.options()]
        norm = key.strip().replace("_", "-")
        if norm not in keys:
            close = cls._closest_key(norm)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise ValueError(f"{source}: unknown setting {key!r}{hint}; known: {', '.join(sorted(keys))}")
        return norm

    @classmethod
    def value_from_text(cls, key: str, raw: str) -> tuple[str, Any]:
        """``(key, value)`` for ``KEY=VALUE`` as typed on a command line, for a config file.

        Text is taken as the setting's type reads it, never as a bare TOML value (which would
        turn ``2024#prod`` into 2024, ``0x1F`` into 31 or ``true`` into a boolean name):
        integers and booleans become TOML integers and booleans, everything else stays text as
        typed (a size as ``4GiB``); a value starting with a quote or ``[`` is TOML (a quoted
        string, a list). ValueError if the setting is unknown or the value is not one it takes.
        """
        norm = cls._known_key(key, f"--set {key}")
        meta = next(m for _, k, m in cls.options() if k == norm)
        text = raw.strip()
        value: Any = text
        if text[:1] in ("'", '"', "["):
            try:
                value = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"--set {norm}: {text!r:.60} is not a TOML string or list: {exc}") from None
        try:
            parsed = meta["parse"](value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--set {norm}: bad value for {norm!r}: {exc}") from None
        return norm, parsed if meta["parse"] in (_parse_int, _parse_bool) else value

    @classmethod
    def load(
        cls,
        config_file: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        overrides_from: str = "--",
    ) -> NodeConfig:
        """Merge TOML file < environment < ``overrides`` (flags, by key) over the defaults.

        Raises ValueError naming the source, the key and the bad value.
        """
        by_key = {key: (name, meta) for name, key, meta in cls.options()}
        values: dict[str, Any] = {}

        def apply(source: str, key: str, raw: Any) -> None:
            norm = cls._known_key(key, source)
            name, meta = by_key[norm]
            try:
                values[name] = meta["parse"](raw)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{source}: bad value for {norm!r}: {exc}") from exc

        if config_file is not None:
            table = read_toml(config_file, "config file")
            table = table.get("node", table)
            for key, raw in table.items():
                apply(f"config file {config_file}", key, raw)
        for var, raw in (os.environ if env is None else env).items():
            if var.startswith(ENV_PREFIX) and var[len(ENV_PREFIX) :] not in NOT_SETTINGS:
                key = var[len(ENV_PREFIX) :].lower().replace("_", "-")
                if key not in by_key:
                    # The environment is ambient (orchestrators add variables of their own,
                    # e.g. Kubernetes service links): warn, where a file or a flag would fail.
                    close = cls._closest_key(key)
                    hint = f" (did you mean {ENV_PREFIX}{close.upper().replace('-', '_')}?)" if close else ""
                    log.warning("ignoring unknown environment variable %s%s", var, hint)
                    continue
                apply(f"environment {var}", key, raw)
        for key, raw in (overrides or {}).items():
            apply(f"{overrides_from}{key}", key, raw)
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"invalid configuration: {exc}") from exc

    @classmethod
    def from_environment(
        cls, config_file: str | None = None, overrides: Mapping[str, Any] | None = None
    ) -> NodeConfig:
        """As ``lmcache-node run`` configures a node: the config file (``config_file``, else
        ``LMCACHE_MESH_CONFIG``) < ``LMCACHE_MESH_*`` < ``overrides`` (flags)."""
        return cls.load(config_file or os.environ.get(ENV_PREFIX + "CONFIG"), os.environ, overrides)

    def with_(self, **changes: Any) -> NodeConfig:
        return replace(self, **changes)

    @classmethod
    def sample_toml(cls, values: Mapping[str, Any] | None = None) -> str:
        """A config file documenting every setting: ``values`` (by key) are set, every other
        setting is shown commented out at its default."""
        values = {cls._known_key(k, "sample"): v for k, v in (values or {}).items()}
        lines = [
            "# lmcache-node configuration (lmcache-node run --config FILE, or LMCACHE_MESH_CONFIG).",
            "# Every setting is also a flag (--KEY) and an environment variable (LMCACHE_MESH_KEY);",
            "# flags win over the environment, which wins over this file.",
            "",
            "[node]",
        ]
        for name, key, meta in cls.options():
            lines.append("")
            lines.extend(f"# {text}" for text in _wrap(str(meta["help"]), 88))
            if key in values:
                lines.append(f"{key} = {_toml_value(values[key])}")
            else:
                default = cls.default_of(name)
                if meta["parse"] is parse_size:
                    default = format_size(default).replace(" ", "").replace(".0", "")
                lines.append(f"# {key} = {_toml_value(default)}")
        text = "\n".join(lines) + "\n"
        # a file that would not load is not written: check what `run --config` will read
        cls.load(env={}, overrides=tomllib.loads(text)["node"], overrides_from="--set ")
        return text
