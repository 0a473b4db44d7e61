"""What mode_ray may write into and delete: only folders it made itself, which a stamp file says.

A researcher may hand the tool their only copy of a dataset, or point a run root at a folder that already
holds their work. So every folder mode_ray writes a stage's output into is *claimed* first: created with a
`_MODE_RAY` stamp, or refused when it already holds files and no stamp. Deleting (`--force`, a rerun after a
crash, a rollback) goes through `remove_owned_tree`, which removes only a stamped or empty folder. Folders
written before stamps existed are recognised by their completion marker (`_SUCCESS` holding a settings hash)
or, for a run root, by the resolved `config.yaml` of a mode_ray run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml

from mode_ray.config import S3Config
from mode_ray.run_root.storage import MARKER, exists, get_fs, join, read_bytes, read_json, write_json

STAMP = "_MODE_RAY"  # '_' first: Ray Data, pyarrow datasets and webdataset readers all skip it
RUN_ROOT = "run-root"


class NotOursError(ValueError):
    """A location holds files mode_ray did not write: it is never written into or deleted."""


def stamp_of(url: str, s3: S3Config | None = None) -> dict[str, Any] | None:
    """The stamp a folder carries (what wrote it), or None."""
    stamp = join(url, STAMP)
    if not exists(stamp, s3):
        return None
    try:
        return read_json(stamp, s3)
    except (OSError, ValueError):
        return {"what": "unknown"}


def entries(url: str, s3: S3Config | None = None, limit: int = 5) -> list[str]:
    """Up to `limit` names of what a folder holds (files at any depth); [] for a missing or empty folder."""
    fs, path = get_fs(url, s3)
    if not fs.exists(path):
        return []
    if fs.isfile(path):
        return [path.rsplit("/", 1)[-1]]
    names: list[str] = []
    for folder, _, files in fs.walk(path):  # lazily: a big dataset is not listed whole to say it is not empty
        names += [f"{folder}/{f}"[len(path.rstrip("/")) + 1 :] for f in sorted(files)]
        if len(names) >= limit:
            break
    return names[:limit]


def _legacy_stage_marker(url: str, s3: S3Config | None) -> bool:
    """A completion marker of ours (from before stamps): JSON with the settings hash it was made with."""
    try:
        return "config_hash" in read_json(join(url, MARKER), s3)
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def is_ours(url: str, s3: S3Config | None = None) -> bool:
    return stamp_of(url, s3) is not None or _legacy_stage_marker(url, s3)


def listing(found: list[str]) -> str:
    """What `entries` found, for an error message (an ellipsis when there may be more)."""
    return ", ".join(found) + (", …" if len(found) >= 5 else "")


def _refusal(url: str, what: str, found: list[str]) -> NotOursError:
    return NotOursError(
        f"{url} holds files mode_ray did not write ({listing(found)}): it will not write {what} there or delete "
        "anything in it. Choose a new or empty folder"
    )


def claim(url: str, what: str, s3: S3Config | None = None) -> None:
    """Make `url` a folder of ours before writing into it: create and stamp it when missing or empty; keep it
    when already stamped; refuse it when it holds anything else."""
    if stamp_of(url, s3) is not None:
        return
    found = entries(url, s3)
    if found and not _legacy_stage_marker(url, s3):
        raise _refusal(url, what, found)
    write_json(join(url, STAMP), {"written_by": "mode_ray", "what": what}, s3)  # no time: outputs stay reproducible


def remove_owned_tree(
    url: str, s3: S3Config | None = None, owned: Callable[..., bool] | None = None, what: str = "a stage's output"
) -> None:
    """Delete a folder mode_ray wrote (stamped, or an old run's completed stage; `owned` narrows that) or an
    empty one; anything else is refused, never deleted. The one place mode_ray deletes a folder."""
    fs, path = get_fs(url, s3)
    if not fs.exists(path):
        return
    if not (owned or is_ours)(url, s3):
        found = entries(url, s3)
        if found:
            raise _refusal(url, what, found)
    fs.rm(path, recursive=True)


def fresh_dir(url: str, what: str, s3: S3Config | None = None) -> None:
    """A stage's output folder, emptied and claimed: what an earlier (maybe killed) attempt left is ours to
    delete; a folder of someone else's is refused."""
    remove_owned_tree(url, s3)
    claim(url, what, s3)


def _has_our_config(root: str, s3: S3Config | None) -> bool:
    """A run root from before stamps: its resolved config.yaml is a mode_ray config."""
    url = join(root, "config.yaml")
    if not exists(url, s3):
        return False
    try:
        raw = yaml.safe_load(read_bytes(url, s3))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and {"run_root", "data"} <= set(raw)


def claim_run_root(root: str, s3: S3Config | None = None) -> None:
    """Every command that writes a run checks its run root first: a new or empty folder becomes a run root,
    a run root of ours is used, any other folder is refused before anything is written."""
    if stamp_of(root, s3) is not None:
        return
    found = entries(root, s3)
    if found and not _has_our_config(root, s3):
        raise NotOursError(
            f"run_root {root} is not a mode_ray run (no {STAMP} stamp, no config.yaml of ours) and is not "
            f"empty ({listing(found)}): mode_ray writes runs only into a new or empty folder. Set another, e.g. "
            f"--set run_root={root.rstrip('/')}-run"
        )
    write_json(join(root, STAMP), {"written_by": "mode_ray", "what": RUN_ROOT}, s3)
