"""Key files, the allow-list format, and the keyring's reload and peer lookup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmcache_mesh.node.config import MeshSettings, NodeConfig, SecuritySettings, StorageSettings, split_seed
from lmcache_mesh.node.keyring import (
    Keyring,
    Role,
    parse_allow_list,
    read_key_pair,
    read_public_key,
    write_key_pair,
)
from lmcache_mesh.transports.curve import CurveKeyPair

A, B, C = (CurveKeyPair.generate().public for _ in range(3))


def test_allow_list_lines_roles_tenants_and_comments() -> None:
    text = f"""
# the cluster
{A} node-a node   # trailing comment
{B} engine client tenant=acme
{C} ops admin
"""
    entries = parse_allow_list(text, "allow")
    assert entries[A].principal.role is Role.NODE and entries[A].principal.name == "node-a"
    assert entries[B].principal.tenant == "acme" and not entries[B].principal.any_tenant
    assert entries[C].principal.role is Role.ADMIN and entries[C].principal.any_tenant


def test_a_key_may_hold_hash_characters_but_never_starts_with_one() -> None:
    # Z85's first character of a 32-byte value is at most the 83rd of 85: never '#'
    keys = [CurveKeyPair.generate().public for _ in range(2000)]
    assert not any(k.startswith("#") for k in keys)
    key = next(k for k in keys if "#" in k)
    assert parse_allow_list(f"{key} n node # comment\n", "allow")[key].principal.name == "n"


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (f"{A} node-a", "expected 'KEY NAME ROLE"),
        (f"{A} node-a king", "role 'king'"),
        ("tooshort node-a node", "40 Z85 characters"),
        (f"{A} node-a node tenant=acme", "a node key serves every tenant"),
        (f"{B} engine client tenant=a/b", "tenant"),
        (f"{B} engine client color=blue", "unknown option"),
        (f"{A} x node\n{A} y node", "already listed"),
        (f"{A} x node\n{B} x client", "listed twice"),
    ],
)
def test_bad_allow_list_lines_name_the_line(line: str, error: str) -> None:
    with pytest.raises(ValueError, match=error) as info:
        parse_allow_list(line, "authorized_keys")
    assert "authorized_keys:" in str(info.value)


def test_key_files_are_secret_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "k" / "node.key_secret"
    keys = write_key_pair(path, "node-a")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert read_key_pair(path) == ("node-a", keys)
    assert read_public_key(str(tmp_path / "k" / "node.key")) == keys.public
    assert read_public_key(keys.public) == keys.public
    with pytest.raises(FileExistsError):
        write_key_pair(path, "node-a")
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="readable by others"):
        read_key_pair(path)
    with pytest.raises(ValueError, match="neither a Z85 key nor"):
        read_public_key("no-such-file")
    assert "secret" not in repr(keys) and keys.secret not in repr(keys)


def test_reload_keeps_the_old_list_on_error_and_peers_are_found_by_name(tmp_path: Path) -> None:
    me = CurveKeyPair.generate()
    allow = tmp_path / "authorized_keys"
    allow.write_text(f"{me.public} node-a node\n{B} node-b node\n")
    ring = Keyring("node-a", me, allow)
    assert ring.authorize(B) and not ring.authorize(C)
    members = {"tcp://10.0.0.2:7700": "node-b"}
    assert ring.client_for("tcp://10.0.0.2:7700", members.get).server_key == B
    with pytest.raises(LookupError, match="no key for tcp://10.0.0.9:7700"):
        ring.client_for("tcp://10.0.0.9:7700", members.get)
    assert ring.remember_seed("node-b@tcp://10.0.0.9:7700") == "tcp://10.0.0.9:7700"
    assert ring.client_for("tcp://10.0.0.9:7700", members.get).server_key == B
    allow.write_text("garbage\n")
    with pytest.raises(ValueError):
        ring.reload()
    assert ring.authorize(B)  # the previous list still holds
    allow.write_text(f"{me.public} node-a node\n{C} node-c node\n")
    assert ring.reload() == 2
    assert not ring.authorize(B) and ring.principal(B) is None and ring.authorize(C)


def test_seeds_may_be_named_and_curve_follows_the_key_file(tmp_path: Path) -> None:
    assert split_seed("node-a@tcp://h:1") == ("node-a", "tcp://h:1")
    assert split_seed("tcp://h:1") == ("", "tcp://h:1")
    cfg = NodeConfig(
        storage=StorageSettings(data_dir=str(tmp_path)),
        mesh=MeshSettings(join=("node-a@tcp://127.0.0.1:7700",)),
    )
    assert not cfg.curve_enabled()
    write_key_pair(cfg.key_path, "me")
    assert cfg.curve_enabled() and not cfg.with_(curve="off").curve_enabled()
    with pytest.raises(ValueError, match="curve must be"):
        NodeConfig(security=SecuritySettings(curve="maybe"))
    with pytest.raises(ValueError, match="tcp://"):
        NodeConfig(mesh=MeshSettings(join=("node-a@ipc:///x",)))
