"""Where Ray Train writes a run's checkpoints and bookkeeping: the run root's own store, s3:// included."""

from __future__ import annotations

import os

from mode_ray.config import S3Config
from mode_ray.run_root.storage import exists, ray_storage, read_bytes


def test_ray_storage_on_s3_is_the_bucket_path_in_its_own_file_system(s3_endpoint):
    """With a file system of its own, Ray Train takes the path inside it: given the whole URL, `s3:` became the
    bucket and the seed job of an s3:// run root failed at once ("Invalid bucket name")."""
    s3 = S3Config(endpoint_url=s3_endpoint, region="us-east-1")
    path, filesystem = ray_storage("s3://mode-test/runs/r/train_runs", s3)
    assert path == "mode-test/runs/r/train_runs"
    filesystem.create_dir(f"{path}/seed-0123456789")
    with filesystem.open_output_stream(f"{path}/seed-0123456789/state.pt") as out:  # as Train writes a checkpoint
        out.write(b"weights")
    url = "s3://mode-test/runs/r/train_runs/seed-0123456789/state.pt"
    assert exists(url, s3) and read_bytes(url, s3) == b"weights"


def test_ray_storage_on_local_disk_is_the_path_as_given(tmp_path):
    assert ray_storage(str(tmp_path / "train_runs")) == (str(tmp_path / "train_runs"), None)


def test_training_curves_on_an_s3_run_root_land_in_the_bucket_and_read_in_tensorboard(s3_endpoint, tmp_path):
    """An object store cannot append, and TensorBoard's event files grow: the tracker writes them to a local
    staging folder, copies them up as they grow and at the end, and leaves nothing behind on local disk. On
    an s3:// run root the seed job failed before this ("Could not connect to the endpoint URL": TensorBoard's
    own S3 client ignored `data.s3.endpoint_url`). TensorBoard's reader is the oracle."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mode_ray.run_root.storage import get_fs
    from mode_ray.train.tracking import Tracker

    s3 = S3Config(endpoint_url=s3_endpoint, region="us-east-1")
    spec = {"dir": "s3://mode-test/runs/t/tracking", "experiment": "t", "report_to": ["tensorboard"]}
    tracker = Tracker(spec, "seed", None, s3)
    staging = tracker.mirror.local
    for step in range(3):
        tracker.log(step, {"train/loss": 3.0 - step, "train/lr": None})
    tracker.close()
    fs, path = get_fs("s3://mode-test/runs/t/tracking/seed", s3)
    (event_file,) = fs.ls(path)
    fs.get_file(event_file, str(tmp_path / event_file.rsplit("/", 1)[-1]))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert not os.path.exists(staging)
