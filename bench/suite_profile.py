"""Where the test suite's seconds go: every test phase's wall time and how many cores were busy meanwhile.

    python bench/suite_profile.py [--top 25] [--out suite-profile.json] [-- PYTEST ARGS ...]

pytest's `--durations` gives a phase's seconds; it cannot tell a phase that keeps the cores busy (only fewer
processes, trials or preps make it shorter) from one that waits (a timeout, a poll or a sleep does). This runs
pytest in this process (default: the whole suite, `-q`; whatever follows `--` replaces that) with a plugin
that times each setup, call and teardown, while a thread samples the machine's CPU counters (/proc/stat,
Linux) twice a second, and every process's. It prints the slowest phases with their busy cores, the phases
that left the most core-seconds idle, the suite's busy share of the machine (the ceiling on what running tests
side by side, pytest-xdist, could win), and the CPU seconds by kind of process (Ray's worker titles: a Train
controller, a caption encoder's actor, ...) with how many there were. The per-phase rows and the census go to
--out as JSON. The exit status is pytest's.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cpu_counters() -> tuple[float, int, int]:
    """(time, busy jiffies, all jiffies) of the whole machine; iowait counts as idle."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    idle = fields[3] + fields[4]
    return time.time(), sum(fields) - idle, sum(fields)


def process_kind(argv: list[str]) -> str:
    """What a process is: Ray's title for its workers (`ray::TrainController`, `ray::MapWorker(MapBatches(
    CaptionEmbedder))`, `ray::IDLE`), else its program (raylet, gcs_server) or the Python module or script."""
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return re.sub(r"\.\w+$", "", argv[0].split()[0])  # without the method it runs: `.poll_status`
    program = os.path.basename(argv[0])
    if program.startswith("python"):
        if "-m" in argv[1:-1]:
            return f"python -m {argv[argv.index('-m') + 1]}"
        scripts = [os.path.basename(a) for a in argv[1:] if a.endswith(".py")]
        return f"python {scripts[0]}" if scripts else program
    return program


class Census:
    """CPU seconds by process kind: at each tick, every process's CPU since the last tick goes to what it is
    now (a Ray task worker changes its title with each task). A process that ends between two ticks loses at
    most one tick of CPU; processes already running at the start count from then."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.last: dict[tuple[int, int], int] = {}  # (pid, start time) → CPU jiffies seen
        self.seconds: dict[str, float] = {}
        self.processes: dict[str, set[tuple[int, int]]] = {}
        self.take(baseline=True)

    def take(self, baseline: bool = False) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry.name}/cmdline") as f:
                    argv = f.read().split("\0")
            except OSError:  # it ended meanwhile
                continue
            key, cpu = (int(entry.name), int(fields[19])), int(fields[11]) + int(fields[12])
            if not baseline:
                kind = process_kind([a for a in argv if a] or [f"[{fields[0]}]"])
                self.seconds[kind] = self.seconds.get(kind, 0.0) + (cpu - self.last.get(key, 0)) / self.tick
                self.processes.setdefault(kind, set()).add(key)
            self.last[key] = cpu

    def table(self, top: int) -> str:
        lines = [f"{'core-s':>8} {'processes':>9} {'each':>6}  kind"]
        for kind, sec in sorted(self.seconds.items(), key=lambda kv: -kv[1])[:top]:
            n = len(self.processes[kind])
            lines.append(f"{sec:8.1f} {n:9d} {sec / n:6.2f}  {kind}")
        return "\n".join(lines)


class Sampler(threading.Thread):
    """The machine's CPU counters, and the processes' CPU by kind, every `every` seconds until stopped."""

    def __init__(self, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.every, self.samples, self.census = every, [cpu_counters()], Census()
        self.times = [self.samples[0][0]]  # the samples' times, for bisect
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.samples.append(cpu_counters())
            self.times.append(self.samples[-1][0])
            self.census.take()

    def busy_cores(self, start: float, end: float) -> float | None:
        """Mean busy cores between two times; None for a phase shorter than two samples."""
        i, j = bisect.bisect_left(self.times, start), bisect.bisect_right(self.times, end) - 1
        if j <= i:
            return None
        (_, busy0, all0), (_, busy1, all1) = self.samples[i], self.samples[j]
        return os.cpu_count() * (busy1 - busy0) / (all1 - all0) if all1 > all0 else None


@dataclass
class Phase:
    test: str
    phase: str  # setup (where session and module fixtures are built), call or teardown
    start: float
    seconds: float
    busy_cores: float | None = None


class Timeline:
    """A pytest plugin: when each test's setup, call and teardown ran."""

    def __init__(self) -> None:
        self.phases: list[Phase] = []

    def _timed(self, item, phase: str):  # noqa: ANN001, ANN202 — pytest's hook signature
        start = time.time()
        yield
        self.phases.append(Phase(item.nodeid, phase, start, time.time() - start))

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(self, item):  # noqa: ANN001, ANN201
        yield from self._timed(item, "setup")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):  # noqa: ANN001, ANN201
        yield from self._timed(item, "call")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(self, item):  # noqa: ANN001, ANN201
        yield from self._timed(item, "teardown")


def report(phases: list[Phase], wall: float, busy: float | None, top: int) -> str:
    cores = os.cpu_count() or 1
    measured = [p for p in phases if p.busy_cores is not None]
    lines = [f"{'seconds':>8} {'busy cores':>10}  phase     test"]
    for p in sorted(phases, key=lambda p: -p.seconds)[:top]:
        shown = "-" if p.busy_cores is None else f"{p.busy_cores:.2f}"
        lines.append(f"{p.seconds:8.1f} {shown:>10}  {p.phase:9s} {p.test}")
    lines.append(f"\nthe {top} phases that left the most core-seconds idle:")
    idle = sorted(measured, key=lambda p: -(cores - p.busy_cores) * p.seconds)[:top]
    for p in idle:
        lines.append(f"{(cores - p.busy_cores) * p.seconds:8.1f} idle core-s  {p.phase:9s} {p.test}")
    in_tests = sum(p.seconds for p in phases)
    lines.append(
        f"\n{len({p.test for p in phases})} tests, {wall:.0f} s ({in_tests:.0f} s inside test phases); "
        + (f"{busy:.2f} of {cores} cores busy on average ({busy / cores:.0%})" if busy is not None else "")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, passed = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, ["-q"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default="suite-profile.json")
    args = parser.parse_args(ours)

    timeline, sampler = Timeline(), Sampler()
    sampler.start()
    start = time.time()
    status = pytest.main(passed, plugins=[timeline])
    wall = time.time() - start
    sampler.stopped.set()
    sampler.join()
    for p in timeline.phases:
        p.busy_cores = sampler.busy_cores(p.start, p.start + p.seconds)
    busy = sampler.busy_cores(start, start + wall)
    print(report(timeline.phases, wall, busy, args.top))
    print(f"\nwhere the CPU went, by process:\n{sampler.census.table(args.top)}")
    Path(args.out).write_text(
        json.dumps(
            {
                "wall_s": wall,
                "busy_cores": busy,
                "phases": [asdict(p) for p in timeline.phases],
                "cpu_by_process": {k: [v, len(sampler.census.processes[k])] for k, v in sampler.census.seconds.items()},
            }
        )
    )
    print(f"written: {args.out}")
    return int(status)


if __name__ == "__main__":
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    sys.exit(main())
