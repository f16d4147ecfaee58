"""Model fingerprints: content digests, cached per file version."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from lmcache_mesh.engines import fingerprint
from lmcache_mesh.engines.fingerprint import SIDECAR_SUFFIX, model_fingerprint


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_the_digest_is_of_the_content_not_the_name(tmp_path: Path) -> None:
    a = write(tmp_path / "a.gguf", b"weights" * 1000)
    b = write(tmp_path / "b.gguf", b"weights" * 1000)
    c = write(tmp_path / "c.gguf", b"weightz" * 1000)
    assert (
        model_fingerprint(a)
        == model_fingerprint(b)
        == hashlib.blake2b(b"weights" * 1000, digest_size=16).digest()
    )
    assert model_fingerprint(c) != model_fingerprint(a)


def test_the_digest_is_cached_beside_the_model_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = write(tmp_path / "m.gguf", b"x" * 4096)
    first = model_fingerprint(model)
    assert json.loads((tmp_path / f"m.gguf{SIDECAR_SUFFIX}").read_text())["blake2b_128"] == first.hex()

    def no_hashing(path: Path) -> bytes:
        raise AssertionError("the cached digest should have been used")

    monkeypatch.setattr(fingerprint, "hash_file", no_hashing)
    assert model_fingerprint(model) == first


def test_a_changed_file_is_hashed_again(tmp_path: Path) -> None:
    model = write(tmp_path / "m.gguf", b"x" * 4096)
    first = model_fingerprint(model)
    write(model, b"y" * 4096)
    os.utime(model, ns=(1, 1))  # even an mtime going backwards is a change
    assert model_fingerprint(model) != first


def test_a_corrupt_cache_entry_means_a_rehash(tmp_path: Path) -> None:
    model = write(tmp_path / "m.gguf", b"x" * 4096)
    first = model_fingerprint(model)
    (tmp_path / f"m.gguf{SIDECAR_SUFFIX}").write_text("{not json")
    assert model_fingerprint(model) == first


def test_an_unwritable_sidecar_falls_back_to_the_cache_dir(tmp_path: Path) -> None:
    model = write(tmp_path / "m.gguf", b"x" * 4096)
    (tmp_path / f"m.gguf{SIDECAR_SUFFIX}").mkdir()  # a directory where the file should go
    digest = model_fingerprint(model, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert model_fingerprint(model, cache_dir=tmp_path / "cache") == digest


def test_a_weights_directory_is_fingerprinted_over_config_and_weights(tmp_path: Path) -> None:
    model = tmp_path / "hf"
    model.mkdir()
    write(model / "config.json", b'{"hidden_size": 128}')
    write(model / "model.safetensors", b"w" * 1000)
    write(model / "README.md", b"docs do not count")
    first = model_fingerprint(model)
    write(model / "README.md", b"other docs")
    assert model_fingerprint(model) == first
    write(model / "config.json", b'{"hidden_size": 256}')
    assert model_fingerprint(model) != first
    with pytest.raises(ValueError, match="no weight files"):
        empty = tmp_path / "empty"
        empty.mkdir()
        model_fingerprint(empty)


def test_every_shard_of_a_split_gguf_counts(tmp_path: Path) -> None:
    first = write(tmp_path / "m-00001-of-00002.gguf", b"a" * 100)
    write(tmp_path / "m-00002-of-00002.gguf", b"b" * 100)
    digest = model_fingerprint(first)
    write(tmp_path / "m-00002-of-00002.gguf", b"c" * 100)
    assert model_fingerprint(first) != digest
