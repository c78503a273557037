"""The graph in cluster mode: a real Ray cluster with fake GPUs, deployed from serve_config.yaml,
called over real HTTP and through DeploymentHandles."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from conftest import free_port, get_dummy_image, png_bytes
from deployments.local import LocalGraph
from deployments.video import decode_mp4

ROOT = Path(__file__).resolve().parent.parent
APP = "avatar-serve"
GPU_STAGES = ["Encoder", "DitExpertHigh", "DitExpertLow", "Decoder"]
# Split placement: every GPU stage on a card of its own.
SPLIT = {"stages": {s: {"placement": {"num_gpus": 1}} for s in ("encoder", "high", "low", "decoder")}}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve

    from graph import GraphArgs, app

    spec = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
    assert spec["import_path"] == "graph:app"
    args = GraphArgs(**{**spec["args"], "overrides": SPLIT})
    port = free_port()
    ray.init(num_cpus=4, num_gpus=5, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app(args), name=APP, route_prefix=spec["route_prefix"])
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def stage(name):
    from ray import serve

    return serve.get_deployment_handle(name, app_name=APP)


def test_sync_video_over_http(cluster):
    files = {"input_reference": ("p.png", png_bytes(get_dummy_image()), "image/png")}
    data = {"prompt": "a woman talks", "size": "48x32", "num_frames": "9", "seed": "5"}
    r = httpx.post(f"{cluster}/v1/videos/sync", data=data, files=files, timeout=120)
    assert r.status_code == 200, r.text
    frames, fps = decode_mp4(r.content)
    assert frames.shape == (9, 32, 48, 3) and fps == 16


def test_each_gpu_stage_gets_its_own_gpu(cluster):
    devices = {name: stage(name).info.remote().result(timeout_s=60)["cuda_visible_devices"]
               for name in GPU_STAGES}
    assert all(devices.values()), devices
    assert len(set(devices.values())) == len(GPU_STAGES), devices


def test_handle_api_equals_in_process_graph(cluster, tiny_cfg):
    from ray import serve

    request = {"prompt": "a man smiles", "size": "16x16", "num_frames": 5, "seed": 9,
               "num_inference_steps": 2}
    handle = serve.get_app_handle(APP)
    remote = handle.generate.remote(request, get_dummy_image(), "frames").result(timeout_s=120)
    import asyncio

    local = asyncio.run(LocalGraph(tiny_cfg).ingress.generate(request, get_dummy_image(), "frames"))
    assert remote.frames.shape == (5, 16, 16, 3)
    np.testing.assert_array_equal(remote.frames, local.frames)


def test_bad_input_over_http_never_reaches_a_stage(cluster):
    steps_before = stage("DitExpertHigh").info.remote().result(timeout_s=60)["steps_run"]
    files = {"input_reference": ("p.png", b"not an image", "image/png")}
    r = httpx.post(f"{cluster}/v1/videos/sync", data={"prompt": "x"}, files=files, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_reference"
    r = httpx.post(f"{cluster}/v1/videos/sync", data={"prompt": "x", "num_frames": "10"},
                   files={"input_reference": ("p.png", png_bytes(get_dummy_image()), "image/png")}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["param"] == "num_frames"
    assert stage("DitExpertHigh").info.remote().result(timeout_s=60)["steps_run"] == steps_before
    assert httpx.get(f"{cluster}/healthz", timeout=30).json()["status"] == "ok"
