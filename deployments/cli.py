"""`avatar-serve` command line.

    avatar-serve demo [--profile tiny] [-o out/demo.mp4]
        start a local Ray cluster, deploy the graph, send one request over HTTP with a generated
        portrait, write the MP4, shut down.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np


def demo_image(width: int = 64, height: int = 64) -> bytes:
    """A synthetic portrait-like PNG: a skin-coloured disc on a gradient (no files needed)."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width * 255, y / height * 255, np.full_like(x, 96)], axis=-1)
    face = (x - width / 2) ** 2 / (width / 3.2) ** 2 + (y - height / 2) ** 2 / (height / 2.6) ** 2 < 1
    img[face] = (224, 172, 140)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def cmd_demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import httpx
    import ray
    from ray import serve

    from deployments.media.video import decode_mp4
    from graph import GraphArgs, app

    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(app(GraphArgs(profile=args.profile)), name="avatar-serve", route_prefix="/")
        print(f"graph up in {time.perf_counter() - t0:.1f} s (profile {args.profile})")
        files = {"input_reference": ("portrait.png", demo_image(), "image/png")}
        data = {"prompt": args.prompt, "seed": str(args.seed)}
        t1 = time.perf_counter()
        r = httpx.post(f"http://127.0.0.1:{args.port}/v1/videos/sync", data=data, files=files,
                       timeout=600)
        if r.status_code != 200:
            print(f"request failed: HTTP {r.status_code}: {r.text}", file=sys.stderr)
            return 1
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(r.content)
        frames, fps = decode_mp4(r.content)
        print(f"wrote {out} ({len(r.content)} bytes): {frames.shape[0]} frames "
              f"{frames.shape[2]}x{frames.shape[1]} at {fps:g} fps, seed {r.headers.get('x-seed')}, "
              f"request {time.perf_counter() - t1:.2f} s")
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()


def cmd_download(args: argparse.Namespace) -> int:
    from deployments.common.errors import MissingWeightsError
    from deployments.models import download as dl
    from deployments.profiles import load_profile

    cfg = load_profile(args.profile, {"weights_dir": args.dir} if args.dir else None)
    if args.dry_run:
        print("\n".join(dl.dry_run_lines(cfg, listings_dir=args.listings)))
        return 0
    plans = dl.plan(cfg)
    where = cfg.weights_dir or "the default Hugging Face cache"
    for repo, path in dl.download(cfg, cfg.weights_dir, progress=not args.quiet).items():
        print(f"{repo}: {path}")
    try:
        dl.check_weights_present(cfg, args.profile)
    except MissingWeightsError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(f"profile {cfg.name}: all weights present in {where}"
          + ("" if plans else " (nothing to download)"))
    if args.dir:
        print(f"serve with weights_dir {args.dir!r}: set it in the profile, or pass "
              f"overrides: {{weights_dir: {args.dir}}} in serve_config.yaml args")
    return 0


def progress_printer(stream=sys.stderr, width: int = 30):
    """An on_event callback drawing a one-line progress bar from the job's SSE events."""

    def show(event: dict) -> None:
        kind = event["event"]
        pct = int(event.get("progress", 0))
        if kind == "queued":
            label = f"queued (position {event.get('position')})"
        elif kind == "step":
            label = f"denoise step {event['step']}/{event['total']} ({event['expert']} expert)"
        elif kind == "stage":
            label = f"{event['stage']} {event['state']}"
        else:
            label = kind + (f": {event['error']['message']}" if event.get("error") else "")
        bar = "#" * (pct * width // 100)
        stream.write(f"\r[{bar:<{width}}] {pct:3d}% {label:<48}")
        if kind in ("completed", "failed", "cancelled"):
            stream.write("\n")
        stream.flush()

    return show


def cmd_generate(args: argparse.Namespace) -> int:
    from deployments.api.client import AvatarClient, ClientError

    client = AvatarClient(args.url, api_key=args.api_key or os.environ.get("AVATAR_SERVE_API_KEY"))
    fields = {"size": args.size, "num_frames": args.frames, "seconds": args.seconds, "seed": args.seed,
              "num_inference_steps": args.steps, "negative_prompt": args.negative_prompt}
    try:
        mp4 = client.generate(args.image, args.prompt, on_event=progress_printer(), **fields)
    except (ClientError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(mp4)
    print(f"wrote {out} ({len(mp4)} bytes)")
    return 0


def cmd_speak(args: argparse.Namespace) -> int:
    """Create (or reuse) an avatar from an image + prompt, then stream a lip-synced turn to a file."""
    from deployments.api.client import AvatarClient, ClientError

    client = AvatarClient(args.url, api_key=args.api_key or os.environ.get("AVATAR_SERVE_API_KEY"))
    try:
        avatar_id = args.avatar
        if avatar_id is None:
            if not (args.image and args.prompt):
                print("error: give --avatar ID, or --image and --prompt to create one", file=sys.stderr)
                return 2
            print("preparing the avatar (base clip + lip-sync preparation)...", file=sys.stderr)
            avatar_id = client.create_avatar(args.image, args.prompt, size=args.size, seed=args.seed)["id"]
            print(f"avatar {avatar_id}", file=sys.stderr)
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        t0, first, total = time.perf_counter(), None, 0
        with open(out, "wb") as fh:
            for chunk in client.speak(avatar_id, args.audio):
                first = first if first is not None else time.perf_counter() - t0
                total += len(chunk)
                fh.write(chunk)
    except (ClientError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({total} bytes; first bytes after {first:.2f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avatar-serve")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run one request through the graph on a local Ray cluster")
    demo.add_argument("--profile", default="tiny")
    demo.add_argument("--prompt", default="a portrait of a woman who smiles and talks")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("-o", "--output", default="out/demo.mp4")
    demo.set_defaults(fn=cmd_demo)
    dl = sub.add_parser("download", help="fetch a profile's weight files (serving never downloads)")
    dl.add_argument("profile", help="a name in configs/ or a path to a profile YAML")
    dl.add_argument("--dir", default=None,
                    help="huggingface_hub cache folder to fill (default: the profile's weights_dir, "
                         "else the default Hugging Face cache)")
    dl.add_argument("--dry-run", action="store_true",
                    help="print per repo the patterns and the files they select; fetch nothing")
    dl.add_argument("--listings", default=None,
                    help="with --dry-run: folder of saved repo listings (<owner>__<name>.txt) "
                         "to use instead of asking the Hub")
    dl.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    dl.set_defaults(fn=cmd_download)
    gen = sub.add_parser("generate", help="create a video job on a running server, show progress, save the MP4")
    gen.add_argument("image")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="out.mp4")
    gen.add_argument("--url", default="http://127.0.0.1:8000")
    gen.add_argument("--api-key", default=None, help="default: $AVATAR_SERVE_API_KEY")
    gen.add_argument("--size", default=None, help="WIDTHxHEIGHT")
    gen.add_argument("--frames", type=int, default=None)
    gen.add_argument("--seconds", type=float, default=None)
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--negative-prompt", default=None)
    gen.set_defaults(fn=cmd_generate)
    spk = sub.add_parser("speak", help="lip-sync speech onto an avatar (created from --image/--prompt if needed)")
    spk.add_argument("audio", help="speech file: wav, mp3, ogg/opus, flac, m4a")
    spk.add_argument("--avatar", default=None, help="an existing avatar id")
    spk.add_argument("--image", default=None)
    spk.add_argument("--prompt", default=None)
    spk.add_argument("--size", default=None)
    spk.add_argument("--seed", type=int, default=None)
    spk.add_argument("-o", "--output", default="speech.mp4")
    spk.add_argument("--url", default="http://127.0.0.1:8000")
    spk.add_argument("--api-key", default=None, help="default: $AVATAR_SERVE_API_KEY")
    spk.set_defaults(fn=cmd_speak)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
