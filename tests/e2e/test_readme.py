"""The README's command blocks, run as a newcomer copies them (ports and paths made free)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from lmcache_mesh.node import ChunkRecord, Client, chunk_keys, namespace_id

from ..helpers import free_port
from .test_mesh import wait_until

README = Path(__file__).resolve().parents[2] / "README.md"


def code(heading: str, language: str) -> str:
    """The first ``language`` block under ``heading``, as written."""
    text = README.read_text()
    section = text[text.index(heading) :]
    body = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert body is not None, f"no {language} block under {heading!r}"
    return body.group(1)


def block(heading: str) -> list[str]:
    """The first bash block under ``heading``, one command per line (comments dropped)."""
    return [line.split("  #")[0].strip() for line in code(heading, "bash").splitlines() if line.strip()]


def test_a_mesh_on_one_machine_as_the_readme_runs_it(tmp_path: Path) -> None:
    lines = block("## A mesh on one machine")
    text = "\n".join(lines)
    for port in sorted(set(re.findall(r"127\.0\.0\.1:(77\d\d)", text))):
        text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}")
    for name in sorted(set(re.findall(r"/tmp/lmc-(\w+)", text))):
        text = text.replace(f"/tmp/lmc-{name}", str(tmp_path / name))
    procs: list[subprocess.Popen[bytes]] = []
    addresses: dict[str, str] = {}
    try:
        for line in text.splitlines():
            argv = shlex.split(line.rstrip("&").strip())
            assert argv[0] == ".venv/bin/lmcache-node", line
            command = [sys.executable, "-m", "lmcache_mesh.engines.cli", *argv[1:]]
            if line.endswith("&"):
                procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                name, listen = argv[argv.index("--name") + 1], argv[argv.index("--listen") + 1]
                addresses[name] = listen
                assert wait_until(lambda a=listen: _answers(a), 30) is not None, f"{line}: no answer"
            else:
                done = subprocess.run(command, capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, f"{line}\n{done.stdout}{done.stderr}"
        assert set(addresses) == {"a", "b", "c"}

        def three() -> bool:
            with Client(addresses["b"], timeout_s=5) as c:
                return sum(m["state"] == "alive" for m in c.stats()["members"]) == 3

        assert wait_until(three, 30) is not None
        # "A chunk PUT on a is ... found by LOOKUP/GET on b or c"
        ns = namespace_id(b"readme", {"engine": "test"}, 16)
        keys = chunk_keys(ns, list(range(16 * 8)), 16)
        with Client(addresses["a"]) as a:
            a.put_records([ChunkRecord.build(k, bytes([i]) * 1024, ns) for i, k in enumerate(keys)])
        time.sleep(0.5)
        for other in ("b", "c"):
            with Client(addresses[other]) as c:
                assert wait_until(lambda c=c: c.lookup(keys) == len(keys), 10) is not None
                got = c.get_records(keys)
                assert all(r is not None and bytes(r.payload) == bytes([i]) * 1024 for i, r in enumerate(got))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def _answers(address: str) -> bool:
    try:
        with Client(address, timeout_s=1.0) as c:
            c.ping()
        return True
    except Exception:
        return False
