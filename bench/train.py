"""Training benchmark: what a trial costs beyond learning, and how fast the loop learns inside Ray Train.

    python bench/train.py [--samples 2000] [--epochs 2] [--batch 128]

(1) Fixed seconds per trial: the real `mode-ray train` on a small demo run (seed, 4 experts, generalist),
    each trial's time minus its learning time, by part (Ray Train start, imports, data start, checkpoints, …,
    from the train summary), and each job's wall time from launch to done (its driver task's own start and end added),
    vs the floor measured in the same run: Ray tasks that each fit a TorchTrainer whose loop does nothing,
    with the run's worker size, one at a time and as many side by side as the run's trials (goal: fixed cost
    ≤ 1.3× the floor at the same concurrency: what Ray costs where the trials run); and the same empty fits
    as one-trial Tune runs, the launcher the runner used before (what dropping Tune saved).
(2) Learning speed: samples/s of the steps inside those trials (after each trial's first 20% of steps) vs a
    bare torch loop over the same model, batch, augmentation and torch threads on in-memory data
    (goal: ≥ 0.8×).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def empty_loop(config: dict) -> None:
    import ray.train

    ray.train.report({"done": 1})


def empty_fit(poll: float, cpus: float) -> float:
    """The floor: fit the runner's TorchTrainer with a loop that does nothing, with the run's poll interval and
    worker size, in a fresh temporary storage folder; returns its seconds."""
    import ray.train

    from mode_ray.runner.trial import trainer_class

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(poll)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        trainer_class(embedded_ray=True)(  # the runner's trainer on this embedded Ray
            empty_loop,
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
            run_config=ray.train.RunConfig(name="floor", storage_path=tmp),
        ).fit()
    return time.time() - start


def tune_trial(config: dict) -> None:
    """The same empty fit as a Ray Tune trial: how the runner launched jobs before (one trial per job)."""
    import ray.tune

    ray.tune.report({"fit_seconds": empty_fit(config["poll"], config["cpus"])})


def floor_seconds(poll: float, cpus: float, concurrent: int = 1, rounds: int = 3, tune: bool = False) -> float:
    """Wall seconds per trial slot: `rounds` × `concurrent` empty fits, `concurrent` at a time, each in a Ray
    task as the runner's DAG nodes are (`tune`: each in a one-trial Tune run instead, the former launcher)."""
    import ray

    start = time.time()
    if tune:
        import ray.tune

        with tempfile.TemporaryDirectory() as tmp:
            ray.tune.Tuner(
                ray.tune.with_resources(tune_trial, {"CPU": 0.01}),
                param_space={"poll": poll, "cpus": cpus, "i": ray.tune.grid_search(list(range(rounds * concurrent)))},
                tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrent),
                run_config=ray.tune.RunConfig(storage_path=tmp, verbose=0),
            ).fit()
    else:
        node = ray.remote(num_cpus=0)(empty_fit)
        for _ in range(rounds):
            ray.get([node.remote(poll, cpus) for _ in range(concurrent)])
    return (time.time() - start) / rounds


def bare_samples_per_s(cfg, steps: int) -> float:
    """The loop's work alone: augment + forward + backward + fused AdamW step on in-memory decoded rows."""
    import pyarrow.dataset as pads
    import torch
    from open_clip.loss import ClipLoss

    from mode_ray.models.clip import build_clip
    from mode_ray.runner.plan_jobs import optim
    from mode_ray.train.loop import make_optimizer
    from mode_ray.train.transforms import augment, decode_rows

    t = cfg.training
    torch.set_num_threads(t.run.torch_threads or 1)
    rows = pads.dataset(f"{cfg.run_root}/manifest", format="parquet", partitioning="hive").to_table(
        columns=["image", "caption"]
    )
    data = decode_rows(rows["image"].to_pylist(), rows["caption"].to_pylist(), t.model)
    pixels, text = torch.from_numpy(data["pixels"]), torch.from_numpy(data["text"]).long()
    model, _, _, _ = build_clip(t.model)
    spec, schedule = optim(t)
    opt = make_optimizer(model, spec, schedule.base_lr)  # a fixed rate: the bare step's cost, not a schedule
    loss_fn, batch, n = ClipLoss(), t.batch_size, len(pixels)
    start = 0.0
    for step in range(steps + 5):
        if step == 5:
            start = time.perf_counter()
        idx = torch.randint(0, n, (batch,))
        img, txt, scale = model(augment(pixels[idx], t.model, train=True), text[idx])
        loss_fn(img, txt, scale).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch / (time.perf_counter() - start)


def in_trial_samples_per_s(models: dict) -> float:
    """Steady-state rate from each trial's loss curve (compute seconds at each point), first 20% skipped."""
    samples = seconds = 0.0
    for m in models.values():
        curve = m["loss_history"]
        first = curve[len(curve) // 5]
        last = curve[-1]
        samples += (last["step"] - first["step"]) * m["batch_size"]
        seconds += last["compute_s"] - first["compute_s"]
    return samples / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--root", default=None, help="run root (default: a temporary folder)")
    args = parser.parse_args()

    import ray

    from mode_ray.config import load_config
    from mode_ray.pipeline import run_all
    from mode_ray.ray_env.runtime import ray_runtime
    from mode_ray.runner.dag import max_concurrent

    root = args.root or tempfile.mkdtemp(prefix="bench-train-")
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"run_root={root}",
            f"data.demo.samples={args.samples}",
            f"training.samples_per_epoch={args.samples}",
            f"training.epochs={args.epochs}",
            f"training.batch_size={args.batch}",
        ],
    )
    with ray_runtime(cfg):
        run_all(cfg, only=["demo-data", "prep", "train"])
        run = cfg.training.run
        concurrent = max_concurrent(cfg)
        floor_alone = floor_seconds(run.controller_poll_s, run.cpus_per_worker)
        floor = floor_seconds(run.controller_poll_s, run.cpus_per_worker, concurrent)
        tune_alone = floor_seconds(run.controller_poll_s, run.cpus_per_worker, tune=True)
        tune_floor = floor_seconds(run.controller_poll_s, run.cpus_per_worker, concurrent, tune=True)
        ray.shutdown()
    from mode_ray.run_root.storage import read_json

    summary = read_json(f"{root}/experts/summary.json")
    models = summary["models"]
    bare = bare_samples_per_s(cfg, steps=60)
    fixed = [m["timing"]["fixed"] for m in models.values()]
    parts = [k for k in next(iter(models.values()))["timing"] if k not in ("trial", "fixed", "compute")]
    print(f"\n(1) fixed seconds per trial ({len(models)} trials, mode-tiny, batch {args.batch}, 2 CPUs)")
    for name, m in models.items():
        t = m["timing"]
        top = sorted(((t[p], p) for p in parts), reverse=True)[:4]
        print(
            f"  {name:20s} trial {t['trial']:6.1f}  learning {t['compute']:6.1f}  fixed {t['fixed']:5.1f}   "
            + ", ".join(f"{p} {v:.1f}" for v, p in top)
            + f"   job wall {m['ended_at'] - m['started_at']:.1f}"
        )
    walls = [m["ended_at"] - m["started_at"] - m["timing"]["compute"] for m in models.values()]
    print(f"  mean fixed per trial     {np.mean(fixed):6.1f} s; per job, launch to done: {np.mean(walls):.1f} s")
    print(
        f"  floor: a Ray task fitting a TorchTrainer that does nothing (as the runner's DAG nodes): "
        f"{floor_alone:.1f} s alone, {floor:.1f} s a trial with {concurrent} side by side (the run's concurrency)"
    )
    print(f"  the same empty fit as a one-trial Tune run (the former launcher): {tune_alone:.1f} s alone, "
          f"{tune_floor:.1f} s side by side: the runner without Tune costs {floor_alone / tune_alone:.2f}x, "
          f"{floor / tune_floor:.2f}x of it")  # fmt: skip
    print(f"  ratio fixed / floor at the same concurrency: {np.mean(fixed) / floor:.2f}x (goal <= 1.3); "
          f"job wall less learning / floor: {np.mean(walls) / floor:.2f}x")  # fmt: skip
    rate = in_trial_samples_per_s(models)
    print(f"\n(2) learning speed, samples/s, {cfg.training.run.torch_threads or 1} torch thread(s)")
    print(f"  inside the trials (steady state)  {rate:8.1f}")
    print(f"  bare torch loop, in memory        {bare:8.1f}")
    print(f"  ratio in-trial / bare: {rate / bare:.2f}x (goal >= 0.8)")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
