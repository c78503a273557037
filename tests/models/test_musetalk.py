"""MuseTalk's model-side code without the stage: audio windows and features, retiming and the
forward-backward cycle, blending and masks, face boxes from landmarks, the avatar store, and the
full-size architecture. Formulas follow MuseTalk v1.5's published code (cited per test)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import WhisperConfig, WhisperModel

from deployments.media.audio import frames_for_samples
from deployments.models.musetalk.avatar import (
    AvatarStore,
    CenterBox,
    PreparedAvatar,
    blend_face,
    box_mask,
    lower_face_mask,
    prepare_avatar,
)
from deployments.models.musetalk.components import FULL
from deployments.models.musetalk.features import AudioFeatures, positional_encoding
from deployments.models.musetalk.timing import (
    base_frame_index,
    encoder_frames_for_samples,
    feature_padding,
    feature_window,
    num_output_frames,
    retime_indices,
    window_length,
)
from helpers import synthetic_landmarks

H, W = 64, 96
BOX = (24, 8, 72, 56)  # (x1, y1, x2, y2) inside a 96x64 frame
DURATIONS = [0.04, 0.05, 0.5, 1.0, 1.23, 2.999, 7.99, 31.0]


def ramp_encoder(pcm: np.ndarray) -> torch.Tensor:
    """Stand-in for whisper: encoder frame j of a 30 s piece holds the time of its first sample
    (the piece is a ramp of timestamps), or -1 past the piece's audio (whisper's padding)."""
    out = torch.full((1500, 5, 384), -1.0)
    j = np.arange(1500)
    real = j * 320 < pcm.shape[0]
    out[torch.from_numpy(real)] = torch.from_numpy(pcm[j[real] * 320]).float()[:, None, None]
    return out



def test_windows_are_slices_of_the_padded_features_across_30s_pieces():
    seconds = 61.3  # three whisper pieces: 30 + 30 + 1.3 s
    pcm = (np.arange(int(seconds * 16000)) / 16000).astype(np.float64)
    feats = AudioFeatures(ramp_encoder, pcm)
    # Lazy: the first frames need only the first piece.
    feats.windows([0, 1, 2])
    assert feats.pieces_encoded == 1
    padded = feats.padded()
    left, right = feature_padding()
    total = int(seconds * 50)
    assert padded.shape == (left + total + right, 5, 384)
    # No seams: the real features are the timestamps 0, 0.02, ... straight across both boundaries,
    # and no piece's padding (-1) survives.
    times = padded[left:left + total, 0, 0].double().numpy()
    np.testing.assert_allclose(times, np.arange(total) / 50, atol=1e-6)
    assert (padded[:left] == 0).all() and (padded[left + total:] == 0).all()
    n = int(seconds * 25)
    fresh = AudioFeatures(ramp_encoder, pcm)
    for first in range(0, n, 97):
        ix = list(range(first, min(n, first + 97)))
        got = fresh.windows(ix)
        for row, i in enumerate(ix):
            start, end = feature_window(i)
            assert torch.equal(got[row], padded[start:end].reshape(50, 384)), i
    # Frame 750 (t = 30 s) straddles the first boundary: 80 ms before to 120 ms after.
    start, end = feature_window(750)
    np.testing.assert_allclose(padded[start:end, 0, 0].double().numpy(),
                               29.92 + np.arange(10) / 50, atol=1e-6)



def test_window_layout_is_time_major_then_hidden_state():
    def encoder(pcm):
        out = torch.zeros(1500, 5, 384)
        out += torch.arange(1500)[:, None, None] * 10.0 + torch.arange(5)[None, :, None]
        return out

    row = AudioFeatures(encoder, np.zeros(16000))
    got = row.windows([3])[0]  # frame 3: encoder frames 2..11
    assert got.shape == (50, 384)
    expected = [(t * 10.0 + s) for t in range(2, 12) for s in range(5)]
    assert got[:, 0].tolist() == expected



def test_positional_encoding_matches_musetalk():
    pe = positional_encoding(50)
    assert pe.shape == (50, 384)
    p = 7
    for k in (0, 1, 100, 191):
        freq = math.exp(-(2 * k) * math.log(10000.0) / 384)
        assert pe[p, 2 * k].item() == pytest.approx(math.sin(p * freq), abs=1e-6)
        assert pe[p, 2 * k + 1].item() == pytest.approx(math.cos(p * freq), abs=1e-6)



def test_blend_keeps_pixels_outside_the_mask_and_uses_the_crop_inside():
    g = np.random.default_rng(1)
    frame = g.integers(0, 256, (H, W, 3), dtype=np.uint8)
    crop = g.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    mask = lower_face_mask(0.5, 0.08)
    out = blend_face(frame, crop, BOX, mask)
    x1, y1, x2, y2 = BOX
    outside = np.ones((H, W), bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(out[outside], frame[outside])
    alpha = np.zeros((H, W), np.float32)
    alpha[y1:y2, x1:x2] = box_mask(mask, BOX)
    zero, one = alpha == 0, alpha == 1
    assert np.array_equal(out[zero], frame[zero])
    face = np.asarray(PIL.Image.fromarray(crop).resize((x2 - x1, y2 - y1), PIL.Image.Resampling.BILINEAR))
    placed = np.zeros_like(frame)
    placed[y1:y2, x1:x2] = face
    assert one.sum() > 100 and (zero & ~outside).sum() > 100  # both regions are real
    assert np.array_equal(out[one], placed[one])
    # The upper half of the face box is never touched (the mask is the lower face).
    assert np.array_equal(out[y1:y1 + (y2 - y1) // 2], frame[y1:y1 + (y2 - y1) // 2])



def test_default_mask_is_lower_face_and_zero_at_the_border():
    mask = lower_face_mask(0.5, 0.08)
    assert mask.shape == (256, 256) and mask.dtype == np.uint8
    assert (mask[:128] == 0).all()
    assert (mask[-1] == 0).all() and (mask[:, 0] == 0).all() and (mask[:, -1] == 0).all()
    assert mask[200, 128] == 255
    # feathered: values in between on the way from the centre to the edge
    assert len(np.unique(mask[200, :128])) > 5



def test_default_detector_and_extra_margin():
    frames = np.zeros((2, 100, 200, 3), np.uint8)
    store = AvatarStore(None)
    calls = []

    def encode(crops):
        calls.append(len(crops))
        return np.zeros((len(crops), 8, 32, 32), np.float32)

    detector = CenterBox((0.25, 0.2, 0.75, 0.8))
    prepared = prepare_avatar(frames, 25, encode, store, {}, detector, extra_margin=10)
    assert prepared.boxes.tolist() == [[50, 20, 150, 90]] * 2  # 80 + 10 px below the chin
    prepare_avatar(frames, 25, encode, store, {}, detector, extra_margin=10)
    assert calls == [2]  # the in-memory store answered the second time
    with pytest.raises(ValueError, match="empty"):
        prepare_avatar(frames, 25, encode, store, {}, detector, face_box=(10, 10, 10, 50))



def test_full_size_architecture_is_musetalk_v15():
    """The `full` random arch is MuseTalk-size (built on the meta device here: no memory)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**FULL["unet"])
        vae = AutoencoderKL(**FULL["vae"])
        whisper = WhisperModel(WhisperConfig(**FULL["whisper"])).encoder
    count = lambda m: sum(p.numel() for p in m.parameters())
    # SD 1.x's UNet (860 M in Stable Diffusion v1's model card) with MuseTalk's 384-wide
    # cross-attention and 8 input channels: 850 M.
    assert 0.80e9 < count(unet) < 0.90e9
    assert unet.config.in_channels == 8 and unet.config.cross_attention_dim == 384
    assert 80e6 < count(vae) < 86e6  # the SD VAE: 83.7 M
    assert len(whisper.layers) == 4 and whisper.config.d_model == 384
    assert vae.config.scaling_factor == 0.18215



def test_memory_only_store_never_drops_a_ready_avatar(tmp_path):
    from deployments.models.musetalk.avatar import AvatarStore

    def fake(i):
        return PreparedAvatar(prepared_id=f"a{i}", frames=np.zeros((1, 2, 2, 3), np.uint8),
                              source_index=np.zeros(1, np.int64), boxes=np.zeros((1, 4), np.int64),
                              crops=np.zeros((1, 2, 2, 3), np.uint8), latents=np.zeros((1, 8, 1, 1), np.float32),
                              masks=np.zeros((1, 2, 2), np.uint8))

    memory_only, on_disk = AvatarStore(None, max_in_memory=2), AvatarStore(tmp_path, max_in_memory=2)
    for i in range(4):
        memory_only.put(fake(i))
        on_disk.put(fake(i))
    assert all(memory_only.get(f"a{i}") is not None for i in range(4))
    assert len(on_disk._memory) == 2 and on_disk.get("a0") is not None  # evicted, reloaded from disk



def test_box_from_landmarks_follows_musetalks_rule():
    from deployments.models.musetalk.avatar import box_from_landmarks

    # Chin 30 px below the nose bridge -> the box starts 30 px above it.
    assert box_from_landmarks(synthetic_landmarks()) == (30, 10, 70, 70)
    # bbox_shift moves the centre line: +5 down -> top at 45 - 25 = 20.
    assert box_from_landmarks(synthetic_landmarks(), bbox_shift=5) == (30, 20, 70, 70)
    # A face partly left of the frame gives no usable box: the detector's box is used.
    assert box_from_landmarks(synthetic_landmarks(cx=10), fallback=(0, 5, 40, 60)) == (0, 5, 40, 60)
    with pytest.raises(ValueError):
        box_from_landmarks(synthetic_landmarks(cx=10))
    with pytest.raises(ValueError):
        box_from_landmarks(np.zeros((5, 2)))


@pytest.mark.parametrize("seconds", DURATIONS)
def test_frame_count_is_floor_of_seconds_times_25(seconds):
    expected = math.floor(Fraction(str(seconds)) * 25)
    assert num_output_frames(seconds) == expected
    assert frames_for_samples(int(round(seconds * 16000)), 25) == expected



@pytest.mark.parametrize("seconds", DURATIONS)
def test_feature_windows_follow_musetalk(seconds):
    samples = int(round(seconds * 16000))
    n = frames_for_samples(samples, 25)
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



def test_paste_back_on_a_device_matches_pil_blending():
    """The GPU paste-back (torch, run here on the CPU) gives PIL's blend within a few levels, and
    leaves every pixel outside the face box exactly as it was."""
    from deployments.models.musetalk.paste import PasteBack

    rng = np.random.default_rng(0)
    n = 3
    frames = rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)
    boxes = np.array([BOX, (10, 4, 70, 60), (30, 20, 62, 44)], dtype=np.int64)  # shrink and grow
    masks = np.stack([lower_face_mask()] * n)
    avatar = PreparedAvatar(prepared_id="a", frames=frames, source_index=np.arange(n), boxes=boxes,
                            crops=np.zeros((n, 256, 256, 3), np.uint8), latents=np.zeros((n, 8, 32, 32), np.float32),
                            masks=masks)
    crops = rng.integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)
    sources = [2, 0, 1, 2]
    pasted = PasteBack(avatar, "cpu")(sources, torch.from_numpy(crops[sources])).numpy()
    rgba = PasteBack(avatar, "cpu", channels=4)(sources, torch.from_numpy(crops[sources])).numpy()
    for row, s in enumerate(sources):
        expected = blend_face(frames[s], crops[s], boxes[s], masks[s])
        diff = np.abs(pasted[row].astype(int) - expected.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.1, (diff.max(), diff.mean())
        x1, y1, x2, y2 = boxes[s]
        outside = np.ones((H, W), bool)
        outside[y1:y2, x1:x2] = False
        np.testing.assert_array_equal(pasted[row][outside], frames[s][outside])
        np.testing.assert_array_equal(rgba[row, ..., :3], pasted[row])
        assert (rgba[row, ..., 3] == 255).all()
