"""MP4 in and out with PyAV: H.264, yuv420p, in memory."""

from __future__ import annotations

import io

import numpy as np


class Mp4Writer:
    """H.264 MP4 (yuv420p, x264 `veryfast`) written chunk by chunk in memory, so that frames can
    be encoded while later ones are still being made (the decoder feeds it as the VAE decodes).
    `write` takes uint8 frames (F, H, W, 3); `finish` flushes and returns the file's bytes."""

    def __init__(self, fps: int = 16, crf: int = 18):
        import av  # imported where used: GPU benchmark hosts may lack PyAV

        self._av, self.fps, self.crf = av, fps, crf
        self._buf = io.BytesIO()
        self._container = av.open(self._buf, mode="w", format="mp4")
        self._stream = None

    def write(self, frames: np.ndarray) -> None:
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames (F, H, W, 3), got {frames.dtype} {frames.shape}")
        _, h, w, _ = frames.shape
        if self._stream is None:
            if h % 2 or w % 2:
                raise ValueError(f"yuv420p needs even width and height, got {w}x{h}")
            self._stream = self._container.add_stream("libx264", rate=self.fps)
            self._stream.width, self._stream.height, self._stream.pix_fmt = w, h, "yuv420p"
            self._stream.options = {"crf": str(self.crf), "preset": "veryfast"}
        elif (w, h) != (self._stream.width, self._stream.height):
            raise ValueError(f"frame size changed from {self._stream.width}x{self._stream.height} to {w}x{h}")
        for frame in frames:
            image = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in self._stream.encode(image):
                self._container.mux(packet)

    def finish(self) -> bytes:
        if self._stream is None:
            raise ValueError("no frames were written")
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        return self._buf.getvalue()

    def close(self) -> None:
        """Give up (on an error): release the encoder without producing a file."""
        self._container.close()


def encode_mp4(frames: np.ndarray, fps: int = 16, crf: int = 18) -> bytes:
    """uint8 frames (F, H, W, 3) -> H.264 MP4 bytes (yuv420p; H and W must be even)."""
    writer = Mp4Writer(fps, crf)
    try:
        writer.write(frames)
        return writer.finish()
    except BaseException:
        writer.close()
        raise


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
