"""``lmcache-node``: run a cache node, or ask one for its status.

    lmcache-node run [--config FILE] [--listen ADDR ...] [--data-dir DIR] [--memory SIZE] ...
    lmcache-node join SEED_ADDR [--node ADDR]
    lmcache-node status [--node ADDR] [--json]
    lmcache-node keygen [--name NAME] [--role node|client|admin] [--tenant T] [--out FILE]
    lmcache-node sample-config [--set KEY=VALUE ...]

``join`` and ``status`` take ``--key FILE --server-key KEY`` to reach a node over CurveZMQ.

Every ``run`` flag is also an ``LMCACHE_MESH_<KEY>`` environment variable and a TOML key;
flags win over the environment, which wins over the file (``--config`` or
``LMCACHE_MESH_CONFIG``), which wins over the defaults.
"""

from __future__ import annotations

import argparse
import difflib
import json
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmcache_mesh.node.client import Client
from lmcache_mesh.node.config import DEFAULT_PORT, ENV_PREFIX, SETTINGS, NodeConfig
from lmcache_mesh.node.errors import MeshError
from lmcache_mesh.node.keyring import (
    Role,
    check_tenant,
    public_key_path,
    read_key_pair,
    read_public_key,
    write_key_pair,
)
from lmcache_mesh.node.node import VERSION
from lmcache_mesh.node.sizes import format_count, format_size
from lmcache_mesh.transports import TransportError
from lmcache_mesh.transports.curve import CurveClient


def build_parser() -> tuple[argparse.ArgumentParser, Any]:
    """The ``lmcache-node`` parser and its subcommand registry (engines add ``serve`` to it)."""
    parser = argparse.ArgumentParser(prog="lmcache-node", description="lmcache-mesh cache node")
    parser.add_argument("--version", action="version", version=f"lmcache-node {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a cache node in the foreground (SIGTERM/SIGINT stop it cleanly)")
    run.add_argument("--config", metavar="FILE", help=f"TOML config file (also {ENV_PREFIX}CONFIG)")
    SETTINGS.add_arguments(run)  # one flag per NodeConfig setting, help from its docstring

    sample = sub.add_parser(
        "sample-config", help="print a config file documenting every setting at its default"
    )
    sample.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help='set KEY in it, as the flag --KEY would take VALUE (a list: ["a", "b"])',
    )
    keygen = sub.add_parser("keygen", help="write a CurveZMQ key pair and print its allow-list line")
    keygen.add_argument(
        "--name",
        default="",
        help="name in the allow-list; a node's is its mesh name (default: the host name)",
    )
    keygen.add_argument(
        "--role",
        choices=[r.value for r in Role],
        default="node",
        help="what the key may do (default: %(default)s)",
    )
    keygen.add_argument("--tenant", default="", help="client keys: the tenant its requests run in (* = any)")
    keygen.add_argument(
        "--out",
        metavar="FILE",
        help="key pair file (mode 600; never overwritten); the public half goes next to it "
        "without _secret (default: DATA_DIR/node.key_secret for a node, ./NAME.key_secret otherwise)",
    )
    keygen.add_argument(
        "--data-dir", metavar="DIR", default=None, help="node data directory (default: the node's)"
    )

    join = sub.add_parser("join", help="make a running node join the mesh that SEED_ADDR belongs to")
    join.add_argument(
        "seed", nargs="+", metavar="SEED_ADDR", help="address of a mesh member, tcp://HOST:PORT"
    )
    join.add_argument(
        "--node",
        default=f"tcp://127.0.0.1:{DEFAULT_PORT}",
        metavar="ADDR",
        help="node to instruct (default: %(default)s)",
    )
    _curve_arguments(join)
    join.add_argument(
        "--wait",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for the join (default: %(default)s)",
    )

    status = sub.add_parser("status", help="show a running node's members, tiers and counters")
    status.add_argument(
        "--node",
        default=f"tcp://127.0.0.1:{DEFAULT_PORT}",
        metavar="ADDR",
        help="node to ask (default: %(default)s)",
    )
    status.add_argument(
        "--json", action="store_true", help="print the stable JSON document instead of a table"
    )
    _curve_arguments(status)
    status.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        metavar="S",
        help="seconds to wait for the node (default: %(default)s)",
    )
    return parser, sub


def _curve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key", metavar="FILE", help="CurveZMQ key pair to connect with (an admin or node key)")
    p.add_argument("--server-key", metavar="KEY", help="the node's public key (Z85 text or its .key file)")


def client_of(args: argparse.Namespace, timeout_s: float) -> Client:
    """A client of ``args.node``, over CurveZMQ when ``--key``/``--server-key`` are given."""
    if bool(args.key) != bool(args.server_key):
        raise ValueError("CurveZMQ needs both --key FILE and --server-key KEY")
    curve = None
    if args.key:
        curve = CurveClient(read_key_pair(args.key)[1], read_public_key(args.server_key))
    return Client(args.node, timeout_s=timeout_s, curve=curve)


def _cmd_keygen(args: argparse.Namespace) -> int:
    name = args.name or socket.gethostname()
    if args.tenant and args.role == "node":
        raise ValueError("a node key serves every tenant: --tenant is for client keys")
    if args.tenant and args.tenant != "*":
        check_tenant(args.tenant)
    if args.out:
        out = Path(args.out)
    elif args.role == "node":
        # where `run` looks for it, as its flags, environment and config file set it
        flags = {"data-dir": args.data_dir} if args.data_dir else None
        out = NodeConfig.from_environment(None, flags).key_path
    else:
        out = Path(f"{name}.key_secret")
    if out.exists():
        raise ValueError(f"{out} exists; keys are never overwritten (remove it first, or choose --out)")
    keys = write_key_pair(out, name)
    tenant = f" tenant={args.tenant}" if args.tenant else ""
    print(f"wrote {out} (secret, mode 600) and {public_key_path(out)} (public)")
    print("add this line to the authorized_keys file of every node:")
    print(f"{keys.public} {name} {args.role}{tenant}")
    return 0


def _cmd_sample_config(args: argparse.Namespace) -> int:
    values: dict[str, Any] = {}
    for item in args.set:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        key, value = SETTINGS.from_text(key, raw)
        values[key] = value
    print(NodeConfig.sample_toml(values), end="")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .daemon import configure_logging, run

    configure_logging()

    code: int = run(NodeConfig.from_environment(args.config, SETTINGS.flag_values(args)))
    return code


def _print_status(s: dict[str, Any]) -> None:
    from .tables import Column, add_rows, render, table  # not for --json: health checks stay quick

    node = s["node"]
    print(
        f"node     {node['name']}  {node['address']}  zone={node['zone']}  v{node['version']}  up {node['uptime_s']:.0f} s"
    )
    print("members")
    members = table(*map(Column, ("name", "address", "zone", "state", "reachability")), "ring")
    add_rows(
        members,
        (
            (
                m["name"],
                m["address"],
                m["zone"],
                m["state"],
                m["reachability"],
                f"{100 * m.get('ring_share', 0):.0f}%",
            )
            for m in s["members"]
        ),
    )
    print(render(members))
    print("tiers")
    tiers = table(Column("tier"), "used", "capacity", "held", "evicted")
    add_rows(
        tiers,
        (
            (
                name,
                format_size(t["used_bytes"]),
                format_size(t["capacity_bytes"]),
                format_count(t["entries"], "chunk"),
                format_count(t["evictions"], "eviction"),
            )
            for name, t in s["tiers"].items()
        ),
    )
    print(render(tiers))
    encoded = [
        (n, c, t) for n, tier in s["tiers"].items() for c, t in tier.get("codecs", {}).items() if c != "raw"
    ]
    if encoded:
        print("codecs   (chunks stored encoded: their bytes, and the raw KV they hold)")
        per_codec = table(Column("tier"), Column("codec"), "held", "stored", "raw", "ratio")
        add_rows(
            per_codec,
            (
                (tier, codec, format_count(t["records"], "chunk"), format_size(t["bytes"]),
                 format_size(t["raw_bytes"]), f"{t['bytes'] / t['raw_bytes']:.2f}" if t["raw_bytes"] else "-")
                for tier, codec, t in encoded
            ),
        )  # fmt: skip
        print(render(per_codec))
    mesh = s.get("mesh", {})
    relay, webrtc = mesh.get("relay"), mesh.get("webrtc")
    if relay:
        state = "attached" if relay["attached"] else "NOT attached"
        print(f"behind NAT: relayed by {relay['via']} ({state}, {relay['switches']} switches)")
    if webrtc and (webrtc["links_out"] or webrtc["links_in"]):
        print(
            f"webrtc   links to {', '.join(webrtc['links_out']) or '-'}; {webrtc['links_in']} from peers; "
            f"{format_size(webrtc['bytes_sent'])} sent, {format_size(webrtc['bytes_received'])} received"
        )
    peers = mesh.get("peers", {})
    if peers:
        print("peers    (estimates from real transfers)")
        estimates = table(Column("peer"), "latency", "bandwidth")
        add_rows(
            estimates,
            (
                (
                    name,
                    "-" if e["rtt_ms"] is None else f"{e['rtt_ms']:.2f} ms",
                    "-" if e["mb_per_s"] is None else f"{e['mb_per_s']:.1f} MB/s",
                )
                for name, e in peers.items()
            ),
        )
        print(render(estimates))
    engines = mesh.get("engines", {})
    if engines:
        print("engines  (their own KV caches, from KV events)")
        held = table(Column("engine"), "held")
        add_rows(held, ((holder, format_count(n, "chunk")) for holder, n in sorted(engines.items())))
        print(render(held))
    c = s["counters"]
    lookups = c["hits_memory"] + c["hits_disk"] + c["misses"]
    rate = f"{100 * (c['hits_memory'] + c['hits_disk']) / lookups:.1f}%" if lookups else "-"
    print(
        f"counters hits memory={c['hits_memory']} disk={c['hits_disk']}  misses={c['misses']}  hit rate {rate}"
        f"  puts={c['puts']}  in={format_size(c['bytes_in'])}  out={format_size(c['bytes_out'])}"
        f"  checksum failures={c['checksum_failures']}"
    )
    asked = c.get("lookup_keys", 0)
    if asked:
        print(
            f"lookups  {c['lookups']} requests, {asked} chunks: {c['lookup_hit_keys']} cached, "
            f"{c['lookup_missed_keys']} not  (prefix hit rate {100 * c['lookup_hit_keys'] / asked:.1f}%)"
        )
    if c.get("errors"):
        print("errors   " + "  ".join(f"{k}={v}" for k, v in sorted(c["errors"].items())))
    tenants = {t: v for t, v in s.get("tenants", {}).items() if t != "default"}
    if tenants:
        print("tenants  (chunks held, chunks asked for / found)")
        per_tenant = table(Column("tenant"), Column("held"), "gets", "hits", "puts")
        add_rows(
            per_tenant,
            (
                (
                    tenant,
                    "  ".join(f"{tier}={n}" for tier, n in t["records"].items()) or "none",
                    t["requests"].get("gets", 0),
                    t["requests"].get("hits", 0),
                    t["requests"].get("puts", 0),
                )
                for tenant, t in tenants.items()
            ),
        )
        print(render(per_tenant))
    sec = s.get("security", {})
    if sec.get("curve"):
        print(
            f"security CurveZMQ on, {sec['allowed_keys']} keys allowed; refused {sec['connections_refused']} "
            f"connections, {sec['forbidden']} requests; {sec['busy']} busy"
        )
    else:
        proof = sec.get("membership_proof", "none")
        print(
            f"security CurveZMQ off; membership proof: {proof}; {sec.get('busy', 0)} busy"
            + ("; INSECURE (--insecure)" if sec.get("insecure") else "")
        )


def _cmd_status(args: argparse.Namespace) -> int:
    with client_of(args, args.timeout) as client:
        stats = client.stats()
    if args.json:
        json.dump(stats, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        _print_status(stats)
    return 0


def _cmd_join(args: argparse.Namespace) -> int:
    with client_of(args, min(args.wait, 5.0)) as client:
        before = {m["name"] for m in client.stats()["members"]}
        client.join(args.seed)
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline:
            members = client.stats()["members"]
            alive = [m for m in members if m["state"] == "alive"]
            if len(alive) > 1:
                new = sorted({m["name"] for m in alive} - before)
                print(
                    f"joined: {format_count(len(alive), 'member')} alive"
                    + (f" (new: {', '.join(new)})" if new else "")
                )
                return 0
            time.sleep(0.1)
    print(
        f"lmcache-node join: error: no member of {' '.join(args.seed)} answered within {args.wait:g} s",
        file=sys.stderr,
    )
    return 1


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run,
    "join": _cmd_join,
    "status": _cmd_status,
    "keygen": _cmd_keygen,
    "sample-config": _cmd_sample_config,
}


def _unrecognized(parser: argparse.ArgumentParser, command: str, extras: list[str]) -> None:
    """Report unknown arguments with the subcommand's usage (argparse's default shows the
    top-level one) and the closest flag it has."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub: argparse.ArgumentParser = action.choices[command]
    flags = [s for a in sub._actions for s in a.option_strings]
    unknown_flag = next((e.split("=", 1)[0] for e in extras if e.startswith("-")), "")
    close = difflib.get_close_matches(unknown_flag, flags, n=1) if unknown_flag else []
    hint = f" (did you mean {close[0]}?)" if close else ""
    sub.error(f"unrecognized arguments: {' '.join(extras)}{hint}")


def main(
    argv: Sequence[str] | None = None,
    parser: argparse.ArgumentParser | None = None,
    commands: Mapping[str, Callable[[argparse.Namespace], int]] | None = None,
) -> int:
    parser = parser or build_parser()[0]
    args, extras = parser.parse_known_args(argv)
    if extras:
        _unrecognized(parser, args.command, extras)
    try:
        return (commands or COMMANDS)[args.command](args)
    except (MeshError, TransportError, ValueError, OSError) as exc:
        print(f"lmcache-node {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
