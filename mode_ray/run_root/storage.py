"""File systems for URLs (local, s3://, any fsspec protocol), run-root paths and stage completion markers.

The same code reads and writes local paths and object stores; only the URL changes.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from mode_ray.config import S3Config


def storage_options(url: str, s3: S3Config | None = None) -> dict[str, Any]:
    """fsspec options for a URL: the configured endpoint/region for s3://, nothing otherwise."""
    if not url.startswith(("s3://", "s3a://")) or s3 is None:
        return {}
    opts: dict[str, Any] = {
        "anon": s3.anon,
        "config_kwargs": {
            "retries": {"max_attempts": s3.max_attempts, "mode": "standard"},
            "connect_timeout": s3.connect_timeout_s,
            "read_timeout": s3.read_timeout_s,
        },
    }
    client_kwargs: dict[str, Any] = {}
    if s3.endpoint_url:
        opts["endpoint_url"] = s3.endpoint_url
    if s3.region:
        client_kwargs["region_name"] = s3.region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    return opts


def get_fs(url: str, s3: S3Config | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system for a URL and the path inside it."""
    fs, path = url_to_fs(url, **storage_options(url, s3))
    return fs, path


def join(url: str, *parts: str) -> str:
    """Join URL parts with '/', keeping the scheme (os.path.join would break s3://)."""
    out = url.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def settings_hash(*parts: Any) -> str:
    """A short, stable hash of JSON-able settings: what completion markers and run names are keyed on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_bytes(url: str, payload: bytes, s3: S3Config | None = None) -> None:
    """Write a whole file at any URL, creating its folder (object stores have none to create)."""
    fs, path = get_fs(url, s3)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(payload)


def write_json(url: str, payload: Any, s3: S3Config | None = None) -> None:
    write_bytes(url, json.dumps(payload, indent=2, sort_keys=True, default=str).encode(), s3)


def read_json(url: str, s3: S3Config | None = None) -> Any:
    return json.loads(read_bytes(url, s3))


def read_bytes(url: str, s3: S3Config | None = None) -> bytes:
    fs, path = get_fs(url, s3)
    with fs.open(path, "rb") as f:
        return f.read()


def exists(url: str, s3: S3Config | None = None) -> bool:
    fs, path = get_fs(url, s3)
    return fs.exists(path)


MARKER = "_SUCCESS"


def stage_done(stage_dir: str, config_hash: str, s3: S3Config | None = None) -> bool:
    """True when the stage wrote its completion marker with the same inputs and settings hash."""
    url = join(stage_dir, MARKER)
    if not exists(url, s3):
        return False
    try:
        return read_json(url, s3).get("config_hash") == config_hash
    except (OSError, ValueError):
        return False


def marker_info(stage_dir: str, s3: S3Config | None = None) -> dict[str, Any]:
    """What a completed stage recorded in its marker (run id, counts)."""
    return read_json(join(stage_dir, MARKER), s3)


def mark_done(stage_dir: str, config_hash: str, s3: S3Config | None = None, **info: Any) -> None:
    """Write the completion marker last, so a killed stage never looks complete."""
    write_json(join(stage_dir, MARKER), {"config_hash": config_hash, "finished_at": time.time(), **info}, s3)


def clear_marker(stage_dir: str, s3: S3Config | None = None) -> None:
    fs, path = get_fs(join(stage_dir, MARKER), s3)
    if fs.exists(path):
        fs.rm(path)


def arrow_filesystem(url: str, s3: S3Config | None = None) -> Any:
    """A pyarrow file system for Ray Data I/O: None for local paths (Ray's default), else fsspec wrapped."""
    if is_local(url):
        return None
    import pyarrow.fs as pafs

    fs, _ = get_fs(url, s3)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def parquet_dataset(url: str, s3: S3Config | None = None) -> Any:
    """A pyarrow dataset of the Parquet files under `url`, local or remote, read on this process. With a file
    system of its own pyarrow wants the path inside it, without the scheme: given the whole URL it lists
    `bucket/p/…` and refuses them as "outside base dir s3://bucket/p"."""
    import pyarrow.dataset as pads

    filesystem = arrow_filesystem(url, s3)
    return pads.dataset(url if filesystem is None else get_fs(url, s3)[1], format="parquet", filesystem=filesystem)


def ray_storage(url: str, s3: S3Config | None = None) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for a Ray Train RunConfig at `url`. With a file system of its
    own Ray wants the path inside it, without the scheme (`s3://bucket/p` → `bucket/p`, as Ray's docs say):
    given the whole URL, Ray made `s3:` the bucket."""
    filesystem = arrow_filesystem(url, s3)
    return (url if filesystem is None else get_fs(url, s3)[1]), filesystem


def copy_tree(src: str, dst: str, s3: S3Config | None = None) -> None:
    """Copy a completed stage's folder, its marker last, so a copy cut short never looks complete."""
    fs, path = get_fs(src, s3)
    _, target = get_fs(dst, s3)
    files = sorted(fs.find(path), key=lambda f: f.endswith("/" + MARKER))
    for f in files:
        out = target.rstrip("/") + f[len(path.rstrip("/")) :]
        fs.makedirs(out.rsplit("/", 1)[0], exist_ok=True)
        fs.cp_file(f, out)
