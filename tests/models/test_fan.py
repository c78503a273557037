"""The 2D-FAN 68-point landmark network (deployments/models/faces/fan.py). Offline, CPU, random
weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deployments.models.faces.fan import (
    FAN,
    box_center_scale,
    crop_fan_input,
    decode_heatmaps,
    landmarks_68,
    load_fan,
    to_crop,
    to_image,
)

# The published checkpoint's layout: `2DFAN4-11f355bf06.pth.tar` (adrianbulat.com/downloads/
# python-fan), a flat state dict that face_alignment 1.x loads with `FAN(4).load_state_dict(...)`
# (no 'module.' prefix, saved before torch 0.4.1, so no `num_batches_tracked`). Layout from
# 1adrianb/face-alignment face_alignment/models.py: FAN = conv1 (7x7, bias), bn1, conv2 =
# ConvBlock(64, 128), conv3 = ConvBlock(128, 128), conv4 = ConvBlock(128, 256); per stack i:
# m{i} = HourGlass(depth 4) with b1_L, b2_L, b3_L for L = 4..1 and b2_plus_1; top_m_{i} =
# ConvBlock(256, 256); conv_last{i} 1x1 256->256; bn_end{i}; l{i} 1x1 256->68; bl{i} 1x1 256->256
# and al{i} 1x1 68->256 for all stacks but the last. ConvBlock(in, out) = bn1(in), conv1 3x3
# in->out/2, bn2, conv2 out/2->out/4, bn3, conv3 out/4->out/4 (no bias), and when in != out
# downsample = Sequential(BatchNorm2d(in), ReLU, Conv2d 1x1 in->out, no bias).
BN = ("weight", "bias", "running_mean", "running_var")


def _bn(name, c):
    return {f"{name}.{p}": (c,) for p in BN}


def _conv_block(name, cin, cout):
    h, q = cout // 2, cout // 4
    keys = {**_bn(f"{name}.bn1", cin), f"{name}.conv1.weight": (h, cin, 3, 3),
            **_bn(f"{name}.bn2", h), f"{name}.conv2.weight": (q, h, 3, 3),
            **_bn(f"{name}.bn3", q), f"{name}.conv3.weight": (q, q, 3, 3)}
    if cin != cout:
        keys.update(_bn(f"{name}.downsample.0", cin))
        keys[f"{name}.downsample.2.weight"] = (cout, cin, 1, 1)
    return keys


def _conv1x1(name, cin, cout):
    return {f"{name}.weight": (cout, cin, 1, 1), f"{name}.bias": (cout,)}


def published_layout(stacks: int = 4) -> dict:
    keys = {"conv1.weight": (64, 3, 7, 7), "conv1.bias": (64,), **_bn("bn1", 64),
            **_conv_block("conv2", 64, 128), **_conv_block("conv3", 128, 128),
            **_conv_block("conv4", 128, 256)}
    for i in range(stacks):
        for level in (4, 3, 2, 1):
            for b in ("b1", "b2", "b3"):
                keys.update(_conv_block(f"m{i}.{b}_{level}", 256, 256))
        keys.update(_conv_block(f"m{i}.b2_plus_1", 256, 256))
        keys.update(_conv_block(f"top_m_{i}", 256, 256))
        keys.update(_conv1x1(f"conv_last{i}", 256, 256))
        keys.update(_bn(f"bn_end{i}", 256))
        keys.update(_conv1x1(f"l{i}", 256, 68))
        if i < stacks - 1:
            keys.update(_conv1x1(f"bl{i}", 256, 256))
            keys.update(_conv1x1(f"al{i}", 68, 256))
    return keys


def _weights_only(sd):
    return {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def test_state_dict_matches_published_2dfan4_layout():
    expected = published_layout(4)
    got = _weights_only(FAN(4).state_dict())
    assert len(expected) == 945
    assert sorted(got) == sorted(expected)
    assert got == expected
    # a few spelled-out names / shapes, independent of the helpers above
    for name, shape in [("conv1.weight", (64, 3, 7, 7)), ("conv2.downsample.2.weight", (128, 64, 1, 1)),
                        ("conv2.conv2.weight", (32, 64, 3, 3)), ("m0.b1_4.conv1.weight", (128, 256, 3, 3)),
                        ("m3.b2_plus_1.conv3.weight", (64, 64, 3, 3)), ("top_m_0.bn1.running_var", (256,)),
                        ("conv_last0.weight", (256, 256, 1, 1)), ("bn_end3.bias", (256,)),
                        ("l3.weight", (68, 256, 1, 1)), ("bl2.weight", (256, 256, 1, 1)),
                        ("al0.weight", (256, 68, 1, 1))]:
        assert got[name] == shape, name
    assert "bl3.weight" not in got and "al3.weight" not in got and "m0.b2_plus_2.bn1.weight" not in got


def test_published_style_checkpoint_loads_strictly(tmp_path):
    gen = torch.Generator().manual_seed(1)
    layout = published_layout(4)
    state = {k: torch.randn(s, generator=gen) for k, s in layout.items()}
    state = {k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in state.items()}
    torch.save(state, tmp_path / "2DFAN4.pth.tar")  # flat, no num_batches_tracked, as published
    model = load_fan(tmp_path / "2DFAN4.pth.tar")
    assert model.num_modules == 4 and not model.training
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in state.items())
    # {'state_dict': ...} with DataParallel 'module.' prefixes is accepted too
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    assert torch.equal(load_fan(tmp_path / "wrapped.pth").state_dict()["m2.b3_1.conv1.weight"],
                       state["m2.b3_1.conv1.weight"])
    # strict: a missing key is an error, not a silent random init
    del state["m1.b2_plus_1.conv2.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match="b2_plus_1.conv2.weight"):
        load_fan(tmp_path / "broken.pth")


def test_save_load_round_trip_and_forward_shapes(tmp_path):
    model = load_fan(None, seed=3, num_modules=1)
    torch.save(model.state_dict(), tmp_path / "fan1.pth")
    again = load_fan(tmp_path / "fan1.pth")
    assert again.num_modules == 1
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x), again(x)
    assert a.shape == (1, 68, 64, 64)
    assert torch.isfinite(a).all() and a.std() > 0
    assert torch.equal(a, b)
    assert not torch.equal(load_fan(None, seed=4, num_modules=1).conv1.weight, model.conv1.weight)
    # the 4-stack model returns every stack's heatmaps on request, the last one by default
    four = load_fan(None, num_modules=4)
    with torch.no_grad():
        outs = four(x[:, :, :64, :64], all_stacks=True)
        last = four(x[:, :, :64, :64])
    assert [tuple(o.shape) for o in outs] == [(1, 68, 16, 16)] * 4
    assert torch.equal(outs[-1], last)


def test_decode_single_peak_with_quarter_pixel_shift():
    hm = np.zeros((2, 64, 64), dtype=np.float32)
    # landmark 0: peak at x=10, y=20; right neighbour higher than left, upper higher than lower
    hm[0, 20, 10] = 1.0
    hm[0, 20, 11] = 0.6
    hm[0, 20, 9] = 0.2
    hm[0, 19, 10] = 0.5
    hm[0, 21, 10] = 0.1
    # landmark 1: peak on the border (x=0) -> no shift on either axis; y=30 neighbours unequal
    hm[1, 30, 0] = 1.0
    hm[1, 31, 0] = 0.5
    pts = decode_heatmaps(hm)
    assert pts.shape == (2, 2)
    np.testing.assert_allclose(pts[0], [10 + 0.5 + 0.25, 20 + 0.5 - 0.25])
    np.testing.assert_allclose(pts[1], [0 + 0.5, 30 + 0.5])
    # equal neighbours -> no shift; batched input keeps its leading dims
    hm2 = np.zeros((1, 1, 64, 64), dtype=np.float32)
    hm2[0, 0, 40, 7] = 1.0
    hm2[0, 0, 40, 6] = hm2[0, 0, 40, 8] = 0.3
    np.testing.assert_allclose(decode_heatmaps(hm2), [[[7.5, 40.5]]])


def test_box_center_scale_and_heatmap_to_image_transform():
    box = (40.0, 60.0, 140.0, 155.0)  # w 100, h 95 -> scale 1, crop side 200 px
    center, scale = box_center_scale(box)
    np.testing.assert_allclose(center, [90.0, 107.5 - 0.12 * 95.0])
    assert scale == pytest.approx(1.0)
    # heatmap cell (x0, y0) decodes to (x0 + 0.5, y0 + 0.5); each cell is 200 / 64 image pixels
    np.testing.assert_allclose(to_image([32.0, 32.0], center, scale, 64), center)
    np.testing.assert_allclose(to_image([0.0, 0.0], center, scale, 64), center - 100.0)
    np.testing.assert_allclose(to_image([12.5, 40.5], center, scale, 64),
                               [90.0 - 100.0 + 12.5 * 3.125, center[1] - 100.0 + 40.5 * 3.125])
    p = np.array([[71.3, 120.9], [5.0, 200.0]])
    np.testing.assert_allclose(to_image(to_crop(p, center, scale, 64), center, scale, 64), p)


class _SpotFinder(nn.Module):
    """Stand-in model: 68 copies of the 4x4-average-pooled brightness of the crop, so the decoded
    landmarks sit where a bright spot of the input image lands."""

    def forward(self, x):
        hm = F.avg_pool2d(x.mean(1, keepdim=True), 4)
        return [hm.repeat(1, 68, 1, 1)]


def test_crop_and_transform_round_trip_through_pipeline():
    frame = np.full((240, 320, 3), 10, dtype=np.uint8)
    spot = (133, 87)  # (x, y) in image pixels
    frame[spot[1] - 1:spot[1] + 2, spot[0] - 1:spot[0] + 2] = 255
    box = (100, 50, 180, 165)  # w 80, h 115 -> scale 1, crop side 200 px, 3.125 px per cell
    center, scale = box_center_scale(box)
    crop = crop_fan_input(frame, center, scale)
    assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
    cy, cx = np.unravel_index(crop[..., 0].argmax(), crop.shape[:2])
    expected = to_crop(spot, center, scale, 256)
    assert abs(cx - expected[0]) <= 2.0 and abs(cy - expected[1]) <= 2.0
    pts = landmarks_68(_SpotFinder(), frame, box)
    assert pts.shape == (68, 2) and pts.dtype == np.float32
    assert np.abs(pts - np.array(spot, dtype=np.float32)).max() <= 3.2  # about one heatmap cell
    # a spot elsewhere moves the answer (the test would catch a dropped transform)
    frame2 = np.full_like(frame, 10)
    frame2[149:152, 109:112] = 255
    pts2 = landmarks_68(_SpotFinder(), frame2, box)
    assert np.abs(pts2 - np.array([110, 150], dtype=np.float32)).max() <= 3.2


def test_crop_pads_outside_the_frame_with_zeros():
    frame = np.full((100, 100, 3), 200, dtype=np.uint8)
    center, scale = box_center_scale((0, 0, 60, 60))  # crop window reaches past the top-left
    crop = crop_fan_input(frame, center, scale)
    # window [-31, 91) x [-38, 84): top-left is padding, bottom-right and centre are image
    assert crop[:20, :20].max() == 0
    assert crop[-20:, -20:].min() == 200 and crop[128, 128].min() == 200


def test_landmarks_68_random_model_shape_and_range():
    model = load_fan(None, seed=0, num_modules=1)
    frame = np.random.RandomState(0).randint(0, 256, size=(180, 240, 3), dtype=np.uint8)
    box = (60, 30, 160, 150)
    pts = landmarks_68(model, frame, box)
    assert pts.shape == (68, 2) and pts.dtype == np.float32
    assert np.isfinite(pts).all()
    center, scale = box_center_scale(box)
    half = 100.0 * scale  # every decoded point lies inside the crop square
    assert (pts >= center - half - 1e-3).all() and (pts <= center + half + 1e-3).all()
    assert len(np.unique(pts.round(3), axis=0)) > 1
