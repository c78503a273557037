"""MuseTalk's audio side: how speech maps onto video frames, and the whisper features of one
utterance as the talk turn needs them.

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
import torch

from deployments.media.audio import SAMPLE_RATE

AUDIO_FPS = 50  # whisper encoder frames per second
VIDEO_FPS = 25  # MuseTalk's output frame rate
# MuseTalk's `audio_padding_length_left/right`: in video frames' worth of encoder frames.
PAD_LEFT_UNITS = 2
PAD_RIGHT_UNITS = 2
WHISPER_PIECE_SECONDS = 30  # whisper's fixed input window
HIDDEN_STATES = 5  # embeddings + 4 encoder layers of whisper-tiny
AUDIO_DIM = 384  # whisper-tiny width = the UNet's cross_attention_dim



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


def positional_encoding(length: int, d_model: int = AUDIO_DIM) -> torch.Tensor:
    """MuseTalk's fixed sinusoidal encoding added to the audio features: (length, d_model) fp32,
    sin on even channels, cos on odd, wavelengths 2*pi .. 10000*2*pi."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


# ------------------------------------------------------------------ audio features


class AudioFeatures:
    """Whisper features of one utterance, encoded one 30 s piece at a time as windows need them.

    Pieces are concatenated before windowing, so a window that straddles a 30 s boundary sees
    both pieces (no seam), and the first frames of a long utterance need only its first piece.
    `padded()` is MuseTalk's padded copy (zeros left and right); `windows(ix)` slices it.
    """

    def __init__(self, encode_piece, pcm: np.ndarray, fps: int = 25,
                 sample_rate: int = SAMPLE_RATE):
        self.encode_piece, self.fps = encode_piece, fps
        self.total = encoder_frames_for_samples(pcm.shape[0], sample_rate)
        self.left, self.right = feature_padding(fps)
        step = WHISPER_PIECE_SECONDS * sample_rate
        self.pieces = [pcm[i:i + step] for i in range(0, pcm.shape[0], step)]
        self.pieces_encoded = 0
        self._features: torch.Tensor | None = None  # (T_so_far, 5, 384)

    def _ensure(self, needed: int) -> torch.Tensor:
        """Encode pieces until the first `needed` encoder frames (or all there are) exist."""
        needed = min(needed, self.total)
        while (self._features is None or self._features.shape[0] < needed) \
                and self.pieces_encoded < len(self.pieces):
            piece = self.encode_piece(self.pieces[self.pieces_encoded])  # (1500, 5, 384)
            self.pieces_encoded += 1
            self._features = piece if self._features is None else torch.cat([self._features, piece])
        return self._features[:self.total]

    def padded(self) -> torch.Tensor:
        """(left + T + right, 5, 384): all features with MuseTalk's zero padding."""
        feats = self._ensure(self.total)
        return torch.cat([feats.new_zeros(self.left, *feats.shape[1:]), feats,
                          feats.new_zeros(self.right, *feats.shape[1:])])

    def windows(self, indices) -> torch.Tensor:
        """Video frame indices -> (B, 10 * 5, 384): each frame's window, time-major then hidden
        state (MuseTalk's 'b c h w -> b (c h) w')."""
        length = window_length(self.fps)
        last_end = max(feature_window(i, self.fps)[1] for i in indices) - self.left
        feats = self._ensure(last_end)
        out = feats.new_zeros(len(indices), length, *feats.shape[1:])
        for row, i in enumerate(indices):
            start, end = feature_window(i, self.fps)
            lo, hi = start - self.left, end - self.left  # unpadded encoder frames
            a, b = max(lo, 0), min(hi, feats.shape[0])
            if b > a:
                out[row, a - lo:b - lo] = feats[a:b]
        return out.reshape(len(indices), length * feats.shape[1], feats.shape[2])


