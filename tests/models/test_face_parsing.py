"""MuseTalk's face-parsing blend mask (deployments/face_parsing.py) and its wiring into the LipSync
stage (`blend_mask: face_parsing`). Offline, CPU, random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import deployments.lipsync as lipsync_module
from deployments.config import LipSyncConfig, MuseTalkWeights, RandomWeights
from deployments.lipsync import LipSync
from deployments.models.faces.face_parsing import (
    MUSETALK_CLASSES,
    NUM_CLASSES,
    BiSeNet,
    face_parsing_mask,
    load_face_parser,
    parse_faces,
)
from deployments.models.musetalk.avatar import lower_face_mask

H, W = 64, 96
BOX = (24, 8, 72, 56)

# The published checkpoint's layout: `79999_iter.pth` of zllrunning/face-parsing.PyTorch (the
# file MuseTalk downloads to models/face-parse-bisent/), whose modules are defined in that repo's
# model.py (BiSeNet: cp, ffm, conv_out, conv_out16, conv_out32; ContextPath: resnet, arm16, arm32,
# conv_head32, conv_head16, conv_avg; AttentionRefinementModule: conv, conv_atten, bn_atten;
# FeatureFusionModule: convblk, conv1, conv2; BiSeNetOutput: conv, conv_out; ConvBNReLU: conv, bn)
# and resnet.py (Resnet18: conv1, bn1, layer1..4 of two BasicBlocks: conv1, bn1, conv2, bn2,
# downsample = Sequential(Conv2d, BatchNorm2d) where the shape changes). MuseTalk's copy
# (musetalk/utils/face_parsing/model.py) keeps the same names. Checked in the code corpus:
# zllrunning/face-parsing.PyTorch model.py (commit b9a12fe), a ported resnet.py of the same layout,
# and a third-party loader quoting `cp.resnet.layer1.0.conv1.weight` as a key of the release.
CONVS = [  # Conv2d, no bias: "<name>.weight"
    "cp.resnet.conv1",
    *[f"cp.resnet.layer{i}.{j}.conv{k}" for i in (1, 2, 3, 4) for j in (0, 1) for k in (1, 2)],
    "cp.resnet.layer2.0.downsample.0", "cp.resnet.layer3.0.downsample.0",
    "cp.resnet.layer4.0.downsample.0",
    "cp.arm16.conv.conv", "cp.arm16.conv_atten", "cp.arm32.conv.conv", "cp.arm32.conv_atten",
    "cp.conv_head32.conv", "cp.conv_head16.conv", "cp.conv_avg.conv",
    "ffm.convblk.conv", "ffm.conv1", "ffm.conv2",
    "conv_out.conv.conv", "conv_out.conv_out",
    "conv_out16.conv.conv", "conv_out16.conv_out",
    "conv_out32.conv.conv", "conv_out32.conv_out",
]
BATCHNORMS = [  # BatchNorm2d: weight, bias, running_mean, running_var (+ num_batches_tracked)
    "cp.resnet.bn1",
    *[f"cp.resnet.layer{i}.{j}.bn{k}" for i in (1, 2, 3, 4) for j in (0, 1) for k in (1, 2)],
    "cp.resnet.layer2.0.downsample.1", "cp.resnet.layer3.0.downsample.1",
    "cp.resnet.layer4.0.downsample.1",
    "cp.arm16.conv.bn", "cp.arm16.bn_atten", "cp.arm32.conv.bn", "cp.arm32.bn_atten",
    "cp.conv_head32.bn", "cp.conv_head16.bn", "cp.conv_avg.bn",
    "ffm.convblk.bn", "conv_out.conv.bn", "conv_out16.conv.bn", "conv_out32.conv.bn",
]
EXPECTED_KEYS = {f"{c}.weight" for c in CONVS} | {
    f"{b}.{s}" for b in BATCHNORMS for s in ("weight", "bias", "running_mean", "running_var")}
SHAPES = {
    "cp.resnet.conv1.weight": (64, 3, 7, 7),
    "cp.resnet.layer4.0.downsample.0.weight": (512, 256, 1, 1),
    "cp.arm16.conv.conv.weight": (128, 256, 3, 3),
    "cp.arm32.conv.conv.weight": (128, 512, 3, 3),
    "cp.conv_avg.conv.weight": (128, 512, 1, 1),
    "ffm.convblk.conv.weight": (256, 256, 1, 1),
    "ffm.conv1.weight": (64, 256, 1, 1),
    "conv_out.conv_out.weight": (NUM_CLASSES, 256, 1, 1),
    "conv_out16.conv_out.weight": (NUM_CLASSES, 64, 1, 1),
}


@pytest.fixture(scope="module")
def parser() -> BiSeNet:
    return load_face_parser(None, "cpu", torch.float32, seed=0)


def test_state_dict_keys_match_the_published_checkpoint(parser):
    keys = {k for k in parser.state_dict() if not k.endswith("num_batches_tracked")}
    assert keys == EXPECTED_KEYS
    state = parser.state_dict()
    for name, shape in SHAPES.items():
        assert tuple(state[name].shape) == shape, name
    # 79999_iter.pth is about 53 MB of fp32: 13.3 M parameters.
    assert 13.2e6 < sum(p.numel() for p in parser.parameters()) < 13.4e6


def test_save_load_round_trip_gives_identical_outputs(parser, tmp_path):
    path = tmp_path / "79999_iter.pth"
    state = {k: v for k, v in parser.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)  # the release may lack the BatchNorm step counters: still loads
    loaded = load_face_parser(path, "cpu", torch.float32)
    assert not loaded.training
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(parser(x), loaded(x))
        assert parser(x).shape == (1, NUM_CLASSES, 128, 128)
        assert len(loaded(x, aux=True)) == 3
    crops = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(parse_faces(parser, crops, size=128),
                                  parse_faces(loaded, crops, size=128))
    # Same seed, same random parser.
    again = load_face_parser(None, "cpu", torch.float32, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(parser.state_dict().values(),
                                                 again.state_dict().values()))


def test_parse_faces_returns_a_class_map_per_crop(parser):
    crops = np.random.default_rng(1).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    class_map = parse_faces(parser, crops, size=64, batch_size=2)
    assert class_map.dtype == np.uint8 and class_map.shape == (3, 40, 48)
    assert class_map.max() < NUM_CLASSES
    with pytest.raises(ValueError):
        parse_faces(parser, crops.astype(np.float32))


def test_mask_is_uint8_lower_face_and_zero_on_border_and_upper_part(parser):
    crops = np.random.default_rng(2).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    for class_map in (parse_faces(parser, crops, size=128),
                      np.ones((2, 256, 256), dtype=np.uint8)):  # all skin
        mask = face_parsing_mask(class_map)
        assert mask.dtype == np.uint8 and mask.shape == (2, 256, 256)
        assert not mask[:, :128].any()  # upper half (upper_ratio 0.5)
        assert not mask[:, -1].any() and not mask[:, :, 0].any() and not mask[:, :, -1].any()
    # All skin: 255 well inside the lower face, falling smoothly to the border.
    assert mask[:, 192, 128].min() == 255
    assert 0 < mask[0, 192, 5] < 255
    # A class map of another size is resized to the 256x256 crop.
    assert face_parsing_mask(np.ones((1, 64, 64), dtype=np.uint8)).shape == (1, 256, 256)


def test_mask_keeps_exactly_the_chosen_classes_in_the_lower_face():
    g = np.random.default_rng(3)
    class_map = g.integers(0, NUM_CLASSES, (2, 256, 256)).astype(np.uint8)
    # Without the blur the mask is exactly the kept classes below the boundary, off the border.
    sharp = face_parsing_mask(class_map, blur=0.0)
    expected = np.isin(class_map, MUSETALK_CLASSES)
    expected[:, :128] = False
    expected[:, -1], expected[:, :, 0], expected[:, :, -1] = False, False, False
    np.testing.assert_array_equal(sharp, expected.astype(np.uint8) * 255)
    assert MUSETALK_CLASSES == (1, 11, 12, 13)  # skin, mouth, upper lip, lower lip (not nose)
    # Left half skin, right half nose: with the blur, skin is kept and nose is not.
    halves = np.full((1, 256, 256), 10, dtype=np.uint8)
    halves[:, :, :128] = 1
    mask = face_parsing_mask(halves)
    assert mask[0, 200, 60] == 255 and mask[0, 200, 200] == 0
    assert mask[0, 200, 200:].max() == 0 and mask[0, 200, 1:100].min() > 0
    flipped = face_parsing_mask(halves, keep=(10,))
    assert flipped[0, 200, 60] == 0 and flipped[0, 200, 200] == 255


def _frames(seed=0, n=4):
    return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def parsing_stage() -> LipSync:
    cfg = LipSyncConfig(weights=RandomWeights(arch="tiny", seed=0), device="cpu", batch_size=4,
                        blend_mask="face_parsing")
    return LipSync(cfg)


def test_config_fields():
    assert LipSyncConfig().blend_mask == "feathered"
    assert MuseTalkWeights().face_parser is None  # not on the Hub: the operator gives a local file
    with pytest.raises(ValueError, match="face_parser"):
        LipSync._face_parser_path(LipSyncConfig(weights=MuseTalkWeights(), blend_mask="face_parsing"))
    with pytest.raises(ValueError):
        LipSyncConfig(blend_mask="something")


def test_stage_masks_come_from_the_parser(parsing_stage):
    assert parsing_stage.face_parser is not None
    avatar = parsing_stage.prepare_avatar(_frames(), 16, face_box=BOX)
    assert avatar.masks.dtype == np.uint8 and avatar.masks.shape == (4, 256, 256)
    expected = face_parsing_mask(parse_faces(parsing_stage.face_parser, avatar.crops))
    np.testing.assert_array_equal(avatar.masks, expected)
    # The setting is part of the avatar's content hash.
    assert parsing_stage.settings()["blend_mask"] == "face_parsing"
    feathered = LipSync.__new__(LipSync)
    feathered.cfg = parsing_stage.cfg.model_copy(update={"blend_mask": "feathered"})
    feathered.dtype = parsing_stage.dtype
    assert "blend_mask" not in feathered.settings()
    assert feathered.settings() != parsing_stage.settings()


def test_stage_with_a_known_class_map_blends_only_inside_the_box(parsing_stage, monkeypatch):
    frames = _frames(seed=5)
    class_map = np.zeros((4, 256, 256), dtype=np.uint8)
    class_map[:, 120:, 40:216] = 1  # skin
    class_map[:, 170:200, 90:170] = 12  # upper lip
    class_map[:, 150:230, 0:30] = 10  # nose class: not kept
    calls = []

    def fake_parse(model, crops, **kwargs):
        calls.append(crops.shape)
        return class_map[:crops.shape[0]]

    monkeypatch.setattr(lipsync_module, "parse_faces", fake_parse)
    avatar = parsing_stage.prepare_avatar(frames, 16, face_box=BOX)
    assert calls == [(4, 256, 256, 3)]
    np.testing.assert_array_equal(avatar.masks, face_parsing_mask(class_map))
    default = lower_face_mask(parsing_stage.cfg.blend_upper_ratio, parsing_stage.cfg.blend_feather)
    assert not np.array_equal(avatar.masks[0], default)
    assert avatar.masks[0, 185, 128] == 255 and avatar.masks[0, 190, 10] == 0
    # Prepared again: from the cache, the parser is not called again.
    assert parsing_stage.prepare_avatar(frames, 16, face_box=BOX).avatar_id == avatar.avatar_id
    assert len(calls) == 1
    # Blending leaves every pixel outside the box (and where the mask is 0) as it was.
    pcm = (0.3 * np.sin(2 * np.pi * 220 * np.arange(4000) / 16000)).astype(np.float32)
    chunks = list(parsing_stage.speak(avatar, pcm, batch_size=4))
    out = np.concatenate(chunks)
    assert out.shape[1:] == (H, W, 3) and out.shape[0] == 6
    x1, y1, x2, y2 = BOX
    inside = np.zeros((H, W), dtype=bool)
    inside[y1:y2, x1:x2] = True
    changed = False
    for i, frame in enumerate(out):
        base = avatar.frames[avatar.source_frame(i)]
        np.testing.assert_array_equal(frame[~inside], base[~inside])
        # The upper half of the box (mask 0 there) is untouched too.
        np.testing.assert_array_equal(frame[y1:y1 + (y2 - y1) // 2 - 1, x1:x2],
                                      base[y1:y1 + (y2 - y1) // 2 - 1, x1:x2])
        changed |= not np.array_equal(frame[inside], base[inside])
    assert changed


def test_parser_file_is_resolved_from_the_musetalk_weights(tmp_path):
    from deployments.models.hub import MissingWeightsError
    local = tmp_path / "79999_iter.pth"
    local.write_bytes(b"")
    cfg = LipSyncConfig(weights=MuseTalkWeights(face_parser=str(local)), blend_mask="face_parsing")
    assert LipSync._face_parser_path(cfg) == str(local)
    folder = LipSyncConfig(weights=MuseTalkWeights(repo=str(tmp_path), face_parser="79999_iter.pth"),
                           blend_mask="face_parsing")
    assert LipSync._face_parser_path(folder) == local
    with pytest.raises(MissingWeightsError):  # not in the (empty) local Hub cache
        LipSync._face_parser_path(LipSyncConfig(
            weights=MuseTalkWeights(face_parser="face-parse-bisent/79999_iter.pth"),
            weights_dir=str(tmp_path), blend_mask="face_parsing"))
    with pytest.raises(ValueError):
        LipSync._face_parser_path(LipSyncConfig(weights=MuseTalkWeights(face_parser=None),
                                                blend_mask="face_parsing"))
