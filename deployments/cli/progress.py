"""One-line progress bars on stderr for the commands that wait on the server.

`progress_printer` draws a video job from its SSE events (queued, denoise steps, stages, the
end); `avatar_printer` draws an avatar's preparation as GET /v1/avatars/{id} reports it.
"""

from __future__ import annotations

import sys


class ProgressBar:
    """A one-line progress bar on `stream`; `close()` ends its line (before an error message)."""

    def __init__(self, stream=None, width: int = 30):
        self.stream, self.width, self.open = stream if stream is not None else sys.stderr, width, False
        self.last = None

    def draw(self, pct: int, label: str, final: bool = False) -> None:
        if (pct, label) == self.last and not final:
            return  # polled again, nothing new
        self.last = (pct, label)
        bar = "#" * (pct * self.width // 100)
        self.stream.write(f"\r[{bar:<{self.width}}] {pct:3d}% {label:<48}")
        self.open = not final
        if final:
            self.stream.write("\n")
        self.stream.flush()

    def close(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False


class progress_printer(ProgressBar):  # noqa: N801 - called like the function it was
    """An on_event callback drawing a one-line progress bar from the job's SSE events."""

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        pct = int(event.get("progress", 0))
        if kind == "queued":
            label = f"queued (position {event.get('position')})"
        elif kind == "step":
            label = f"denoise step {event['step']}/{event['total']} ({event['expert']} expert)"
        elif kind == "stage":
            label = f"{event['stage']} {event['state']}"
        elif kind == "requeued":
            label = "re-queued after a server restart"
        elif kind == "retry":
            label = f"the {event['stage']} stage's replica died; it runs again"
        elif kind == "first_fragment":
            label = "decoding (the MP4 streams now)"
        else:
            label = kind + (f": {event['error']['message']}" if event.get("error") else "")
        self.draw(pct, label, final=kind in ("completed", "failed", "cancelled"))


AVATAR_STAGES = {"encode": "encoding the prompt and portrait", "decode": "decoding the base clip",
                 "lipsync": "lip-sync preparation (face, crops, latents)"}


class avatar_printer(ProgressBar):  # noqa: N801
    """An on_progress callback for `create_avatar`: the avatar's status, stage, step and
    progress (GET /v1/avatars/{id}) as the same one-line bar."""

    def __call__(self, avatar: dict) -> None:
        status, stage, pct = avatar["status"], avatar.get("stage"), int(avatar.get("progress") or 0)
        if status == "queued":
            label = "queued" + (f" (position {avatar['queue_position']})"
                                if avatar.get("queue_position") is not None else "")
        elif status == "in_progress" and stage == "denoise":
            label = f"base clip: denoise step {avatar.get('step') or 0}"
        elif status == "in_progress":
            label = AVATAR_STAGES.get(stage, stage or "starting")
        elif status == "ready":
            label, pct = "ready", 100
        else:
            label = status + (f": {avatar['error']['message']}" if avatar.get("error") else "")
        self.draw(pct, label, final=status in ("ready", "failed", "cancelled"))
