"""Progress bars for the long stages: rows embedded, steps trained per trial (with loss), images evaluated.

The work runs in other processes (Ray Data actors, Train workers of each job's trial), so they push their
counts to one small named actor with fire-and-forget calls; the driver polls it a few times a second and
draws rich bars. Only a name travels to the workers (it pickles and fits in a JSON trial config); a worker
that finds no board (a library call without bars, a test) reports nothing. On a terminal the bars are
live; in a file or a job log rich prints each bar once, in its final state, when the stage ends.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mode_ray.console.progress import console

NAMESPACE = "mode_ray_progress"
POLL_SECONDS = 0.5


class Board:
    """Ray actor (num_cpus=0): the latest count of every bar of one stage."""

    def __init__(self) -> None:
        self.bars: dict[str, dict[str, Any]] = {}

    def update(
        self, bar: str, advance: int = 0, completed: int | None = None, total: int | None = None, note: str = ""
    ) -> None:
        entry = self.bars.setdefault(bar, {"completed": 0, "total": None, "note": ""})
        entry["completed"] = completed if completed is not None else entry["completed"] + advance
        if total is not None:
            entry["total"] = total
        if note:
            entry["note"] = note

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.bars


_HANDLES: dict[str, Any] = {}  # per process: board name -> actor handle (None when there is no such board)


def report(board: str | None, bar: str, **update: Any) -> None:
    """Advance or set one bar of `board` without waiting; a no-op without a board."""
    if not board:
        return
    import ray

    if board not in _HANDLES:
        try:
            _HANDLES[board] = ray.get_actor(board, namespace=NAMESPACE)
        except ValueError:  # the stage that made it has ended, or never made one
            _HANDLES[board] = None
    if _HANDLES[board] is not None:
        _HANDLES[board].update.remote(bar, **update)


@contextmanager
def progress_bars(title: str) -> Iterator[str]:
    """A board for one stage and the bars drawn from it; yields the board's name for the workers."""
    import ray

    name = f"{title}-{uuid.uuid4().hex[:8]}"
    actor = ray.remote(num_cpus=0)(Board).options(name=name, namespace=NAMESPACE).remote()
    columns = (
        TextColumn("  {task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
    )
    bars = Progress(*columns, console=console, refresh_per_second=4)
    ids: dict[str, Any] = {}
    stop = threading.Event()

    def draw() -> None:
        try:
            snapshot = ray.get(actor.snapshot.remote(), timeout=10)
        except Exception:  # noqa: BLE001 — a slow poll only delays a bar; the stage's own errors still raise
            return
        for bar, entry in snapshot.items():
            if bar not in ids:
                ids[bar] = bars.add_task(bar, total=entry["total"], note="")
            bars.update(ids[bar], completed=entry["completed"], total=entry["total"], note=entry["note"])

    def poll() -> None:
        while not stop.wait(POLL_SECONDS):
            draw()

    thread = threading.Thread(target=poll, name=f"progress-{title}", daemon=True)
    bars.start()
    thread.start()
    try:
        yield name
    finally:
        stop.set()
        thread.join()
        draw()
        bars.stop()
        ray.kill(actor)
