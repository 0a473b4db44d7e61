"""One training job, typed: what a model learns from, and nothing about how it runs (torch/Ray-free).

`train`, `moe` and `add-data` only plan `TrainJob`s; one runner (`mode_ray.runner.dag`) fits each as a Ray
Ray Train trial once its parents are complete, and the one loop (`mode_ray.train.loop`) trains it. What a job is
decides its settings hash (`job_hash`): every field, plus its parents' hashes, minus `paths` (where things
live is not what a model learns from) — so there is no list of fields to keep by hand, and a changed parent
retrains its children. How a job runs (workers, CPUs, polling, retries, test hooks) lives in `LoopRun` and
the config's run settings, never in the hash.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from mode_ray.run_root.storage import settings_hash
from mode_ray.train.schedule import Schedule


@dataclass(frozen=True)
class Inputs:
    """The model and how its batches are made: identical for every job of a run."""

    model: str  # open_clip model name
    batch_size: int  # global batch
    precision: str
    grad_accum_steps: int
    seed: int
    shuffle_buffer: int
    holdout_fraction: float
    holdout_max_rows: int
    decode_cache: bool
    caption_draw: str
    manifest: str  # the manifest's run id: new data, new models


@dataclass(frozen=True)
class Optimizer:
    """AdamW as a job builds it; the learning rate is its `Schedule`'s, set before every step."""

    kind: Literal["mode_ray", "reference"]  # open_clip's decay split, or torch's AdamW defaults (CLIP-MoE's)
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip_norm: float | None = None  # clip the global gradient norm to this (open_clip's --grad-clip-norm)


@dataclass(frozen=True)
class Balance:
    """CLIP-MoE's load-balancing term: `coef · (image + text_weight · text)`."""

    coef: float
    counts: str
    text_weight: float
    form: str


@dataclass(frozen=True)
class Loss:
    label_smoothing: float = 0.0
    fixed_temperature: float | None = None  # None: the learnt logit scale
    balance: Balance | None = None


@dataclass(frozen=True)
class McLPlan:
    """An MCL stage's data: every training pair clustered by the previous stage's model, batches that each
    hold one accumulated cluster, planned when the parent is complete (`mode_ray.data.mcl_plan`)."""

    stage: int
    image_clusters: int
    text_clusters: int
    epochs: float
    last_batch: str
    batch_order: str
    sample_rows: int  # the most pairs the k-means fits on


@dataclass(frozen=True)
class Data:
    """Which rows a job trains on: all of them, a partition plus its out-of-cluster share, or an MCL plan."""

    kind: Literal["all", "partition", "mcl"]
    expert: int | None = None
    ooc_ratio: float = 0.0
    mcl: McLPlan | None = None


@dataclass(frozen=True)
class Upcycle:
    """Router fine-tuning's model: every block's MLP → a top-k MoE of the MCL stages' MLPs."""

    n_experts: int
    top_k: int
    towers: tuple[str, ...]
    expert_dropout: float


@dataclass(frozen=True)
class Start:
    """Where the weights come from: random init; a parent's final state (weights, optimizer, step: a tail
    continues the seed); an export's weights (`identity` names an export from outside the run); or an
    upcycled MoE of the parents' exports."""

    kind: Literal["random", "resume", "weights", "upcycle"]
    identity: str | None = None  # an export from outside the run (training.init, moe.base): how it is named


@dataclass(frozen=True)
class Paths:
    """Where the job reads its start from and writes to: not hashed."""

    out_dir: str
    export_dir: str
    start_urls: tuple[str, ...] = ()  # resume: the parent's state file; weights/upcycle: export folders
    data_model: str | None = None  # an MCL stage: the export whose embeddings cluster its data


@dataclass(frozen=True)
class TrainJob:
    name: str
    role: Literal["model", "mcl", "router"]  # a model of the run (card, registry), an MCL stage, the router
    parents: tuple[str, ...]
    start: Start
    data: Data
    trainable: Literal["all", "mlp", "router"]
    schedule: Schedule
    first_step: int
    end_step: int | None  # None: decided by the data plan (an MCL stage's steps), see `with_steps`
    stretch: float  # the tail's learning-rate curve is this much longer (generalist-matched: n experts)
    optimizer: Optimizer
    loss: Loss
    inputs: Inputs
    paths: Paths
    upcycle: Upcycle | None = None
    marker: dict[str, Any] = field(default_factory=dict, compare=False)  # extra keys for its _SUCCESS

    @property
    def expert(self) -> int | None:
        return self.data.expert

    @property
    def steps(self) -> int:
        if self.end_step is None:
            raise ValueError(f"{self.name}'s steps are planned with its data")
        return self.end_step - self.first_step

    @property
    def init_from_seed(self) -> bool:
        return self.start.kind == "resume"

    def with_steps(self, steps: int) -> TrainJob:
        """An MCL stage once its batches are planned: `steps` from 0, its own schedule over them."""
        return replace(self, end_step=steps, schedule=replace(self.schedule, total_steps=steps))

    def summary(self) -> dict[str, Any]:
        """What metrics.json keeps of the job (the keys every report reads)."""
        return {
            "name": self.name,
            "expert": self.expert,
            "start_step": self.first_step,
            "end_step": self.end_step,
            "stretch": self.stretch,
            "init_from_seed": self.init_from_seed,
            "role": self.role,
            "parents": list(self.parents),
        }


def hashed_fields(job: TrainJob) -> dict[str, Any]:
    """Everything a job is, but where it lives and its planned steps when the data plans them."""
    out = asdict(job)
    for key in ("paths", "marker"):
        out.pop(key)
    if job.data.kind == "mcl":
        out.pop("end_step")
        out["schedule"].pop("total_steps")
    if not job.schedule.decay_after_warmup:  # as before the setting existed: a finished run is kept
        out["schedule"].pop("decay_after_warmup")
    # the optimizer carried its learning rate, always the schedule's base rate, until the schedule owned it:
    # hashed where it was, so a finished run is kept
    out["optimizer"]["lr"] = job.schedule.base_lr
    return out


def job_hashes(jobs: list[TrainJob], known: dict[str, str] | None = None) -> dict[str, str]:
    """Each job's settings hash, over its own fields and its parents' hashes (`known`: parents outside the
    list, complete already)."""
    hashes = dict(known or {})
    for job in topological(jobs):
        missing = [p for p in job.parents if p not in hashes]
        if missing:
            raise ValueError(f"{job.name} starts from {missing}, which is neither planned nor known")
        hashes[job.name] = settings_hash(hashed_fields(job), [hashes[p] for p in job.parents])
    return {j.name: hashes[j.name] for j in jobs}


def topological(jobs: list[TrainJob]) -> list[TrainJob]:
    """Parents before children (a parent outside the list counts as done); an error on a cycle."""
    names = {j.name for j in jobs}
    done: set[str] = set()
    order: list[TrainJob] = []
    todo = list(jobs)
    while todo:
        ready = [j for j in todo if all(p in done or p not in names for p in j.parents)]
        if not ready:
            raise ValueError("training jobs depend on each other in a cycle: " + ", ".join(j.name for j in todo))
        order += ready
        done |= {j.name for j in ready}
        todo = [j for j in todo if j.name not in done]
    return order


def critical_path(jobs: list[TrainJob]) -> dict[str, int]:
    """Per job, how many jobs wait on it in its longest chain of descendants: started first when several are
    ready, so a long chain (the MoE's stages after its base) is not left for last."""
    children: dict[str, list[str]] = {j.name: [] for j in jobs}
    for job in jobs:
        for parent in job.parents:
            children.setdefault(parent, []).append(job.name)
    depth: dict[str, int] = {}
    for job in reversed(topological(jobs)):
        depth[job.name] = max((1 + depth[c] for c in children[job.name]), default=0)
    return depth


@dataclass(frozen=True)
class LoopRun:
    """How a job runs, never what it learns: threads, cadence, where it writes, the test hook, tracking."""

    torch_threads: int
    checkpoint_every_steps: float
    log_every_steps: int
    holdout: bool  # a held-out dataset exists (rank 0 validates on it)
    s3: dict[str, Any]
    fail_once_at_step: int | None = None
    failure_marker: str | None = None
    tracking: dict[str, Any] | None = None
    deterministic: bool = False  # GPU: deterministic kernels (the CPU path is deterministic already)
