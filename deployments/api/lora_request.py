"""LoRAs at the API (the admin routes' request models are here too, LoraRequest and LoraActivate).

Per-request LoRAs: the `loras` field of /v1/videos, /v1/videos/sync and
/v1/avatars, and GET /v1/loras, the names a client may use (README: Per-request LoRAs).

    "loras": [{"name": "style", "high": 1.0, "low": 0.6}]     (JSON; a multipart form sends
                                                                 the same list as one text field)

Every check happens here, before any stage is called: the list's shape, each strength within
STRENGTH of 0, names known in `serving.lora_dirs` and each once, at most
`serving.max_request_loras`, and no strength on a compiled expert. A refusal is a 422 with
`param: "loras"`.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from deployments.common.lora_folders import NAME, list_loras, lora_files

STRENGTH = 4.0  # |strength| at most this: past it a LoRA's output is noise, never a style

EXAMPLE = [{"name": "style", "high": 1.0, "low": 0.6}]


class RequestLora(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=64, pattern=NAME.pattern)
    high: float = Field(1.0, ge=-STRENGTH, le=STRENGTH, description="strength on the high-noise expert; 0: off there")
    low: float = Field(1.0, ge=-STRENGTH, le=STRENGTH, description="strength on the low-noise expert; 0: off there")


# The field's schema written out (no $defs: upload bodies are flat, protocol.upload_body); a
# multipart form sends the list as JSON text (protocol.form_property).
LORAS_SCHEMA = {"type": "array", "maxItems": 16, "examples": [EXAMPLE], "description": (
    "LoRAs for this request only (GET /v1/loras lists the names): name, and a strength per "
    f"expert, high and low, each within -{STRENGTH:g}..{STRENGTH:g} (default 1; 0: not on that "
    "expert). In a multipart form: this list as JSON text."),
    "items": {"type": "object", "additionalProperties": False, "required": ["name"],
              "properties": {"name": {"type": "string", "pattern": NAME.pattern},
                             "high": {"type": "number", "minimum": -STRENGTH, "maximum": STRENGTH, "default": 1.0},
                             "low": {"type": "number", "minimum": -STRENGTH, "maximum": STRENGTH, "default": 1.0}}}}
LorasField = Annotated[list[RequestLora] | None, WithJsonSchema(LORAS_SCHEMA)]


class LoraRequest(BaseModel):
    """POST /v1/admin/loras: load a LoRA file (a path on the experts' hosts) onto an expert."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(min_length=1, max_length=4096)
    target: Literal["high", "low", "both"]
    strength: float = Field(1.0, ge=-10, le=10)


class LoraActivate(BaseModel):
    """POST /v1/admin/loras/activate: exactly these LoRAs active on the targeted experts."""

    model_config = ConfigDict(extra="forbid")

    names: list[str] = Field(max_length=16)
    strengths: list[float] | None = None
    target: Literal["high", "low", "both"] = "both"


def parse_loras(value):
    """The `loras` field's raw value (a list, JSON text from a form, None or "") -> a list of
    RequestLora; ValueError with the entry and the reason (pydantic reports it on `loras`)."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError('must be a JSON list like [{"name": "style", "high": 1.0, "low": 0.6}]') from None
    if not isinstance(value, list):
        raise ValueError('must be a list like [{"name": "style", "high": 1.0, "low": 0.6}]')  # noqa: TRY004 - pydantic reports a ValueError on the field
    if len(value) > 16:
        raise ValueError("names more than 16 LoRAs")
    out = []
    for i, entry in enumerate(value):
        if isinstance(entry, RequestLora):
            out.append(entry)
            continue
        try:
            out.append(RequestLora.model_validate(entry))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err.get("loc", ()))
            raise ValueError(f"entry {i}{' ' + where if where else ''}: {err.get('msg')}") from None
    return out


class LoraInfo(BaseModel):
    name: str
    rank: int | None = Field(None, description="the rank of its low-rank pairs (None: unreadable header)")
    tensors: int | None = None
    size_bytes: int


class LoraList(BaseModel):
    object: str = "list"
    data: list[LoraInfo]
    max_per_request: int = Field(description="the most LoRAs one request may name")


def available(cfg) -> LoraList:
    return LoraList(data=[LoraInfo(**e) for e in list_loras(cfg.serving.lora_dirs)],
                    max_per_request=cfg.serving.max_request_loras)


def check_request_loras(loras: list[RequestLora] | None, cfg) -> tuple[tuple[str, float, float], ...]:
    """The request's LoRAs as VideoParams carries them, or ApiError 422 on `loras`."""
    from deployments.api.protocol import ApiError

    if not loras:
        return ()
    limit = cfg.serving.max_request_loras
    if len(loras) > limit:
        raise ApiError(422, f"loras: {len(loras)} LoRAs, this server takes at most {limit} per request", "loras")
    names = [lora.name for lora in loras]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice:
        raise ApiError(422, f"loras: {twice!r} is named twice", "loras")
    known = lora_files(cfg.serving.lora_dirs)
    unknown = next((n for n in names if n not in known), None)
    if unknown:
        raise ApiError(422, f"loras: no LoRA named {unknown!r} (GET /v1/loras lists them)", "loras")
    for role in ("high", "low"):
        stage = getattr(cfg.stages, role)
        if any(getattr(lora, role) for lora in loras) and (stage.compile or not stage.lora_cache_bytes):
            why = "is compiled" if stage.compile else "has no LoRA cache (lora_cache_bytes 0)"
            raise ApiError(422, f"loras: per-request LoRAs are off on the {role} expert here (it {why}); "
                                f"give {role}: 0", "loras")
    return tuple((lora.name, lora.high, lora.low) for lora in loras)


def used_loras(params) -> list[RequestLora]:
    """What a job or avatar record shows: the LoRAs its VideoParams carry."""
    return [RequestLora(name=n, high=h, low=lo) for n, h, lo in params.loras]
