"""One clear line per stage with its elapsed time (Ray Data draws its own progress bars inside stages)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)


class StageLog:
    def __init__(self, name: str) -> None:
        self.name = name
        self.start = time.perf_counter()
        self.skipped = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def info(self, message: str) -> None:
        console.print(f"  [dim]{self.name}:[/dim] {message}")

    def skip(self, why: str) -> None:
        self.skipped = True
        console.print(f"[yellow]↷ {self.name}[/yellow] skipped: {why}")

    def done(self, summary: str = "") -> None:
        console.print(f"[green]✓ {self.name}[/green] {summary} [dim]({self.elapsed():.1f}s)[/dim]")


@contextmanager
def stage_log(name: str) -> Iterator[StageLog]:
    log = StageLog(name)
    console.print(f"[bold]▶ {name}[/bold]")
    try:
        yield log
    except BaseException:
        console.print(f"[red]✗ {name}[/red] failed after {log.elapsed():.1f}s")
        raise
