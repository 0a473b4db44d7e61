"""Progress bars for the long stages: rows embedded, steps trained per trial (with loss), images evaluated.

The work runs in other processes (Ray Data actors, Train workers of each job's trial), so they push their
counts to one small named actor with fire-and-forget calls; the driver polls it a few times a second and
draws rich bars. Only a name travels to the workers (it pickles and fits in a JSON trial config); a worker
that finds no board (a library call without bars, a test) reports nothing. On a terminal the bars are
live; in a file or a job log rich prints each bar once, in its final state, when the stage ends.

One board serves every stage a driver runs on one Ray: each stage opens its own page on it (`BOARD/STAGE`)
and closes it when done. A board per stage was one more process per stage (~1.5 core-s to start one on
2 cores: 43 of them in a run of the test suite).
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
    """Ray actor (num_cpus=0): the latest count of every bar, by stage."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, dict[str, Any]]] = {}
        self.closed: set[str] = set()

    def close(self, stage: str) -> None:
        self.stages.pop(stage, None)
        self.closed.add(stage)

    def update(
        self,
        stage: str,
        bar: str,
        advance: int = 0,
        completed: int | None = None,
        total: int | None = None,
        note: str = "",
    ) -> None:
        if stage in self.closed:  # a late report from a stage that has ended
            return
        entry = self.stages.setdefault(stage, {}).setdefault(bar, {"completed": 0, "total": None, "note": ""})
        entry["completed"] = completed if completed is not None else entry["completed"] + advance
        if total is not None:
            entry["total"] = total
        if note:
            entry["note"] = note

    def snapshot(self, stage: str) -> dict[str, dict[str, Any]]:
        return self.stages.get(stage, {})


_HANDLES: dict[str, Any] = {}  # per process: board actor name -> handle (None when there is no such board)
_SESSION_BOARD: tuple[tuple[str, str], str, Any] | None = None  # the driver's (node, job), its board's name, handle
_SESSION_LOCK = threading.Lock()  # stages may start side by side: one board all the same


def report(board: str | None, bar: str, **update: Any) -> None:
    """Advance or set one bar of a stage's page (`board`, "ACTOR/STAGE") without waiting; a no-op without one."""
    if not board:
        return
    import ray

    name, stage = board.split("/", 1)
    if name not in _HANDLES:
        try:
            _HANDLES[name] = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:  # the driver that made it has gone, or never made one
            _HANDLES[name] = None
    if _HANDLES[name] is not None:
        _HANDLES[name].update.remote(stage, bar, **update)


def _session_board() -> tuple[str, Any]:
    """This driver's board on the running Ray, started on first use: a Ray started again (a new node, or a new
    job on it) gets a new one."""
    import ray

    global _SESSION_BOARD
    context = ray.get_runtime_context()
    key = (context.get_node_id(), context.get_job_id())
    with _SESSION_LOCK:
        if _SESSION_BOARD is None or _SESSION_BOARD[0] != key:
            name = f"board-{uuid.uuid4().hex[:8]}"
            _SESSION_BOARD = key, name, ray.remote(num_cpus=0)(Board).options(name=name, namespace=NAMESPACE).remote()
        return _SESSION_BOARD[1:]


@contextmanager
def progress_bars(title: str) -> Iterator[str]:
    """A page of the board for one stage and the bars drawn from it; yields its name for the workers."""
    import ray

    name, actor = _session_board()
    stage = f"{title}-{uuid.uuid4().hex[:8]}"
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
            snapshot = ray.get(actor.snapshot.remote(stage), timeout=10)
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
        yield f"{name}/{stage}"
    finally:
        stop.set()
        thread.join()
        draw()
        bars.stop()
        actor.close.remote(stage)
