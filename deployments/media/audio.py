"""Speech audio in: any common container decoded to 16 kHz mono float PCM, and the one rule
that admits speech (`admit_speech` -> a Speech payload).

    bytes (wav, mp3, ogg/opus, flac, m4a, ...) -> PyAV decode -> resample -> float32 (S,) at 16 kHz
"""

from __future__ import annotations

import io
import math

import av
import numpy as np

from deployments.common.errors import AudioError, AudioLengthError
from deployments.common.payloads import Speech

SAMPLE_RATE = 16000  # the lip-sync stage's input rate (whisper's)


# ------------------------------------------------------------------ decoding


def decode_audio(data: bytes, max_seconds: float | None = None,
                 sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Audio file bytes in any container/codec FFmpeg reads -> float32 mono (S,) at `sample_rate`.

    Channels are averaged after resampling. Raises AudioError for bytes that hold no
    decodable audio stream, for audio without samples, and (before decoding all of it, where the
    container states its duration) for audio longer than `max_seconds`.
    """
    if not data:
        raise AudioError("audio is empty (0 bytes)")
    try:
        container = av.open(io.BytesIO(bytes(data)), mode="r")
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise AudioError(f"not a readable audio file: {exc}") from None
    with container:
        if not container.streams.audio:
            raise AudioError("the file has no audio stream")
        stream = container.streams.audio[0]
        if max_seconds is not None and stream.duration is not None and stream.time_base is not None:
            declared = float(stream.duration * stream.time_base)
            if declared > max_seconds + 0.5:
                raise AudioLengthError(f"audio is {declared:.1f} s long; the limit is {max_seconds:g} s")
        # Resample keeping the channels, then average them (librosa's `to_mono`, which MuseTalk
        # used): FFmpeg's own stereo-to-mono matrix scales by 1/sqrt(2) instead of 1/2.
        resampler = av.AudioResampler(format="flt", rate=sample_rate)
        limit = None if max_seconds is None else int(math.floor(max_seconds * sample_rate))
        pieces: list[np.ndarray] = []
        total = 0

        def take(frames) -> None:
            nonlocal total
            for out in frames:
                channels = out.layout.nb_channels
                piece = out.to_ndarray().reshape(-1, channels)  # packed: (samples, channels)
                piece = piece[:, 0] if channels == 1 else piece.mean(axis=1)
                pieces.append(piece)
                total += piece.shape[0]
            if limit is not None and total > limit:
                raise AudioLengthError(f"audio is longer than the limit of {max_seconds:g} s")

        try:
            for frame in container.decode(stream):
                frame.pts = None  # let the resampler count samples; containers' pts may jump
                take(resampler.resample(frame))
            take(resampler.resample(None))
        except av.error.FFmpegError as exc:
            raise AudioError(f"audio could not be decoded: {exc}") from None
    if total == 0:
        raise AudioError("audio has no samples")
    return np.concatenate(pieces).astype(np.float32, copy=False)


# The loudest sample admitted. Float PCM lives in [-1, 1]; a little past it is clipping, far past it
# is not audio (a float WAV of 1e12 samples passed every other check and then broke the AAC
# encoder, after the whole diffusion had run).
MAX_SAMPLE_MAGNITUDE = 16.0


def as_pcm(audio: np.ndarray) -> np.ndarray:
    """Validate raw PCM given directly: float (S,) at 16 kHz mono, finite samples of sane
    magnitude -> float32 (S,)."""
    pcm = np.asarray(audio)
    if pcm.ndim != 1 or not np.issubdtype(pcm.dtype, np.floating):
        raise AudioError(f"PCM audio must be float (S,) at {SAMPLE_RATE} Hz mono, got "
                         f"{pcm.dtype} {pcm.shape}")
    if pcm.shape[0] == 0:
        raise AudioError("audio has no samples")
    if not np.isfinite(pcm).all():
        raise AudioError("audio contains NaN or infinite samples")
    peak = float(np.abs(pcm).max())
    if peak > MAX_SAMPLE_MAGNITUDE:
        raise AudioError(f"audio samples reach {peak:.3g}; float audio lies within [-1, 1] "
                         f"(at most {MAX_SAMPLE_MAGNITUDE:g} is admitted)")
    return pcm.astype(np.float32, copy=False)


def frames_for_samples(num_samples: int, fps: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Whole video frames at `fps` that `num_samples` of audio cover: floor(seconds * fps), in
    exact integer arithmetic."""
    return (num_samples * fps) // sample_rate


def admit_speech(audio: np.ndarray | bytes, max_seconds: float, fps: int) -> Speech:
    """The one admission rule for speech: file bytes (any container, decoded here and stopped
    past the limit) or float PCM (S,) at 16 kHz mono, finite, at most `max_seconds` long and at
    least one video frame at `fps` -> Speech, or AudioError. Applied where audio enters: the
    ingress before any stage runs, the lip-sync stage for callers that bring raw audio."""
    if isinstance(audio, (bytes, bytearray, memoryview)):
        audio = decode_audio(bytes(audio), max_seconds)
    pcm = as_pcm(audio)
    if pcm.shape[0] > max_seconds * SAMPLE_RATE:
        raise AudioLengthError(f"audio is {pcm.shape[0] / SAMPLE_RATE:.1f} s long; the limit is {max_seconds:g} s")
    if frames_for_samples(pcm.shape[0], fps) == 0:
        raise AudioLengthError(f"audio is shorter than one video frame (1/{fps} s)")
    return Speech(pcm)


# ------------------------------------------------------------------ streamed PCM

PCM_FORMATS = {"pcm_s16le": np.dtype("<i2"), "pcm_f32le": np.dtype("<f4")}
STREAM_RATES = (16000, 24000, 48000)


class PcmStream:
    """Raw mono PCM arriving in chunks of any size (a live session's audio) -> float32 at 16 kHz,
    converted and resampled continuously (libswresample keeps its state between chunks, so the
    result does not depend on where the chunks were cut). A chunk that splits a sample keeps the
    partial bytes for the next one."""

    def __init__(self, fmt: str, rate: int):
        if fmt not in PCM_FORMATS:
            raise AudioError(f"format {fmt!r}: expected one of {', '.join(PCM_FORMATS)}")
        if rate not in STREAM_RATES:
            raise AudioError(f"sample_rate {rate}: expected one of {', '.join(map(str, STREAM_RATES))}")
        self.dtype, self.rate = PCM_FORMATS[fmt], rate
        self._partial = b""
        self._resampler = None if rate == SAMPLE_RATE else av.AudioResampler(format="flt", layout="mono",
                                                                            rate=SAMPLE_RATE)
        self._pts = 0

    def push(self, data: bytes) -> np.ndarray:
        """Bytes as they came -> the float32 16 kHz samples they complete (maybe none yet)."""
        data = self._partial + bytes(data)
        whole = len(data) - len(data) % self.dtype.itemsize
        self._partial = data[whole:]
        pcm = np.frombuffer(data[:whole], dtype=self.dtype)
        pcm = pcm.astype(np.float32) / 32768.0 if self.dtype.kind == "i" else pcm.astype(np.float32)
        if self._resampler is None or not len(pcm):
            return pcm if self._resampler is None else np.zeros(0, np.float32)
        frame = av.AudioFrame.from_ndarray(pcm[None], format="flt", layout="mono")
        frame.sample_rate, frame.pts = self.rate, self._pts
        self._pts += len(pcm)
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)
