"""MP4 in and out with PyAV: H.264, yuv420p, in memory."""

from __future__ import annotations

import io

import numpy as np


def encode_mp4(frames: np.ndarray, fps: int = 16, crf: int = 18) -> bytes:
    """uint8 frames (F, H, W, 3) -> H.264 MP4 bytes (yuv420p; H and W must be even)."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (F, H, W, 3), got {frames.dtype} {frames.shape}")
    f, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even width and height, got {w}x{h}")
    import av  # imported where used: GPU benchmark hosts may lack PyAV

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def write_mp4(path, frames: np.ndarray, fps: int = 16) -> None:
    with open(path, "wb") as fh:
        fh.write(encode_mp4(frames, fps))


def decode_mp4(data: bytes) -> tuple[np.ndarray, float]:
    """MP4 bytes -> (uint8 frames (F, H, W, 3), frames per second)."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
    return np.stack(frames), fps
