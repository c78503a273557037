"""A small Python client for the HTTP API (what `avatar-serve generate` uses).

    client = AvatarClient("http://127.0.0.1:8000", api_key=None)
    mp4 = client.generate("portrait.png", "a woman talks", on_event=print, size="832x480")

Requests are built from the protocol's models (deployments/api/protocol.py), so a field the
server would refuse for its type or bounds is refused here first, with the same message. It needs
httpx and pydantic (no torch, no Ray): it speaks HTTP to the Serve proxy only, so Ray's token auth
(RAY_AUTH_MODE) never applies to it; the server's API keys do (`api_key`).

Every failure is a `ClientError` with a one-line message: an error answer (its status and
`{"error": {"type", "message", "param"}}` envelope), or `ServerUnreachable` (status 0) when the
server cannot be reached or does not answer in time. `seed=-1` means a random seed (as diffusers /
ComfyUI send it): a video request leaves it to the server; an avatar, whose seed defaults to 0 so
that the same inputs give the same avatar, gets one drawn here.
"""

from __future__ import annotations

import json
import random
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
from pydantic import ValidationError

from deployments.api.protocol import AvatarRequest, VideoRequest, validation_param

RANDOM_SEED = -1  # what diffusers / ComfyUI users send for "any seed"


def _one_line(text: Any, limit: int = 300) -> str:
    """Text squeezed onto one line (an HTML error page from a proxy, a multi-line message)."""
    text = re.sub(r"\s+", " ", str(text)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ClientError(RuntimeError):
    """An error answer from the server: HTTP status plus its error envelope. Its message is one
    line: `HTTP 422 invalid_request_error: num_frames: ... (num_frames)`."""

    def __init__(self, status: int, error: dict):
        self.status, self.error = status, error
        param = f" ({error.get('param')})" if error.get("param") else ""
        super().__init__(_one_line(f"HTTP {status} {error.get('type', '')}: {error.get('message', '')}{param}",
                                   600))


class ServerUnreachable(ClientError):
    """No answer: connection refused, unknown host, a timeout, or the connection dropped
    (status 0, error type `connection_error`)."""

    def __init__(self, url: str, exc: BaseException):
        self.url, self.reason = url, transport_reason(exc)
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            message = f"cannot reach the server at {url}: {self.reason}"
        elif isinstance(exc, httpx.TimeoutException):
            message = f"the server at {url} did not answer in time: {self.reason}"
        else:
            message = f"lost the connection to the server at {url}: {self.reason}"
        self.status, self.error = 0, {"type": "connection_error", "message": message, "param": None}
        RuntimeError.__init__(self, message)


def transport_reason(exc: BaseException) -> str:
    """A short reason for an httpx transport error: 'connection refused', 'host not found', ..."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectTimeout):
        return "timed out while connecting"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out waiting for an answer ({type(exc).__name__})"
    if isinstance(exc, httpx.ConnectError):
        low = text.lower()
        if "refused" in low:
            return "connection refused (is the server running on that port?)"
        if any(s in low for s in ("name or service not known", "nodename nor servname", "name resolution",
                                  "getaddrinfo", "no address associated", "errno -2", "errno -3",
                                  "errno -5", "errno 8")):
            return f"host not found ({_one_line(text, 120)})"
        return _one_line(text, 200)
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"the server closed the connection ({_one_line(text, 120)})"
    return f"{type(exc).__name__}: {_one_line(text, 200)}"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while `generate` followed a job: the job was cancelled on the server (`cancelled`
    True) or could not be (False: it may still run; `job_id` names it)."""

    def __init__(self, job_id: str, cancelled: bool):
        super().__init__(job_id)
        self.job_id, self.cancelled = job_id, cancelled


def _error_envelope(r: httpx.Response) -> dict:
    """The answer's `error` object; a body that is not our envelope (a proxy's HTML page,
    FastAPI's `{"detail": ...}`) becomes one, on one line."""
    try:
        body = r.json()
    except ValueError:
        return {"type": "http_error", "message": _one_line(r.text) or r.reason_phrase}
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return error
    if isinstance(error, str):
        return {"type": "http_error", "message": _one_line(error)}
    detail = body.get("detail") if isinstance(body, dict) else None
    return {"type": "http_error", "message": _one_line(detail if detail is not None else body)}


def _image(file: str | Path | bytes) -> tuple[str, bytes]:
    """A path or the file's bytes -> (file name, bytes) for an upload."""
    if isinstance(file, bytes):
        return "upload", file
    path = Path(file)
    return path.name, path.read_bytes()


class AvatarClient:
    """`timeout`: the longest wait for an answer (a sync request, the next progress event);
    `connect_timeout`: for connecting, so an unreachable host fails in seconds."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 600.0, http: httpx.Client | None = None, connect_timeout: float = 10.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # `http` lets tests pass FastAPI's TestClient (an httpx.Client) instead of a network client.
        self.http = http or httpx.Client(base_url=url, timeout=httpx.Timeout(
            timeout, connect=min(timeout, connect_timeout)))
        self.http.headers.update(headers)

    @contextmanager
    def _reaching(self) -> Iterator[None]:
        """Transport failures (refused, DNS, timeouts, a dropped connection) as ServerUnreachable."""
        try:
            yield
        except httpx.TransportError as exc:
            raise ServerUnreachable(str(self.http.base_url).rstrip("/"), exc) from exc

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self._reaching():
            return self._check(self.http.request(method, path, **kwargs))

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            raise ClientError(r.status_code, _error_envelope(r))
        return r

    @staticmethod
    def _form(model: type[VideoRequest], prompt: str, fields: dict[str, Any]) -> dict[str, str]:
        """The request's form fields, validated by the protocol model (ClientError 422 if not).
        `seed=-1`: random (a video leaves it to the server; an avatar gets one drawn here)."""
        fields = dict(fields)
        if fields.get("seed") == RANDOM_SEED:
            fields["seed"] = random.randrange(2**31) if issubclass(model, AvatarRequest) else None
        try:
            request = model(prompt=prompt, **{k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:
            message, param = validation_param(exc)
            raise ClientError(422, {"type": "invalid_request_error", "message": message, "param": param}) from None
        form = request.form()
        if isinstance(request, AvatarRequest) and request.face_box is not None:
            form["face_box"] = ",".join(str(v) for v in request.face_box)
        return form

    # -------------------------------------------------------------- jobs

    def create_video(self, image: str | Path | bytes, prompt: str, audio: str | Path | bytes | None = None,
                     **fields: Any) -> dict:
        """POST /v1/videos; with `audio` (wav, mp3, ogg/opus, flac, m4a) the clip is lip-synced."""
        return self._request("POST", "/v1/videos", data=self._form(VideoRequest, prompt, fields),
                             files=_uploads(image, audio)).json()

    def get_video(self, video_id: str) -> dict:
        return self._request("GET", f"/v1/videos/{video_id}").json()

    def list_videos(self, limit: int = 20, after: str | None = None) -> dict:
        params = {"limit": limit, **({"after": after} if after else {})}
        return self._request("GET", "/v1/videos", params=params).json()

    def delete_video(self, video_id: str) -> dict:
        """Cancel a queued or running job; delete a finished one."""
        return self._request("DELETE", f"/v1/videos/{video_id}").json()

    def content(self, video_id: str) -> bytes:
        return self._request("GET", f"/v1/videos/{video_id}/content").content

    def events(self, video_id: str) -> Iterator[dict]:
        """Server-sent progress events until the job's final one."""
        with self._reaching(), self.http.stream("GET", f"/v1/videos/{video_id}/events") as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            for line in r.iter_lines():
                if line.startswith("data: "):
                    yield json.loads(line[6:])

    def generate(self, image: str | Path | bytes, prompt: str,
                 on_event: Callable[[dict], None] | None = None, audio: str | Path | bytes | None = None,
                 on_created: Callable[[dict], None] | None = None, **fields: Any) -> bytes:
        """Create a job, follow its events, and return the MP4 (raises ClientError if it fails).

        Ctrl-C (KeyboardInterrupt) while the job runs cancels it on the server (DELETE) and raises
        `Interrupted` (a KeyboardInterrupt) naming the job. `on_created` gets the new job object."""
        job = self.create_video(image, prompt, audio=audio, **fields)
        if on_created is not None:
            on_created(job)
        final = None
        try:
            for event in self.events(job["id"]):
                if on_event is not None:
                    on_event(event)
                if event["event"] in ("completed", "failed", "cancelled"):
                    final = event
        except KeyboardInterrupt:
            if final is not None:  # finished already: nothing to cancel (DELETE would remove it)
                raise
            raise Interrupted(job["id"], self._cancel(job["id"])) from None
        if final is None or final["event"] != "completed":
            job = self.get_video(job["id"])
            raise ClientError(500, {"type": "job_" + job["status"],
                                    "message": (job.get("error") or {}).get("message", job["status"])})
        return self.content(job["id"])

    def _cancel(self, video_id: str) -> bool:
        """Best-effort DELETE (a few seconds at most): did the server take the cancellation?"""
        try:
            with self._reaching():
                r = self.http.delete(f"/v1/videos/{video_id}", timeout=10.0)
            return r.status_code < 400
        except ClientError:
            return False

    def generate_sync(self, image: str | Path | bytes, prompt: str, audio: str | Path | bytes | None = None,
                      **fields: Any) -> bytes:
        return self._request("POST", "/v1/videos/sync", data=self._form(VideoRequest, prompt, fields),
                             files=_uploads(image, audio)).content

    # -------------------------------------------------------------- avatars

    def create_avatar(self, image: str | Path | bytes, prompt: str, wait: bool = True,
                      poll_s: float = 0.5, on_progress: Callable[[dict], None] | None = None,
                      **fields: Any) -> dict:
        """Create (or find: the same inputs give the same avatar) and, with `wait`, poll until it
        is ready; raises ClientError if it fails. `on_progress` gets the avatar object (status,
        stage, step, progress, queue_position) after creation and after each poll."""
        avatar = self._request("POST", "/v1/avatars", data=self._form(AvatarRequest, prompt, fields),
                               files=_uploads(image)).json()
        if on_progress is not None:
            on_progress(avatar)
        while wait and avatar["status"] in ("queued", "in_progress"):
            time.sleep(poll_s)
            avatar = self.get_avatar(avatar["id"])
            if on_progress is not None:
                on_progress(avatar)
        if avatar["status"] in ("failed", "cancelled"):
            raise ClientError(500, {"type": "avatar_" + avatar["status"],
                                    "message": (avatar.get("error") or {}).get("message", avatar["status"])})
        return avatar

    def get_avatar(self, avatar_id: str) -> dict:
        return self._request("GET", f"/v1/avatars/{avatar_id}").json()

    def delete_avatar(self, avatar_id: str) -> dict:
        return self._request("DELETE", f"/v1/avatars/{avatar_id}").json()

    def speak(self, avatar_id: str, audio: str | Path | bytes, start_index: int = 0) -> Iterator[bytes]:
        """Upload speech; yields the lip-synced fragmented MP4 as it streams in."""
        name, data = _image(audio)
        files = {"audio": (name, data, "application/octet-stream")}
        with self._reaching(), self.http.stream("POST", f"/v1/avatars/{avatar_id}/speech", files=files,
                                                data={"start_index": str(start_index)}) as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            yield from r.iter_bytes()

    def models(self) -> dict:
        return self._request("GET", "/v1/models").json()

    def live(self, avatar_id: str, format: str = "pcm_s16le", sample_rate: int = 16000) -> "LiveConnection":
        """A live session on a ready avatar (async): `async with client.live(avatar) as session:`
        then `await session.send_audio(pcm_bytes)`, `end_of_utterance()`, `interrupt()`,
        `close()`, and `async for message in session` for the stream's fMP4 bytes and its event
        dicts. The session's `ready` event is in `session.ready`."""
        base = str(self.http.base_url).rstrip("/")
        url = ("wss" if base.startswith("https") else "ws") + base[base.index(":"):] + f"/v1/avatars/{avatar_id}/live"
        return LiveConnection(url, self.http.headers.get("authorization"), format, sample_rate)


class LiveSessionError(ClientError):
    """A live session the server ended with an error: `status` is the WebSocket close code (4000 +
    the HTTP status of the same error where there is one: 4401 no valid key, 4429 full, ...)."""

    def __init__(self, code: int, error: dict):
        self.status, self.error = code, error
        param = f" ({error.get('param')})" if error.get("param") else ""
        RuntimeError.__init__(self, _one_line(f"live session closed ({code}): {error.get('message', '')}{param}", 600))


class LiveConnection:
    """One live session over a WebSocket (`AvatarClient.live`). A session the server ends with an
    error raises ClientError (the close code as its status, the error event as its envelope)."""

    def __init__(self, url: str, authorization: str | None, format: str, sample_rate: int):
        self.url, self.authorization = url, authorization
        self.start = {"type": "start", "format": format, "sample_rate": sample_rate}
        self.ready: dict | None = None
        self.error: dict | None = None
        self._ws = None

    async def __aenter__(self) -> "LiveConnection":
        import websockets

        headers = {"Authorization": self.authorization} if self.authorization else {}
        try:
            self._ws = await websockets.connect(self.url, additional_headers=headers, max_size=None)
        except (OSError, websockets.exceptions.InvalidHandshake) as exc:
            raise ClientError(0, {"type": "connection_error", "message": f"cannot open {self.url}: {exc}",
                                  "param": None}) from exc
        try:
            await self._ws.send(json.dumps(self.start))
        except websockets.exceptions.ConnectionClosed:
            pass  # the server refused at once (a key, an avatar): its error event is still to read
        first = await self._next()
        if first is None or not isinstance(first, dict) or first.get("type") != "ready":
            raise self._failure()
        self.ready = first
        return self

    async def __aexit__(self, *exc) -> None:
        await self._ws.close()

    async def _next(self):
        import websockets

        try:
            message = await self._ws.recv()
        except websockets.exceptions.ConnectionClosed:
            return None
        if isinstance(message, str):
            message = json.loads(message)
            if message.get("type") == "error":
                self.error = message
        return message

    def _failure(self) -> LiveSessionError:
        rcvd = getattr(self._ws, "close_rcvd", None)
        code = self.error.get("code") if self.error else getattr(rcvd, "code", 0)
        error = self.error or {"type": "error", "message": getattr(rcvd, "reason", "") or "the session closed",
                               "param": None}
        return LiveSessionError(code or 0, {"type": "live_session_error", "message": error.get("message", ""),
                                            "param": error.get("param")})

    async def send_audio(self, pcm: bytes) -> None:
        await self._ws.send(bytes(pcm))

    async def end_of_utterance(self) -> None:
        await self._ws.send(json.dumps({"type": "end_of_utterance"}))

    async def interrupt(self) -> None:
        await self._ws.send(json.dumps({"type": "interrupt"}))

    async def close(self) -> None:
        """Ask the server to end the session; what it sends until then still arrives."""
        await self._ws.send(json.dumps({"type": "close"}))

    def __aiter__(self):
        return self

    async def __anext__(self):
        message = await self._next()
        if message is None:
            rcvd = getattr(self._ws, "close_rcvd", None)
            if self.error is not None or (rcvd is not None and rcvd.code not in (1000, 1001)):
                raise self._failure()
            raise StopAsyncIteration
        return message


def _uploads(image: str | Path | bytes, audio: str | Path | bytes | None = None) -> dict:
    """The multipart files of a video / avatar request: `input_reference`, and `audio` if given."""
    name, data = _image(image)
    files = {"input_reference": (name, data, "application/octet-stream")}
    if audio is not None:
        aname, adata = _image(audio)
        files["audio"] = (aname, adata, "application/octet-stream")
    return files
