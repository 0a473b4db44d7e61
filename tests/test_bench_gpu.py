"""`bench/gpu.py --smoke`: the GPU benchmark's every part through the same code on CPU with a tiny model (its
figures mean nothing here). A process of its own: the deterministic part switches torch's global flag."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO


def test_gpu_benchmark_smoke_mode_runs_every_part_and_prints_its_ratios() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for part in ("(1) training step", "(2) training.run.deterministic", "(3) CLIP-MoE", "(4) caption embedding"):
        assert part in out, out
    ratios = [float(r) for r in re.findall(r"ratio (?:loop / bare: )?([0-9.]+)x", out)]
    assert len(ratios) == 3 and all(r > 0 for r in ratios), out
    assert out.count("same bytes twice: True") == 2, out  # on CPU both modes repeat to the bit
    assert "MFU n/a" in out  # no GPU peak on a CPU
