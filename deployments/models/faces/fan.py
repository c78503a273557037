"""The 2D-FAN 68-point face landmark network (Bulat & Tzimiropoulos, "How far are we from solving
the 2D & 3D face alignment problem?", ICCV 2017) as shipped by face_alignment, in plain torch.

Module and parameter names follow the published, non-TorchScript checkpoint
`2DFAN4-11f355bf06.pth.tar` (a flat state dict loaded by face_alignment 1.x with
`FAN(4).load_state_dict(torch.load(...))`): `conv1.weight`, `bn1.weight`, `conv2.bn1.weight`,
`conv2.downsample.0.weight`, `m0.b1_4.conv1.weight`, `m0.b2_plus_1.*`, `top_m_0.*`,
`conv_last0.*`, `bn_end0.*`, `l0.weight`, `bl0.weight`, `al0.weight`, ... so it loads strictly.

    frame uint8 RGB (H, W, 3), face box (x1, y1, x2, y2)
        -> center = box center, moved up by 0.12 * box height; scale = (w + h) / 195
        -> crop of side 200 * scale pixels around the center (zero padded), bilinear to 256x256
        -> float in [0, 1], (1, 3, 256, 256) -> FAN -> heatmaps (1, 68, 64, 64) of the last stack
        -> per-heatmap argmax, +0.25 px toward the higher neighbour on each axis, +0.5 (pixel
           centre) -> heatmap coordinates -> back to image pixels with the same center / scale

Facts (not code) from 1adrianb/face-alignment: `face_alignment/models.py` (`models/fan.py` in
1.5: ConvBlock, HourGlass, FAN, average pooling in the stem and the hourglasses; compared with
the package in tests/models/test_face_alignment_reference.py), `face_alignment/utils.py`
(`transform`, `crop`, `get_preds_fromhm` / `_get_preds_fromhm`, `transform_np`), `face_alignment/api.py` (`get_landmarks_from_image`: center, 0.12 shift,
scale = (x2 - x1 + y2 - y1) / reference_scale, 195 for the default SFD detector).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_LANDMARKS = 68
INPUT_SIZE = 256
HEATMAP_SIZE = 64
REFERENCE_SCALE = 195.0  # face_alignment's SFD detector `reference_scale`
CENTER_SHIFT = 0.12  # center y moves up by this fraction of the box height
HOURGLASS_DEPTH = 4
FEATURES = 256


# ------------------------------------------------------------------ the network


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=False)


class ConvBlock(nn.Module):
    """Pre-activation multi-scale residual block: three 3x3 convs producing out/2, out/4, out/4
    channels, concatenated; shortcut is BN-ReLU-1x1 conv (`downsample.0` / `downsample.2`) when
    the channel count changes."""

    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        half, quarter = out_planes // 2, out_planes // 4
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, half)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv2 = _conv3x3(half, quarter)
        self.bn3 = nn.BatchNorm2d(quarter)
        self.conv3 = _conv3x3(quarter, quarter)
        if in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.BatchNorm2d(in_planes), nn.ReLU(True),
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=1, bias=False))
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(F.relu(self.bn1(x)))
        b = self.conv2(F.relu(self.bn2(a)))
        c = self.conv3(F.relu(self.bn3(b)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.cat((a, b, c), 1) + shortcut


class HourGlass(nn.Module):
    """Recursive hourglass. Level L (depth .. 1) owns `b1_L` (skip branch at full resolution),
    `b2_L` (after a 2x2 average pool, as face_alignment: the published weights were trained
    with average, not max, pooling), then either level L-1 or, at L == 1, `b2_plus_1`, and `b3_L`,
    whose output is upsampled 2x (nearest) and added to the skip branch."""

    def __init__(self, depth: int = HOURGLASS_DEPTH, features: int = FEATURES):
        super().__init__()
        self.depth = depth
        self._build(depth, features)

    def _build(self, level: int, features: int) -> None:
        self.add_module(f"b1_{level}", ConvBlock(features, features))
        self.add_module(f"b2_{level}", ConvBlock(features, features))
        if level > 1:
            self._build(level - 1, features)
        else:
            self.add_module(f"b2_plus_{level}", ConvBlock(features, features))
        self.add_module(f"b3_{level}", ConvBlock(features, features))

    def _run(self, level: int, x: torch.Tensor) -> torch.Tensor:
        up = self._modules[f"b1_{level}"](x)
        low = self._modules[f"b2_{level}"](F.avg_pool2d(x, 2, stride=2))
        if level > 1:
            low = self._run(level - 1, low)
        else:
            low = self._modules[f"b2_plus_{level}"](low)
        low = self._modules[f"b3_{level}"](low)
        return up + F.interpolate(low, scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.depth, x)


class FAN(nn.Module):
    """Stacked-hourglass face alignment network. `num_modules` stacks (4 for 2DFAN-4); each stack
    predicts 68 heatmaps; between stacks, `bl{i}` (features) and `al{i}` (heatmaps) feed back
    into the residual stream. `forward` returns the last stack's heatmaps (B, 68, H/4, W/4);
    `forward(x, all_stacks=True)` returns the list of every stack's heatmaps."""

    def __init__(self, num_modules: int = 4, num_landmarks: int = NUM_LANDMARKS):
        super().__init__()
        if num_modules < 1:
            raise ValueError("num_modules must be >= 1")
        self.num_modules = num_modules
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = ConvBlock(64, 128)
        self.conv3 = ConvBlock(128, 128)
        self.conv4 = ConvBlock(128, FEATURES)
        for i in range(num_modules):
            self.add_module(f"m{i}", HourGlass(HOURGLASS_DEPTH, FEATURES))
            self.add_module(f"top_m_{i}", ConvBlock(FEATURES, FEATURES))
            self.add_module(f"conv_last{i}", nn.Conv2d(FEATURES, FEATURES, kernel_size=1))
            self.add_module(f"l{i}", nn.Conv2d(FEATURES, num_landmarks, kernel_size=1))
            self.add_module(f"bn_end{i}", nn.BatchNorm2d(FEATURES))
            if i < num_modules - 1:
                self.add_module(f"bl{i}", nn.Conv2d(FEATURES, FEATURES, kernel_size=1))
                self.add_module(f"al{i}", nn.Conv2d(num_landmarks, FEATURES, kernel_size=1))

    def forward(self, x: torch.Tensor, all_stacks: bool = False):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.avg_pool2d(self.conv2(x), 2, stride=2)  # (B, 128, H/4, W/4); average, as face_alignment
        x = self.conv4(self.conv3(x))
        previous = x
        outputs = []
        for i in range(self.num_modules):
            feat = self._modules[f"top_m_{i}"](self._modules[f"m{i}"](previous))
            feat = F.relu(self._modules[f"bn_end{i}"](self._modules[f"conv_last{i}"](feat)))
            heat = self._modules[f"l{i}"](feat)
            outputs.append(heat)
            if i < self.num_modules - 1:
                previous = previous + self._modules[f"bl{i}"](feat) + self._modules[f"al{i}"](heat)
        return outputs if all_stacks else outputs[-1]


# ------------------------------------------------------------------ loading


def _clean_state_dict(raw) -> dict:
    if isinstance(raw, Mapping) and "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        raise TypeError(f"expected a state dict, got {type(raw).__name__}")
    return {k.removeprefix("module."): v for k, v in raw.items()}


def _num_stacks(state: Mapping) -> int:
    n = sum(1 for k in state if re.fullmatch(r"l\d+\.weight", k))
    if n < 1:
        raise KeyError("no 'l<i>.weight' heatmap head in the state dict: not a FAN checkpoint")
    return n


def load_fan(path: str | os.PathLike | None, device: str | torch.device = "cpu", seed: int = 0,
             num_modules: int = 4) -> FAN:
    """FAN in eval mode on `device`. `path` None -> random init (seeded, for tests) with
    `num_modules` stacks; otherwise the stack count is read from the checkpoint (`l<i>.weight`)
    and the weights load strictly. Accepts a flat state dict (the published 2DFAN4 file), a dict
    with 'state_dict', and 'module.'-prefixed keys. BatchNorm `num_batches_tracked` buffers,
    absent from checkpoints saved before torch 0.4.1 such as the published one, are filled in."""
    if path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = FAN(num_modules)
    else:
        state = _clean_state_dict(torch.load(os.fspath(path), map_location="cpu", weights_only=True))
        model = FAN(_num_stacks(state))
        for name, buf in model.named_buffers():
            if name.endswith("num_batches_tracked") and name not in state:
                state[name] = torch.zeros_like(buf)
        model.load_state_dict(state, strict=True)
    return model.to(device).eval()


# ------------------------------------------------------------------ geometry


def box_center_scale(box: Sequence[float], reference_scale: float = REFERENCE_SCALE):
    """face_alignment's (center, scale) for a detector box (x1, y1, x2, y2): the box center with
    y moved up by 0.12 * height; scale = (width + height) / reference_scale. The crop side is
    200 * scale pixels."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    center = np.array([x2 - (x2 - x1) / 2.0, y2 - (y2 - y1) / 2.0], dtype=np.float64)
    center[1] -= (y2 - y1) * CENTER_SHIFT
    scale = (x2 - x1 + y2 - y1) / reference_scale
    return center, scale


def to_image(points, center, scale, resolution: float) -> np.ndarray:
    """Points in a `resolution`-sized crop grid -> image pixels (inverse of face_alignment's
    `transform`): p * h / resolution + center - h / 2 with h = 200 * scale. Float, no rounding
    (face_alignment truncates the result to int32)."""
    h = 200.0 * scale
    pts = np.asarray(points, dtype=np.float64)
    return pts * (h / resolution) + np.asarray(center, dtype=np.float64) - h / 2.0


def to_crop(points, center, scale, resolution: float) -> np.ndarray:
    """Image pixels -> crop grid (face_alignment's forward `transform`, without rounding)."""
    h = 200.0 * scale
    pts = np.asarray(points, dtype=np.float64)
    return (pts - np.asarray(center, dtype=np.float64) + h / 2.0) * (resolution / h)


def crop_window(center, scale, resolution: int = INPUT_SIZE):
    """Integer source window [ul, br) of the crop, as face_alignment's `crop`: the inverse
    transform of the crop points (1, 1) and (res, res), truncated toward zero."""
    ul = np.trunc(to_image([1.0, 1.0], center, scale, resolution)).astype(np.int64)
    br = np.trunc(to_image([float(resolution)] * 2, center, scale, resolution)).astype(np.int64)
    return ul, br


def crop_fan_input(frame: np.ndarray, center, scale, resolution: int = INPUT_SIZE) -> np.ndarray:
    """uint8 (res, res, 3): source pixels [ul, br) (zero outside the frame), resized bilinearly
    (half-pixel centers, no antialias, as cv2.INTER_LINEAR) to res x res."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an RGB frame (H, W, 3), got shape {frame.shape}")
    ul, br = crop_window(center, scale, resolution)
    w, h = int(br[0] - ul[0]), int(br[1] - ul[1])
    if w < 1 or h < 1:
        raise ValueError("face box too small to crop")
    window = np.zeros((h, w, 3), dtype=np.uint8)
    H, W = frame.shape[:2]
    sx0, sx1 = max(int(ul[0]), 0), min(int(br[0]), W)
    sy0, sy1 = max(int(ul[1]), 0), min(int(br[1]), H)
    if sx1 > sx0 and sy1 > sy0:
        window[sy0 - ul[1]:sy1 - ul[1], sx0 - ul[0]:sx1 - ul[0]] = frame[sy0:sy1, sx0:sx1]
    t = torch.from_numpy(window).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(resolution, resolution), mode="bilinear", align_corners=False,
                      antialias=False)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def decode_heatmaps(heatmaps) -> np.ndarray:
    """(..., N, Hm, Wm) heatmaps -> (..., N, 2) float (x, y) in heatmap pixels, as face_alignment's
    `get_preds_fromhm`: argmax cell (x0, y0), then, when the peak is not on the border, +-0.25 on
    each axis toward the higher of the two neighbours (0 on a tie), then +0.5 (pixel centre)."""
    hm = torch.as_tensor(heatmaps).detach().float().cpu()
    lead, (hh, ww) = hm.shape[:-2], hm.shape[-2:]
    flat = hm.reshape(-1, hh, ww)
    idx = flat.reshape(flat.shape[0], -1).argmax(dim=1)
    x0, y0 = idx % ww, torch.div(idx, ww, rounding_mode="floor")
    preds = torch.stack([x0, y0], dim=1).double()
    inner = (x0 > 0) & (x0 < ww - 1) & (y0 > 0) & (y0 < hh - 1)
    n = torch.arange(flat.shape[0])
    xi, yi = x0.clamp(1, ww - 2), y0.clamp(1, hh - 2)
    dx = flat[n, y0, xi + 1] - flat[n, y0, xi - 1]
    dy = flat[n, yi + 1, x0] - flat[n, yi - 1, x0]
    shift = torch.stack([dx.sign(), dy.sign()], dim=1).double() * 0.25
    preds = preds + shift * inner[:, None].double() + 0.5
    return preds.reshape(*lead, 2).numpy()


# ------------------------------------------------------------------ inference


@torch.no_grad()
def landmarks_68(model: nn.Module, frame_uint8_rgb: np.ndarray, box: Sequence[float],
                 reference_scale: float = REFERENCE_SCALE) -> np.ndarray:
    """68 (x, y) landmarks in image pixels, float32 (68, 2), for one face box (x1, y1, x2, y2)."""
    center, scale = box_center_scale(box, reference_scale)
    crop = crop_fan_input(frame_uint8_rgb, center, scale, INPUT_SIZE)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    inp = torch.from_numpy(crop).permute(2, 0, 1)[None].to(device=device, dtype=dtype) / 255.0
    out = model(inp)
    if isinstance(out, (list, tuple)):
        out = out[-1]
    hm = out[0].float().cpu()
    if hm.ndim != 3:
        raise ValueError(f"expected heatmaps (N, Hm, Wm), got {tuple(hm.shape)}")
    pts = decode_heatmaps(hm)
    return to_image(pts, center, scale, hm.shape[-1]).astype(np.float32)
