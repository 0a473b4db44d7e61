"""Feed benchmark: images/s per CPU core that the training path delivers into a worker's batches without the
decoded cache (`training.decode_cache: false`, as `configs/cloud.yaml` runs at web scale), against open_clip's
own training loader on the same shards and cores.

    python bench/feed.py [--samples 4000] [--shards 8] [--passes 3] [--cores 2] [--batch 256] [--model ViT-B-16]

Generated webdataset shards of photo-like JPEGs (256–512 px a side, smooth colour fields with sensor-like
noise: what a JPEG decoder pays for in web images), prepped by mode_ray once (the manifest its reads decode).

- mode_ray: the seed job's training dataset (`data/train_data.job_datasets`: read tasks decode and resize
  to the model's load size, `data_tasks_per_trial` = `data_cpus_per_trial` = cores), iterated as a Train worker
  iterates it (`iter_torch_batches`). What it delivers is uint8 pixels and token ids; the crop, flip and
  normalisation run on the GPU in the loop (`train/transforms.augment`).
- open_clip: `open_clip_train.data.get_wds_dataset` exactly as `open_clip_train.main` builds it — a webdataset
  pipeline with the model's training `preprocess` (RandomResizedCrop, ToTensor, Normalize) and its tokenizer,
  and a torch DataLoader with `--workers` = cores (one shim for webdataset 1.0, in `open_clip_feed`).

Both are timed from their first batch (pipeline start excluded, and printed apart) over `--passes` passes of the
shards, as a training job streams them (mode_ray: one dataset of that many draws; open_clip: that many epochs
of its persistent workers): a single pass of a few thousand images is a handful of ~1,000-row read tasks,
whose arrival in bursts the timing would measure rather than the rate. Each with its own read-ahead as training
runs it: mode_ray the object-store budget `configs/cloud.yaml` gives each read task
(`training.run.data_buffer_mb` ÷ `data_tasks_per_trial`) times `--cores` tasks, open_clip the DataLoader's 2
batches a worker; per core = images/s ÷ cores.
Cores per GPU: the GPU's training throughput ÷ the images/s one core feeds, for open_clip's own figures.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

# Samples/s per A100 implied by open_clip's docs/PRETRAINED.md (LAION-400M, 32 epochs of 400M samples):
# ViT-B/32 "128 A100 (40 GB) GPUs for ~36 hours, 4600 GPU-hours"; ViT-B/16 "176 A100 (40 GB) GPUS for ~61 hours,
# 10700 GPU-hours". 12.8e9 samples ÷ GPU-seconds (evaluation and checkpoints included: a lower bound).
A100_SAMPLES_PER_S = {"ViT-B/32": 12.8e9 / (4600 * 3600), "ViT-B/16": 12.8e9 / (10700 * 3600)}
WORDS = ("a red car", "two dogs", "a bowl of soup", "the city at night", "a mountain lake", "an old bicycle")


def photo_jpeg(rng: np.random.Generator) -> bytes:
    """A photo-like JPEG: a smooth random colour field (bicubic from 6×6) plus Gaussian noise, 256–512 px."""
    from PIL import Image

    w, h = (int(v) for v in rng.integers(256, 513, size=2))
    field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 10, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(out: Path, samples: int, shards: int) -> list[str]:
    """`shards` tars of KEY.jpg + KEY.txt (open_clip's loader reads .txt; prep reads it with caption_field txt)."""
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = out / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, samples, shards):
                caption = f"{rng.choice(WORDS)} in photo {i}".encode()
                for suffix, payload in (("jpg", photo_jpeg(rng)), ("txt", caption)):
                    info = tarfile.TarInfo(f"{i:08d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(str(path))
    return paths


def timed_pass(batches, count) -> tuple[int, float, float]:  # noqa: ANN001
    """(images after the first batch, seconds after the first batch, seconds to the first batch)."""
    start = time.perf_counter()
    first = None
    images = 0
    for batch in batches:
        if first is None:
            first = time.perf_counter()
            continue
        images += count(batch)
    end = time.perf_counter()
    return images, end - (first or end), (first or end) - start


def cloud_buffer_mb(cores: int) -> int:
    """The object-store room configs/cloud.yaml gives a trial's read tasks, for `cores` of them."""
    from mode_ray.config import load_config

    run = load_config(REPO / "configs" / "cloud.yaml").training.run
    return int(run.data_buffer_mb / run.data_tasks_per_trial * cores)


def mode_ray_feed(args: argparse.Namespace, root: Path, shards: Path) -> tuple[int, float, float]:
    import ray

    from mode_ray.config import load_config
    from mode_ray.data.train_data import (
        draws_per_execution,
        holdout_fraction,
        job_datasets,
        row_groups,
        training_roots,
    )
    from mode_ray.runner.plan_jobs import make_plan
    from mode_ray.runner.trial import ingest_options
    from mode_ray.stages.prep import run_prep
    from mode_ray.train.inputs import input_spec

    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"run_root={root / 'run'}", f"data.shards={shards}", "data.demo=null", "data.caption_field=txt",
            "clustering.n_fine=8", "clustering.n_coarse=2", f"training.model={args.model}",
            "training.decode_cache=false", f"training.batch_size={args.batch}",
            f"training.run.data_cpus_per_trial={args.cores}", f"training.run.data_tasks_per_trial={args.cores}",
            f"training.run.data_buffer_mb={args.buffer_mb}",
        ],
    )  # fmt: skip
    ray.init(num_cpus=args.cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        prep = run_prep(cfg)
        seed = make_plan(cfg, prep["per_expert"]).seed
        groups = row_groups(training_roots(cfg), cfg.data.s3)
        holdout = holdout_fraction(cfg, sum(g["rows"] for g in groups))
        jobs = (replace(seed, end_step=seed.start_step + steps) for steps in itertools.count(1))
        job = next(j for j in jobs if draws_per_execution(groups, j, cfg, holdout) >= args.passes)  # the smallest
        datasets, facts = job_datasets(cfg, job, 0, input_spec(args.model))
        assert facts["draws_per_execution"] == args.passes, facts
        train = datasets["train_rank0"]
        train.context.execution_options = ingest_options(cfg.training, datasets)["train_rank0"]  # as in a trial
        batches = train.iter_torch_batches(batch_size=args.batch, drop_last=True)
        return timed_pass(batches, lambda b: len(b["pixels"]))
    finally:
        ray.shutdown()


def open_clip_feed(args: argparse.Namespace, shards: list[str], samples: int) -> tuple[int, float, float]:
    import open_clip
    import open_clip_train.data as open_clip_data
    from webdataset.tariterators import tar_file_expander

    # webdataset 1.0 ends every shard with an `{}` marker that open_clip_train's `group_by_keys_nothrow` (written
    # for webdataset 0.2) cannot read (KeyError 'fname'): the marker off, the pipeline otherwise as it is
    open_clip_data.tar_file_expander = partial(tar_file_expander, eof_value=None)

    _, preprocess_train, _ = open_clip.create_model_and_transforms(args.model)
    loader_args = SimpleNamespace(
        train_data="::".join(shards), train_num_samples=samples, dataset_resampled=False, seed=0,
        train_data_upsampling_factors=None, batch_size=args.batch, world_size=1, workers=args.cores,
    )  # fmt: skip
    tokenizer = open_clip.get_tokenizer(args.model)
    data = open_clip_data.get_wds_dataset(loader_args, preprocess_train, True, tokenizer=tokenizer)

    def epochs():  # as open_clip_train.main: set_epoch, then the loader's batches, once an epoch
        for epoch in range(args.passes):
            data.set_epoch(epoch)
            yield from data.dataloader

    return timed_pass(epochs(), lambda b: len(b[0]))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--passes", type=int, default=3, help="passes over the shards, timed as one stream")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--buffer-mb", type=int, default=None, help="mode_ray's read-ahead (default: cloud.yaml's)")
    args = parser.parse_args(argv)
    args.buffer_mb = args.buffer_mb or cloud_buffer_mb(args.cores)
    with tempfile.TemporaryDirectory(prefix="bench-feed-") as tmp:
        root = Path(tmp)
        shards = write_shards(root / "shards", args.samples, args.shards)
        ours = mode_ray_feed(args, root, root / "shards")
        theirs = open_clip_feed(args, shards, args.samples)
    rate = {name: images / seconds for name, (images, seconds, _) in (("mode_ray", ours), ("open_clip", theirs))}
    lines = [
        f"bench/feed.py: {args.samples} JPEGs (256–512 px) in {args.shards} shards, {args.passes} passes, "
        f"{args.model}, batch {args.batch}, {args.cores} cores, mode_ray's read-ahead {args.buffer_mb} MB",
        f"  mode_ray training path (decode_cache: false)  {rate['mode_ray'] / args.cores:7.1f} images/s per core  "
        f"(pipeline start {ours[2]:.1f} s)",
        f"  open_clip's loader (open_clip_train)          {rate['open_clip'] / args.cores:7.1f} images/s per core  "
        f"(pipeline start {theirs[2]:.1f} s)",
        f"  ratio mode_ray / open_clip: {rate['mode_ray'] / rate['open_clip']:.2f}x (goal >= 1.0)",
    ]
    for model, per_gpu in A100_SAMPLES_PER_S.items():
        lines.append(
            f"  {model} at {per_gpu:.0f} samples/s per A100 (open_clip's LAION-400M runs): "
            f"{per_gpu / (rate['mode_ray'] / args.cores):.1f} cores per GPU with mode_ray, "
            f"{per_gpu / (rate['open_clip'] / args.cores):.1f} with open_clip's loader"
        )
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
