"""What an operator sees: one clear line per stage with its elapsed time, and little else.

Ray, Ray Train, Ray Data and Serve log progress at INFO and stream every worker's output to the driver; on the
console that buried the stage lines under thousands of others. Unless `--verbose` (MODE_RAY_VERBOSE=1), their
loggers keep WARNING and up (a real error still prints) and worker output stays
in Ray's own log folder, whose path is printed when Ray starts and again with any error.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

# A file or a job log gets tables as wide as their content needs (rich's default there is 80 columns, which
# folded every table into unreadable cells).
console = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 160)
VERBOSE_ENV = "MODE_RAY_VERBOSE"
RAY_LOGGERS = ("ray", "ray.data", "ray.tune", "ray.train", "ray.serve", "ray.air")
STAGE_SECONDS: dict[str, float] = {}  # every finished or skipped stage of this process: the closing summary


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_ray_logs() -> None:
    """Ray's library loggers at WARNING (their INFO progress is the noise), unless verbose."""
    if verbose():
        return
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


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
        STAGE_SECONDS.setdefault(self.name, 0.0)
        console.print(f"[yellow]↷ {self.name}[/yellow] skipped: {why}")

    def done(self, summary: str = "") -> None:
        STAGE_SECONDS[self.name] = self.elapsed()
        console.print(f"[green]✓ {self.name}[/green] {summary} [dim]({self.elapsed():.1f}s)[/dim]")


@contextmanager
def stage_log(name: str) -> Iterator[StageLog]:
    quiet_ray_logs()  # again: a library imported by the previous stage (Serve) sets its own logger up
    log = StageLog(name)
    console.print(f"[bold]▶ {name}[/bold]")
    try:
        yield log
    except BaseException:
        console.print(f"[red]✗ {name}[/red] failed after {log.elapsed():.1f}s")
        raise


_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit|Interrupt|Failure)\w*(: |$)")


def error_reason(text: str, limit: int = 300) -> str:
    """The line of an error's text that says what went wrong: the last `SomeError: …` line. Ray's errors end
    with a worker's traceback or an excerpt of one, so their last line can be a bare `File "…"`."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if _EXCEPTION_LINE.match(line)), lines[-1] if lines else "")
    return reason[:limit]
