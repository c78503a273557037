"""`avatar-serve` command line.

    avatar-serve demo [--profile tiny] [-o out/demo.mp4]
        start a local Ray cluster, deploy the graph, and over HTTP: a video job from a generated
        portrait (out/demo.mp4), then an avatar from the same portrait and a lip-synced talk turn
        from generated speech-like audio (out/demo-talk.mp4); shut down.
    avatar-serve download PROFILE [--dry-run]
    avatar-serve generate IMAGE PROMPT [--audio FILE] [-o out.mp4]     (a running server)
    avatar-serve speak AUDIO (--avatar ID | --image IMAGE --prompt TEXT) [-o speech.mp4]

Failures end with one line on stderr and a non-zero exit status, never a traceback (set
AVATAR_SERVE_DEBUG=1 to see one): 1 for an error answer or an unreachable server, 2 for bad
arguments, 130 for Ctrl-C (which cancels a running `generate` job on the server).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
API_KEY_ENV = "AVATAR_SERVE_API_KEY"


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


# Formants (F1, F2, F3 in Hz) of five vowels, average adult speaker: a, e, i, o, u.
VOWELS = ((730, 1090, 2440), (530, 1840, 2480), (270, 2290, 3010), (570, 840, 2410), (300, 870, 2240))


def demo_speech(seconds: float = 2.0, rate: int = 16000, seed: int = 0) -> bytes:
    """Speech-like audio as a 16-bit mono WAV (no files needed): voiced syllables (a glottal
    harmonic series with a falling, wavering pitch, shaped by the formants of a vowel per
    syllable), consonant-like noise bursts at syllable onsets, and pauses between 'words'."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    syllable = 0.22
    index = (t / syllable).astype(int)
    count = int(index[-1]) + 1
    vowel = rng.integers(0, len(VOWELS), size=count)
    # pitch: 150 Hz falling to ~115 Hz over the utterance, a rise on each syllable, a little vibrato
    f0 = 150 - 35 * t / seconds + 12 * np.sin(np.pi * (t / syllable % 1)) + 2 * np.sin(2 * np.pi * 5.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    formants = np.asarray(VOWELS, dtype=np.float64)[vowel][index]          # (n, 3)
    smooth = np.ones(int(0.03 * rate)) / int(0.03 * rate)                  # 30 ms glides between vowels
    formants = np.stack([np.convolve(formants[:, j], smooth, mode="same") for j in range(3)], axis=1)
    formants[: len(smooth)] = formants[len(smooth)]
    formants[-len(smooth):] = formants[-len(smooth) - 1]
    bandwidth = np.array([90.0, 110.0, 170.0])
    voiced = np.zeros(n)
    for h in range(1, int(3800 / 110) + 1):
        freq = h * f0
        gain = (1.0 / (1.0 + ((freq[:, None] - formants) / bandwidth) ** 2)).sum(axis=1)
        voiced += gain / np.sqrt(h) * np.sin(h * phase) * (freq < rate / 2 - 200)
    # loudness: a rounded envelope per syllable, every fourth syllable a pause
    u = t / syllable % 1
    envelope = np.sin(np.pi * np.clip((u - 0.08) / 0.84, 0, 1)) ** 0.7
    envelope[(index % 4) == 3] = 0.0
    burst = np.diff(rng.standard_normal(n + 1)) * (u < 0.08) * ((index % 4) != 3) * 0.15
    signal = voiced * envelope + burst
    signal = signal / (np.abs(signal).max() + 1e-9) * 0.6
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((signal * 32767).astype(np.int16).tobytes())
    return buf.getvalue()


def describe_mp4(data: bytes) -> str:
    """'50 frames 32x32 at 25 fps, 2.00 s of audio' for an MP4 (fragmented or not)."""
    import av

    with av.open(io.BytesIO(data)) as c:
        v = c.streams.video[0]
        frames = [f for f in c.decode(v)]
        fps = float(v.average_rate or v.guessed_rate or 0)
        size = f"{frames[0].width}x{frames[0].height}" if frames else "?"
    text = f"{len(frames)} frames {size} at {fps:g} fps"
    with av.open(io.BytesIO(data)) as c:
        if c.streams.audio:
            a = c.streams.audio[0]
            text += f", {sum(f.samples for f in c.decode(a)) / a.rate:.2f} s of audio"
        else:
            text += ", no audio"
    return text


def random_weights_note(profile: str) -> str | None:
    """What random weights look like and how to get real ones, or None for a profile with real
    weights."""
    from deployments.config import MODEL_STAGES
    from deployments.config_weights import RandomWeights
    from deployments.profiles import load_profile

    cfg = load_profile(profile)
    stages = [s for s in MODEL_STAGES if isinstance(getattr(cfg.stages, s).weights, RandomWeights)]
    if not stages:
        return None
    real = "wan22-i2v-a14b-distill-fp8"
    return (f"note: profile {cfg.name!r} has random weights ({', '.join(stages)}), so both clips are "
            f"coloured noise: they show the pipeline (base clip, avatar, lip-synced turn with its "
            f"audio), not a face. Real weights (GPUs): `.venv/bin/avatar-serve download {real}` "
            f"(`--dry-run` lists the files), then `.venv/bin/avatar-serve demo --profile {real}`, "
            f"or set args.profile in serve_config.yaml.")


def _api_key() -> str | None:
    """For the demo's own graph: a key it accepts when AVATAR_SERVE_API_KEYS is set."""
    keys = [k.strip() for k in os.environ.get("AVATAR_SERVE_API_KEYS", "").split(",") if k.strip()]
    return os.environ.get(API_KEY_ENV) or (keys[0] if keys else None)


def cmd_demo(args: argparse.Namespace) -> int:
    # The demo starts its own cluster (address="local") with this process's RAY_AUTH_MODE, so the
    # driver and the cluster always agree on Ray's auth mode (default: off, as for the tests).
    # HTTP listens on 127.0.0.1 and the dashboard is off, but Ray's own ports (GCS, raylet) listen
    # on every interface: on a reachable host, run it with RAY_AUTH_MODE=token.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from deployments.api.client import AvatarClient
    from graph import GraphArgs, app

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    talk_out = out.with_name(f"{out.stem}-talk{out.suffix}")
    portrait_file, speech_file = out.with_name(f"{out.stem}-portrait.png"), out.with_name(f"{out.stem}-speech.wav")
    portrait_file.write_bytes(demo_image())
    speech_file.write_bytes(demo_speech(args.speech_seconds))
    note = random_weights_note(args.profile)

    t0 = time.perf_counter()
    storage = tempfile.TemporaryDirectory(prefix="avatar-serve-demo-")  # this run's jobs and avatars only
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        graph = GraphArgs(profile=args.profile, overrides={"serving": {"storage_dir": storage.name}})
        serve.run(app(graph), name="avatar-serve", route_prefix="/")
        url = f"http://127.0.0.1:{args.port}"
        print(f"graph up in {time.perf_counter() - t0:.1f} s (profile {args.profile}) at {url}")
        client = AvatarClient(url, api_key=_api_key())

        t1 = time.perf_counter()
        print(f"1/2 video job: {portrait_file} + {args.prompt!r}", file=sys.stderr)
        mp4 = client.generate(portrait_file, args.prompt, on_event=progress_printer(), seed=args.seed)
        out.write_bytes(mp4)
        print(f"wrote {out} ({len(mp4)} bytes): {describe_mp4(mp4)}, {time.perf_counter() - t1:.2f} s")

        t2 = time.perf_counter()
        print(f"2/2 avatar from the same portrait, then a talk turn with {speech_file} "
              f"({args.speech_seconds:g} s of generated speech-like audio)", file=sys.stderr)
        avatar = client.create_avatar(portrait_file, args.prompt, seed=args.seed,
                                      on_progress=avatar_printer(), poll_s=0.2)
        ready = time.perf_counter() - t2
        t3, first, talk = time.perf_counter(), None, bytearray()
        for chunk in client.speak(avatar["id"], speech_file):
            first = first if first is not None else time.perf_counter() - t3
            talk += chunk
        talk_out.write_bytes(bytes(talk))
        print(f"wrote {talk_out} ({len(talk)} bytes): {describe_mp4(bytes(talk))}; avatar ready in "
              f"{ready:.2f} s, turn's first bytes after {first or 0:.2f} s, all in {time.perf_counter() - t3:.2f} s")
        if note:
            print(note)
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
        storage.cleanup()


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


# ------------------------------------------------------------------ errors as one line


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
        if exc.status == 401:
            return f"{exc} -- " + ("the server refused this API key" if given else
                                   f"this server needs an API key: give --api-key or set {API_KEY_ENV}")
        if exc.status == 403:
            return f"{exc} -- this key may not do that"
        return str(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or exc}: {exc.filename}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text} (AVATAR_SERVE_DEBUG=1 shows the traceback)"


# ------------------------------------------------------------------ commands on a running server


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avatar-serve")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the product through the graph on a local Ray cluster: a video job, "
                                       "an avatar and a lip-synced talk turn")
    demo.add_argument("--profile", default="tiny")
    demo.add_argument("--prompt", default="a portrait of a woman who smiles and talks")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--speech-seconds", type=float, default=2.0,
                      help="length of the generated speech-like audio of the talk turn")
    demo.add_argument("-o", "--output", default="out/demo.mp4",
                      help="the base clip; the talk turn goes next to it as <name>-talk.mp4, with the "
                           "generated inputs <name>-portrait.png and <name>-speech.wav")
    demo.set_defaults(fn=cmd_demo)
    dl = sub.add_parser("download", help="fetch a profile's weight files (serving never downloads)")
    dl.add_argument("profile", help="a name in configs/ or a path to a profile YAML")
    dl.add_argument("--dir", default=None,
                    help="huggingface_hub cache folder to fill (default: the profile's weights_dir, "
                         "else the default Hugging Face cache)")
    dl.add_argument("--dry-run", action="store_true",
                    help="print per repo the patterns and the files they select; fetch nothing. The "
                         "Hub's listings are saved; offline (HF_HUB_OFFLINE=1, or the Hub unreachable "
                         "within a few seconds) the saved ones answer")
    dl.add_argument("--listings", default=None,
                    help="with --dry-run: folder of saved repo listings (<owner>__<name>.txt) "
                         "to use instead of asking the Hub")
    dl.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    dl.set_defaults(fn=cmd_download)
    seed_help = "-1: a random one (as diffusers / ComfyUI take it)"
    timeout_help = "seconds to wait for each answer or progress event (default 600; connecting: 10)"
    gen = sub.add_parser("generate", help="create a video job on a running server, show progress, save the MP4 "
                                          "(Ctrl-C cancels the job)")
    gen.add_argument("image")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="out.mp4")
    gen.add_argument("--audio", default=None,
                     help="speech file (wav, mp3, ogg/opus, flac, m4a): the clip is lip-synced to it "
                          "(25 fps, as long as the audio)")
    gen.add_argument("--url", default="http://127.0.0.1:8000")
    gen.add_argument("--api-key", default=None, help=f"default: ${API_KEY_ENV}")
    gen.add_argument("--timeout", type=float, default=None, help=timeout_help)
    gen.add_argument("--size", default=None, help="WIDTHxHEIGHT")
    gen.add_argument("--frames", type=int, default=None)
    gen.add_argument("--seconds", type=float, default=None)
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None, help=f"default: a random one; {seed_help}")
    gen.add_argument("--negative-prompt", default=None)
    gen.set_defaults(fn=cmd_generate)
    spk = sub.add_parser("speak", help="lip-sync speech onto an avatar (created from --image/--prompt if needed)")
    spk.add_argument("audio", help="speech file: wav, mp3, ogg/opus, flac, m4a")
    spk.add_argument("--avatar", default=None, help="an existing avatar id")
    spk.add_argument("--image", default=None)
    spk.add_argument("--prompt", default=None)
    spk.add_argument("--size", default=None)
    spk.add_argument("--seed", type=int, default=None,
                     help=f"of the avatar's base clip (default 0: the same inputs give the same avatar); {seed_help}")
    spk.add_argument("-o", "--output", default="speech.mp4")
    spk.add_argument("--url", default="http://127.0.0.1:8000")
    spk.add_argument("--api-key", default=None, help=f"default: ${API_KEY_ENV}")
    spk.add_argument("--timeout", type=float, default=None, help=timeout_help)
    spk.set_defaults(fn=cmd_speak)
    args = parser.parse_args(argv)
    if os.environ.get("AVATAR_SERVE_DEBUG"):
        return args.fn(args)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a command line says what failed in one line
        print(f"error: {explain(exc, args)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
