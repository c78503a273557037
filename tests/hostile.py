"""Hostile requests, one list for the in-process app (tests/api/test_hostile.py) and the served
graph (tests/test_cluster.py): each must get the 4xx named here, with the field named, before any
stage runs. Paths may hold `{avatar}`, a ready avatar's id. Built from the cases an attacker tried
on the served tiny profile (cost bombs, numbers that parse to inf/nan, boxes outside the clip,
files that are not what they say) and the ones around them."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from helpers import get_dummy_image, png_bytes, wav_bytes

IMAGE = png_bytes(get_dummy_image())
FILES = {"input_reference": ("p.png", IMAGE, "image/png")}
VIDEO = {"prompt": "a woman talks", "size": "32x32", "num_frames": "5", "num_inference_steps": "2"}

# What the profile under test must set for these cases (tiny + these limits, and webhooks on with
# their defaults: public destinations only).
LIMITS = {"max_image_bytes": 200_000, "max_audio_bytes": 1_000_000, "max_audio_seconds": 10.0}
WEBHOOKS = {"secret": "hostile-cases-webhook-secret"}


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixels never arrive)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def float_wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    """A 32-bit float WAV (format 3), which may carry NaN."""
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    return b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE" + \
        b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data


def flac_without_duration(seconds: float, rate: int = 8000) -> bytes:
    """Silence as FLAC (it compresses to almost nothing) whose header says nothing of its length:
    STREAMINFO's total-samples field zeroed, as a streamed encoder leaves it. Only decoding tells
    how long it is; a decoder that stops at the limit pays for the limit, not the file."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="flac") as out:
        stream = out.add_stream("flac", rate=rate, layout="mono")
        step = rate * 10
        for start in range(0, int(seconds * rate), step):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, step), np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    data = bytearray(buf.getvalue())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first: its body starts at 8
    info = 8
    data[info + 13] &= 0xF0  # the 36-bit sample count: low nibble of byte 13, bytes 14..17
    data[info + 14:info + 18] = b"\0\0\0\0"
    return bytes(data)


def mp4_without_audio() -> bytes:
    """A real MP4 with one video stream and no audio."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(4):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


@dataclass
class Case:
    name: str
    path: str
    status: int
    param: str | None  # the field the error names (None: the body as a whole)
    form: dict | None = None
    files: dict | None = None
    json: object = None
    content: bytes | None = None
    headers: dict = field(default_factory=dict)
    method: str = "POST"

    def send(self, client, path: str | None = None):
        kwargs = {"headers": self.headers}
        if self.json is not None:
            kwargs["json"] = self.json
        elif self.content is not None:
            kwargs["content"] = self.content
        else:
            kwargs.update(data=self.form, files=self.files)
        return client.request(self.method, path or self.path, **kwargs)


def audio(name: str, data: bytes, ctype: str = "audio/wav") -> dict:
    return {**FILES, "audio": (name, data, ctype)}


def without(form: dict, key: str) -> dict:
    return {k: v for k, v in form.items() if k != key}


def cases() -> list[Case]:
    b64 = base64.b64encode(IMAGE).decode()
    speech = "/v1/avatars/{avatar}/speech"
    return [
        # images: cost bombs and files that are not images
        Case("7990x7990 image by its header", "/v1/videos", 422, "input_reference", VIDEO,
             {"input_reference": ("p.png", png_header(7990, 7990), "image/png")}),
        Case("image header 1x1", "/v1/videos", 400, "input_reference", VIDEO,
             {"input_reference": ("p.png", png_header(1, 1), "image/png")}),
        Case("image file empty", "/v1/videos", 400, "input_reference", VIDEO, {"input_reference": ("p.png", b"", "image/png")}),
        Case("image that is text", "/v1/videos", 400, "input_reference", VIDEO,
             {"input_reference": ("p.png", b"not an image at all", "image/png")}),
        Case("image cut short", "/v1/videos", 400, "input_reference", VIDEO,
             {"input_reference": ("p.png", IMAGE[:80], "image/png")}),
        Case("image over the byte limit", "/v1/videos", 413, "input_reference", VIDEO,
             {"input_reference": ("p.png", IMAGE + b"\0" * 210_000, "image/png")}),
        Case("image missing", "/v1/videos", 422, "input_reference", VIDEO),
        Case("image sent as a text field", "/v1/videos", 422, "input_reference", {**VIDEO, "input_reference": "x"}),
        # audio: cost bombs, non-finite samples, files that are not audio
        Case("FLAC of 10 minutes with no declared length", "/v1/videos", 422, "audio", VIDEO,
             audio("a.flac", flac_without_duration(600), "audio/flac")),
        Case("NaN samples in a float WAV", "/v1/videos", 400, "audio", VIDEO, audio("a.wav", float_wav(np.full(8000, np.nan)))),
        Case("infinite samples", "/v1/videos", 400, "audio", VIDEO, audio("a.wav", float_wav(np.full(8000, np.inf)))),
        # finite but far past [-1, 1]: it passed every check once and broke the AAC encoder after the diffusion
        Case("samples of 1e12 in a float WAV", "/v1/videos", 400, "audio", VIDEO, audio("a.wav", float_wav(np.full(8000, 1e12)))),
        Case("audio shorter than a frame", "/v1/videos", 422, "audio", VIDEO, audio("a.wav", float_wav(np.zeros(100)))),
        Case("audio file empty", "/v1/videos", 400, "audio", VIDEO, audio("a.wav", b"")),
        Case("audio that is random bytes", "/v1/videos", 400, "audio", VIDEO,
             audio("a.wav", np.random.default_rng(0).bytes(4000))),
        Case("WAV header with no samples", "/v1/videos", 400, "audio", VIDEO, audio("a.wav", float_wav(np.zeros(0)))),
        Case("a video with no audio stream", "/v1/videos", 400, "audio", VIDEO,
             audio("a.mp4", mp4_without_audio(), "video/mp4")),
        Case("audio sent as text", "/v1/videos", 422, "audio", {**VIDEO, "audio": "x"}, FILES),
        Case("audio over the byte limit", "/v1/videos", 413, "audio", VIDEO, audio("a.wav", b"\0" * 1_000_001)),
        # numbers that parse to something odd
        Case("seed as a huge number", "/v1/videos", 422, "seed", {**VIDEO, "seed": "9" * 40}, FILES),
        Case("seed negative", "/v1/videos", 422, "seed", {**VIDEO, "seed": "-5"}, FILES),
        Case("frames as inf", "/v1/videos", 422, "num_frames", {**VIDEO, "num_frames": "inf"}, FILES),
        Case("frames not 4k+1", "/v1/videos", 422, "num_frames", {**VIDEO, "num_frames": "10"}, FILES),
        Case("frames as words", "/v1/videos", 422, "num_frames", {**VIDEO, "num_frames": "five"}, FILES),
        Case("seconds as nan", "/v1/videos", 422, "seconds", {**without(VIDEO, "num_frames"), "seconds": "nan"}, FILES),
        Case("guidance as nan", "/v1/videos", 422, "guidance_scale", {**VIDEO, "guidance_scale": "nan"}, FILES),
        Case("steps zero", "/v1/videos", 422, "num_inference_steps", {**VIDEO, "num_inference_steps": "0"}, FILES),
        Case("steps over the profile's limit", "/v1/videos", 422, "num_inference_steps",
             {**VIDEO, "num_inference_steps": "999"}, FILES),
        Case("size with a huge number", "/v1/videos", 422, "size", {**VIDEO, "size": "99999x99999"}, FILES),
        Case("size zero", "/v1/videos", 422, "size", {**VIDEO, "size": "0x0"}, FILES),
        Case("size not a multiple of 16", "/v1/videos", 422, "size", {**VIDEO, "size": "33x32"}, FILES),
        Case("size as words", "/v1/videos", 422, "size", {**VIDEO, "size": "big"}, FILES),
        Case("fps zero", "/v1/videos", 422, "fps", {**VIDEO, "fps": "0"}, FILES),
        # text fields
        Case("prompt missing", "/v1/videos", 422, "prompt", without(VIDEO, "prompt"), FILES),
        Case("prompt empty", "/v1/videos", 422, "prompt", {**VIDEO, "prompt": ""}, FILES),
        Case("prompt too long", "/v1/videos", 422, "prompt", {**VIDEO, "prompt": "a" * 30_000}, FILES),
        Case("unknown field", "/v1/videos", 422, "colour", {**VIDEO, "colour": "red"}, FILES),
        Case("unknown model", "/v1/videos", 422, "model", {**VIDEO, "model": "gpt-video"}, FILES),
        # completion webhooks: destinations inside the network, or not http(s) URLs at all (no DNS
        # needed: addresses, localhost, and what is refused before any lookup)
        *[Case(f"callback to {what}", "/v1/videos", 422, "callback_url", {**VIDEO, "callback_url": url}, FILES)
          for what, url in [("loopback", "http://127.0.0.1:8000/hook"), ("localhost", "http://localhost/hook"),
                            ("IPv6 loopback", "http://[::1]/"), ("IPv4-mapped loopback", "http://[::ffff:127.0.0.1]/"),
                            ("the cloud metadata address", "http://169.254.169.254/latest/meta-data/"),
                            ("a private address", "http://10.0.0.5/"), ("a multicast address", "http://224.0.0.1/"),
                            ("0.0.0.0", "http://0.0.0.0:8000/"), ("loopback as one number", "http://2130706433/"),
                            ("a file URL", "file:///etc/passwd"), ("a gopher URL", "gopher://example.com/"),
                            ("javascript", "javascript:alert(1)"), ("words", "not a url"),
                            ("a URL with credentials", "https://user:pw@example.com/"),
                            ("port 99999", "https://example.com:99999/"),
                            ("a URL of 3000 characters", "https://example.com/" + "a" * 3000)]],
        Case("callback_url on a sync request", "/v1/videos/sync", 422, "callback_url",
             {**VIDEO, "callback_url": "https://example.com/"}, FILES),
        Case("callback_url on an avatar", "/v1/avatars", 422, "callback_url",
             {**VIDEO, "callback_url": "https://example.com/"}, FILES),
        Case("JSON callback_url as a number", "/v1/videos", 422, "callback_url",
             json={"prompt": "x", "input_reference": b64, "callback_url": 5}),
        # per-request LoRAs: no path, no unknown name, no odd strength reaches a stage
        Case("LoRA named by a path", "/v1/videos", 422, "loras",
             {**VIDEO, "loras": '[{"name": "../../etc/passwd"}]'}, FILES),
        Case("LoRA that is not in the folders", "/v1/videos", 422, "loras", {**VIDEO, "loras": '[{"name": "nope"}]'}, FILES),
        Case("LoRA strength as NaN", "/v1/videos", 422, "loras", {**VIDEO, "loras": '[{"name": "a", "high": NaN}]'}, FILES),
        Case("LoRA strength of 1e9", "/v1/avatars", 422, "loras", {**VIDEO, "loras": '[{"name": "a", "low": 1e9}]'}, FILES),
        Case("LoRAs not JSON", "/v1/videos/sync", 422, "loras", {**VIDEO, "loras": "style:1.0"}, FILES),
        Case("a thousand LoRAs", "/v1/videos", 422, "loras",
             json={"prompt": "x", "input_reference": b64, "loras": [{"name": "a"}] * 1000}),
        # face boxes
        Case("face box with inf", "/v1/avatars", 422, "face_box", {**VIDEO, "face_box": "inf,0,10,10"}, FILES),
        Case("face box of one pixel", "/v1/avatars", 422, "face_box", {**VIDEO, "face_box": "3,3,4,4"}, FILES),
        Case("face box outside the clip", "/v1/avatars", 422, "face_box", {**VIDEO, "face_box": "0,0,64,64"}, FILES),
        Case("face box negative", "/v1/avatars", 422, "face_box", {**VIDEO, "face_box": "-4,0,20,20"}, FILES),
        Case("face box reversed", "/v1/avatars", 422, "face_box", {**VIDEO, "face_box": "20,20,4,4"}, FILES),
        Case("face box of three numbers", "/v1/avatars", 422, "face_box", {**VIDEO, "face_box": "1,2,3"}, FILES),
        Case("avatar with audio", "/v1/avatars", 422, "audio", VIDEO, audio("a.wav", wav_bytes(0.3))),
        # JSON bodies
        Case("JSON nested thousands deep", "/v1/videos", 400, None, content=b"[" * 200_000,
             headers={"content-type": "application/json"}),
        Case("JSON body over the limit", "/v1/videos", 413, None, content=b" " * 4_000_000,
             headers={"content-type": "application/json"}),
        Case("JSON that is not an object", "/v1/videos", 400, None, json=[1, 2, 3]),
        Case("JSON with a bad base64 image", "/v1/videos", 400, "input_reference",
             json={"prompt": "x", "input_reference": "@@@not base64@@@"}),
        Case("JSON image as a number", "/v1/videos", 422, "input_reference", json={"prompt": "x", "input_reference": 5}),
        Case("JSON prompt as a list", "/v1/videos", 422, "prompt", json={"prompt": ["x"], "input_reference": b64}),
        Case("malformed multipart (parses to no fields)", "/v1/videos", 422, "input_reference", content=b"--x\r\nnonsense",
             headers={"content-type": "multipart/form-data; boundary=x"}),
        # talk turns
        Case("speech start_index as a superscript", speech, 422, "start_index", {"start_index": "²"},
             {"audio": ("a.wav", wav_bytes(0.3), "audio/wav")}),
        Case("speech start_index negative", speech, 422, "start_index", {"start_index": "-1"},
             {"audio": ("a.wav", wav_bytes(0.3), "audio/wav")}),
        Case("speech start_index in hex", speech, 422, "start_index", {"start_index": "0x10"},
             {"audio": ("a.wav", wav_bytes(0.3), "audio/wav")}),
        Case("speech start_index of twelve digits", speech, 422, "start_index", {"start_index": "1" * 12},
             {"audio": ("a.wav", wav_bytes(0.3), "audio/wav")}),
        Case("speech with NaN audio", speech, 400, "audio", None,
             {"audio": ("a.wav", float_wav(np.full(8000, np.nan)), "audio/wav")}),
        Case("speech with samples of 1e12", speech, 400, "audio", None,
             {"audio": ("a.wav", float_wav(np.full(8000, 1e12)), "audio/wav")}),
        Case("speech FLAC of 10 minutes with no declared length", speech, 422, "audio",
             content=flac_without_duration(600), headers={"content-type": "audio/flac"}),
        Case("speech body over the limit", speech, 413, "audio", content=b"x" * 1_100_000,
             headers={"content-type": "audio/wav"}),
        Case("speech to an unknown avatar", "/v1/avatars/avatar_nope/speech", 404, "avatar_id", None,
             {"audio": ("a.wav", wav_bytes(0.3), "audio/wav")}),
        # reads
        Case("list with a negative limit", "/v1/videos?limit=-1", 422, "limit", method="GET"),
        Case("list with a limit in words", "/v1/videos?limit=many", 422, "limit", method="GET"),
        Case("unknown video", "/v1/videos/video_nope", 404, "video_id", method="GET"),
        Case("content of an unknown video", "/v1/videos/video_nope/content", 404, "video_id", method="GET"),
        Case("events of an unknown video", "/v1/videos/video_nope/events", 404, "video_id", method="GET"),
        Case("deleting an unknown video", "/v1/videos/video_nope", 404, "video_id", method="DELETE"),
    ]
