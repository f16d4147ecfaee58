"""What CurveZMQ costs: GET throughput and lookup latency with it on vs off, same run.

Two real ``lmcache-node run`` daemons on loopback, identical but for security: one plain,
one with CurveZMQ (its own key pair, an allow-list holding the client's key). A client
process holds records of 1, 4 and 16 MiB on each and GETs them for ``--seconds`` per round,
with 1 and 4 requests in flight; rounds alternate plain/curve (the machine is shared and
noisy), and the table shows medians and the curve/plain ratio. Also LOOKUP round trips
(p50), where only the handshake-free per-message cost shows. Prints a table, writes JSON.

    python bench/bench_curve.py [--seconds 2] [--rounds 3] [--out bench/results/curve.json]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import machine_info, start_mesh_daemon, wait_for, write_results
from rich.progress import track

from lmcache_mesh.engines.cli.launch import Daemon
from lmcache_mesh.engines.cli.tables import render, table
from lmcache_mesh.node import AsyncClient, ChunkRecord, chunk_keys, namespace_id
from lmcache_mesh.node.keyring import read_key_pair, write_key_pair
from lmcache_mesh.transports.curve import CurveClient

SIZES = [1 << 20, 4 << 20, 16 << 20]
INFLIGHT = [1, 4]
NS = namespace_id(b"bench-curve", {"engine": "bench"}, chunk_tokens=16)
KEYS = chunk_keys(NS, list(range(16 * len(SIZES))), chunk_tokens=16)


def make_keys(root: Path) -> tuple[Path, Path, CurveClient]:
    """Key files for the secured node and the client; returns (node key, allow-list, client creds)."""
    node_key = root / "node.key_secret"
    node = write_key_pair(node_key, "node42")
    client = write_key_pair(root / "bench.key_secret", "bench")
    allow = root / "authorized_keys"
    allow.write_text(f"{node.public} node42 node\n{client.public} bench admin\n")
    return node_key, allow, CurveClient(read_key_pair(root / "bench.key_secret")[1], node.public)


async def get_rate(client: AsyncClient, key: bytes, size: int, inflight: int, seconds: float) -> float:
    """MB/s of GET replies of ``size`` bytes with ``inflight`` requests outstanding."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            (got,) = await client.get([key])
            if got is None or len(got) != size:
                raise RuntimeError("GET missed a record it holds")
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return done * size / (time.perf_counter() - started) / 1e6


async def lookup_p50_us(client: AsyncClient, reps: int = 300) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        await client.lookup(KEYS[:1], local=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


async def measure(plain: Daemon, secured: Daemon, creds: CurveClient, args: Any) -> dict[str, Any]:
    clients = {
        "plain": AsyncClient(plain.tcp, timeout_s=30),
        "curve": AsyncClient(secured.tcp, timeout_s=30, curve=creds),
    }
    samples: dict[str, dict[str, list[float]]] = {m: {} for m in clients}
    try:
        for c in clients.values():
            for key, size in zip(KEYS, SIZES, strict=False):
                await c.put_records([ChunkRecord.build(key, bytes([7]) * size, NS)])
            await get_rate(c, KEYS[0], SIZES[0], 1, 0.3)  # warm up connections
        for _ in track(range(args.rounds), description="alternating rounds"):
            for mode, c in clients.items():
                for key, size in zip(KEYS, SIZES, strict=False):
                    for inflight in INFLIGHT:
                        rate = await get_rate(c, key, size, inflight, args.seconds)
                        samples[mode].setdefault(f"{size >> 20}MiB x{inflight}", []).append(rate)
                samples[mode].setdefault("lookup_p50_us", []).append(await lookup_p50_us(c))
    finally:
        for c in clients.values():
            await c.aclose()
    return {mode: {k: statistics.median(v) for k, v in s.items()} for mode, s in samples.items()}


def cipher_rates(size: int = 4 << 20, reps: int = 20) -> dict[str, float]:
    """MB/s of one core sealing and opening ``size``-byte messages with the AEADs a faster
    bulk path could use (OpenSSL through ``cryptography``, AES-NI where present): the ceiling
    any encrypted transport reaches on this machine."""
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
    except ImportError:
        return {}
    data = bytes(size)
    out: dict[str, float] = {}
    for name, cipher in (("aes256gcm", AESGCM(bytes(32))), ("chacha20poly1305", ChaCha20Poly1305(bytes(32)))):
        t0 = time.perf_counter()
        for _ in range(reps):
            sealed = cipher.encrypt(bytes(12), data, None)
        t1 = time.perf_counter()
        for _ in range(reps):
            cipher.decrypt(bytes(12), sealed, None)
        t2 = time.perf_counter()
        out[f"{name}_seal_mb_s"] = reps * size / (t1 - t0) / 1e6
        out[f"{name}_open_mb_s"] = reps * size / (t2 - t1) / 1e6
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per measurement (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds, medians reported (default 3)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "curve.json")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lmbm-curve-", dir="/tmp"))
    node_key, allow, creds = make_keys(root)
    print("starting a plain and a CurveZMQ node ...", flush=True)
    plain = start_mesh_daemon(41, None, "--curve", "off", memory="512MiB")
    secured = start_mesh_daemon(
        42, None, "--key", str(node_key), "--authorized-keys", str(allow), memory="512MiB"
    )
    try:
        if wait_for(lambda: any("CurveZMQ on" in line for line in secured.lines), 10) is None:
            raise RuntimeError("the secured node did not turn CurveZMQ on:\n" + "\n".join(secured.lines))
        medians = asyncio.run(measure(plain, secured, creds, args))
    finally:
        plain.stop()
        secured.stop()
    rows = []
    t = table("GET", "plain MB/s", "curve MB/s", "curve/plain")
    for name, plain_v in medians["plain"].items():
        curve_v = medians["curve"][name]
        ratio = curve_v / plain_v if name != "lookup_p50_us" else plain_v / curve_v
        rows.append({"case": name, "plain": plain_v, "curve": curve_v, "ratio": ratio})
        unit = "µs" if name == "lookup_p50_us" else ""
        t.add_row(name, f"{plain_v:.1f}{unit}", f"{curve_v:.1f}{unit}", f"{ratio:.3f}")
    print()
    print(render(t, indent=0))
    four = next(r for r in rows if r["case"] == "4MiB x4")
    print(
        f"\n4 MiB GETs keep {100 * four['ratio']:.0f}% of plain tcp throughput with CurveZMQ "
        f"(target: >= 70%); lookup ratio is plain/curve latency."
    )
    ciphers = cipher_rates()
    if ciphers:
        plain4 = four["plain"]
        seal, opened = ciphers["aes256gcm_seal_mb_s"], ciphers["aes256gcm_open_mb_s"]
        # Sealing on the sender and opening on the receiver add their time to each transfer
        # unless other cores absorb them; the two bounds bracket any AES-GCM transport here.
        serial = 1 / (1 + plain4 / seal + plain4 / opened)
        overlapped = min(1.0, seal / plain4, opened / plain4)
        ciphers.update(aes_ceiling_serial=serial, aes_ceiling_overlapped=overlapped)
        print(
            f"one core seals/opens 4 MiB: AES-256-GCM {seal:.0f}/{opened:.0f} MB/s, ChaCha20-Poly1305 "
            f"{ciphers['chacha20poly1305_seal_mb_s']:.0f}/{ciphers['chacha20poly1305_open_mb_s']:.0f} MB/s: "
            f"an AES-GCM transport would keep {100 * serial:.0f}% (serial) to {100 * overlapped:.0f}% "
            f"(fully overlapped on spare cores) of plain tcp here"
        )
    write_results(
        {
            "benchmark": "curve",
            "machine": machine_info(seconds=args.seconds, rounds=args.rounds),
            "rows": rows,
            "ciphers": ciphers,
            "target_4mib_ratio": 0.7,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
