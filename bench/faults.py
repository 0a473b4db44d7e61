"""The faults that take minutes: each one done to a real run, what happened, what was lost.

    python bench/faults.py [--run-root runs/faults] [--rate 8] [--seconds 30] [--fuzz-examples 30]

On a tiny run of the demo config (built here, in the run root):
  1. prep killed (SIGKILL to the whole command) once its embedding sub-stage is done, then rerun: only the
     later sub-stages run, and the manifest equals an undisturbed run's;
  2. a training worker process killed with SIGKILL mid-run: the trial resumes from its last checkpoint and
     finishes its planned steps;
  3. the endpoint fuzzed from its own OpenAPI schema by schemathesis (server errors counted, cases stated);
  4. a bounded load test at a stated rate with an expert replica killed in the middle: which requests
     failed, p50/p99 before and after, and how long until every request succeeded again.
The faults that take seconds are tests (tests/test_prep.py, test_train.py, test_checkpoints.py,
test_serve.py). Prints one markdown row per fault and writes them to RUN_ROOT/faults.md; docs/reliability.md
holds a measured copy.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from autoscale_local import pids_naming  # noqa: E402 — one /proc scan for both benchmarks

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
TINY = (
    "data.demo.samples=600",
    "data.demo.shards=3",
    "data.demo.eval_samples=100",
    "data.demo.eval_shards=1",
    "clustering.n_fine=8",
    "clustering.n_coarse=2",
    "training.model=mode-tiny",
    "training.samples_per_epoch=512",
    "training.epochs=4",
    "training.batch_size=32",
    "training.warmup_steps=2",
    "training.run.checkpoint_every_epochs=1",
    "moe.enabled=false",
    "eval.retrieval=false",
)
LABELS = ["circle", "square", "triangle", "star"]


def cli(root: Path, *args: str, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    sets = [x for s in (*TINY, f"run_root={root}", *extra) for x in ("--set", s)]
    cmd = [sys.executable, "-m", "mode_ray.cli", *args, "--config", "configs/demo.yaml", *sets]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=1800)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"{proc.args[3]} failed ({proc.returncode}):\n{out[-3000:]}")
    return out


def manifest(root: Path) -> dict[str, tuple[int, int]]:
    import pyarrow.dataset as pads

    rows = pads.dataset(root / "manifest", format="parquet", partitioning="hive").to_table().to_pylist()
    return {r["key"]: (r["fine_id"], r["coarse_id"]) for r in rows}


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the command and the Ray it started (the processes of its session, found by parent)."""
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    os.kill(proc.pid, signal.SIGKILL)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


# --------------------------------------------------------------------------- 1. prep


def prep_killed_after_embedding(root: Path) -> dict[str, Any]:
    reference, victim = root / "reference", root / "killed"
    finish(cli(reference, "run", "--only", "demo-data", "--only", "prep"))
    finish(cli(victim, "run", "--only", "demo-data"))
    proc = cli(victim, "prep")
    while not (victim / "embeddings" / "_SUCCESS").exists() and proc.poll() is None:
        time.sleep(0.05)
    killed_in = "assign" if (victim / "manifest" / "_SUCCESS").exists() else "cluster/assign"
    kill_tree(proc)
    proc.wait()
    rerun = finish(cli(victim, "prep"))
    same = manifest(victim) == manifest(reference)
    skipped = "prep: embed skipped" in rerun or "↷ prep: embed" in rerun
    return {
        "fault": "prep SIGKILLed (the command and its Ray) right after its embedding sub-stage; rerun",
        "happened": f"killed before {killed_in}; rerun skipped embedding: {skipped}; "
        f"manifest equal to an undisturbed run's: {same} ({len(manifest(victim))} rows)",
        "lost": "nothing" if same and skipped else "SEE OUTPUT",
    }


# --------------------------------------------------------------------------- 2. training


def train_worker_killed(root: Path) -> dict[str, Any]:
    run = root / "killed"
    proc = cli(run, "train", extra=("training.run.log_every_steps=4",))
    killed: list[str] = []
    while proc.poll() is None and not killed:
        ckpts = list((run / "train_runs").glob("seed-*/checkpoint_*"))
        pids = pids_naming("RayTrainWorker", prefix="ray::")
        if ckpts and pids:  # mid-run: the seed has written a checkpoint and is still training
            os.kill(pids[0], signal.SIGKILL)
            killed.append(ckpts[0].name)
        time.sleep(0.05)
    out = finish(proc)
    metrics = json.loads((run / "experts" / "seed" / "metrics.json").read_text())
    steps = [p["step"] for p in metrics["loss_history"]]
    ok = proc.returncode == 0 and metrics["end_step"] == metrics["job"]["end_step"]
    return {
        "fault": "the seed's Train worker process SIGKILLed after its first checkpoint",
        "happened": f"worker killed after {killed[0] if killed else 'nothing (finished first)'}; the trial "
        f"resumed and ended at step {metrics['end_step']} of {metrics['job']['end_step']} "
        f"(loss points at steps {steps[:3]}…{steps[-2:]}); every later model trained: {'✓ train' in out}",
        "lost": "the steps since that checkpoint, redone" if ok and killed else "SEE OUTPUT",
    }


# --------------------------------------------------------------------------- 3-4. serving


def fuzz(url: str, examples: int) -> dict[str, Any]:
    """schemathesis from the served OpenAPI schema; only server errors count as failures."""
    st = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    cmd = [st, "run", f"{url}openapi.json", "--checks", "not_a_server_error", "--max-examples", str(examples)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    tail = proc.stdout[-4000:]
    cases = re.findall(r"(\d+) generated", tail) or re.findall(r"(\d+) test cases", tail)
    return {
        "fault": f"schemathesis {examples} examples per operation from /openapi.json, check not_a_server_error",
        "happened": f"exit {proc.returncode}; {cases[-1] if cases else '?'} test cases; "
        + " / ".join(line.strip() for line in tail.splitlines() if re.search(r"passed|failed|error", line))[:300],
        "lost": "no server error" if proc.returncode == 0 else "SEE OUTPUT",
        "output": tail,
    }


def load_with_replica_killed(url: str, rate: float, seconds: float, image: bytes) -> dict[str, Any]:
    import httpx
    import ray

    body = {"inputs": base64.b64encode(image).decode(), "parameters": {"candidate_labels": LABELS}}
    results: list[tuple[float, int, float]] = []  # (sent at, status, latency)
    start = time.monotonic()
    kill_at = start + min(15.0, seconds / 2)

    def one(sent: float) -> None:
        t = time.monotonic()
        try:
            status = httpx.post(url, json=body, timeout=60).status_code
        except httpx.HTTPError:
            status = 0
        results.append((sent - start, status, time.monotonic() - t))

    threads, n, killed = [], 0, None
    while time.monotonic() < start + seconds:
        due = start + n / rate
        time.sleep(max(0.0, due - time.monotonic()))
        if killed is None and time.monotonic() >= kill_at:
            actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if "model-expert-1" in a["name"]]
            ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=True)
            killed = time.monotonic() - start
        thread = threading.Thread(target=one, args=(time.monotonic(),))
        thread.start()
        threads.append(thread)
        n += 1
    for thread in threads:
        thread.join()
    results.sort()
    failed = [r for r in results if r[1] != 200]
    windows = {  # when requests were sent: before the kill, the 10 s after it, the rest
        "before": [r for r in results if r[0] < killed],
        "first 10 s after": [r for r in results if killed <= r[0] < killed + 10],
        "then": [r for r in results if r[0] >= killed + 10],
    }

    def pct(rows: list) -> str:
        if not rows:
            return "-"
        p50, p99 = np.percentile([r[2] for r in rows], [50, 99]) * 1000
        return f"{p50:.0f}/{p99:.0f} ms"

    latency = "; ".join(f"{w} {pct(rows)}" for w, rows in windows.items())
    sent = f", sent at {', '.join(f'{r[0]:.1f}' for r in failed[:5])} s" if failed else ""
    recovered = windows["then"] and all(r[1] == 200 for r in windows["then"])
    return {
        "fault": f"load at {rate:g} req/s for {seconds:g} s, the expert-1 replica killed at {killed:.1f} s",
        "happened": f"{len(results)} requests, {len(failed)} failed ({sorted({r[1] for r in failed})}{sent}); "
        f"p50/p99 by when sent: {latency}",
        "lost": (f"{len(failed)} requests answered 503 (caught by the dead replica), then" if failed else "nothing;")
        + (" full recovery" if recovered else " NOT RECOVERED"),
    }


def serving_faults(root: Path, rate: float, seconds: float, examples: int) -> list[dict[str, Any]]:
    from mode_ray.config import load_config
    from mode_ray.ray_env.runtime import ray_runtime
    from mode_ray.stages.serve import check_images, deploy

    run = root / "killed"
    finish(cli(run, "eval"))
    sets = [*TINY, f"run_root={run}", "serve.layout=per_expert", "serve.port=8123"]
    cfg = load_config(REPO / "configs/demo.yaml", sets)
    with ray_runtime(cfg):
        from ray import serve

        url = deploy(cfg)
        image = next(iter(check_images(cfg)))["image"]
        rows = [fuzz(url, examples), load_with_replica_killed(url, rate, seconds, image)]
        serve.shutdown()
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-root", default="runs/faults")
    parser.add_argument("--rate", type=float, default=8.0, help="requests a second in the load test")
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--fuzz-examples", type=int, default=30, help="schemathesis examples per operation")
    parser.add_argument(
        "--steps", default="prep,train,serve", help="which faults; serve alone reuses RUN_ROOT's trained run"
    )
    args = parser.parse_args(argv)
    from mode_ray.run_root.ownership import claim, remove_owned_tree

    root = Path(args.run_root).resolve()
    steps = {
        "prep": lambda: [prep_killed_after_embedding(root)],
        "train": lambda: [train_worker_killed(root)],
        "serve": lambda: serving_faults(root, args.rate, args.seconds, args.fuzz_examples),
    }
    chosen = args.steps.split(",")
    if "prep" in chosen:  # from nothing: only a root this benchmark made is deleted
        remove_owned_tree(str(root))
    claim(str(root), "bench/faults.py")
    rows = []
    for step in (steps[name] for name in chosen):
        started = time.monotonic()
        for row in step():
            row["seconds"] = time.monotonic() - started
            rows.append(row)
            print(f"| {row['fault']} | {row['happened']} | {row['lost']} |", flush=True)
    table = "| fault | what happened | lost |\n|---|---|---|\n" + "\n".join(
        f"| {r['fault']} | {r['happened']} | {r['lost']} |" for r in rows
    )
    (root / "faults.md").write_text(table + "\n")
    (root / "faults.json").write_text(json.dumps(rows, indent=1))
    print(table)
    return table


if __name__ == "__main__":
    main()
