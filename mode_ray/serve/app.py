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
"""

# No `from __future__ import annotations` here: FastAPI must see the route annotations as classes, and a
# Serve ingress class is pickled by value, so string annotations could not be resolved in the replica.

import asyncio
import logging
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mode_ray import __version__
from mode_ray.config import Config, load_config
from mode_ray.eval.router import TaskRouter
from mode_ray.eval.scoring import restrict
from mode_ray.eval.zero_shot import ensemble_logits
from mode_ray.layout import MOE, RunPaths
from mode_ray.names import expert_id, expert_ids, expert_name
from mode_ray.registry import in_service, read_registry
from mode_ray.serve.contract import stated_limits
from mode_ray.serve.experts import ExpertDeployment
from mode_ray.serve.explorer import REPORT_FILES, explorer_data, try_images
from mode_ray.serve.pages import PAGE_HEADERS, page_files
from mode_ray.serve.schemas import (
    BatchZeroShotRequest,
    ClassificationWithWeights,
    ErrorResponse,
    ExpertInfo,
    ExpertsResponse,
    LabelRoute,
    LabelScore,
    RouteRequest,
    RouteResponse,
    TryImage,
    ZeroShotParameters,
    ZeroShotRequest,
)
from mode_ray.serve.validation import RequestError, RequestLimits, check_parameters, decode_image
from mode_ray.storage import exists, join, read_bytes, read_json

log = logging.getLogger("ray.serve")
INGRESS_DRAIN_SLACK_S = 10.0  # beyond request_timeout_s: decoding, routing and answering around the expert call
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": why}
    for code, why in {
        400: "bad base64 or not a decodable image",
        404: "unknown model",
        408: "the body took longer than serve.body_timeout_s to arrive",
        413: "body, image bytes or pixels over the limits",
        422: "bad labels, templates or fields",
        503: "an expert failed or timed out; retry",
    }.items()
}

api = FastAPI(
    title="mode_ray zero-shot image classification",
    version=__version__,
    description="MoDE data experts behind the Hugging Face Inference API's zero-shot image classification shape. "
    "The schema states the server's limits; a body over `serve.max_request_bytes` is refused with 413, one "
    "that takes longer than `serve.body_timeout_s` to arrive with 408.",
)


class BodySizeLimit:
    """ASGI middleware: refuse a body over the limit from its Content-Length, or while it streams in —
    before FastAPI parses any of it — and one that trickles in for longer than `timeout_s` (408): a slow
    client holds a connection, never a replica's time. The body is read here (up to the limit) and
    replayed to the app: FastAPI would turn an error raised while it reads into a 400. The limits are
    class attributes set by the ingress from its config (the ingress is pickled by value, this class by
    reference: both see them)."""

    limit = 8_000_000
    timeout_s = 10.0

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(limit)(scope, receive, send)
            return
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except (TimeoutError, asyncio.TimeoutError):
                message = {"error": f"request body not received within {self.timeout_s:g}s"}
                await JSONResponse(message, status_code=408)(scope, receive, send)
                return
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await _too_large(limit)(scope, receive, send)
                return
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"error": f"request body larger than {limit} bytes"}, status_code=413)


api.add_middleware(BodySizeLimit)


@api.exception_handler(RequestError)
async def _request_error(_: Any, err: RequestError) -> JSONResponse:
    return JSONResponse({"error": err.message}, status_code=err.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Any, err: StarletteHTTPException) -> JSONResponse:
    # FastAPI's own refusals (a body it cannot parse — JSON nested past the parser's depth limit among them —
    # an unknown path, a wrong method) in the same {"error": ...} shape as ours.
    return JSONResponse({"error": str(err.detail)}, status_code=err.status_code, headers=err.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Any, err: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()[:10])
    return JSONResponse({"error": f"invalid request: {problems}"}, status_code=422)


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


async def _await(response: Any) -> Any:
    return await response


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


# Helpers the ingress uses are defined above it: Serve pickles the ingress class by value when it is
# decorated, with the module's globals as they are at that moment.
@serve.deployment
@serve.ingress(api)
class ZeroShotIngress:
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

    # ------------------------------------------------------------------ routes

    @api.post("/", response_model=list[LabelScore] | ClassificationWithWeights, responses=ERRORS)
    async def classify(self, body: ZeroShotRequest) -> Any:
        """Hugging Face Inference API shape: one base64 image, candidate labels → labels sorted by score."""
        image = decode_image(body.inputs, self.limits)
        return (await self._classify([image], body.parameters))[0]

    @api.post(
        "/v1/zero-shot-image-classification",
        response_model=list[LabelScore] | ClassificationWithWeights,
        responses=ERRORS,
    )
    async def classify_v1(self, body: ZeroShotRequest) -> Any:
        """The same as POST /."""
        return await self.classify(body)

    @api.post(
        "/v1/zero-shot-image-classification/batch",
        response_model=list[list[LabelScore]] | list[ClassificationWithWeights],
        responses=ERRORS,
    )
    async def classify_batch(self, body: BatchZeroShotRequest) -> Any:
        """Several images over one label set: one answer per image, in order."""
        if not body.inputs:
            raise RequestError(422, "inputs: need at least one image")
        if len(body.inputs) > self.limits.max_batch_images:
            raise RequestError(413, f"inputs: at most {self.limits.max_batch_images} images per batch request")
        images = [decode_image(b64, self.limits, f"inputs[{i}]") for i, b64 in enumerate(body.inputs)]
        return await self._classify(images, body.parameters)

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "models": self.models}

    @api.get("/v1/experts", response_model=ExpertsResponse)
    async def experts(self) -> ExpertsResponse:
        return self.info

    # ------------------------------------------------------------------ pages

    @api.get("/", include_in_schema=False)
    async def try_it_page(self, request: Request) -> Response:
        """A browser (Accept: text/html) gets the try-it page; the API is POST /."""
        if "text/html" not in request.headers.get("accept", ""):
            raise RequestError(405, "POST a zero-shot request here (schema: /openapi.json); browsers get a page")
        return self._page("index.html")

    @api.get("/experts", include_in_schema=False)
    async def experts_page(self) -> Response:
        return self._page("experts.html")

    @api.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> Response:
        return self._page(name)

    @api.get("/v1/examples", response_model=list[TryImage])
    async def examples(self) -> list[dict[str, Any]]:
        """A few evaluation images of the run, each with its task's class names."""
        if self.example_images is None:
            self.example_images = await run_in_threadpool(try_images, self.cfg)
        return self.example_images

    @api.get("/v1/explorer")
    async def explorer(self) -> dict[str, Any]:
        """Each data expert's samples, fine clusters, example pairs, marking terms and report row; the report."""
        if self.explored is None:
            router = self.router
            self.explored = await run_in_threadpool(
                explorer_data, self.cfg, router.n_experts, router.fine_to_coarse, self.present
            )
        return self.explored

    @api.post("/v1/route", response_model=RouteResponse, responses=ERRORS)
    async def route(self, body: RouteRequest) -> RouteResponse:
        """Where a label set goes: each label's nearest fine centre and its expert, and the expert weights."""
        params = ZeroShotParameters(
            candidate_labels=body.candidate_labels,
            hypothesis_template=body.hypothesis_template,
            hypothesis_templates=body.hypothesis_templates,
            routing=body.routing,
        )
        labels, templates = check_parameters(params, self.limits)
        method = body.routing or self.cfg.eval.routing.method
        routing = await run_in_threadpool(self.router.route, labels, templates, method)
        weights = restrict(routing.task_weights, self.present)
        per_label = zip(labels, routing.nearest_fine, routing.label_expert, routing.distance, strict=True)
        return RouteResponse(
            routing=method,
            expert_weights={expert_name(e): float(w) for e, w in zip(self.present, weights, strict=True)},
            labels=[
                LabelRoute(label=label, nearest_fine=int(fine), expert=expert_name(int(e)), distance=float(d))
                for label, fine, e, d in per_label
            ],
        )

    @api.get("/v1/report/{name}", include_in_schema=False)
    async def report_file(self, name: str) -> Response:
        """One of the evaluation report's files (only those: nothing else of the run is served)."""
        url = join(RunPaths(self.cfg.run_root).eval, name)
        if name not in REPORT_FILES or not await run_in_threadpool(exists, url, self.cfg.data.s3):
            raise RequestError(404, f"no report file {name!r} in this run (run `mode-ray eval`)")
        body = await run_in_threadpool(read_bytes, url, self.cfg.data.s3)
        return Response(body, media_type=REPORT_FILES[name], headers=PAGE_HEADERS)

    def _page(self, name: str) -> Response:
        if name not in self.pages:
            raise RequestError(404, f"no page {name!r}")
        body, media_type = self.pages[name]
        return Response(body, media_type=media_type, headers=PAGE_HEADERS)

    # ------------------------------------------------------------------ work

    async def _classify(self, images: list[bytes], params: ZeroShotParameters) -> list[Any]:
        labels, templates = check_parameters(params, self.limits)
        names, weights, routing, expert_weights = await self._plan(params, labels, templates)
        outputs = await self._fan_out(names, images, labels, templates)
        stacked = np.stack([outputs[n]["logits"] for n in names])  # [E, N, C]
        logits = ensemble_logits(stacked, weights)
        task_weights = weights if weights.ndim == 1 else weights.mean(axis=0)
        scale = float(np.dot(task_weights, [outputs[n]["scale"] for n in names]))
        probs = _softmax(scale * logits)
        answers = []
        for row in probs:
            order = np.argsort(-row, kind="stable")
            ranked = [LabelScore(label=labels[i], score=float(row[i])) for i in order]
            if params.return_expert_weights:
                answers.append(
                    ClassificationWithWeights(
                        predictions=ranked, model=params.model, routing=routing, expert_weights=expert_weights
                    )
                )
            else:
                answers.append(ranked)
        return answers

    async def _plan(
        self, params: ZeroShotParameters, labels: list[str], templates: list[str]
    ) -> tuple[list[str], np.ndarray, str | None, dict[str, float] | None]:
        """(models to call, their weights [E] or [C, E], routing method, expert weights to report)."""
        if params.model != "ensemble":
            if params.model not in self.models:
                hint = " (no MoE model in this run yet)" if params.model == MOE else ""
                raise RequestError(
                    404, f"unknown model {params.model!r}{hint}; available: ensemble, {', '.join(self.models)}"
                )
            return [params.model], np.ones(1), None, None
        method = params.routing or self.cfg.eval.routing.method
        routing = await run_in_threadpool(self.router.route, labels, templates, method)
        names = [expert_name(e) for e in self.present]
        weights = restrict(routing.weights, self.present)
        reported = dict(zip(names, (float(w) for w in restrict(routing.task_weights, self.present)), strict=True))
        used = weights.reshape(-1, len(names)).max(axis=0) > 0  # top-k routing: experts at 0 are not called
        return [n for n, u in zip(names, used, strict=True) if u], weights[..., used], method, reported

    async def _fan_out(
        self, names: list[str], images: list[bytes], labels: list[str], templates: list[str]
    ) -> dict[str, dict[str, Any]]:
        import ray

        calls = []
        for handle, group in self.groups:
            wanted = [n for n in group if n in names]
            if wanted:
                calls.append(_await(handle.logits.remote(wanted, images, labels, templates)))
        try:
            results = await asyncio.wait_for(asyncio.gather(*calls), timeout=self.cfg.serve.request_timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            raise RequestError(503, f"experts did not answer within {self.cfg.serve.request_timeout_s}s") from None
        except ray.exceptions.RayError as err:
            log.warning("expert call failed: %s", err)
            raise RequestError(503, f"an expert replica failed ({type(err).__name__}); retry") from None
        merged: dict[str, dict[str, Any]] = {}
        for part in results:
            merged.update(part)
        return merged


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
