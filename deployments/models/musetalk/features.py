"""The whisper features of one utterance, as MuseTalk's talk turn needs them (the frame and
window arithmetic they follow is in timing.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from deployments.media.audio import SAMPLE_RATE
from deployments.models.musetalk.timing import (
    WHISPER_PIECE_SECONDS,
    encoder_frames_for_samples,
    feature_padding,
    feature_window,
    window_length,
)

HIDDEN_STATES = 5  # embeddings + 4 encoder layers of whisper-tiny
AUDIO_DIM = 384  # whisper-tiny width = the UNet's cross_attention_dim


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


