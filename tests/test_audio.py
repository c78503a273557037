"""Audio decoding and MuseTalk's audio/video window arithmetic (deployments/audio.py).

Offline, no models: every audio file is made here with PyAV from a sine wave.
"""

from __future__ import annotations

import io
import math
from fractions import Fraction

import av
import numpy as np
import PIL.Image
import pytest

from deployments.audio import (AudioError, as_pcm, base_frame_index, decode_audio,
                               encoder_frames_for_samples, feature_padding, feature_window,
                               frames_for_samples, num_output_frames, retime_indices,
                               window_length)

SECONDS = 1.5
FREQ = 440.0


def make_audio(container: str, codec: str, rate: int, seconds: float = SECONDS,
               layout: str = "stereo") -> bytes:
    """A sine at 440 Hz, amplitude 0.5 on the left channel and 0.25 on the right (mono: 0.375)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = layout
        n = int(round(rate * seconds))
        wave = (0.5 * np.sin(2 * np.pi * FREQ * np.arange(n) / rate)).astype(np.float32)
        channels = np.stack([wave, 0.5 * wave]) if layout == "stereo" else wave[None]
        for i in range(0, n, 1000):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(channels[:, i:i + 1000]),
                                               format="fltp", layout=layout)
            frame.sample_rate, frame.pts = rate, i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def dominant_frequency(pcm: np.ndarray, rate: int = 16000) -> float:
    middle = pcm[len(pcm) // 4: 3 * len(pcm) // 4]
    spectrum = np.abs(np.fft.rfft(middle * np.hanning(len(middle))))
    return float(np.fft.rfftfreq(len(middle), 1 / rate)[np.argmax(spectrum)])


# ------------------------------------------------------------------ decoding

FORMATS = [
    # container, codec, rate, lossless
    ("wav", "pcm_s16le", 44100, True),
    ("flac", "flac", 48000, True),
    ("ogg", "libopus", 48000, False),
    ("mp3", "libmp3lame", 44100, False),
    ("ipod", "aac", 44100, False),  # .m4a
    ("ipod", "aac", 48000, False),
]


@pytest.mark.parametrize("container,codec,rate,lossless", FORMATS,
                         ids=[f"{c}-{k}-{r}" for c, k, r, _ in FORMATS])
def test_decode_any_container_to_16k_mono(container, codec, rate, lossless):
    pcm = decode_audio(make_audio(container, codec, rate))
    assert pcm.dtype == np.float32 and pcm.ndim == 1
    # Duration: exact (to the sample rounding) for PCM/FLAC; lossy codecs add encoder delay and
    # padding of at most a couple of codec frames.
    expected = SECONDS * 16000
    assert abs(pcm.shape[0] - expected) <= (2 if lossless else 0.05 * 16000), pcm.shape
    # Resampled to 16 kHz: the 440 Hz tone is still at 440 Hz when read at 16 kHz.
    assert abs(dominant_frequency(pcm) - FREQ) < 3
    # Channels averaged: (0.5 + 0.25) / 2.
    peak = np.abs(pcm[4000:-4000]).max()
    assert abs(peak - 0.375) < (0.01 if lossless else 0.1), peak


def test_decode_mono_input_keeps_amplitude():
    pcm = decode_audio(make_audio("wav", "pcm_s16le", 48000, layout="mono"))
    assert abs(np.abs(pcm[4000:-4000]).max() - 0.5) < 0.01


def _png() -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _wav_without_samples() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=16000)
        stream.layout = "mono"
        out.start_encoding()  # header only
    assert buf.getvalue()
    return buf.getvalue()


@pytest.mark.parametrize("data,max_seconds,message", [
    (b"", None, "empty"),
    (b"this is not audio at all " * 40, None, "not a readable audio file"),
    (_png(), None, "no audio stream"),
    (_wav_without_samples(), None, "no samples"),
    (make_audio("wav", "pcm_s16le", 16000, seconds=3.0), 2.0, "limit"),
    (make_audio("ogg", "libopus", 48000, seconds=3.0), 2.0, "limit"),
], ids=["empty", "text", "png-image", "no-samples", "too-long-wav", "too-long-opus"])
def test_bad_audio_raises_audio_error(data, max_seconds, message):
    with pytest.raises(AudioError, match=message):
        decode_audio(data, max_seconds=max_seconds)
    assert issubclass(AudioError, ValueError)


def test_audio_within_limit_is_accepted():
    pcm = decode_audio(make_audio("wav", "pcm_s16le", 16000, seconds=1.9), max_seconds=2.0)
    assert pcm.shape[0] == int(1.9 * 16000)


@pytest.mark.parametrize("pcm", [np.zeros((2, 100), np.float32), np.zeros(100, np.int16),
                                 np.zeros(0, np.float32), np.array([0.0, np.nan], np.float32)],
                         ids=["2d", "int", "empty", "nan"])
def test_bad_pcm_raises_audio_error(pcm):
    with pytest.raises(AudioError):
        as_pcm(pcm)


# ------------------------------------------------------------------ windows

DURATIONS = [0.04, 0.05, 0.5, 1.0, 1.23, 2.999, 7.99, 31.0]


@pytest.mark.parametrize("seconds", DURATIONS)
def test_frame_count_is_floor_of_seconds_times_25(seconds):
    expected = math.floor(Fraction(str(seconds)) * 25)
    assert num_output_frames(seconds) == expected
    assert frames_for_samples(int(round(seconds * 16000))) == expected


@pytest.mark.parametrize("seconds", DURATIONS)
def test_feature_windows_follow_musetalk(seconds):
    samples = int(round(seconds * 16000))
    n = frames_for_samples(samples)
    left, right = feature_padding()
    assert (left, right) == (4, 12)  # 2 * ceil(50/25) on the left, 3x that on the right
    assert window_length() == 10
    total = encoder_frames_for_samples(samples)
    assert total == math.floor(seconds * 50 + 1e-9)
    padded_length = left + total + right
    for i in range(n):
        start, end = feature_window(i)
        assert start == math.floor(i * 50 / 25) and end == start + 10
        # In time: encoder frame k covers [k/50, (k+1)/50); padded index p is encoder frame p - 4.
        assert (start - left) / 50 == pytest.approx(i / 25 - 0.08)
        assert (end - left) / 50 == pytest.approx(i / 25 + 0.12)
        assert 0 <= start and end <= padded_length
    # Both edges: the first window begins in the left padding, the last one still sees audio.
    assert feature_window(0) == (0, 10)
    last_start, last_end = feature_window(n - 1)
    assert last_start - left < total and last_end <= padded_length


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_base_frame_cycle_is_forward_then_backward(n):
    cycle = list(range(n)) + list(range(n))[::-1]  # MuseTalk: frames + frames[::-1]
    got = [base_frame_index(i, n) for i in range(5 * n + 3)]
    assert got == [cycle[i % (2 * n)] for i in range(5 * n + 3)]
    if n == 3:
        assert got[:9] == [0, 1, 2, 2, 1, 0, 0, 1, 2]  # the end frames repeat


def test_retime_16_to_25_fps_picks_nearest_frame():
    idx = retime_indices(9, 16, 25)
    assert len(idx) == math.ceil(9 * 25 / 16) == 15
    for j, k in enumerate(idx):
        # the nearest source frame to time j/25 (ties: the later frame), within the clip
        assert abs(k / 16 - j / 25) <= 1 / 32 + 1e-9 or k == 8
        assert all(abs(k / 16 - j / 25) <= abs(other / 16 - j / 25) + 1e-9 for other in range(9))
    assert list(retime_indices(5, 25, 25)) == [0, 1, 2, 3, 4]
    assert list(retime_indices(6, 50, 25)) == [0, 2, 4]
