"""Quality benchmark: do routed data experts beat one dense model, at what cost — over training seeds.

    python bench/quality.py [--config configs/demo.yaml] [--seeds 3] [--root runs/quality] [--set k=v ...]

One prep (demo data, caption embedding, clustering, assignment, decoded inputs) in ROOT/prep; then, for each
training seed, the whole training (seed model, experts, generalist, generalist-matched) and the evaluation in
its own run root ROOT/seed-K, which shares the prep. Prints, per task and on average, each model's zero-shot
accuracy as mean ± sd over seeds with its training compute (samples, seconds spent learning), and the paired
differences — ensemble-calibrated − generalist, ensemble-calibrated − generalist-matched,
ensemble-reference − all_unit — with 95% t-intervals over seeds. Writes ROOT/quality.md (the tables) and
ROOT/quality.json (every per-seed number, to recompute them).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = ("embeddings", "rejects", "clusters", "manifest", "prep", "train_inputs")  # what every seed reuses
DIFFERENCES = (
    ("ensemble-calibrated", "generalist"),
    ("ensemble-calibrated", "generalist-matched"),
    ("ensemble-reference", "all_unit"),
    ("moe", "generalist"),  # the CLIP-MoE against its base (moe.base: generalist by default)
    ("moe", "generalist-matched"),
    ("moe", "ensemble-calibrated"),
)
AVERAGE = "average"
RETRIEVAL = ("i2t_r@1", "t2i_r@1", "i2t_r@5", "t2i_r@5")


def prepare(config: str, overrides: list[str], root: Path) -> list[str]:
    """Prep once in ROOT/prep; returns the overrides that point every seed's run at its data."""
    from mode_ray.config import load_config
    from mode_ray.data.train_data import build_input_cache
    from mode_ray.ray_env.runtime import ray_runtime
    from mode_ray.run_root.layout import RunPaths
    from mode_ray.run_root.storage import read_json
    from mode_ray.stages.demo import run_demo_data
    from mode_ray.stages.prep import run_prep

    cfg = load_config(config, [*overrides, f"run_root={root / 'prep'}"])
    run_demo_data(cfg, False)
    with ray_runtime(cfg):
        run_prep(cfg)
        build_input_cache(cfg, read_json(RunPaths(cfg.run_root).prep_summary).get("manifest_run_id", ""))
    shards = [f"data.shards={json.dumps(cfg.data.shards)}"]
    return shards + ([f"eval.shards={json.dumps(cfg.eval.shards)}"] if cfg.eval.shards else [])


def seed_root(root: Path, seed: int, name: str | None = None) -> Path:
    """ROOT/seed-K (or ROOT/name), its prep outputs linked from ROOT/prep (the completion markers come along)."""
    from mode_ray.run_root.ownership import claim_run_root

    run = root / (name or f"seed-{seed}")
    claim_run_root(str(run))  # before the links: a run root holding them must already be ours
    for name in SHARED:
        link, target = run / name, root / "prep" / name
        if target.exists() and not link.exists():
            link.symlink_to(target, target_is_directory=True)
    return run


def train_and_evaluate(config: str, overrides: list[str], run: Path, seed: int) -> dict[str, Any]:
    from mode_ray.config import load_config
    from mode_ray.ray_env.runtime import ray_runtime
    from mode_ray.run_root.layout import RunPaths
    from mode_ray.run_root.storage import read_json
    from mode_ray.stages.evaluate import run_eval
    from mode_ray.stages.train import run_train

    cfg = load_config(config, [*overrides, f"run_root={run}", f"training.seed={seed}"])
    with ray_runtime(cfg):
        summary = run_train(cfg, with_moe=True)  # as `mode-ray run`: the MoE's jobs beside the tails
        moe = read_json(RunPaths(cfg.run_root).moe_summary) if cfg.moe.enabled else None
        run_eval(cfg)
    compute = {**summary["compute"], **({"moe": moe["compute"]} if moe else {})}
    return {"accuracy": accuracy_rows(run / "eval" / "report.csv"), "compute": compute}


def accuracy_rows(report_csv: Path) -> dict[str, dict[str, float]]:
    """model → {task: accuracy, 'average': mean over tasks, retrieval recall: value} from a report.csv."""
    table: dict[str, dict[str, float]] = {}
    recall: dict[str, dict[str, float]] = {}
    with open(report_csv) as f:
        for row in csv.DictReader(f):
            if row["metric"] == "accuracy":
                table.setdefault(row["model"], {})[row["task"]] = float(row["value"])
            elif row["metric"] in RETRIEVAL:
                recall.setdefault(row["model"], {})[row["metric"]] = float(row["value"])
    for model, row in table.items():
        row[AVERAGE] = sum(row.values()) / len(row)
        row.update(recall.get(model, {}))
    return table


def model_cost(model: str, compute: dict[str, Any]) -> dict[str, float] | None:
    """Training compute behind a report row: an ensemble or control costs the whole ensemble."""
    if model in compute:
        return compute[model]
    if model.startswith("ensemble-") or model in ("all_unit", "expert-max"):
        return compute.get("ensemble")
    return None


def tables(per_seed: dict[int, dict[str, Any]]) -> str:
    from bench.seeds import mean_sd, paired_interval

    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]["accuracy"]
    models = list(first)
    tasks = [t for t in next(iter(first.values())) if t != AVERAGE and t not in RETRIEVAL]
    columns = [*tasks, AVERAGE, *[m for m in RETRIEVAL if all(m in row for row in first.values())]]

    def values(model: str, column: str) -> list[float]:
        return [100 * per_seed[s]["accuracy"][model][column] for s in seeds]

    lines = [
        f"Zero-shot accuracy and retrieval recall (%), mean ± sd over {len(seeds)} training seeds "
        f"({', '.join(map(str, seeds))}); training compute per model (the seed's share included; an ensemble "
        "pays for the seed and every expert, the MoE for its base, its MCL stages and its router).",
        "",
        "| model | " + " | ".join(columns) + " | compute (samples) | learning (s) |",
        "|" + "---|" * (len(columns) + 3),
    ]
    for model in models:
        cells = ["{:.1f} ± {:.1f}".format(*mean_sd(values(model, c))) for c in columns]
        costs = [model_cost(model, per_seed[s]["compute"]) for s in seeds]
        samples = f"{costs[0]['samples']:,.0f}" if costs[0] else "–"
        seconds = "{:.0f} ± {:.0f}".format(*mean_sd([c["train_seconds"] for c in costs])) if costs[0] else "–"
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {samples} | {seconds} |")
    lines += [
        "",
        f"Paired differences (points), mean [95% t-interval over {len(seeds)} seeds]:",
        "",
        "| difference | " + " | ".join(columns) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    for a, b in DIFFERENCES:
        if a not in first or b not in first:
            continue
        cells = []
        for c in columns:
            iv = paired_interval(values(a, c), values(b, c))
            cells.append(f"{iv.mean:+.1f} [{iv.low:+.1f}, {iv.high:+.1f}]")
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1")
    parser.add_argument("--root", default="runs/quality", help="where the prep and every seed's run go")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override k=v")
    args = parser.parse_args(argv)
    from mode_ray.run_root.ownership import claim

    root = Path(args.root).resolve()
    claim(str(root), "bench/quality.py")  # never a folder of someone else's
    # The compute-matched control is what this benchmark is for, whatever the config says (the demo skips it).
    requested = ["training.matched_control=true", *args.overrides]
    overrides = [*requested, *prepare(args.config, requested, root)]
    per_seed = {}
    for seed in range(args.seeds):
        per_seed[seed] = train_and_evaluate(args.config, overrides, seed_root(root, seed), seed)
    text = tables(per_seed)
    header = f"`python bench/quality.py --config {args.config} --seeds {args.seeds}" + "".join(
        f" --set {o}" for o in args.overrides
    )
    (root / "quality.md").write_text(f"# Quality over training seeds\n\n{header}`\n\n{text}")
    (root / "quality.json").write_text(json.dumps({"args": vars(args), "per_seed": per_seed}, indent=2))
    print(text)
    print(f"written: {root / 'quality.md'}, {root / 'quality.json'}")
    return text


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
