"""Training benchmark: the shared loop inside Ray Train vs a bare torch loop.

    python bench/train.py [--samples 2048] [--passes 3] [--batch 64]

Samples/s of the training loop inside a 1-worker Ray Train TorchTrainer (data streamed by Ray Data) vs a bare
torch loop of the same model, batch and in-memory, pre-transformed data, in the same run (goal: >= 0.9x). The
first pass of each is warm-up and not counted; both run torch on one thread (the worker's one CPU).

Not here yet: parallel vs sequential expert trials. On a 2-core machine each trial's data pipeline needs a
whole CPU for its file listing, so trials can only run one at a time; that figure needs a bigger machine.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_inputs(samples: int) -> dict[str, np.ndarray]:
    """Demo images and captions, decoded and transformed once, held in memory."""
    import tempfile
    from pathlib import Path

    from mode_ray import demo_data
    from mode_ray.shards import iter_tar_rows
    from mode_ray.train.transforms import clip_inputs

    with tempfile.TemporaryDirectory() as tmp:
        demo_data.generate(tmp, samples=samples, shards=1, seed=0)
        with open(Path(tmp) / "0/0.tar", "rb") as f:
            rows = list(iter_tar_rows(f, "0.tar"))
    import json

    captions = [json.loads(r["json"])["caption"] for r in rows]
    return clip_inputs([r["image"] for r in rows], captions, np.zeros(len(rows), dtype=np.int32), "mode-tiny")


def bare_loop(data: dict[str, np.ndarray], batch: int, passes: int) -> float:
    import torch
    from open_clip.loss import ClipLoss

    from mode_ray.models.clip import build_clip
    from mode_ray.train.loop import make_optimizer

    torch.manual_seed(0)
    model, _, _, _ = build_clip("mode-tiny")
    opt = make_optimizer(model, {"lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.98), "eps": 1e-6})
    loss_fn = ClipLoss()
    images, texts = torch.from_numpy(data["image"]), torch.from_numpy(data["text"])
    counted, start = 0, 0.0
    for p in range(passes):
        if p == 1:
            counted, start = 0, time.perf_counter()
        for i in range(0, len(images), batch):
            img_f, txt_f, scale = model(images[i : i + batch], texts[i : i + batch])
            loss = loss_fn(img_f, txt_f, scale)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            counted += len(images[i : i + batch])
    return counted / (time.perf_counter() - start)


def ray_train_loop(data: dict[str, np.ndarray], batch: int, passes: int) -> float:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from mode_ray.config import TrainingConfig
    from mode_ray.train.loop import train_loop_per_worker

    ds = ray.data.from_numpy(data["image"]).rename_columns({"data": "image"})
    ds = ds.zip(ray.data.from_numpy(data["text"]).rename_columns({"data": "text"}))
    ds = ds.zip(ray.data.from_numpy(data["ok"]).rename_columns({"data": "ok"}))
    ds = ds.zip(ray.data.from_numpy(data["coarse_id"]).rename_columns({"data": "coarse_id"})).materialize()
    t = TrainingConfig(lr=1e-3, weight_decay=0.1, batch_size=batch, warmup_steps=0, shuffle=False)
    n = len(data["image"])
    cfg = {
        **t.model_dump(mode="json"),
        "job": "bench",
        "global_batch": batch,
        "epoch_start": 0.0,
        "epoch_end": float(passes),
        "total_epochs": float(passes),
        "rows_per_epoch": n,
        "n_coarse": 1,
        "log_every_steps": 10**9,
        "init_state": None,
    }
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=cfg,
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name="bench", storage_path=tmp),
            datasets={"train": ds},
        )
        result = trainer.fit()
        per_pass = sorted((m["passes"], m["pass_samples"], m["pass_seconds"]) for _, m in result.best_checkpoints)
    # Passes after the first (warm-up, as for the bare loop), timed inside the worker, data streaming included.
    timed = per_pass[1:]
    return sum(s for _, s, _ in timed) / sum(t for _, _, t in timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    import ray
    import torch

    data = make_inputs(args.samples)
    torch.set_num_threads(1)  # the Ray Train worker gets 1 CPU: same for the bare loop
    bare = bare_loop(data, args.batch, args.passes)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=512 * 1024 * 1024)
    try:
        via_ray = ray_train_loop(data, args.batch, args.passes)
    finally:
        ray.shutdown()
    print(f"\n(1) training samples/s, mode-tiny, batch {args.batch}, {args.samples} samples, 1 CPU thread each")
    print(f"  bare torch loop        {bare:8.1f}")
    print(f"  Ray Train, 1 worker    {via_ray:8.1f}   (passes after the first, Ray Data streaming included)")
    print(f"  ratio Ray Train / bare: {via_ray / bare:.2f}x (goal >= 0.9)")


if __name__ == "__main__":
    main()
