"""The S3FD face detector (deployments/models/faces/s3fd.py): checkpoint layout, save/load, box
decoding, NMS, preprocessing and the detection pipeline. Offline: random weights, no checkpoint download.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deployments.models.faces.s3fd import (
    S3FD,
    decode_boxes,
    detect_faces,
    largest_face_box,
    load_s3fd,
    make_priors,
    nms,
    preprocess,
)

# Keys and shapes of the published checkpoint s3fd-619a316812.pth, in its order. Source: the
# module that loads it strictly, face_alignment/detection/sfd/net_s3fd.py (1adrianb/face-alignment;
# same file in TMElyralab/MuseTalk musetalk/utils/face_detection/detection/sfd/net_s3fd.py).
_CONVS = [
    ("conv1_1", 64, 3, 3), ("conv1_2", 64, 64, 3),
    ("conv2_1", 128, 64, 3), ("conv2_2", 128, 128, 3),
    ("conv3_1", 256, 128, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3),
    ("conv4_1", 512, 256, 3), ("conv4_2", 512, 512, 3), ("conv4_3", 512, 512, 3),
    ("conv5_1", 512, 512, 3), ("conv5_2", 512, 512, 3), ("conv5_3", 512, 512, 3),
    ("fc6", 1024, 512, 3), ("fc7", 1024, 1024, 1),
    ("conv6_1", 256, 1024, 1), ("conv6_2", 512, 256, 3),
    ("conv7_1", 128, 512, 1), ("conv7_2", 256, 128, 3),
]
_NORMS = [("conv3_3_norm", 256), ("conv4_3_norm", 512), ("conv5_3_norm", 512)]
_HEADS = [
    ("conv3_3_norm_mbox_conf", 4, 256, 3), ("conv3_3_norm_mbox_loc", 4, 256, 3),
    ("conv4_3_norm_mbox_conf", 2, 512, 3), ("conv4_3_norm_mbox_loc", 4, 512, 3),
    ("conv5_3_norm_mbox_conf", 2, 512, 3), ("conv5_3_norm_mbox_loc", 4, 512, 3),
    ("fc7_mbox_conf", 2, 1024, 3), ("fc7_mbox_loc", 4, 1024, 3),
    ("conv6_2_mbox_conf", 2, 512, 3), ("conv6_2_mbox_loc", 4, 512, 3),
    ("conv7_2_mbox_conf", 2, 256, 3), ("conv7_2_mbox_loc", 4, 256, 3),
]
PUBLISHED_KEYS = []
for _name, _out, _in, _k in _CONVS:
    PUBLISHED_KEYS += [(f"{_name}.weight", (_out, _in, _k, _k)), (f"{_name}.bias", (_out,))]
for _name, _c in _NORMS:
    PUBLISHED_KEYS.append((f"{_name}.weight", (_c,)))
for _name, _out, _in, _k in _HEADS:
    PUBLISHED_KEYS += [(f"{_name}.weight", (_out, _in, _k, _k)), (f"{_name}.bias", (_out,))]


@pytest.fixture(scope="module")
def model() -> S3FD:
    return load_s3fd(None, seed=0)


def test_state_dict_matches_published_checkpoint(model):
    assert len(PUBLISHED_KEYS) == 38 + 3 + 24
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == PUBLISHED_KEYS
    # A dict with exactly these keys/shapes loads strictly (what the real checkpoint needs).
    fake = {k: torch.zeros(s) for k, s in PUBLISHED_KEYS}
    S3FD().load_state_dict(fake, strict=True)
    # L2Norm scales 10 / 8 / 5 at init.
    assert torch.all(model.conv3_3_norm.weight == 10)
    assert torch.all(model.conv4_3_norm.weight == 8)
    assert torch.all(model.conv5_3_norm.weight == 5)


def test_forward_shapes_and_background_maxout(model):
    raw = {}
    handle = model.conv3_3_norm_mbox_conf.register_forward_hook(lambda m, i, o: raw.setdefault("c", o.clone()))
    try:
        with torch.no_grad():
            out = model(torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1)) * 50)
    finally:
        handle.remove()
    assert len(out) == 12
    # Strides 4, 8, 16, 32 (fc6: 3x3, padding 3 -> +4), 64, 128.
    expected_hw = [(16, 24), (8, 12), (4, 6), (6, 7), (3, 4), (2, 2)]
    for level, hw in enumerate(expected_hw):
        assert tuple(out[2 * level].shape) == (1, 2, *hw)
        assert tuple(out[2 * level + 1].shape) == (1, 4, *hw)
    c = raw["c"]
    assert c.shape[1] == 4
    assert torch.equal(out[0][:, 0], c[:, :3].amax(dim=1))
    assert torch.equal(out[0][:, 1], c[:, 3])


def test_save_load_round_trip(model, tmp_path):
    path = tmp_path / "s3fd.pth"
    torch.save(model.state_dict(), path)
    loaded = load_s3fd(path)
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(2)) * 50
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for ta, tb in zip(a, b):
        assert torch.equal(ta, tb)
    # Seeded random init: same seed -> same weights, other seed -> other weights.
    w = model.conv1_1.weight
    assert torch.equal(load_s3fd(None, seed=0).conv1_1.weight, w)
    assert not torch.equal(load_s3fd(None, seed=1).conv1_1.weight, w)


def test_decode_one_prior():
    priors = torch.tensor([[100.0, 50.0, 64.0, 64.0]])
    loc = torch.tensor([[0.5, -0.25, math.log(2.0) / 0.2, 0.0]])
    # cx = 100 + 0.5*0.1*64 = 103.2; cy = 50 - 0.25*0.1*64 = 48.4; w = 64*2 = 128; h = 64
    box = decode_boxes(loc, priors)
    assert torch.allclose(box, torch.tensor([[39.2, 16.4, 167.2, 80.4]]), atol=1e-4)


def test_prior_layout():
    p = make_priors([(2, 3), (1, 1)], strides=(4, 8))
    assert p.shape == (7, 4)
    # level 0 row-major: (y=0, x=0..2) then (y=1, x=0..2); centre stride/2 + idx*stride, side 16
    assert torch.equal(p[0], torch.tensor([2.0, 2.0, 16.0, 16.0]))
    assert torch.equal(p[2], torch.tensor([10.0, 2.0, 16.0, 16.0]))
    assert torch.equal(p[3], torch.tensor([2.0, 6.0, 16.0, 16.0]))
    assert torch.equal(p[6], torch.tensor([4.0, 4.0, 32.0, 32.0]))


def test_nms_keeps_best_of_overlap_and_disjoint_boxes():
    boxes = torch.tensor([[1.0, 1.0, 11.0, 11.0],     # overlaps the next one, lower score
                          [0.0, 0.0, 10.0, 10.0],     # best
                          [50.0, 50.0, 60.0, 60.0],   # disjoint
                          [0.0, 20.0, 10.0, 30.0]])   # disjoint
    scores = torch.tensor([0.8, 0.9, 0.7, 0.75])
    assert nms(boxes, scores, 0.3).tolist() == [1, 3, 2]
    # With a looser threshold than their IoU (100/142 ~ 0.70) both overlapping boxes stay.
    assert nms(boxes, scores, 0.75).tolist() == [1, 0, 3, 2]
    assert nms(torch.zeros((0, 4)), torch.zeros((0,))).numel() == 0


def test_preprocess_bgr_mean():
    frame = np.zeros((2, 3, 3), dtype=np.uint8)
    frame[1, 2] = (200, 100, 50)  # R, G, B
    x = preprocess(frame)
    assert x.shape == (1, 3, 2, 3) and x.dtype == torch.float32
    assert x[0, :, 1, 2].tolist() == [50 - 104, 100 - 117, 200 - 123]
    assert x[0, :, 0, 0].tolist() == [-104, -117, -123]


def test_detect_faces_random_model(model):
    frame = np.random.RandomState(0).randint(0, 256, size=(48, 80, 3), dtype=np.uint8)
    dets = detect_faces(model, frame, score_threshold=0.0)
    assert isinstance(dets, np.ndarray) and dets.dtype == np.float32
    assert dets.ndim == 2 and dets.shape[1] == 5 and dets.shape[0] > 0
    assert np.all(dets[:, [0, 2]] >= 0) and np.all(dets[:, [0, 2]] <= 80)
    assert np.all(dets[:, [1, 3]] >= 0) and np.all(dets[:, [1, 3]] <= 48)
    assert np.all((dets[:, 4] >= 0) & (dets[:, 4] <= 1))
    assert np.all(np.diff(dets[:, 4]) <= 0)  # highest score first
    # Default threshold: still a well-formed (K, 5) float32 array, scores above 0.5.
    d2 = detect_faces(model, frame)
    assert d2.dtype == np.float32 and d2.ndim == 2 and d2.shape[1] == 5
    assert np.all(d2[:, 4] > 0.5)


def test_largest_face_box_with_patched_forward(monkeypatch):
    model = load_s3fd(None, seed=0)
    H, W = 64, 96
    shapes = [(16, 24), (8, 12), (4, 6), (6, 7), (3, 4), (2, 2)]
    seen = {}

    def fake_forward(x):
        seen["x"] = x
        out = []
        for fh, fw in shapes:
            conf = torch.zeros(1, 2, fh, fw)
            conf[:, 0] = 10.0  # background everywhere
            out += [conf, torch.zeros(1, 4, fh, fw)]
        # Strong face at level 1 (stride 8), cell (y=2, x=3): prior centre (28, 20), side 32.
        out[2][0, :, 2, 3] = torch.tensor([0.0, 10.0])
        out[3][0, :, 2, 3] = torch.tensor([0.0, 0.0, 0.0, 0.0])
        # Weaker face at level 0 (stride 4), cell (y=10, x=20): prior centre (82, 42), side 16;
        # dx = 6.25 moves the centre by 6.25 * 0.1 * 16 = +10 px, past the right edge.
        out[0][0, :, 10, 20] = torch.tensor([0.0, 2.0])
        out[1][0, :, 10, 20] = torch.tensor([6.25, 0.0, 0.0, 0.0])
        return out

    monkeypatch.setattr(model, "forward", fake_forward)
    frame = np.full((H, W, 3), 128, dtype=np.uint8)
    box = largest_face_box(model, frame)
    assert box == pytest.approx((12.0, 4.0, 44.0, 36.0), abs=1e-4)
    assert seen["x"].shape == (1, 3, H, W)

    dets = detect_faces(model, frame)
    assert dets.shape == (2, 5) and dets.dtype == np.float32
    s_strong, s_weak = 1 / (1 + math.exp(-10.0)), 1 / (1 + math.exp(-2.0))
    # Second box: centre (92, 42), side 16 -> x 84..100 clipped to the frame width 96; y 34..50.
    expected = np.array([[12, 4, 44, 36, s_strong], [84, 34, 96, 50, s_weak]], dtype=np.float32)
    np.testing.assert_allclose(dets, expected, atol=1e-4)
    # Above the weak score only the strong face remains.
    assert detect_faces(model, frame, score_threshold=0.9).shape == (1, 5)


def test_largest_face_box_none_when_nothing_detected(monkeypatch):
    model = load_s3fd(None, seed=0)

    def fake_forward(x):
        out = []
        for fh, fw in [(4, 4), (2, 2), (1, 1), (4, 4), (2, 2), (1, 1)]:
            conf = torch.zeros(1, 2, fh, fw)
            conf[:, 0] = 5.0
            out += [conf, torch.zeros(1, 4, fh, fw)]
        return out

    monkeypatch.setattr(model, "forward", fake_forward)
    frame = np.zeros((16, 16, 3), dtype=np.uint8)
    assert largest_face_box(model, frame) is None
    assert detect_faces(model, frame).shape == (0, 5)
