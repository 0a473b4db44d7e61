"""The driver's peak memory while one MCL stage prepares its data, at 1× and 10× the demo's pairs.

    python bench/mcl_memory.py [--root runs/bench-mcl] [--scale 10] [--sample-rows N]

Builds once under ROOT (later runs reuse it): the demo data and its prep run with the decoded input cache (1×:
the demo's 8,000 pairs), a run root whose decoded cache holds those rows `--scale` times over (each copy's keys
suffixed: distinct rows to the hold-out and the sample hash, the same pixels and tokens — decoding and
embedding 80,000 captions again would measure nothing more) and a random-init export of the demo model to
embed with (memory, not quality, is measured). Then runs `prepare_stage` (MCL stage 1: sample, cluster, label
every pair, plan) once per size, each in a fresh process with its own embedded Ray (the actors and the object
store are other processes). Right before the stage the process's RSS high-water mark is reset
(/proc/self/clear_refs), so the VmHWM read after it is the driver's peak during the stage. Prints both peaks,
their growth over the RSS the process had before the stage, and the ratio. Goal: the 10× peak within 20% of
the 1× peak. `--sample-rows` sets the driver's sample bound (default: `moe.cluster_sample_rows`, 100,000, above
both sizes' pairs: the 10× sample is 10× the 1× one); below the 1× pairs, both sizes cluster the same number.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bench_config(run_root: Path, shards: Path | None = None) -> Any:
    from mode_ray.config import load_config

    sets = [f"run_root={run_root}"]
    if shards is not None:  # a run that only reads its decoded cache: no demo shards of its own
        sets += [f"data.shards={shards}", "data.demo=null"]
    return load_config(REPO / "configs/demo.yaml", sets)


def build_base(root: Path) -> None:
    """The demo data, prepped, with the decoded input cache; and a random-init export of the demo model."""
    import torch

    from mode_ray.data.train_data import build_input_cache
    from mode_ray.models.clip import build_clip, export_open_clip
    from mode_ray.ray_env.runtime import ray_runtime
    from mode_ray.run_root.layout import RunPaths
    from mode_ray.run_root.storage import read_json
    from mode_ray.stages.demo import run_demo_data
    from mode_ray.stages.prep import run_prep

    cfg = bench_config(root / "1x")
    if not (root / "base-export").exists():
        torch.manual_seed(0)
        export_open_clip(build_clip(cfg.training.model)[0], cfg.training.model, str(root / "base-export"))
    if (root / "1x" / "train_inputs" / "_SUCCESS").exists():
        return
    run_demo_data(cfg)
    with ray_runtime(cfg):
        run_prep(cfg)
        build_input_cache(cfg, read_json(RunPaths(cfg.run_root).prep_summary)["manifest_run_id"])


def replicate(root: Path, scale: int) -> Path:
    """A run root whose decoded cache is the 1× cache `scale` times over, each copy's keys suffixed."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from mode_ray.run_root.layout import ROW_GROUP_ROWS
    from mode_ray.run_root.ownership import claim_run_root

    run = root / f"{scale}x"
    done = run / "train_inputs" / "_BENCH_COMPLETE"
    if done.exists():
        return run
    run.mkdir(parents=True, exist_ok=True)
    claim_run_root(str(run))
    for file in sorted((root / "1x" / "train_inputs").rglob("*.parquet")):
        table = pq.ParquetFile(file).read()  # the file alone: no coarse_id column from its folder's name
        (run / "train_inputs" / file.parent.name).mkdir(parents=True, exist_ok=True)
        for copy in range(scale):
            keys = pc.binary_join_element_wise(table["key"], pa.scalar(f"~{copy}"), "")
            out = run / "train_inputs" / file.parent.name / f"{copy:03d}-{file.name}"
            pq.write_table(table.set_column(table.schema.get_field_index("key"), "key", keys), out, ROW_GROUP_ROWS)
    done.write_text("{}")
    return run


def _status(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(run: Path, shards: Path, model_url: str, sample_rows: int | None) -> None:
    """One size: the stage in this fresh process; prints a RESULT line."""
    import ray.data  # noqa: F401 — imported before the measurement, as the stage's own modules are

    from mode_ray import kmeans
    from mode_ray.data import mcl_plan as mcl
    from mode_ray.ray_env.runtime import ray_runtime
    from mode_ray.train import sampler  # noqa: F401

    cfg = bench_config(run, shards)
    if sample_rows:
        cfg = cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"cluster_sample_rows": sample_rows})})
    fitted: list[int] = []
    fit = kmeans.mcl_fit
    kmeans.mcl_fit = lambda image, *args, **kwargs: fitted.append(len(image)) or fit(image, *args, **kwargs)
    with ray_runtime(cfg):
        gc.collect()
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from the current RSS
        start = time.perf_counter()
        facts = mcl.prepare_stage(cfg, 1, model_url, seed=1)
        seconds = time.perf_counter() - start
        peak = _status("VmHWM")
    result = {"rows": facts["rows"], "sample": fitted[0], "before": before, "peak": peak, "seconds": seconds}
    print("RESULT " + json.dumps(result), flush=True)


def measure(run: Path, root: Path, sample_rows: int | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(run), "--root", str(root)]
    cmd += ["--sample-rows", str(sample_rows)] if sample_rows else []
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"the {run.name} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/bench-mcl")
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--sample-rows", type=int, default=None, help="the driver's sample bound for this run")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.root).resolve()
    shards = root / "1x" / "data" / "train"
    if args.child:
        child(Path(args.child), shards, str(root / "base-export"), args.sample_rows)
        return
    build_base(root)
    runs = {"1x": root / "1x", f"{args.scale}x": replicate(root, args.scale)}
    results = {name: measure(run, root, args.sample_rows) for name, run in runs.items()}
    mib = 1024 * 1024
    print(f"\nMCL stage 1 data preparation, driver process (sample bound {args.sample_rows or 'default'}):")
    print(f"{'size':<6} {'pairs':>8} {'clustered':>10} {'RSS before':>11} {'peak RSS':>9} {'growth':>8} {'stage':>7}")
    for name, r in results.items():
        print(
            f"{name:<6} {r['rows']:>8,} {r['sample']:>10,} {r['before'] / mib:>8.0f} MiB {r['peak'] / mib:>5.0f} MiB "
            f"{(r['peak'] - r['before']) / mib:>4.0f} MiB {r['seconds']:>6.0f}s"
        )
    small, big = results["1x"], results[f"{args.scale}x"]
    growth = (big["peak"] - big["before"]) / max(small["peak"] - small["before"], 1)
    print(f"peak {args.scale}x / 1x: {big['peak'] / small['peak']:.2f} (goal <= 1.20); growth ratio {growth:.2f}")


if __name__ == "__main__":
    main()
