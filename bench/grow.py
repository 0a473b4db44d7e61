"""Growing a trained system: a domain held back from training, then added with `mode-ray add-data`.

    python bench/grow.py [--config configs/demo.yaml] [--held-out letters] [--seeds 1] [--root runs/grow]

For each training seed: the demo system (prep, seed, experts, generalist) built from the demo data *without*
one domain, evaluated on every demo task (`before`); then that domain's shards added with add-data (new
experts for what the clusters do not cover, trained alone from the seed) and the system evaluated again
(`after`). Prints, per task, the routed ensemble's accuracy before and after (the added domain's task, and
the old domains' — the claim is "without compromising": within noise), the routing hit rate on the added
task, what add-data decided, and the cost of adding (seconds, samples) against the training it did not
redo. Writes ROOT/grow.md and ROOT/grow.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import accuracy_rows  # noqa: E402 — the report.csv reader the quality benchmark uses

TASK_OF = {"digits": "digit", "shapes": "shape", "textures": "texture", "letters": "letter"}
MODELS = ("ensemble-calibrated", "ensemble-reference", "generalist")


def one_seed(config: str, held_out: str, seed: int, root: Path, extra: list[str]) -> dict[str, Any]:
    from mode_ray import demo_data
    from mode_ray.config import load_config
    from mode_ray.layout import RunPaths
    from mode_ray.runtime import ray_runtime
    from mode_ray.stages.demo import run_demo_data
    from mode_ray.stages.evaluate import run_eval
    from mode_ray.stages.grow import run_add_data
    from mode_ray.stages.prep import run_prep
    from mode_ray.stages.train import run_train
    from mode_ray.storage import read_json

    run = root / f"seed-{seed}"
    kept = [d for d in demo_data.DOMAINS if d != held_out]
    sets = [*extra, f"run_root={run}", f"training.seed={seed}", f"data.demo.domains={json.dumps(kept)}"]
    sets += ["moe.enabled=false", "training.matched_control=false"]
    cfg = load_config(config, sets)
    run_demo_data(cfg, False)
    new = run / "data" / f"added-{held_out}"
    demo = cfg.data.demo
    samples = round(demo.samples / len(demo_data.DOMAINS))  # one domain's share of the full demo data
    demo_data.generate(str(new), samples=samples, shards=2, seed=seed + 1000, domains=[held_out])
    with ray_runtime(cfg):
        run_prep(cfg)
        start = time.perf_counter()
        trained = run_train(cfg)
        train_s = time.perf_counter() - start
        run_eval(cfg)
        before = accuracy_rows(run / "eval" / "report.csv")
        routing_before = added_task_routing(run, TASK_OF[held_out])
        grow_cfg = load_config(config, [*sets, f"continual.shards={new}", f"continual.name=added-{held_out}"])
        start = time.perf_counter()
        generation = run_add_data(grow_cfg)
        add_s = time.perf_counter() - start
        run_eval(grow_cfg, force=True)
        after = accuracy_rows(run / "eval" / "report.csv")
        routing_after = added_task_routing(run, TASK_OF[held_out])
    summary = read_json(RunPaths(str(run)).experts_summary)
    new_samples = sum(summary["models"][e]["samples_seen"] for e in generation["new_experts"])
    everything = sum(m["samples_seen"] for name, m in trained["models"].items())
    return {
        "before": before,
        "after": after,
        "routing_before": routing_before,
        "routing_after": routing_after,
        "decision": {k: generation[k] for k in ("uncovered", "valid_samples", "coverage_threshold", "new_experts")},
        "new_expert_sizes": generation["new_expert_sizes"],
        "cost": {
            "add_seconds": add_s,
            "add_samples": new_samples,
            "train_seconds": train_s,
            "train_samples": everything,
        },
    }


def added_task_routing(run: Path, task: str) -> dict[str, Any]:
    """Per routing method, where the added domain's task is routed: top expert, its weight, expert-max's pick."""
    from mode_ray.storage import read_json

    return {
        r["method"]: {
            "top_expert": r["top_expert"],
            "weight": max(r["weights"]),
            "expert_max_pick": r["expert_max_pick"],
            "hit": r["hit"],
        }
        for r in read_json(str(run / "eval" / "routing.json"))
        if r["task"] == task
    }


def tables(held_out: str, per_seed: dict[int, dict[str, Any]]) -> str:
    """Zero-shot accuracy (%) before and after, mean over seeds with each seed's difference; then per seed
    what add-data decided, where the added task was routed, and what adding cost."""
    import numpy as np

    added = TASK_OF[held_out]
    first = next(iter(per_seed.values()))["before"][MODELS[0]]
    zero_shot = [t for t in first if t != "average" and "_r@" not in t]  # the tasks, not the retrieval recalls
    tasks = [added, *[t for t in zero_shot if t != added]]
    lines = [f"Added domain: {held_out} (task `{added}`); {len(per_seed)} training seed(s).", ""]
    lines += ["| model | task | before | after | after − before (per seed) |", "|---|---|---|---|---|"]
    for model in MODELS:
        for task in tasks:
            b = 100 * np.array([r["before"][model][task] for r in per_seed.values()])
            a = 100 * np.array([r["after"][model][task] for r in per_seed.values()])
            lines.append(
                f"| {model} | {task}{' (added)' if task == added else ''} | {b.mean():.1f} | {a.mean():.1f} | "
                f"{(a - b).mean():+.1f} ({', '.join(f'{d:+.1f}' for d in a - b)}) |"
            )
    lines.append("")
    for seed, r in per_seed.items():
        c, d = r["cost"], r["decision"]
        new = d["new_experts"]
        own = ", ".join(f"{e} alone {100 * r['after'][e][added]:.1f}%" for e in new if e in r["after"])
        where = "; ".join(
            f"{m}: {r['routing_before'][m]['top_expert']} → {v['top_expert']} (weight {v['weight']:.2f}, "
            f"expert-max {v['expert_max_pick']})"
            for m, v in r["routing_after"].items()
        )
        lines.append(
            f"- seed {seed}: {d['uncovered']} of {d['valid_samples']} added samples below the coverage threshold "
            f"{d['coverage_threshold']:.3f} → new experts {new} {r['new_expert_sizes']} ({own}); the `{added}` "
            f"task routed {where}; adding cost {c['add_seconds']:.0f} s and {c['add_samples']:,} training samples, "
            f"against {c['train_seconds']:.0f} s and {c['train_samples']:,} samples to train the system."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--held-out", default="letters", choices=list(TASK_OF))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--root", default="runs/grow")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--report-only", action="store_true", help="print the tables of ROOT/grow.json again")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    if args.report_only:
        per_seed = {int(k): v for k, v in json.loads((root / "grow.json").read_text()).items()}
    else:
        per_seed = {s: one_seed(args.config, args.held_out, s, root, args.overrides) for s in range(args.seeds)}
    text = tables(args.held_out, per_seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "grow.md").write_text(text + "\n")
    (root / "grow.json").write_text(json.dumps(per_seed, indent=1, default=str))
    print(text)
    return text


if __name__ == "__main__":
    main()
