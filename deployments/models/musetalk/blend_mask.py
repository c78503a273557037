"""MuseTalk v1.5's blend mask: where a generated face replaces the base frame, computed once per
source frame when an avatar is prepared, from a face parser's reading of the frame.

    frame uint8 (H, W, 3), face box (x1, y1, x2, y2)
      -> square crop box: the box centre, half-side s = int(max(w, h) // 2 * 1.5)
      -> that crop of the frame (zero outside it), resized to 512x512 (bilinear)
      -> face parser -> class map (512, 512) -> jaw region (face_parsing.parsing_region, "jaw")
      -> region resized to the crop (2s, 2s) (bicubic) -> kept inside the face box only
      -> zeroed above the crop's centre row (upper_ratio 0.5 of the crop)
      -> Gaussian blur, kernel int(0.1 * 2s // 2 * 2) + 1 -> uint8 (2s, 2s)
      -> the face box's part of it, uint8 (h, w): the blend weight of the generated face

Outside the face box the reference blends the base frame with itself (its pasted crop holds the
base frame there), so the box part is the whole effect; it is stored like every blend mask, in
the 256x256 crop coordinates (`to_crop_coordinates`), and resized back to the box when pasted
(avatar.blend_face on the CPU, paste.PasteBack on the GPU).

Facts, not code, from TMElyralab/MuseTalk: `musetalk/utils/blending.py` (`get_crop_box`,
`get_image_prepare_material`, `get_image_blending`), `musetalk/utils/face_parsing/__init__.py`
(`FaceParsing.__call__`, PIL bilinear resize to 512), `scripts/realtime_inference.py` (v1.5 uses
mode "jaw" with cheek widths 90); OpenCV's `GaussianBlur` rules for a kernel size with sigma 0
(`getGaussianKernel`: the fixed 1/3/5/7-tap kernels, otherwise sigma = 0.3 * ((k - 1) / 2 - 1) +
0.8) and its default border, BORDER_REFLECT_101.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from deployments.models.faces.face_parsing import PARSE_SIZE
from deployments.models.musetalk.avatar import CROP_SIZE

EXPAND = 1.5  # v1.5's get_image_prepare_material: the crop box is 1.5x the face box
BLUR_FRACTION = 0.1  # kernel size about 0.1 of the crop side (the real-time path; get_image uses 0.05)

# OpenCV getGaussianKernel's fixed kernels for sigma <= 0 and 1, 3, 5 or 7 taps.
_SMALL_GAUSSIANS = {
    1: (1.0,),
    3: (0.25, 0.5, 0.25),
    5: (0.0625, 0.25, 0.375, 0.25, 0.0625),
    7: (0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125),
}

CropBox = tuple[int, int, int, int]


def expanded_crop_box(box: Sequence[int], expand: float = EXPAND) -> CropBox:
    """The square crop box (x_s, y_s, x_e, y_e) around a face box (x1, y1, x2, y2): centre
    ((x1 + x2) // 2, (y1 + y2) // 2), half-side s = int(max(w, h) // 2 * expand). It may reach
    outside the frame."""
    x1, y1, x2, y2 = (int(v) for v in box)
    xc, yc = (x1 + x2) // 2, (y1 + y2) // 2
    s = int(max(x2 - x1, y2 - y1) // 2 * expand)
    return xc - s, yc - s, xc + s, yc + s


def crop_padded(frame: np.ndarray, crop_box: Sequence[int]) -> np.ndarray:
    """uint8 (H, W, C) -> the crop box's pixels (y_e - y_s, x_e - x_s, C), zero outside the frame
    (as PIL's `Image.crop`)."""
    x_s, y_s, x_e, y_e = (int(v) for v in crop_box)
    h, w = frame.shape[:2]
    out = np.zeros((y_e - y_s, x_e - x_s, *frame.shape[2:]), dtype=frame.dtype)
    sx0, sx1, sy0, sy1 = max(x_s, 0), min(x_e, w), max(y_s, 0), min(y_e, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y_s:sy1 - y_s, sx0 - x_s:sx1 - x_s] = frame[sy0:sy1, sx0:sx1]
    return out


def parser_inputs(frames: np.ndarray, crop_boxes: Sequence[CropBox], size: int = PARSE_SIZE) -> np.ndarray:
    """uint8 frames (N, H, W, 3) + one crop box each -> uint8 (N, size, size, 3): each crop resized
    with PIL's bilinear filter, as MuseTalk's FaceParsing does before the parser."""
    return np.stack([np.asarray(PIL.Image.fromarray(crop_padded(f, cb)).resize((size, size),
                                                                                 PIL.Image.Resampling.BILINEAR))
                     for f, cb in zip(frames, crop_boxes)])


def gaussian_kernel(ksize: int) -> torch.Tensor:
    """OpenCV's 1-D Gaussian for an odd `ksize` and sigma 0 (float64, sums to 1)."""
    if ksize in _SMALL_GAUSSIANS:
        return torch.tensor(_SMALL_GAUSSIANS[ksize], dtype=torch.float64)
    sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    x = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    k = torch.exp(-x * x / (2 * sigma * sigma))
    return k / k.sum()


def gaussian_blur(image: np.ndarray, ksize: int) -> np.ndarray:
    """uint8 (H, W) -> uint8 (H, W): separable Gaussian of `ksize` taps (sigma 0, OpenCV's rule),
    mirrored borders without repeating the edge (BORDER_REFLECT_101), rounded to the nearest."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float64))[None, None]
    r = ksize // 2
    if r > 0:
        k = gaussian_kernel(ksize)
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, ksize))
        x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, ksize, 1))
    return x[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def jaw_blend_mask(region: np.ndarray, box: Sequence[int], crop_box: CropBox, upper_ratio: float = 0.5,
                   blur: float = BLUR_FRACTION) -> np.ndarray:
    """MuseTalk v1.5's blend weights over the face box, uint8 (h, w).

    region: bool (P, P), the parser's jaw region of the crop box (at the parse size, 512).
    The region is resized to the crop side (bicubic, PIL's default for `Image.resize`), cut to the
    face box, cleared above `upper_ratio` of the crop's height, blurred over the whole crop with a
    kernel of int(blur * side // 2 * 2) + 1 taps, and read back inside the face box.
    """
    x1, y1, x2, y2 = (int(v) for v in box)
    x_s, y_s, x_e, y_e = crop_box
    side = x_e - x_s
    if y_e - y_s != side:
        raise ValueError(f"crop box {crop_box} is not square")
    big = np.asarray(PIL.Image.fromarray(np.asarray(region, dtype=np.uint8) * 255).resize(
        (side, side), PIL.Image.Resampling.BICUBIC))
    inside = (slice(y1 - y_s, y2 - y_s), slice(x1 - x_s, x2 - x_s))
    cut = np.zeros_like(big)
    cut[inside] = big[inside]
    cut[:int(side * upper_ratio)] = 0
    blurred = gaussian_blur(cut, int(blur * side // 2 * 2) + 1)
    return blurred[inside].copy()


def to_crop_coordinates(box_mask: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """uint8 (h, w) weights over the face box -> uint8 (size, size) in the crop's coordinates
    (bilinear), the layout every blend mask is stored in."""
    return np.asarray(PIL.Image.fromarray(box_mask).resize((size, size), PIL.Image.Resampling.BILINEAR))
