"""The API's self-description: /docs and /redoc work offline (Swagger UI and Redoc served from the
package, deployments/api/static/docs/), and /openapi.json describes every route's request fields
(multipart and JSON), its responses and the bearer scheme -- enough for a client built from the
spec alone to create a job and fetch its MP4."""

from __future__ import annotations

import base64
import json
import re
import time
import tomllib
from pathlib import Path

import jsonschema
import pytest
from fastapi.testclient import TestClient

from deployments.api.protocol import AvatarRequest, SpeechRequest, VideoRequest
from deployments.local import LocalGraph
from deployments.profiles import load_profile
from helpers import get_dummy_image, png_bytes, wav_bytes

ROOT = Path(__file__).resolve().parents[2]
DOCS_DIR = ROOT / "deployments" / "api" / "static" / "docs"
UPLOAD_ROUTES = {  # the routes that read their own body: (path, model, file fields, required files)
    "/v1/videos": (VideoRequest, {"input_reference", "audio"}, {"input_reference"}),
    "/v1/videos/sync": (VideoRequest, {"input_reference", "audio"}, {"input_reference"}),
    "/v1/avatars": (AvatarRequest, {"input_reference"}, {"input_reference"}),
    "/v1/avatars/{avatar_id}/speech": (SpeechRequest, {"audio"}, {"audio"}),
}
CONTENT_TYPES = {".js": ("text/javascript", "application/javascript"), ".css": ("text/css",),
                 ".svg": ("image/svg+xml",), ".json": ("application/json",)}


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    return LocalGraph(load_profile("tiny", {"serving": {"storage_dir": str(tmp_path_factory.mktemp("store"))}}))


@pytest.fixture(scope="module")
def client(graph):
    with TestClient(graph.app(), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def spec(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200, r.text
    return r.json()


def resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def operations(spec: dict):
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            yield path, method, op


# ------------------------------------------------------------------ /docs and /redoc offline


def page_urls(html: str) -> list[str]:
    """Every URL a docs page loads: src/href attributes, Redoc's spec-url, Swagger's `url:`."""
    return (re.findall(r'(?:src|href|spec-url)="([^"]*)"', html)
            + re.findall(r"^\s*url:\s*'([^']*)'", html, re.M))


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_the_apps_own_assets(client, page):
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "http://" not in r.text and "https://" not in r.text and "//cdn" not in r.text, r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]  # nor may the scripts reach out
    urls = page_urls(r.text)
    expected = {"/docs": {"swagger-ui-bundle.js", "swagger-ui.css"}, "/redoc": {"redoc.standalone.js"}}[page]
    assert {u.rsplit("/", 1)[-1] for u in urls} >= expected | {"openapi.json", "favicon.svg"}, urls
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        got = client.get(url)
        assert got.status_code == 200, url
        assert got.headers["content-type"].split(";")[0] in CONTENT_TYPES[Path(url).suffix], (url, got.headers)
        if Path(url).suffix != ".json":
            assert got.content == (DOCS_DIR / Path(url).name).read_bytes(), url


def test_docs_need_the_key_but_their_assets_are_public(tmp_path):
    graph = LocalGraph(load_profile("tiny", {"serving": {"storage_dir": str(tmp_path), "api_keys": ["k"]}}))
    with TestClient(graph.app()) as c:
        html = c.get("/docs", headers={"Authorization": "Bearer k"})
        assert c.get("/docs").status_code == 401 and html.status_code == 200
        for url in page_urls(html.text):
            if not url.endswith("openapi.json"):
                assert c.get(url).status_code == 200, url


def test_docs_assets_ship_in_the_package_with_their_licences():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "deployments.api"]
    files = {p for p in DOCS_DIR.iterdir() if p.is_file()}
    assert {"swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "LICENSE-swagger-ui.txt",
            "LICENSE-redoc.txt"} <= {p.name for p in files}
    packaged = {p for pattern in patterns for p in DOCS_DIR.parent.parent.glob(pattern)}  # setuptools' globs
    assert files <= packaged, sorted(p.name for p in files - packaged)
    notes = (DOCS_DIR / "README.md").read_text()
    assert "5.32.6" in notes and "2.5.3" in notes  # the versions vendored


# ------------------------------------------------------------------ the spec


def test_bearer_scheme_on_every_v1_route_and_not_on_the_probes(spec):
    scheme = spec["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    v1 = [(path, method, op) for path, method, op in operations(spec) if path.startswith("/v1/")]
    assert len(v1) >= 15
    for path, method, op in v1:
        assert op.get("security") == [{"bearerAuth": []}], (method, path)
    for path in ("/healthz", "/readyz"):
        assert "security" not in spec["paths"][path]["get"], path
    assert "security" not in spec  # no global requirement: the probes stay open


@pytest.mark.parametrize("path", sorted(UPLOAD_ROUTES))
def test_upload_routes_describe_their_fields_as_multipart_and_json(spec, path):
    model, file_fields, required_files = UPLOAD_ROUTES[path]
    body = spec["paths"][path]["post"]["requestBody"]
    form = body["content"]["multipart/form-data"]["schema"]
    as_json = body["content"]["application/json"]["schema"]
    fields = set(model.model_fields)
    for schema in (form, as_json):
        assert set(schema["properties"]) == fields | file_fields, path
        assert set(schema["required"]) == {n for n, f in model.model_fields.items() if f.is_required()} | required_files
        assert schema["additionalProperties"] is False
    for name in file_fields:
        assert form["properties"][name]["format"] == "binary"
        assert as_json["properties"][name]["type"] == "string"
        assert as_json["properties"][name]["contentEncoding"] == "base64"
    for name in fields:  # a form field is a plain scalar (no null branch): what a form can carry
        assert form["properties"][name]["type"] in ("string", "integer", "number"), (path, name)
    if path.endswith("/speech"):
        assert {"audio/*", "application/octet-stream"} <= set(body["content"])  # a raw audio body too


@pytest.mark.parametrize("path", ["/v1/videos", "/v1/avatars"])
def test_the_json_example_is_first_and_runs_as_it_is(client, spec, path):
    """Swagger UI's "Try it out" starts with the first media type and sends its example unchanged."""
    content = spec["paths"][path]["post"]["requestBody"]["content"]
    assert next(iter(content)) == "application/json"
    example = content["application/json"]["example"]
    jsonschema.validate(example, content["application/json"]["schema"])
    r = client.post(path, json=example)
    assert r.status_code in (200, 201), r.text


def test_responses_are_described(spec):
    def ref(op, status, media="application/json"):
        return op["responses"][status]["content"][media]["schema"]

    assert ref(spec["paths"]["/v1/videos"]["post"], "200") == {"$ref": "#/components/schemas/Job"}
    assert ref(spec["paths"]["/v1/avatars"]["post"], "201") == {"$ref": "#/components/schemas/Avatar"}
    assert ref(spec["paths"]["/v1/videos/{video_id}"]["get"], "200") == {"$ref": "#/components/schemas/Job"}
    for path in ("/v1/videos/sync", "/v1/avatars/{avatar_id}/speech", "/v1/videos/{video_id}/content"):
        op = spec["paths"][path][next(iter(spec["paths"][path]))]
        assert "video/mp4" in op["responses"]["200"]["content"], path
    assert "429" in spec["paths"]["/v1/videos"]["post"]["responses"]
    assert "Retry-After" in spec["paths"]["/v1/videos"]["post"]["responses"]["429"]["headers"]
    envelope = resolve(spec, {"$ref": "#/components/schemas/ErrorResponse"})
    assert resolve(spec, envelope["properties"]["error"])["required"] == ["type", "message"]
    for path, method, op in operations(spec):  # every 4xx is the one error envelope
        for status, response in op["responses"].items():
            if status.startswith("4"):
                assert ref(op, status) == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)
    assert "HTTPValidationError" not in json.dumps(spec)


def test_error_answers_match_the_documented_envelope(client, spec):
    envelope = {"$ref": "#/components/schemas/ErrorResponse", "components": spec["components"]}
    for path, method, r in [("/v1/videos/{video_id}", "get", client.get("/v1/videos/video_nope")),
                            ("/v1/videos", "post", client.post("/v1/videos", data={"prompt": "x"})),
                            ("/v1/videos", "get", client.get("/v1/videos?limit=0")),
                            ("/v1/videos", "post", client.post("/v1/videos", json={"prompt": "x", "input_reference": 1}))]:
        assert str(r.status_code) in spec["paths"][path][method]["responses"], (path, r.status_code)
        jsonschema.validate(r.json(), envelope)


# ------------------------------------------------------------------ a client from the spec alone


def sample(prop: dict, name: str):
    """A value for a JSON-schema property that a client with no other knowledge would send."""
    if prop.get("format") == "binary" or prop.get("contentEncoding") == "base64":
        data = png_bytes(get_dummy_image()) if name != "audio" else wav_bytes(0.5)
        return data if prop.get("format") == "binary" else base64.b64encode(data).decode()
    if "examples" in prop:
        return prop["examples"][0]
    return {"string": "a portrait that smiles", "integer": prop.get("minimum", 0), "number": 1.0}[prop["type"]]


def build_request(spec: dict, path: str, media: str) -> dict:
    """httpx keyword arguments for POST `path` from the spec: the required properties only."""
    schema = resolve(spec, spec["paths"][path]["post"]["requestBody"]["content"][media]["schema"])
    values = {name: sample(schema["properties"][name], name) for name in schema["required"]}
    if media == "application/json":
        return {"json": values}
    files = {n: (n, v, "application/octet-stream") for n, v in values.items() if isinstance(v, bytes)}
    return {"data": {n: str(v) for n, v in values.items() if n not in files}, "files": files}


def job_schema(spec: dict, path: str, method: str, status: str) -> dict:
    schema = spec["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
    return {**schema, "components": spec["components"]}  # $refs resolve against the spec's components


@pytest.mark.parametrize("media", ["multipart/form-data", "application/json"])
def test_a_client_built_only_from_the_spec_creates_a_job(client, media):
    spec = client.get("/openapi.json").json()  # the client's one source of knowledge
    r = client.post("/v1/videos", **build_request(spec, "/v1/videos", media))
    assert r.status_code == 200, r.text
    job = r.json()
    jsonschema.validate(job, job_schema(spec, "/v1/videos", "post", "200"))
    get = spec["paths"]["/v1/videos/{video_id}"]["get"]
    assert [p["name"] for p in get["parameters"]] == ["video_id"]
    deadline = time.monotonic() + 120
    while job["status"] not in ("completed", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.1)
        job = client.get(f"/v1/videos/{job['id']}").json()
    jsonschema.validate(job, job_schema(spec, "/v1/videos/{video_id}", "get", "200"))
    assert job["status"] == "completed", job
    content = client.get(f"/v1/videos/{job['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    assert content.content[4:8] == b"ftyp"
