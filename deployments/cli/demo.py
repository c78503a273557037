"""`avatar-serve demo`: the product end to end on a local Ray cluster, from inputs it makes itself.

`demo_image` (a portrait-like PNG, 64x64 RGB by default) and `demo_speech` (speech-like audio, a
16 kHz mono 16-bit WAV) need no files. `cmd_demo` starts a local Ray cluster, deploys the graph
and over HTTP runs a video job from the portrait, then an avatar from the same portrait and a
lip-synced talk turn from the speech; it writes both clips and its inputs, and shuts down.
`describe_mp4` sums up a clip (frames, size, fps, seconds of audio); `random_weights_note` says
when a profile's random weights make the clips coloured noise.
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

from deployments.cli.progress import avatar_printer, progress_printer
from deployments.cli.remote import API_KEY_ENV


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
