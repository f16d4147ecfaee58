"""`lmcache-node demo` as a new user runs it: real nodes, real llama.cpp engines, a PNG."""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

import pytest

from ..helpers import node_command, require


@pytest.mark.timeout(300)
def test_demo_runs_a_mesh_and_shows_cold_and_hit_requests_from_local_and_peer_nodes(tmp_path: Path) -> None:
    require("llama_cpp")
    plot = tmp_path / "demo.png"
    cmd = node_command("demo")
    out = subprocess.run(
        [*cmd, "--conversations", "2", "--turns", "2", "--system-tokens", "300", "--model", "random", "--preset", "tiny",
         "--chunk-tokens", "64", "--plot", str(plot), "--workdir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=280,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    row = re.compile(
        r"^\s*\d+\s+(\d+)\s+(\d+)\s+(engine \w) @ (\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(cold|local node|peer node)$"
    )
    rows = [m.groups() for ln in out.stdout.splitlines() if (m := row.match(ln))]
    assert len(rows) == 4, out.stdout
    assert rows[0][7] == "cold" and rows[0][5] == "0"  # the very first request has nothing to reuse
    assert any(r[7] == "peer node" for r in rows), out.stdout  # engine B reuses A's prompt via a peer
    for r in rows[1:]:
        assert (r[7] == "cold") == (r[5] == "0"), r  # a hit reused tokens, a cold request none
        assert int(r[5]) <= int(r[4])
    assert "median TTFT: cold" in out.stdout and "faster" in out.stdout
    assert "[" in out.stderr and "4/4" in out.stderr  # the progress bar
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (800, 420)
    # nothing left running
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "work")], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""


@pytest.mark.timeout(300)
def test_the_default_demo_runs_the_real_model_and_shows_its_answers(tmp_path: Path) -> None:
    require("llama_cpp")
    out = subprocess.run(
        [*node_command("demo"), "--conversations", "2", "--turns", "1", "--system-tokens", "200",
         "--chunk-tokens", "64", "--plot", str(tmp_path / "demo.png"), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "question → answer" in out.stdout
    answers = [ln.split(" → ", 1)[1] for ln in out.stdout.splitlines() if " → " in ln and ln[:1].isdigit()]
    assert len(answers) == 2 and all(len(a.split()) >= 3 for a in answers), out.stdout  # words, not noise
    assert "When was the lighthouse built?" in out.stdout
