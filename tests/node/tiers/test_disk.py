"""The disk tier: crash-safe files, budget, recovery, corruption, failing disks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from lmcache_mesh.node import ChunkRecord
from lmcache_mesh.node.tiers import DiskTier


def rec(i: int, size: int = 1000) -> ChunkRecord:
    return ChunkRecord.build(i.to_bytes(16, "big"), bytes([i % 251]) * size, b"n" * 16, {"tokens": 16})


def write(tier: DiskTier, record: ChunkRecord) -> bool:
    """Queue a write and wait for it: True when this version is on disk."""
    tier.submit(record)
    tier.flush(timeout_s=10)
    return tier.holds(record)


def files(tier: DiskTier) -> list[Path]:
    return sorted((tier.data_dir / "chunks").rglob("*.rec"))


@pytest.fixture
def tier(tmp_path: Path):  # type: ignore[no-untyped-def]
    t = DiskTier(tmp_path, 10_000)
    t.open()
    yield t
    t.close()


def test_write_then_read_back_verified(tier: DiskTier) -> None:
    assert write(tier, rec(1))
    got = tier.read(rec(1).key)
    assert got is not None and got.header == rec(1).header and bytes(got.payload) == bytes(rec(1).payload)
    assert tier.read(rec(2).key) is None
    assert not list((tier.data_dir / "chunks").rglob("*.tmp"))


def test_budget_evicts_least_recently_read(tier: DiskTier) -> None:
    for i in range(10):
        assert write(tier, rec(i))
    assert tier.read(rec(0).key) is not None  # 0 is now most recent
    assert write(tier, rec(10))
    assert rec(1).key not in tier and rec(0).key in tier and rec(10).key in tier
    assert tier.used_bytes == 10_000 and len(files(tier)) == 10
    assert tier.counters.evictions == 1


def test_record_over_the_whole_budget_is_refused(tier: DiskTier) -> None:
    assert not write(tier, rec(1, 20_000))
    assert not tier.submit(rec(1, 20_000))


def test_recovery_rebuilds_the_index_and_discards_torn_and_corrupt_files(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 100_000)
    tier.open()
    for i in range(6):
        write(tier, rec(i))
    tier.close()
    paths = {p.name[:32]: p for p in files(tier)}
    # A torn file (crash mid-write would leave only a temp file, but disks and users do worse).
    torn = paths[rec(0).key.hex()]
    torn.write_bytes(torn.read_bytes()[:500])
    # A header bit flip.
    bad = paths[rec(1).key.hex()]
    data = bytearray(bad.read_bytes())
    data[25] ^= 0xFF
    bad.write_bytes(bytes(data))
    # A leftover temp file and a file under the wrong name.
    (torn.parent / "leftover.123.tmp").write_bytes(b"partial")
    renamed = paths[rec(2).key.hex()]
    os.rename(renamed, renamed.with_name("f" * 32 + ".rec"))

    tier2 = DiskTier(tmp_path, 100_000)
    report = tier2.open()
    try:
        assert report.recovered == 3 and report.discarded == 3 and report.temp_removed == 1
        for i in (3, 4, 5):
            got = tier2.read(rec(i).key)
            assert got is not None and bytes(got.payload) == bytes(rec(i).payload)
        for i in (0, 1, 2):
            assert tier2.read(rec(i).key) is None
        assert len(files(tier2)) == 3
        assert tier2.used_bytes == 3000
    finally:
        tier2.close()


def test_payload_corruption_is_caught_on_read_and_the_file_dropped(tier: DiskTier) -> None:
    write(tier, rec(7))
    path = files(tier)[0]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    assert tier.read(rec(7).key) is None
    assert tier.counters.corrupt_discarded == 1
    assert tier.flush(10)
    assert rec(7).key not in tier and not path.exists()


def test_recovery_trims_to_a_smaller_budget(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 10_000)
    tier.open()
    for i in range(8):
        write(tier, rec(i))
    tier.close()
    small = DiskTier(tmp_path, 5_000)
    report = small.open()
    small.close()
    assert report.recovered == 5 and report.evicted_over_budget == 3 and len(files(small)) == 5


def test_queued_writes_are_readable_and_flushed(tier: DiskTier) -> None:
    for i in range(5):
        assert tier.submit(rec(i))
        assert tier.read(rec(i).key) is not None  # readable while queued
    assert tier.flush(timeout_s=10)
    assert len(files(tier)) == 5 and tier.pending_bytes == 0


class GatedDisk(DiskTier):
    """A disk tier whose writer waits at a gate: lets a test hold writes in the queue."""

    gate: threading.Event

    def _write(self, record: ChunkRecord) -> None:
        self.gate.wait(10)
        super()._write(record)


def test_full_writeback_queue_drops_and_counts(tmp_path: Path) -> None:
    t = GatedDisk(tmp_path, 100_000, max_pending_bytes=1500)
    t.gate = threading.Event()
    t.open()
    try:
        assert t.submit(rec(1))  # an empty queue takes any record that fits the budget
        assert not t.submit(rec(2))  # 2000 queued bytes > 1500
        assert t.counters.writeback_dropped == 1
        t.gate.set()
        assert t.flush(10) and rec(1).key in t and rec(2).key not in t
    finally:
        t.gate.set()
        t.close()


def test_remove_deletes_the_file(tier: DiskTier) -> None:
    write(tier, rec(1))
    assert tier.remove(rec(1).key)
    assert not tier.remove(rec(1).key)
    assert tier.used_bytes == 0 and rec(1).key not in tier  # at once
    assert tier.flush(10) and files(tier) == []  # the file follows, in order


def test_a_second_process_cannot_open_the_same_data_dir(tmp_path: Path, tier: DiskTier) -> None:
    code = textwrap.dedent(
        f"""
        from lmcache_mesh.node.tiers import DiskTier
        from lmcache_mesh.node import MeshError
        try:
            DiskTier({str(tier.data_dir)!r}, 1000).open()
        except MeshError as exc:
            print("refused:", exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "refused:" in out and "in use by another node" in out


def test_failing_disk_write_is_counted_and_the_tier_keeps_serving(tmp_path: Path) -> None:
    """A write that fails (file size limit: EFBIG, like a full disk) stores nothing and loses nothing else."""
    code = textwrap.dedent(
        f"""
        import resource, signal
        from lmcache_mesh.node import ChunkRecord
        from lmcache_mesh.node.tiers import DiskTier
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        def write(tier, record):
            tier.submit(record)
            tier.flush(timeout_s=10)
            return tier.holds(record)
        tier = DiskTier({str(tmp_path)!r}, 10_000_000)
        tier.open()
        small = ChunkRecord.build(b"a" * 16, b"x" * 1000, b"n" * 16)
        assert write(tier, small)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        big = ChunkRecord.build(b"b" * 16, b"y" * 100_000, b"n" * 16)
        assert not write(tier, big)
        assert tier.counters.write_errors == 1
        assert tier.read(big.key) is None
        assert bytes(tier.read(small.key).payload) == b"x" * 1000
        assert write(tier, ChunkRecord.build(b"c" * 16, b"z" * 1000, b"n" * 16))
        tier.close()
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
    assert not list(tmp_path.rglob("*.tmp"))
    assert len(list(tmp_path.rglob("*.rec"))) == 2


def test_closed_data_dir_reopens_with_everything(tmp_path: Path) -> None:
    t = DiskTier(tmp_path, 100_000)
    t.open()
    for i in range(3):
        t.submit(rec(i))
    t.close()  # finishes queued writes
    t2 = DiskTier(tmp_path, 100_000)
    assert t2.open().recovered == 3
    t2.close()


def test_negative_budget_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="disk capacity"):
        DiskTier(tmp_path, -1)
