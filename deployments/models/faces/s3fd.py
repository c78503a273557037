"""The S3FD face detector (Single Shot Scale-invariant Face Detector) in plain torch, as used by
face_alignment's `sfd` detector and MuseTalk's vendored copy of it
(`musetalk/utils/face_detection/detection/sfd/`).

Module and parameter names follow the published checkpoint `s3fd-619a316812.pth`
(https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth, which MuseTalk ships as
`models/face-detection/s3fd.pth` or downloads): `conv1_1.weight` ... `conv7_2.bias`,
`conv3_3_norm.weight`, `conv3_3_norm_mbox_conf.weight`, ... so it loads with
`load_state_dict(strict=True)`.

    frame uint8 RGB (H, W, 3) -> float, RGB -> BGR, minus the BGR mean (104, 117, 123)
        -> VGG16 trunk + extra layers -> 6 (conf, loc) head pairs at strides 4, 8, ..., 128
        -> softmax over (background, face) -> face score per anchor
        -> anchors: centre (stride/2 + j*stride, stride/2 + i*stride), side 4*stride
        -> SSD box decoding with variances (0.1, 0.2)
        -> greedy NMS (IoU 0.3) -> score > 0.5 -> boxes clipped to the frame

Facts taken from face_alignment (1adrianb/face-alignment): `net_s3fd.py` (layers, L2Norm with
scales 10/8/5 and eps 1e-10 added after the sqrt, the max-out background on the first conf head,
fc6 = 3x3 conv with padding 3 and NO dilation), `detect.py` (RGB->BGR flip, mean, softmax,
stride 2**(i+2), anchor 4*stride, variances), `bbox.py` (decode, NMS with the "+1" pixel area
convention, suppression where IoU > thresh), `sfd_detector.py` (NMS 0.3, then score > 0.5).
MuseTalk's `FaceAlignment.get_detections_for_batch` uses the first (highest-scoring) detection
after NMS, then pads and clips it to the image.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Caffe/VGG mean in BGR order (face_alignment detect.py), applied after the RGB -> BGR flip.
BGR_MEAN = (104.0, 117.0, 123.0)
VARIANCES = (0.1, 0.2)
STRIDES = (4, 8, 16, 32, 64, 128)  # stride = 2 ** (level + 2); anchor side = 4 * stride
ANCHOR_SCALE = 4
NMS_THRESHOLD = 0.3
SCORE_THRESHOLD = 0.5


# ------------------------------------------------------------------ the network


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learned per-channel scale (initialised to `scale`)."""

    def __init__(self, n_channels: int, scale: float = 1.0, eps: float = 1e-10):
        super().__init__()
        self.n_channels = n_channels
        self.scale = scale
        self.eps = eps
        self.weight = nn.Parameter(torch.full((n_channels,), float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        return x / norm * self.weight.view(1, -1, 1, 1)


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1, padding: Optional[int] = None) -> nn.Conv2d:
    if padding is None:
        padding = k // 2
    return nn.Conv2d(cin, cout, kernel_size=k, stride=stride, padding=padding)


class S3FD(nn.Module):
    """S3FD with the published parameter names. `forward` returns the 12 head outputs
    [conf1, loc1, conf2, loc2, ..., conf6, loc6] (raw logits / offsets, NCHW), conf with 2
    channels (background, face) at every level: the first level's 4 conf channels are reduced by
    max-out of the 3 background channels."""

    def __init__(self):
        super().__init__()
        # Registration order = the checkpoint's key order.
        self.conv1_1 = _conv(3, 64)
        self.conv1_2 = _conv(64, 64)
        self.conv2_1 = _conv(64, 128)
        self.conv2_2 = _conv(128, 128)
        self.conv3_1 = _conv(128, 256)
        self.conv3_2 = _conv(256, 256)
        self.conv3_3 = _conv(256, 256)
        self.conv4_1 = _conv(256, 512)
        self.conv4_2 = _conv(512, 512)
        self.conv4_3 = _conv(512, 512)
        self.conv5_1 = _conv(512, 512)
        self.conv5_2 = _conv(512, 512)
        self.conv5_3 = _conv(512, 512)
        # face_alignment: kernel 3, padding 3, dilation 1 (the feature map grows by 4).
        self.fc6 = _conv(512, 1024, k=3, padding=3)
        self.fc7 = _conv(1024, 1024, k=1)
        self.conv6_1 = _conv(1024, 256, k=1)
        self.conv6_2 = _conv(256, 512, k=3, stride=2, padding=1)
        self.conv7_1 = _conv(512, 128, k=1)
        self.conv7_2 = _conv(128, 256, k=3, stride=2, padding=1)

        self.conv3_3_norm = L2Norm(256, scale=10)
        self.conv4_3_norm = L2Norm(512, scale=8)
        self.conv5_3_norm = L2Norm(512, scale=5)

        self.conv3_3_norm_mbox_conf = _conv(256, 4)  # 3 background channels (max-out) + face
        self.conv3_3_norm_mbox_loc = _conv(256, 4)
        self.conv4_3_norm_mbox_conf = _conv(512, 2)
        self.conv4_3_norm_mbox_loc = _conv(512, 4)
        self.conv5_3_norm_mbox_conf = _conv(512, 2)
        self.conv5_3_norm_mbox_loc = _conv(512, 4)
        self.fc7_mbox_conf = _conv(1024, 2)
        self.fc7_mbox_loc = _conv(1024, 4)
        self.conv6_2_mbox_conf = _conv(512, 2)
        self.conv6_2_mbox_loc = _conv(512, 4)
        self.conv7_2_mbox_conf = _conv(256, 2)
        self.conv7_2_mbox_loc = _conv(256, 4)

    def forward(self, x: torch.Tensor):
        relu = F.relu
        h = relu(self.conv1_1(x))
        h = relu(self.conv1_2(h))
        h = F.max_pool2d(h, 2, 2)
        h = relu(self.conv2_1(h))
        h = relu(self.conv2_2(h))
        h = F.max_pool2d(h, 2, 2)
        h = relu(self.conv3_1(h))
        h = relu(self.conv3_2(h))
        f3 = relu(self.conv3_3(h))
        h = F.max_pool2d(f3, 2, 2)
        h = relu(self.conv4_1(h))
        h = relu(self.conv4_2(h))
        f4 = relu(self.conv4_3(h))
        h = F.max_pool2d(f4, 2, 2)
        h = relu(self.conv5_1(h))
        h = relu(self.conv5_2(h))
        f5 = relu(self.conv5_3(h))
        h = F.max_pool2d(f5, 2, 2)
        h = relu(self.fc6(h))
        f7 = relu(self.fc7(h))
        h = relu(self.conv6_1(f7))
        f62 = relu(self.conv6_2(h))
        h = relu(self.conv7_1(f62))
        f72 = relu(self.conv7_2(h))

        f3 = self.conv3_3_norm(f3)
        f4 = self.conv4_3_norm(f4)
        f5 = self.conv5_3_norm(f5)

        cls1 = self.conv3_3_norm_mbox_conf(f3)
        # Max-out background: the first three channels are background hypotheses, the 4th is face.
        bg = cls1[:, 0:3].amax(dim=1, keepdim=True)
        cls1 = torch.cat([bg, cls1[:, 3:4]], dim=1)
        return [
            cls1, self.conv3_3_norm_mbox_loc(f3),
            self.conv4_3_norm_mbox_conf(f4), self.conv4_3_norm_mbox_loc(f4),
            self.conv5_3_norm_mbox_conf(f5), self.conv5_3_norm_mbox_loc(f5),
            self.fc7_mbox_conf(f7), self.fc7_mbox_loc(f7),
            self.conv6_2_mbox_conf(f62), self.conv6_2_mbox_loc(f62),
            self.conv7_2_mbox_conf(f72), self.conv7_2_mbox_loc(f72),
        ]


def load_s3fd(path: Optional[str | os.PathLike], device: str | torch.device = "cpu", seed: int = 0) -> S3FD:
    """The detector in eval mode on `device`: weights from `path` (a plain state dict such as
    `s3fd-619a316812.pth`, loaded strictly), or a seeded random init when `path` is None (tests)."""
    if path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = S3FD()
    else:
        model = S3FD()
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.to(device).eval()


# ------------------------------------------------------------------ anchors, decoding, NMS


def make_priors(feature_shapes: Sequence[Tuple[int, int]], strides: Sequence[int] = STRIDES) -> torch.Tensor:
    """Anchors (N, 4) as (cx, cy, w, h) for the given per-level feature-map (H, W), level by level,
    each level row-major (y then x): centre (stride/2 + x*stride, stride/2 + y*stride), side
    4*stride."""
    out = []
    for (fh, fw), stride in zip(feature_shapes, strides):
        ys = torch.arange(fh, dtype=torch.float32) * stride + stride / 2
        xs = torch.arange(fw, dtype=torch.float32) * stride + stride / 2
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        side = torch.full_like(cx, float(ANCHOR_SCALE * stride))
        out.append(torch.stack([cx, cy, side, side], dim=-1).reshape(-1, 4))
    return torch.cat(out) if out else torch.zeros((0, 4))


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor,
                 variances: Tuple[float, float] = VARIANCES) -> torch.Tensor:
    """SSD decoding: offsets (N, 4) = (dx, dy, dw, dh) relative to priors (N, 4) = (cx, cy, w, h)
    -> corner boxes (N, 4) = (x1, y1, x2, y2)."""
    centre = priors[:, :2] + loc[:, :2] * variances[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[:, 2:] * variances[1])
    return torch.cat([centre - size / 2, centre + size / 2], dim=1)


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float = NMS_THRESHOLD) -> torch.Tensor:
    """Greedy NMS; indices (int64) of the kept boxes, highest score first. A box is suppressed
    when its IoU with a kept box is > `threshold`. Areas use face_alignment's "+1" pixel
    convention ((x2 - x1 + 1) * (y2 - y1 + 1))."""
    if boxes.numel() == 0:
        return torch.zeros((0,), dtype=torch.long)
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = torch.argsort(scores, descending=True, stable=True)
    keep = []
    while order.numel() > 0:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        if rest.numel() == 0:
            break
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest]) + 1).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest]) + 1).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= threshold]
    return torch.tensor(keep, dtype=torch.long)


# ------------------------------------------------------------------ detection


def preprocess(frame_uint8_rgb: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, H, W) float32 BGR minus the BGR mean."""
    frame = np.asarray(frame_uint8_rgb)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB frame, got shape {frame.shape}")
    x = torch.from_numpy(np.ascontiguousarray(frame)).to(device=device, dtype=torch.float32)
    x = x.permute(2, 0, 1).flip(0)  # RGB -> BGR
    x = x - torch.tensor(BGR_MEAN, device=device).view(3, 1, 1)
    return x.unsqueeze(0)


@torch.no_grad()
def detect_faces(model: S3FD, frame_uint8_rgb: np.ndarray, score_threshold: float = SCORE_THRESHOLD,
                 nms_threshold: float = NMS_THRESHOLD) -> np.ndarray:
    """Faces in one RGB frame: float32 (K, 5) rows (x1, y1, x2, y2, score), highest score first,
    coordinates clipped to [0, W] x [0, H]. Keeps scores > `score_threshold` after NMS.

    face_alignment runs NMS on all anchors with score > 0.05 and then drops scores <= 0.5;
    thresholding first gives the same result (a box is only ever suppressed by a higher-scoring
    one) for any score_threshold >= 0.05, and is much cheaper."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    height, width = np.asarray(frame_uint8_rgb).shape[:2]
    outputs = model(preprocess(frame_uint8_rgb, device))
    confs, locs = outputs[0::2], outputs[1::2]
    shapes = [tuple(c.shape[-2:]) for c in confs]
    # (N,) face scores and (N, 4) offsets, level by level, row-major within a level (batch 0).
    scores = torch.cat([F.softmax(c.float(), dim=1)[0, 1].reshape(-1) for c in confs]).cpu()
    loc = torch.cat([l[0].float().permute(1, 2, 0).reshape(-1, 4) for l in locs]).cpu()
    priors = make_priors(shapes)

    cand = torch.nonzero(scores > score_threshold).squeeze(1)
    if cand.numel() == 0:
        return np.zeros((0, 5), dtype=np.float32)
    boxes = decode_boxes(loc[cand], priors[cand])
    cand_scores = scores[cand]
    keep = nms(boxes, cand_scores, nms_threshold)
    boxes, kept_scores = boxes[keep], cand_scores[keep]
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return torch.cat([boxes, kept_scores[:, None]], dim=1).numpy().astype(np.float32)


def largest_face_box(model: S3FD, frame_uint8_rgb: np.ndarray, score_threshold: float = SCORE_THRESHOLD,
                     nms_threshold: float = NMS_THRESHOLD) -> Optional[Tuple[float, float, float, float]]:
    """The box (x1, y1, x2, y2) of the best face, or None. "Best" is the highest score, as MuseTalk
    (which takes the first detection after NMS), not the largest area."""
    dets = detect_faces(model, frame_uint8_rgb, score_threshold, nms_threshold)
    if len(dets) == 0:
        return None
    x1, y1, x2, y2 = (float(v) for v in dets[0, :4])
    return (x1, y1, x2, y2)
