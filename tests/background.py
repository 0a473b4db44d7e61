"""Work the test session runs beside its other tests, at idle priority: the suite leaves part of the 2 cores
idle (it keeps ~1.6 busy: a trial's processes wait on each other), and a self-contained piece of work started
with the session (conftest's `pytest_collection_modifyitems`) fills that while its tests wait at the session's
end. tests/bucket_job.py (the `ray job submit` pipeline on s3://) and tests/bench_in_background.py (the
quality and stability benchmarks) are such pieces.

Every process they start runs under Linux's SCHED_IDLE policy (nice 19 where that cannot be set): it gets a
core when nothing else wants one, and the suite's own tests, some with timing windows, keep the cores. nice 19
alone is not enough: Ray runs its workers at nice 15, so the suite's trials would still share a busy core with
the background's at 36 : 15 (measured: the shared trained run's setup took 128 s beside a nice-19 head, 89 s
beside a SCHED_IDLE one).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

# In the environment of every process the background starts (and so of its Ray's workers): a test that kills
# the session's workers by title leaves theirs alone (tests/conftest.py:session_workers).
BACKGROUND_MARK = "MODE_RAY_BACKGROUND"
# Ray's waits for a process to come up, which a Ray that only gets idle cores can outlast while the suite keeps
# both busy: a worker's registration with its raylet (60 s), a Train worker group's start (60 s).
STARVED_WAITS = {"RAY_worker_register_timeout_seconds": "600", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}


@functools.cache
def low_priority() -> tuple[str, ...]:
    """The command prefix for SCHED_IDLE where this machine lets us set it (util-linux's chrt), else nice 19."""
    idle = ("chrt", "--idle", "0")
    if shutil.which("chrt") and subprocess.run([*idle, "true"], capture_output=True).returncode == 0:
        return idle
    return ("nice", "-n", "19")


class IdleProcess:
    """A command at idle priority, its output kept in files."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="mr-idle-"))
        self.stdout, self.stderr = self.folder / "stdout", self.folder / "stderr"
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            env = {**os.environ, **STARVED_WAITS, BACKGROUND_MARK: str(self.folder)}
            self.process = subprocess.Popen([*low_priority(), *argv], stdout=out, stderr=err, cwd=cwd, env=env)

    def result(self, timeout: float) -> tuple[int, str, str]:
        """Its exit status, stdout and stderr, once it has ended."""
        returncode = self.process.wait(timeout=timeout)
        return returncode, self.stdout.read_text(), self.stderr.read_text()

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
