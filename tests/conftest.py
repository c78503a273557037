"""Shared fixtures, and the guard that keeps the test lanes honest. Ray is started once per test
module that needs it, never per test. Shared helper functions live in tests/helpers.py.

Lanes (markers registered in pyproject.toml; `make test` runs them all, `make test-fast` only the
unmarked tests):
  cluster  the test starts Ray: a local cluster (`ray.init`, `serve.run`, helpers.served_graph,
           `ray.cluster_utils.Cluster`) or the `ray` / `serve` commands (`ray start`, `serve run`)
  browser  the test drives a browser (Chromium through chromedriver)
  slow     anything else that takes long (torch.compile, long lip-sync runs, the Ray CLIs' start-up)

A test says what it needs with the marker: `pytestmark = pytest.mark.cluster` for a module, or
`@pytest.mark.cluster` on one test. It cannot forget to: `_lane_guard` below sees every process a
test starts (an audit hook on subprocess.Popen, which every Ray node start, every `ray` command and
chromedriver go through) and fails a test that starts Ray without `cluster`, or a browser without
`browser`, whichever lane it runs in. New test files are covered without being listed anywhere.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a new local ray.init() turns on token auth
# Jobs persist under $AVATAR_SERVE_STORAGE/<profile> by default: keep each test run's own.
os.environ["AVATAR_SERVE_STORAGE"] = tempfile.mkdtemp(prefix="avatar-serve-tests-")

import pytest

from deployments.profiles import load_profile


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_profile("tiny")


# ------------------------------------------------------------------ the lane guard

# Programs whose start means "this test runs Ray": the first processes of any Ray node (started by
# ray.init(address="local"), serve.run without a cluster, Cluster.add_node), and Ray's own commands.
RAY_NODE_PROGRAMS = {"gcs_server", "raylet"}
RAY_COMMANDS = {"ray", "serve"}
BROWSER_PROGRAMS = {"chromedriver", "chromium", "chromium-browser", "chrome", "google-chrome"}
_running: list[pytest.Item] = []  # the test whose setup, call or teardown is running now


def lane_needed(executable, args) -> tuple[str, str] | None:
    """(marker, what) when starting `args` needs a lane's marker, else None."""
    argv = [os.fsdecode(a) for a in args] if isinstance(args, (list, tuple)) else [os.fsdecode(args)]
    names = {os.path.basename(os.fsdecode(executable))} if executable else set()
    names |= {os.path.basename(argv[0])} if argv else set()
    what = " ".join(argv)[:200]
    if names & RAY_NODE_PROGRAMS:
        return "cluster", f"a Ray node ({what})"
    if "--help" in argv or "-h" in argv:  # `ray start --help`, `avatar-serve demo --help`: nothing starts
        return None
    if names & RAY_COMMANDS and len(argv) > 1:
        return "cluster", f"a Ray command ({what})"
    if ("avatar-serve" in names or "deployments.cli" in argv) and "demo" in argv:
        return "cluster", f"the demo, which starts Ray ({what})"
    if names & BROWSER_PROGRAMS:
        return "browser", f"a browser ({what})"
    return None


def _require(marker: str, what: str) -> None:
    """Fail the running test unless it carries `marker`."""
    item = _running[-1] if _running else None
    if item is None or item.get_closest_marker(marker) is not None:
        return
    message = (f"{item.nodeid} starts {what} without the `{marker}` marker: add "
               f"`pytestmark = pytest.mark.{marker}` to its module (or @pytest.mark.{marker} to the "
               f"test), so that `make test-fast` leaves it out")
    item.stash.setdefault(_UNMARKED, []).append(message)
    raise RuntimeError(message)


def _lane_guard(event: str, args: tuple) -> None:
    if event == "subprocess.Popen" and _running:
        needed = lane_needed(args[0], args[1])
        if needed:
            _require(*needed)


def _guard_ray_init() -> None:
    """`ray.init` joining a cluster that is already up starts no process: guard the call itself,
    once something has imported Ray."""
    ray = sys.modules.get("ray")
    init = getattr(ray, "init", None)
    if init is None or getattr(init, "lane_guarded", False):
        return

    @functools.wraps(init)
    def guarded(*args, **kwargs):
        _require("cluster", f"Ray (ray.init({kwargs.get('address') or (args[0] if args else '')!r}))")
        return init(*args, **kwargs)

    guarded.lane_guarded = True
    ray.init = guarded


_UNMARKED = pytest.StashKey[list]()


def pytest_configure(config):
    sys.addaudithook(_lane_guard)  # cannot be removed; inert outside a running test


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _guard_ray_init()
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.remove(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that started Ray or a browser unmarked fails, even where the code that started it
    caught the guard's exception."""
    report = yield
    unmarked = item.stash.get(_UNMARKED, [])
    if unmarked and report.failed:
        unmarked.clear()  # it failed with the guard's message (or another): nothing to add
    elif unmarked and call.when == "teardown":
        report.outcome = "failed"
        report.longrepr = "\n".join(unmarked)
    return report


# ------------------------------------------------------------------ the fast lane's budget

SLOW_CANDIDATE_S = 10.0  # a test the fast lane runs for longer than this is named in the summary


def pytest_terminal_summary(terminalreporter, config):
    """When slow tests are deselected (`make test-fast`), name the ones left that took long, so the
    fast lane stays fast as tests are added. A note, not a failure: machines differ."""
    if "not slow" not in (config.option.markexpr or ""):
        return
    took: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) in ("setup", "call", "teardown"):
                took[report.nodeid] = took.get(report.nodeid, 0.0) + report.duration
    long = sorted(((s, n) for n, s in took.items() if s > SLOW_CANDIDATE_S), reverse=True)
    if long:
        terminalreporter.section(f"fast-lane tests over {SLOW_CANDIDATE_S:g} s (speed them up or mark them slow)")
        for seconds, nodeid in long:
            terminalreporter.write_line(f"{seconds:6.1f} s  {nodeid}")
