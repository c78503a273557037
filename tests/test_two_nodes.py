"""Two Ray nodes on this machine (Ray's own `cluster_utils.Cluster`: a head and a worker, fake GPUs
on each): the experts pinned to the worker by a custom resource, the other stages to the head, as
an operator splits a multi-node cluster (README, Multi-node). A job and a talk turn run across them
over HTTP."""

from __future__ import annotations

import httpx
import pytest

from helpers import free_port, get_dummy_image, png_bytes, wait_final, wait_ready, wav_bytes

VIDEO = {"prompt": "a woman talks", "size": "32x32", "num_frames": "5", "num_inference_steps": "2"}
FILES = {"input_reference": ("p.png", png_bytes(get_dummy_image()), "image/png")}
STAGES = {"Encoder": "head", "DitExpertHigh": "experts", "DitExpertLow": "experts", "Decoder": "head",
          "LipSync": "head", "Ingress": "head"}
pytestmark = pytest.mark.cluster


def test_stages_split_over_two_nodes_serve_a_job_and_a_talk_turn(tmp_path):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from graph import GraphArgs, app

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "num_gpus": 3, "resources": {"head": 10},
        "include_dashboard": True, "dashboard_port": free_port()})  # the state API asks the dashboard
    worker = cluster.add_node(num_cpus=2, num_gpus=2, resources={"experts": 10})
    port = free_port()
    pin = {"head": {"resources": {"head": 1}}, "experts": {"num_gpus": 1, "resources": {"experts": 1}}}
    overrides = {
        "stages": {"encoder": {"placement": {**pin["head"], "num_gpus": 1}},
                   "decoder": {"placement": {**pin["head"], "num_gpus": 1}},
                   "lipsync": {"placement": {**pin["head"], "num_gpus": 1},
                               "avatar_cache_dir": str(tmp_path / "avatars")},
                   "ingress": {"placement": pin["head"]},
                   "high": {"placement": pin["experts"]}, "low": {"placement": pin["experts"]}},
        "serving": {"storage_dir": str(tmp_path / "store")}}
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app(GraphArgs(profile="tiny", overrides=overrides)), name="avatar-serve", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        # Where Ray put each stage: the experts on the worker, everything else on the head.
        actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                             limit=1000)
        nodes = {}
        for a in actors:
            for name in STAGES:
                if a.class_name.endswith(f":{name}"):
                    nodes[name] = a.node_id
        head = cluster.head_node.node_id
        assert nodes == {name: worker.node_id if where == "experts" else head for name, where in STAGES.items()}, nodes
        with httpx.Client(base_url=url, timeout=120) as client:
            job = client.post("/v1/videos", data=VIDEO, files=FILES).json()
            assert wait_final(client, job["id"])["status"] == "completed"
            avatar = wait_ready(client, client.post("/v1/avatars", data=VIDEO, files=FILES).json()["id"])
            r = client.post(f"/v1/avatars/{avatar['id']}/speech", files={"audio": ("a.wav", wav_bytes(1.0), "audio/wav")})
            assert r.status_code == 200 and r.content[4:8] == b"ftyp", r.text[:200]
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
