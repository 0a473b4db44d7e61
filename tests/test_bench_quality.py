"""The quality benchmark end to end on a tiny config (a smoke test: no timing, no accuracy threshold)."""

from __future__ import annotations

import importlib.util
import json

from tests.conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_benchmark_prints_means_and_paired_intervals(ray_session, tmp_path, capsys):
    tiny = [
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
    args = ["--seeds", "2", "--root", str(tmp_path)]
    text = _bench().main([*args, *[x for o in tiny for x in ("--set", o)]])
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
