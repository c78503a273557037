"""Shared fixtures. Ray is started once per test session (see `serve_app`), never per test."""

from __future__ import annotations

import io
import os
import socket

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a new local ray.init() turns on token auth

import numpy as np
import pytest
from PIL import Image

from deployments.config import load_profile
from deployments.payloads import VideoParams


def get_dummy_image(seed: int = 0, width: int = 24, height: int = 20) -> np.ndarray:
    """A random uint8 RGB image (H, W, 3); deliberately not the output size, to exercise resizing."""
    return np.random.RandomState(seed).randint(0, 256, size=(height, width, 3), dtype=np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def get_dummy_params(seed: int = 7, **overrides) -> VideoParams:
    values = dict(prompt="a portrait of a woman who talks", negative_prompt="blurry", width=16,
                  height=16, num_frames=9, seed=seed, num_inference_steps=4, guidance_scale=5.0,
                  guidance_scale_2=3.0, fps=16)
    values.update(overrides)
    return VideoParams(**values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_profile("tiny")
