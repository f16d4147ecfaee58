"""The shared-memory arena: slots, their lifetime, coalescing, orphans, the client's mapping
and the one-pass copy that checksums."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import xxhash

from lmcache_mesh.transports.shm import (
    PAGE,
    Arena,
    SharedArena,
    copy_hashed,
    copy_verified,
    remove_orphans,
    slot_offset,
)


def test_a_slot_comes_back_only_when_its_last_view_is_gone(tmp_path: Path) -> None:
    arena = Arena(tmp_path, 4 * PAGE)
    a = arena.alloc(PAGE)
    assert a is not None and slot_offset(a) is not None
    view = a.toreadonly()  # a reader's view of the same slot
    del a
    arena.reclaim()
    assert arena.used == PAGE  # still viewed
    del view
    arena.reclaim()
    assert arena.used == 0
    arena.close()


def test_free_extents_coalesce_so_a_large_slot_fits_again(tmp_path: Path) -> None:
    arena = Arena(tmp_path, 4 * PAGE)
    slots = [arena.alloc(PAGE) for _ in range(4)]
    assert all(s is not None for s in slots) and arena.alloc(1) is None  # full
    slots[1] = slots[2] = None
    assert arena.alloc(2 * PAGE + 1) is None  # two pages free, three needed
    assert arena.alloc(2 * PAGE) is not None  # the two neighbours joined
    slots.clear()
    assert arena.alloc(4 * PAGE) is not None and arena.largest_free() == 0
    arena.close()


def test_a_part_of_a_slot_is_not_taken_for_the_slot(tmp_path: Path) -> None:
    arena = Arena(tmp_path, 2 * PAGE)
    s = arena.alloc(100)
    assert s is not None and slot_offset(s) is not None
    assert slot_offset(s[10:20]) is None and slot_offset(memoryview(b"x" * 100)) is None
    arena.close()


def test_a_client_maps_the_arena_only_with_its_token(tmp_path: Path) -> None:
    arena = Arena(tmp_path, 2 * PAGE)
    slot = arena.alloc(5)
    assert slot is not None
    slot[:] = b"hello"
    described = arena.describe()
    mapped = SharedArena.open(described)
    offset = slot_offset(slot)
    assert mapped is not None and offset is not None and bytes(mapped.slot(offset, 5)) == b"hello"
    assert SharedArena.open({**described, "token": b"\0" * 16}) is None  # another node's file
    assert SharedArena.open({**described, "path": str(tmp_path / "elsewhere")}) is None  # another host
    mapped.close()
    arena.close()
    assert not Path(str(described["path"])).exists()


def test_arenas_of_dead_nodes_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    live = Arena(tmp_path, PAGE)
    child = subprocess.run(
        [sys.executable, "-c", "import os, sys; from pathlib import Path; from lmcache_mesh.transports.shm import Arena; "
         "a = Arena(Path(sys.argv[1]), 4096); print(a.path); os._exit(0)", str(tmp_path)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    dead = Path(child.stdout.strip())
    assert dead.exists() and live.path.exists()
    assert remove_orphans(tmp_path) == 1
    assert not dead.exists() and live.path.exists()
    live.close()


def test_the_one_pass_copy_checksums_what_it_wrote() -> None:
    src = np.random.default_rng(1).integers(0, 256, (3 << 20) + 123, dtype=np.uint8)
    dst = np.zeros_like(src)
    assert copy_hashed(src, dst) == xxhash.xxh3_64_intdigest(src) and np.array_equal(src, dst)
    assert copy_verified(src, dst, xxhash.xxh3_64_intdigest(src))
    assert not copy_verified(src, dst, 12345)
