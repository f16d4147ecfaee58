"""NodeConfig: defaults, TOML, environment, flags, and their precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmcache_mesh.node import NodeConfig
from lmcache_mesh.node.config import SETTINGS, MeshSettings, StorageSettings

KEYS_OF_EARLIER_RELEASES = """
    name listen data-dir memory disk zone join advertise replicas mesh-profile nat mesh-secret
    ice-servers turn-username turn-password webrtc-host-addresses webrtc-channels curve key
    authorized-keys metrics-port metrics-host max-record max-header max-request max-keys
    max-inflight max-inflight-per-peer max-inflight-bytes-per-peer writeback-queue
    persist-on-shutdown
""".split()

KEYS_ADDED_SINCE = ["shm-dir", "lease-timeout", "insecure", "max-inflight-bytes", "wire-codec"]
"""Every flag (--KEY), environment variable (LMCACHE_MESH_KEY) and TOML key that worked before
the settings had sections: each must keep working, with the same meaning."""


def test_defaults_are_sane() -> None:
    c = NodeConfig()
    assert c.listen == ("tcp://127.0.0.1:7700",)
    assert c.storage.memory_bytes == 1 << 30 and c.storage.disk_bytes == 4 << 30
    assert c.name == "" and c.mesh.join == () and c.mesh.profile == "lan"  # name: HOST:PORT, decided at start
    assert c.storage.data_dir.endswith("lmcache-mesh")


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    f = tmp_path / "node.toml"
    f.write_text('[node]\nmemory = "256MiB"\ndisk = "1GiB"\nzone = "file-zone"\ndata_dir = "/from/file"\n')
    env = {"LMCACHE_MESH_DISK": "2GiB", "LMCACHE_MESH_ZONE": "env-zone", "UNRELATED": "x"}
    c = NodeConfig.load(f, env=env, overrides={"zone": "flag-zone"})
    assert c.storage.memory_bytes == 256 << 20  # file
    assert c.storage.disk_bytes == 2 << 30  # env beats file
    assert c.mesh.zone == "flag-zone"  # flag beats env
    assert c.storage.data_dir == "/from/file"
    assert c.limits.max_record_bytes == NodeConfig().limits.max_record_bytes  # default


def test_file_without_a_node_table_and_lists(tmp_path: Path) -> None:
    f = tmp_path / "node.toml"
    f.write_text('listen = ["tcp://127.0.0.1:9000", "ipc:///tmp/x.sock"]\npersist-on-shutdown = false\n')
    c = NodeConfig.load(f, env={})
    assert (
        c.listen == ("tcp://127.0.0.1:9000", "ipc:///tmp/x.sock") and c.storage.persist_on_shutdown is False
    )


def test_every_key_of_earlier_releases_still_works_and_lands_in_its_section() -> None:
    assert {s.key for s in SETTINGS.settings} == {*KEYS_OF_EARLIER_RELEASES, *KEYS_ADDED_SINCE}
    env = {"LMCACHE_MESH_MAX_INFLIGHT_BYTES_PER_PEER": "2GiB", "LMCACHE_MESH_WEBRTC_CHANNELS": "8"}
    c = NodeConfig.load(env=env, overrides={"key": "/k", "mesh-profile": "wan", "metrics-host": "0.0.0.0"})
    assert c.limits.max_inflight_bytes_per_peer == 2 << 30 and c.webrtc.channels == 8
    assert c.security.key_file == "/k" and c.mesh.profile == "wan" and c.metrics.host == "0.0.0.0"


def test_sections_flat_keys_and_a_node_table_read_the_same(tmp_path: Path) -> None:
    sectioned = '[storage]\nmemory = "256MiB"\n\n[mesh]\nzone = "z"\n\n[limits]\nmax-keys = 8\n'
    flat = 'memory = "256MiB"\nzone = "z"\nmax_keys = 8\n'
    node_table = "[node]\n" + flat
    nested = '[node.storage]\nmemory = "256MiB"\n[node.mesh]\nzone = "z"\n[node.limits]\nmax-keys = 8\n'
    configs = []
    for i, text in enumerate((sectioned, flat, node_table, nested)):
        (tmp_path / f"{i}.toml").write_text(text)
        configs.append(NodeConfig.load(tmp_path / f"{i}.toml", env={}))
    assert configs[0].storage.memory_bytes == 256 << 20 and configs[0].mesh.zone == "z"
    assert configs[0].limits.max_keys_per_request == 8
    assert all(c == configs[0] for c in configs)


def test_a_node_table_is_read_alone_in_a_file_shared_with_other_programs(tmp_path: Path) -> None:
    """With a [node] table, the rest of the file (other programs' tables, stray keys) is not ours."""
    shared = tmp_path / "shared.toml"
    shared.write_text('memory = "3GiB"\n\n[node]\nmemory = "256MiB"\n\n[vllm]\nmodel = "m"\n')
    assert NodeConfig.load(shared, env={}).storage.memory_bytes == 256 << 20


@pytest.mark.parametrize(
    "text, message",
    [
        ('[limits]\nmemory = "1GiB"\n', r"\[limits\]: 'memory' belongs in \[storage\]"),
        ('[mesh]\nname = "n"\n', r"\[mesh\]: 'name' belongs at the top, before any \[section\]"),
        ('memory = "1GiB"\n[storage]\nmemory = "2GiB"\n', "'memory' is set twice"),
        (
            '[storage]\nmemroy = "1GiB"\n',
            r"\[storage\]: unknown setting 'memroy' \(did you mean 'memory'\?\)",
        ),
    ],
)
def test_a_key_in_the_wrong_section_or_set_twice_is_refused(text: str, message: str, tmp_path: Path) -> None:
    f = tmp_path / "node.toml"
    f.write_text(text)
    with pytest.raises(ValueError, match=message):
        NodeConfig.load(f, env={})


def test_every_setting_is_documented_where_it_is_defined_and_run_help_shows_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from lmcache_mesh.engines.cli import commands as cli

    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for s in SETTINGS.settings:
        assert len(s.help) > 10, f"{s.path} has no docstring"
        usage = f"--{s.key} [{s.metavar}]" if s.kind == "bool" else f"--{s.key} {s.metavar}"
        assert usage in text and s.help.split(";")[0] in text, s.key
        assert SETTINGS.env_var(s) in text


def test_sections_validate_their_fields_naming_field_value_and_range() -> None:
    with pytest.raises(ValueError, match=r"mesh\.replicas must be in \[1, 16\], got 0"):
        MeshSettings(replicas=0)
    with pytest.raises(ValueError, match=r"storage\.disk_bytes must be >= 0, got -1"):
        StorageSettings(disk_bytes=-1)
    with pytest.raises(ValueError, match=r"mesh\.profile must be one of lan, wan, local, got 'fast'"):
        NodeConfig.load(env={}, overrides={"mesh-profile": "fast"})


def test_with_changes_one_setting_in_its_section() -> None:
    c = NodeConfig(name="a", storage=StorageSettings(memory_bytes=1 << 20))
    d = c.with_(disk_bytes=0, zone="z", name="b")
    assert (d.name, d.storage.memory_bytes, d.storage.disk_bytes, d.mesh.zone) == ("b", 1 << 20, 0, "z")
    assert c.storage.disk_bytes == 4 << 30  # frozen: c is unchanged
    with pytest.raises(TypeError, match="no setting or section 'colour'"):
        c.with_(colour="red")


def test_env_list_is_comma_separated() -> None:
    c = NodeConfig.load(env={"LMCACHE_MESH_LISTEN": "tcp://127.0.0.1:1, ipc:///tmp/a"})
    assert c.listen == ("tcp://127.0.0.1:1", "ipc:///tmp/a")


@pytest.mark.parametrize(
    "source, message",
    [
        ({"env": {"LMCACHE_MESH_MEMORY": "lots"}}, "environment LMCACHE_MESH_MEMORY: bad value for 'memory'"),
        ({"overrides": {"colour": "red"}}, "unknown setting 'colour'"),
        ({"overrides": {"listen": "http://x"}}, "must start with tcp:// or ipc://"),
        ({"overrides": {"metrics-port": "70000"}}, r"metrics\.port must be in \[0, 65535\], got 70000"),
        ({"overrides": {"max-keys": "0"}}, "max_keys_per_request must be > 0"),
        ({"overrides": {"persist-on-shutdown": "maybe"}}, "expected a boolean"),
    ],
)
def test_bad_values_name_the_source_and_key(source: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NodeConfig.load(env=source.get("env", {}), overrides=source.get("overrides"))  # type: ignore[arg-type]


def test_unknown_environment_variables_are_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    # orchestrators add variables of their own (Kubernetes: LMCACHE_MESH_PORT=tcp://... for a
    # service named lmcache-mesh); a typo is named, with the closest setting
    env = {
        "LMCACHE_MESH_PORT_7700_TCP": "tcp://10.0.0.1:7700",
        "LMCACHE_MESH_MEMROY": "2GiB",
        "LMCACHE_MESH_DISK": "0",
    }
    with caplog.at_level("WARNING", logger="lmcache_mesh.node.config"):
        c = NodeConfig.load(env=env)
    assert c.storage.disk_bytes == 0 and c.storage.memory_bytes == NodeConfig.default_of("memory_bytes")
    assert "ignoring unknown environment variable LMCACHE_MESH_PORT_7700_TCP" in caplog.text
    assert "LMCACHE_MESH_MEMROY (did you mean LMCACHE_MESH_MEMORY?)" in caplog.text


def test_bad_toml_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("memory = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        NodeConfig.load(f, env={})
    with pytest.raises(ValueError, match="cannot read config file"):
        NodeConfig.load(tmp_path / "missing.toml", env={})


def test_nat_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="needs --join"):
        NodeConfig.load(env={}, overrides={"nat": "true"})
    with pytest.raises(ValueError, match="no address to advertise"):
        NodeConfig.load(env={}, overrides={"nat": "true", "join": "tcp://h:1", "advertise": "tcp://h:2"})
    with pytest.raises(ValueError, match="stun:"):
        NodeConfig.load(env={}, overrides={"ice-servers": "http://x"})
    cfg = NodeConfig.load(
        env={"LMCACHE_MESH_WEBRTC_HOST_ADDRESSES": "127.0.0.1"},
        overrides={"nat": "true", "join": "tcp://h:1", "ice-servers": "stun:s:3478,turn:t:3478"},
    )
    assert cfg.mesh.nat and cfg.webrtc.host_addresses == ("127.0.0.1",)
    assert cfg.webrtc.ice_servers == ("stun:s:3478", "turn:t:3478") and cfg.webrtc.channels == 4


def test_sample_config_prints_every_setting_and_sets_what_it_is_told(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from lmcache_mesh.engines.cli import commands as cli

    assert cli.main(["sample-config", "--set", 'memory="4GiB"', "--set", "replicas=3"]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "n.toml"
    path.write_text(out)
    cfg = NodeConfig.load(path, env={})
    assert cfg.storage.memory_bytes == 4 << 30 and cfg.mesh.replicas == 3
    assert '# disk = "4GiB"' in out and '# curve = "auto"' in out
    assert cli.main(["sample-config", "--set", "colour=1"]) == 1
    assert "unknown setting 'colour'" in capsys.readouterr().err
    assert cli.main(["sample-config", "--set", "memroy=1GiB"]) == 1
    assert "(did you mean 'memory'?)" in capsys.readouterr().err
    assert cli.main(["sample-config", "--set", "memory=lots"]) == 1  # what `run` would refuse
    assert "bad value for 'memory'" in capsys.readouterr().err
    assert (
        cli.main(["sample-config", "--set", "memory=4GiB", "--set", "data-dir=/srv/lmc"]) == 0
    )  # bare words
    out = capsys.readouterr().out
    assert 'memory = "4GiB"' in out and 'data-dir = "/srv/lmc"' in out
    assert cli.main(["sample-config", "--set", 'listen=["tcp://a:1"']) == 1  # a broken list: say so
    assert "not a TOML string or list" in capsys.readouterr().err


@pytest.mark.parametrize(
    "typed, written",
    [
        # text settings keep the text as typed: never a TOML number, boolean, date or comment
        ("mesh-secret=2024#prod", 'mesh-secret = "2024#prod"'),
        ("turn-password=0x1F", 'turn-password = "0x1F"'),
        ("name=true", 'name = "true"'),
        ("zone=1979-05-27T07:32:00Z", 'zone = "1979-05-27T07:32:00Z"'),
        ("data_dir=/srv/x", 'data-dir = "/srv/x"'),  # as in a file, _ is -
        ("memory=4GiB", 'memory = "4GiB"'),
        ("metrics-port=9109", "metrics-port = 9109"),
        ("persist-on-shutdown=false", "persist-on-shutdown = false"),
        ('listen=["tcp://a:1", "ipc:///x"]', 'listen = ["tcp://a:1", "ipc:///x"]'),
        ('name="quoted"', 'name = "quoted"'),
    ],
)
def test_sample_config_set_writes_what_was_typed(
    typed: str, written: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from lmcache_mesh.engines.cli import commands as cli

    assert cli.main(["sample-config", "--set", typed]) == 0
    out = capsys.readouterr().out
    assert written in out.splitlines()
    path = tmp_path / "n.toml"
    path.write_text(out)
    NodeConfig.load(path, env={})  # and `run --config` reads it


@pytest.mark.parametrize("typed", ["max-keys=1e3", "metrics-port=9109.0", "memory=inf", "nat=maybe"])
def test_sample_config_set_refuses_what_run_would_refuse(
    typed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmcache_mesh.engines.cli import commands as cli

    assert cli.main(["sample-config", "--set", typed]) == 1
    assert f"--set {typed.split('=')[0]}: bad value" in capsys.readouterr().err


def test_keygen_writes_the_node_key_where_run_looks_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # as in the container image: the data dir is set by the config file LMCACHE_MESH_CONFIG names
    from lmcache_mesh.engines.cli import commands as cli

    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata-dir = "{tmp_path / "data"}"\n')
    monkeypatch.setenv("LMCACHE_MESH_CONFIG", str(config))
    monkeypatch.delenv("LMCACHE_MESH_DATA_DIR", raising=False)
    assert cli.main(["keygen", "--name", "n1"]) == 0
    assert (tmp_path / "data" / "node.key_secret").exists()
    assert NodeConfig.from_environment().key_path == tmp_path / "data" / "node.key_secret"
    assert cli.main(["keygen", "--name", "n2", "--data-dir", str(tmp_path / "flag")]) == 0  # a flag wins
    assert (tmp_path / "flag" / "node.key_secret").exists()
    capsys.readouterr()


@pytest.mark.parametrize(
    "argv, usage, hint",
    [
        (["run", "--memroy", "1GiB"], "usage: lmcache-node run", "(did you mean --memory?)"),
        (["run", "stray", "--memroy=1"], "usage: lmcache-node run", "(did you mean --memory?)"),
        (["join", "tcp://127.0.0.1:1", "--wiat", "3"], "usage: lmcache-node join", "(did you mean --wait?)"),
        (["status", "extra"], "usage: lmcache-node status", "unrecognized arguments: extra\n"),
    ],
)
def test_an_unknown_argument_gets_its_commands_usage_and_the_closest_flag(
    argv: list[str], usage: str, hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmcache_mesh.engines.cli import commands as cli

    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith(usage) and hint in err, err


def test_with_takes_the_flat_names_of_earlier_releases() -> None:
    """``with_`` finds a setting by its field name or by its key spelled as a name."""
    c = NodeConfig().with_(memory_bytes=1 << 20, disk_bytes=0, metrics_port=9, mesh_profile="wan")
    assert (c.storage.memory_bytes, c.storage.disk_bytes, c.metrics.port, c.mesh.profile) == (
        1 << 20,
        0,
        9,
        "wan",
    )
    with pytest.raises(TypeError, match="no setting or section 'memory_gb'"):
        NodeConfig().with_(memory_gb=1)
