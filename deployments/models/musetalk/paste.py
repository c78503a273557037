"""MuseTalk's paste-back on the GPU: generated face crops resized into their boxes and blended
into the avatar's base frames, on the device that made them, so only finished frames travel to
the host (and the CPU is left to the H.264 encoder).

    crops uint8 (B, 256, 256, 3) on the device + the avatar's frames, boxes and masks
      -> each crop resized to its box (bilinear, antialiased like PIL's)
      -> frame region + alpha * (crop - region), alpha = the crop-space mask resized to the box
      -> uint8 frames (B, H, W, C) on the device; C = 3 (RGB) or 4 (RGBA, for encoders that take it)

The masks are whatever the avatar was prepared with (MuseTalk v1.5's jaw masks with a face parser,
blend_mask.py, else the feathered rectangle), computed once per source frame at preparation and
resized to their boxes once per avatar here; each frame then costs one crop resize and one mix.
It computes what `avatar.blend_face` computes with PIL on the CPU; the two differ by at most a few
levels where PIL's 8-bit fixed-point resampling rounds differently (tests/models/test_musetalk.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deployments.models.musetalk.avatar import PreparedAvatar


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, C, h, w) float -> (B, C, height, width): bilinear, antialiased when shrinking (PIL's
    BILINEAR filter widens its support the same way)."""
    return F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


class PasteBack:
    """One prepared avatar's base frames and per-frame blend weights, resident on `device`."""

    def __init__(self, avatar: PreparedAvatar, device: torch.device | str, channels: int = 3):
        if channels not in (3, 4):
            raise ValueError(f"channels must be 3 (RGB) or 4 (RGBA), got {channels}")
        self.prepared_id, self.channels = avatar.prepared_id, channels
        frames = torch.from_numpy(avatar.frames).to(device)  # (N, H, W, 3) uint8
        if channels == 4:
            frames = torch.cat([frames, torch.full_like(frames[..., :1], 255)], dim=-1)
        self.frames = frames
        self.boxes = [tuple(int(v) for v in box) for box in avatar.boxes]
        masks = torch.from_numpy(avatar.masks).to(device).float()[:, None]  # (N, 1, 256, 256)
        # The mask of each source frame resized to its box once, as (h, w, 1) weights in [0, 1].
        self.alphas = [resize(masks[i:i + 1], y2 - y1, x2 - x1)[0].permute(1, 2, 0) / 255.0
                       for i, (x1, y1, x2, y2) in enumerate(self.boxes)]

    def __call__(self, sources: list[int], crops: torch.Tensor) -> torch.Tensor:
        """Source frame indices (B,) + crops uint8 (B, 256, 256, 3) on the device -> frames
        uint8 (B, H, W, channels) on the device."""
        out = self.frames[sources]  # a copy (advanced indexing)
        faces = crops.permute(0, 3, 1, 2).float()
        for row, s in enumerate(sources):
            x1, y1, x2, y2 = self.boxes[s]
            face = resize(faces[row:row + 1], y2 - y1, x2 - x1)[0].permute(1, 2, 0)  # (h, w, 3)
            region = out[row, y1:y2, x1:x2, :3].float()
            mixed = region + self.alphas[s] * (face - region)
            out[row, y1:y2, x1:x2, :3] = mixed.round_().clamp_(0, 255).to(torch.uint8)
        return out
