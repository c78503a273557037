"""How speech maps onto MuseTalk's video frames: whisper's encoder frames per video frame, the
audio window each frame looks at, the lookahead a live session waits for, and how a base clip
is retimed and cycled. Plain arithmetic, no torch: the ingress imports it.

Whisper's encoder gives 50 frames per second (10 ms mel hop, stride-2 conv). Video frame i at
25 fps looks at 10 encoder frames starting at floor(i * 50 / 25) in a copy of the encoder output
padded with 2 * ceil(50 / 25) = 4 zero frames on the left and 3x that (12) on the right, so its
window spans 80 ms before to 120 ms after the start of the frame (MuseTalk v1.5
`AudioProcessor.get_whisper_chunk`). A base clip is played forward then backward, retimed to
25 fps by nearest frame.
"""

from __future__ import annotations

import math

import numpy as np

from deployments.media.audio import SAMPLE_RATE

AUDIO_FPS = 50  # whisper encoder frames per second
VIDEO_FPS = 25  # MuseTalk's output frame rate
# MuseTalk's `audio_padding_length_left/right`: in video frames' worth of encoder frames.
PAD_LEFT_UNITS = 2
PAD_RIGHT_UNITS = 2
WHISPER_PIECE_SECONDS = 30  # whisper's fixed input window


def num_output_frames(seconds: float, fps: int = VIDEO_FPS) -> int:
    """Video frames for `seconds` of audio: floor(seconds * fps).

    (MuseTalk's script floors the seconds first, dropping up to a second of speech; here every
    whole frame the audio covers is made.)
    """
    return int(math.floor(seconds * fps + 1e-9))


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


def lookahead_seconds(fps: int = VIDEO_FPS, audio_fps: int = AUDIO_FPS) -> float:
    """How far past the start of a frame its audio window reaches: 120 ms at 25 fps. A live
    session renders a frame once audio up to there has arrived (or the utterance has ended)."""
    return (window_length(fps, audio_fps) - feature_padding(fps, audio_fps)[0]) / audio_fps


def frames_ready(num_samples: int, ended: bool, fps: int = VIDEO_FPS, sample_rate: int = SAMPLE_RATE) -> int:
    """Leading frames of an utterance that can be rendered once its first `num_samples` have
    arrived: every frame the audio covers (floor(seconds * fps)) when the utterance has ended,
    else those whose window (`lookahead_seconds` past the frame's start) lies within the audio."""
    total = (num_samples * fps) // sample_rate
    if ended:
        return total
    have = encoder_frames_for_samples(num_samples, sample_rate)
    reach = window_length(fps) - feature_padding(fps)[0]  # a window's end past its start, unpadded
    ready = 0
    while ready < total and (ready * AUDIO_FPS) // fps + reach <= have:
        ready += 1
    return ready


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
