"""Where everything lives under a run root, in one place, so every stage and the Serve app agree.

run_root/ embeddings/ rejects/ clusters/centroids.npz manifest/ prep/summary.json
          experts/{seed,expert-E,generalist}/{state.pt,export/,metrics.json} experts/summary.json
          moe/{stage-S/,router/,model/,summary.json}   (CLIP-MoE: MCL stages, router fine-tuning, the MoE)
          eval/{report.csv,report.md,report.png,predictions.parquet,logits/}
          generations/NAME/{embeddings,rejects,clusters,manifest,train_inputs,summary.json}   (mode-ray add-data)
          clusters/versions/centroids-vN.npz, experts/registry.json   (centroids before each growth; experts in service)
          experts/versions/E-before-NAME/   (an expert as it was before generation NAME refreshed it)
          tracking/JOB/ (TensorBoard; mlruns/ for MLflow)   pretrained/ARCH-HASH/ (ARCH:TAG weights, Hub layout)
          _MODE_RAY in the root and in every folder a stage writes: what mode_ray may delete (run_root/ownership.py)
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from mode_ray.config import S3Config
from mode_ray.run_root.storage import get_fs, join

# The manifest and the decoded-input cache are written in row groups this small, so that one training read
# task (row groups in a shuffled order, ~1,000 rows) holds rows of several partitions and a dense model's
# batches mix every expert's data. Written as one big row group per partition file, each read task held one
# partition, and the seed and the generalists trained on one domain at a time.
ROW_GROUP_ROWS = 128
STATE_FILE = "state.pt"  # a job's final training state: weights, optimizer, scaler, loop state
TRAIN_RECORD = "train_record.json"  # what a job's worker leaves for its trial to finish from
MOE = "moe"  # the CLIP-MoE's model name, in the report and at the endpoint
# The run root's folders the stages write, delete and redo: nothing else may live in them (no input data).
STAGE_FOLDERS = (
    "embeddings", "rejects", "clusters", "manifest", "prep", "experts", "moe", "eval", "generations",
    "train_inputs", "train_runs", "tracking", "pretrained",
)  # fmt: skip


@dataclass(frozen=True)
class RunPaths:
    root: str

    @property
    def embeddings(self) -> str:
        return join(self.root, "embeddings")

    @property
    def rejects(self) -> str:
        return join(self.root, "rejects")

    @property
    def clusters(self) -> str:
        return join(self.root, "clusters")

    @property
    def centroids(self) -> str:
        return join(self.root, "clusters", "centroids.npz")

    @property
    def manifest(self) -> str:
        return join(self.root, "manifest")

    @property
    def prep_summary(self) -> str:
        return join(self.root, "prep", "summary.json")

    def experts(self, name: str = "") -> str:
        """experts/ itself, or the folder of one trained model (seed, expert-E, generalist)."""
        return join(self.root, "experts", name) if name else join(self.root, "experts")

    def export(self, name: str) -> str:
        """Where one trained model loads from (`mode_ray.models.load_model`): the stock-open_clip export of a
        dense model, the MoE's own folder for `moe`."""
        if name == MOE:
            return self.moe("model")
        return join(self.root, "experts", name, "export")

    def moe(self, name: str = "") -> str:
        """moe/ itself, or one of its parts: stage-S (an MCL stage), router, model (the upcycled MoE)."""
        return join(self.root, "moe", name) if name else join(self.root, "moe")

    @property
    def moe_summary(self) -> str:
        return join(self.root, "moe", "summary.json")

    @property
    def experts_summary(self) -> str:
        return join(self.root, "experts", "summary.json")

    @property
    def eval(self) -> str:
        return join(self.root, "eval")


def read_centroids(url: str, s3: S3Config | None = None) -> dict[str, Any]:
    """centroids.npz as a dict: fine, coarse, fine_to_coarse, fine_sizes, encoder_id, settings; since raw
    means: fine_raw (the fine clusters' raw member means) and geometry (spherical | euclidean)."""
    fs, path = get_fs(url, s3)
    with fs.open(path, "rb") as f:
        data = np.load(io.BytesIO(f.read()))
        return {name: data[name] for name in data.files}


def centroid_geometry(cents: dict[str, Any]) -> str:
    """How the fine centres are searched: a file from before the setting is spherical."""
    return str(cents.get("geometry", "spherical"))
