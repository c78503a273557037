"""Ray's own token auth on a cluster that `serve run` starts for itself, as the README tells a
newcomer: Ray's commands against it need RAY_AUTH_MODE=token (the token read from
~/.ray/auth_token); `ray get-auth-token` prints the token for the dashboard. Its own module: a
Ray cluster of another module still running would be joined by `serve run` instead."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import pytest

from helpers import free_port
from test_ray_start import APP, BIN, ROOT, config_file, run

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]


def test_ray_commands_against_the_cluster_serve_run_starts_need_its_token(tmp_path):
    """What the README says of Ray's token auth: a cluster that `serve run` starts for itself
    has it on; `serve status` then fails without RAY_AUTH_MODE=token and works with it (the token
    read from ~/.ray/auth_token), and `ray get-auth-token` prints that token for the dashboard."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE" and not k.startswith("RAY_ADDRESS")}
    env.update(HOME=str(tmp_path), AVATAR_SERVE_API_KEYS="k1", RAY_USAGE_STATS_ENABLED="0")
    port = free_port()
    server = subprocess.Popen([str(BIN / "serve"), "run", str(config_file(tmp_path, port))], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, "serve run exited"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "serve run's application was not ready"
            time.sleep(1)
        r = run("serve", "status", env=env)
        assert r.returncode != 0 and "AuthenticationError" in r.stdout + r.stderr
        r = run("serve", "status", env={**env, "RAY_AUTH_MODE": "token"})
        assert r.returncode == 0 and APP in r.stdout, r.stderr[-2000:]
        r = run("ray", "get-auth-token", env=env)
        token = (tmp_path / ".ray" / "auth_token").read_text().strip()
        assert r.returncode == 0 and token and token in r.stdout
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C: Serve and the cluster it started shut down
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        run("ray", "stop", "--force", env=env)
