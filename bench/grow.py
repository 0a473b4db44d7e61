"""Growing a trained system: a domain held back from training, then added with `mode-ray add-data`.

    python bench/grow.py [--config configs/demo.yaml] [--held-out letters] [--seeds 1] [--root runs/grow]

For each training seed: the demo system (prep, seed, experts, generalist) built from the demo data *without*
one domain, evaluated on every demo task (`before`); then that domain's shards added with add-data (new
experts for what the clusters do not cover, trained alone from the seed) and the system evaluated again
(`after`). Prints, per task, the routed ensemble's accuracy before and after (the added domain's task, and
the old domains' — the claim is "without compromising": within noise), the routing hit rate on the added
task, what add-data decided, and the cost of adding (seconds, samples) against the training it did not
redo. Writes ROOT/grow.md and ROOT/grow.json.

With --refresh, each seed's grown system then receives as much new data again from the domains it was built
on, added with `add-data --refresh-experts`: the experts whose partitions grew are retrained (their own job,
from the seed, same budget) over their grown partitions. Prints the old tasks before and after the refresh,
what was refreshed and what it cost (ROOT/refresh.md, ROOT/refresh.json). A seed already in ROOT/grow.json
(or ROOT/refresh.json) is not run again: `--seeds 5` on a root with 3 adds two.
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
    from mode_ray.config import load_config
    from mode_ray.demo import demo_data
    from mode_ray.ray_env.runtime import ray_runtime
    from mode_ray.run_root.layout import RunPaths
    from mode_ray.run_root.storage import read_json
    from mode_ray.stages.demo import run_demo_data
    from mode_ray.stages.evaluate import run_eval
    from mode_ray.stages.grow import run_add_data
    from mode_ray.stages.prep import run_prep
    from mode_ray.stages.train import run_train

    run = root / f"seed-{seed}"
    sets = seed_settings(held_out, seed, run, extra)
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


def seed_settings(held_out: str, seed: int, run: Path, extra: list[str]) -> list[str]:
    from mode_ray.demo import demo_data

    kept = [d for d in demo_data.DOMAINS if d != held_out]
    sets = [*extra, f"run_root={run}", f"training.seed={seed}", f"data.demo.domains={json.dumps(kept)}"]
    return [*sets, "moe.enabled=false", "training.matched_control=false"]


def refresh_seed(config: str, held_out: str, seed: int, root: Path, extra: list[str]) -> dict[str, Any]:
    """As much new data again from the built-on domains, added with --refresh-experts; the old tasks
    evaluated before and after."""
    from mode_ray.config import load_config
    from mode_ray.demo import demo_data
    from mode_ray.ray_env.runtime import ray_runtime
    from mode_ray.run_root.layout import RunPaths
    from mode_ray.run_root.names import expert_id
    from mode_ray.run_root.storage import read_json
    from mode_ray.stages.evaluate import run_eval
    from mode_ray.stages.grow import run_add_data

    run = root / f"seed-{seed}"
    sets = seed_settings(held_out, seed, run, extra)
    cfg = load_config(config, sets)
    kept = cfg.data.demo.domains or [d for d in demo_data.DOMAINS if d != held_out]
    new = run / "data" / "more-known"
    samples = round(cfg.data.demo.samples * len(kept) / len(demo_data.DOMAINS))  # the kept domains' share again
    demo_data.generate(str(new), samples=samples, shards=4, seed=seed + 2000, domains=kept)
    more = [*sets, f"continual.shards={new}", "continual.name=more-known", "continual.refresh_experts=true"]
    refresh_cfg = load_config(config, more)
    with ray_runtime(cfg):
        before = accuracy_rows(run / "eval" / "report.csv")
        start = time.perf_counter()
        generation = run_add_data(refresh_cfg)
        seconds = time.perf_counter() - start
        run_eval(refresh_cfg, force=True)
        after = accuracy_rows(run / "eval" / "report.csv")
    models = read_json(RunPaths(str(run)).experts_summary)["models"]
    return {
        "before": before,
        "after": after,
        "added_samples": generation["in_manifest"],
        "new_experts": generation["new_experts"],
        "grown": {e: generation["per_expert"][str(expert_id(e))] for e in generation["grown_experts"]},
        "refreshed": generation["refreshed"],
        "cost": {"seconds": seconds, "samples": sum(models[e]["samples_seen"] for e in generation["refreshed"])},
    }


def refresh_tables(held_out: str, per_seed: dict[int, dict[str, Any]], grown: dict[int, dict[str, Any]]) -> str:
    """The old tasks before and after refreshing the grown experts; per seed what grew and what it cost."""
    first = next(iter(per_seed.values()))["before"][MODELS[0]]
    tasks = [t for t in first if t != "average" and "_r@" not in t and t != TASK_OF[held_out]]
    lines = [f"More data from the built-on domains, added with --refresh-experts; {len(per_seed)} seed(s).", ""]
    lines += [*change_rows(per_seed, tasks), ""]
    for seed, r in per_seed.items():
        c = r["cost"]
        train = grown[seed]["cost"]
        joined = ", ".join(f"{e} +{n}" for e, n in r["grown"].items())
        lines.append(
            f"- seed {seed}: {r['added_samples']} samples added, new experts {r['new_experts']}; grown partitions "
            f"{joined}; refreshed {', '.join(r['refreshed'])} in {c['seconds']:.0f} s and {c['samples']:,} "
            f"training samples, against {train['train_seconds']:.0f} s and {train['train_samples']:,} samples "
            f"to train the system."
        )
    return "\n".join(lines)


def added_task_routing(run: Path, task: str) -> dict[str, Any]:
    """Per routing method, where the added domain's task is routed: top expert, its weight, expert-max's pick."""
    from mode_ray.run_root.storage import read_json

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


def change_rows(per_seed: dict[int, dict[str, Any]], tasks: list[str], added: str = "") -> list[str]:
    """Per model and task: mean accuracy (%) before and after, and the paired change with its 95% t-interval
    over the seeds and each seed's own change."""
    import numpy as np

    from bench.seeds import paired_interval

    lines = [
        f"| model | task | before | after | after − before [95% t-interval over {len(per_seed)} seeds] (per seed) |",
        "|---|---|---|---|---|",
    ]
    for model in MODELS:
        for task in tasks:
            b = [100 * r["before"][model][task] for r in per_seed.values()]
            a = [100 * r["after"][model][task] for r in per_seed.values()]
            iv = paired_interval(a, b)
            each = ", ".join(f"{y - x:+.1f}" for x, y in zip(b, a, strict=True))
            lines.append(
                f"| {model} | {task}{' (added)' if task == added else ''} | {np.mean(b):.1f} | {np.mean(a):.1f} | "
                f"{iv.mean:+.1f} [{iv.low:+.1f}, {iv.high:+.1f}] ({each}) |"
            )
    return lines


def tables(held_out: str, per_seed: dict[int, dict[str, Any]]) -> str:
    """Zero-shot accuracy (%) before and after, mean over seeds with each seed's difference; then per seed
    what add-data decided, where the added task was routed, and what adding cost."""
    added = TASK_OF[held_out]
    first = next(iter(per_seed.values()))["before"][MODELS[0]]
    zero_shot = [t for t in first if t != "average" and "_r@" not in t]  # the tasks, not the retrieval recalls
    tasks = [added, *[t for t in zero_shot if t != added]]
    lines = [f"Added domain: {held_out} (task `{added}`); {len(per_seed)} training seed(s).", ""]
    lines += [*change_rows(per_seed, tasks, added), ""]
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
    parser.add_argument("--refresh", action="store_true", help="then more known-domain data, --refresh-experts")
    parser.add_argument("--report-only", action="store_true", help="print the tables of ROOT/*.json again")
    args = parser.parse_args(argv)
    from mode_ray.run_root.ownership import claim

    root = Path(args.root).resolve()
    claim(str(root), "bench/grow.py")  # never a folder of someone else's
    done = root / "grow.json"
    per_seed = {int(k): v for k, v in json.loads(done.read_text()).items()} if done.exists() else {}
    if not args.report_only:
        for s in range(args.seeds):
            if s not in per_seed:
                per_seed[s] = one_seed(args.config, args.held_out, s, root, args.overrides)
    text = tables(args.held_out, per_seed)
    (root / "grow.md").write_text(text + "\n")
    done.write_text(json.dumps(per_seed, indent=1, default=str))
    refreshed = root / "refresh.json"
    if args.refresh or (args.report_only and refreshed.exists()):
        again = {int(k): v for k, v in json.loads(refreshed.read_text()).items()} if refreshed.exists() else {}
        if not args.report_only:
            for s in per_seed:
                if s not in again:  # a refreshed seed is never refreshed again: its "before" is gone
                    again[s] = refresh_seed(args.config, args.held_out, s, root, args.overrides)
            refreshed.write_text(json.dumps(again, indent=1, default=str))
        refresh_text = refresh_tables(args.held_out, again, per_seed)
        (root / "refresh.md").write_text(refresh_text + "\n")
        text += "\n\n" + refresh_text
    print(text)
    return text


if __name__ == "__main__":
    main()
