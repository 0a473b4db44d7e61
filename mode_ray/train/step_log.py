"""The training loop's bookkeeping, kept out of its step: the loss curve, samples seen per coarse cluster,
throughput, progress, and when a checkpoint is due (Ray-free)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from mode_ray.train.job import TrainJob


class StepLog:
    def __init__(self, job: TrainJob, state: dict[str, Any], rt: Any, lead: bool) -> None:
        self.job, self.state, self.rt, self.lead = job, state, rt, lead
        self.window: list[float] = []  # losses since the last loss-curve point
        self.norms: list[float] = []  # and the gradient norms
        self.local_seen: Counter[str] = Counter()  # samples per coarse cluster since the last checkpoint, here
        self.tic, self.samples_since = time.perf_counter(), 0
        assert job.end_step is not None
        self.end_step = job.end_step
        self._progress(completed=state["step"] - job.first_step, total=self.end_step - job.first_step)

    def _progress(self, **update: Any) -> None:
        if self.lead:
            self.rt.progress(self.job.name, **update)

    def batch(self, coarse_ids: list[int]) -> None:
        self.local_seen.update(str(c) for c in coarse_ids)
        self.samples_since += len(coarse_ids) * self.rt.world_size

    def loss(self, loss: float, lr: float, every: int, grad_norm: float, logit_scale: Callable[[], float]) -> bool:
        """Adds a step's loss and gradient norm; True when a loss-curve point was made (every `every` steps and
        at the end): the mean loss, the largest and the mean gradient norm since the last point (a spike shows
        in the largest), and the logit scale (the temperature running away shows there)."""
        state = self.state
        if state["first_lr"] is None:
            state["first_lr"] = lr
        self.window.append(loss)
        self.norms.append(grad_norm)
        if state["step"] % every and state["step"] != self.end_step:
            return False
        point = sum(self.window) / len(self.window)
        state["loss_history"].append(
            {
                "step": state["step"],
                "loss": point,
                "lr": lr,
                "grad_norm_max": max(self.norms),
                "grad_norm_mean": sum(self.norms) / len(self.norms),
                "logit_scale": logit_scale(),
                "compute_s": state["seconds"]["compute"],
            }
        )
        self.window, self.norms = [], []
        self._progress(completed=state["step"] - self.job.first_step, note=f"loss {point:.3f}")
        return True

    def due(self, every_steps: float) -> bool:
        """A checkpoint (validation, report) every `every_steps` of the job, and at its end."""
        done = self.state["step"] - self.job.first_step
        return done % max(1, round(every_steps)) == 0 or self.state["step"] == self.end_step

    def checkpoint_metrics(self, device: torch.device, lr: float) -> dict[str, Any]:
        """What a checkpoint reports; samples per cluster are added up over the workers first."""
        state = self.state
        reduced = sum_over_workers(self.local_seen, self.rt.world_size, device)
        state["seen"] = dict(Counter(state["seen"]) + reduced)
        self.local_seen.clear()
        elapsed = time.perf_counter() - self.tic
        metrics = {
            "loss": state["loss_history"][-1]["loss"] if state["loss_history"] else float("nan"),
            "lr": lr,
            "step": state["step"],
            "samples_seen": sum(state["seen"].values()),
            "samples_per_s": self.samples_since / max(elapsed, 1e-9),
        }
        self.tic, self.samples_since = time.perf_counter(), 0
        return metrics


def sum_over_workers(counts: Counter[str], world: int, device: torch.device) -> Counter[str]:
    """Samples seen per coarse cluster, added up over the workers (each counts only its own shard)."""
    if world == 1:
        return counts
    size = torch.tensor([max((int(c) + 1 for c in counts), default=0)], device=device)
    torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MAX)
    vec = torch.zeros(int(size.item()), dtype=torch.int64, device=device)
    for coarse, count in counts.items():
        vec[int(coarse)] = count
    torch.distributed.all_reduce(vec)
    return Counter({str(i): int(v) for i, v in enumerate(vec.tolist()) if v})
