"""`mode-ray serve` (and the last stage of `mode-ray run`): deploy the Serve app from a run root, check it
over real HTTP with held-out images, then keep serving (until Ctrl-C) or shut it down."""

from __future__ import annotations

import base64
import contextlib
import json
import time
import urllib.error
import urllib.request
from typing import Any

from rich.markup import escape

from mode_ray.config import Config
from mode_ray.console.progress import console, stage_log, verbose
from mode_ray.eval.tasks import configured_tasks, is_classification, templates_of, webdataset_label
from mode_ray.ray_env.resources import serve_needs
from mode_ray.ray_env.runtime import require_resources, started_here
from mode_ray.run_root.storage import get_fs
from mode_ray.samples.shards import iter_tar_rows, list_shards

CHECK_IMAGES_PER_TASK = 4


def deploy(cfg: Config) -> str:
    """Start Serve's HTTP proxy on serve.host:port and run the app; returns its URL."""
    from ray import serve

    from mode_ray.serve.app import build_app, served_models

    names = served_models(cfg)
    require_resources(cfg, serve_needs(cfg, len(names)), "serve")
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(cfg, names), name=cfg.serve.app_name, route_prefix="/", blocking=False)
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    return f"http://{host}:{cfg.serve.port}/"


def post_json(url: str, payload: Any, timeout: float = 60) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def check_images(cfg: Config) -> list[dict[str, Any]]:
    """A few labelled held-out images per webdataset eval task: {task, image, label, labels, templates}."""
    picks: list[dict[str, Any]] = []
    for task in configured_tasks(cfg):
        if task.source != "webdataset" or not is_classification(task):
            continue
        shards, _ = list_shards(task.location, cfg.data.s3)
        found = 0
        for url in shards[:1]:
            fs, path = get_fs(url, cfg.data.s3)
            with fs.open(path, "rb") as f:
                for row in iter_tar_rows(f, url):
                    if found >= CHECK_IMAGES_PER_TASK or row.get("read_error"):
                        break
                    meta = json.loads(row["json"]) if row.get("json") else None
                    label, _ = webdataset_label(meta, task)
                    if label is None or not row.get("image"):
                        continue
                    picks.append(
                        {
                            "task": task.name,
                            "image": row["image"],
                            "label": task.class_names[label],
                            "labels": list(task.class_names or []),
                            "templates": templates_of(task, cfg.eval.templates),
                        }
                    )
                    found += 1
    return picks


def self_check(cfg: Config, url: str) -> dict[str, Any]:
    """Classify held-out images over HTTP with the ensemble; print what came back."""
    from rich.table import Table

    table = Table(title=f"self-check: POST {url}")
    for col in ("task", "label", "predicted", "score", "top expert weight", "ms"):
        table.add_column(col)
    correct = total = 0
    for pick in check_images(cfg):
        body = {
            "inputs": base64.b64encode(pick["image"]).decode(),
            "parameters": {
                "candidate_labels": pick["labels"],
                "hypothesis_templates": pick["templates"],
                "return_expert_weights": True,
            },
        }
        start = time.perf_counter()
        status, answer = post_json(url, body)
        ms = 1000 * (time.perf_counter() - start)
        if status != 200:
            raise RuntimeError(f"self-check request failed: HTTP {status}: {answer}")
        top = answer["predictions"][0]
        weights = answer["expert_weights"]
        heaviest = max(weights, key=weights.get)
        table.add_row(
            pick["task"],
            pick["label"],
            top["label"],
            f"{top['score']:.2f}",
            f"{heaviest} {weights[heaviest]:.2f}",
            f"{ms:.0f}",
        )
        correct += top["label"] == pick["label"]
        total += 1
    if verbose():  # the count is in the stage's closing line
        console.print(table)
    return {"url": url, "checked": total, "correct": correct}


def serve_until_interrupted(cfg: Config, log: Any, poll_s: float = 5.0) -> None:
    """Serve; when experts/registry.json changes (`mode-ray add-data`, `mode-ray experts remove`), redeploy
    the app in place: Serve brings the new version's replicas up and only then retires the old ones."""
    from mode_ray.run_root.registry import read_registry

    seen = read_registry(cfg)["version"]
    while True:
        time.sleep(poll_s)
        version = read_registry(cfg)["version"]
        if version != seen:
            seen = version
            try:
                deploy(cfg)
            except ValueError as err:  # e.g. the grown app no longer fits the resources: keep the running one
                console.print(f"[yellow]experts changed but the app was not redeployed: {escape(str(err))}[/yellow]")
                continue
            log.info(f"experts changed (registry version {version}): redeployed {cfg.serve.app_name!r} in place")


def run_serve(
    cfg: Config, force: bool = False, keep_running: bool | None = None, detach: bool = False
) -> dict[str, Any]:
    """Deploy, self-check over HTTP, then serve until Ctrl-C (keep_running), leave the app running on the
    cluster (detach: a job's driver exits, Serve stays), or shut Serve down."""
    from ray import serve

    from mode_ray.ray_env.runtime import ray_runtime

    keep = cfg.serve.keep_running if keep_running is None else keep_running
    with ray_runtime(cfg), stage_log("serve") as log:
        try:
            url = deploy(cfg)
            log.info(f"deployed {cfg.serve.app_name!r} at {url} (OpenAPI: {url}docs)")
            result = self_check(cfg, url)
            example = (
                f"curl -s {url} -H 'Content-Type: application/json' -d "
                f'\'{{"inputs": "\'$(base64 -w0 IMAGE.jpg)\'", "parameters": '
                f'{{"candidate_labels": ["circle", "square", "star"]}}}}\''
            )
            log.info(f"try it: {example}")
            if keep:
                log.info("serving; Ctrl-C to stop (experts added or removed are picked up as they change)")
                with contextlib.suppress(KeyboardInterrupt):
                    serve_until_interrupted(cfg, log)
            log.done(f"self-check: {result['correct']}/{result['checked']} held-out images right over HTTP")
            return result
        finally:
            if started_here():  # the embedded Ray ends with this command: the app goes, Ray stops the rest
                serve.delete(cfg.serve.app_name)
            elif not detach:
                serve.shutdown()
