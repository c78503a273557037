"""The API's contract: request and response models, validation against a profile, and the error
envelope. Clients import this module (it needs pydantic, numpy and Pillow; no torch, no Ray).

Every error a client sees is `{"error": {"type", "message", "param"}}` (`ErrorResponse`).
"""

from __future__ import annotations

import io
import json
import math
import random
import re
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deployments.api.lora_request import (  # noqa: F401 - the admin LoRA models are part of the contract
    LoraActivate,
    LoraRequest,
    LorasField,
    RequestLora,
    check_request_loras,
    parse_loras,
)
from deployments.common.payloads import VideoParams

# --------------------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    """The one error envelope of every route."""

    error: ErrorDetail


class ApiError(Exception):
    """A client-facing error: HTTP status, error type, message and the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.type, self.message, self.param)


def error_body(type: str, message: str, param: str | None = None) -> dict:
    return ErrorResponse(error=ErrorDetail(type=type, message=message, param=param)).model_dump()


def validation_param(exc: ValidationError) -> tuple[str, str | None]:
    """First error of a pydantic validation (or FastAPI's RequestValidationError, which has the
    same `errors()`) -> (message, field name)."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "form")]
    param = loc[-1] if loc else None
    return (f"{param}: {err.get('msg')}" if param else str(err.get("msg"))), param


def invalid(exc: ValidationError) -> ApiError:
    """A pydantic validation error as the 422 a client sees."""
    message, param = validation_param(exc)
    return ApiError(422, message, param)


# --------------------------------------------------------------------------- requests

SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*[xX*]\s*(\d{1,5})\s*$")


class VideoFields(BaseModel):
    """What a video job and an avatar ask for alike: the clip's generation settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # "nan"/"inf" are not numbers here

    prompt: str = Field(min_length=1, max_length=20000)
    negative_prompt: str | None = Field(None, max_length=20000)
    size: str | None = Field(None, description="WIDTHxHEIGHT, each a multiple of 16", examples=["832x480"])
    model: str | None = Field(None, description="the served profile's name (GET /v1/models)")
    num_frames: int | None = Field(None, ge=1, le=1001, description="4k+1 frames")
    seconds: float | None = Field(None, gt=0, le=120,
                                  description="instead of num_frames: round(seconds * fps) moved to the nearest 4k+1")
    seed: int | None = Field(None, ge=-1, le=2**63 - 1, description="-1 or unset: a random seed (reported on the job)")
    num_inference_steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0, le=50)
    guidance_scale_2: float | None = Field(None, ge=0, le=50)
    fps: int | None = Field(None, ge=1, le=60)
    loras: LorasField = None

    @field_validator("loras", mode="before")
    @classmethod
    def _loras(cls, value):
        return parse_loras(value)

    def form(self) -> dict[str, str]:
        """As multipart form fields (what the client sends; `loras` as JSON text)."""
        return {k: json.dumps(v) if k == "loras" else str(v)
                for k, v in self.model_dump(exclude_none=True).items()}


class VideoRequest(VideoFields):
    """Fields of a video request (multipart form or JSON). Unset fields take the profile's
    defaults; bounds that depend on the profile (size, frames, steps) are checked in `resolve`."""

    callback_url: str | None = Field(None, max_length=2048, description=(
        "http(s) URL that gets the job record (signed) once the job ends; README: Completion webhooks"))


class AvatarRequest(VideoFields):
    """POST /v1/avatars: a video request for the base clip, plus an optional face box. The seed
    defaults to 0 (not a random one), so the request alone fixes the avatar's id."""

    seed: int = Field(0, ge=-1, le=2**63 - 1)
    face_box: tuple[int, int, int, int] | None = Field(
        None, description="x1,y1,x2,y2 in pixels of the generated clip (default: the stage's detector)")

    @field_validator("face_box", mode="before")
    @classmethod
    def _face_box(cls, value):
        """"x1,y1,x2,y2" (a form field) or four numbers, with x1 < x2 and y1 < y2."""
        if value in (None, ""):
            return None
        try:
            parts = value.split(",") if isinstance(value, str) else list(value)
            box = [int(float(v)) for v in parts]
        except (ValueError, TypeError, OverflowError):  # "abc", None, "inf"
            box = []
        if len(box) != 4 or box[0] >= box[2] or box[1] >= box[3] or min(box) < 0:
            raise ValueError("x1,y1,x2,y2 in pixels with x1 < x2 and y1 < y2")
        return tuple(box)

    def video(self) -> VideoRequest:
        return VideoRequest.model_validate(self.model_dump(exclude={"face_box"}))


# --------------------------------------------------------------------------- responses

Status = Literal["queued", "in_progress", "completed", "failed", "cancelled"]


class JobError(BaseModel):
    code: str
    message: str


class Queued(BaseModel):
    """What jobs and avatars share: they wait in one queue, run, report progress and end."""

    id: str
    status: str = "queued"
    progress: int = Field(0, ge=0, le=100)
    created_at: int
    completed_at: int | None = None
    model: str
    prompt: str
    size: str
    num_frames: int
    seed: int
    loras: list[RequestLora] = Field(default_factory=list, description="the per-request LoRAs it runs with")
    stage: str | None = None
    step: int | None = None
    queue_position: int | None = None
    error: JobError | None = None
    attempt: int = Field(1, ge=1, description=(
        "Which run this is: 2 once a server restart re-queued it (a record is re-queued at most once)."))

    DONE: ClassVar[str] = "completed"  # the status of a record whose work succeeded
    FINAL: ClassVar[frozenset[str]] = frozenset({"completed", "failed", "cancelled"})

    @property
    def final(self) -> bool:
        return self.status in self.FINAL


class WebhookAttempt(BaseModel):
    at: float = Field(description="unix time the attempt started")
    status_code: int | None = Field(None, description="the receiver's HTTP status")
    error: str | None = Field(None, description="why no (good) answer came: network, timeout, refused address")
    duration_s: float


class Webhook(BaseModel):
    """A job's completion webhook: pending until the job ends and through retries."""

    url: str
    status: Literal["pending", "delivered", "failed"] = "pending"
    attempts: list[WebhookAttempt] = Field(default_factory=list)


class Job(Queued):
    """What GET /v1/videos/{id} returns (OpenAI's video-job shape)."""

    object: Literal["video"] = "video"
    status: Status = "queued"
    expires_at: int | None = None
    seconds: str
    fps: int
    num_inference_steps: int
    has_audio: bool = False
    webhook: Webhook | None = Field(None, description="the callback_url's delivery, when the request named one")


class Avatar(Queued):
    """What GET /v1/avatars/{id} returns. Its id is a content hash of the image, the generation
    settings and the profile, so creating the same avatar twice returns the first one."""

    object: Literal["avatar"] = "avatar"
    status: Literal["queued", "in_progress", "ready", "failed", "cancelled"] = "queued"
    ready_at: int | None = None
    # When ready: the frame rate of its talk turns and the length of its base-clip cycle (a turn's
    # `start_index` continues the cycle).
    fps: int | None = None
    cycle_frames: int | None = None

    DONE: ClassVar[str] = "ready"
    FINAL: ClassVar[frozenset[str]] = frozenset({"ready", "failed", "cancelled"})


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class Deleted(BaseModel):
    id: str
    object: Literal["video.deleted", "avatar.deleted"]
    deleted: bool = True


class ModelLimits(BaseModel):
    """The profile's bounds on a request and the values a field left out gets: what a client
    (the web page) needs to offer a valid form."""

    max_width: int
    max_height: int
    max_pixels: int
    size_multiple: int = 16
    max_frames: int
    max_steps: int
    fixed_steps: bool = Field(description="the sampler is distilled to exactly default_num_inference_steps")
    max_prompt_chars: int
    max_image_bytes: int
    max_audio_bytes: int
    max_audio_seconds: float
    default_size: str
    default_num_frames: int
    default_num_inference_steps: int
    default_fps: int

    @classmethod
    def of(cls, cfg) -> "ModelLimits":
        """From a GraphConfig (its `limits`, `defaults` and `sampler`)."""
        lim, d, samp = cfg.limits, cfg.defaults, cfg.sampler
        return cls(max_width=lim.max_width, max_height=lim.max_height, max_pixels=lim.max_pixels,
                   max_frames=lim.max_frames, max_steps=lim.max_steps, fixed_steps=samp.fixed_steps,
                   max_prompt_chars=lim.max_prompt_chars, max_image_bytes=lim.max_image_bytes,
                   max_audio_bytes=lim.max_audio_bytes, max_audio_seconds=lim.max_audio_seconds,
                   default_size=f"{d.width}x{d.height}", default_num_frames=d.num_frames,
                   default_num_inference_steps=samp.num_inference_steps, default_fps=d.fps)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "avatar-serve"
    description: str = ""
    loras: dict[str, list] = Field(default_factory=dict, description="active LoRAs per expert role")
    limits: ModelLimits | None = Field(None, description="request bounds and defaults of this profile")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --------------------------------------------------------------------------- validation


def parse_size(size: str) -> tuple[int, int]:
    match = SIZE_RE.match(size)
    if not match:
        raise ApiError(422, f"size must look like WIDTHxHEIGHT (e.g. 832x480), got {size!r}", "size")
    return int(match.group(1)), int(match.group(2))


def frames_for_seconds(seconds: float, fps: int) -> int:
    """round(seconds * fps), moved to the nearest valid count 4k+1 (at least 1)."""
    n = round(seconds * fps)
    return 4 * max(0, round((n - 1) / 4)) + 1


def size_for_image(image_w: int, image_h: int, cfg) -> tuple[int, int]:
    """The clip size for an image sent without `size`: its aspect within the profile's default
    pixel count, inside the limits. Wan2.2's own rule (its generate.py; LightX2V does the same):
    each side is sqrt(area * aspect) floored to the latent grid -- VAE stride 8 times patch 2, so
    multiples of 16 -- which never passes the area (rounding to the nearest could: 1080x1920 at
    832x480's area gave 480x848 where Wan gives 464x832) and keeps a portrait a portrait at small
    areas. The encoder centre-crops the small remainder of the aspect."""
    d, lim = cfg.defaults, cfg.limits
    area, aspect = d.width * d.height, image_h / image_w
    height, width = math.sqrt(area * aspect), math.sqrt(area / aspect)
    scale = min(1.0, lim.max_width / width, lim.max_height / height)  # a very thin image
    width, height = (max(LATENT_GRID, int(x * scale // LATENT_GRID) * LATENT_GRID) for x in (width, height))
    while width * height > lim.max_pixels:  # only where a profile's default area passes its own limit
        if width >= height:
            width -= LATENT_GRID
        else:
            height -= LATENT_GRID
    return width, height


LATENT_GRID = 16  # pixels per latent token side: the Wan VAE's spatial stride 8 x the DiT's patch 2


def resolve(req: VideoRequest, cfg, request_id: str = "", image_size: tuple[int, int] | None = None) -> VideoParams:
    """VideoRequest + GraphConfig -> VideoParams, or ApiError naming the field. Without `size`,
    the clip takes the image's aspect (`image_size`, width x height) at the profile's default
    pixel count; with one, the encoder centre-crops the image to it: never a stretch.

    Nothing here touches a model: bad input is refused before any stage is called.
    """
    d, lim, samp = cfg.defaults, cfg.limits, cfg.sampler
    prompt = req.prompt.strip()
    if not prompt:
        raise ApiError(422, "prompt must not be empty", "prompt")
    if len(prompt) > lim.max_prompt_chars:
        raise ApiError(422, f"prompt is longer than {lim.max_prompt_chars} characters", "prompt")
    if req.size:
        width, height = parse_size(req.size)
    else:
        width, height = size_for_image(*image_size, cfg) if image_size else (d.width, d.height)
    if width % 16 or height % 16:
        raise ApiError(422, f"size {width}x{height}: width and height must be multiples of 16", "size")
    if not (16 <= width <= lim.max_width and 16 <= height <= lim.max_height):
        raise ApiError(422, f"size {width}x{height} is outside 16x16..{lim.max_width}x{lim.max_height}", "size")
    if width * height > lim.max_pixels:
        raise ApiError(422, f"size {width}x{height} has more than {lim.max_pixels} pixels", "size")
    fps = req.fps or d.fps
    if req.num_frames is not None and req.seconds is not None:
        raise ApiError(422, "give num_frames or seconds, not both", "seconds")
    if req.seconds is not None:
        frames = frames_for_seconds(req.seconds, fps)
    else:
        frames = req.num_frames if req.num_frames is not None else d.num_frames
    if frames % 4 != 1:
        raise ApiError(422, f"num_frames must be 4k+1 (e.g. 81), got {frames}", "num_frames")
    if frames > lim.max_frames:
        raise ApiError(422, f"num_frames {frames} is over this profile's limit of {lim.max_frames}", "num_frames")
    steps = req.num_inference_steps if req.num_inference_steps is not None else samp.num_inference_steps
    if samp.fixed_steps and steps != samp.num_inference_steps:
        raise ApiError(422, f"this profile's sampler is distilled to exactly {samp.num_inference_steps} steps",
                       "num_inference_steps")
    if steps > lim.max_steps:
        raise ApiError(422, f"num_inference_steps {steps} is over this profile's limit of {lim.max_steps}",
                       "num_inference_steps")
    g1 = req.guidance_scale if req.guidance_scale is not None else samp.guidance_scale
    # As in diffusers: guidance_scale_2 defaults to guidance_scale when only that one is given.
    g2 = req.guidance_scale_2 if req.guidance_scale_2 is not None else (
        req.guidance_scale if req.guidance_scale is not None else samp.guidance_scale_2)
    seed = req.seed if req.seed is not None and req.seed >= 0 else random.randrange(2**31)  # -1: random, as diffusers UIs send
    negative = req.negative_prompt if req.negative_prompt is not None else d.negative_prompt
    return VideoParams(prompt=prompt, negative_prompt=negative, width=width, height=height,
                       num_frames=frames, seed=seed, num_inference_steps=steps, guidance_scale=g1,
                       guidance_scale_2=g2, fps=fps, request_id=request_id,
                       loras=check_request_loras(req.loras, cfg))


ORIENTATION_TAG = 0x0112  # EXIF's Orientation: 1 as stored, 3 turned 180, 6 / 8 turned 90 (5 / 7 mirrored too)


def decode_image(data: bytes, max_bytes: int, max_pixels: int = 64_000_000,
                 fit: tuple[int, int] | None = None, param: str = "input_reference") -> np.ndarray:
    """Upload bytes -> uint8 RGB (H, W, 3), or ApiError (413 too large, 400 not an image, 422 more
    than `max_pixels`). The size is checked from the header, before any pixel is decoded; an image
    larger than `fit` (width, height) is decoded reduced where the format allows (JPEG) and shrunk
    to fit, keeping its aspect: what is kept per queued job stays small. An EXIF orientation is
    applied: the pixels come out as the image is meant to be seen."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ApiError(400, "the image file is empty", param)
    if len(data) > max_bytes:
        raise ApiError(413, f"the image is {len(data)} bytes; the limit is {max_bytes}", param)
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size  # from the header
            if width < 2 or height < 2:
                raise ApiError(400, f"image size {width}x{height} is not usable", param)
            if width * height > max_pixels:
                raise ApiError(422, f"the image is {width}x{height} pixels; this deployment takes at most "
                                    f"{max_pixels} pixels", param)
            # A phone's portrait is often stored sideways with an EXIF orientation saying how to
            # turn it: turned first, so the clip is upright and `fit` applies to what is shown.
            turned = img.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8)
            if fit is not None:  # JPEG: decode at 1/2, 1/4 or 1/8 scale when that still covers fit
                img.draft("RGB", fit[::-1] if turned else fit)
            img.load()
            rgb = ImageOps.exif_transpose(img).convert("RGB")
            if fit is not None and (rgb.width > fit[0] or rgb.height > fit[1]):
                rgb.thumbnail(fit, Image.Resampling.LANCZOS)
            return np.asarray(rgb, dtype=np.uint8)
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ApiError(400, f"not a decodable image ({type(exc).__name__})", param) from None


# --------------------------------------------------------------------------- OpenAPI
# The upload routes read their body themselves (multipart or JSON: routes.read_form), so FastAPI
# cannot describe it; they pass these request bodies as `openapi_extra`. Built from the models
# above, so each field is defined once. Nothing here takes part in validation.


class SpeechRequest(BaseModel):
    """The text fields of POST /v1/avatars/{id}/speech besides its audio (for the OpenAPI schema;
    the route checks `start_index` itself)."""

    model_config = ConfigDict(extra="forbid")

    start_index: int = Field(0, ge=0, le=999_999_999,
                             description="frame of the base-clip cycle to start from (a previous turn's end)")


BINARY = {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}
# A 16x16 PNG (a face-coloured disc), for request examples that run as they are ("Try it out").
EXAMPLE_IMAGE = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAATUlEQVR42mOMqljAQApgYiAR"
                 "kKyBBatom8kbCKPqjAhhG+Cq0djYNWCqQBNhwq8aU5z2oURnDZihjinOhEcOqwgTfvMw9bMQdAOlngYAZgUX8KhvAUgAAAAASUVORK5CYII=")


def form_property(prop: dict) -> dict:
    """A model field's JSON schema as a multipart text field: `X | None` becomes X (a form leaves
    a field out instead), and a tuple of numbers becomes its comma-separated string."""
    prop = dict(prop)
    if "anyOf" in prop:
        options = [s for s in prop.pop("anyOf") if s.get("type") != "null"]
        if len(options) == 1:
            prop.update(options[0])
        else:
            prop["anyOf"] = options
    if "default" in prop and prop["default"] is None:
        del prop["default"]
    if prop.get("type") == "array" and prop.get("items", {}).get("type") == "object":  # loras: JSON text
        prop = {"type": "string", "contentMediaType": "application/json", "description": prop.get("description", "")}
    if prop.get("type") == "array" and "prefixItems" in prop:
        n = len(prop["prefixItems"])
        for key in ("prefixItems", "minItems", "maxItems", "items"):
            prop.pop(key, None)
        prop.update(type="string", pattern=r"^\s*" + r"\s*,\s*".join([r"[0-9.]+"] * n) + r"\s*$")
    return prop


def upload_body(model: type[BaseModel], files: dict[str, tuple[bool, str, str]],
                json_example: dict | None = None, extra_content: dict | None = None) -> dict:
    """An OpenAPI `requestBody` for a route that takes `model`'s fields plus `files` as a JSON
    object or a multipart form. `files` maps a field to (required, media type, description): a
    base64 string (or data: URL) in JSON, a binary part in the form. With `json_example`, JSON
    comes first: Swagger UI's "Try it out" starts with the first type and sends that example as it
    is (in a form it fills every field with a made-up sample). `extra_content` adds media types
    (a raw audio body)."""
    schema = model.model_json_schema()
    assert "$defs" not in schema, "upload models are flat"
    required = list(schema.get("required", [])) + [name for name, (req, _, _) in files.items() if req]
    common = {"type": "object", "additionalProperties": False, "required": required}
    if schema.get("description"):
        common["description"] = schema["description"]
    form = {**common, "title": f"{schema['title']}Form",
            "properties": {**{k: form_property(v) for k, v in schema["properties"].items()},
                           **{name: {**BINARY, "description": text} for name, (_, _, text) in files.items()}}}
    as_json = {**common, "title": f"{schema['title']}Json",
               "properties": {**schema["properties"],
                              **{name: {"type": "string", "contentEncoding": "base64",
                                        "description": f"{text}: base64, or a data: URL"}
                                 for name, (_, _, text) in files.items()}}}
    content = {"multipart/form-data": {"schema": form, "encoding": {
                   name: {"contentType": media} for name, (_, media, _) in files.items()}},
               "application/json": {"schema": as_json}}
    if json_example:  # first: the type Swagger UI starts with
        content = {"application/json": {**content["application/json"], "example": json_example},
                   "multipart/form-data": content["multipart/form-data"]}
    return {"required": True, "content": {**content, **(extra_content or {})}}
