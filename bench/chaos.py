"""Chaos: a run killed anywhere finishes as if it never was.

    python bench/chaos.py [--kills 8] [--seed 0] [--run-root runs/chaos] [--moe]

`mode-ray run` on a tiny config (bench/faults.py's), once undisturbed and once under chaos: at N random moments
(spaced about the undisturbed run's length / N apart, drawn from `--seed`) one process of this run's gets
SIGKILL, of a kind alive then and hit least so far (ties drawn at random): a data actor or task (Ray Data's), a
training worker (`RayTrainWorker`), a job's driver (the DAG node's Ray task, which runs `TorchTrainer.fit`) or the
whole `mode-ray` command with its Ray. Whenever the command ends without finishing, it is started again, until
it does. Then every output is compared with the undisturbed run's, bit for bit: embeddings, rejects, manifest,
centroids, decoded inputs, each model's weights, the report's table, predictions, logits and routing.

Prints a row per kill (what, when, where the run was) and the outputs that differ (the goal is none); writes
RUN_ROOT/chaos.md and chaos.json.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faults import TINY  # noqa: E402 — the same tiny run as the other fault benchmark

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
# A process's kind by its title: Ray names a worker process after the actor class or task it runs.
KINDS = {
    "data actor/task": ("ray::MapWorker", "ray::MapBatches", "ray::ReadParquet", "ray::Read"),
    "training worker": ("ray::RayTrainWorker",),
    "trial driver": ("ray::run_node",),
}
WHOLE = "the mode-ray command"
MAX_ATTEMPTS = 30


class Attempt:
    """One `mode-ray run` of the chaos root, its output read in a thread (the last line says where it is)."""

    def __init__(self, root: Path, extra: tuple[str, ...]) -> None:
        sets = [x for s in (*TINY, f"run_root={root}", *extra) for x in ("--set", s)]
        cmd = [sys.executable, "-m", "mode_ray.cli", "run", "--config", "configs/demo.yaml", *sets]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.started, self.lines = time.monotonic(), []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if line.strip():
                self.lines.append(line.rstrip())

    def where(self) -> str:
        """The last stage line the command printed (its progress bars are not lines)."""
        stages = [ln for ln in self.lines if ln.lstrip()[:1] in ("▶", "✓", "↷", "✗")]
        return (stages or self.lines or ["(starting)"])[-1].strip()[:90]

    def wait(self) -> int:
        code = self.proc.wait()
        self.reader.join(timeout=10)
        return code


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (this run's Ray: its GCS and raylet are the command's children, the workers
    the raylet's), so a kill never reaches another Ray on the machine."""
    parents: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(proc.name))
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out += children
        todo += children
    return out


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def alive_by_kind(attempt: Attempt) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {WHOLE: [attempt.proc.pid]}
    for pid in descendants(attempt.proc.pid):
        name = title(pid)
        for kind, prefixes in KINDS.items():
            if name.startswith(prefixes):
                found.setdefault(kind, []).append(pid)
    return found


def training_now(root: Path) -> str:
    """The models finished so far, and the jobs with a checkpoint but no model yet."""
    finished = sorted(p.parent.name for p in (*root.glob("experts/*/_SUCCESS"), *root.glob("moe/*/_SUCCESS")))
    started = []
    for run in sorted((root / "train_runs").glob("*-*")):
        name, checkpoints = run.name.rsplit("-", 1)[0], len(list(run.glob("checkpoint_*")))
        if checkpoints and name not in finished:
            started.append(f"{name} ({checkpoints} checkpoint{'s' * (checkpoints > 1)})")
    if not (finished or started):
        return ""
    return f"; models done: {', '.join(finished) or 'none'}; mid-job: {', '.join(started) or 'none'}"


def kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def chaos_run(root: Path, kills: int, spacing: float, rng: np.random.Generator, extra: tuple) -> list[dict]:
    """Run to completion under `kills` SIGKILLs; returns one record per kill and per attempt's end."""
    events: list[dict[str, Any]] = []
    hits: dict[str, int] = {}
    landed, attempts = 0, 0
    start = time.monotonic()
    while attempts < MAX_ATTEMPTS:
        attempts += 1
        attempt = Attempt(root, extra)
        due = time.monotonic() + rng.uniform(0.2, 1.8) * spacing
        while attempt.proc.poll() is None:
            if landed < kills and time.monotonic() >= due:
                alive = alive_by_kind(attempt)
                least = min(hits.get(k, 0) for k in alive)  # every kind gets its turn, when alive
                kinds = sorted(k for k in alive if hits.get(k, 0) == least)
                kind = kinds[rng.integers(len(kinds))]
                hits[kind] = hits.get(kind, 0) + 1
                pid = alive[kind][rng.integers(len(alive[kind]))]
                what = title(pid).split(" ")[0] if kind != WHOLE else "mode-ray run"
                event = {
                    "kill": landed + 1,
                    "attempt": attempts,
                    "at_s": round(time.monotonic() - start, 1),
                    "kind": kind,
                    "process": what[:60],
                    "where": attempt.where() + training_now(root),
                }
                kill(descendants(pid) + [pid] if kind == WHOLE else [pid])
                events.append(event)
                print(f"kill {event['kill']}: {kind} ({event['process']}) at {event['at_s']} s — {event['where']}")
                landed += 1
                due = time.monotonic() + rng.uniform(0.2, 1.8) * spacing
            time.sleep(0.1)
        code = attempt.wait()
        if code == 0:
            events.append({"attempt": attempts, "ended": "finished", "at_s": round(time.monotonic() - start, 1)})
            return events
        events.append({"attempt": attempts, "ended": f"exit {code}", "tail": attempt.lines[-3:]})
        kill(descendants(attempt.proc.pid))
        time.sleep(2)  # the killed Ray's ports and shared memory freed before the next start
    raise RuntimeError(f"no finished run after {MAX_ATTEMPTS} attempts: {events[-1]}")


# --------------------------------------------------------------------------- the comparison


def _bytes_of(folder: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob(pattern))}


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(path.read_bytes())) as npz:
        return {k: npz[k] for k in npz.files}


def _weights(path: Path) -> dict[str, np.ndarray]:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    return {k: v.numpy() for k, v in state.items()}


def outputs(root: Path) -> dict[str, Any]:
    """Every output the comparison covers, by name: raw bytes, or arrays where a file stamps its write time."""
    found: dict[str, Any] = {}
    for folder in ("embeddings", "rejects", "manifest", "train_inputs"):
        found[folder] = _bytes_of(root / folder, "*.parquet")
    found["centroids"] = _arrays(root / "clusters" / "centroids.npz")
    for state in sorted(root.glob("experts/*/state.pt")) + sorted(root.glob("moe/*/state.pt")):
        found[f"weights {state.parent.relative_to(root)}"] = _weights(state)
    for name in ("routing.json", "predictions.parquet"):
        found[f"eval/{name}"] = (root / "eval" / name).read_bytes()
    found["eval/report.csv"] = report_without_clock(root / "eval" / "report.csv")
    found["eval/logits.npz"] = _arrays(root / "eval" / "logits.npz")  # a zip: its entries carry a time
    return found


def report_without_clock(path: Path) -> list[dict[str, str]]:
    """The report's rows less `train_seconds`: a reading of the clock while each model learnt, not a result."""
    with path.open(newline="") as f:
        return [{k: v for k, v in row.items() if k != "train_seconds"} for row in csv.DictReader(f)]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return a == b


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-root", default="runs/chaos")
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="draws the kill moments and targets")
    parser.add_argument("--moe", action="store_true", help="train the CLIP-MoE branch too (longer)")
    args = parser.parse_args(argv)
    from mode_ray.run_root.ownership import claim, remove_owned_tree

    root = Path(args.run_root).resolve()
    remove_owned_tree(str(root))
    claim(str(root), "bench/chaos.py")
    extra = ("moe.enabled=true",) if args.moe else ()
    # Both runs in the same folder, one after the other (moved aside when done): the outputs name their
    # input shards, which the demo generates inside the run root.
    run = root / "run"
    started = time.monotonic()
    reference = Attempt(run, extra)
    if reference.wait() != 0:
        raise RuntimeError("the undisturbed run failed:\n" + "\n".join(reference.lines[-20:]))
    undisturbed_s = time.monotonic() - started
    run.rename(root / "undisturbed")
    print(f"undisturbed run: {undisturbed_s:.0f} s")
    rng = np.random.default_rng(args.seed)
    events = chaos_run(run, args.kills, undisturbed_s / max(args.kills, 1), rng, extra)
    run.rename(root / "chaos")
    ref, got = outputs(root / "undisturbed"), outputs(root / "chaos")
    differing = sorted(k for k in ref.keys() | got.keys() if not same(ref.get(k), got.get(k)))
    kills = [e for e in events if "kill" in e]
    rows = "\n".join(
        f"| {e['kill']} | {e['attempt']} | {e['at_s']} | {e['kind']} | `{e['process']}` | {e['where']} |" for e in kills
    )
    table = (
        "| kill | attempt | at (s) | what | process | where the run was |\n|---|---|---|---|---|---|\n" + rows + "\n\n"
        f"{len(kills)} kills, {sum('ended' in e for e in events)} attempts; {len(ref)} outputs compared, "
        f"{len(differing)} differ{': ' + ', '.join(differing) if differing else ''} "
        f"(undisturbed run {undisturbed_s:.0f} s)."
    )
    print(table)
    (root / "chaos.md").write_text(table + "\n")
    result = {"events": events, "outputs": sorted(ref), "differing": differing, "undisturbed_s": undisturbed_s}
    (root / "chaos.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
