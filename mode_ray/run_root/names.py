"""The names of a run's models, and the one place `expert-N` is made and parsed (Ray-free)."""

from __future__ import annotations

import re

SEED = "seed"
GENERALIST = "generalist"
MATCHED = "generalist-matched"
_EXPERT = re.compile(r"expert-(\d+)")


def expert_name(expert: int) -> str:
    return f"expert-{expert}"


def expert_id(name: str) -> int | None:
    """The coarse cluster of a data expert's name; None for any other model."""
    match = _EXPERT.fullmatch(name)
    return int(match.group(1)) if match else None


def expert_ids(names: list[str] | dict[str, object]) -> list[int]:
    """The coarse clusters of the data experts among `names`, in order."""
    return sorted(e for e in map(expert_id, names) if e is not None)
