"""The HTTP API: zero-shot classification (POST /, /v1/zero-shot-image-classification and its /batch), GET /health,
GET /v1/experts, and the work behind a classification: check the request, route the labels, fan out to the
experts, combine their logits.

A mixin of the ingress (app.py, whose constructor sets the state these methods read: cfg, limits, router,
groups, models, present, info), apart so the API reads without the pages or the wiring.
"""

# No `from __future__ import annotations` here: FastAPI must see the route annotations as classes, and these
# methods are pickled by value with the ingress (app.py), so string annotations could not be resolved in the
# replica.

import asyncio
import logging
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from mode_ray.eval.scoring import restrict
from mode_ray.eval.zero_shot import ensemble_logits
from mode_ray.run_root.layout import MOE
from mode_ray.run_root.names import expert_name
from mode_ray.serve.middleware import ERRORS, api
from mode_ray.serve.schemas import (
    BatchZeroShotRequest,
    ClassificationWithWeights,
    ExpertsResponse,
    LabelScore,
    ZeroShotParameters,
    ZeroShotRequest,
)
from mode_ray.serve.validation import RequestError, check_parameters, decode_image

log = logging.getLogger("ray.serve")


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


async def _await(response: Any) -> Any:
    return await response


class ApiRoutes:
    """The API's routes and the classification behind them (a mixin of app.ZeroShotIngress)."""

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
