"""The test lanes (tests/conftest.py): which programs a test may start only with which marker, and
that a test starting one unmarked fails, even where it catches the guard's error. The guard runs
here in an inner pytest (a subprocess with this conftest and these markers), on stand-ins: a
`gcs_server` that exits at once, and a `ray` module whose `init` does nothing."""

from __future__ import annotations

import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from conftest import lane_needed

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@pytest.mark.parametrize("argv,needed", [
    (["/venv/lib/ray/core/src/ray/gcs/gcs_server", "--log_dir=/tmp/x"], "cluster"),  # ray.init, serve.run, Cluster
    (["/venv/lib/ray/core/src/ray/raylet/raylet", "--node_ip_address=127.0.0.1"], "cluster"),
    (["/venv/bin/ray", "start", "--head"], "cluster"),
    (["/venv/bin/serve", "run", "serve_config.yaml"], "cluster"),
    (["/venv/bin/serve", "deploy", "c.yaml", "-a", "http://127.0.0.1:8265"], "cluster"),
    (["/venv/bin/avatar-serve", "demo", "--profile", "tiny"], "cluster"),
    ([PY, "-m", "deployments.cli", "demo"], "cluster"),
    (["/usr/bin/chromedriver", "--port=4444"], "browser"),
    (["/venv/bin/ray", "start", "--help"], None),  # what tests/test_readme.py runs: nothing starts
    (["/venv/bin/serve", "run", "--help"], None),
    (["/venv/bin/avatar-serve", "demo", "--help"], None),
    ([PY, "-m", "deployments.cli", "generate", "p.png", "hi"], None),
    (["bash", "-n"], None),
])
def test_which_programs_need_which_marker(argv, needed):
    got = lane_needed(argv[0], argv)
    assert (got and got[0]) == needed, got


INNER = '''
import subprocess
import sys
import types

import pytest


def start_a_ray_node(tmp_path):
    program = tmp_path / "gcs_server"
    program.write_text("#!/bin/sh\\nexit 0\\n")
    program.chmod(0o755)
    subprocess.run([str(program)], check=True)


def test_unmarked_starts_a_node(tmp_path):
    start_a_ray_node(tmp_path)


def test_unmarked_catches_the_guard(tmp_path):
    try:
        start_a_ray_node(tmp_path)
    except RuntimeError:
        pass


@pytest.mark.cluster
def test_marked_starts_a_node(tmp_path):
    start_a_ray_node(tmp_path)


def test_imports_ray():
    sys.modules["ray"] = types.SimpleNamespace(init=lambda *args, **kwargs: None)


def test_unmarked_joins_a_cluster():
    sys.modules["ray"].init(address="auto")


@pytest.mark.cluster
def test_marked_joins_a_cluster():
    sys.modules["ray"].init(address="auto")
'''


def test_a_test_that_starts_ray_unmarked_fails(pytester):
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    pytester.makeini("[pytest]\nmarkers =\n" + textwrap.indent("\n".join(markers), "    ") + "\n")
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    # The caught one passes its call and fails its teardown: counted passed and errored.
    result.assert_outcomes(passed=4, failed=2, errors=1)
    for line in ("*test_unmarked_starts_a_node starts a Ray node*without the `cluster` marker*",
                 "*test_unmarked_catches_the_guard starts a Ray node*",
                 "*test_unmarked_joins_a_cluster starts Ray (ray.init('auto'))*"):
        result.stdout.fnmatch_lines([line])
