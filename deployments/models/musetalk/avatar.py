"""Avatar preparation for MuseTalk: everything about a base clip that does not depend on speech,
computed once, cached on disk by content hash, and reused by every talk turn.

    base clip uint8 (N, H, W, 3) at its own fps (16 for Wan clips)
      -> retimed to 25 fps by nearest frame: source_index (M,) into the N frames
      -> per source frame: face box (x1, y1, x2, y2) -> crop resized to 256x256
      -> VAE latents of [crop with its lower half masked | whole crop] -> (8, 32, 32)
      -> blend mask (256, 256) uint8 in crop coordinates: MuseTalk v1.5's jaw mask when a face
         parser is configured (blend_mask.py), else the feathered lower-face rectangle

This module is model-free: the caller passes the VAE encode as a function, so the cache, the
boxes and the blending are tested without models. The cycle, the retiming and the window
arithmetic are in features.py; the models that run preparation, in pipeline.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import PIL.Image
import PIL.ImageFilter

from deployments.common.payloads import AvatarInfo
from deployments.models.musetalk.timing import VIDEO_FPS, base_frame_index, retime_indices

CROP_SIZE = 256
# Bump when what is stored (or how it is computed) changes: old cache entries stop matching.
# 2: face-parsing masks are MuseTalk v1.5's jaw masks on the 1.5x crop.
CACHE_FORMAT = 2

Box = tuple[int, int, int, int]  # (x1, y1, x2, y2), pixels, x2/y2 exclusive


# ------------------------------------------------------------------ face boxes


class FaceDetector(Protocol):
    """Pluggable face box source: one uint8 frame (H, W, 3) -> a box (x1, y1, x2, y2) in pixels.

    A landmark detector (MuseTalk: 68 landmarks, landmark 29 as the centre line) implements this;
    the default needs no weights.
    """

    name: str

    def __call__(self, frame: np.ndarray) -> Box: ...


@dataclass(frozen=True)
class CenterBox:
    """A fixed box given in fractions of the frame (x1, y1, x2, y2): for portraits framed the
    way the Wan prompt asks, and for the tiny profile."""

    fractions: tuple[float, float, float, float] = (0.3, 0.15, 0.7, 0.75)

    @property
    def name(self) -> str:
        return "center:" + ",".join(f"{f:g}" for f in self.fractions)

    def __call__(self, frame: np.ndarray) -> Box:
        h, w = frame.shape[:2]
        fx1, fy1, fx2, fy2 = self.fractions
        return (int(round(fx1 * w)), int(round(fy1 * h)), int(round(fx2 * w)), int(round(fy2 * h)))


def box_from_landmarks(landmarks: np.ndarray, fallback: Sequence[float] | None = None,
                       bbox_shift: int = 0) -> Box:
    """MuseTalk's face box from 68 face landmarks (iBUG 300-W order, (68, 2) pixels as x, y).

    The nose bridge point 29 is the centre line: the box reaches as far above it as the lowest
    landmark (the chin) lies below it, and spans the landmarks' x range. `bbox_shift` moves the
    centre line down (+) or up (-) in pixels. A degenerate result (empty, or left of the frame)
    falls back to the face detector's own box, as MuseTalk does.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"expected 68 landmarks (68, 2), got {lm.shape}")
    centre_y = lm[29, 1] + bbox_shift
    bottom = lm[:, 1].max()
    x1, x2 = lm[:, 0].min(), lm[:, 0].max()
    y1 = centre_y - (bottom - centre_y)
    if bottom - y1 <= 0 or x2 - x1 <= 0 or x1 < 0:
        if fallback is None:
            raise ValueError("landmarks give no usable face box and there is no detector box")
        return tuple(int(v) for v in fallback)
    return int(x1), int(y1), int(x2), int(bottom)


@dataclass(frozen=True)
class LandmarkFaceDetector:
    """A FaceDetector from two pluggable models, combined by MuseTalk's rule:
    `box(frame) -> (x1, y1, x2, y2)` from a face detector, then `landmarks(frame, box) -> (68, 2)`
    face landmarks (the detector's box is the fallback when the landmarks give no usable box).
    MuseTalk uses S3FD and DWPose's face keypoints; any models with these outputs plug in here."""

    box: Callable[[np.ndarray], Sequence[float]]
    landmarks: Callable[[np.ndarray, Sequence[float]], np.ndarray]
    bbox_shift: int = 0
    model_name: str = "landmarks"

    @property
    def name(self) -> str:
        return f"{self.model_name}:shift={self.bbox_shift}"

    def __call__(self, frame: np.ndarray) -> Box:
        box = self.box(frame)
        return box_from_landmarks(self.landmarks(frame, box), box, self.bbox_shift)


def clip_box(box: Sequence[float], height: int, width: int) -> Box:
    """Round and clip a box to the frame; raise if nothing is left."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    x1, x2 = max(0, min(x1, width)), max(0, min(x2, width))
    y1, y2 = max(0, min(y1, height)), max(0, min(y2, height))
    if x2 - x1 < 2 or y2 - y1 < 2:
        raise ValueError(f"face box {tuple(box)} is empty inside a {width}x{height} frame")
    return x1, y1, x2, y2


def face_boxes(frames: np.ndarray, detector: FaceDetector | None, box=None,
               extra_margin: int = 0) -> np.ndarray:
    """Per frame box -> int64 (N, 4).

    `box`: one (x1, y1, x2, y2) for every frame, or (N, 4), used as given (clipped). Otherwise
    the detector's boxes, each extended `extra_margin` pixels below the chin (MuseTalk v1.5).
    """
    n, h, w = frames.shape[:3]
    if box is not None:
        given = np.asarray(box, dtype=np.float64)
        if given.shape == (4,):
            given = np.broadcast_to(given, (n, 4))
        if given.shape != (n, 4):
            raise ValueError(f"face_box must be (4,) or ({n}, 4), got {given.shape}")
        return np.array([clip_box(b, h, w) for b in given], dtype=np.int64)
    if detector is None:
        raise ValueError("no face box given and no face detector configured")
    out = []
    for frame in frames:
        x1, y1, x2, y2 = detector(frame)
        out.append(clip_box((x1, y1, x2, y2 + extra_margin), h, w))
    return np.array(out, dtype=np.int64)


# ------------------------------------------------------------------ crops and masks


def crop_face(frame: np.ndarray, box: Sequence[int], size: int = CROP_SIZE) -> np.ndarray:
    """uint8 (H, W, 3) -> the box resized to uint8 (size, size, 3) (Lanczos, as MuseTalk)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    image = PIL.Image.fromarray(np.ascontiguousarray(frame[y1:y2, x1:x2]))
    return np.asarray(image.resize((size, size), PIL.Image.Resampling.LANCZOS))


def lower_face_mask(upper_ratio: float = 0.5, feather: float = 0.08,
                    size: int = CROP_SIZE) -> np.ndarray:
    """The fallback blend mask, used when no face parser is configured (`blend_mask: feathered`),
    in crop coordinates: uint8 (size, size), 255 on the lower face.

    The rectangle from `upper_ratio` of the height down to the bottom is shrunk by the feather
    width on every side and blurred with sigma = feather / 3, so the mask is 255 well inside,
    falls smoothly and is 0 at the crop border (the pasted face meets the base frame without a
    seam). MuseTalk itself always parses the face (blend_mask.py, which replaces this per frame).
    """
    f = int(round(feather * size))
    mask = np.zeros((size, size), dtype=np.uint8)
    top = int(round(upper_ratio * size))
    mask[top + f:size - f, f:size - f] = 255
    if f > 0:
        image = PIL.Image.fromarray(mask).filter(PIL.ImageFilter.GaussianBlur(radius=f / 3))
        mask = np.asarray(image).copy()
        # Clear the tails a blur leaves on the border so nothing outside the box could change.
        mask[:max(top, 1)] = 0
        mask[-1:], mask[:, :1], mask[:, -1:] = 0, 0, 0
    return mask


def masked_for_unet(crops: np.ndarray) -> np.ndarray:
    """uint8 crops (B, 256, 256, 3) -> float32 (B, 3, 256, 256) in [-1, 1] with the lower half
    set to -1 (black): the UNet must draw the mouth from the audio."""
    pixels = crops_to_pixels(crops)
    pixels[:, :, crops.shape[1] // 2:, :] = -1.0
    return pixels


def crops_to_pixels(crops: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1]."""
    return (crops.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2).copy()


def box_mask(mask: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """Crop-space mask uint8 (256, 256) -> float32 (h, w) in [0, 1] over the box (bilinear)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    resized = PIL.Image.fromarray(mask).resize((x2 - x1, y2 - y1), PIL.Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255.0


def blend_face(frame: np.ndarray, crop: np.ndarray, box: Sequence[int], mask: np.ndarray) -> np.ndarray:
    """Paste a generated 256x256 crop back into its frame.

    frame uint8 (H, W, 3), crop uint8 (256, 256, 3), mask uint8 (256, 256) -> new uint8 frame.
    The crop is resized to the box (bilinear) and mixed in with the mask resized likewise: a
    pixel where the mask is 0 (and every pixel outside the box) keeps the frame's value exactly,
    one where it is 1 takes the crop's.
    """
    x1, y1, x2, y2 = (int(v) for v in box)
    out = np.array(frame, copy=True)
    face = np.asarray(PIL.Image.fromarray(crop).resize((x2 - x1, y2 - y1),
                                                      PIL.Image.Resampling.BILINEAR),
                      dtype=np.float32)
    alpha = box_mask(mask, box)[..., None]
    region = out[y1:y2, x1:x2].astype(np.float32)
    mixed = region + alpha * (face - region)
    out[y1:y2, x1:x2] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return out


# ------------------------------------------------------------------ the prepared avatar


@dataclass(frozen=True)
class PreparedAvatar:
    """Everything a talk turn needs, per source frame (N) plus the retiming map (M).

    frames: uint8 (N, H, W, 3)            the base clip as given
    source_index: int64 (M,)              frame j at `fps` shows frames[source_index[j]]
    boxes: int64 (N, 4)                   face box per source frame
    crops: uint8 (N, 256, 256, 3)         the resized face crops
    latents: float32 (N, 8, 32, 32)       [masked | reference] VAE latents, scaled by 0.18215
    masks: uint8 (N, 256, 256)            blend masks in crop coordinates
    """

    prepared_id: str  # the content hash (`prepared_id`): the lip-sync stage's name for it
    frames: np.ndarray
    source_index: np.ndarray
    boxes: np.ndarray
    crops: np.ndarray
    latents: np.ndarray
    masks: np.ndarray
    fps: int = VIDEO_FPS

    @property
    def num_frames(self) -> int:
        return int(self.source_index.shape[0])

    @property
    def info(self) -> AvatarInfo:
        n, h, w = self.frames.shape[:3]
        return AvatarInfo(self.prepared_id, int(n), self.num_frames, self.fps, int(h), int(w))

    def source_frame(self, i: int, start_index: int = 0) -> int:
        """Output frame i -> source frame: the retimed clip cycled forward then backward."""
        return int(self.source_index[base_frame_index(i + start_index, self.num_frames)])

    _ARRAYS = ("frames", "source_index", "boxes", "crops", "latents", "masks")

    def save(self, path: Path) -> None:
        """Write atomically (temp file + rename) so a reader never sees half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, fps=np.int64(self.fps), format=np.int64(CACHE_FORMAT),
                         **{k: getattr(self, k) for k in self._ARRAYS})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path, prepared_id: str) -> "PreparedAvatar":
        with np.load(path) as data:
            if int(data["format"]) != CACHE_FORMAT:
                raise ValueError(f"{path}: cache format {int(data['format'])}, expected {CACHE_FORMAT}")
            arrays = {k: data[k] for k in cls._ARRAYS}
            fps = int(data["fps"])
        return cls(prepared_id=prepared_id, fps=fps, **arrays)


def prepared_id(frames: np.ndarray, src_fps: float, settings: dict) -> str:
    """A prepared avatar's id on the lip-sync stage, its content hash: the frames' bytes and shape, their frame rate, and every setting that changes
    the prepared result (box or detector, masks, models and their dtype)."""
    h = hashlib.sha256()
    h.update(json.dumps({"shape": list(frames.shape), "fps": float(src_fps), "format": CACHE_FORMAT,
                         **settings}, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(frames).data)
    return h.hexdigest()[:32]


class AvatarStore:
    """Prepared avatars by `prepared_id`: a small in-memory LRU in front of an optional cache folder."""

    def __init__(self, cache_dir: str | os.PathLike | None, max_in_memory: int = 4):
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.max_in_memory = max_in_memory
        self._memory: OrderedDict[str, PreparedAvatar] = OrderedDict()
        # Talk turns run in Ray's thread pool: one lock keeps the LRU consistent.
        self._lock = threading.RLock()

    def path(self, prepared_id: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{prepared_id}.npz"

    def _remember(self, avatar: PreparedAvatar) -> None:
        with self._lock:
            self._memory[avatar.prepared_id] = avatar
            self._memory.move_to_end(avatar.prepared_id)
            # Without a cache folder memory is the only copy: evicting would lose a ready avatar.
            while self.cache_dir is not None and len(self._memory) > self.max_in_memory:
                self._memory.popitem(last=False)

    def get(self, prepared_id: str) -> PreparedAvatar | None:
        with self._lock:
            if prepared_id in self._memory:
                self._memory.move_to_end(prepared_id)
                return self._memory[prepared_id]
        path = self.path(prepared_id)
        if path is not None and path.is_file():
            try:
                avatar = PreparedAvatar.load(path, prepared_id)
            except (ValueError, KeyError, OSError):
                return None  # stale or damaged entry: prepare again
            self._remember(avatar)
            return avatar
        return None

    def put(self, avatar: PreparedAvatar) -> None:
        path = self.path(avatar.prepared_id)
        if path is not None:
            avatar.save(path)
        self._remember(avatar)

    def delete(self, prepared_id: str) -> bool:
        with self._lock:
            found = self._memory.pop(prepared_id, None) is not None
        path = self.path(prepared_id)
        if path is not None and path.is_file():
            path.unlink()
            found = True
        return found


# ------------------------------------------------------------------ preparation

LatentEncoder = Callable[[np.ndarray], np.ndarray]
"""uint8 crops (B, 256, 256, 3) -> float32 (B, 8, 32, 32) [masked | reference] latents."""


MaskFunction = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""uint8 frames (N, H, W, 3) + int64 face boxes (N, 4) -> uint8 blend masks (N, 256, 256)."""


def prepare_avatar(frames: np.ndarray, src_fps: float, encode: LatentEncoder, store: AvatarStore,
                   settings: dict, detector: FaceDetector | None, face_box=None,
                   extra_margin: int = 0, mask: np.ndarray | MaskFunction | None = None,
                   fps: int = VIDEO_FPS) -> PreparedAvatar:
    """Base clip -> PreparedAvatar, from the store when these inputs were prepared before.

    frames: uint8 (N, H, W, 3) at `src_fps`; `settings` names the models and options for the
    content hash; `face_box` overrides the detector (one box, or one per frame). `mask` is one
    uint8 (256, 256) mask for every frame, or a MaskFunction of the frames and their face boxes
    (a face parser; `settings` must then name it, and its `name` joins the hash).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"expected uint8 frames (N, H, W, 3), got {frames.dtype} {frames.shape}")
    if mask is None:
        mask = lower_face_mask()
    key_settings = dict(settings, detector=None if face_box is not None else getattr(detector, "name", repr(detector)),
                        face_box=None if face_box is None else np.asarray(face_box).tolist(),
                        extra_margin=extra_margin, out_fps=fps,
                        mask=getattr(mask, "name", "function") if callable(mask) else
                        hashlib.sha256(np.ascontiguousarray(mask).data).hexdigest()[:16])
    key = prepared_id(frames, src_fps, key_settings)
    cached = store.get(key)
    if cached is not None:
        return cached
    boxes = face_boxes(frames, detector, face_box, extra_margin)
    crops = np.stack([crop_face(f, b) for f, b in zip(frames, boxes)])
    if callable(mask):
        masks = np.asarray(mask(frames, boxes))
        if masks.dtype != np.uint8 or masks.shape != crops.shape[:3]:
            raise ValueError(f"mask function returned {masks.dtype} {masks.shape}, expected uint8 {crops.shape[:3]}")
    else:
        masks = np.repeat(mask[None], frames.shape[0], axis=0)
    latents = np.asarray(encode(crops), dtype=np.float32)
    if latents.shape[:2] != (frames.shape[0], 8):
        raise ValueError(f"latent encoder returned {latents.shape}, expected ({frames.shape[0]}, 8, h, w)")
    avatar = PreparedAvatar(
        prepared_id=key, frames=np.ascontiguousarray(frames),
        source_index=retime_indices(frames.shape[0], src_fps, fps), boxes=boxes, crops=crops,
        latents=latents, masks=masks, fps=fps)
    store.put(avatar)
    return avatar
