"""Typed configuration: one YAML file drives every stage.

Every section forbids unknown keys, so a typo fails loudly with the dotted key
named, instead of silently falling back to a default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Prep settings added after runs existed, at the value that reproduces what runs did before them: left out of
# prep's completion hashes at that value, so upgrading does not redo a finished clustering. (Training jobs hash
# what they are, `mode_ray.train.job.hashed_fields`.)
ADDED_NEUTRAL: dict[str, Any] = {"geometry": "spherical"}


def without_added_neutral(dump: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dump.items() if k not in ADDED_NEUTRAL or v != ADDED_NEUTRAL[k]}


class RayConfig(Section):
    """Where Ray runs: an embedded local instance (address null) or a cluster."""

    address: str | None = None
    num_cpus: int | None = None
    object_store_memory_mb: int | None = Field(default=None, ge=75)
    include_dashboard: bool = False
    resource_wait_s: float = Field(
        default=600, ge=0, description="On a cluster: how long a stage waits for the autoscaler to bring the "
        "CPUs/GPUs it asks for before it fails (an embedded Ray never grows: it fails at once).",
    )  # fmt: skip


class S3Config(Section):
    """Connection settings for s3:// URLs; credentials come from the usual AWS env/profile chain."""

    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False
    max_attempts: int = Field(
        default=6, ge=1, description="Attempts per request, exponential backoff with jitter (botocore's standard "
        "mode): rides out an endpoint that is gone for some seconds; after the last, a shard is a reject.",
    )  # fmt: skip
    connect_timeout_s: float = Field(default=5, gt=0, description="A request never hangs on a dead endpoint.")
    read_timeout_s: float = Field(default=30, gt=0)


class DemoDataConfig(Section):
    """The built-in multi-domain demo dataset, generated into data.shards / eval.shards."""

    samples: int = Field(default=2000, ge=1)
    shards: int = Field(default=8, ge=1)
    eval_samples: int = Field(default=500, ge=1)
    eval_shards: int = Field(default=2, ge=1)
    seed: int = 0
    faults: bool = False
    difficulty: Literal["standard", "hard"] = Field(
        default="standard",
        description="standard: digits, shapes, textures, letters; hard: four domains of 26-42 fine-grained, "
        "compositional classes in clutter (objects, numbers, fabrics, glyphs), where a small model is stretched.",
    )
    domains: list[str] | None = Field(
        default=None,
        description="Training domains (default: the difficulty's four); the eval split always has every one.",
    )


class DataConfig(Section):
    shards: str | list[str] = Field(
        description="Shard location: a directory, a glob, a brace pattern or a list of tar URLs (any fsspec URL)."
    )
    caption_field: Literal["caption", "texts", "txt"] = "caption"
    max_image_bytes: int = Field(default=10_000_000, ge=1)
    max_image_pixels: int = Field(default=4_000_000, ge=1)
    seed: int = 0
    s3: S3Config = S3Config()
    demo: DemoDataConfig | None = None

    @field_validator("shards", mode="before")
    @classmethod
    def _shards_given(cls, value: Any) -> Any:
        if value is None or value == "" or value == []:
            raise ValueError(
                "required: where your shards are (--set data.shards=DIR, a glob, a brace pattern or a list)"
            )
        return value


class EmbeddingConfig(Section):
    encoder: str = Field(
        default="minilm",
        description="'minilm' (offline default), 'hf:ID_OR_PATH' (pooler output) or 'open_clip:ARCH[:PRETRAINED]'.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int = Field(default=256, ge=1)
    min_actors: int = Field(default=1, ge=1)
    max_actors: int = Field(default=1, ge=1)
    num_cpus_per_actor: float = Field(default=0.5, gt=0)
    num_gpus_per_actor: float = Field(default=0.0, ge=0)
    num_threads: int | None = Field(
        default=None, ge=1, description="torch threads per actor; Ray's default is the actor's whole CPUs (min 1)."
    )

    @model_validator(mode="after")
    def _cuda_asks_for_a_gpu(self) -> EmbeddingConfig:
        if self.device == "cuda" and not self.num_gpus_per_actor:
            raise ValueError(
                "embedding.device is 'cuda' but embedding.num_gpus_per_actor is 0: Ray hides the GPUs from an "
                "actor that asks for none; set num_gpus_per_actor (e.g. 1)"
            )
        return self


class ClusteringConfig(Section):
    n_fine: int = Field(default=1024, ge=2)
    n_coarse: int = Field(default=4, ge=1)
    balanced: bool = True
    sample_fraction: float = Field(default=0.05, gt=0, le=1)
    max_sample: int | None = Field(default=None, ge=1)
    iterations: int = Field(default=50, ge=1)
    coarse_iterations: int = Field(default=100, ge=1)
    tol: float = Field(default=1e-3, ge=0)
    seed: int = 0
    use_gpu: bool = False
    geometry: Literal["spherical", "euclidean"] = Field(
        default="spherical",
        description="spherical: unit centres, cosine nearness; euclidean: the reference's k-means, raw member "
        "means as centres, L2 nearness. Either way the fine clusters' raw means are stored for routing.",
    )


class TrainingRunConfig(Section):
    """How training jobs run, never what a model learns from: no job's settings hash reads these, so changing
    them never retrains a model (as Ray keeps ScalingConfig and RunConfig apart from train_loop_config). Used
    by every job: seed, experts, generalists, MCL stages, router, added experts."""

    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch threads per worker; null: the CPUs left to each concurrent trial."
    )
    data_cpus_per_trial: float = Field(default=0.25, ge=0, description="CPUs kept for each trial's read tasks.")
    data_tasks_per_trial: int = Field(default=2, ge=1, description="Concurrent read tasks of a trial.")
    data_buffer_mb: int = Field(
        default=512,
        ge=1,
        description="Object store a trial's data may fill ahead of training: the read tasks wait beyond it instead "
        "of racing ahead (spilling, and taking the CPU the step needs). Each concurrent read task needs about 3 of "
        "its outputs of room, or fewer run at once; a training stage says so when it is short.",
    )
    max_concurrent_trials: int | None = Field(default=None, ge=1, description="null: as many as resources allow.")
    controller_poll_s: float = Field(
        default=0.25,
        gt=0,
        description="Ray Train's controller poll interval (Ray's default 2 s): each report and the end of a run "
        "wait for one poll.",
    )
    max_failures: int = Field(default=2, ge=0)
    deterministic: bool = Field(
        default=False,
        description="GPU: deterministic kernels only (torch.use_deterministic_algorithms, cuDNN, cuBLAS workspace), "
        "so a GPU job is bitwise reproducible too, at a cost in speed. The CPU path is deterministic already.",
    )
    fail_once_at_step: dict[str, int] | None = Field(
        default=None, description="Testing aid: {job name: step} raises once there, to exercise recovery."
    )
    log_every_steps: int = Field(default=10, ge=1, description="Loss curve resolution (kept with each model).")
    checkpoint_every_epochs: float = Field(
        default=1.0, gt=0, description="Checkpoint (and validate, and report to Ray Train) this often; and at the end."
    )


class OptimConfig(Section):
    """One optimizer and learning-rate schedule: AdamW, linear warmup, then a cosine to zero. Every job kind
    reads the same block (`mode_ray.runner.plan_jobs.optim`), each field one to one onto the job's `Optimizer`
    and `Schedule`: `training` (its keys flat: the seed, experts, generalists), `moe.mcl_optim` (the MCL stages)
    and `moe.router_optim` (router fine-tuning). These defaults are training's; each MoE block has its own."""

    kind: Literal["mode_ray", "reference"] = Field(
        default="mode_ray",
        description="mode_ray: AdamW with `betas` and `eps`, no decay on gains, biases or the logit scale "
        "(open_clip's split); reference: torch's AdamW defaults (β 0.9/0.999, ε 1e-8; `betas` and `eps` are not "
        "read) with decay on every trainable parameter, as the CLIP-MoE reference builds it.",
    )
    lr: float = Field(default=5e-4, gt=0, description="The schedule's peak (base) learning rate.")
    weight_decay: float = Field(default=0.2, ge=0)
    betas: tuple[float, float] = Field(default=(0.9, 0.98), description="AdamW's β (kind mode_ray).")
    eps: float = Field(default=1e-6, gt=0, description="AdamW's ε (kind mode_ray).")
    warmup_steps: int = Field(default=2000, ge=0, description="Linear warmup to `lr`, in optimizer steps.")
    lr_decay: Literal["whole_schedule", "after_warmup"] = Field(
        default="whole_schedule",
        description="The cosine decays over the whole schedule (step / total) or, as open_clip and the references, "
        "over the steps after warmup.",
    )
    grad_clip_norm: float | None = Field(
        default=None,
        gt=0,
        description="Clip the global gradient norm to this (open_clip's --grad-clip-norm); null: no clipping.",
    )


class McLOptimConfig(OptimConfig):
    """`moe.mcl_optim`: the MCL stages fine-tune the base's MLP weights only, at the CLIP-MoE reference's rate.
    Every key is its own, none is training's: betas and eps no longer follow training.betas / training.eps (a
    config that sets those sets these too to keep its MoE as before), and grad_clip_norm stays null, no
    clipping, as the CLIP-MoE reference."""

    lr: float = Field(default=1e-5, gt=0, description="The reference's MCL rate (a pretrained ViT-L).")
    warmup_steps: int = Field(default=200, ge=0, description="The reference's warmup, in optimizer steps.")


class RouterOptimConfig(OptimConfig):
    """`moe.router_optim`: router fine-tuning of the upcycled MoE, at the CLIP-MoE reference's rate. Its keys
    are its own, as `moe.mcl_optim`'s (betas, eps and grad_clip_norm included)."""

    lr: float = Field(default=1e-6, gt=0, description="The reference's router rate (a pretrained ViT-L).")
    weight_decay: float = Field(default=0.01, ge=0, description="The reference's router weight decay.")
    warmup_steps: int = Field(
        default=0, ge=0, description="The reference warms up 200 steps; the demo's router stage is ~60 steps."
    )


# MoE keys that became one optimizer block each (issue 36): a config still naming one fails with its new key.
MOVED_MOE_KEYS: dict[str, str] = {
    "lr": "moe.mcl_optim.lr",
    "weight_decay": "moe.mcl_optim.weight_decay",
    "warmup_steps": "moe.mcl_optim.warmup_steps",
    "lr_decay": "moe.mcl_optim.lr_decay and moe.router_optim.lr_decay",
    "optimizer": "moe.mcl_optim.kind and moe.router_optim.kind",
    "router_lr": "moe.router_optim.lr",
    "router_weight_decay": "moe.router_optim.weight_decay",
    "router_warmup_steps": "moe.router_optim.warmup_steps",
}


class TrainingConfig(OptimConfig):
    """One schedule for every model, counted in samples: an epoch is `samples_per_epoch` samples for the seed,
    each data expert and the generalists alike (an expert redraws its partition as often as that takes). Its
    optimizer keys (kind, lr, weight_decay, betas, eps, warmup_steps, lr_decay, grad_clip_norm) are an
    `OptimConfig`'s, flat under `training`."""

    model: str = Field(default="mode-tiny", description="open_clip model name (built-in or registered config).")
    init: str | None = Field(
        default=None,
        description="Pretrained weights the seed starts from instead of random (experts still continue the seed): "
        "local-dir:PATH, hf-hub:ORG/REPO, ARCH:TAG or ARCH:WEIGHTS_FILE (mode_ray.models.pretrained).",
    )
    epochs: float = Field(default=32, gt=0)
    seed_fraction: float = Field(default=27 / 32, ge=0, lt=1, description="Share of the schedule for the seed.")
    samples_per_epoch: int | None = Field(
        default=None, ge=1, description="Samples in one epoch, for every model; null: the manifest's training rows."
    )
    batch_size: int = Field(default=256, ge=2, description="Global batch; the last partial batch is dropped.")
    ooc_ratio: float = Field(default=0.02, ge=0, le=1)
    matched_control: bool = Field(
        default=True,
        description="Also train generalist-matched: the seed continued for one tail per expert, so its compute "
        "equals the whole ensemble's.",
    )
    holdout_fraction: float = Field(
        default=0.02, ge=0, lt=0.5, description="Manifest rows (by key hash) kept out of training for validation."
    )
    holdout_max_rows: int = Field(default=4096, ge=1, description="Caps the validation rows on big manifests.")
    precision: Literal["fp32", "amp", "amp_bf16"] = "fp32"
    grad_accum_steps: int = Field(default=1, ge=1)
    caption_draw: Literal["per_sample", "per_read"] = Field(
        default="per_sample",
        description="data.caption_field texts: one caption per sample, chosen at prep by a seeded hash of its key "
        "(clustering and training see the same), or, as the reference, one of its texts drawn on every training "
        "read (clustering and validation keep prep's). Other caption fields have one caption: no difference.",
    )
    decode_cache: bool = Field(
        default=False,
        description="Decode every image once per run into train_inputs/ (small data: decoding costs as much as "
        "a tiny model's step); off: each read decodes (web-scale data).",
    )
    seed: int = 0
    use_seed: bool = Field(default=True, description="Experts continue a seed model; off: from scratch.")
    shuffle_buffer: int = Field(default=1024, ge=0, description="Rows of the local shuffle buffer (0: no shuffle).")
    run: TrainingRunConfig = Field(
        default_factory=TrainingRunConfig,
        description="How the jobs run (workers, CPUs, retries, cadence, test hooks), never what a model learns.",
    )


class MoEConfig(Section):
    """CLIP-MoE (docs/moe.md): MCL stages fine-tune a base CLIP's MLPs on cluster-homogeneous batches, the stage
    MLPs become the experts of one MoE per block, then only the routers train. Batch size, precision, workers
    and data settings are training's. Where a default is not the reference's, docs/reference-differences.md says
    so, and `preset: reference` sets the reference's value."""

    enabled: bool = Field(default=True, description="Build the CLIP-MoE in `mode-ray run` (after training).")
    base: str = Field(
        default="generalist",
        description="The dense CLIP to upcycle: a trained model of this run (generalist, generalist-matched, seed, "
        "expert-E), or pretrained weights as open_clip names them: local-dir:PATH, hf-hub:ORG/REPO, ARCH:TAG, "
        "ARCH:WEIGHTS_FILE, or an export folder's URL (mode_ray.models.pretrained).",
    )
    stages: int = Field(default=4, ge=2, description="Experts per MoE layer = MCL stages; stage 0 is the base.")
    image_clusters: int = Field(default=3, ge=1)
    text_clusters: int = Field(default=3, ge=1)
    stage_epochs: float = Field(default=1.0, gt=0, description="Passes over the clustered rows, per MCL stage.")
    cluster_sample_rows: int = Field(
        default=100_000,
        ge=1,
        description="MCL stages: the most pairs the driver's k-means fits on (a seeded hash sample, embedded in "
        "the actor pool); every pair is then labelled by its nearest centres in the actor pool.",
    )
    mcl_optim: McLOptimConfig = Field(
        default_factory=McLOptimConfig,
        description="MCL stages: AdamW on the MLP weights only, and their schedule (an OptimConfig).",
    )
    temperature: float = Field(default=0.01, gt=0, description="MCL: fixed CLIP temperature (logit scale 1/T).")
    label_smoothing: float = Field(default=0.1, ge=0, lt=1, description="MCL: in the CLIP loss, as the reference.")
    mcl_last_batch: Literal["fill", "drop"] = Field(
        default="fill",
        description="A cluster's last partial batch: filled with other rows of the cluster (nothing left out) or "
        "dropped, as the reference truncates each cluster to whole global batches.",
    )
    mcl_batch_order: Literal["shuffled", "round_robin"] = Field(
        default="shuffled",
        description="An epoch's batches in a shuffled order, or as the reference walks them: one batch of each "
        "cluster in turn (cluster 0, 1, …), skipping clusters that ran out.",
    )
    top_k: int = Field(default=2, ge=1)
    towers: list[Literal["image", "text"]] = Field(default=["image", "text"], description="Towers made MoE.")
    router_epochs: float = Field(default=1.0, gt=0, description="Router fine-tuning, in training epochs.")
    router_optim: RouterOptimConfig = Field(
        default_factory=RouterOptimConfig,
        description="Router fine-tuning: AdamW on the routers only, and its schedule (an OptimConfig).",
    )
    router_label_smoothing: float = Field(default=0.0, ge=0, lt=1, description="Router fine-tuning's CLIP loss.")
    router_temperature: float | None = Field(
        default=None, gt=0, description="Router fine-tuning: a fixed logit scale 1/T; null: the base's own."
    )
    expert_dropout: float = Field(default=0.1, ge=0, lt=1, description="Router fine-tuning: dropout inside experts.")
    balance_coef: float = Field(default=0.01, ge=0)
    balance_counts: Literal["top1", "topk"] = Field(
        default="top1",
        description="f_e of the balance loss counts each token's top-1 pick (the paper) or every top-k slot "
        "(the reference code also counts every slot, but its shares sum to k: topk is its value / k). Either way it "
        "is computed per layer and averaged over a tower's layers.",
    )
    balance_form: Literal["per_layer", "reference"] = Field(
        default="per_layer",
        description="per_layer: the paper's loss per MoE layer, averaged over a tower's layers (f_e by "
        "balance_counts); reference: the reference code's, tokens pooled over a tower's layers, every top-k slot "
        "counted (f sums to k), divided by the world size.",
    )
    balance_text_weight: float = Field(default=0.5, ge=0, description="Loss = CLIP + coef·(image + w·text).")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, raw: Any) -> Any:
        moved = [k for k in MOVED_MOE_KEYS if isinstance(raw, dict) and k in raw]
        if moved:
            raise ValueError("; ".join(f"moe.{k} is now {MOVED_MOE_KEYS[k]}" for k in moved))
        return raw

    @model_validator(mode="after")
    def _top_k_fits(self) -> MoEConfig:
        if self.top_k > self.stages:
            raise ValueError(f"moe.top_k ({self.top_k}) exceeds the experts per layer (moe.stages = {self.stages})")
        return self


class DeploymentConfig(Section):
    """Resources and autoscaling of one Serve deployment (passed to ray_actor_options/autoscaling_config)."""

    num_cpus: float = Field(default=0.25, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=4, gt=0)
    max_ongoing_requests: int = Field(default=32, ge=1)


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    app_name: str = "mode-ray"
    layout: Literal["per_expert", "single"] = Field(
        default="single",
        description="single: one deployment holds every model (measured faster for small models, bench/serve.py); "
        "per_expert: one deployment per model, called concurrently (a GPU per expert, big models).",
    )
    models: list[str] | None = Field(
        default=None, description="Trained models to serve; null: every one in experts/ (and the MoE when built)."
    )
    max_labels: int = Field(default=100, ge=2)
    max_label_chars: int = Field(default=200, ge=1)
    max_request_bytes: int = Field(default=8_000_000, ge=1)
    body_timeout_s: float = Field(default=10.0, gt=0, description="A body still arriving after this: 408.")
    max_image_bytes: int = Field(default=5_000_000, ge=1)
    max_image_pixels: int = Field(default=4_000_000, ge=1, description="Decompression bombs are refused.")
    max_batch_images: int = Field(default=32, ge=1)
    max_batch_size: int = Field(default=16, ge=1, description="@serve.batch: requests fused per forward pass.")
    batch_wait_timeout_s: float = Field(default=0.005, ge=0)
    request_timeout_s: float = Field(default=30, gt=0, description="An expert call past this fails with 503.")
    torch_threads: int = Field(default=1, ge=1)
    keep_running: bool = Field(
        default=False, description="mode-ray run: keep serving after the self-check (mode-ray serve always does)."
    )
    ingress: DeploymentConfig = DeploymentConfig(num_cpus=0.25)
    experts: DeploymentConfig = DeploymentConfig(num_cpus=0.25)


class RoutingConfig(Section):
    """How task metadata becomes expert weights (mode_ray.routing.weights); the report shows both methods."""

    method: Literal["reference", "calibrated"] = Field(
        default="reference", description="The default ensemble for serving; eval reports both."
    )
    temperature: float = Field(default=0.05, gt=0, description="calibrated: soft-assignment temperature.")
    per_class: bool = Field(default=False, description="One weight vector per class name instead of per task.")
    top_k: int | None = Field(default=None, ge=1, description="Keep only the k heaviest experts.")
    reference_centres: Literal["unit", "raw_means"] = Field(
        default="raw_means",
        description="The reference method's distances: to the fine clusters' raw member means, as the released "
        "code measures them, or to the fine assignment centres (unit under spherical clustering). A run whose "
        "centroids predate raw means falls back to its unit centres, and says so, unless raw_means is set here.",
    )


class EvalTaskConfig(Section):
    """One zero-shot task: labelled images and the class names/templates to prompt with, or (retrieval) images
    and their captions."""

    name: str = Field(min_length=1)
    source: Literal["webdataset", "folder", "clip_benchmark"] = Field(
        description="webdataset: tar shards with a label in the json; folder: one sub-folder of images per class; "
        "clip_benchmark: a dataset folder in CLIP_benchmark's webdataset layout (class names, templates from it)."
    )
    location: str | list[str] = Field(
        description="Shards (as data.shards), the image folder, or the clip_benchmark dataset folder (any fsspec URL)."
    )
    kind: Literal["classification", "retrieval", "multilabel"] | None = Field(
        default=None,
        description="clip_benchmark: from the folder's dataset_type.txt; webdataset: classification (default), "
        "retrieval (captions: KEY.txt's lines, else data.caption_field) or multilabel (label_field: npy, "
        "KEY.npy a 0/1 vector over class_names); folder: classification.",
    )
    label_field: str | None = Field(
        default=None, description="webdataset: dotted path in the json to the class name or its index."
    )
    class_names: list[str] | None = Field(default=None, description="folder: defaults to the sub-folder names.")
    templates: list[str] | None = Field(default=None, description="Prompt templates with '{}'; default eval.templates.")
    merge_identical_captions: bool = Field(
        default=False,
        description="retrieval: identical captions are one text, matching every image they caption (web "
        "captions repeat); off: every caption is a text of its own image, as CLIP_benchmark counts.",
    )

    @model_validator(mode="after")
    def _needs_labels(self) -> EvalTaskConfig:
        if self.source == "folder" and self.kind not in (None, "classification"):
            raise ValueError(f"task {self.name!r}: a folder task is a classification task")
        labelled = self.kind != "retrieval"
        if self.source == "webdataset" and labelled and (not self.label_field or not self.class_names):
            raise ValueError(f"task {self.name!r}: webdataset classification tasks need label_field and class_names")
        if self.source == "clip_benchmark" and not isinstance(self.location, str):
            raise ValueError(f"task {self.name!r}: a clip_benchmark task's location is one dataset folder")
        if self.class_names is not None and len(self.class_names) < 2:
            raise ValueError(f"task {self.name!r}: a classification task needs at least 2 class names")
        for t in self.templates or []:
            if "{}" not in t:
                raise ValueError(f"task {self.name!r}: template {t!r} has no '{{}}' for the class name")
        return self


class BenchmarkConfig(Section):
    """A whole zero-shot suite in one line: every dataset as ROOT/wds_NAME/ in CLIP_benchmark's layout."""

    root: str = Field(description="The folder (any fsspec URL) holding one wds_NAME/ folder per dataset.")
    datasets: str | list[str] = Field(
        description="A named suite (mode-26: the MoDE paper's 26 tasks; datacomp-38: DataComp's 38) or "
        "CLIP_benchmark dataset names (vtab/dtd → wds_vtab-dtd/)."
    )
    missing: Literal["skip", "error"] = Field(
        default="skip",
        description="A dataset whose folder is not under root: skipped (named in the report, the suite average "
        "says how many it covers) or an error.",
    )


class EvalConfig(Section):
    shards: str | list[str] | None = Field(
        default=None, description="Held-out image-caption shards: the retrieval corpus (and the demo tasks' images)."
    )
    demo_tasks: bool = Field(default=False, description="Derive the demo's five tasks from eval.shards.")
    tasks: list[EvalTaskConfig] = []
    benchmark: BenchmarkConfig | None = None
    retrieval: bool = Field(default=True, description="eval.shards' captions as a retrieval task (`retrieval`).")
    routing: RoutingConfig = RoutingConfig()
    templates: list[str] = ["a photo of {}."]
    batch_size: int = Field(default=256, ge=1)
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs of the image-feature actor (and text task).")
    use_gpu: bool = False
    max_retrieval_texts: int = Field(
        default=5000,
        ge=1,
        description="Caps eval.shards' corpus (first N images); "
        "retrieval tasks of eval.tasks or eval.benchmark are never cut.",
    )


class ContinualConfig(Section):
    """`mode-ray add-data`: grow a trained run with new data (mode_ray/stages/grow.py)."""

    shards: str | list[str] | None = Field(default=None, description="The new data (add-data --shards).")
    name: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="The generation's name (add-data --name)."
    )
    coverage_percentile: float = Field(
        default=1.0, gt=0, lt=100, description="Below this percentile of the run's own assignment scores, a new "
        "sample is not covered by the existing clusters.",
    )  # fmt: skip
    min_expert_samples: int = Field(
        default=100, ge=1, description="Uncovered samples needed for new experts; fewer join their nearest expert."
    )
    refresh_experts: bool = Field(
        default=False, description="Also retrain (from the seed, on its own budget) each existing expert whose "
        "partition the new data grew; its previous version is kept (add-data --refresh-experts).",
    )  # fmt: skip


class TrackingConfig(Section):
    """Experiment tracking of every training job (mode_ray/train/tracking.py), as open_clip's --report-to."""

    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default=["tensorboard"], description="[] turns tracking off; mlflow and wandb need their packages."
    )
    dir: str = Field(default="{run_root}/tracking", description="TensorBoard logs (and MLflow's file store).")
    mlflow_uri: str | None = Field(default=None, description="MLflow tracking URI; null: a file store in dir.")
    wandb_mode: Literal["offline", "online"] = "offline"


# `preset: reference`: the references' value of every setting where mode_ray's default differs
# (docs/reference-differences.md); a value the config sets itself wins.
REFERENCE_PRESET: dict[str, dict[str, Any]] = {
    "clustering": {"geometry": "euclidean"},
    "training": {"lr_decay": "after_warmup", "caption_draw": "per_read"},
    "moe": {
        "mcl_optim": {"kind": "reference", "lr_decay": "after_warmup"},
        "router_optim": {"kind": "reference", "lr_decay": "after_warmup", "warmup_steps": 200},
        "router_label_smoothing": 0.1,
        "router_temperature": 0.01,
        "balance_form": "reference",
        "mcl_last_batch": "drop",
        "mcl_batch_order": "round_robin",
    },
}


class Config(Section):
    run_root: str
    preset: Literal["mode_ray", "reference"] = Field(
        default="mode_ray", description="reference: the references' value wherever mode_ray's default differs."
    )
    ray: RayConfig = RayConfig()
    data: DataConfig
    embedding: EmbeddingConfig = EmbeddingConfig()
    clustering: ClusteringConfig = ClusteringConfig()
    training: TrainingConfig = TrainingConfig()
    moe: MoEConfig = MoEConfig()
    serve: ServeConfig = ServeConfig()
    eval: EvalConfig = EvalConfig()
    continual: ContinualConfig = ContinualConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, raw: Any) -> Any:
        if not isinstance(raw, dict) or raw.get("preset") != "reference":
            return raw
        return _under(REFERENCE_PRESET, raw)

    @field_validator("run_root")
    @classmethod
    def _run_root_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("run_root must not be empty")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _resolve_paths(self) -> Config:
        """Local paths become absolute (Ray workers do not share the driver's working directory), and
        `{run_root}` in shard locations follows the run root, so one --set moves a whole demo run."""
        self.run_root = _absolute(self.run_root)
        self.data.shards = self._locate(self.data.shards)
        self.eval.shards = self._locate(self.eval.shards)
        self.tracking.dir = self._locate(self.tracking.dir)
        for task in self.eval.tasks:
            task.location = self._locate(task.location)
        return self

    def _locate(self, where: Any) -> Any:
        if isinstance(where, str):
            return _absolute(where.replace("{run_root}", self.run_root))
        if isinstance(where, list):
            return [_absolute(s.replace("{run_root}", self.run_root)) for s in where]
        return where


def _under(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """`given` over `defaults`, section by section: a value set in `given` wins at any depth."""
    out = dict(given)
    for key, value in defaults.items():
        if isinstance(value, dict) and isinstance(out.get(key, {}), dict):
            out[key] = _under(value, out.get(key) or {})
        elif key not in out:
            out[key] = value
    return out


def _absolute(url: str) -> str:
    if "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form dotted.key=value")
    key, text = override.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {override!r} names no key")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {'.'.join(parts[: depth + 1])!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""


def _format_errors(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        got = item.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {where}: {item['msg']}{shown}")
    return "invalid config:\n" + "\n".join(lines)


def config_from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    raw = json.loads(json.dumps(raw))  # deep copy; YAML gives only JSON-able types
    for override in overrides:
        apply_override(raw, override)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config and apply `--set` overrides, failing with the offending keys named."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return config_from_dict(raw, overrides)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
