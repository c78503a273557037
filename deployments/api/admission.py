"""Admission of the requests that hold the ingress long: event streams, uploads whose bodies are
still arriving, and talk turns. Each kind is capped in total and per client, and one more is
refused at once -- 429 when its client holds its share, 503 when the ingress holds its total, both
with Retry-After and the connection closed -- before it holds anything, so a flood of idle or slow
connections never takes what /healthz and short requests need. Every request body must also keep
pace: it must arrive within `serving.body_timeout_s` and, after `body_grace_s`, average at least
`body_min_bytes_per_s` (408 otherwise), so a trickled body is cut off and its buffers freed.

An ASGI middleware (pure ASGI, not Starlette's BaseHTTPMiddleware, which would buffer streaming
responses), added by routes.build_app. The client is the address in the ASGI scope: Ray Serve's
HTTP proxy passes its own server's view, the TCP peer, or, for a peer that uvicorn trusts
(FORWARDED_ALLOW_IPS in the proxy's environment; 127.0.0.1 and ::1 by default), the address that
peer put in X-Forwarded-For. Behind a load balancer that is not trusted so, every client shares
the balancer's address: raise or turn off the per-client caps there and let the balancer limit.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field

from starlette.exceptions import HTTPException

from deployments.api.protocol import error_body

log = logging.getLogger("avatar_serve.http")

EVENTS = re.compile(r"/v1/videos/[^/]+/(?:events|stream)")  # long-lived GETs: event and MP4 streams
SPEECH = re.compile(r"/v1/avatars/[^/]+/speech")
BODY_METHODS = {"POST", "PUT", "PATCH"}
LOG_EVERY_S = 1.0
# After a burst -- TRIM_AFTER long requests ended or refused since the last trim -- glibc is asked,
# TRIM_DELAY_S later, to give its freed memory back to the system (malloc_trim): without it the
# ingress kept what a flood had made it allocate (bench/README.md, Floods).
TRIM_AFTER = 200
TRIM_DELAY_S = 2.0


def _malloc_trim():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)  # glibc only; elsewhere nothing to do


MALLOC_TRIM = _malloc_trim()


def trim_memory() -> None:
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


class BodyTooSlow(HTTPException):
    """A body past its deadline. An HTTPException so that FastAPI's own body parsing (JSON
    routes) hands it on as it is instead of answering 400."""

    def __init__(self, message: str):
        super().__init__(408, message)


@dataclass
class Gate:
    """Holders of one kind: at most `total`, at most `per_client` per client (None: no cap)."""

    kind: str
    total: int | None
    per_client: int | None
    held: Counter = field(default_factory=Counter)
    count: int = 0
    refused: int = 0  # refusals not yet logged
    logged_at: float = float("-inf")

    def enter(self, client: str) -> int | None:
        """Take a place for `client` -> None, or the status of the refusal (429, 503)."""
        if self.per_client is not None and self.held[client] >= self.per_client:
            return 429
        if self.total is not None and self.count >= self.total:
            return 503
        self.held[client] += 1
        self.count += 1
        return None

    def leave(self, client: str) -> None:
        self.count -= 1
        self.held[client] -= 1
        if not self.held[client]:
            del self.held[client]


def client_of(scope) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"


def has_body(scope) -> bool:
    if scope.get("method") not in BODY_METHODS:
        return False
    headers = dict(scope.get("headers") or ())
    length = headers.get(b"content-length", b"")
    return b"transfer-encoding" in headers or not length.isdigit() or int(length) > 0


def leaving(scope, client: str, receive, send):
    """`receive` and `send` that make a client's leaving one INFO line and an ordinary
    `http.disconnect`, however it shows. Behind Ray Serve's proxy, `receive` is a call back to the
    proxy, and when many clients leave at once that call can fail instead of answering
    `http.disconnect` (ray.exceptions.TaskCancelledError, the proxy's side of the request being
    gone): the app saw an exception in the middle of a stream and logged it as an unhandled error
    with its traceback. A failing `receive` only ever means the way to the client is gone, so it
    becomes a disconnect here, and every later call answers the same."""
    state = {"finished": False, "gone": None}

    async def tracked_send(message):
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            state["finished"] = True
        await send(message)

    async def guarded_receive():
        if state["gone"] is not None:
            return {"type": "http.disconnect"}
        try:
            message = await receive()
        except Exception as exc:  # noqa: BLE001 - the proxy's channel ended: see above
            message, reason = {"type": "http.disconnect"}, f"the proxy's channel ended: {type(exc).__name__}"
        else:
            reason = "disconnected"
        if message["type"] == "http.disconnect":
            state["gone"] = reason
            if not state["finished"]:
                log.info("client left during %s %s (%s, %s)", scope.get("method"), scope.get("path"), client, reason)
        return message

    return guarded_receive, tracked_send


class Admission:
    """The middleware: `app` behind the gates of `cfg` (serving.admission) and the body pace."""

    def __init__(self, app, cfg, body_timeout_s: float, max_talk_turns: int | None = None):
        self.app, self.cfg, self.body_timeout_s = app, cfg, body_timeout_s
        self.events = Gate("event streams", cfg.max_event_streams, cfg.max_event_streams_per_client)
        self.uploads = Gate("uploads", cfg.max_uploads, cfg.max_uploads_per_client)
        # The turns' total is the ingress's own (serving.max_talk_turns, answered after the audio is
        # decoded); here, a client's share, before its body is read.
        self.turns = Gate("talk turns", None, cfg.max_talk_turns_per_client)
        self.since_trim, self.trim_pending = 0, False

    def gates(self, scope) -> tuple[list[Gate], bool]:
        """The gates a request passes for its life, and whether it has a body to pace."""
        path, body = scope.get("path", ""), has_body(scope)
        if scope.get("method") == "GET" and EVENTS.fullmatch(path):
            return [self.events], body
        if scope.get("method") == "POST" and SPEECH.fullmatch(path):
            return [self.turns], body
        return [], body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = client_of(scope)
        gates, body = self.gates(scope)
        gates += [self.uploads] if body else []
        held: list[Gate] = []
        try:
            for gate in gates:
                refused = gate.enter(client)
                if refused is not None:
                    return await self.refuse(send, refused, gate, client)
                held.append(gate)
            receive, send = self.watch(scope, client, receive, send)
            if body:
                receive = self.paced(receive, lambda: self.release(self.uploads, held, client))
            await self.app(scope, receive, send)
        finally:
            for gate in held:
                gate.leave(client)
            if gates:
                self.after_long_request()

    PLACE = "ingress"  # where the refusal was made, in its X-Avatar-Serve-Refused-By header

    def watch(self, scope, client: str, receive, send):
        return leaving(scope, client, receive, send)

    def after_long_request(self) -> None:
        """Count a long request that ended or was refused; trim after a burst of them (a moment
        later, when the burst's buffers are free; in a worker thread, off the event loop)."""
        self.since_trim += 1
        if self.since_trim >= TRIM_AFTER and not self.trim_pending:
            self.trim_pending = True
            loop = asyncio.get_running_loop()
            loop.call_later(TRIM_DELAY_S, lambda: loop.run_in_executor(None, self.trim))

    def trim(self) -> None:
        self.since_trim, self.trim_pending = 0, False
        trim_memory()

    @staticmethod
    def release(gate: Gate, held: list[Gate], client: str) -> None:
        if gate in held:
            held.remove(gate)
            gate.leave(client)

    def paced(self, receive, body_done):
        """`receive` holding the body to its deadline: all of it within body_timeout_s, and after
        body_grace_s at least body_min_bytes_per_s on average since the request came (checked
        while waiting for each piece, so a body that stops is cut off as one that trickles).
        `body_done` runs once the last piece came (or the client left or was cut off)."""
        loop = asyncio.get_running_loop()
        start, got, done = loop.time(), 0, False
        cfg = self.cfg

        async def wrapped():
            nonlocal got, done
            if done:
                return await receive()
            by_rate = start + cfg.body_grace_s + got / cfg.body_min_bytes_per_s
            deadline = min(start + self.body_timeout_s, by_rate)
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                done = True
                body_done()
                if deadline == by_rate:
                    raise BodyTooSlow(f"the request body arrived at under {cfg.body_min_bytes_per_s} bytes/s "
                                      f"(serving.admission.body_min_bytes_per_s)") from None
                raise BodyTooSlow(f"the request body did not arrive within {self.body_timeout_s:g} s "
                                  "(serving.body_timeout_s)") from None
            got += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                done = True
                body_done()
            return message

        return wrapped

    async def refuse(self, send, status: int, gate: Gate, client: str) -> None:
        retry = self.cfg.retry_after_s
        if status == 429:
            message = (f"this client has {gate.per_client} {gate.kind} open, the most one client may; "
                       f"retry in {retry} s")
        else:
            message = f"the server has {gate.total} {gate.kind} open, the most it takes; retry in {retry} s"
        # One line a second at most: a flood must not turn into a flood of log lines.
        gate.refused += 1
        now = asyncio.get_running_loop().time()
        if now - gate.logged_at >= LOG_EVERY_S:
            log.info("refused %d %s (at capacity: %d open; the last from %s, %d)", gate.refused, gate.kind,
                     gate.count, client, status)
            gate.refused, gate.logged_at = 0, now
        kind = "rate_limit_error" if status == 429 else "service_unavailable"
        body = json.dumps(error_body(kind, message)).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(retry).encode()), (b"connection", b"close"),
            (b"x-avatar-serve-refused-by", self.PLACE.encode())]})
        await send({"type": "http.response.body", "body": body})


class EdgeAdmission(Admission):
    """The same gates in Ray Serve's HTTP proxy, ahead of the ingress (`proxy_middlewares`).

    Behind the proxy alone, every request of a flood still crosses to the ingress replica and
    back to be refused (a few ms each on a loaded CPU), so a burst of 2000 at once took seconds to
    refuse and a /healthz among them waited its turn. Here the excess is refused where it arrives
    and never reaches the ingress. Only the gates: the body pace stays the ingress's (it answers
    408 from inside the app), and a client leaving is the ingress's to log. Counts are per proxy
    (one per node), so the ingress's own gates, with the same caps, stay the bound of the whole."""

    PLACE = "proxy"

    def watch(self, scope, client: str, receive, send):
        return receive, send

    def paced(self, receive, body_done):
        done = False

        async def tracked():
            nonlocal done
            message = await receive()
            if not done and (message["type"] != "http.request" or not message.get("more_body", False)):
                done = True
                body_done()
            return message

        return tracked


EDGE_ENV = "AVATAR_SERVE_EDGE_ADMISSION"


def proxy_middlewares() -> list:
    """For Ray Serve's HTTP proxy: start Ray with
    `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.api.admission:proxy_middlewares` (and
    optionally `AVATAR_SERVE_EDGE_ADMISSION='{"max_event_streams": ...}'`, the fields of
    `serving.admission`; its defaults otherwise) in the environment of `ray start`, and the proxy
    refuses a flood's excess itself (README, Floods). Use the same caps as the profile's."""
    import os

    from starlette.middleware import Middleware

    from deployments.config_serving import AdmissionConfig

    cfg = AdmissionConfig.model_validate_json(os.environ.get(EDGE_ENV) or "{}")
    return [Middleware(EdgeAdmission, cfg=cfg, body_timeout_s=float("inf"))]
