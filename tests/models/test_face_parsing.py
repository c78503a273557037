"""MuseTalk's face parser (deployments/models/faces/face_parsing.py), v1.5's jaw blend mask
(deployments/models/musetalk/blend_mask.py) against formulas written from MuseTalk's published
code, and their wiring into the LipSync stage (`blend_mask: face_parsing`). Offline, CPU, random
weights."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

import deployments.models.musetalk.pipeline as pipeline_module
from deployments.common.payloads import Frames
from deployments.config import LipSyncConfig
from deployments.config_weights import MuseTalkWeights, RandomWeights
from deployments.lipsync import LipSync
from deployments.models.faces.face_parsing import (
    NUM_CLASSES,
    BiSeNet,
    cheek_bands,
    ellipse_kernel,
    jaw_kernel,
    load_face_parser,
    parse_faces,
    parsing_region,
)
from deployments.models.musetalk.avatar import box_mask, lower_face_mask
from deployments.models.musetalk.blend_mask import (
    crop_padded,
    expanded_crop_box,
    gaussian_blur,
    gaussian_kernel,
    jaw_blend_mask,
    parser_inputs,
    to_crop_coordinates,
)
from deployments.models.musetalk.pipeline import MuseTalkPipeline, face_parser_path

H, W = 64, 96
BOX = (24, 8, 72, 56)

# The published checkpoint's layout: `79999_iter.pth` of zllrunning/face-parsing.PyTorch (the
# file MuseTalk downloads to models/face-parse-bisent/), whose modules are defined in that repo's
# model.py (BiSeNet: cp, ffm, conv_out, conv_out16, conv_out32; ContextPath: resnet, arm16, arm32,
# conv_head32, conv_head16, conv_avg; AttentionRefinementModule: conv, conv_atten, bn_atten;
# FeatureFusionModule: convblk, conv1, conv2; BiSeNetOutput: conv, conv_out; ConvBNReLU: conv, bn)
# and resnet.py (Resnet18: conv1, bn1, layer1..4 of two BasicBlocks: conv1, bn1, conv2, bn2,
# downsample = Sequential(Conv2d, BatchNorm2d) where the shape changes). MuseTalk's copy
# (musetalk/utils/face_parsing/model.py) keeps the same names. Checked against:
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


# ------------------------------------------------------------------ v1.5's jaw mask, from the formulas
# The expectations below are written from MuseTalk's published code (TMElyralab/MuseTalk, read at
# commit 0a89dec): musetalk/utils/face_parsing/__init__.py (FaceParsing.__init__: cone kernel,
# cv2.getStructuringElement(MORPH_ELLIPSE, (35, 3)), _create_cheek_mask; __call__ mode "jaw"),
# musetalk/utils/blending.py (get_crop_box, get_image_prepare_material with expand 1.5,
# upper_boundary_ratio 0.5, blur kernel int(0.1 * side // 2 * 2) + 1, cv2.GaussianBlur sigma 0),
# scripts/realtime_inference.py (v1.5: mode "jaw", cheek widths 90). The morphology and the blur
# are re-derived here with plain numpy, one kernel offset at a time, as OpenCV defines them.


def _shift(image: np.ndarray, dy: int, dx: int, fill: bool) -> np.ndarray:
    """out[y, x] = image[y + dy, x + dx], `fill` outside."""
    h, w = image.shape
    out = np.full_like(image, fill)
    ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
    xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    out[yd, xd] = image[ys, xs]
    return out


def _cv_morph(image: np.ndarray, kernel: np.ndarray, erode: bool) -> np.ndarray:
    """cv2.dilate / cv2.erode of a bool image: max / min of src(y + i - ay, x + j - ax) over the
    kernel's ones, anchor at the centre; the border counts as 0 for dilate, 1 for erode."""
    ay, ax = kernel.shape[0] // 2, kernel.shape[1] // 2
    shifted = [_shift(image, i - ay, j - ax, erode) for i, j in np.argwhere(kernel)]
    return np.logical_and.reduce(shifted) if erode else np.logical_or.reduce(shifted)


def _musetalk_jaw(parsing: np.ndarray, cheek_width: int = 90) -> np.ndarray:
    """FaceParsing(left_cheek_width=90, right_cheek_width=90)(image, mode="jaw") on a class map."""
    kernel = np.zeros((33, 33), bool)
    for row in range(10, 21):  # cone: rows cone_height // 2 .. cone_height - 1, width 2 * (row - 10) + 1
        kernel[row, 16 - (row - 10):16 + (row - 10) + 1] = True
    kernel[21:, 6:27] = True  # tail: the cone's last row (21 wide) repeated for 12 rows
    ellipse = np.zeros((3, 35), bool)
    ellipse[1, :] = True
    ellipse[0, 17] = ellipse[2, 17] = True  # r = 1, c = 17: dx = 0 on the outer rows
    cheeks = np.zeros((512, 512), bool)
    cheeks[:, :256 - cheek_width + 1] = True  # cv2.rectangle (0, 0)-(166, 512), filled
    cheeks[:, 256 + cheek_width:] = True  # (346, 0)-(512, 512)
    dilated = _cv_morph(parsing == 1, kernel, erode=False)
    eroded = _cv_morph(_cv_morph(dilated, ellipse, erode=True), ellipse, erode=True)
    face = (eroded & cheeks) | (dilated & ~cheeks)
    return (face & (parsing != 10)) | np.isin(parsing, [11, 12, 13])


def _cv_gaussian_blur(image: np.ndarray, k: int) -> np.ndarray:
    """cv2.GaussianBlur(image, (k, k), 0) in float64: getGaussianKernel's fixed 3/5/7-tap kernels,
    else sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8; BORDER_REFLECT_101 (numpy's 'reflect')."""
    fixed = {3: [1, 2, 1], 5: [1, 4, 6, 4, 1], 7: [2, 7, 14, 18, 14, 7, 2]}  # /4, /16, /64 (OpenCV table)
    if k in fixed:
        g = np.array(fixed[k], float) / sum(fixed[k])
    else:
        sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
        g = np.exp(-((np.arange(k) - (k - 1) / 2) ** 2) / (2 * sigma ** 2))
        g /= g.sum()
    r = k // 2
    x = np.pad(image.astype(float), r, mode="reflect")
    x = np.apply_along_axis(lambda row: np.convolve(row, g, mode="valid"), 1, x)
    x = np.apply_along_axis(lambda col: np.convolve(col, g, mode="valid"), 0, x)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _musetalk_prepare_material(region512: np.ndarray, box) -> tuple[np.ndarray, list]:
    """get_image_prepare_material(..., upper_boundary_ratio=0.5, expand=1.5) from the parser's
    512x512 region on: (mask over the crop box, crop box)."""
    x, y, x1, y1 = box
    x_c, y_c = (x + x1) // 2, (y + y1) // 2
    s = int(max(x1 - x, y1 - y) // 2 * 1.5)
    x_s, y_s = x_c - s, y_c - s
    side = 2 * s
    seg = np.asarray(PIL.Image.fromarray(region512.astype(np.uint8) * 255).resize((side, side)))
    mask = np.zeros((side, side), np.uint8)
    mask[y - y_s:y1 - y_s, x - x_s:x1 - x_s] = seg[y - y_s:y1 - y_s, x - x_s:x1 - x_s]
    mask[:int(side * 0.5)] = 0
    return _cv_gaussian_blur(mask, int(0.1 * side // 2 * 2) + 1), [x_s, y_s, x_c + s, y_c + s]


def _synthetic_face(size: int = 512) -> np.ndarray:
    """A class map with a face: skin oval, nose, mouth and lips, neck, hair, background."""
    yy, xx = np.mgrid[:size, :size] / size
    parsing = np.zeros((size, size), np.uint8)
    parsing[(yy > 0.72) & (abs(xx - 0.5) < 0.12)] = 14  # neck
    parsing[((xx - 0.5) / 0.34) ** 2 + ((yy - 0.47) / 0.4) ** 2 < 1] = 1  # skin
    parsing[(yy < 0.2) & (parsing == 1)] = 17  # hair
    parsing[(abs(xx - 0.5) < 0.05) & (yy > 0.4) & (yy < 0.58)] = 10  # nose
    parsing[(abs(xx - 0.5) < 0.1) & (abs(yy - 0.66) < 0.015)] = 12  # upper lip
    parsing[(abs(xx - 0.5) < 0.1) & (abs(yy - 0.69) < 0.015)] = 13  # lower lip
    parsing[(abs(xx - 0.5) < 0.07) & (abs(yy - 0.675) < 0.006)] = 11  # mouth
    return parsing


def test_jaw_kernels_and_cheek_bands_follow_musetalk():
    kernel = jaw_kernel()
    assert kernel.shape == (33, 33) and kernel.sum() == 121 + 12 * 21
    assert not kernel[:10].any()
    assert np.flatnonzero(kernel[10]).tolist() == [16]
    assert np.flatnonzero(kernel[20]).tolist() == list(range(6, 27))
    assert (kernel[21:] == kernel[20]).all()
    ellipse = ellipse_kernel(35, 3)
    assert ellipse[1].all() and np.flatnonzero(ellipse[0]).tolist() == [17] == np.flatnonzero(ellipse[2]).tolist()
    np.testing.assert_array_equal(ellipse_kernel(5, 5), [[0, 0, 1, 0, 0], [1] * 5, [1] * 5, [1] * 5,
                                                        [0, 0, 1, 0, 0]])  # cv2's well-known 5x5
    bands = cheek_bands(512)
    assert np.flatnonzero(~bands).tolist() == list(range(167, 346))


def test_parsing_region_matches_musetalks_face_parsing_modes():
    parsing = _synthetic_face()
    both = np.stack([parsing, np.fliplr(parsing).copy()])
    jaw = parsing_region(both, "jaw")
    for got, class_map in zip(jaw, both):
        np.testing.assert_array_equal(got, _musetalk_jaw(class_map))
    np.testing.assert_array_equal(parsing_region(both, "raw"), np.isin(both, [1, 11, 12, 13]))
    np.testing.assert_array_equal(parsing_region(both, "neck"), np.isin(both, [1, 11, 12, 13, 14]))
    region = jaw[0]
    assert not region[parsing == 10].any()  # the nose is cut out
    assert region[np.isin(parsing, [11, 12, 13])].all()  # mouth and lips are in
    # The dilation adds pixels next to the skin between the cheek bands; the erosion takes skin
    # away inside the bands.
    skin = parsing == 1
    assert (region & ~skin & ~np.isin(parsing, [11, 12, 13]))[:, 200:312].any()
    assert (skin & ~region)[:, :167].any()
    with pytest.raises(ValueError):
        parsing_region(both, "cheeks")


@pytest.mark.parametrize("box", [(24, 8, 72, 56), (100, 60, 260, 260), (5, 0, 95, 70), (40, 30, 61, 47)])
def test_jaw_blend_mask_matches_musetalks_prepare_material(box):
    parsing = _synthetic_face()
    region = _musetalk_jaw(parsing)
    expected, crop_box = _musetalk_prepare_material(region, box)
    assert list(expanded_crop_box(box)) == crop_box
    x1, y1, x2, y2 = box
    x_s, y_s = crop_box[:2]
    got = jaw_blend_mask(parsing_region(parsing[None], "jaw")[0], box, tuple(crop_box))
    assert got.shape == (y2 - y1, x2 - x1) and got.dtype == np.uint8
    want = expected[y1 - y_s:y2 - y_s, x1 - x_s:x2 - x_s]
    # OpenCV blurs uint8 in fixed point: within one level of the float result.
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert want.max() > 200  # a real mask, not an empty one
    # Outside the face box the reference blends the frame with itself: the box part is all of it.
    # Zero above the crop's centre, beyond the blur's reach.
    k = int(0.1 * (crop_box[2] - x_s) // 2 * 2) + 1
    centre = (crop_box[3] - y_s) // 2 + y_s - y1  # the crop's centre row, in box rows
    assert not got[:max(centre - k // 2, 0)].any()


def test_gaussian_blur_is_opencvs_for_small_and_large_kernels():
    image = np.random.default_rng(4).integers(0, 256, (40, 50)).astype(np.uint8)
    for k in (1, 3, 5, 7, 9, 25):
        np.testing.assert_allclose(gaussian_blur(image, k), _cv_gaussian_blur(image, k), atol=1)
    assert gaussian_kernel(9).sum().item() == pytest.approx(1.0)


def test_crop_box_reaches_outside_the_frame_with_zeros():
    frame = np.full((64, 96, 3), 200, np.uint8)
    crop_box = expanded_crop_box((24, 8, 72, 56))  # w = h = 48: s = 36 around (48, 32)
    assert crop_box == (12, -4, 84, 68)
    crop = crop_padded(frame, crop_box)
    assert crop.shape == (72, 72, 3)
    assert not crop[:4].any() and not crop[-4:].any() and (crop[4:-4] == 200).all()
    inputs = parser_inputs(frame[None], [crop_box])
    assert inputs.shape == (1, 512, 512, 3) and inputs.dtype == np.uint8


def _frames(seed=0, n=4):
    return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def parsing_stage() -> LipSync:
    cfg = LipSyncConfig(weights=RandomWeights(arch="tiny", seed=0), device="cpu", batch_size=4,
                        blend_mask="face_parsing")
    return LipSync(cfg)


def prepare(stage: LipSync, frames: np.ndarray):
    """The stage's create_avatar at 16 fps with the test's box, and the prepared avatar it made."""
    return stage.get_avatar(stage.create_avatar(Frames(frames=frames, fps=16), face_box=BOX))


def test_config_fields():
    assert LipSyncConfig().blend_mask == "feathered"
    assert MuseTalkWeights().face_parser is None  # not on the Hub: the operator gives a local file
    with pytest.raises(ValueError, match="face_parser"):
        face_parser_path(LipSyncConfig(weights=MuseTalkWeights(), blend_mask="face_parsing"))
    with pytest.raises(ValueError):
        LipSyncConfig(blend_mask="something")


def _v15_masks(class_maps: np.ndarray, boxes) -> np.ndarray:
    """What the stage stores for these 512x512 class maps: each box's jaw mask in crop coordinates."""
    regions = parsing_region(class_maps, "jaw")
    return np.stack([to_crop_coordinates(jaw_blend_mask(r, b, expanded_crop_box(b))) for r, b in zip(regions, boxes)])


def test_stage_masks_are_musetalk_v15_jaw_masks(parsing_stage):
    pipeline = parsing_stage.pipeline
    assert pipeline.face_parser is not None
    frames = _frames()
    avatar = prepare(parsing_stage, frames)
    assert avatar.masks.dtype == np.uint8 and avatar.masks.shape == (4, 256, 256)
    # The parser reads the 1.5x square crop around the box (zero where it leaves the frame).
    inputs = parser_inputs(frames, [expanded_crop_box(BOX)] * 4)
    np.testing.assert_array_equal(avatar.masks, _v15_masks(parse_faces(pipeline.face_parser, inputs),
                                                           [BOX] * 4))
    # The setting is part of the avatar's content hash.
    assert pipeline.settings()["blend_mask"] == "face_parsing"
    feathered = MuseTalkPipeline.__new__(MuseTalkPipeline)
    feathered.cfg = pipeline.cfg.model_copy(update={"blend_mask": "feathered"})
    feathered.dtype = pipeline.dtype
    assert "blend_mask" not in feathered.settings()
    assert feathered.settings() != pipeline.settings()


def test_stage_with_a_known_class_map_blends_only_inside_the_box(parsing_stage, monkeypatch):
    frames = _frames(seed=5)
    class_map = np.stack([_synthetic_face()] * 4)
    calls = []

    def fake_parse(model, crops, **kwargs):
        calls.append(crops.shape)
        return class_map[:crops.shape[0]]

    monkeypatch.setattr(pipeline_module, "parse_faces", fake_parse)
    avatar = prepare(parsing_stage, frames)
    assert calls == [(4, 512, 512, 3)]
    np.testing.assert_array_equal(avatar.masks, _v15_masks(class_map, [BOX] * 4))
    default = lower_face_mask(parsing_stage.cfg.blend_upper_ratio, parsing_stage.cfg.blend_feather)
    assert not np.array_equal(avatar.masks[0], default)
    # Stored in crop coordinates, read back over the box within a few levels of MuseTalk's weights.
    expected, crop_box = _musetalk_prepare_material(_musetalk_jaw(class_map[0]), BOX)
    x1, y1, x2, y2 = BOX
    want = expected[y1 - crop_box[1]:y2 - crop_box[1], x1 - crop_box[0]:x2 - crop_box[0]]
    stored = np.rint(box_mask(avatar.masks[0], BOX) * 255).astype(int)
    assert np.abs(stored - want).max() <= 12 and np.abs(stored - want).mean() < 1.5  # measured 11, 1.15
    # Prepared again: from the cache, the parser is not called again.
    assert prepare(parsing_stage, frames).prepared_id == avatar.prepared_id
    assert len(calls) == 1
    # Blending leaves every pixel outside the box (and where the mask is 0) as it was.
    pcm = (0.3 * np.sin(2 * np.pi * 220 * np.arange(4000) / 16000)).astype(np.float32)
    chunks = list(parsing_stage.pipeline.frames(avatar, pcm, batch_size=4))
    out = np.concatenate(chunks)
    assert out.shape[1:] == (H, W, 3) and out.shape[0] == 6
    inside = np.zeros((H, W), dtype=bool)
    inside[y1:y2, x1:x2] = True
    # Above the crop's centre row (frame row 32), less the blur's 3 rows and a row of resampling.
    untouched = 32 - 3 - 1
    changed = False
    for i, frame in enumerate(out):
        base = avatar.frames[avatar.source_frame(i)]
        np.testing.assert_array_equal(frame[~inside], base[~inside])
        np.testing.assert_array_equal(frame[y1:untouched, x1:x2], base[y1:untouched, x1:x2])
        changed |= not np.array_equal(frame[inside], base[inside])
    assert changed


def test_device_paste_back_uses_the_same_v15_masks_as_the_cpu_blend():
    """The GPU path (paste.PasteBack, run here on the CPU) blends with the avatar's jaw masks as
    avatar.blend_face does, within the few levels its resampling differs by."""
    from deployments.models.musetalk.avatar import PreparedAvatar, blend_face
    from deployments.models.musetalk.paste import PasteBack

    rng = np.random.default_rng(6)
    frames = rng.integers(0, 256, (2, H, W, 3), dtype=np.uint8)
    boxes = np.array([BOX, (10, 4, 70, 60)], dtype=np.int64)
    masks = _v15_masks(np.stack([_synthetic_face()] * 2), boxes)
    avatar = PreparedAvatar(prepared_id="v15", frames=frames, source_index=np.arange(2), boxes=boxes,
                            crops=np.zeros((2, 256, 256, 3), np.uint8),
                            latents=np.zeros((2, 8, 32, 32), np.float32), masks=masks)
    crops = rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    pasted = PasteBack(avatar, "cpu")([0, 1], torch.from_numpy(crops)).numpy()
    for s in (0, 1):
        expected = blend_face(frames[s], crops[s], boxes[s], masks[s])
        diff = np.abs(pasted[s].astype(int) - expected.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.1
        assert not np.array_equal(expected, frames[s])


def test_parser_file_is_resolved_from_the_musetalk_weights(tmp_path):
    from deployments.models.hub import MissingWeightsError
    local = tmp_path / "79999_iter.pth"
    local.write_bytes(b"")
    cfg = LipSyncConfig(weights=MuseTalkWeights(face_parser=str(local)), blend_mask="face_parsing")
    assert face_parser_path(cfg) == str(local)
    folder = LipSyncConfig(weights=MuseTalkWeights(repo=str(tmp_path), face_parser="79999_iter.pth"),
                           blend_mask="face_parsing")
    assert face_parser_path(folder) == local
    with pytest.raises(MissingWeightsError):  # not in the (empty) local Hub cache
        face_parser_path(LipSyncConfig(weights=MuseTalkWeights(face_parser="face-parse-bisent/79999_iter.pth"),
                                       blend_mask="face_parsing"), weights_dir=str(tmp_path))
    with pytest.raises(ValueError):
        face_parser_path(LipSyncConfig(weights=MuseTalkWeights(face_parser=None), blend_mask="face_parsing"))
