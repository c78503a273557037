"""The streaming fragmented-MP4 writer (deployments/media/fmp4.py): fragments come out before the
last frame, and audio and video tracks end together."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from deployments.media.fmp4 import FragmentedMP4Writer, stream_fmp4
from helpers import decode_mp4_tracks


def test_fmp4_writer_streams_fragments_before_the_last_frame():
    fps, n = 25, 50
    audio = (0.2 * np.sin(2 * np.pi * 300 * np.arange(int(2.03 * 16000)) / 16000)).astype(np.float32)
    frames = np.zeros((n, 48, 64, 3), np.uint8)
    for i in range(n):
        frames[i] = i * 5  # brightness encodes the frame number
    writer = FragmentedMP4Writer(audio, fps=fps, keyframe_interval=10)
    log: list[tuple[int, bytes]] = []  # (frames given so far, bytes returned)
    for first in range(0, n, 5):
        log.append((first + 5, writer.write(frames[first:first + 5])))
    log.append((n, writer.close()))
    data = b"".join(piece for _, piece in log)
    first_fragment = next(given for given, piece in log if b"moof" in piece)
    assert first_fragment < n  # a playable fragment left before the last frame went in
    assert data[4:8] == b"ftyp" and b"moov" in data[:2000]
    assert data.count(b"moof") >= 4  # one per keyframe interval
    video, got_fps, audio_end = decode_mp4_tracks(data)
    assert video.shape == (n, 48, 64, 3) and got_fps == fps
    np.testing.assert_allclose(video.reshape(n, -1).mean(1), np.arange(n) * 5, atol=3)
    with av.open(io.BytesIO(data)) as container:
        vs = container.streams.video[0]
        pts = [p.pts for p in container.demux(vs) if p.pts is not None]
        video_end = float(max(pts) * vs.time_base) + 1 / fps
    assert abs(audio_end - video_end) < 1 / fps
    assert abs(video_end - n / fps) < 1 / fps



def test_stream_fmp4_yields_only_non_empty_pieces_and_rejects_odd_sizes():
    audio = np.zeros(16000, np.float32)
    chunks = (np.full((5, 32, 32, 3), 9 * k, np.uint8) for k in range(5))
    pieces = list(stream_fmp4(chunks, audio, fps=25, keyframe_interval=5))
    assert pieces and all(pieces)
    video, _, _ = decode_mp4_tracks(b"".join(pieces))
    assert video.shape[0] == 25
    with pytest.raises(ValueError, match="even"):
        FragmentedMP4Writer(audio).write(np.zeros((1, 31, 32, 3), np.uint8))



def test_rgba_frames_are_encoded_like_rgb():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (13, 32, 48, 3), dtype=np.uint8)
    rgba = np.concatenate([frames, np.full_like(frames[..., :1], 255)], axis=-1)
    audio = np.zeros(16000, np.float32)
    plain = b"".join(stream_fmp4([frames], audio, fps=25))
    alpha = b"".join(stream_fmp4([rgba], audio, fps=25))
    a, b = decode_mp4_tracks(plain)[0], decode_mp4_tracks(alpha)[0]
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="video codec"):
        stream_fmp4([frames], audio, codec="mpeg2").__next__()


def test_keyframes_and_fragments_come_every_interval_whatever_the_content():
    """Noise is all scene cuts: x264 would add keyframes (and so fragments) at unpredictable
    frames. With scene-cut detection off, every keyframe is at a multiple of the interval, so a
    turn's first fragment holds exactly `keyframe_interval` frames and leaves when the first
    batch is long enough (tests/stages/test_lipsync.py)."""
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (36, 48, 64, 3), dtype=np.uint8)
    audio = np.zeros(int(1.5 * 16000), np.float32)
    writer = FragmentedMP4Writer(audio, fps=25, keyframe_interval=12)
    first = writer.write(frames[:14])
    data = first + writer.write(frames[14:]) + writer.close()
    assert b"moof" in first
    with av.open(io.BytesIO(data)) as container:
        vs = container.streams.video[0]
        keyframes = sorted(round(float(p.pts * vs.time_base) * 25) for p in container.demux(vs)
                           if p.pts is not None and p.is_keyframe)
    assert keyframes == [0, 12, 24], keyframes  # frame numbers
    with av.open(io.BytesIO(first)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 12
