"""LoRA administration through the ingress: a LoRA reaches only the deployments it targets, shows
in /v1/models, changes only its expert's output, and is refused (model untouched) when bad."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fastapi.testclient import TestClient

from deployments.local import LocalGraph
from deployments.profiles import load_profile
from helpers import get_dummy_image, lora_pairs, write_diffusers_lora

REQUEST = {"prompt": "a man smiles", "size": "16x16", "num_frames": 5, "num_inference_steps": 2, "seed": 4}


@pytest.fixture()
def graph(tmp_path):
    return LocalGraph(load_profile("tiny", {"serving": {"lora_dirs": [str(tmp_path)]}}))


@pytest.fixture(scope="module")
def untouched(tmp_path_factory):
    """A graph no request reaches a stage of: the bad requests below share it."""
    return LocalGraph(load_profile("tiny", {"serving": {"lora_dirs": [str(tmp_path_factory.mktemp("loras"))]}}))


def frames(graph):
    return asyncio.run(graph.ingress.generate(REQUEST, get_dummy_image(), "frames")).frames


def test_lora_reaches_only_its_target_and_removal_restores(graph, tmp_path):
    path = write_diffusers_lora(tmp_path / "style.safetensors", lora_pairs(1))
    base = frames(graph)
    with TestClient(graph.app()) as c:
        r = c.post("/v1/admin/loras", json={"name": "style", "path": str(path), "target": "low", "strength": 0.8})
        assert r.status_code == 200, r.text
        assert set(r.json()) == {"low"} and r.json()["low"]["active"][0]["name"] == "style"
        assert graph.high.calls["load_lora"] == 0 and graph.low.calls["load_lora"] == 1
        loras = c.get("/v1/models").json()["data"][0]["loras"]
        assert loras["high"] == [] and [a["strength"] for a in loras["low"]] == [0.8]
    with_lora = frames(graph)
    assert np.abs(with_lora.astype(int) - base.astype(int)).max() > 0
    with TestClient(graph.app()) as c:
        assert c.delete("/v1/admin/loras/style", params={"target": "low"}).status_code == 200
        assert c.get("/v1/models").json()["data"][0]["loras"] == {"high": [], "low": []}
    np.testing.assert_array_equal(frames(graph), base)


@pytest.mark.parametrize("body,status,param", [
    ({"name": "x", "path": "/nope.safetensors", "target": "middle"}, 422, "target"),
    ({"name": "x", "path": "/nope.safetensors"}, 422, "target"),
    ({"name": "bad name!", "path": "/p", "target": "high"}, 422, "name"),
    ({"name": "x", "path": "/p", "target": "high", "strength": 100}, 422, "strength"),
])
def test_bad_lora_requests_never_reach_an_expert(untouched, body, status, param):
    with TestClient(untouched.app()) as c:
        r = c.post("/v1/admin/loras", json=body)
        assert r.status_code == status and r.json()["error"]["param"] == param
    assert untouched.stage_calls == 0


def test_lora_matching_nothing_is_refused_and_expert_keeps_working(graph, tmp_path):
    import torch
    from safetensors.torch import save_file

    bad = tmp_path / "other.safetensors"
    save_file({"transformer.nothing_here.lora_A.weight": torch.zeros(4, 8),
               "transformer.nothing_here.lora_B.weight": torch.zeros(8, 4)}, str(bad))
    base = frames(graph)
    with TestClient(graph.app()) as c:
        r = c.post("/v1/admin/loras", json={"name": "other", "path": str(bad), "target": "both"})
        assert r.status_code == 422 and "match" in r.json()["error"]["message"]
        r = c.post("/v1/admin/loras", json={"name": "gone", "path": str(tmp_path / "missing.safetensors"),
                                            "target": "high"})
        assert r.status_code == 422
        assert c.get("/v1/admin/loras").json()["high"]["loaded"] == []
    np.testing.assert_array_equal(frames(graph), base)


def test_lora_paths_are_confined_and_every_bad_file_is_a_422(tmp_path):
    """A path outside the LoRA folders is refused the same way whether it exists or not (symlinks
    are resolved first); files that are not LoRAs -- text, garbage, a pickle (never unpickled) --
    get the same 422 envelope; nothing reaches an expert's model."""
    import pickle

    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "passwd.safetensors").symlink_to("/etc/passwd")
    (folder / "garbage.safetensors").write_bytes(b"\x00garbage" * 100)
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "evil.pt").write_bytes(pickle.dumps(Boom()))
    graph = LocalGraph(load_profile("tiny", {"serving": {"lora_dirs": [str(folder)]}}))
    with TestClient(graph.app()) as c:
        outside = [c.post("/v1/admin/loras", json={"name": "x", "path": p, "target": "high"})
                   for p in ("/etc/passwd", "/nonexistent/x.safetensors", "../../etc/passwd", "passwd.safetensors")]
        assert {r.status_code for r in outside} == {422}
        assert len({r.json()["error"]["message"] for r in outside}) == 1  # exists or not: one answer
        assert all(r.json()["error"]["param"] == "path" for r in outside)
        inside = [c.post("/v1/admin/loras", json={"name": "x", "path": p, "target": "high"})
                  for p in ("garbage.safetensors", "evil.pt", "missing.safetensors")]
        assert [r.status_code for r in inside] == [422, 422, 422], [r.text for r in inside]
        assert all(set(r.json()["error"]) == {"type", "message", "param"} for r in inside)
        assert c.get("/v1/admin/loras").json()["high"]["loaded"] == []
    assert not marker.exists()


def test_admin_routes_need_an_admin_key_not_an_api_key(tmp_path):
    graph = LocalGraph(load_profile("tiny", {"serving": {"api_keys": ["user"], "admin_keys": ["root"],
                                                         "lora_dirs": [str(tmp_path)]}}))
    user, root = {"Authorization": "Bearer user"}, {"Authorization": "Bearer root"}
    with TestClient(graph.app()) as c:
        assert c.get("/v1/admin/loras").status_code == 401
        r = c.get("/v1/admin/loras", headers=user)
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        assert c.get("/v1/admin/loras", headers=root).status_code == 200
        assert c.get("/v1/models", headers=user).status_code == 200
    only_api = LocalGraph(load_profile("tiny", {"serving": {"api_keys": ["user"]}}))
    with TestClient(only_api.app()) as c:
        r = c.get("/v1/admin/loras", headers=user)
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
