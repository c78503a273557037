"""A small Python client for the HTTP API (what `avatar-serve generate` uses).

    client = AvatarClient("http://127.0.0.1:8000", api_key=None)
    mp4 = client.generate("portrait.png", "a woman talks", on_event=print, size="832x480")

Requests are built from the protocol's models (deployments/api/protocol.py), so a field the
server would refuse for its type or bounds is refused here first, with the same message. It needs
httpx and pydantic (no torch, no Ray).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
from pydantic import ValidationError

from deployments.api.protocol import AvatarRequest, VideoRequest, validation_param


class ClientError(RuntimeError):
    """An error answer from the server: HTTP status plus its error envelope."""

    def __init__(self, status: int, error: dict):
        self.status, self.error = status, error
        param = f" ({error.get('param')})" if error.get("param") else ""
        super().__init__(f"HTTP {status} {error.get('type', '')}: {error.get('message', '')}{param}")


def _image(file: str | Path | bytes) -> tuple[str, bytes]:
    """A path or the file's bytes -> (file name, bytes) for an upload."""
    if isinstance(file, bytes):
        return "upload", file
    path = Path(file)
    return path.name, path.read_bytes()


class AvatarClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 600.0, http: httpx.Client | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # `http` lets tests pass FastAPI's TestClient (an httpx.Client) instead of a network client.
        self.http = http or httpx.Client(base_url=url, timeout=timeout)
        self.http.headers.update(headers)

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                error = r.json().get("error") or {}
            except ValueError:
                error = {"type": "http_error", "message": r.text[:300]}
            raise ClientError(r.status_code, error)
        return r

    @staticmethod
    def _form(model: type[VideoRequest], prompt: str, fields: dict[str, Any]) -> dict[str, str]:
        """The request's form fields, validated by the protocol model (ClientError 422 if not)."""
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

    def create_video(self, image: str | Path | bytes, prompt: str, **fields: Any) -> dict:
        name, data = _image(image)
        files = {"input_reference": (name, data, "application/octet-stream")}
        return self._check(self.http.post("/v1/videos", data=self._form(VideoRequest, prompt, fields),
                                          files=files)).json()

    def get_video(self, video_id: str) -> dict:
        return self._check(self.http.get(f"/v1/videos/{video_id}")).json()

    def list_videos(self, limit: int = 20, after: str | None = None) -> dict:
        params = {"limit": limit, **({"after": after} if after else {})}
        return self._check(self.http.get("/v1/videos", params=params)).json()

    def delete_video(self, video_id: str) -> dict:
        return self._check(self.http.delete(f"/v1/videos/{video_id}")).json()

    def content(self, video_id: str) -> bytes:
        return self._check(self.http.get(f"/v1/videos/{video_id}/content")).content

    def events(self, video_id: str) -> Iterator[dict]:
        """Server-sent progress events until the job's final one."""
        with self.http.stream("GET", f"/v1/videos/{video_id}/events") as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            for line in r.iter_lines():
                if line.startswith("data: "):
                    yield json.loads(line[6:])

    def generate(self, image: str | Path | bytes, prompt: str,
                 on_event: Callable[[dict], None] | None = None, **fields: Any) -> bytes:
        """Create a job, follow its events, and return the MP4 (raises ClientError if it fails)."""
        job = self.create_video(image, prompt, **fields)
        final = None
        for event in self.events(job["id"]):
            if on_event is not None:
                on_event(event)
            if event["event"] in ("completed", "failed", "cancelled"):
                final = event
        if final is None or final["event"] != "completed":
            job = self.get_video(job["id"])
            raise ClientError(500, {"type": "job_" + job["status"],
                                    "message": (job.get("error") or {}).get("message", job["status"])})
        return self.content(job["id"])

    def generate_sync(self, image: str | Path | bytes, prompt: str, **fields: Any) -> bytes:
        name, data = _image(image)
        files = {"input_reference": (name, data, "application/octet-stream")}
        return self._check(self.http.post("/v1/videos/sync", data=self._form(VideoRequest, prompt, fields),
                                          files=files)).content

    # -------------------------------------------------------------- avatars

    def create_avatar(self, image: str | Path | bytes, prompt: str, wait: bool = True,
                      poll_s: float = 0.5, **fields: Any) -> dict:
        """Create (or find: the same inputs give the same avatar) and, with `wait`, poll until it
        is ready; raises ClientError if it fails."""
        name, data = _image(image)
        files = {"input_reference": (name, data, "application/octet-stream")}
        avatar = self._check(self.http.post("/v1/avatars", data=self._form(AvatarRequest, prompt, fields),
                                            files=files)).json()
        while wait and avatar["status"] in ("queued", "in_progress"):
            time.sleep(poll_s)
            avatar = self.get_avatar(avatar["id"])
        if avatar["status"] in ("failed", "cancelled"):
            raise ClientError(500, {"type": "avatar_" + avatar["status"],
                                    "message": (avatar.get("error") or {}).get("message", avatar["status"])})
        return avatar

    def get_avatar(self, avatar_id: str) -> dict:
        return self._check(self.http.get(f"/v1/avatars/{avatar_id}")).json()

    def delete_avatar(self, avatar_id: str) -> dict:
        return self._check(self.http.delete(f"/v1/avatars/{avatar_id}")).json()

    def speak(self, avatar_id: str, audio: str | Path | bytes, start_index: int = 0) -> Iterator[bytes]:
        """Upload speech; yields the lip-synced fragmented MP4 as it streams in."""
        name, data = _image(audio)
        files = {"audio": (name, data, "application/octet-stream")}
        with self.http.stream("POST", f"/v1/avatars/{avatar_id}/speech", files=files,
                              data={"start_index": str(start_index)}) as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            yield from r.iter_bytes()

    def models(self) -> dict:
        return self._check(self.http.get("/v1/models")).json()
