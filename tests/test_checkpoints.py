"""Training state on disk is data, never code: crafted pickles are refused, damaged checkpoints skipped."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from mode_ray.run_root.layout import STATE_FILE
from mode_ray.train.checkpoints import load_state, restore_checkpoint, save_state
from mode_ray.train.loop import new_state


class _RunsACommand:
    """What an attacker would put in a checkpoint: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.AdamW(model.parameters())


def _save(folder: Path, step: int) -> torch.nn.Module:
    model, opt = _model_and_optimizer()
    folder.mkdir(parents=True)
    state = new_state(0)
    state["step"] = step
    save_state(str(folder / STATE_FILE), model, opt, torch.amp.GradScaler("cuda", enabled=False), state)
    return model


def test_a_crafted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / STATE_FILE
    torch.save({"model": _RunsACommand(marker), "optimizer": {}, "state": {}}, path)
    model, opt = _model_and_optimizer()
    with pytest.raises(pickle.UnpicklingError):
        load_state(str(path), model, opt, None)
    assert not marker.exists()


def test_restore_skips_a_truncated_or_crafted_latest_checkpoint(tmp_path):
    import ray.train

    runs = tmp_path / "run"
    good = _save(runs / "checkpoint_2026-01-01_00-00-01.000000", step=8)
    _save(runs / "checkpoint_2026-01-01_00-00-02.000000", step=16)
    latest = runs / "checkpoint_2026-01-01_00-00-03.000000"
    _save(latest, step=24)
    marker = tmp_path / "ran"
    torch.save({"model": _RunsACommand(marker)}, latest / STATE_FILE)  # crafted
    middle = runs / "checkpoint_2026-01-01_00-00-02.000000" / STATE_FILE
    middle.write_bytes(middle.read_bytes()[: middle.stat().st_size // 2])  # truncated

    model, opt = _model_and_optimizer()
    state, notes = restore_checkpoint(ray.train.Checkpoint.from_directory(str(latest)), model, opt, None)
    assert state is not None and state["step"] == 8
    assert torch.equal(model.weight, good.weight)  # the earliest checkpoint's weights, loaded
    assert len(notes) == 3 and "00-00-03" in notes[0] and "00-00-02" in notes[1] and "step 8" in notes[2]
    assert not marker.exists()

    (runs / "checkpoint_2026-01-01_00-00-01.000000" / STATE_FILE).write_bytes(b"")
    state, notes = restore_checkpoint(ray.train.Checkpoint.from_directory(str(latest)), model, opt, None)
    assert state is None and "starts again" in notes[-1]
