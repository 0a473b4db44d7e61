"""The one CLIP training loop, run by every Ray Train worker (seed, data experts, generalist; later CLIP-MoE).

nanoGPT-style: build, optionally resume, iterate the worker's dataset shard in passes, step, checkpoint.
The learning-rate position is the epoch position on the shared schedule, so an expert resumed from the
seed continues the seed's curve (the MoDE reference resumes optimizer, scaler and LR position too).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections import Counter
from typing import Any

import torch

from mode_ray.config import S3Config
from mode_ray.models.clip import build_clip
from mode_ray.storage import get_fs

STATE_FILE = "state.pt"


def lr_at(step: int, epoch_pos: float, base_lr: float, warmup_steps: int, total_epochs: float) -> float:
    """Linear warmup over global steps, then cosine over the epoch position of the whole schedule."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(max(epoch_pos / total_epochs, 0.0), 1.0)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW with open_clip's split: no weight decay on gains, biases, embeddings or the logit scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exclude = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(param)
    return torch.optim.AdamW(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": cfg["weight_decay"]}],
        lr=cfg["lr"],
        betas=tuple(cfg["betas"]),
        eps=cfg["eps"],
    )


def save_state(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer, scaler: Any, state: dict) -> None:
    torch.save(
        {
            "model": getattr(model, "module", model).state_dict(),
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "state": state,
        },
        path,
    )


def load_state(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer | None, scaler: Any) -> dict:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    getattr(model, "module", model).load_state_dict(blob["model"])
    if opt is not None:
        opt.load_state_dict(blob["optimizer"])
    if scaler is not None and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    return blob["state"]


def _maybe_fail(cfg: dict[str, Any], step: int) -> None:
    """Test hook: raise once at a given step (a marker file makes it once), to exercise fault tolerance."""
    at, marker = cfg.get("fail_once_at_step"), cfg.get("failure_marker")
    if at is None or step != at or marker is None or os.path.exists(marker):
        return
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    open(marker, "w").close()
    raise RuntimeError(f"injected failure at step {step} (training.fail_once_at_step)")


def _sum_over_workers(counts: Counter[str], n_coarse: int, world: int, device: torch.device) -> Counter[str]:
    """Samples seen per coarse cluster, added up over the workers (each counts only its own shard)."""
    if world == 1:
        return counts
    vec = torch.zeros(n_coarse, dtype=torch.int64, device=device)
    for coarse, count in counts.items():
        vec[int(coarse)] = count
    torch.distributed.all_reduce(vec)
    return Counter({str(i): int(v) for i, v in enumerate(vec.tolist()) if v})


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from open_clip.loss import ClipLoss

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg["seed"] + rank)
    model, _, _, _ = build_clip(cfg["model"], device=device)
    opt = make_optimizer(model, cfg)
    use_amp = cfg["precision"] in ("amp", "amp_bf16") and device.type == "cuda"
    amp_dtype = torch.bfloat16 if cfg["precision"] == "amp_bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    state: dict[str, Any] = {
        "step": 0,
        "epoch": cfg["epoch_start"],
        "passes": 0,
        "seen": {},
        "skipped_images": 0,
        "loss_history": [],
        "init_step": 0,
    }
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # this job's own latest checkpoint: a restarted worker or a rerun command
        with checkpoint.as_directory() as d:
            state = load_state(os.path.join(d, STATE_FILE), model, opt, scaler)
    elif cfg.get("init_state"):  # an expert or the generalist continuing the seed (a path or any URL)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, STATE_FILE)
            fs, path = get_fs(cfg["init_state"], S3Config(**cfg.get("s3") or {}))
            fs.get(path, local)
            seed_state = load_state(local, model, opt, scaler)
        state["step"] = state["init_step"] = seed_state["step"]
    model = ray.train.torch.prepare_model(model)
    loss_fn = ClipLoss(rank=rank, world_size=world)
    shard = ray.train.get_dataset_shard("train")
    span = cfg["epoch_end"] - cfg["epoch_start"]
    per_worker_batch = max(2, cfg["global_batch"] // (world * cfg["grad_accum_steps"]))
    rows = max(1, cfg["rows_per_epoch"])
    tic, samples_since = time.perf_counter(), 0

    while state["passes"] < math.ceil(span - 1e-9):
        limit = min(1.0, span - state["passes"])
        pass_seen: Counter[str] = Counter()  # samples per coarse cluster in this pass
        pass_losses: list[float] = []
        in_pass = 0
        pass_start = time.perf_counter()
        for micro, batch in enumerate(
            shard.iter_torch_batches(
                batch_size=per_worker_batch,
                device=device,
                local_shuffle_buffer_size=cfg["shuffle_buffer"] if cfg["shuffle"] else None,
            )
        ):
            fraction = in_pass * world / rows
            if limit < 1.0 and fraction >= limit:
                break
            ok = batch["ok"].bool()
            state["skipped_images"] += int((~ok).sum())
            images, texts = batch["image"][ok], batch["text"][ok]
            if len(images) < 2:
                continue
            for coarse, count in Counter(batch["coarse_id"][ok].tolist()).items():
                pass_seen[str(coarse)] += count
            in_pass += len(images)
            samples_since += len(images)
            state["epoch"] = cfg["epoch_start"] + state["passes"] + min(fraction, 0.999)
            lr = lr_at(state["step"], state["epoch"], cfg["lr"], cfg["warmup_steps"], cfg["total_epochs"])
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                img_f, txt_f, logit_scale = model(images, texts)
                loss = loss_fn(img_f, txt_f, logit_scale) / cfg["grad_accum_steps"]
            scaler.scale(loss).backward()
            if (micro + 1) % cfg["grad_accum_steps"]:
                continue
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                getattr(model, "module", model).logit_scale.clamp_(0, math.log(100))
            state["step"] += 1
            pass_losses.append(float(loss) * cfg["grad_accum_steps"])
            _maybe_fail(cfg, state["step"])
            if state["step"] % cfg["log_every_steps"] == 0:
                elapsed = time.perf_counter() - tic
                ray.train.report(
                    {
                        "loss": pass_losses[-1],
                        "lr": lr,
                        "samples_per_s": samples_since * world / max(elapsed, 1e-9),
                        "step": state["step"],
                        "epoch": state["epoch"],
                    }
                )
                tic, samples_since = time.perf_counter(), 0
        state["passes"] += 1
        state["epoch"] = cfg["epoch_start"] + min(state["passes"], span)
        state["seen"] = dict(Counter(state["seen"]) + _sum_over_workers(pass_seen, cfg["n_coarse"], world, device))
        state["loss_history"].append(sum(pass_losses) / max(1, len(pass_losses)))
        metrics = {
            "loss": state["loss_history"][-1],
            "step": state["step"],
            "epoch": state["epoch"],
            "passes": state["passes"],
            "samples_seen": sum(state["seen"].values()),
            "pass_samples": sum(pass_seen.values()),
            "pass_seconds": time.perf_counter() - pass_start,
        }
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_state(os.path.join(tmp, STATE_FILE), model, opt, scaler, state)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
