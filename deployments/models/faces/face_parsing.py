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
    class map -> keep MuseTalk's classes (skin 1, mouth 11, upper lip 12, lower lip 13)
        -> lower part of the crop only -> Gaussian blur (kernel 0.1 of the size, as MuseTalk)
        -> uint8 mask (B, 256, 256), 0 on the crop border and above `upper_ratio`

Class ids (CelebAMask-HQ order used by the checkpoint): 0 background, 1 skin, 2 l_brow, 3 r_brow,
4 l_eye, 5 r_eye, 6 eye_g, 7 l_ear, 8 r_ear, 9 ear_r, 10 nose, 11 mouth, 12 u_lip, 13 l_lip,
14 neck, 15 neck_l, 16 cloth, 17 hair, 18 hat.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 19
PARSE_SIZE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# MuseTalk musetalk/utils/face_parsing/__init__.py, FaceParsing.__call__: the default mode keeps
# [1, 11, 12, 13] (skin, mouth, upper lip, lower lip; the nose, 10, is NOT kept); mode "neck" adds
# 14 (neck). Mode "jaw" (skin dilated with a cone kernel, cheeks eroded, nose removed) is not
# reproduced here.
MUSETALK_CLASSES = (1, 11, 12, 13)
MUSETALK_NECK_CLASSES = (1, 11, 12, 13, 14)
# MuseTalk blending.py: blur_kernel_size = int(0.1 * size // 2 * 2) + 1.
BLUR_FRACTION = 0.1


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


def _gaussian_kernel(ksize: int) -> torch.Tensor:
    """OpenCV's 1-D Gaussian for sigma=0: sigma = 0.3 * ((ksize - 1) / 2 - 1) + 0.8."""
    sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    x = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    k = torch.exp(-x * x / (2 * sigma * sigma))
    return (k / k.sum()).float()


def face_parsing_mask(class_map: np.ndarray, keep: Sequence[int] = MUSETALK_CLASSES,
                      upper_ratio: float = 0.5, blur: float = BLUR_FRACTION,
                      size: int = 256) -> np.ndarray:
    """Class map uint8 (B, H, W) in crop coordinates -> blend mask uint8 (B, size, size).

    255 where the class is one of `keep`, only from `upper_ratio` of the height down (MuseTalk's
    `upper_boundary_ratio`), blurred with a Gaussian of kernel int(blur * size // 2 * 2) + 1 (as
    MuseTalk's blending). MuseTalk blurs in a crop 1.2x the face box, so its mask fades out
    outside the box; here the mask lives in the box itself, so the kept region is first shrunk by
    the blur radius on every side and the blur's tails are cleared above `upper_ratio` and on the
    outermost pixels: the mask is 0 on the crop border and nothing outside the box can change.
    """
    class_map = np.asarray(class_map)
    if class_map.ndim != 3:
        raise ValueError(f"expected a class map (B, H, W), got {class_map.shape}")
    keep_map = torch.from_numpy(np.isin(class_map, list(keep)).astype(np.float32))[:, None]
    if keep_map.shape[2:] != (size, size):
        keep_map = F.interpolate(keep_map, (size, size), mode="nearest")
    ksize = int(blur * size // 2 * 2) + 1
    r = ksize // 2
    top = int(round(upper_ratio * size))
    region = torch.zeros(size, size)
    region[top + r:size - r, r:size - r] = 1.0
    mask = keep_map * region
    if r > 0:
        k = _gaussian_kernel(ksize)
        mask = F.conv2d(F.pad(mask, (r, r, 0, 0)), k.view(1, 1, 1, ksize))
        mask = F.conv2d(F.pad(mask, (0, 0, r, r)), k.view(1, 1, ksize, 1))
    mask = (mask[:, 0] * 255.0).round().clamp(0, 255).to(torch.uint8).numpy().copy()
    mask[:, :max(top, 1)] = 0
    mask[:, -1:], mask[:, :, :1], mask[:, :, -1:] = 0, 0, 0
    return mask
