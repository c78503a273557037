"""Shared fixtures. Ray is started once per test session (see `serve_app`), never per test.
Shared helper functions live in tests/helpers.py."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a new local ray.init() turns on token auth
# Jobs persist under $AVATAR_SERVE_STORAGE/<profile> by default: keep each test run's own.
os.environ["AVATAR_SERVE_STORAGE"] = tempfile.mkdtemp(prefix="avatar-serve-tests-")

import pytest

from deployments.profiles import load_profile


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_profile("tiny")
