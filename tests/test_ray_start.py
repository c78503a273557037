"""serve_config.yaml on a cluster started with `ray start`, run with the `ray` and `serve` commands
as an operator runs them. Ray's workers there have the environment of `ray start`, not of the
`serve` command, so API keys set only in the shell of `serve run` never reach the application:
it must refuse to start rather than serve every route without a key. Keys given in the
application's runtime_env apply."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
APP = "avatar-serve"
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]


def run(*args: str, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """`ray start --head` from a shell without any key variable (a dashboard for `serve deploy`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVATAR_SERVE_")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               AVATAR_SERVE_STORAGE=str(tmp_path_factory.mktemp("storage")))
    port, dashboard = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    r = run("ray", "start", "--head", f"--port={port}", "--num-cpus=4", "--include-dashboard=true",
            f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--disable-usage-stats", env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    try:
        yield {"env": {**env, "RAY_ADDRESS": address}, "dashboard": f"http://127.0.0.1:{dashboard}",
               "address": address, "http_port": free_port()}  # Serve's HTTP port is fixed once it starts
    finally:
        run("ray", "stop", "--force", env=env)


def config_file(tmp_path: Path, http_port: int, runtime_env: dict | None = None) -> Path:
    """serve_config.yaml as shipped, on a free port, with `runtime_env` when given."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = http_port
    spec = config["applications"][0]
    if runtime_env:
        spec["runtime_env"] = runtime_env
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def app_status(cluster) -> tuple[str, str]:
    r = httpx.get(cluster["dashboard"] + "/api/serve/applications/", timeout=30)
    app = r.json().get("applications", {}).get(APP)
    return (app["status"], app.get("message", "")) if app else ("", "")


def wait_status(cluster, wanted: set[str], timeout: float = 240) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        status, message = app_status(cluster)
        if status in wanted:
            return status, message
        assert status not in {"DEPLOY_FAILED", "UNHEALTHY", "RUNNING"} - wanted, (status, message)
        assert time.monotonic() < deadline, f"application status {status!r}: {message}"
        time.sleep(1)


def test_keys_in_the_serve_shell_only_stop_start_up_instead_of_serving_open(ray_cluster, tmp_path):
    port = ray_cluster["http_port"]
    env = {**ray_cluster["env"], "AVATAR_SERVE_API_KEYS": "k1"}  # `AVATAR_SERVE_API_KEYS=k1 serve run` in a shell
    r = run("serve", "run", "--non-blocking", str(config_file(tmp_path, port)), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    status, message = wait_status(ray_cluster, {"DEPLOY_FAILED"})
    assert "require_api_keys is set but no API key was found" in message
    assert "ray start" in message and "runtime_env" in message  # what to do instead
    with pytest.raises(httpx.HTTPError):  # nothing listens: no route ever answered without a key
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).raise_for_status()


def test_keys_in_the_applications_runtime_env_apply_on_a_ray_start_cluster(ray_cluster, tmp_path):
    """(A key file, serving.api_keys_file, is read at the same place: tests/api/test_routes.py.)"""
    port = ray_cluster["http_port"]
    path = config_file(tmp_path, port, runtime_env={"env_vars": {"AVATAR_SERVE_API_KEYS": "k1,k2"}})
    r = run("serve", "deploy", str(path), "-a", ray_cluster["dashboard"], env=ray_cluster["env"])
    assert r.returncode == 0, r.stderr[-2000:]
    wait_status(ray_cluster, {"RUNNING"})
    url = f"http://127.0.0.1:{port}"
    for headers in ({}, {"Authorization": "Bearer nope"}):
        r = httpx.get(url + "/v1/models", headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    for key in ("k1", "k2"):
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code == 200
    assert httpx.get(url + "/healthz", timeout=30).status_code == 200
    r = run("serve", "shutdown", "-y", "-a", ray_cluster["dashboard"], env=ray_cluster["env"])
    assert r.returncode == 0, r.stderr[-2000:]

