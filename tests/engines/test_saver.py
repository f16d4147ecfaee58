"""The background saver: ordered, bounded, never blocking, never dying."""

from __future__ import annotations

import threading

from lmcache_mesh.engines.saver import Saver


def test_jobs_run_in_order_and_flush_waits_for_them() -> None:
    saver = Saver("t")
    done: list[int] = []
    for i in range(20):
        assert saver.submit(lambda i=i: done.append(i), 10)
    assert saver.flush(10)
    assert done == list(range(20)) and saver.stats.done == 20 and saver.stats.pending_bytes == 0
    saver.close()


def test_a_full_queue_drops_new_jobs_instead_of_waiting() -> None:
    saver = Saver("t", max_pending_bytes=100)
    gate = threading.Event()
    assert saver.submit(gate.wait, 60)
    assert not saver.submit(lambda: None, 60)  # 120 > 100: dropped at once
    assert saver.stats.dropped == 1
    gate.set()
    assert saver.flush(10)
    assert saver.submit(lambda: None, 60)  # room again
    saver.close()


def test_a_failing_job_is_counted_and_the_next_still_runs() -> None:
    saver = Saver("t")
    ran: list[str] = []

    def boom() -> None:
        raise OSError("disk full")

    saver.submit(boom, 1)
    saver.submit(lambda: ran.append("next"), 1)
    assert saver.flush(10)
    assert ran == ["next"] and saver.stats.failed == 1 and saver.stats.errors == {"OSError": 1}
    saver.close()


def test_close_runs_what_is_queued_then_refuses_more() -> None:
    saver = Saver("t")
    ran: list[int] = []
    for i in range(5):
        saver.submit(lambda i=i: ran.append(i), 1)
    saver.close()
    assert ran == list(range(5))
    assert not saver.submit(lambda: None, 1)
