"""The GPU check runs on the CPU too (a small geometry), so it never rots before a GPU is
lent: the worker's real save and load path, verified block for block, and its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_dataplane.py"


def test_the_gpu_check_runs_on_the_cpu_and_verifies_what_it_loaded(tmp_path: Path) -> None:
    out = tmp_path / "gpu_dataplane.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--device", "cpu", "--reps", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=SCRIPT.parent,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["transport"] == "shared memory" and result["chunks"] == 4
    assert result["load_all_first_s"] > 0 and result["load_layerwise_s"] > 0 and result["prefill_s"] > 0
    assert set(result["targets"]) == {"load_vs_pinned_h2d", "load_vs_prefill"}
    assert "load, layer by layer" in run.stdout
