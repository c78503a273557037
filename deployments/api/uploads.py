"""Request bodies in: bounded in size, multipart or JSON (files as base64).

Every upload route reads its body here: refused with 413 once it passes its limit (at once when
the declared length does). Its time is the admission middleware's (api/admission.py), for every
request body alike: 408 when it has not arrived within `serving.body_timeout_s` or arrives slower
than `serving.admission.body_min_bytes_per_s`, so a client that trickles its body or sends too
much cannot hold the ingress.
"""

from __future__ import annotations

import base64
import binascii
import json

from fastapi import Request

from deployments.api.protocol import ApiError

FORM_OVERHEAD = 1 << 20  # bytes a form or JSON body may carry beyond its files (fields, framing)


async def read_body(request: Request, limit: int, param: str | None = None) -> bytes:
    """The request body, refused with 413 once it passes `limit` bytes (at once when its declared
    length does)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is {declared} bytes; the limit is {limit}", param)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"the body is over the limit of {limit} bytes", param)
    return bytes(data)


async def read_form(request: Request, file_fields: dict[str, int]) -> tuple[dict, dict[str, bytes]]:
    """A multipart form or a JSON body -> (text fields, {file field: bytes}).

    `file_fields` maps each file field to its size limit; the whole body may be their sum plus
    room for base64 and the form's framing; a file over its
    own limit is refused (413) by the caller's validation. In JSON, files are base64 strings (or
    data: URLs)."""
    files: dict[str, bytes] = {}
    body = await read_body(request, sum(file_fields.values()) * 4 // 3 + FORM_OVERHEAD)
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
            raise ApiError(400, "the body is not valid JSON", None) from None
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object", None)
        for name in file_fields:
            value = body.pop(name, None)
            if value is None:
                continue
            if not isinstance(value, str):
                raise ApiError(422, f"{name}: a base64 string (or data: URL) is required", name)
            try:
                files[name] = base64.b64decode(value.split(",", 1)[-1] if value.startswith("data:") else value,
                                               validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, f"{name}: not valid base64", name) from None
        return body, files
    request._body = body  # Starlette parses a body already read (Request.stream gives _body)
    try:
        form = await request.form()
    except Exception as exc:  # malformed multipart
        raise ApiError(400, f"could not parse the multipart form: {exc}", None) from None
    fields = {}
    for key, value in form.multi_items():
        if key in file_fields:
            if isinstance(value, str):
                raise ApiError(422, f"{key}: must be a file upload", key)
            files[key] = await value.read(file_fields[key] + 1)
        elif not isinstance(value, str):
            raise ApiError(422, f"{key}: expected a text field, got a file", key)
        else:
            fields[key] = value
    return fields, files


async def read_video_form(request: Request, ingress) -> tuple[dict, bytes, bytes | None]:
    """The fields of a video (or avatar) request, its image and its optional audio."""
    limits = ingress.cfg.limits
    fields, files = await read_form(request, {"input_reference": limits.max_image_bytes,
                                              "audio": limits.max_audio_bytes})
    if "input_reference" not in files:
        raise ApiError(422, "input_reference: an image file is required", "input_reference")
    return fields, files["input_reference"], files.get("audio")
