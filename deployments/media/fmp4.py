"""Fragmented MP4 written incrementally, so an HTTP response can stream video as the frames are
made: lip-synced talk turns (with their speech) and generated clips as the VAE decodes them
(`clip_writer`, no sound).

    FragmentedMP4Writer(pcm 16 kHz, fps) .write(frames (B, H, W, 3) uint8) -> bytes  (repeat)
                                         .close() -> bytes

H.264 (yuv420p, x264 `zerolatency`: no B-frames, no look-ahead, so each frame's packet comes out
at once) + AAC of the same speech, in an MP4 with `movflags=frag_keyframe+empty_moov+
default_base_moof(+delay_moov)`: the header (ftyp + an empty moov) comes first, then one moof +
mdat fragment per keyframe interval. The concatenation of everything `write` and `close` return is one valid
MP4 file; a player can start on the first fragment. Audio is muxed only up to the end of the
video written so far, so fragments interleave both tracks and the audio ends with the video.
"""

from __future__ import annotations

import av
import numpy as np

from deployments.media.audio import SAMPLE_RATE

# `delay_moov` holds the (empty) moov back until the first fragment is cut, so it can carry the
# audio track's edit list: AAC starts with 1024 samples of encoder priming, and without the edit
# list FFmpeg shifts every timestamp but the first video frame's by 21 ms to keep them
# non-negative. The header still leaves with the first fragment, before the last frame is made.
MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof+delay_moov"
VIDEO_CODECS = ("libx264", "h264_nvenc")


class _Sink:
    """A write-only file object for PyAV: collects bytes until `take` hands them out.

    It has no `seek`, so FFmpeg treats the output as a stream and never rewrites earlier bytes.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


class FragmentedMP4Writer:
    """Incremental fMP4 muxer for one talk turn.

    Args:
        audio: float32 (S,) mono PCM at `sample_rate`: the speech the frames are synced to.
        fps: video frame rate.
        keyframe_interval: frames between keyframes; a fragment is cut at each one.
        preset, crf, threads: x264's speed preset, quality and thread count (0: automatic).
        codec: "libx264" (CPU), or "h264_nvenc" (the GPU's video encoder; needs an NVIDIA GPU and
            an FFmpeg built with NVENC, as PyAV's wheels are; takes RGBA frames as they are).
        audio_rate: AAC sample rate (48 kHz: 1024-sample frames of 21 ms).
    """

    def __init__(self, audio: np.ndarray | None, fps: int = 25, sample_rate: int = SAMPLE_RATE,
                 keyframe_interval: int = 12, crf: int = 20, audio_rate: int = 48000,
                 audio_bitrate: int = 96000, preset: str = "veryfast", threads: int = 0,
                 codec: str = "libx264"):
        if audio is not None:  # None: a clip without sound (the decoder's)
            audio = np.asarray(audio, dtype=np.float32)
            if audio.ndim != 1:
                raise ValueError(f"audio must be mono (S,), got {audio.shape}")
        self.audio, self.sample_rate, self.fps = audio, sample_rate, fps
        self.keyframe_interval, self.crf, self.preset = keyframe_interval, crf, preset
        self.threads = threads  # x264 threads; 0: x264 decides from the cores it sees
        if codec not in VIDEO_CODECS:
            raise ValueError(f"video codec {codec!r}: expected one of {', '.join(VIDEO_CODECS)}")
        self.codec = codec
        self.audio_rate, self.audio_bitrate = audio_rate, audio_bitrate
        self.frames_written = 0
        self._audio_pos = 0  # input samples already given to the AAC encoder
        self._sink = _Sink()
        self._container = None
        self._video = self._audio_stream = self._resampler = None
        self._closed = False

    # ------------------------------------------------------------------ setup

    def _open(self, height: int, width: int, channels: int) -> None:
        if height % 2 or width % 2:
            raise ValueError(f"yuv420p needs even width and height, got {width}x{height}")
        self._container = av.open(self._sink, mode="w", format="mp4",
                                  options={"movflags": MOVFLAGS})
        video = self._container.add_stream(self.codec, rate=self.fps)
        video.width, video.height = width, height
        keyframes = {"g": str(self.keyframe_interval), "keyint_min": str(self.keyframe_interval)}
        if self.codec == "h264_nvenc":
            # NVENC converts RGBA to 4:2:0 itself; low-latency tuning, no B-frames, constant QP.
            video.pix_fmt = "rgba" if channels == 4 else "yuv420p"
            video.options = {"preset": "p2", "tune": "ull", "zerolatency": "1", "delay": "0", "bf": "0",
                             "rc": "constqp", "qp": str(self.crf + 3), **keyframes}
        else:
            video.pix_fmt = "yuv420p"
            # No scene-cut keyframes: x264 would otherwise add some (keyint_min is capped at
            # keyint/2 + 1), and fragments, cut at keyframes, would come at unpredictable frames;
            # a talking head has no scene cuts worth a keyframe.
            video.options = {"crf": str(self.crf), "preset": self.preset, "tune": "zerolatency",
                             "threads": str(self.threads), "sc_threshold": "0", **keyframes}
        self._video, self._size = video, (height, width)
        if self.audio is not None:
            audio = self._container.add_stream("aac", rate=self.audio_rate)
            audio.layout = "mono"
            audio.bit_rate = self.audio_bitrate
            self._audio_stream = audio
            self._resampler = av.AudioResampler(format="fltp", layout="mono", rate=self.audio_rate)

    # ------------------------------------------------------------------ writing

    def _mux_audio_until(self, end_sample: int) -> None:
        if self.audio is None:
            return
        end_sample = min(end_sample, self.audio.shape[0])
        if end_sample <= self._audio_pos:
            return
        frame = av.AudioFrame.from_ndarray(self.audio[None, self._audio_pos:end_sample],
                                           format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._audio_pos
        self._audio_pos = end_sample
        for resampled in self._resampler.resample(frame):
            for packet in self._audio_stream.encode(resampled):
                self._container.mux(packet)

    def write(self, frames: np.ndarray) -> bytes:
        """uint8 frames (B, H, W, 3) RGB or (B, H, W, 4) RGBA, or one (H, W, C) -> the MP4 bytes
        completed so far (may be empty until a fragment is done)."""
        if self._closed:
            raise RuntimeError("writer is closed")
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] not in (3, 4):
            raise ValueError(f"expected uint8 frames (B, H, W, 3 or 4), got {frames.dtype} {frames.shape}")
        if self._container is None:
            self._open(frames.shape[1], frames.shape[2], frames.shape[3])
        elif frames.shape[1:3] != self._size:
            raise ValueError(f"frame size changed from {self._size} to {frames.shape[1:3]}")
        for frame in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame),
                                            format="rgba" if frame.shape[-1] == 4 else "rgb24")
            vf.pts = self.frames_written
            self.frames_written += 1
            for packet in self._video.encode(vf):
                self._container.mux(packet)
            # Audio up to the end of this frame, so both tracks advance together.
            self._mux_audio_until(self.frames_written * self.sample_rate // self.fps)
        return self._sink.take()

    def close(self) -> bytes:
        """Flush both encoders and finish the file -> the remaining bytes. The audio stops at the
        end of the last video frame (< 1/fps of speech past it is dropped)."""
        if self._closed:
            return b""
        self._closed = True
        if self._container is None:
            raise ValueError("no frames were written")
        self._mux_audio_until(self.frames_written * self.sample_rate // self.fps)
        if self._resampler is not None:
            for resampled in self._resampler.resample(None):
                for packet in self._audio_stream.encode(resampled):
                    self._container.mux(packet)
        for stream in (self._audio_stream, self._video):
            if stream is None:
                continue
            for packet in stream.encode(None):
                self._container.mux(packet)
        self._container.close()
        return self._sink.take()

    def __enter__(self) -> "FragmentedMP4Writer":
        return self

    def __exit__(self, *exc) -> None:
        if not self._closed and self._container is not None:
            try:
                self._container.close()
            finally:
                self._closed = True


# A generated clip (no sound) as the decoder streams it: the quality of the plain MP4 it replaced
# (crf 18), a keyframe -- so a fragment -- each second of video.
CLIP_OPTIONS = {"crf": 18, "preset": "veryfast"}


def clip_writer(fps: int) -> FragmentedMP4Writer:
    """The fMP4 writer of a generated clip without sound, at `fps`."""
    return FragmentedMP4Writer(None, fps=fps, keyframe_interval=fps, **CLIP_OPTIONS)


def encode_clip(frames: np.ndarray, fps: int) -> bytes:
    """A whole clip's uint8 frames (F, H, W, 3) -> its fMP4, the bytes the decoder streams."""
    writer = clip_writer(fps)
    with writer:
        return writer.write(frames) + writer.close()


def stream_fmp4(chunks, audio: np.ndarray | None, fps: int = 25, **writer_options):
    """Frame chunks (an iterable of (B, H, W, 3) uint8) + their audio -> an iterator of fMP4
    bytes, each yielded as soon as the writer has it (empty pieces are skipped)."""
    writer = FragmentedMP4Writer(audio, fps=fps, **writer_options)
    with writer:
        for chunk in chunks:
            data = writer.write(chunk)
            if data:
                yield data
        data = writer.close()
        if data:
            yield data
