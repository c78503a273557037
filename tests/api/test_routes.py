"""The HTTP API (deployments/api/routes.py) over the in-process graph with FastAPI's TestClient:
one table of bad requests for every route (status, field, envelope, and no stage call), the error
envelope for unknown routes and methods, uploads as multipart or JSON, and auth."""

from __future__ import annotations

import base64
import re

import pytest
from fastapi.testclient import TestClient

from deployments.local import LocalGraph
from deployments.media.video import decode_mp4
from deployments.profiles import load_profile
from helpers import get_dummy_image, png_bytes

IMAGE = png_bytes(get_dummy_image())
GOOD = {"prompt": "a woman talks", "size": "32x16", "num_frames": "5", "seed": "3", "num_inference_steps": "2"}
IMAGE_FILE = {"input_reference": ("p.png", IMAGE, "image/png")}


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    return LocalGraph(load_profile("tiny", {"serving": {"storage_dir": str(tmp_path_factory.mktemp("store"))}}))


@pytest.fixture(scope="module")
def client(graph):
    with TestClient(graph.app(), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """A graph that wants the API key `s3cret`, for the tests of refused keys (none reaches a stage)."""
    return LocalGraph(load_profile("tiny", {"serving": {"storage_dir": str(tmp_path_factory.mktemp("keyed")),
                                                        "api_keys": ["s3cret"]}}))


# Rows of a video request (form overrides, files): each runs on POST /v1/videos and /v1/videos/sync.
BAD_VIDEO = [
    # (case, form overrides, files, status, param)
    ("not an image", {}, {"input_reference": ("p.png", b"hello, not a png", "image/png")}, 400, "input_reference"),
    ("gif header only", {}, {"input_reference": ("p.gif", b"GIF89a-no", "image/gif")}, 400, "input_reference"),
    ("truncated png", {}, {"input_reference": ("p.png", IMAGE[:60], "image/png")}, 400, "input_reference"),
    ("empty image", {}, {"input_reference": ("p.png", b"", "image/png")}, 400, "input_reference"),
    ("image missing", {}, None, 422, "input_reference"),
    ("image as text", {"input_reference": "abc"}, None, 422, "input_reference"),
    ("empty prompt", {"prompt": ""}, IMAGE_FILE, 422, "prompt"),
    ("blank prompt", {"prompt": "   "}, IMAGE_FILE, 422, "prompt"),
    ("prompt missing", {"prompt": None}, IMAGE_FILE, 422, "prompt"),
    ("prompt too long", {"prompt": "a" * 2001}, IMAGE_FILE, 422, "prompt"),
    ("size not a multiple of 16", {"size": "30x16"}, IMAGE_FILE, 422, "size"),
    ("size malformed", {"size": "big"}, IMAGE_FILE, 422, "size"),
    ("size over the profile limit", {"size": "512x512"}, IMAGE_FILE, 422, "size"),
    ("num_frames not 4k+1", {"num_frames": "8"}, IMAGE_FILE, 422, "num_frames"),
    ("num_frames not a number", {"num_frames": "many"}, IMAGE_FILE, 422, "num_frames"),
    ("num_frames over the limit", {"num_frames": "101"}, IMAGE_FILE, 422, "num_frames"),
    ("frames and seconds", {"seconds": "1"}, IMAGE_FILE, 422, "seconds"),
    ("seconds negative", {"num_frames": None, "seconds": "-2"}, IMAGE_FILE, 422, "seconds"),
    ("seconds over the limit", {"num_frames": None, "seconds": "60"}, IMAGE_FILE, 422, "num_frames"),
    ("steps < 1", {"num_inference_steps": "0"}, IMAGE_FILE, 422, "num_inference_steps"),
    ("steps not a number", {"num_inference_steps": "ten"}, IMAGE_FILE, 422, "num_inference_steps"),
    ("steps over the limit", {"num_inference_steps": "500"}, IMAGE_FILE, 422, "num_inference_steps"),
    ("negative guidance", {"guidance_scale": "-1"}, IMAGE_FILE, 422, "guidance_scale"),
    ("guidance too big", {"guidance_scale": "1000"}, IMAGE_FILE, 422, "guidance_scale"),
    ("negative seed", {"seed": "-5"}, IMAGE_FILE, 422, "seed"),
    ("seed not an int", {"seed": "1.5"}, IMAGE_FILE, 422, "seed"),
    ("fps zero", {"fps": "0"}, IMAGE_FILE, 422, "fps"),
    ("unknown model", {"model": "sora"}, IMAGE_FILE, 422, "model"),
    ("unknown field", {"colour": "red"}, IMAGE_FILE, 422, "colour"),
    ("audio not audio", {}, {**IMAGE_FILE, "audio": ("a.wav", b"junk", "audio/wav")}, 400, "audio"),
]
BAD = [(f"{path} {case}", "post", path, form, files, status, param)
       for path in ("/v1/videos", "/v1/videos/sync") for case, form, files, status, param in BAD_VIDEO] + [
    # (case, method, path, form, files, status, param)
    ("unknown id", "get", "/v1/videos/video_nope", None, None, 404, "video_id"),
    ("unknown id content", "get", "/v1/videos/video_nope/content", None, None, 404, "video_id"),
    ("unknown id events", "get", "/v1/videos/video_nope/events", None, None, 404, "video_id"),
    ("unknown id delete", "delete", "/v1/videos/video_nope", None, None, 404, "video_id"),
    ("bad list limit", "get", "/v1/videos?limit=0", None, None, 422, "limit"),
    ("bad list cursor", "get", "/v1/videos?after=video_nope", None, None, 422, "after"),
    ("unknown avatar", "get", "/v1/avatars/avatar_nope", None, None, 404, "avatar_id"),
    ("unknown avatar speech", "post", "/v1/avatars/avatar_nope/speech", {}, None, 404, "avatar_id"),
    ("avatar with audio", "post", "/v1/avatars", {}, {**IMAGE_FILE, "audio": ("a.wav", b"x", "audio/wav")}, 422,
     "audio"),
    ("avatar face box backwards", "post", "/v1/avatars", {"face_box": "9,9,1,1"}, IMAGE_FILE, 422, "face_box"),
    ("avatar face box not numbers", "post", "/v1/avatars", {"face_box": "a,b,c,d"}, IMAGE_FILE, 422, "face_box"),
]


@pytest.mark.parametrize("case,method,path,form,files,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_are_refused_before_any_stage(client, graph, case, method, path, form, files, status, param):
    calls, jobs = graph.stage_calls, len(graph.ingress.records.jobs)
    if method == "post":
        data = {k: v for k, v in {**GOOD, **form}.items() if v is not None}
        r = client.post(path, data=data, files=files)
    else:
        r = getattr(client, method)(path)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param"}
    assert body["error"]["param"] == param and body["error"]["message"] and "Traceback" not in r.text
    assert graph.stage_calls == calls and len(graph.ingress.records.jobs) == jobs  # nothing ran or queued


def test_sync_video_returns_mp4(client, graph):
    before = graph.decoder.calls["decode_mp4"]
    r = client.post("/v1/videos/sync", data=GOOD, files=IMAGE_FILE)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4" and r.headers["x-seed"] == "3"
    frames, fps = decode_mp4(r.content)
    assert frames.shape == (5, 16, 32, 3) and fps == 16
    assert graph.decoder.calls["decode_mp4"] == before + 1


def test_oversized_image_gets_413(tiny_cfg):
    graph = LocalGraph(tiny_cfg.model_copy(update={"limits": tiny_cfg.limits.model_copy(
        update={"max_image_bytes": 100})}))
    with TestClient(graph.app()) as c:
        r = c.post("/v1/videos/sync", data=GOOD, files=IMAGE_FILE)
    assert r.status_code == 413 and r.json()["error"]["param"] == "input_reference"
    assert graph.stage_calls == 0


@pytest.mark.parametrize("method,path,status,kind", [
    ("get", "/v1/nothing", 404, "not_found_error"), ("get", "/v2/anything", 404, "not_found_error"),
    ("put", "/v1/videos", 405, "method_not_allowed"), ("patch", "/v1/videos/x", 405, "method_not_allowed"),
    ("post", "/healthz", 405, "method_not_allowed")])
def test_unknown_routes_and_methods_use_the_error_envelope(client, method, path, status, kind):
    r = getattr(client, method)(path)
    assert r.status_code == status and r.json()["error"]["type"] == kind


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok", "profile": "tiny"}


def test_json_body_with_base64_image(client):
    body = {"prompt": "hi", "size": "16x16", "seconds": 0.5, "num_inference_steps": 2,
            "input_reference": "data:image/png;base64," + base64.b64encode(IMAGE).decode()}
    job = client.post("/v1/videos", json=body).json()
    assert job["num_frames"] == 9  # round(0.5 * 16) = 8 -> nearest 4k+1 is 9
    r = client.post("/v1/videos", json={**body, "input_reference": "%%%"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_reference"
    for bad, status in (("[1, 2]", 400), ("{not json", 400)):
        r = client.post("/v1/videos", content=bad, headers={"content-type": "application/json"})
        assert r.status_code == status and r.json()["error"]["type"] == "invalid_request_error"


def test_auth_protects_every_route_but_healthz(keyed):
    graph = keyed
    ok = {"Authorization": "Bearer s3cret"}
    with TestClient(graph.app()) as c:
        assert c.get("/healthz").status_code == 200
        for method, path in [("get", "/v1/models"), ("get", "/v1/videos"), ("post", "/v1/videos"),
                             ("post", "/v1/videos/sync"), ("get", "/v1/videos/x"), ("delete", "/v1/videos/x"),
                             ("get", "/v1/videos/x/content"), ("get", "/v1/videos/x/events"),
                             ("post", "/v1/avatars"), ("get", "/v1/avatars/x"), ("delete", "/v1/avatars/x"),
                             ("post", "/v1/avatars/x/speech"), ("get", "/v1/admin/loras"),
                             ("post", "/v1/admin/loras"), ("delete", "/v1/admin/loras/x")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = getattr(c, method)(path, headers=headers)
                assert r.status_code == 401, (method, path, headers)
                assert r.json()["error"]["type"] == "authentication_error"
                assert r.headers["www-authenticate"] == "Bearer"
        assert graph.stage_calls == 0
        assert c.get("/v1/models", headers=ok).json()["data"][0]["id"] == "tiny"


def test_api_keys_from_environment(monkeypatch):
    monkeypatch.setenv("AVATAR_SERVE_API_KEYS", "k1, k2")
    assert load_profile("tiny").serving.api_keys == ["k1", "k2"]


def test_keys_from_every_source_apply_together(monkeypatch, tmp_path):
    monkeypatch.setenv("AVATAR_SERVE_API_KEYS", "from-env")
    monkeypatch.setenv("MY_ADMIN_KEYS", "root-env")
    (tmp_path / "keys").write_text("# one key a line\nfrom-file\n\n  other-file  \n")
    (tmp_path / "admin").write_text("root-file\n")
    serving = load_profile("tiny", {"serving": {
        "api_keys": ["inline"], "api_keys_file": str(tmp_path / "keys"), "require_api_keys": True,
        "admin_keys_env": "MY_ADMIN_KEYS", "admin_keys_file": str(tmp_path / "admin")}}).serving
    assert serving.api_keys == ["inline", "from-env", "from-file", "other-file"]
    assert serving.admin_keys == ["root-env", "root-file"]


@pytest.mark.parametrize("serving, env, expected", [
    # keys required, none anywhere: the message says where it looked and what a ray start cluster sees
    ({"require_api_keys": True}, {}, "require_api_keys is set but no API key was found"),
    ({"require_api_keys": True}, {}, "runtime_env"),
    # admin keys do not open the API routes' requirement
    ({"require_api_keys": True, "admin_keys": ["root"]}, {}, "no API key was found"),
    # a variable set to separators only: configured, yet no key
    ({}, {"AVATAR_SERVE_API_KEYS": " , ,"}, "AVATAR_SERVE_API_KEYS is set but holds no key"),
    ({}, {"AVATAR_SERVE_ADMIN_KEYS": ","}, "AVATAR_SERVE_ADMIN_KEYS is set but holds no key"),
    # a key file that is missing or empty
    ({"api_keys_file": "/nonexistent/keys"}, {}, "api_keys_file '/nonexistent/keys' cannot be read"),
    ({"admin_keys_file": "EMPTY"}, {}, "holds no key"),
    # a key that could never arrive in a header
    ({"api_keys": ["with space"]}, {}, "visible ASCII"),
    ({"api_keys": ["clé"]}, {}, "visible ASCII"),
])
def test_keys_configured_but_unusable_stop_start_up(monkeypatch, tmp_path, serving, env, expected):
    for name in ("AVATAR_SERVE_API_KEYS", "AVATAR_SERVE_ADMIN_KEYS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if serving.get("admin_keys_file") == "EMPTY":
        (tmp_path / "empty").write_text("# nothing here\n\n")
        serving = {**serving, "admin_keys_file": str(tmp_path / "empty")}
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_profile("tiny", {"serving": serving})


def test_a_header_with_bytes_past_ascii_gets_401_not_500(keyed):
    with TestClient(keyed.app()) as c:
        for value in (b"Bearer \xff\xfe", "Bearer clé".encode("latin-1"), "Bearer s3cr\u00e9t".encode("utf-8")):
            r = c.get("/v1/models", headers=[(b"authorization", value)])
            assert r.status_code == 401, value
            assert r.json()["error"]["type"] == "authentication_error"
        assert c.get("/v1/admin/loras", headers=[(b"authorization", b"Bearer \xe9")]).status_code == 401
