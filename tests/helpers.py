"""Helpers the tests share: tiny inputs built in code (diffusers' `get_dummy_inputs` habit), audio
and MP4 probes, LoRA files written in the published layouts, and a free port."""

from __future__ import annotations

import io
import socket
import time
import wave
from contextlib import contextmanager

import numpy as np
from PIL import Image

from deployments.common.payloads import VideoParams


def get_dummy_image(seed: int = 0, width: int = 24, height: int = 20) -> np.ndarray:
    """A random uint8 RGB image (H, W, 3); deliberately not the output size, to exercise resizing."""
    return np.random.RandomState(seed).randint(0, 256, size=(height, width, 3), dtype=np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def get_dummy_params(seed: int = 7, **overrides) -> VideoParams:
    values = dict(prompt="a portrait of a woman who talks", negative_prompt="blurry", width=16,
                  height=16, num_frames=9, seed=seed, num_inference_steps=4, guidance_scale=5.0,
                  guidance_scale_2=3.0, fps=16)
    values.update(overrides)
    return VideoParams(**values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wav_bytes(seconds: float, rate: int = 22050, channels: int = 2) -> bytes:
    """A 220 Hz tone as a 16-bit WAV file."""
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(tone[:, None], channels, axis=1).tobytes())
    return buf.getvalue()


def durations(mp4: bytes) -> tuple[int, float, float]:
    """-> (video frames, video seconds at 25 fps, audio seconds) of an MP4."""
    import av

    with av.open(io.BytesIO(mp4)) as c:
        frames = sum(1 for _ in c.decode(c.streams.video[0]))
    with av.open(io.BytesIO(mp4)) as c:
        audio = sum(f.samples for f in c.decode(c.streams.audio[0])) / c.streams.audio[0].rate
    return frames, frames / 25, audio


# ------------------------------------------------------------------ LoRA files (tiny experts)

LORA_RANK = 4
TINY_INNER = 24  # tiny expert: 2 heads x 12


def lora_pairs(seed: int):
    """Random (down (r, in), up (out, r)) pairs for self-attn q/v and the first ffn linear of
    each block of a tiny expert, large enough to change the output visibly."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (TINY_INNER, TINY_INNER), "v": (TINY_INNER, TINY_INNER), "ffn0": (TINY_INNER, 32)}
    return {(i, name): (torch.randn(LORA_RANK, fan_in, generator=g) * 0.3,
                        torch.randn(fan_out, LORA_RANK, generator=g) * 0.3)
            for i in range(2) for name, (fan_in, fan_out) in shapes.items()}


DIFFUSERS_LORA_NAMES = {"q": "attn1.to_q", "v": "attn1.to_v", "ffn0": "ffn.net.0.proj"}
WAN_LORA_NAMES = {"q": "self_attn.q", "v": "self_attn.v", "ffn0": "ffn.0"}


def write_diffusers_lora(path, pairs, scale: float = 1.0):
    """peft/diffusers style: transformer.blocks.0.attn1.to_q.lora_A.weight / lora_B.weight."""
    from safetensors.torch import save_file

    sd = {}
    for (i, name), (down, up) in pairs.items():
        base = f"transformer.blocks.{i}.{DIFFUSERS_LORA_NAMES[name]}"
        sd[f"{base}.lora_A.weight"] = down.contiguous()
        sd[f"{base}.lora_B.weight"] = (up * scale).contiguous()
    save_file(sd, str(path))
    return path


def expert_inputs(seed: int = 0):
    """(latents, timestep, context) for one forward of a tiny expert."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 36, 3, 8, 8, generator=g), torch.tensor([800.0]),
            torch.randn(1, 8, 32, generator=g))


def run_expert(model, inputs=None):
    """One forward of a tiny expert (no grad) -> its output."""
    import torch

    x, t, ctx = inputs or expert_inputs()
    with torch.no_grad():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]


# ------------------------------------------------------------------ faces and MP4


def synthetic_landmarks(cx=50.0, nose_y=40.0, chin_y=70.0, half_width=20.0):
    """68 synthetic landmarks: jaw along the bottom, point 29 on the nose bridge."""
    lm = np.zeros((68, 2))
    lm[:, 0] = np.linspace(cx - half_width, cx + half_width, 68)
    lm[:, 1] = nose_y
    lm[:17, 1] = np.linspace(nose_y, chin_y, 17)  # jaw line down to the chin
    lm[29] = (cx, nose_y)
    return lm


def decode_mp4_tracks(data: bytes) -> tuple[np.ndarray, float, float]:
    """-> (video frames (F, H, W, 3), fps, end time of the audio track in seconds), where the
    end times are on the container's timeline (pts + duration of the last frame)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        vstream = container.streams.video[0]
        fps = float(vstream.average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(vstream)]
    with av.open(io.BytesIO(data)) as container:
        last = None
        for frame in container.decode(container.streams.audio[0]):
            last = frame
        audio_end = float(last.pts * last.time_base) + last.samples / last.sample_rate
    return np.stack(frames), fps, audio_end


# ------------------------------------------------------------------ polling the HTTP API

FINAL = {"videos": ("completed", "failed", "cancelled"), "avatars": ("ready", "failed", "cancelled")}


# How long a test waits for an answer before it calls the server hung. Not a speed claim: a loaded
# two-core machine may take seconds for what takes milliseconds elsewhere; the bound only turns a
# hang into a failure instead of a stuck run. How fast the probes answer is measured in bench/.
HANG_S = 60.0


def health_probe(url: str, timeout: float = HANG_S) -> str | None:
    """GET `url` as a health probe: None when it answers 200, else why not ("hung" after `timeout`)."""
    import httpx

    try:
        r = httpx.get(url, timeout=timeout)
    except httpx.TimeoutException:
        return f"{url}: no answer in {timeout:g} s (hung)"
    return None if r.status_code == 200 else f"{url}: {r.status_code}"


def wait_final(client, record_id: str, timeout: float = 90, headers=None, kind: str = "videos") -> dict:
    """Poll GET /v1/{kind}/{id} (an httpx or TestClient client) until the record reaches a final
    status; -> its last JSON."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        record = client.get(f"/v1/{kind}/{record_id}", headers=headers or {}).json()
        if record.get("status") in FINAL[kind]:
            return record
        if time.monotonic() > deadline:
            raise AssertionError(f"{record_id} did not finish: {record}")
        time.sleep(0.05)


def wait_ready(client, avatar_id: str, timeout: float = 90, headers=None) -> dict:
    return wait_final(client, avatar_id, timeout, headers, kind="avatars")


# ------------------------------------------------------------------ a served graph (cluster mode)


@contextmanager
def served_graph(overrides: dict, profile: str = "tiny", app_name: str = "avatar-serve", num_cpus: int = 4,
                 timeout_s: float = 240, num_gpus: int = 0):
    """The graph served by a fresh local Ray cluster of its own (no dashboard), `graph.app` with
    `GraphArgs(profile, overrides)` run through Ray Serve as `serve run` does, over HTTP on a free
    port, with `num_gpus` fake GPUs for placement. -> its base URL once `/readyz` answers 200; Serve and Ray are shut down afterwards."""
    import httpx
    import ray
    from ray import serve

    from graph import GraphArgs, app

    port = free_port()
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app(GraphArgs(profile=profile, overrides=overrides)), name=app_name, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the served graph was not ready within {timeout_s} s")
            time.sleep(0.5)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


