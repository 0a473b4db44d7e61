"""The browser's routes: the try-it and experts pages (GET /, /experts, /static/NAME) and the run's data they
show (GET /v1/examples, /v1/explorer, /v1/report/NAME, POST /v1/route). The page files themselves are in
mode_ray/serve/pages/.

A mixin of the ingress (app.py, whose constructor sets the state these methods read: cfg, limits, router,
present, pages, explored, example_images), apart so the pages read without the API or the wiring.
"""

# No `from __future__ import annotations` here: FastAPI must see the route annotations as classes, and these
# methods are pickled by value with the ingress (app.py), so string annotations could not be resolved in the
# replica.

from typing import Any

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from mode_ray.eval.scoring import restrict
from mode_ray.run_root.layout import RunPaths
from mode_ray.run_root.names import expert_name
from mode_ray.run_root.storage import exists, join, read_bytes
from mode_ray.serve.explorer import REPORT_FILES, explorer_data, try_images
from mode_ray.serve.middleware import ERRORS, api
from mode_ray.serve.pages import PAGE_HEADERS
from mode_ray.serve.schemas import LabelRoute, RouteRequest, RouteResponse, TryImage, ZeroShotParameters
from mode_ray.serve.validation import RequestError, check_parameters


class PageRoutes:
    """The pages' routes (a mixin of app.ZeroShotIngress)."""

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
