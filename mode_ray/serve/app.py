"""The Serve application: a FastAPI ingress that validates, routes and combines, over model deployments.

    POST /  (and /v1/zero-shot-image-classification, /…/batch)
      ingress: body ≤ max_request_bytes (refused before parsing) → base64 → image checks → labels
               → routing weights (clustering encoder + fine centres; cached per label set)
               → fan out to the experts concurrently (asyncio.gather over deployment handles)
               → Σ_e w_e · cosine_e, softmax at the experts' mean logit scale → [{label, score}] by score
      models:  ExpertDeployment replicas, @serve.batch fusing concurrent requests per forward pass
               (the data experts, the baselines and, once trained, the CLIP-MoE `moe`: `model=` picks one)

    GET /  (a browser: Accept text/html), GET /experts: the try-it and experts pages (package files, no CDN),
      over GET /v1/examples, /v1/explorer, /v1/report/NAME and POST /v1/route, which read the run's own files

`build_app(cfg)` wires it from a run root (local or s3://); `app_builder(args)` is the import path for
`serve build` / `serve deploy` config files.

This module assembles it: the ingress (its state read from the run) over the model deployments, and the
bound application. Its routes are in api.py (the HTTP API) and page_routes.py (the pages), its middleware and
error handlers in middleware.py.
"""

# No `from __future__ import annotations` here: FastAPI must see the route annotations as classes, and a
# Serve ingress class is pickled by value, so string annotations could not be resolved in the replica.

import sys
from typing import Any

import numpy as np
from ray import cloudpickle, serve
from ray.serve.handle import DeploymentHandle

from mode_ray.config import Config, load_config
from mode_ray.routing.router import TaskRouter
from mode_ray.run_root.layout import MOE, RunPaths
from mode_ray.run_root.names import expert_id, expert_ids
from mode_ray.run_root.registry import in_service, read_registry
from mode_ray.run_root.storage import exists, join, read_json
from mode_ray.serve.api import ApiRoutes
from mode_ray.serve.contract import stated_limits
from mode_ray.serve.experts import ExpertDeployment
from mode_ray.serve.middleware import BodySizeLimit, api
from mode_ray.serve.page_routes import PageRoutes
from mode_ray.serve.pages import page_files
from mode_ray.serve.schemas import ExpertInfo, ExpertsResponse
from mode_ray.serve.validation import RequestLimits

INGRESS_DRAIN_SLACK_S = 10.0  # beyond request_timeout_s: decoding, routing and answering around the expert call


def _experts_info(cfg: Config, models: list[str], router: TaskRouter) -> ExpertsResponse:
    paths = RunPaths(cfg.run_root)
    s3 = cfg.data.s3
    per_expert = read_json(paths.prep_summary, s3).get("per_expert", {}) if exists(paths.prep_summary, s3) else {}
    trained = read_json(paths.experts_summary, s3)["models"]
    added = read_registry(cfg)["experts"]
    summary = join(paths.eval, "summary.json")
    fine_counts = np.bincount(router.fine_to_coarse, minlength=router.n_experts)
    experts = []
    for name in models:
        expert = expert_id(name)
        entry = added.get(name, {})
        experts.append(
            ExpertInfo(
                id=name,
                kind="expert" if expert is not None else ("moe" if name == MOE else "baseline"),
                cluster_size=entry.get("cluster_size") or (per_expert.get(str(expert)) if expert is not None else None),
                fine_clusters=int(fine_counts[expert]) if expert is not None else None,
                samples_seen=trained.get(name, {}).get("samples_seen"),
                checkpoint=paths.export(name),
                added=entry.get("added"),
                generation=entry.get("generation"),
                refreshed=entry["refreshes"][-1]["at"] if entry.get("refreshes") else None,
            )
        )
    return ExpertsResponse(
        experts=experts,
        encoder_id=router.encoder_id,
        n_fine=len(router.fine),
        routing=cfg.eval.routing.model_dump(),
        layout=cfg.serve.layout,
        best_routing=read_json(summary, s3).get("best_routing") if exists(summary, s3) else None,
    )


# The routes' modules are pickled by value, like the ingress class below. When Serve freezes `api` (a copy, at
# the decoration), the copy's routes reach the ingress class and rebind its methods to the copy: that is what
# makes the constructor's `api.openapi_schema = …` land on the app a replica serves. Routes pickled by reference
# would leave the constructor holding the unfrozen `api`, and /openapi.json without the server's limits.
for _routes in (ApiRoutes, PageRoutes):
    cloudpickle.register_pickle_by_value(sys.modules[_routes.__module__])


# Helpers the ingress uses are defined above it: Serve pickles the ingress class by value when it is
# decorated, with the module's globals as they are at that moment.
@serve.deployment
@serve.ingress(api)
class ZeroShotIngress(ApiRoutes, PageRoutes):
    def __init__(self, settings: dict[str, Any], groups: list[list[str]], *handles: DeploymentHandle) -> None:
        cfg = Config.model_validate(settings)
        self.cfg = cfg
        BodySizeLimit.limit = cfg.serve.max_request_bytes
        BodySizeLimit.timeout_s = cfg.serve.body_timeout_s
        self.limits = RequestLimits.from_config(cfg.serve)
        self.router = TaskRouter.from_run(cfg.run_root, cfg.embedding, cfg.eval.routing, cfg.data.s3)
        self.groups = [(handle, names) for handle, names in zip(handles, groups, strict=True)]
        self.models = [n for names in groups for n in names]
        self.present = expert_ids(self.models)
        self.info = _experts_info(cfg, self.models, self.router)
        api.openapi_schema = stated_limits(api.openapi(), self.limits, self.models)
        self.pages = page_files()
        self.explored: dict[str, Any] | None = None  # built on first use: it reads the manifest
        self.example_images: list[dict[str, Any]] | None = None


# ---------------------------------------------------------------------- building the application


def served_models(cfg: Config) -> list[str]:
    """The configured models, or every trained one (the CLIP-MoE too, once moe/model holds one, as
    `load_model` tells them apart); refuses names the run does not have."""
    from mode_ray.models.moe import MOE_CONFIG_FILE

    paths = RunPaths(cfg.run_root)
    if not exists(paths.experts_summary, cfg.data.s3):
        raise ValueError(f"no trained models under {cfg.run_root}: run `mode-ray train` first")
    trained = in_service(cfg, list(read_json(paths.experts_summary, cfg.data.s3)["models"]))
    if exists(join(paths.export(MOE), MOE_CONFIG_FILE), cfg.data.s3):
        trained.append(MOE)
    names = cfg.serve.models or trained
    missing = sorted(set(names) - set(trained))
    if missing:
        raise ValueError(f"serve.models names {missing}, not trained in {cfg.run_root} (have {trained})")
    if not expert_ids(names):
        raise ValueError("serve.models must include the data experts (expert-N) for the ensemble")
    return names


def _deployment_options(dep: Any, name: str, drain_s: float | None = None) -> dict[str, Any]:
    """`drain_s`: how long a replica being replaced (an in-place update, a scale-down) may finish its
    requests before Serve kills it; Serve's rolling update stops the old replica before the new one is up."""
    return {
        "name": name,
        **({"graceful_shutdown_timeout_s": drain_s} if drain_s else {}),
        "ray_actor_options": {"num_cpus": dep.num_cpus, "num_gpus": dep.num_gpus},
        "autoscaling_config": {
            "min_replicas": dep.min_replicas,
            "initial_replicas": max(dep.min_replicas, 1),
            "max_replicas": dep.max_replicas,
            "target_ongoing_requests": dep.target_ongoing_requests,
        },
        "max_ongoing_requests": dep.max_ongoing_requests,
    }


def build_app(cfg: Config, names: list[str] | None = None) -> Any:
    """The bound application: model deployments (per the layout) under the ingress."""
    names = names or served_models(cfg)
    paths = RunPaths(cfg.run_root)
    groups = [[n] for n in names] if cfg.serve.layout == "per_expert" else [names]
    device = "cuda" if cfg.serve.experts.num_gpus > 0 else "cpu"
    deployments = [
        ExpertDeployment.options(**_deployment_options(cfg.serve.experts, _group_name(group, cfg))).bind(
            {n: paths.export(n) for n in group},
            cfg.data.s3.model_dump(),
            device,
            cfg.serve.torch_threads,
            cfg.serve.max_batch_size,
            cfg.serve.batch_wait_timeout_s,
        )
        for group in groups
    ]
    # The ingress drains for as long as its longest request may legitimately take (an expert call is cut at
    # request_timeout_s with a 503), so a request in flight during an update ends answered, never killed:
    # it may be waiting for the models' new replica, which Serve starts only after stopping the old one.
    drain_s = cfg.serve.request_timeout_s + INGRESS_DRAIN_SLACK_S
    ingress = ZeroShotIngress.options(**_deployment_options(cfg.serve.ingress, "ingress", drain_s))
    return ingress.bind(cfg.model_dump(mode="json"), groups, *deployments)


def _group_name(group: list[str], cfg: Config) -> str:
    return f"model-{group[0]}" if cfg.serve.layout == "per_expert" else "models"


def app_builder(args: dict[str, Any]) -> Any:
    """For Serve config files (`serve build` / `serve deploy`): args = {config: PATH, overrides: [k=v, …]}."""
    if "config" not in args:
        raise ValueError("application args need 'config': the mode_ray YAML config of the run to serve")
    return build_app(load_config(args["config"], list(args.get("overrides") or [])))
