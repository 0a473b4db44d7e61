"""Stability benchmark: do the runs of one config agree — over training seeds, and one seed run twice?

    python bench/stability.py [--config configs/demo.yaml] [--seeds 3] [--repeat 0] [--models all]
                              [--root runs/stability] [--set k=v ...]

One prep in ROOT/prep (bench/quality.py's), then for each training seed 0..N-1 — and seed `--repeat` once
more, in its own run root, to show that a seed is one run — the training (`--models`: every model the config
plans but the compute-matched control and the MoE, or only the named ones and those they continue) and, when
data experts were trained, the evaluation. Prints per model and seed: the held-out CLIP loss and image→text
accuracy on the held-out manifest rows (what settings are chosen by), the average zero-shot accuracy (what the
goal is stated in) and the training-loss jitter (`loss_jitter`); the spread over seeds (sd, min / median /
max, min ÷ median); whether the repeat's weights are the same bytes; and the held-out loss at every
checkpoint, seeds side by side. Writes ROOT/stability.md, ROOT/stability.json and ROOT/curves.png (training
and held-out loss, gradient norm and logit scale, one line per seed). `--tag T`: runs and files named T-…
beside other variants on the same prep (one prep, several recipes; variants may run at once: a seed is one run
whatever else shares the machine).
`--compare A.json B.json --models seed --out F.png` draws earlier runs' curves side by side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from quality import AVERAGE, accuracy_rows, prepare, seed_root  # noqa: E402  (bench/ is not a package)


def run_one(config: str, overrides: list[str], run: Path, seed: int, models: list[str] | None) -> dict[str, Any]:
    """Train (and evaluate, when there are experts to ensemble) one seed in its run root."""
    from mode_ray.config import load_config
    from mode_ray.ray_env.runtime import ray_runtime
    from mode_ray.stages.evaluate import run_eval
    from mode_ray.stages.train import run_train

    cfg = load_config(config, [*overrides, f"run_root={run}", f"training.seed={seed}"])
    with ray_runtime(cfg):
        summary = run_train(cfg, models=models)
        evaluated = any(name.startswith("expert-") for name in summary["models"])
        if evaluated:
            run_eval(cfg)
    accuracy = accuracy_rows(run / "eval" / "report.csv") if evaluated else {}
    out: dict[str, Any] = {}
    for name, m in summary["models"].items():
        last = m["val_history"][-1]["all"] if m["val_history"] else {}
        out[name] = {
            "heldout_loss": last.get("loss"),
            "heldout_accuracy": last.get("i2t_acc"),
            "train_loss_jitter": loss_jitter([p["loss"] for p in m["loss_history"]]),
            "zero_shot": accuracy.get(name, {}).get(AVERAGE),
            "val_curve": [(v["step"], v["all"]["loss"]) for v in m["val_history"]],
            "train_curve": [(p["step"], p["loss"]) for p in m["loss_history"]],
            "grad_norm_curve": [(p["step"], p.get("grad_norm_max")) for p in m["loss_history"]],
            "logit_scale_curve": [(p["step"], p.get("logit_scale")) for p in m["loss_history"]],
            "weights_sha256": weights_digest(run / "experts" / name),
        }
    for name in ("ensemble-calibrated", "ensemble-reference"):
        if name in accuracy:
            out[name] = {"zero_shot": accuracy[name][AVERAGE]}
    return out


def weights_digest(folder: Path) -> str | None:
    """sha256 of the export's weights (what a repeat must reproduce byte for byte; the training state beside
    them also holds timings, which differ)."""
    files = sorted((folder / "export").glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def loss_jitter(points: list[float]) -> float | None:
    """How far the training-loss curve jumps from point to point: the sd of each point's distance from the
    mean of its two neighbours, past the first fifth of the curve (the fast early fall is trend, not jitter).
    Batches drawn i.i.d. give a small figure; batches whose domain mix swings (a read task's few row groups)
    a large one, whatever the held-out loss says."""
    points = points[len(points) // 5 :]
    if len(points) < 3:
        return None
    return statistics.pstdev([b - (a + c) / 2 for a, b, c in zip(points, points[1:], points[2:], strict=False)])


def spread(values: list[float]) -> dict[str, float]:
    median = statistics.median(values)
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "median": median,
        "max": max(values),
        "min_over_median": min(values) / median if median else float("nan"),
    }


METRICS = (
    ("heldout_loss", "held-out loss", 1.0),
    ("heldout_accuracy", "held-out i→t acc %", 100.0),
    ("train_loss_jitter", "training-loss jitter", 1.0),
    ("zero_shot", "zero-shot avg %", 100.0),
)


def report(runs: dict[int, dict[str, Any]], repeat: tuple[int, dict[str, Any]] | None) -> str:
    seeds = sorted(runs)
    models = list(runs[seeds[0]])
    lines = [f"Per seed ({', '.join(map(str, seeds))}) and spread over seeds.", ""]
    lines += [
        "| model | metric | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | mean | sd | min / median / max | min ÷ median |",
        "|" + "---|" * (len(seeds) + 6),
    ]
    for model in models:
        for key, label, scale in METRICS:
            values = [runs[s][model].get(key) for s in seeds]
            if any(v is None for v in values):
                continue
            values = [scale * v for v in values]
            st = spread(values)
            lines.append(
                f"| {model} | {label} | "
                + " | ".join(f"{v:.2f}" for v in values)
                + f" | {st['mean']:.2f} | {st['sd']:.2f} | {st['min']:.2f} / {st['median']:.2f} / {st['max']:.2f}"
                f" | {st['min_over_median']:.2f} |"
            )
    if repeat is not None:
        seed, again = repeat
        same = [
            m
            for m in models
            if again.get(m, {}).get("weights_sha256") and again[m]["weights_sha256"] == runs[seed][m]["weights_sha256"]
        ]
        differ = [m for m in models if runs[seed][m].get("weights_sha256") and m not in same]
        lines += [
            "",
            f"Seed {seed} run twice: {len(same)} of {len(same) + len(differ)} models' weights are the same "
            f"bytes" + (f"; differ: {', '.join(differ)}" if differ else "") + ".",
        ]
        for model in models:
            a, b = runs[seed][model].get("zero_shot"), again.get(model, {}).get("zero_shot")
            if a is not None and b is not None and a != b:
                lines.append(f"- {model}: zero-shot {100 * a:.2f} vs {100 * b:.2f}")
    lines += ["", "Held-out loss at each checkpoint (step: seed " + ", ".join(map(str, seeds)) + "):", ""]
    for model in models:
        curves = [dict(runs[s][model].get("val_curve", [])) for s in seeds]
        steps = sorted(set().union(*curves))
        if steps:
            cells = [f"{step}: " + " / ".join(f"{c[step]:.2f}" if step in c else "–" for c in curves) for step in steps]
            lines.append(f"- {model}: " + "; ".join(cells))
    return "\n".join(lines) + "\n"


ROWS = (("loss", "CLIP loss"), ("grad_norm_curve", "grad norm (max of 10 steps)"), ("logit_scale_curve", "logit scale"))


def plot_curves(variants: dict[str, dict[int, dict[str, Any]]], path: Path, models: list[str] | None = None) -> None:
    """One column per model (and variant), one colour per seed: training loss (thin) and held-out loss (dots),
    the largest gradient norm of each 10 steps, and the logit scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = []
    for name, runs in variants.items():
        first = runs[min(runs)]
        columns += [(name, m) for m in (models or first) if first.get(m, {}).get("train_curve")]
    fig, axes = plt.subplots(len(ROWS), len(columns), figsize=(3.6 * len(columns), 2.8 * len(ROWS)), squeeze=False)
    for col, (name, model) in enumerate(columns):
        runs = variants[name]
        for i, seed in enumerate(sorted(runs)):
            run, colour = runs[seed][model], f"C{i}"
            curves = {"loss": run["train_curve"], **{k: run.get(k) or [] for k, _ in ROWS[1:]}}
            for row, (key, _) in enumerate(ROWS):
                points = [(x, y) for x, y in curves[key] if y is not None]
                if points:
                    axes[row][col].plot(*zip(*points, strict=True), color=colour, lw=0.8, label=f"seed {seed}")
            if run["val_curve"]:
                axes[0][col].plot(*zip(*run["val_curve"], strict=True), "o-", color=colour, ms=3, lw=1.5)
        axes[0][col].set_title(f"{model}: {name}" if name else model, fontsize=9)
        for row, (_, label) in enumerate(ROWS):
            axes[row][col].grid(alpha=0.3)
            axes[row][col].set_xlabel("step")
            if col == 0:
                axes[row][0].set_ylabel(label)
    for row in range(len(ROWS)):  # variants side by side on one scale
        low = min(ax.get_ylim()[0] for ax in axes[row])
        high = max(ax.get_ylim()[1] for ax in axes[row])
        for ax in axes[row]:
            ax.set_ylim(low, high)
    axes[0][0].legend(fontsize=7, title="thin: training, dots: held-out", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(files: list[str], labels: list[str] | None, out: Path, models: list[str] | None) -> None:
    """Curves of earlier runs of this benchmark side by side, one set of columns per stability.json (named by
    `labels`, else by its overrides)."""
    variants = {}
    for i, file in enumerate(files):
        record = json.loads(Path(file).read_text())
        name = labels[i] if labels else " ".join(record["args"]["overrides"]) or "as configured"
        variants[name] = {int(seed): run for seed, run in record["runs"].items()}
    plot_curves(variants, out, models)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1")
    parser.add_argument("--repeat", type=int, default=0, help="the seed run a second time (-1: none)")
    parser.add_argument("--models", default="all", help="'all', or a comma list (with what they continue)")
    parser.add_argument("--root", default="runs/stability", help="where the prep and every run go")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override k=v")
    parser.add_argument(
        "--tag", default="", help="name this variant's runs and files TAG-… in ROOT, beside others on the same prep"
    )
    parser.add_argument(
        "--compare", nargs="+", metavar="JSON", help="only draw these runs' stability.json curves side by side"
    )
    parser.add_argument("--labels", nargs="+", help="--compare: a name for each file")
    parser.add_argument("--out", default="curves-compared.png", help="--compare: the figure's path")
    args = parser.parse_args(argv)
    if args.compare:
        compare(args.compare, args.labels, Path(args.out), None if args.models == "all" else args.models.split(","))
        return args.out
    from mode_ray.run_root.ownership import claim

    root = Path(args.root).resolve()
    claim(str(root), "bench/stability.py")
    # The controls bench/quality.py measures are not what stability is about: they only cost time here.
    requested = ["training.matched_control=false", "moe.enabled=false", *args.overrides]
    overrides = [*requested, *prepare(args.config, requested, root)]
    models = None if args.models == "all" else args.models.split(",")
    tag = f"{args.tag}-" if args.tag else ""
    runs = {
        s: run_one(args.config, overrides, seed_root(root, s, f"{tag}seed-{s}"), s, models) for s in range(args.seeds)
    }
    repeat = None
    if args.repeat >= 0:
        again = run_one(
            args.config, overrides, seed_root(root, args.repeat, f"{tag}repeat-{args.repeat}"), args.repeat, models
        )
        repeat = (args.repeat, again)
    text = report(runs, repeat)
    files = {kind: root / f"{tag}{kind}" for kind in ("stability.md", "stability.json", "curves.png")}
    plot_curves({"": runs}, files["curves.png"])
    header = f"`python bench/stability.py --config {args.config} --seeds {args.seeds} --models {args.models}" + "".join(
        f" --set {o}" for o in args.overrides
    )
    files["stability.md"].write_text(f"# Stability over training seeds\n\n{header}`\n\n{text}")
    record = {"args": vars(args), "runs": runs, "repeat": repeat}
    files["stability.json"].write_text(json.dumps(record, indent=2))
    print(text)
    print("written: " + ", ".join(map(str, files.values())))
    return text


if __name__ == "__main__":
    main()
