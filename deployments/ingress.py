"""Ingress: HTTP API and Python entry point; validates requests and drives the stage DAG.

The class imports nothing from Ray. It receives one handle per stage (Ray Serve
`DeploymentHandle`s in a cluster, `deployments.local.LocalHandle`s in-process) and calls
`handle.method.remote(...)`. Each stage's response is passed on as an argument to the next call,
so latents travel stage to stage through the object store and never through the ingress.

graph.py turns it into the HTTP ingress with `serve.ingress()`; Ray calls
`__serve_build_asgi_app__` once the replica is constructed.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.config import GraphConfig
from deployments.payloads import VideoParams
from deployments.protocol import ApiError, VideoRequest, decode_image, error_body, resolve

log = logging.getLogger("avatar_serve.ingress")


@dataclass(frozen=True)
class VideoResult:
    """What the Python API returns: MP4 bytes or uint8 frames (F, H, W, 3), and the parameters
    actually used (the seed included, when the caller left it to the server)."""

    params: VideoParams
    mp4: bytes | None = None
    frames: np.ndarray | None = None


def validation_param(exc: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    """First error of a pydantic validation -> (message, field name)."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "form")]
    param = loc[-1] if loc else None
    return (f"{param}: {err.get('msg')}" if param else str(err.get("msg"))), param


class Ingress:
    def __init__(self, encoder, high, low, decoder, cfg: GraphConfig):
        self.encoder, self.high, self.low, self.decoder = encoder, high, low, decoder
        self.cfg = cfg

    # ------------------------------------------------------------------ Python API

    def prepare(self, request: VideoRequest | dict, image: bytes | np.ndarray,
                job_id: str = "") -> tuple[VideoParams, np.ndarray]:
        """Validate a request and its image; raises ApiError naming the field at fault."""
        if not isinstance(request, VideoRequest):
            try:
                request = VideoRequest.model_validate(request)
            except ValidationError as exc:
                message, param = validation_param(exc)
                raise ApiError(422, message, param) from None
        params = resolve(request, self.cfg, job_id=job_id or uuid.uuid4().hex[:12])
        if isinstance(image, (bytes, bytearray)):
            pixels = decode_image(bytes(image), self.cfg.limits.max_image_bytes)
        else:
            pixels = np.asarray(image)
            if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
                raise ApiError(422, "image must be uint8 (H, W, 3)", "input_reference")
        return params, pixels

    async def run(self, params: VideoParams, image: np.ndarray,
                  output: Literal["mp4", "frames"] = "mp4") -> VideoResult:
        """The video flow: encode -> high -> low -> decode (+ MP4 mux next to the frames)."""
        log.info("job %s: %dx%d, %d frames, %d steps, seed %d", params.job_id, params.width,
                 params.height, params.num_frames, params.num_inference_steps, params.seed)
        cond = self.encoder.encode.remote(params, image)
        high = self.high.denoise.remote(cond, None)
        low = self.low.denoise.remote(cond, high)
        if output == "frames":
            frames = await self.decoder.decode.remote(low)
            return VideoResult(params=params, frames=frames.frames)
        return VideoResult(params=params, mp4=await self.decoder.decode_mp4.remote(low))

    async def generate(self, request: VideoRequest | dict, image: bytes | np.ndarray,
                       output: Literal["mp4", "frames"] = "mp4") -> VideoResult:
        """For DeploymentHandle callers: `await handle.generate.remote({...}, image_bytes)`."""
        params, pixels = self.prepare(request, image)
        return await self.run(params, pixels, output)

    # ------------------------------------------------------------------ HTTP

    async def _video_sync(self, request: Request) -> Response:
        try:
            form = await request.form()
        except Exception as exc:  # malformed multipart
            raise ApiError(400, f"could not parse the multipart form: {exc}", None) from None
        upload = form.get("input_reference")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "input_reference: an image file is required", "input_reference")
        fields = {k: v for k, v in form.multi_items() if k != "input_reference"}
        for key, value in fields.items():
            if not isinstance(value, str):
                raise ApiError(422, f"{key}: expected a text field, got a file", key)
        data = await upload.read(self.cfg.limits.max_image_bytes + 1)
        params, pixels = self.prepare(fields, data)
        result = await self.run(params, pixels, "mp4")
        return Response(content=result.mp4, media_type="video/mp4",
                        headers={"X-Seed": str(params.seed), "X-Job-Id": params.job_id})

    def build_app(self) -> FastAPI:
        app = FastAPI(title="avatar-serve", version="0.1.0",
                      description="Talking-avatar video: Wan2.2 I2V stages on Ray Serve.")

        @app.exception_handler(ApiError)
        async def _api_error(_: Request, exc: ApiError):
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

        @app.exception_handler(RequestValidationError)
        async def _validation(_: Request, exc: RequestValidationError):
            message, param = validation_param(exc)
            return JSONResponse(error_body("invalid_request_error", message, param), status_code=422)

        @app.exception_handler(StarletteHTTPException)
        async def _http(_: Request, exc: StarletteHTTPException):
            kind = {404: "not_found_error", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
            return JSONResponse(error_body(kind, str(exc.detail)), status_code=exc.status_code,
                                headers=getattr(exc, "headers", None))

        @app.exception_handler(Exception)
        async def _internal(request: Request, exc: Exception):
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            return JSONResponse(error_body("server_error", "internal error; see the server logs"),
                                status_code=500)

        @app.get("/healthz")
        async def healthz() -> dict[str, Any]:
            return {"status": "ok", "profile": self.cfg.name}

        @app.post("/v1/videos/sync", response_class=Response,
                  responses={200: {"content": {"video/mp4": {}}}},
                  summary="Generate a video and wait for the MP4 (multipart: prompt, input_reference, ...)")
        async def video_sync(request: Request) -> Response:
            return await self._video_sync(request)

        return app

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.build_app()
