"""The HTTP shell the endpoint's routes sit in: the FastAPI object, the middleware that refuses an oversized or
slow body before anything parses it, and the error handlers that give every refusal (ours and FastAPI's own) one
{"error": ...} shape, documented to the schema by ERRORS.

Apart from the routes so the request policy reads on its own; the routes register on `api` in api.py and
page_routes.py, and app.py binds it to the ingress.
"""

import asyncio
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mode_ray import __version__
from mode_ray.serve.schemas import ErrorResponse
from mode_ray.serve.validation import RequestError

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
