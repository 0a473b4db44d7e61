"""Work the test session runs beside its other tests, at idle priority: the suite leaves part of the 2 cores
idle (it keeps ~1.6 busy: a trial's processes wait on each other), and a self-contained piece of work started
with the session (conftest's `pytest_collection_modifyitems`) fills that while its tests wait at the session's
end. tests/bucket_job.py (the `ray job submit` pipeline on s3://) and tests/bench_in_background.py (the
quality and stability benchmarks) are such pieces.

Their processes run under Linux's SCHED_IDLE policy (nice 19 where that cannot be set): they get a core when
nothing else wants one, and the suite's own tests, some with timing windows, keep the cores. nice 19 alone is
not enough: Ray runs its workers at nice 15, so the suite's trials would still share a busy core with the
background's at 36 : 15 (measured: the shared trained run's setup took 128 s beside a nice-19 head, 89 s
beside a SCHED_IDLE one). A background Ray starts at normal priority and is moved to idle priority once up
(`demote`; its later workers inherit it): Ray's own waits while it starts (its GCS's port: 30 s) ran out once,
for a head started at idle priority while the session itself was starting.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# In the environment of every process the background starts (and so of its Ray's workers): a test that kills
# the session's workers by title leaves theirs alone (tests/conftest.py:session_workers).
BACKGROUND_MARK = "MODE_RAY_BACKGROUND"
# Ray's waits for a process to come up or answer, which a Ray that only gets idle cores can outlast while the
# suite keeps both busy: a worker's registration with its raylet (60 s), a Train worker group's start (60 s), and
# Serve's checks of its HTTP proxy, whose controller kills a proxy that misses three in a row (ready: 5 s, which a
# starting proxy missed in one CI run, and `serve.start` failed with it; healthy: 10 s).
STARVED_WAITS = {
    "RAY_worker_register_timeout_seconds": "600",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "300",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "300",
}


def background_env(mark: str) -> dict[str, str]:
    """What every background process's environment adds: its mark and Ray's longer waits."""
    return {**STARVED_WAITS, BACKGROUND_MARK: mark}


@functools.cache
def low_priority() -> tuple[str, ...]:
    """The command prefix for SCHED_IDLE where this machine lets us set it (util-linux's chrt), else nice 19: for
    commands that start no Ray (the `ray job submit` CLI, an S3 server)."""
    idle = ("chrt", "--idle", "0")
    if shutil.which("chrt") and subprocess.run([*idle, "true"], capture_output=True).returncode == 0:
        return idle
    return ("nice", "-n", "19")


def sets(*settings: str) -> list[str]:
    """Config overrides as a CLI's `--set k=v` arguments."""
    return [x for s in settings for x in ("--set", s)]


def marked(mark: str) -> set[int]:
    """The processes whose environment holds BACKGROUND_MARK=`mark`, and their descendants (Ray starts its
    agents with an environment of their own)."""
    entry = f"{BACKGROUND_MARK}={mark}".encode()
    parents, ours = {}, set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if entry in (proc / "environ").read_bytes().split(b"\0"):
                    ours.add(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    while grown := {pid for pid, parent in parents.items() if parent in ours} - ours:
        ours |= grown
    return ours


def demote(mark: str) -> None:
    """Every thread of the `marked` processes to idle priority; what they start later inherits it (Linux sets a
    policy per thread, and a thread's children take its own)."""
    for _ in range(2):  # again, for a process forked while the first pass ran
        for pid in marked(mark):
            with contextlib.suppress(OSError):
                for thread in Path(f"/proc/{pid}/task").iterdir():
                    with contextlib.suppress(OSError):
                        _to_idle(int(thread.name))


def kill_marked(mark: str) -> None:
    """Kill the `marked` processes — never `ray stop`, which would stop the test session's Ray too: a background
    Ray's workers outlive a driver that is killed (and, once, a Train controller outlived its Ray's shutdown)."""
    for pid in marked(mark):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _to_idle(tid: int) -> None:
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except PermissionError:
        os.setpriority(os.PRIO_PROCESS, tid, 19)


class MarkedProcess:
    """A command that carries a fresh BACKGROUND_MARK (which it passes to `demote` once its Ray is up), its output
    kept in files."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="mr-idle-"))
        self.stdout, self.stderr = self.folder / "stdout", self.folder / "stderr"
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            env = {**os.environ, **background_env(str(self.folder))}
            self.process = subprocess.Popen(argv, stdout=out, stderr=err, cwd=cwd, env=env)

    def result(self, timeout: float) -> tuple[int, str, str]:
        """Its exit status, stdout and stderr, once it has ended."""
        returncode = self.process.wait(timeout=timeout)
        return returncode, self.stdout.read_text(), self.stderr.read_text()

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        kill_marked(str(self.folder))
        shutil.rmtree(self.folder, ignore_errors=True)


_started: dict[str, Any] = {}  # this session's pieces, by name


def started(name: str, make: Callable[[], T]) -> T:
    """The session's one `name`, made (and so started) at the first call."""
    if name not in _started:
        _started[name] = make()
    return _started[name]


def close_all() -> None:
    """Kill what the pieces started, at the session's end."""
    while _started:
        _started.popitem()[1].close()
