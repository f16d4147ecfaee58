"""Model fingerprints: a digest of a model's content, computed once per file version.

A model is a GGUF file (every shard, for a split one) or a directory of weights (Hugging
Face layout: ``config.json`` and the ``*.safetensors`` / ``*.bin`` / ``*.pt`` files).

Two files with the same tensor shapes but other weights produce KV that llama.cpp accepts
silently and uses wrongly, so the namespace is keyed by content, never by file name.
Hashing a multi-GB model takes seconds, so the digest is cached: beside the model
(``MODEL.gguf.lmcache-fp``) when that directory is writable, else in ``cache_dir``. A cached
digest is used only while the file's size, mtime and inode are unchanged. A model split
into shards (``name-00001-of-00003.gguf``) is fingerprinted over all of its shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".lmcache-fp"
_SHARD = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
_READ_BYTES = 8 << 20
_PROGRESS_EVERY_S = 5.0


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmcache-mesh" / "fingerprints"


def _identity(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _cache_files(model: Path, cache_dir: Path | None) -> list[Path]:
    fallback_dir = cache_dir if cache_dir is not None else default_cache_dir()
    digest_of_path = hashlib.blake2b(str(model).encode(), digest_size=8).hexdigest()
    return [
        model.with_name(model.name + SIDECAR_SUFFIX),
        fallback_dir / f"{model.name}.{digest_of_path}.json",
    ]


def _read_cached(files: list[Path], identity: dict[str, int]) -> bytes | None:
    for path in files:
        try:
            cached = json.loads(path.read_text())
            if cached.get("file") == identity:
                return bytes.fromhex(cached["blake2b_128"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # absent, unreadable or stale: fall through to the next place or a rehash
    return None


def _write_cached(files: list[Path], identity: dict[str, int], digest: bytes) -> None:
    text = json.dumps({"file": identity, "blake2b_128": digest.hex()})
    for path in files:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, path)
            return
        except OSError:
            tmp.unlink(missing_ok=True)
    logger.warning(
        "could not cache the fingerprint of %s (no writable place); it is rehashed each start", files[0]
    )


def hash_file(path: Path) -> bytes:
    """blake2b-128 of the whole file (GGUF metadata and tensor data), logging progress on big files."""
    h = hashlib.blake2b(digest_size=16)
    total = path.stat().st_size
    done, started, last_log = 0, time.monotonic(), time.monotonic()
    with path.open("rb") as f:
        while block := f.read(_READ_BYTES):
            h.update(block)
            done += len(block)
            if time.monotonic() - last_log > _PROGRESS_EVERY_S:
                last_log = time.monotonic()
                logger.info("fingerprinting %s: %d%%", path.name, 100 * done // max(total, 1))
    logger.info("fingerprinted %s (%d MB) in %.1f s", path.name, total >> 20, time.monotonic() - started)
    return h.digest()


def shards(model: Path) -> list[Path]:
    """All files of a model: the shards of a split GGUF (named by its first shard), else itself."""
    m = _SHARD.match(model.name)
    if m is None:
        return [model]
    count = int(m["count"])
    return [model.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def file_digest(path: Path, cache_dir: Path | None) -> bytes:
    """blake2b-128 of one file, from the cache while the file is unchanged."""
    identity = _identity(path.stat())
    files = _cache_files(path, cache_dir)
    digest = _read_cached(files, identity)
    if digest is None:
        digest = hash_file(path)
        _write_cached(files, identity, digest)
    return digest


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
DIR_METADATA = ("config.json",)


def directory_files(model: Path) -> list[Path]:
    """The files of a model directory that determine its KV: config and weights, sorted."""
    files = sorted(
        p for p in model.iterdir() if p.is_file() and (p.name in DIR_METADATA or p.suffix in WEIGHT_SUFFIXES)
    )
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise ValueError(f"{model} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    return files


def model_fingerprint(
    model_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> bytes:
    """16-byte content digest of a model: a file (every shard of a split GGUF) or a weights directory."""
    # absolute(), not resolve(): a symlinked model (a hub cache) keeps its cache entry beside the link.
    model = Path(model_path).absolute()
    cache = Path(cache_dir) if cache_dir is not None else None
    parts = directory_files(model) if model.is_dir() else shards(model)
    if len(parts) == 1 and not model.is_dir():
        return file_digest(model, cache)
    combined = hashlib.blake2b(digest_size=16)
    for part in parts:
        combined.update(part.name.encode() + b"\0" + file_digest(part, cache))
    return combined.digest()
