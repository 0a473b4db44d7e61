"""Experiment tracking from rank 0 of every training job: TensorBoard by default, MLflow and Weights & Biases
when installed and asked for (`tracking.report_to`), as open_clip's `--report-to` does.

One mode_ray run is one TensorBoard folder (`tensorboard --logdir RUN/tracking`), one MLflow experiment and one
W&B group; each job (seed, expert-E, generalist, MCL stage, router, added expert) is a run inside it, so every
model's curves sit side by side. Logged: training loss, learning rate and samples seen at every loss-curve
point; samples/s, held-out loss and image→text accuracy, overall and per coarse cluster, at every checkpoint.
A tracking folder on an object store (an `s3://` run root) cannot be appended to, and TensorBoard's event
files, MLflow's file store and W&B's offline runs all append: there the backends write to a local staging
folder, and `_Mirror` copies its new and grown files up, at most every `MIRROR_EVERY_S` and when the job ends.
No Ray here: the training loop calls it.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from mode_ray.config import S3Config
from mode_ray.run_root.storage import get_fs, is_local, join

MIRROR_EVERY_S = 30.0


class Tracker:
    """The backends one job logs to; a no-op when `spec` is None (ranks > 0, tracking off)."""

    def __init__(
        self, spec: dict[str, Any] | None, job: str, resumed_at: int | None, s3: S3Config | None = None
    ) -> None:
        self.sinks: list[Any] = []
        self.mirror: _Mirror | None = None
        if not spec:
            return
        folder, experiment = spec["dir"], spec["experiment"]
        if not is_local(folder):
            self.mirror = _Mirror(folder, s3)
            folder = self.mirror.local
        for backend in spec["report_to"]:
            if backend == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: a job resumed from a checkpoint drops the curve points logged after it
                self.sinks.append(_TensorBoard(SummaryWriter(os.path.join(folder, job), purge_step=resumed_at)))
            elif backend == "mlflow":
                self.sinks.append(_MLflow(spec.get("mlflow_uri") or f"file:{folder}/mlruns", experiment, job))
            elif backend == "wandb":
                self.sinks.append(_Wandb(folder, experiment, job, spec.get("wandb_mode", "offline")))

    def log(self, step: int, values: dict[str, float | None]) -> None:
        clean = {k: float(v) for k, v in values.items() if v is not None}
        for sink in self.sinks:
            sink.log(step, clean)
        if self.mirror:
            self.mirror.sync()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        if self.mirror:
            self.mirror.close()


class _Mirror:
    """A local staging folder (a temporary directory, gone at `close`) copied up to a remote one: each file
    whose size changed since its last copy."""

    def __init__(self, remote: str, s3: S3Config | None) -> None:
        self.staging = tempfile.TemporaryDirectory(prefix="mode_ray-tracking-")
        self.local, self.remote, self.s3 = self.staging.name, remote, s3
        self.copied: dict[str, int] = {}
        self.last = 0.0

    def sync(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.last < MIRROR_EVERY_S:
            return
        self.last = time.monotonic()
        fs, root = get_fs(self.remote, self.s3)
        for folder, _, names in os.walk(self.local):
            for name in names:
                path = os.path.join(folder, name)
                size = os.path.getsize(path)
                if self.copied.get(path) != size:
                    fs.put_file(path, join(root, os.path.relpath(path, self.local)))
                    self.copied[path] = size

    def close(self) -> None:
        self.sync(force=True)
        self.staging.cleanup()


def curve_values(point: dict[str, Any]) -> dict[str, float | None]:
    """What a loss-curve point adds to the curves: the loss, the learning rate, the gradient norm and the
    logit scale (the signals a diverging run shows first)."""
    return {
        "train/loss": point["loss"],
        "train/lr": point["lr"],
        "train/grad_norm_max": point.get("grad_norm_max"),
        "train/logit_scale": point.get("logit_scale"),
    }


def checkpoint_values(metrics: dict[str, Any], record: dict[str, Any] | None) -> dict[str, float | None]:
    """What a checkpoint adds to the curves: throughput and the held-out metrics, per coarse cluster too."""
    values: dict[str, float | None] = {
        "train/samples_per_s": metrics.get("samples_per_s"),
        "train/samples_seen": metrics.get("samples_seen"),
    }
    if record:
        values.update({"val/loss": record["all"]["loss"], "val/i2t_acc": record["all"]["i2t_acc"]})
        for cluster, m in record.get("by_cluster", {}).items():
            values[f"val_by_cluster/{cluster}/loss"] = m["loss"]
    return values


class _TensorBoard:
    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, uri: str, experiment: str, job: str) -> None:
        import mlflow

        if uri.startswith("file:"):  # the default: a file store in the run (MLflow 3 asks for this opt-in)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.run_id = self.client.create_run(self._experiment(experiment), run_name=job).info.run_id

    def _experiment(self, name: str) -> str:
        """The run's experiment, created by whichever job comes first (trials start side by side)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # noqa: BLE001 — another job created it meanwhile
            return self.client.get_experiment_by_name(name).experiment_id

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.client.log_metric(self.run_id, key.replace("/", "."), value, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _Wandb:
    def __init__(self, folder: str, experiment: str, job: str, mode: str) -> None:
        import wandb

        self.run = wandb.init(project="mode_ray", group=experiment, name=job, dir=folder, mode=mode, reinit=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()
