"""Speech audio for lip-sync: decoding any common container to 16 kHz mono, and MuseTalk's
audio-to-video window arithmetic as pure functions.

    bytes (wav, mp3, ogg/opus, flac, m4a, ...) -> PyAV decode -> resample -> float32 (S,) at 16 kHz

Whisper's encoder gives 50 frames per second (10 ms mel hop, stride-2 conv). Video frame i at
25 fps looks at 10 encoder frames starting at floor(i * 50 / 25) in a copy of the encoder output
padded with 2 * ceil(50 / 25) = 4 zero frames on the left and 3x that (12) on the right, so its
window spans 80 ms before to 120 ms after the start of the frame (MuseTalk v1.5
`AudioProcessor.get_whisper_chunk`).
"""

from __future__ import annotations

import io
import math

import av
import numpy as np

SAMPLE_RATE = 16000  # whisper's input rate
AUDIO_FPS = 50  # whisper encoder frames per second
VIDEO_FPS = 25  # MuseTalk's output frame rate
# MuseTalk's `audio_padding_length_left/right`: in video frames' worth of encoder frames.
PAD_LEFT_UNITS = 2
PAD_RIGHT_UNITS = 2


class AudioError(ValueError):
    """Input that is not usable speech audio: not audio at all, empty, or too long."""


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
                raise AudioError(f"audio is {declared:.1f} s long; the limit is {max_seconds:g} s")
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
                raise AudioError(f"audio is longer than the limit of {max_seconds:g} s")

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


def as_pcm(audio: np.ndarray) -> np.ndarray:
    """Validate raw PCM given directly: float (S,) at 16 kHz mono -> float32 (S,)."""
    pcm = np.asarray(audio)
    if pcm.ndim != 1 or not np.issubdtype(pcm.dtype, np.floating):
        raise AudioError(f"PCM audio must be float (S,) at {SAMPLE_RATE} Hz mono, got "
                         f"{pcm.dtype} {pcm.shape}")
    if pcm.shape[0] == 0:
        raise AudioError("audio has no samples")
    if not np.isfinite(pcm).all():
        raise AudioError("audio contains NaN or infinite samples")
    return pcm.astype(np.float32, copy=False)


# ------------------------------------------------------------------ window arithmetic


def num_output_frames(seconds: float, fps: int = VIDEO_FPS) -> int:
    """Video frames for `seconds` of audio: floor(seconds * fps).

    (MuseTalk's script floors the seconds first, dropping up to a second of speech; here every
    whole frame the audio covers is made.)
    """
    return int(math.floor(seconds * fps + 1e-9))


def frames_for_samples(num_samples: int, sample_rate: int = SAMPLE_RATE, fps: int = VIDEO_FPS) -> int:
    """num_output_frames for a sample count, in exact integer arithmetic."""
    return (num_samples * fps) // sample_rate


def encoder_frames_for_samples(num_samples: int, sample_rate: int = SAMPLE_RATE,
                               audio_fps: int = AUDIO_FPS) -> int:
    """Whisper encoder frames that hold real audio: floor(seconds * 50); the rest of a 30 s
    encoder window is padding and is dropped."""
    return (num_samples * audio_fps) // sample_rate


def feature_padding(fps: int = VIDEO_FPS, audio_fps: int = AUDIO_FPS) -> tuple[int, int]:
    """(left, right) zero frames added around the encoder output: 2 * ceil(audio_fps / fps) on
    the left, 3x that on the right (the extra right padding keeps the last window in range)."""
    per_frame = math.ceil(audio_fps / fps)
    return PAD_LEFT_UNITS * per_frame, 3 * PAD_RIGHT_UNITS * per_frame


def window_length(fps: int = VIDEO_FPS, audio_fps: int = AUDIO_FPS) -> int:
    """Encoder frames per video frame: 2 * (left + right + 1) units = 10 at 25 fps."""
    return math.ceil(audio_fps / fps) * (PAD_LEFT_UNITS + PAD_RIGHT_UNITS + 1)


def feature_window(i: int, fps: int = VIDEO_FPS, audio_fps: int = AUDIO_FPS) -> tuple[int, int]:
    """Video frame i -> (start, end) of its encoder frames, in padded coordinates.

    start = floor(i * audio_fps / fps); end = start + window_length. Padded index p is encoder
    frame p - left (feature_padding), so frame i sees 80 ms before to 120 ms after i / fps.
    """
    if i < 0:
        raise ValueError(f"frame index must be >= 0, got {i}")
    start = (i * audio_fps) // fps
    return start, start + window_length(fps, audio_fps)


def base_frame_index(i: int, n: int) -> int:
    """Output frame i -> index into an n-frame base clip played forward then backward.

    The cycle is frames + frames[::-1] (MuseTalk): 0, 1, ..., n-1, n-1, ..., 1, 0, 0, 1, ...;
    the end frames repeat, so each turn-around shows one frame twice.
    """
    if n <= 0:
        raise ValueError(f"base clip must have at least one frame, got {n}")
    k = i % (2 * n)
    return k if k < n else 2 * n - 1 - k


def retime_indices(num_frames: int, src_fps: float, dst_fps: float = VIDEO_FPS) -> np.ndarray:
    """Nearest-frame retiming: for each frame of the clip at `dst_fps`, the index of the source
    frame shown at that time. The result covers the clip's duration: ceil(n * dst / src) frames.
    """
    if num_frames <= 0 or src_fps <= 0 or dst_fps <= 0:
        raise ValueError(f"bad retime request: {num_frames} frames, {src_fps} -> {dst_fps} fps")
    count = max(1, math.ceil(num_frames * dst_fps / src_fps - 1e-9))
    # nearest source frame to time j / dst: round(j * src / dst), halves rounded up.
    idx = np.floor(np.arange(count) * (src_fps / dst_fps) + 0.5 + 1e-9).astype(np.int64)
    return np.minimum(idx, num_frames - 1)
