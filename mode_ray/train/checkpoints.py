"""A job's training state on disk: save, load, and resume from the newest readable checkpoint (Ray-free)."""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any

import torch

from mode_ray.config import S3Config
from mode_ray.run_root.layout import STATE_FILE
from mode_ray.run_root.storage import get_fs


def save_state(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer, scaler: Any, state: dict) -> None:
    torch.save(
        {
            "model": getattr(model, "module", model).state_dict(),
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "state": state,
        },
        path,
    )


def load_state(source: Any, model: torch.nn.Module, opt: torch.optim.Optimizer | None, scaler: Any) -> dict:
    """Weights, optimizer and scaler state and the loop's plain-value state from a path or file object.

    `weights_only=True`: tensors, dicts, lists and plain values only. A run root can sit on shared storage;
    unpickling arbitrary objects from it would run whatever code a crafted file carries."""
    blob = torch.load(source, map_location="cpu", weights_only=True)
    getattr(model, "module", model).load_state_dict(blob["model"])
    if opt is not None:
        opt.load_state_dict(blob["optimizer"])
    if scaler is not None and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    return blob["state"]


def fetch_state(url: str, s3: S3Config, model: torch.nn.Module, opt: Any, scaler: Any) -> dict[str, Any]:
    """A parent job's final weights, AdamW state and scaler, from the run root (a path or any URL)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, STATE_FILE)
        fs, path = get_fs(url, s3)
        fs.get(path, local)
        return load_state(local, model, opt, scaler)


def restore_checkpoint(
    checkpoint: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, scaler: Any
) -> tuple[dict[str, Any] | None, list[str]]:
    """The job's latest checkpoint or, when its file does not load (truncated by a full disk or a killed
    upload), the newest earlier one of the same run; no state when none loads, and the job starts over.
    `checkpoint` has a pyarrow `filesystem` and a `path` (a Ray Train checkpoint does). Returns (state, what
    was skipped and why): the notes end in the model's metrics and the console."""
    import pyarrow.fs as pafs

    fs, latest = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent = latest.rsplit("/", 1)[0]
    infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    earlier = sorted((i.path for i in infos if i.type == pafs.FileType.Directory and i.path != latest), reverse=True)
    notes: list[str] = []
    for path in [latest] + [p for p in earlier if p.rsplit("/", 1)[-1].startswith("checkpoint_")]:
        try:
            with fs.open_input_file(f"{path}/{STATE_FILE}") as f:
                state = load_state(io.BytesIO(f.read()), model, opt, scaler)
        except Exception as e:  # noqa: BLE001 — any unreadable file: try the one before
            notes.append(f"checkpoint {path.rsplit('/', 1)[-1]} unreadable ({type(e).__name__}: {str(e)[:120]})")
            print(f"WARNING: {notes[-1]}; trying an earlier one", flush=True)
            continue
        if notes:
            notes.append(f"resumed from {path.rsplit('/', 1)[-1]} at step {state['step']}")
        return state, notes
    notes.append("no readable checkpoint: the job starts again from its beginning")
    print(f"WARNING: {notes[-1]}", flush=True)
    return None, notes
