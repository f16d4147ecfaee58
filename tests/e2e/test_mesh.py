"""Real daemons on 127.0.0.x forming a mesh over ZeroMQ."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

from lmcache_mesh.node import chunk_keys, namespace_id

from ..conftest import DaemonFactory
from ..helpers import Daemon, free_port, node_command, payload

PROFILE = ("--mesh-profile", "local")


def members(d: Daemon) -> dict[str, dict[str, Any]]:
    with d.client() as c:
        return {m["name"]: m for m in c.stats()["members"]}


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.1)
    return None


def start_node(factory: DaemonFactory, i: int, port: int, *extra: str) -> Daemon:
    host = f"127.0.0.{i}"
    return factory(
        "--name",
        f"node{i}",
        "--zone",
        f"z{i % 2}",
        "--disk",
        "0",
        *PROFILE,
        *extra,
        tcp=f"tcp://{host}:{port}",
        ipc=False,
    )


def test_five_daemons_join_detect_a_kill_and_rejoin(daemon_factory: DaemonFactory) -> None:
    ports = {i: free_port(f"127.0.0.{i}") for i in range(1, 6)}
    nodes = {1: start_node(daemon_factory, 1, ports[1])}
    seed = nodes[1].tcp
    for i in range(2, 6):
        nodes[i] = start_node(daemon_factory, i, ports[i], "--join", seed)

    def all_alive(expected: int) -> Callable[[], bool]:
        return lambda: all(
            sum(m["state"] == "alive" for m in members(d).values()) == expected for d in nodes.values()
        )

    assert wait_until(all_alive(5), timeout_s=20) is not None, {i: members(d) for i, d in nodes.items()}
    view = members(nodes[3])
    assert view["node5"]["address"] == nodes[5].tcp and view["node5"]["zone"] == "z1"
    assert abs(sum(m["ring_share"] for m in view.values()) - 1.0) < 0.01

    nodes[4].stop(signal.SIGKILL)
    killed = nodes.pop(4)
    took = wait_until(
        lambda: all(members(d)["node4"]["state"] == "dead" for d in nodes.values()), timeout_s=30
    )
    assert took is not None, {i: members(d)["node4"] for i, d in nodes.items()}
    dead_inc = members(nodes[1])["node4"]["incarnation"]

    nodes[4] = start_node(daemon_factory, 4, ports[4], "--join", seed)
    assert killed.tcp == nodes[4].tcp
    assert wait_until(all_alive(5), timeout_s=20) is not None
    assert members(nodes[2])["node4"]["incarnation"] > dead_inc


def test_graceful_stop_is_seen_as_left(daemon_factory: DaemonFactory) -> None:
    a = start_node(daemon_factory, 6, free_port("127.0.0.6"))
    b = start_node(daemon_factory, 7, free_port("127.0.0.7"), "--join", a.tcp)
    assert wait_until(lambda: members(a).get("node7", {}).get("state") == "alive", 20) is not None
    b.stop(signal.SIGTERM)
    assert b.proc.returncode == 0
    assert wait_until(lambda: members(a)["node7"]["state"] == "left", 10) is not None


def test_join_command_joins_a_running_node(daemon_factory: DaemonFactory) -> None:
    a = start_node(daemon_factory, 8, free_port("127.0.0.8"))
    b = start_node(daemon_factory, 9, free_port("127.0.0.9"))
    r = subprocess.run(
        node_command("join", a.tcp, "--node", b.tcp), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "joined: 2 members alive" in r.stdout
    assert wait_until(lambda: members(a).get("node9", {}).get("state") == "alive", 10) is not None


def test_a_chunk_put_on_one_node_is_found_everywhere_and_survives_its_node(
    daemon_factory: DaemonFactory,
) -> None:
    base = 20
    ports = {i: free_port(f"127.0.0.{i}") for i in range(base, base + 5)}
    nodes = {base: start_node(daemon_factory, base, ports[base])}
    for i in range(base + 1, base + 5):
        nodes[i] = start_node(daemon_factory, i, ports[i], "--join", nodes[base].tcp)
    assert wait_until(lambda: all(len(members(d)) == 5 for d in nodes.values()), 20) is not None
    time.sleep(1.0)  # let the rings settle everywhere

    ns = namespace_id(b"mesh-test", {"engine": "test"}, 16)
    keys = chunk_keys(ns, list(range(16 * 8)), 16)
    a, e = nodes[base], nodes[base + 4]
    with a.client() as c:
        for i, k in enumerate(keys):
            c.put(k, payload(i, 64 << 10), namespace=ns)

    def replicated() -> bool:
        with e.client() as c:
            n, holders = c.locate(keys)
        return n == len(keys) and all(len(h) >= 2 for h in holders)

    assert wait_until(replicated, 10) is not None
    with e.client() as c:
        assert c.lookup(keys) == 8 and c.lookup(keys, local=True) == 0
        got = c.get(keys)
        assert [bytes(g) if g is not None else None for g in got] == [payload(i, 64 << 10) for i in range(8)]
        ranking = c.rank(keys, [f"node{i}" for i in nodes])
        assert ranking[0] == (f"node{base}", 8)

    a.stop(signal.SIGKILL)
    survivors = [d for i, d in nodes.items() if i != base]
    assert (
        wait_until(lambda: all(members(d)[f"node{base}"]["state"] == "dead" for d in survivors), 30)
        is not None
    )
    reader = nodes[base + 2]
    with reader.client() as c:
        got = c.get(keys)
        assert [bytes(g) if g is not None else None for g in got] == [payload(i, 64 << 10) for i in range(8)]


def test_replicas_are_repaired_after_an_owner_dies(daemon_factory: DaemonFactory) -> None:
    base = 30
    nodes = {base: start_node(daemon_factory, base, free_port(f"127.0.0.{base}"))}
    for i in range(base + 1, base + 4):
        nodes[i] = start_node(daemon_factory, i, free_port(f"127.0.0.{i}"), "--join", nodes[base].tcp)
    assert wait_until(lambda: all(len(members(d)) == 4 for d in nodes.values()), 20) is not None
    time.sleep(1.0)
    ns = namespace_id(b"repair-test", {"engine": "test"}, 16)
    keys = chunk_keys(ns, list(range(16 * 12)), 16)
    with nodes[base].client() as c:
        for i, k in enumerate(keys):
            c.put(k, payload(i, 16 << 10), namespace=ns)

    def copies(reader: Daemon) -> list[list[str]]:
        with reader.client() as c:
            return c.locate(keys)[1]

    assert wait_until(lambda: all(len(h) >= 2 for h in copies(nodes[base + 1])), 10) is not None
    holders = copies(nodes[base + 1])
    victim = next(i for i in range(base + 1, base + 4) if any(f"node{i}" in h for h in holders))
    nodes.pop(victim).stop(signal.SIGKILL)
    reader = nodes[next(i for i in nodes if i != base)]
    assert wait_until(lambda: members(reader)[f"node{victim}"]["state"] == "dead", 30) is not None
    took = wait_until(lambda: all(len(h) >= 2 and f"node{victim}" not in h for h in copies(reader)), 20)
    assert took is not None, copies(reader)
    repaired = 0
    for d in nodes.values():
        with d.client() as c:
            repaired += c.stats()["mesh"].get("repaired", 0)
    assert repaired > 0  # the copies came back by repair, not by chance


def test_an_engine_attached_to_a_node_is_ranked_and_leaves_with_it(daemon_factory: DaemonFactory) -> None:
    base = 50
    ports = {i: free_port(f"127.0.0.{i}") for i in range(base, base + 3)}
    nodes = {base: start_node(daemon_factory, base, ports[base])}
    for i in (base + 1, base + 2):
        nodes[i] = start_node(daemon_factory, i, ports[i], "--join", nodes[base].tcp)
    assert wait_until(lambda: all(len(members(d)) == 3 for d in nodes.values()), 20) is not None
    time.sleep(1.0)

    ns = namespace_id(b"engine-test", {"engine": "test"}, 16)
    keys = chunk_keys(ns, list(range(16 * 6)), 16)
    engine_node, asker = nodes[base + 1], nodes[base + 2]
    engine = f"node{base + 1}/vllm-a"
    with engine_node.client() as c:
        c.announce_engine("vllm-a", keys[:4], [])

    def ranked_first(n: int) -> bool:
        with asker.client() as c:
            return c.rank(keys, [f"node{base}", engine])[0] == (engine, n)

    assert wait_until(lambda: ranked_first(4), 10) is not None
    with asker.client() as c:
        n, holders = c.locate(keys)
        assert all(engine in h for h in holders[:4])  # located, and ranked, but...
        assert n == 0 and c.lookup(keys) == 0  # ...an engine's own cache serves no bytes: no hit
    with engine_node.client() as c:
        assert c.stats()["mesh"]["engines"] == {engine: 4}
        c.announce_engine("vllm-a", [], keys[2:4])  # the engine evicted two blocks' chunks
    assert wait_until(lambda: ranked_first(2), 10) is not None

    status = subprocess.run(
        node_command("status", "--node", engine_node.tcp), capture_output=True, text=True, timeout=30
    )
    assert f"{engine}" in status.stdout and "2 chunks" in status.stdout

    engine_node.stop(signal.SIGKILL)
    assert wait_until(lambda: not ranked_first(2), 40) is not None  # gone with its node
