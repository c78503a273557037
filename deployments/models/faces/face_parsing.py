"""MuseTalk's face-parsing blend mask: the BiSeNet face parser (ResNet-18 context path, attention
refinement modules, feature fusion module, 19 CelebAMask-HQ classes) in plain torch.

Module and parameter names follow the published checkpoint (`79999_iter.pth` of
zllrunning/face-parsing.PyTorch, which MuseTalk ships as `models/face-parse-bisent/79999_iter.pth`):
`cp.resnet.conv1.weight`, `cp.arm16.conv.conv.weight`, `ffm.convblk.conv.weight`,
`conv_out.conv_out.weight`, ... so the file loads with `load_state_dict(strict=True)`. The two
auxiliary heads (`conv_out16`, `conv_out32`) exist only so the checkpoint loads strictly; inference
uses the main head alone (as MuseTalk, which reads `net(img)[0]`).

    crops uint8 (B, H, W, 3) -> resized to 512x512, ImageNet mean/std -> BiSeNet
        -> logits (B, 19, 512, 512) -> resized to (H, W) -> argmax -> class map uint8 (B, H, W)
    class map (512x512) -> MuseTalk's FaceParsing modes (`parsing_region`): "raw" (skin, mouth,
        lips), "neck" (+ neck) or v1.5's "jaw" (skin dilated with a cone-shaped kernel, eroded
        sideways in the cheek bands, nose removed, mouth and lips added) -> bool region
    The region becomes a blend mask in deployments/models/musetalk/blend_mask.py.

Class ids (CelebAMask-HQ order used by the checkpoint): 0 background, 1 skin, 2 l_brow, 3 r_brow,
4 l_eye, 5 r_eye, 6 eye_g, 7 l_ear, 8 r_ear, 9 ear_r, 10 nose, 11 mouth, 12 u_lip, 13 l_lip,
14 neck, 15 neck_l, 16 cloth, 17 hair, 18 hat.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 19
PARSE_SIZE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# MuseTalk musetalk/utils/face_parsing/__init__.py, FaceParsing.__call__ (facts, not code): mode
# "raw" keeps [1, 11, 12, 13] (skin, mouth, upper lip, lower lip; not the nose, 10), "neck" adds 14;
# "jaw" (v1.5) takes skin (1), dilates it with a cone kernel (cone 21 rows, tail 12, 33x33), erodes
# the result twice with a 35x3 ellipse where it lies in the cheek bands (x <= 256 - left or
# x >= 256 + right at 512 wide), drops the nose (10) and adds mouth and lips (11, 12, 13).
SKIN, NOSE = 1, 10
MOUTH_AND_LIPS = (11, 12, 13)
RAW_CLASSES = (SKIN, *MOUTH_AND_LIPS)
NECK_CLASSES = (*RAW_CLASSES, 14)
JAW_CONE_HEIGHT, JAW_TAIL_HEIGHT = 21, 12
CHEEK_KERNEL = (35, 3)  # (width, height) of the ellipse
CHEEK_EROSIONS = 2
# v1.5's scripts (scripts/inference.py, realtime_inference.py, app.py) pass --left_cheek_width /
# --right_cheek_width 90 (FaceParsing's own default is 80).
CHEEK_WIDTH = 90


# ------------------------------------------------------------------ the network


class ConvBNReLU(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, ks: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chan, out_chan, kernel_size=ks, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chan)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chan, out_chan, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chan)
        self.conv2 = nn.Conv2d(out_chan, out_chan, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chan)
        self.downsample = None
        if in_chan != out_chan or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(in_chan, out_chan, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_chan))

    def forward(self, x):
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _layer(in_chan: int, out_chan: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_chan, out_chan, stride), BasicBlock(out_chan, out_chan, 1))


class Resnet18(nn.Module):
    """ResNet-18 trunk returning the 1/8, 1/16 and 1/32 features (no classifier)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _layer(64, 64, 1)
        self.layer2 = _layer(64, 128, 2)
        self.layer3 = _layer(128, 256, 2)
        self.layer4 = _layer(256, 512, 2)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)
        return feat8, feat16, feat32


class AttentionRefinementModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, out_chan, ks=3, stride=1, padding=1)
        self.conv_atten = nn.Conv2d(out_chan, out_chan, kernel_size=1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_chan)

    def forward(self, x):
        feat = self.conv(x)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))
        return feat * atten


class ContextPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = Resnet18()
        self.arm16 = AttentionRefinementModule(256, 128)
        self.arm32 = AttentionRefinementModule(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128, ks=3, stride=1, padding=1)
        self.conv_head16 = ConvBNReLU(128, 128, ks=3, stride=1, padding=1)
        self.conv_avg = ConvBNReLU(512, 128, ks=1, stride=1, padding=0)

    def forward(self, x):
        feat8, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(F.adaptive_avg_pool2d(feat32, 1))
        avg_up = F.interpolate(avg, feat32.shape[2:], mode="nearest")
        feat32_up = F.interpolate(self.arm32(feat32) + avg_up, feat16.shape[2:], mode="nearest")
        feat32_up = self.conv_head32(feat32_up)
        feat16_up = F.interpolate(self.arm16(feat16) + feat32_up, feat8.shape[2:], mode="nearest")
        feat16_up = self.conv_head16(feat16_up)
        return feat8, feat16_up, feat32_up  # 1/8, 1/8, 1/16


class FeatureFusionModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.convblk = ConvBNReLU(in_chan, out_chan, ks=1, stride=1, padding=0)
        self.conv1 = nn.Conv2d(out_chan, out_chan // 4, kernel_size=1, bias=False)
        self.conv2 = nn.Conv2d(out_chan // 4, out_chan, kernel_size=1, bias=False)

    def forward(self, fsp, fcp):
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
        return feat * atten + feat


class BiSeNetOutput(nn.Module):
    def __init__(self, in_chan: int, mid_chan: int, n_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, mid_chan, ks=3, stride=1, padding=1)
        self.conv_out = nn.Conv2d(mid_chan, n_classes, kernel_size=1, bias=False)

    def forward(self, x):
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """The face parser. `forward(x)` -> main-head logits (B, n_classes, H, W) at the input size;
    `forward(x, aux=True)` -> (main, out16, out32) as the original returns."""

    def __init__(self, n_classes: int = NUM_CLASSES):
        super().__init__()
        self.cp = ContextPath()
        # The spatial path is replaced by the ResNet's 1/8 feature (no `sp.*` weights).
        self.ffm = FeatureFusionModule(256, 256)
        self.conv_out = BiSeNetOutput(256, 256, n_classes)
        self.conv_out16 = BiSeNetOutput(128, 64, n_classes)
        self.conv_out32 = BiSeNetOutput(128, 64, n_classes)
        self._init_weights()

    def _init_weights(self):
        # As the original: Kaiming-normal (a=1) convolutions; BatchNorm at its defaults.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=1)

    def forward(self, x, aux: bool = False):
        size = x.shape[2:]
        feat8, feat_cp8, feat_cp16 = self.cp(x)
        out = F.interpolate(self.conv_out(self.ffm(feat8, feat_cp8)), size, mode="bilinear",
                            align_corners=True)
        if not aux:
            return out
        out16 = F.interpolate(self.conv_out16(feat_cp8), size, mode="bilinear", align_corners=True)
        out32 = F.interpolate(self.conv_out32(feat_cp16), size, mode="bilinear", align_corners=True)
        return out, out16, out32


# ------------------------------------------------------------------ loading


def load_face_parser(path: str | os.PathLike | None, device="cpu", dtype: torch.dtype = torch.float32,
                     seed: int = 0) -> BiSeNet:
    """A state-dict file (`79999_iter.pth`; read with weights_only=True) or, with `path` None,
    random weights drawn from `seed` (tests) -> BiSeNet in eval mode, `dtype`, on `device`."""
    if path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BiSeNet(NUM_CLASSES)
    else:
        model = BiSeNet(NUM_CLASSES)
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        # Older or converted files may lack BatchNorm's step counters (unused in eval).
        for name, buffer in model.state_dict().items():
            if name.endswith("num_batches_tracked") and name not in state:
                state[name] = buffer
        model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()


# ------------------------------------------------------------------ parsing and masks


@torch.no_grad()
def parse_faces(model: nn.Module, crops: np.ndarray, size: int = PARSE_SIZE,
                batch_size: int = 8) -> np.ndarray:
    """uint8 crops (B, H, W, 3), RGB -> class map uint8 (B, H, W).

    Each crop is resized to size x size (bilinear, as MuseTalk), normalised with the ImageNet
    mean/std and parsed; the logits are resized back to (H, W) before the argmax.
    """
    crops = np.asarray(crops)
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[-1] != 3:
        raise ValueError(f"expected uint8 crops (B, H, W, 3), got {crops.dtype} {crops.shape}")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    h, w = crops.shape[1:3]
    out = []
    for i in range(0, crops.shape[0], batch_size):
        x = torch.from_numpy(crops[i:i + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255.0
        if (h, w) != (size, size):
            x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False)
        x = ((x - mean) / std).to(dtype)
        logits = model(x).float()
        if (h, w) != (size, size):
            logits = F.interpolate(logits, (h, w), mode="bilinear", align_corners=False)
        out.append(logits.argmax(1).to(torch.uint8).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, h, w), dtype=np.uint8)


def jaw_kernel(cone_height: int = JAW_CONE_HEIGHT, tail_height: int = JAW_TAIL_HEIGHT) -> np.ndarray:
    """MuseTalk's "jaw" dilation kernel, uint8 (n, n) with n = cone + tail: empty above the
    centre row of the cone; cone row r (from cone // 2 on) is 2 * (r - cone // 2) + 1 wide around
    the centre column; the tail rows repeat the cone's last row. Anchored at (n // 2, n // 2), it
    spreads a region up to 16 rows upward 21 columns wide and up to 6 rows downward on a
    narrowing tip (OpenCV's dilate reads src(y + i - 16, x + j - 16) for each kernel one)."""
    n = cone_height + tail_height
    kernel = np.zeros((n, n), dtype=np.uint8)
    c = n // 2
    for row in range(cone_height // 2, cone_height):
        half = row - cone_height // 2
        kernel[row, c - half:c + half + 1] = 1
    base = int(kernel[cone_height - 1].sum()) if cone_height > 0 else 1
    kernel[cone_height:, max(0, c - base // 2):min(n, c + base // 2 + 1)] = 1
    return kernel


def ellipse_kernel(width: int, height: int) -> np.ndarray:
    """OpenCV's MORPH_ELLIPSE structuring element of (width, height), uint8 (height, width): row i
    spans c - dx .. c + dx with r = height // 2, c = width // 2, dy = i - r and
    dx = round(c * sqrt((r^2 - dy^2) / r^2)) (0 when r is 0)."""
    kernel = np.zeros((height, width), dtype=np.uint8)
    r, c = height // 2, width // 2
    inv_r2 = 1.0 / (r * r) if r else 0.0
    for i in range(height):
        dy = i - r
        if abs(dy) <= r:
            dx = round(c * float(np.sqrt((r * r - dy * dy) * inv_r2)))
            kernel[i, max(c - dx, 0):min(c + dx + 1, width)] = 1
    return kernel


def _morph(region: torch.Tensor, kernel: np.ndarray, erode: bool) -> torch.Tensor:
    """Binary dilation / erosion of bool (B, H, W) with a structuring element anchored at its
    centre, as OpenCV: outside the image counts as 0 for dilation and 1 for erosion."""
    k = torch.from_numpy(kernel.astype(np.float32))[None, None]
    kh, kw = kernel.shape
    x = F.pad(region.float()[:, None], (kw // 2, kw - 1 - kw // 2, kh // 2, kh - 1 - kh // 2),
              value=1.0 if erode else 0.0)
    hits = F.conv2d(x, k)[:, 0]
    return hits >= float(kernel.sum()) - 0.5 if erode else hits > 0.5


def cheek_bands(width: int, left: int = CHEEK_WIDTH, right: int = CHEEK_WIDTH) -> np.ndarray:
    """bool (width,): the columns MuseTalk's cheek mask covers, x <= c - left or x >= c + right
    with c = width // 2 (OpenCV's filled rectangles include both corners)."""
    x = np.arange(width)
    c = width // 2
    return (x <= c - left) | (x >= c + right)


def parsing_region(class_map: np.ndarray, mode: str = "jaw", left_cheek_width: int = CHEEK_WIDTH,
                   right_cheek_width: int = CHEEK_WIDTH) -> np.ndarray:
    """Class map uint8 (B, H, W) -> bool (B, H, W): the pixels MuseTalk's FaceParsing marks 255
    in `mode` ("raw", "neck" or "jaw"). Kernel and cheek sizes are in pixels of the 512x512 parse."""
    class_map = np.asarray(class_map)
    if class_map.ndim != 3:
        raise ValueError(f"expected a class map (B, H, W), got {class_map.shape}")
    if mode == "raw":
        return np.isin(class_map, RAW_CLASSES)
    if mode == "neck":
        return np.isin(class_map, NECK_CLASSES)
    if mode != "jaw":
        raise ValueError(f"unknown face parsing mode {mode!r}")
    skin = torch.from_numpy(class_map == SKIN)
    dilated = _morph(skin, jaw_kernel(), erode=False)
    eroded = dilated
    for _ in range(CHEEK_EROSIONS):
        eroded = _morph(eroded, ellipse_kernel(*CHEEK_KERNEL), erode=True)
    cheeks = torch.from_numpy(cheek_bands(class_map.shape[2], left_cheek_width, right_cheek_width))
    face = torch.where(cheeks, eroded, dilated).numpy()
    return (face & (class_map != NOSE)) | np.isin(class_map, MOUTH_AND_LIPS)
