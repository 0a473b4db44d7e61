"""tests/test_bench_quality.py's runs — the quality benchmark, then the stability benchmark on its prep — in a
process of their own beside the rest of the suite, at idle priority once its Ray is up (tests/background.py
says why); the tests assert what they printed and wrote. `python -m tests.bench_in_background ROOT` is that
process: one Ray for both benchmarks, as the session's was when they ran inside it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from tests.background import BACKGROUND_MARK, MarkedProcess, demote, sets, started

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.demo.samples=240",
    "data.demo.shards=2",
    "data.demo.eval_samples=80",
    "data.demo.eval_shards=1",
    "data.demo.faults=false",
    "embedding.batch_size=128",
    "clustering.n_fine=8",
    "clustering.n_coarse=2",
    "training.samples_per_epoch=128",
    "training.epochs=2",
    "training.batch_size=32",
    "training.warmup_steps=2",
    "training.run.log_every_steps=2",
    "training.run.checkpoint_every_epochs=2",
    "eval.retrieval=false",
    "moe.enabled=false",  # the MoE's own end-to-end test covers it; here it would only add minutes
]
TIMEOUT_S = 1800  # beside a busy suite it gets only idle cores: far above its ~3 minutes alone


def bench(name: str) -> ModuleType:
    """bench/<name>.py as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(root: Path) -> None:
    """Both benchmarks in ROOT (one prep, shared), each one's returned text kept in ROOT/<name>.out."""
    import ray

    ray.init(num_cpus=2, object_store_memory=300 * 1024 * 1024, include_dashboard=False, log_to_driver=False,
             configure_logging=False)  # fmt: skip
    demote(os.environ[BACKGROUND_MARK])  # this process and its Ray, now that it is up (tests/background.py)
    try:
        # Two training seeds of every model the quality benchmark compares, from scratch.
        args = ["--seeds", "2", "--root", str(root), *sets(*TINY, "training.use_seed=false")]
        (root / "quality.out").write_text(bench("quality").main(args))
        # Two seeds of the seed model alone and seed 0 again; then the curves of a run drawn beside another's.
        args = ["--seeds", "2", "--repeat", "0", "--models", "seed", "--root", str(root), "--tag", "t", *sets(*TINY)]
        stability = bench("stability")
        (root / "stability.out").write_text(stability.main(args))
        runs = str(root / "t-stability.json")
        stability.main(["--compare", runs, runs, "--labels", "a", "b", "--out", str(root / "compared.png")])
    finally:
        ray.shutdown()


class BenchRuns:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mr-bench-"))
        self.process = MarkedProcess([sys.executable, "-m", "tests.bench_in_background", str(self.root)], REPO)

    def result(self) -> tuple[Path, str]:
        """ROOT and what the process printed, once it has ended well."""
        returncode, stdout, stderr = self.process.result(TIMEOUT_S)
        assert returncode == 0, f"the benchmarks failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
        return self.root, stdout

    def close(self) -> None:
        self.process.close()
        shutil.rmtree(self.root, ignore_errors=True)


def start() -> BenchRuns:
    """Start them for this session (once)."""
    return started("benchmarks", BenchRuns)


if __name__ == "__main__":
    run(Path(sys.argv[1]))
