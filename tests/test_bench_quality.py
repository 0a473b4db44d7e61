"""The quality and stability benchmarks end to end on a tiny config (no timing, no accuracy threshold), in one
benchmark root: both read one prep, as variants of a study do (the second finds it complete)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import REPO


def _bench(name: str = "quality"):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = [
    "data.demo.samples=240",
    "data.demo.shards=2",
    "data.demo.eval_samples=80",
    "data.demo.eval_shards=1",
    "data.demo.faults=false",
    "embedding.batch_size=128",
    "clustering.n_fine=8",
    "clustering.n_coarse=2",
    "training.samples_per_epoch=128",
    "training.epochs=2",
    "training.batch_size=32",
    "training.warmup_steps=2",
    "training.run.log_every_steps=2",
    "training.run.checkpoint_every_epochs=2",
    "eval.retrieval=false",
    "moe.enabled=false",  # the MoE's own end-to-end test covers it; here it would only add minutes
]


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def test_quality_benchmark_prints_means_and_paired_intervals(ray_session, bench_root, capsys):
    """Two training seeds of every model the benchmark compares; the experts and generalists train from scratch
    (`training.use_seed=false`): the tables and intervals are the same code whatever the models continue."""
    tmp_path = bench_root
    args = ["--seeds", "2", "--root", str(tmp_path)]
    text = _bench().main([*args, *[x for o in (*TINY, "training.use_seed=false") for x in ("--set", o)]])
    assert text in capsys.readouterr().out
    assert "| ensemble-calibrated |" in text and "| generalist-matched |" in text and " ± " in text
    differences = [line for line in text.splitlines() if " − " in line]
    assert len(differences) == 3 and all(line.count("[") == 6 for line in differences)  # 5 tasks + average
    raw = json.loads((tmp_path / "quality.json").read_text())
    assert set(raw["per_seed"]) == {"0", "1"}
    first = raw["per_seed"]["0"]["accuracy"]["ensemble-calibrated"]
    assert set(first) == {"digit", "shape", "color", "texture", "letter", "average"}
    assert (tmp_path / "seed-1" / "manifest").is_symlink()  # one prep, shared by every seed
    assert (tmp_path / "quality.md").read_text().count("|") > 50


def test_stability_benchmark_shows_the_spread_and_that_a_repeated_seed_is_the_same_run(ray_session, bench_root):
    """Two seeds of the seed model alone and seed 0 again: per-seed held-out numbers, their spread, the
    repeat's weights the same bytes, the curves drawn."""
    tmp_path = bench_root
    args = ["--seeds", "2", "--repeat", "0", "--models", "seed", "--root", str(tmp_path), "--tag", "t"]
    text = _bench("stability").main([*args, *[x for o in TINY for x in ("--set", o)]])
    rows = [line for line in text.splitlines() if line.startswith("| seed | held-out loss |")]
    assert len(rows) == 1 and rows[0].count("|") == 9  # model, metric, 2 seeds, mean, sd, min/median/max, min ÷ median
    assert any(line.startswith("| seed | training-loss jitter |") for line in text.splitlines())
    assert "Seed 0 run twice: 1 of 1 models' weights are the same bytes." in text
    raw = json.loads((tmp_path / "t-stability.json").read_text())
    first, again = raw["runs"]["0"]["seed"], raw["repeat"][1]["seed"]
    assert first["weights_sha256"] == again["weights_sha256"] != raw["runs"]["1"]["seed"]["weights_sha256"]
    assert all(g is not None and g > 0 for _, g in first["grad_norm_curve"])
    assert (tmp_path / "t-curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "t-repeat-0" / "manifest").is_symlink()
    compared = tmp_path / "compared.png"  # earlier runs side by side (here the same one twice, named)
    json_file = str(tmp_path / "t-stability.json")
    _bench("stability").main(["--compare", json_file, json_file, "--labels", "a", "b", "--out", str(compared)])
    assert compared.read_bytes()[:4] == b"\x89PNG"
