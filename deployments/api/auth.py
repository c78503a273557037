"""API keys on the HTTP routes: FastAPI dependencies that the app puts in front of its routers.

With any API key configured (serving.api_keys and its variable and file, read once at start-up:
deployments/profiles.py), every route but /healthz and /readyz needs `Authorization: Bearer
<key>`; the admin routes need an admin key, and an API key gets 403 there.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.requests import HTTPConnection

from deployments.api.protocol import ApiError


def get_ingress(request: Request):
    return request.app.state.ingress


IngressDep = Annotated[Any, Depends(get_ingress)]


def bearer(request: HTTPConnection) -> str:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else ""


def matches(token: str, keys: list[str]) -> bool:
    """Constant-time comparison of bytes: a header may hold any byte (Starlette decodes it as
    latin-1), and compare_digest refuses str with characters past ASCII."""
    given = token.encode("utf-8", "surrogateescape")
    return bool(token) and any(hmac.compare_digest(given, k.encode()) for k in keys)


def require_key(request: Request, ingress: IngressDep) -> None:
    """Bearer API keys: when the profile has any, every route but /healthz and /readyz needs one
    (an admin key works too)."""
    serving = ingress.cfg.serving
    if serving.api_keys and not matches(bearer(request), serving.api_keys + serving.admin_keys):
        raise ApiError(401, "a valid API key is required (Authorization: Bearer <key>)", None,
                       type="authentication_error", headers={"WWW-Authenticate": "Bearer"})


def live_key_ok(websocket: HTTPConnection, serving) -> bool:
    """A live session's key: the Authorization header, or (browsers cannot set headers on a
    WebSocket) the `access_token` query parameter. Mind that URLs may reach access logs: keys
    for browsers are best short-lived or scoped to one user."""
    if not serving.api_keys:
        return True
    token = bearer(websocket) or websocket.query_params.get("access_token", "")
    return matches(token, serving.api_keys + serving.admin_keys)


def require_admin(request: Request, ingress: IngressDep) -> None:
    """The admin routes need an admin key; an API key alone gets 403. With no key of either kind
    configured (development), they are open like everything else."""
    serving = ingress.cfg.serving
    if not (serving.admin_keys or serving.api_keys):
        return
    token = bearer(request)
    if matches(token, serving.admin_keys):
        return
    if matches(token, serving.api_keys):
        raise ApiError(403, "the admin routes need an admin key (serving.admin_keys); API keys do not "
                            "grant them", None, type="permission_error")
    raise ApiError(401, "an admin key is required (Authorization: Bearer <admin key>)", None,
                   type="authentication_error", headers={"WWW-Authenticate": "Bearer"})
