"""Audio decoding (deployments/media/audio.py); MuseTalk's audio/video window arithmetic is
tested in tests/models/test_musetalk.py.

Offline, no models: every audio file is made here with PyAV from a sine wave.
"""

from __future__ import annotations

import io

import av
import numpy as np
import PIL.Image
import pytest

from deployments.common.errors import AudioError
from deployments.media.audio import as_pcm, decode_audio

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




