"""`avatar-serve generate` and `avatar-serve speak`: commands on a running server, over HTTP.

`cmd_generate` creates a video job, draws its progress and saves the MP4 (Ctrl-C cancels the job
on the server); `cmd_speak` creates (or reuses) an avatar and streams a lip-synced turn to a
file. `explain` turns any failure of a command into the one line the CLI prints, with what to do
about the usual ones (no server listening, an API key missing or refused).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from deployments.cli.progress import avatar_printer, progress_printer

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
API_KEY_ENV = "AVATAR_SERVE_API_KEY"


def _client(args: argparse.Namespace):
    from deployments.api.client import AvatarClient

    timeout = {} if args.timeout is None else {"timeout": args.timeout}
    return AvatarClient(args.url, api_key=args.api_key or os.environ.get(API_KEY_ENV), **timeout)


def explain(exc: BaseException, args: argparse.Namespace | None = None) -> str:
    """One line for a failure, with what to do about the usual ones."""
    from deployments.api.client import ClientError, ServerUnreachable

    if isinstance(exc, ServerUnreachable):
        hint = ""
        if "refused" in exc.reason:
            hint = ("; start it with `.venv/bin/serve run serve_config.yaml` (AVATAR_SERVE_API_KEYS set), "
                    "or give --url"
                    if any(h in exc.url for h in ("127.0.0.1", "localhost")) else "; check --url")
        return f"{exc}{hint}"
    if isinstance(exc, ClientError):
        given = bool(args is not None and (getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV)))
        if exc.status in (401, 4401):  # (4401: a live session's close code)
            return f"{exc} -- " + ("the server refused this API key" if given else
                                   f"this server needs an API key: give --api-key or set {API_KEY_ENV}")
        if exc.status == 403:
            return f"{exc} -- this key may not do that"
        return str(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or exc}: {exc.filename}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text} (AVATAR_SERVE_DEBUG=1 shows the traceback)"


def cmd_generate(args: argparse.Namespace) -> int:
    from deployments.api.client import Interrupted

    client = _client(args)
    fields = {"size": args.size, "num_frames": args.frames, "seconds": args.seconds, "seed": args.seed,
              "num_inference_steps": args.steps, "negative_prompt": args.negative_prompt}
    bar = progress_printer()

    def created(job: dict) -> None:
        print(f"job {job['id']} (seed {job['seed']}{', lip-synced' if job.get('has_audio') else ''})",
              file=sys.stderr)

    try:
        mp4 = client.generate(args.image, args.prompt, on_event=bar, audio=args.audio,
                              on_created=created, **fields)
    except Interrupted as e:
        bar.close()
        print(f"interrupted: job {e.job_id} cancelled on the server" if e.cancelled else
              f"interrupted: job {e.job_id} could not be cancelled (it may still run: "
              f"DELETE /v1/videos/{e.job_id})", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        bar.close()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(mp4)
    print(f"wrote {out} ({len(mp4)} bytes)")
    return 0


def cmd_speak(args: argparse.Namespace) -> int:
    """Create (or reuse) an avatar from an image + prompt, then stream a lip-synced turn to a file."""
    from deployments.api.client import ClientError

    client = _client(args)
    audio = args.audio
    with open(audio, "rb"):  # a missing file fails before an avatar is made
        pass
    avatar_id = args.avatar
    if avatar_id is None and not (args.image and args.prompt):
        print("error: give --avatar ID, or --image and --prompt to create one", file=sys.stderr)
        return 2

    def prepare() -> str:
        bar = avatar_printer()
        try:
            avatar = client.create_avatar(args.image, args.prompt, size=args.size, seed=args.seed,
                                          on_progress=bar)
        except KeyboardInterrupt:
            bar.close()
            print("interrupted: the avatar keeps preparing on the server; speak with --avatar once "
                  "it is ready (GET /v1/avatars/{id})", file=sys.stderr)
            raise
        finally:
            bar.close()
        print(f"avatar {avatar['id']} (seed {avatar['seed']})", file=sys.stderr)
        return avatar["id"]

    if avatar_id is None:
        avatar_id = prepare()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)

    def turn() -> tuple[float | None, int]:
        t0, first, total = time.perf_counter(), None, 0
        with open(out, "wb") as fh:
            for chunk in client.speak(avatar_id, audio):
                first = first if first is not None else time.perf_counter() - t0
                total += len(chunk)
                fh.write(chunk)
        return first, total

    try:
        first, total = turn()
    except ClientError as exc:
        # A ready avatar the lip-sync stage no longer holds (it restarted without avatar_cache_dir):
        # when we made it from --image/--prompt, make it again once.
        if not (exc.status == 409 and args.avatar is None and "no longer prepared" in str(exc)):
            out.unlink(missing_ok=True)
            raise
        print("the lip-sync stage lost this avatar's preparation; preparing it again", file=sys.stderr)
        client.delete_avatar(avatar_id)
        avatar_id = prepare()
        first, total = turn()
    print(f"wrote {out} ({total} bytes; first bytes after {first or 0:.2f} s)")
    return 0
