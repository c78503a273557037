import numpy as np
import pytest

from deployments.media.video import decode_mp4, encode_mp4, write_mp4


def test_mp4_roundtrip_keeps_frames_size_and_rate(tmp_path):
    frames = np.zeros((9, 32, 48, 3), dtype=np.uint8)
    frames[:, :, :24] = 200  # left half bright; H.264 is lossy, so compare coarsely
    data = encode_mp4(frames, fps=16)
    assert data[4:8] == b"ftyp"
    decoded, fps = decode_mp4(data)
    assert decoded.shape == (9, 32, 48, 3) and fps == 16
    assert abs(float(decoded[:, :, :20].mean()) - 200) < 8 and float(decoded[:, :, 28:].mean()) < 8
    write_mp4(tmp_path / "a.mp4", frames, fps=25)
    assert decode_mp4((tmp_path / "a.mp4").read_bytes())[1] == 25


@pytest.mark.parametrize("frames", [np.zeros((2, 15, 16, 3), np.uint8), np.zeros((2, 16, 16, 3), np.float32),
                                    np.zeros((16, 16, 3), np.uint8)])
def test_bad_frames_are_refused(frames):
    with pytest.raises(ValueError):
        encode_mp4(frames)
