"""Serving benchmark: the routed 4-expert ensemble vs one expert vs a bare FastAPI + uvicorn process.

    python bench/serve.py --run-root runs/demo [--clients 8] [--seconds 15]

Needs a trained run root (`mode-ray run --config configs/demo.yaml` makes runs/demo). In one run, on this
machine: requests/s, p50 and p99 of
  1. the ensemble, one deployment per model called concurrently, and one expert (model=expert-0) through
     the same ingress                                                           — serve.layout=per_expert
  2. the same two with every model in one deployment                          — serve.layout=single
  3. a bare FastAPI + uvicorn process holding expert-0, same checks and maths, no Ray
Goal: ensemble p50 ≤ 1.5× one expert's. Every client sends the same label set (as a deployed task would),
so routing and class-text features come from the caches after the first request.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
LABELS = ["circle", "square", "triangle", "star"]
TEMPLATES = ["a {} shape.", "a flat {} icon."]

BARE_APP = """
import base64, numpy as np
from fastapi import FastAPI
from mode_ray.config import ServeConfig
from mode_ray.serve.experts import ExpertModels
from mode_ray.serve.schemas import ZeroShotRequest
from mode_ray.serve.validation import RequestLimits, check_parameters, decode_image
import torch; torch.set_num_threads(1)
models = ExpertModels({"expert-0": %(export)r})
limits = RequestLimits.from_config(ServeConfig())
app = FastAPI()

@app.post("/")
def classify(body: ZeroShotRequest):
    image = decode_image(body.inputs, limits)
    labels, templates = check_parameters(body.parameters, limits)
    out = models.logits(["expert-0"], [image], labels, templates)["expert-0"]
    z = out["scale"] * out["logits"][0]
    p = np.exp(z - z.max()); p /= p.sum()
    return [{"label": labels[i], "score": float(p[i])} for i in np.argsort(-p)]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_images(run_root: str, n: int = 16) -> list[str]:
    from mode_ray.samples.shards import iter_tar_rows

    images = []
    for tar in sorted(Path(run_root, "data", "eval").rglob("*.tar")):
        with open(tar, "rb") as f:
            images += [base64.b64encode(r["image"]).decode() for r in iter_tar_rows(f, str(tar)) if r.get("image")]
        if len(images) >= n:
            break
    if not images:
        raise SystemExit(f"no eval images under {run_root}/data/eval: run `mode-ray run` first")
    return images[:n]


def load(url: str, images: list[str], parameters: dict, clients: int, seconds: float) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    errors = [0]
    deadline = time.perf_counter() + seconds

    def loop(i: int) -> None:
        with httpx.Client(timeout=60) as c:
            n = i
            while time.perf_counter() < deadline:
                body = {"inputs": images[n % len(images)], "parameters": parameters}
                start = time.perf_counter()
                r = c.post(url, json=body)
                latencies.append(time.perf_counter() - start)
                errors[0] += r.status_code != 200
                n += clients

    with httpx.Client(timeout=60) as c:  # warm-up: caches, lazy imports
        for img in images[:4]:
            c.post(url, json={"inputs": img, "parameters": parameters}).raise_for_status()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    return {"rps": len(latencies) / wall, "p50_ms": p50, "p99_ms": p99, "errors": errors[0], "n": len(latencies)}


def serve_case(cfg_overrides: list[str], parameters: dict, images: list[str], clients: int, seconds: float) -> dict:
    from ray import serve

    from mode_ray.config import load_config
    from mode_ray.stages.serve import deploy

    cfg = load_config(REPO / "configs/demo.yaml", cfg_overrides)
    url = deploy(cfg)
    try:
        return load(url, images, parameters, clients, seconds)
    finally:
        serve.delete(cfg.serve.app_name)


def bare_case(run_root: str, parameters: dict, images: list[str], clients: int, seconds: float) -> dict:
    import httpx

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "bare_app.py").write_text(BARE_APP % {"export": f"{run_root}/experts/expert-0/export"})
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "bare_app:app", "--port", str(port), "--log-level", "warning"],
            cwd=tmp,
            env={**os.environ, "PYTHONPATH": f"{tmp}:{REPO}"},
        )
        try:
            url = f"http://127.0.0.1:{port}/"
            for _ in range(120):
                try:
                    httpx.get(url + "docs", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.5)
            return load(url, images, parameters, clients, seconds)
        finally:
            proc.terminate()
            proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-root", default=str(REPO / "runs/demo"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15)
    args = parser.parse_args()
    import ray

    run_root = os.path.abspath(args.run_root)
    images = sample_images(run_root)
    base = [f"run_root={run_root}", f"serve.port={free_port()}"]
    ensemble = {"candidate_labels": LABELS, "hypothesis_templates": TEMPLATES}
    one_expert = {**ensemble, "model": "expert-0"}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        load_args = (images, args.clients, args.seconds)
        results = {
            "ensemble (per_expert)": serve_case([*base, "serve.layout=per_expert"], ensemble, *load_args),
            "one expert (per_expert)": serve_case([*base, "serve.layout=per_expert"], one_expert, *load_args),
            "ensemble (single)": serve_case([*base, "serve.layout=single"], ensemble, *load_args),
            "one expert (single)": serve_case([*base, "serve.layout=single"], one_expert, *load_args),
        }
    finally:
        ray.shutdown()
    results["bare FastAPI, one expert"] = bare_case(run_root, one_expert, images, args.clients, args.seconds)
    print(f"\n{args.clients} concurrent clients, {args.seconds:g} s each, {os.cpu_count()} CPUs")
    print(f"{'case':28s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s}")
    for name, r in results.items():
        print(f"{name:28s} {r['rps']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['errors']:7d}")
    p50 = {name: r["p50_ms"] for name, r in results.items()}
    for layout in ("per_expert", "single"):
        ratio = p50[f"ensemble ({layout})"] / p50[f"one expert ({layout})"]
        print(f"ensemble p50 / one expert p50 ({layout}): {ratio:.2f}x   (goal <= 1.5x)")
    bare = p50["bare FastAPI, one expert"]
    print(f"one expert via Serve (single) / bare FastAPI p50: {p50['one expert (single)'] / bare:.2f}x")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
