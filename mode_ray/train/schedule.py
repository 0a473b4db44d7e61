"""The training plan of a MoDE run, counted in optimizer steps of one global batch (torch/Ray-free).

MoDE's budget is counted in samples of one dense model (docs/training.md): a seed trains the first part of the
schedule on all data, then every data expert and the generalist continue it — weights, optimizer state and
learning-rate position — for the same number of steps (the tail), each on its own data. The compute-matched
control, `generalist-matched`, continues the seed for one tail per expert, so it costs what the whole ensemble
costs; its learning-rate tail is the same curve stretched over its longer run, so it too ends at zero.

With every model on the same global batch, steps and samples are interchangeable: samples = steps × batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mode_ray.run_root.names import GENERALIST, MATCHED, SEED, expert_name


@dataclass(frozen=True)
class Schedule:
    """Linear warmup, then cosine to zero over the dense schedule (seed + one tail), in steps: over the whole
    schedule (`step / total`), or as open_clip's `cosine_lr` and both references, over the steps after warmup
    (`decay_after_warmup`)."""

    base_lr: float
    warmup_steps: int
    total_steps: int  # seed + one tail
    tail_start: int  # the seed's last step: where every tail branches off
    decay_after_warmup: bool = False

    def position(self, step: int, stretch: float = 1.0) -> float:
        """Where on the dense schedule `step` of a run whose tail is `stretch` times longer stands."""
        if step <= self.tail_start:
            return float(step)
        return self.tail_start + (step - self.tail_start) / stretch

    def lr(self, step: int, stretch: float = 1.0) -> float:
        pos = self.position(step, stretch)
        if self.warmup_steps and pos < self.warmup_steps:
            return self.base_lr * (pos + 1) / self.warmup_steps
        start = self.warmup_steps if self.decay_after_warmup else 0
        progress = min(max((pos - start) / max(self.total_steps - start, 1), 0.0), 1.0)
        return 0.5 * self.base_lr * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Span:
    """Steps [start_step, end_step) of the schedule for one model, and the data it reads (mode_ray.train.job
    turns each into a `TrainJob`)."""

    name: str  # seed | expert-{e} | generalist | generalist-matched
    expert: int | None  # the coarse cluster of a data expert; None: all data
    start_step: int
    end_step: int
    stretch: float = 1.0  # the tail's learning-rate curve is stretched this much (generalist-matched: n experts)
    init_from_seed: bool = True

    @property
    def steps(self) -> int:
        return self.end_step - self.start_step


@dataclass(frozen=True)
class Plan:
    schedule: Schedule
    samples_per_epoch: int
    batch_size: int
    seed: Span | None
    tails: list[Span]  # experts, generalist, generalist-matched (longest first: it starts first)
    empty_experts: list[int]

    def tail(self, name: str, expert: int | None, tails: int = 1) -> Span:
        """A model continuing the seed for `tails` tails (generalist-matched: one per expert), or from scratch."""
        start, one = self.schedule.tail_start, self.schedule.total_steps - self.schedule.tail_start
        return Span(name, expert, start, start + tails * one, float(tails), start > 0)


def plan_training(
    *,
    epochs: float,
    seed_fraction: float,
    samples_per_epoch: int,
    batch_size: int,
    base_lr: float,
    warmup_steps: int,
    per_expert: dict[str, int],
    n_coarse: int,
    use_seed: bool = True,
    matched_control: bool = True,
    decay_after_warmup: bool = False,
) -> Plan:
    """Seed [0, S), each tail [S, S + T), generalist-matched [S, S + n·T); an empty partition trains nothing."""
    steps_per_epoch = samples_per_epoch / batch_size
    total = max(1, round(epochs * steps_per_epoch))
    seed_steps = round(epochs * seed_fraction * steps_per_epoch) if use_seed and seed_fraction > 0 else 0
    seed_steps = min(seed_steps, total - 1)
    schedule = Schedule(base_lr, warmup_steps, total, seed_steps, decay_after_warmup)
    seed = Span(SEED, None, 0, seed_steps, init_from_seed=False) if seed_steps > 0 else None
    empty = [e for e in range(n_coarse) if per_expert.get(str(e), 0) == 0]
    plan = Plan(schedule, samples_per_epoch, batch_size, seed, [], empty)
    experts = [plan.tail(expert_name(e), e) for e in range(n_coarse) if e not in empty]
    plan.tails.extend([*experts, plan.tail(GENERALIST, None)])
    if matched_control and len(experts) > 1:
        plan.tails.insert(0, plan.tail(MATCHED, None, len(experts)))
    return plan
