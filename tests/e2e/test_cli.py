"""The ``lmcache-node`` command line, as a user runs it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.request
from pathlib import Path

from lmcache_mesh.node import chunk_keys

from ..conftest import DaemonFactory
from ..helpers import Daemon, node_command, payload


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        node_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_status_json_has_the_stable_schema(daemon: Daemon, ns: bytes, keys: list[bytes]) -> None:
    with daemon.client() as c:
        c.put(keys[0], payload(0), namespace=ns)
        c.get(keys[:2])
        assert c.lookup(keys[:4]) == 1  # counted: 4 chunks looked up, 1 cached
    r = run_cli("status", "--node", daemon.tcp, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert set(s) >= {"node", "members", "tiers", "counters"}
    assert s["node"]["address"] == daemon.tcp
    (me,) = s["members"]
    assert set(me) >= {"name", "address", "zone", "state", "reachability"} and me["state"] == "alive"
    assert (
        s["tiers"]["memory"]["capacity_bytes"] == 64 << 20
        and s["tiers"]["disk"]["capacity_bytes"] == 256 << 20
    )
    assert s["counters"]["hits_memory"] == 1 and s["counters"]["misses"] == 1 and s["counters"]["puts"] == 1
    lookups = {
        k: s["counters"][k] for k in ("lookups", "lookup_keys", "lookup_hit_keys", "lookup_missed_keys")
    }
    assert lookups == {"lookups": 1, "lookup_keys": 4, "lookup_hit_keys": 1, "lookup_missed_keys": 3}
    assert s["tiers"]["memory"]["codecs"] == {"raw": {"records": 1, "bytes": 4096, "raw_bytes": 4096}}
    table = run_cli("status", "--node", daemon.tcp)
    assert "4 chunks: 1 cached, 3 not  (prefix hit rate 25.0%)" in table.stdout
    assert "codecs" not in table.stdout  # nothing encoded: no codec table


def test_status_and_metrics_show_encoded_bytes_per_codec(
    daemon_factory: DaemonFactory, ns: bytes, keys: list[bytes]
) -> None:
    port = free_port()
    d = daemon_factory("--metrics-port", str(port), "--disk", "0")
    with d.client() as c:
        c.put(keys[0], payload(0)[:1024], namespace=ns, meta={"codec": "int4", "raw_length": 4096})
    table = run_cli("status", "--node", d.tcp)
    assert "codecs" in table.stdout and "int4" in table.stdout and "0.25" in table.stdout, table.stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'lmcache_codec_bytes{codec="int4",tier="memory"} 1024.0' in text
    assert 'lmcache_codec_raw_bytes{codec="int4",tier="memory"} 4096.0' in text


def test_status_table_over_ipc(daemon: Daemon) -> None:
    assert daemon.ipc is not None
    r = run_cli("status", "--node", daemon.ipc)
    assert r.returncode == 0, r.stderr
    assert "members" in r.stdout and "alive" in r.stdout and "memory" in r.stdout and "hit rate" in r.stdout


def test_status_of_a_node_that_is_not_there_fails_clearly() -> None:
    r = run_cli("status", "--node", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.5")
    assert r.returncode == 1
    assert "error: no reply from tcp://127.0.0.1:" in r.stderr


def test_config_file_env_and_flags_reach_the_running_node(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('[node]\nmemory = "32MiB"\ndisk = "16MiB"\nzone = "from-file"\nname = "file-name"\n')
    d = daemon_factory("--config", str(cfg), "--name", "flag-name", env={"LMCACHE_MESH_ZONE": "from-env"})
    s = json.loads(run_cli("status", "--node", d.tcp, "--json").stdout)
    assert s["node"]["name"] == "flag-name" and s["node"]["zone"] == "from-env"
    assert (
        s["tiers"]["memory"]["capacity_bytes"] == 32 << 20
        and s["tiers"]["disk"]["capacity_bytes"] == 16 << 20
    )


def test_bad_config_is_refused_with_a_message(tmp_path: Path) -> None:
    r = run_cli("run", "--data-dir", str(tmp_path), "--memory", "a lot")
    assert r.returncode == 1 and "bad value for 'memory'" in r.stderr
    r = run_cli("run", "--data-dir", str(tmp_path), env={"LMCACHE_MESH_LISTEN": "udp://x"})
    assert r.returncode == 1 and "must start with tcp:// or ipc://" in r.stderr


def test_a_second_daemon_on_the_same_data_dir_or_port_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    r = run_cli("run", "--listen", "tcp://127.0.0.1:0", "--data-dir", str(daemon.data_dir))
    assert r.returncode == 1 and "in use by another node" in r.stderr
    r = run_cli("run", "--listen", daemon.tcp, "--data-dir", str(tmp_path / "other"))
    assert r.returncode == 1 and f"cannot listen on {daemon.tcp}" in r.stderr


def test_metrics_endpoint(daemon_factory: DaemonFactory, ns: bytes) -> None:
    port = free_port()
    d = daemon_factory("--metrics-port", str(port), "--disk", "0")
    keys = chunk_keys(ns, list(range(64)), 16)
    with d.client() as c:
        c.put(keys[0], payload(0), namespace=ns)
        c.get(keys[:2])
        c.lookup(keys[:4])
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'lmcache_hits_total{tier="memory"} 1.0' in body
    assert "lmcache_misses_total 1.0" in body
    assert "lmcache_lookup_keys_total 4.0" in body and "lmcache_lookup_hit_keys_total 1.0" in body
    assert 'lmcache_request_seconds_count{op="GET",outcome="ok"} 1.0' in body
    assert 'lmcache_members{state="alive"} 1.0' in body
    assert 'lmcache_tier_capacity_bytes{tier="memory"}' in body


def test_no_flags_runs_on_the_embedded_default(tmp_path: Path) -> None:
    """`lmcache-node run` with no flags: localhost:7700, memory + disk under the default data dir."""
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg"), "OMP_NUM_THREADS": "1"}
    env.pop("LMCACHE_MESH_LISTEN", None)
    with socket.socket() as s:
        busy = s.connect_ex(("127.0.0.1", 7700)) == 0
    if busy:  # someone else holds the default port: the refusal must say so
        r = subprocess.run(node_command("run"), capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 1 and "cannot listen on tcp://127.0.0.1:7700" in r.stderr
        return
    proc = subprocess.Popen(
        node_command("run"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "serving on tcp://127.0.0.1:7700" in line and str(tmp_path / "xdg" / "lmcache-mesh") in line
        r = run_cli("status", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["tiers"]["disk"]["capacity_bytes"] == 4 << 30
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode == 0
