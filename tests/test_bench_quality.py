"""The quality and stability benchmarks end to end on a tiny config (no timing, no accuracy threshold), in one
benchmark root: both read one prep, as variants of a study do (the second finds it complete). They run in a
process of their own beside the rest of the suite from the session's start (tests/bench_in_background.py),
and these tests, last but the jobs', assert what they printed and wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import bench_in_background


@pytest.fixture(scope="module")
def bench_runs() -> tuple[Path, str]:
    """The benchmarks' root and everything they printed."""
    return bench_in_background.start().result()


def test_quality_benchmark_prints_means_and_paired_intervals(bench_runs):
    """Two training seeds of every model the benchmark compares; the experts and generalists train from scratch
    (`training.use_seed=false`): the tables and intervals are the same code whatever the models continue."""
    root, printed = bench_runs
    text = (root / "quality.out").read_text()
    assert text in printed
    assert "| ensemble-calibrated |" in text and "| generalist-matched |" in text and " ± " in text
    differences = [line for line in text.splitlines() if " − " in line]
    assert len(differences) == 3 and all(line.count("[") == 6 for line in differences)  # 5 tasks + average
    raw = json.loads((root / "quality.json").read_text())
    assert set(raw["per_seed"]) == {"0", "1"}
    first = raw["per_seed"]["0"]["accuracy"]["ensemble-calibrated"]
    assert set(first) == {"digit", "shape", "color", "texture", "letter", "average"}
    assert (root / "seed-1" / "manifest").is_symlink()  # one prep, shared by every seed
    assert (root / "quality.md").read_text().count("|") > 50


def test_stability_benchmark_shows_the_spread_and_that_a_repeated_seed_is_the_same_run(bench_runs):
    """Two seeds of the seed model alone and seed 0 again: per-seed held-out numbers, their spread, the
    repeat's weights the same bytes, the curves drawn, and earlier runs' curves side by side."""
    root, printed = bench_runs
    text = (root / "stability.out").read_text()
    assert text in printed
    rows = [line for line in text.splitlines() if line.startswith("| seed | held-out loss |")]
    assert len(rows) == 1 and rows[0].count("|") == 9  # model, metric, 2 seeds, mean, sd, min/median/max, min ÷ median
    assert any(line.startswith("| seed | training-loss jitter |") for line in text.splitlines())
    assert "Seed 0 run twice: 1 of 1 models' weights are the same bytes." in text
    raw = json.loads((root / "t-stability.json").read_text())
    first, again = raw["runs"]["0"]["seed"], raw["repeat"][1]["seed"]
    assert first["weights_sha256"] == again["weights_sha256"] != raw["runs"]["1"]["seed"]["weights_sha256"]
    assert all(g is not None and g > 0 for _, g in first["grad_norm_curve"])
    assert (root / "t-curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (root / "t-repeat-0" / "manifest").is_symlink()
    assert (root / "compared.png").read_bytes()[:4] == b"\x89PNG"  # earlier runs side by side (one, twice, named)
