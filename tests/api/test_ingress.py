"""The ingress over HTTP (FastAPI TestClient) on the in-process graph: validation, errors, and
the Python API. Stage calls are counted: bad input must never reach a stage."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fastapi.testclient import TestClient

from deployments.api.protocol import ApiError
from deployments.local import LocalGraph
from deployments.media.video import decode_mp4
from helpers import get_dummy_image, png_bytes


@pytest.fixture(scope="module")
def graph(tiny_cfg):
    return LocalGraph(tiny_cfg)


@pytest.fixture(scope="module")
def client(graph):
    with TestClient(graph.ingress.build_app(), raise_server_exceptions=False) as c:
        yield c


IMAGE = png_bytes(get_dummy_image())
GOOD = {"prompt": "a woman talks", "size": "32x16", "num_frames": "5", "seed": "3",
        "num_inference_steps": "2"}


def post(client, data=None, files="default"):
    if files == "default":
        files = {"input_reference": ("p.png", IMAGE, "image/png")}
    return client.post("/v1/videos/sync", data=data if data is not None else GOOD, files=files)


def test_sync_video_returns_mp4(client, graph):
    before = graph.decoder.calls["decode_mp4"]
    r = post(client)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4" and r.headers["x-seed"] == "3"
    frames, fps = decode_mp4(r.content)
    assert frames.shape == (5, 16, 32, 3) and fps == 16
    assert graph.decoder.calls["decode_mp4"] == before + 1


BAD = [
    # (case, form overrides, files, status, param)
    ("not an image", {}, {"input_reference": ("p.png", b"hello, not a png", "image/png")}, 400, "input_reference"),
    ("empty image", {}, {"input_reference": ("p.png", b"", "image/png")}, 400, "input_reference"),
    ("image missing", {}, None, 422, "input_reference"),
    ("empty prompt", {"prompt": ""}, "default", 422, "prompt"),
    ("blank prompt", {"prompt": "   "}, "default", 422, "prompt"),
    ("prompt missing", {"prompt": None}, "default", 422, "prompt"),
    ("size not a multiple of 16", {"size": "30x16"}, "default", 422, "size"),
    ("size malformed", {"size": "big"}, "default", 422, "size"),
    ("size over the profile limit", {"size": "512x512"}, "default", 422, "size"),
    ("num_frames not 4k+1", {"num_frames": "8"}, "default", 422, "num_frames"),
    ("num_frames not a number", {"num_frames": "many"}, "default", 422, "num_frames"),
    ("num_frames over the limit", {"num_frames": "101"}, "default", 422, "num_frames"),
    ("steps < 1", {"num_inference_steps": "0"}, "default", 422, "num_inference_steps"),
    ("steps over the limit", {"num_inference_steps": "500"}, "default", 422, "num_inference_steps"),
    ("negative guidance", {"guidance_scale": "-1"}, "default", 422, "guidance_scale"),
    ("negative seed", {"seed": "-5"}, "default", 422, "seed"),
    ("unknown field", {"colour": "red"}, "default", 422, "colour"),
]


@pytest.mark.parametrize("case,overrides,files,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_before_any_stage(client, graph, case, overrides, files, status, param):
    data = {k: v for k, v in {**GOOD, **overrides}.items() if v is not None}
    calls = graph.stage_calls
    r = post(client, data=data, files=files)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"
    assert graph.stage_calls == calls


def test_oversized_image_gets_413(tiny_cfg):
    graph = LocalGraph(tiny_cfg.model_copy(update={"limits": tiny_cfg.limits.model_copy(
        update={"max_image_bytes": 100})}))
    with TestClient(graph.ingress.build_app()) as c:
        r = post(c)
    assert r.status_code == 413 and r.json()["error"]["param"] == "input_reference"
    assert graph.stage_calls == 0


def test_unknown_route_and_method_use_the_error_envelope(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = client.put("/v1/videos")
    assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok", "profile": "tiny"}


def test_python_api_returns_frames_and_fills_the_seed(graph):
    result = asyncio.run(graph.ingress.generate({"prompt": "a man smiles", "size": "16x16", "num_frames": 5,
                                                 "num_inference_steps": 2}, get_dummy_image(), output="frames"))
    assert result.frames.shape == (5, 16, 16, 3) and result.frames.dtype == np.uint8
    assert result.params.seed >= 0 and result.mp4 is None
    # Same seed, same frames.
    again = asyncio.run(graph.ingress.generate({"prompt": "a man smiles", "size": "16x16", "num_frames": 5,
                                                "num_inference_steps": 2, "seed": result.params.seed},
                                               get_dummy_image(), output="frames"))
    np.testing.assert_array_equal(again.frames, result.frames)


def test_python_api_validates_too(graph):
    with pytest.raises(ApiError) as exc:
        asyncio.run(graph.ingress.generate({"prompt": "x", "num_frames": 6}, get_dummy_image()))
    assert exc.value.status == 422 and exc.value.param == "num_frames"
