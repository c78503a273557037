"""Per-request LoRAs end to end (README: Per-request LoRAs): GET /v1/loras, the `loras` field of
videos and avatars (JSON and multipart), refusals before any stage call, the record showing what
was used, and requests with different LoRAs on one expert at once each getting what they get alone."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from deployments.api.lora_request import check_request_loras, parse_loras
from deployments.api.protocol import ApiError
from deployments.ingress import Ingress
from deployments.local import LocalGraph
from deployments.profiles import load_profile
from helpers import TINY_INNER, get_dummy_image, lora_pairs, png_bytes, write_diffusers_lora

REQUEST = {"prompt": "a man smiles", "size": "16x16", "num_frames": 5, "num_inference_steps": 4, "seed": 4}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    write_diffusers_lora(folder / "style.safetensors", lora_pairs(1))
    write_diffusers_lora(folder / "other.safetensors", lora_pairs(2))
    import torch

    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, TINY_INNER + 8),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.ones(TINY_INNER, 4)},
              str(folder / "wrong.safetensors"))
    return folder


@pytest.fixture(scope="module")
def graph(folder):
    return LocalGraph(load_profile("tiny", {"serving": {"lora_dirs": [str(folder)], "max_request_loras": 2}}))


@pytest.fixture(scope="module")
def untouched(folder):
    """A graph no request reaches a stage of: the bad requests share it."""
    return LocalGraph(load_profile("tiny", {"serving": {"lora_dirs": [str(folder)], "max_request_loras": 2}}))


def frames(graph, **extra):
    return asyncio.run(graph.ingress.generate({**REQUEST, **extra}, get_dummy_image(), "frames")).frames


def test_get_loras_lists_names_and_metadata_never_paths(graph, folder):
    with TestClient(graph.app()) as c:
        body = c.get("/v1/loras").json()
    assert [e["name"] for e in body["data"]] == ["other", "style", "wrong"]
    assert body["data"][1]["rank"] == 4 and body["max_per_request"] == 2
    assert str(folder) not in json.dumps(body)


def test_a_request_lora_changes_only_its_request_and_the_record_shows_it(graph):
    base = frames(graph)
    with TestClient(graph.app()) as c:
        r = c.post("/v1/videos/sync", json={**REQUEST, "input_reference": _data_url(),
                                            "loras": [{"name": "style", "high": 1.0, "low": 0.6}]})
        assert r.status_code == 200, r.text
        posted = c.post("/v1/videos", json={**REQUEST, "input_reference": _data_url(),
                                            "loras": [{"name": "style", "high": 1.0, "low": 0.6}]}).json()
        job = c.get(f"/v1/videos/{posted['id']}").json()
        assert job["loras"] == [{"name": "style", "high": 1.0, "low": 0.6}]
    styled = frames(graph, loras=[{"name": "style", "high": 1.0, "low": 0.6}])
    assert np.abs(styled.astype(int) - base.astype(int)).max() > 0
    np.testing.assert_array_equal(frames(graph), base)  # no LoRA after one: today's output exactly
    # high 0: the low expert alone reads it; the high expert never touches its library
    fresh = LocalGraph(graph.ingress.cfg)
    frames(fresh, loras=[{"name": "other", "high": 0, "low": 1.0}])
    assert fresh.high.target._library is None and fresh.low.target._library.cached() == ["other"]


def test_multipart_takes_loras_as_json_text(graph):
    with TestClient(graph.app()) as c:
        form = {k: str(v) for k, v in REQUEST.items()}
        ok = c.post("/v1/videos", data={**form, "loras": '[{"name": "style", "low": 0}]'},
                    files={"input_reference": ("p.png", png_bytes(get_dummy_image()), "image/png")})
        assert ok.status_code == 200, ok.text
        assert ok.json()["loras"] == [{"name": "style", "high": 1.0, "low": 0.0}]
        bad = c.post("/v1/videos", data={**form, "loras": "style"},
                     files={"input_reference": ("p.png", png_bytes(get_dummy_image()), "image/png")})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "loras"


@pytest.mark.parametrize("loras,why", [
    ([{"name": "nope"}], "no LoRA named 'nope'"),
    ([{"name": "style", "high": 5}], "less than or equal to 4"),
    ([{"name": "style", "low": float("nan")}], "finite"),
    ([{"name": "style"}, {"name": "style"}], "named twice"),
    ([{"name": "style"}, {"name": "other"}, {"name": "wrong"}], "at most 2"),
    ([{"name": "../style"}], "pattern"),
    ([{"name": "style", "scale": 1}], "Extra inputs"),
    ("[1, 2]", "entry 0"),
    ({"name": "style"}, "must be a list"),
])
def test_bad_loras_are_422_on_the_field_before_any_stage_call(untouched, loras, why):
    graph = untouched
    with TestClient(graph.app()) as c:
        body = {**REQUEST, "input_reference": _data_url(), "loras": loras}
        for route in ("/v1/videos", "/v1/videos/sync", "/v1/avatars"):
            r = c.post(route, content=json.dumps(body, allow_nan=True),
                       headers={"Content-Type": "application/json"})
            assert r.status_code == 422, (route, r.text)
            assert r.json()["error"]["param"] == "loras" and why in r.json()["error"]["message"]
    assert not any(sum(h.calls.values()) for h in (graph.encoder, graph.high, graph.low, graph.decoder))


def test_a_file_that_does_not_fit_the_expert_fails_the_job_naming_it(graph):
    with TestClient(graph.app()) as c:
        r = c.post("/v1/videos/sync", json={**REQUEST, "input_reference": _data_url(),
                                            "loras": [{"name": "wrong"}]})
    assert r.status_code == 422 and "'wrong'" in r.json()["error"]["message"]
    assert r.json()["error"]["message"].startswith("loras: LoRA 'wrong'")
    np.testing.assert_array_equal(frames(graph), frames(graph))  # the expert still serves


def test_compiled_or_cacheless_expert_refuses_a_strength_on_it(folder):
    loras = parse_loras([{"name": "style", "high": 1.0, "low": 0}])
    compiled = load_profile("tiny", {"serving": {"lora_dirs": [str(folder)]}, "stages": {"high": {"compile": True}}})
    with pytest.raises(ApiError, match="high expert here .it is compiled") as err:
        check_request_loras(loras, compiled)
    assert err.value.param == "loras"
    assert check_request_loras(parse_loras([{"name": "style", "high": 0}]), compiled) == (("style", 0.0, 1.0),)
    off = load_profile("tiny", {"serving": {"lora_dirs": [str(folder)]}, "stages": {"low": {"lora_cache_bytes": 0}}})
    with pytest.raises(ApiError, match="no LoRA cache"):
        check_request_loras(parse_loras([{"name": "style"}]), off)


def test_a_compiled_expert_refuses_request_loras_itself(folder):
    """Behind the ingress's check: the expert refuses too (a caller of the stage's own API)."""
    from deployments.common.errors import LoraError

    graph = LocalGraph(load_profile("tiny", {"serving": {"lora_dirs": [str(folder)]}}))
    expert = graph.high.target
    expert.cfg = expert.cfg.model_copy(update={"compile": True})
    with pytest.raises(LoraError, match="compiled high expert"):
        expert.denoise(_conditioning(graph, (("style", 1.0, 1.0),)))
    expert.denoise(_conditioning(graph, (("style", 0.0, 1.0),)))  # 0 here: nothing to refuse
    assert expert._library is None


def test_an_avatars_id_includes_its_loras(graph):
    image = png_bytes(get_dummy_image())
    params, _ = graph.ingress.prepare(REQUEST, get_dummy_image())
    ids = {Ingress.avatar_id_for(image, replace(params, loras=loras), None, "tiny")
           for loras in ((), (("style", 1.0, 0.6),), (("style", 1.0, 0.5),))}
    assert len(ids) == 3
    same = replace(params, loras=[["style", 1, 0.6]])  # as a re-queued job's saved inputs give it
    assert same == replace(params, loras=(("style", 1.0, 0.6),))
    assert Ingress.avatar_id_for(image, same, None, "tiny") in ids


# ------------------------------------------------------------------ many users at once


def _conditioning(graph, loras):
    params, pixels = graph.ingress.prepare(REQUEST, get_dummy_image())
    cond = graph.encoder.target.encode(params, pixels)
    return replace(cond, params=replace(cond.params, loras=loras))


async def _alternating(expert, conds):
    """Denoise `conds` on one expert, one step of each in turn (A, B, A, B, ...)."""
    streams = [expert.denoise_stream(c) for c in conds]
    last: list = [None] * len(streams)
    order = []
    while any(s is not None for s in streams):
        for i, stream in enumerate(streams):
            if stream is None:
                continue
            try:
                last[i] = await anext(stream)
                order.append(i)
            except StopAsyncIteration:
                streams[i] = None
    return last, order


def test_requests_alternating_steps_with_different_loras_each_get_what_they_get_alone(graph):
    expert = graph.high.target
    sets = [(("style", 1.0, 1.0),), (("other", 0.5, 1.0),), (), (("style", -0.7, 1.0), ("other", 1.0, 1.0))]
    conds = [_conditioning(graph, s) for s in sets]
    alone = [expert.denoise(c).latents.data for c in conds]
    assert not np.array_equal(alone[0], alone[2]) and not np.array_equal(alone[0], alone[1])
    states, order = asyncio.run(_alternating(expert, conds))
    assert order[:4] == [0, 1, 2, 3]  # the steps did interleave
    for a, s in zip(alone, states):
        np.testing.assert_array_equal(s.latents.data, a)


def test_two_jobs_at_once_through_the_graph_equal_each_alone(graph):
    a = {"loras": [{"name": "style", "high": 1.0, "low": 0.6}]}
    b = {"loras": [{"name": "other", "high": 0.8, "low": 1.0}]}
    alone = [frames(graph, **a), frames(graph, **b)]

    async def both():
        return await asyncio.gather(*(graph.ingress.generate({**REQUEST, **x}, get_dummy_image(), "frames")
                                      for x in (a, b)))

    for result, expected in zip(asyncio.run(both()), alone):
        np.testing.assert_array_equal(result.frames, expected)


def _data_url() -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png_bytes(get_dummy_image())).decode()
