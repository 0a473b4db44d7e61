"""Where Ray Train and Tune write a run's checkpoints and bookkeeping: the run root's own store, s3:// included."""

from __future__ import annotations

from mode_ray.config import S3Config
from mode_ray.storage import exists, ray_storage, read_bytes


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
