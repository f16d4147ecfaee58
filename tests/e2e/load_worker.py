"""One client process of the fault test: a steady PUT/GET load against one node.

Run as ``python tests/e2e/load_worker.py ADDRESS WORKER_ID WORKERS SUMMARY_JSON [options]``.

Every key and payload is a pure function of (worker, i), and every payload a pure function
of its key, so any GET result can be checked by anyone: it must be a miss (None) or exactly
the bytes that were put. Each GET is logged as ``[time, kind, outcome, worker, i, ms]``;
the summary JSON holds the counts and that log, and is written even if the load fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from lmcache_mesh.node import Client, MeshError, namespace_id

NAMESPACE = namespace_id(b"fault-test-model", {"engine": "fault-test"}, 16)
PAYLOAD_UNIT = 4096
PAYLOAD_UNITS = 64  # payloads of 4 KiB .. 256 KiB

HIT, MISS, ERROR, WRONG = "hit", "miss", "error", "wrong"


def key_of(worker: int, i: int) -> bytes:
    return hashlib.blake2b(f"fault-test/{worker}/{i}".encode(), digest_size=16).digest()


def payload_of(key: bytes) -> bytes:
    """The only bytes a GET of ``key`` may ever return: 4 KiB .. 256 KiB, derived from the key."""
    size = PAYLOAD_UNIT * (1 + key[0] % PAYLOAD_UNITS)
    return hashlib.shake_256(b"fault-test-payload/" + key).digest(size)


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.worker * 7919 + 1)
    counts = {"puts": 0, "put_errors": 0, HIT: 0, MISS: 0, ERROR: 0, WRONG: 0}
    wrong: list[dict[str, Any]] = []
    errors: dict[str, int] = {}
    error_samples: dict[str, str] = {}

    def note(what: str, exc: Exception) -> None:
        errors[what] = errors.get(what, 0) + 1
        error_samples.setdefault(what, str(exc)[:300])

    log: list[tuple[float, str, str, int, int, float]] = []
    fetched: set[tuple[int, int]] = set()  # other workers' keys read so far
    put = 0  # keys 0..put-1 of this worker have been PUT (or tried)
    client = Client(args.address, timeout_s=args.timeout)
    start = time.time()
    summary: dict[str, Any] = {"worker": args.worker, "address": args.address, "start": start}
    try:
        while put < args.max_puts and time.time() - start < args.duration:
            tick = time.monotonic()
            key = key_of(args.worker, put)
            try:
                client.put(key, payload_of(key), namespace=NAMESPACE)
                counts["puts"] += 1
            except MeshError as exc:
                counts["put_errors"] += 1
                note(f"PUT {type(exc).__name__}", exc)
            put += 1
            # What to read: a key put just now, an older one of ours, and one another worker
            # has probably put by now (its owners are spread over the whole ring).
            wanted: list[tuple[str, int, int]] = [("recent", args.worker, max(put - 1 - rng.randrange(3), 0))]
            if put > 8:
                wanted.append(("old", args.worker, rng.randrange(put - 4)))
            if put > 8 and args.workers > 1:
                # A key of another worker not read here before: this node must fetch it from
                # the mesh (its owners, or the node it was put on), not from its own tiers.
                for _ in range(8):
                    other = rng.choice([w for w in range(args.workers) if w != args.worker])
                    j = rng.randrange(put * 3 // 4)
                    if (other, j) not in fetched:
                        break
                fetched.add((other, j))
                wanted.append(("other", other, j))
            for kind, worker, i in wanted:
                k = key_of(worker, i)
                t = time.time()
                try:
                    got = client.get([k])[0]
                except MeshError as exc:
                    outcome = ERROR
                    note(f"GET {type(exc).__name__}", exc)
                else:
                    if got is None:
                        outcome = MISS
                    elif bytes(got) == payload_of(k):
                        outcome = HIT
                    else:
                        outcome = WRONG
                        if len(wrong) < 20:
                            wrong.append({"key": k.hex(), "kind": kind, "len": len(got), "t": t})
                counts[outcome] += 1
                log.append((round(t, 3), kind, outcome, worker, i, round((time.time() - t) * 1000, 1)))
            # A steady pace, not a flood: the daemons share the same few cores.
            time.sleep(max(0.0, args.pace - (time.monotonic() - tick)))
    except Exception:
        summary["crash"] = traceback.format_exc()
    finally:
        summary.update(
            counts=counts,
            errors=errors,
            error_samples=error_samples,
            wrong_samples=wrong,
            client_checksum_failures=client.checksum_failures,
            keys_put=put,
            end=time.time(),
            log=log,
        )
        client.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("address", help="node to load, tcp://HOST:PORT")
    p.add_argument("worker", type=int, help="this worker's number")
    p.add_argument("workers", type=int, help="how many workers run (their keys are read too)")
    p.add_argument("summary", type=Path, help="where to write the JSON summary")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of load")
    p.add_argument("--max-puts", type=int, default=400, help="most keys put")
    p.add_argument("--pace", type=float, default=0.06, help="least seconds per PUT+GETs round")
    p.add_argument("--timeout", type=float, default=5.0, help="client timeout per call")
    args = p.parse_args(argv)
    summary = run(args)
    tmp = args.summary.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary))
    tmp.replace(args.summary)
    return 1 if "crash" in summary else 0


if __name__ == "__main__":
    sys.exit(main())
