"""`avatar-serve` as a user meets it (issue 13): one-line errors for unreachable servers, bad keys
and API errors; `generate --audio`; Ctrl-C cancels the server's job; avatar preparation shows
progress; `seed -1`; an offline `download --dry-run` that answers in seconds; the demo's inputs.

The server is the in-process graph (deployments.local.LocalGraph) under uvicorn in a thread, so
the CLI talks real HTTP to it, in this process or as a subprocess (for tracebacks and SIGINT);
no Ray cluster is started here.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import wave
from pathlib import Path

import httpx
import pytest

from deployments import cli
from deployments.api.client import AvatarClient, ClientError, ServerUnreachable
from deployments.api.protocol import AvatarRequest, VideoRequest
from deployments.cli.demo import demo_speech, random_weights_note
from deployments.cli.progress import avatar_printer
from deployments.cli.remote import API_KEY_ENV
from deployments.local import LocalGraph, serve_in_thread
from deployments.media.audio import decode_audio
from deployments.models import download as dl
from deployments.profiles import load_profile
from helpers import durations, free_port, get_dummy_image, png_bytes, wav_bytes

ROOT = Path(__file__).resolve().parent.parent
LISTINGS = ROOT / "tests" / "data" / "repo_listings"
KEY = "k"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    graph = LocalGraph(load_profile("tiny", {"serving": {"storage_dir": str(tmp_path_factory.mktemp("store")),
                                                          "api_keys": [KEY]}}))
    url, stop = serve_in_thread(graph.app())
    yield url
    stop()


@pytest.fixture(scope="module")
def slow_url(tmp_path_factory):
    """Denoise steps of 0.3 s: a job or an avatar runs long enough to watch and to interrupt."""
    graph = LocalGraph(load_profile("tiny", {
        "serving": {"storage_dir": str(tmp_path_factory.mktemp("slow")), "api_keys": [KEY]},
        "stages": {r: {"simulate_step_seconds": 0.3} for r in ("high", "low")}}))
    url, stop = serve_in_thread(graph.app())
    yield url
    stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "p.png").write_bytes(png_bytes(get_dummy_image()))
    (d / "a.wav").write_bytes(wav_bytes(0.6))
    return d


@pytest.fixture(autouse=True)
def _no_key_from_the_environment(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)


def run_cli(args: list[str], timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deployments.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def one_error_line(stderr: str) -> str:
    """The CLI's failure output: exactly one line, `error: ...`, no traceback."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


# ------------------------------------------------------------------ one-line errors


def test_an_unreachable_server_is_one_line_and_exit_1(files, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    r = run_cli(["generate", str(files / "p.png"), "hi", "--url", closed, "-o", str(tmp_path / "o.mp4")])
    line = one_error_line(r.stderr)
    assert r.returncode == 1
    assert f"cannot reach the server at {closed}: connection refused" in line
    assert "serve run serve_config.yaml" in line  # a local URL: how to start one
    assert not (tmp_path / "o.mp4").exists()


def test_unknown_host_and_a_server_that_never_answers(files, tmp_path, capsys):
    rc = cli.main(["speak", str(files / "a.wav"), "--avatar", "avatar_x", "--url", "http://no-such-host.invalid:8000",
                   "-o", str(tmp_path / "s.mp4")])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "cannot reach the server at http://no-such-host.invalid:8000: host not found" in line, line

    with socket.create_server(("127.0.0.1", 0)) as mute:  # accepts connections, never answers
        port = mute.getsockname()[1]
        rc = cli.main(["generate", str(files / "p.png"), "hi", "--url", f"http://127.0.0.1:{port}",
                       "--timeout", "1", "-o", str(tmp_path / "o.mp4")])
        line = one_error_line(capsys.readouterr().err)
    assert rc == 1
    assert f"the server at http://127.0.0.1:{port} did not answer in time: timed out" in line, line


def test_missing_and_wrong_keys_say_what_to_do(url, files, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "o.mp4")
    assert cli.main(["generate", str(files / "p.png"), "hi", "--url", url, "-o", out]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: HTTP 401 authentication_error: ") and "give --api-key or set AVATAR_SERVE_API_KEY" in line

    assert cli.main(["generate", str(files / "p.png"), "hi", "--url", url, "--api-key", "wrong", "-o", out]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "HTTP 401" in line and "the server refused this API key" in line

    monkeypatch.setenv(API_KEY_ENV, "wrong")  # a key from the environment counts as given
    assert cli.main(["speak", str(files / "a.wav"), "--avatar", "avatar_x", "--url", url, "-o", out]) == 1
    assert "the server refused this API key" in one_error_line(capsys.readouterr().err)


def test_error_envelopes_and_foreign_error_pages_are_one_line(url, files, tmp_path, capsys, monkeypatch):
    base = ["--url", url, "--api-key", KEY, "-o", str(tmp_path / "o.mp4")]
    # refused by the server (the size is checked against the profile there)
    assert cli.main(["generate", str(files / "p.png"), "hi", "--size", "17x17", *base]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert re.match(r"error: HTTP 422 invalid_request_error: .+ \(size\)$", line), line
    # refused by the client with the server's words (protocol models)
    assert cli.main(["generate", str(files / "p.png"), "hi", "--frames", "6", *base]) == 1
    assert "HTTP 422 invalid_request_error" in one_error_line(capsys.readouterr().err)
    assert cli.main(["speak", str(files / "a.wav"), "--avatar", "avatar_missing", *base]) == 1
    assert "HTTP 404" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o.mp4").exists()
    # a missing input file
    assert cli.main(["generate", str(tmp_path / "none.png"), "hi", *base]) == 1
    assert one_error_line(capsys.readouterr().err) == f"error: No such file or directory: {tmp_path / 'none.png'}"

    # 403, and a proxy's HTML page in front of the server: still one line each
    answers = {"/v1/videos": httpx.Response(403, json={"error": {"type": "permission_error", "message":
                                                                 "not for this key", "param": None}}),
               "/v1/avatars": httpx.Response(502, text="<html>\n<body>\n<h1>502 Bad Gateway</h1>\n</body></html>")}
    fake = httpx.Client(base_url="http://proxy", transport=httpx.MockTransport(lambda req: answers[req.url.path]))
    monkeypatch.setattr("deployments.api.client.AvatarClient",
                        lambda url, api_key=None, **kw: AvatarClient(api_key=api_key, http=fake))
    assert cli.main(["generate", str(files / "p.png"), "hi", "--api-key", KEY]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == "error: HTTP 403 permission_error: not for this key -- this key may not do that", line
    assert cli.main(["speak", str(files / "a.wav"), "--image", str(files / "p.png"), "--prompt", "hi",
                     "-o", str(tmp_path / "s.mp4")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == "error: HTTP 502 http_error: <html> <body> <h1>502 Bad Gateway</h1> </body></html>", line


def test_the_python_client_raises_server_unreachable():
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnreachable) as exc:
        AvatarClient(closed).models()
    assert isinstance(exc.value, ClientError) and exc.value.status == 0
    assert exc.value.error["type"] == "connection_error" and "connection refused" in str(exc.value)


# ------------------------------------------------------------------ generate --audio, seed -1


def test_generate_with_audio_writes_a_lip_synced_clip(url, files, tmp_path, capsys):
    out = tmp_path / "talk.mp4"
    assert cli.main(["generate", str(files / "p.png"), "a woman talks", "--audio", str(files / "a.wav"),
                     "--size", "32x32", "--steps", "2", "--url", url, "--api-key", KEY, "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert ", lip-synced)" in err and "100% completed" in err
    frames, _, audio_s = durations(out.read_bytes())
    assert frames == 15 and abs(audio_s - 0.6) < 0.05  # 25 fps, as long as the audio


def test_seed_minus_one_means_a_random_seed(url, files, tmp_path, capsys):
    base = ["--url", url, "--api-key", KEY, "--size", "16x16", "--frames", "5", "--steps", "2"]
    seeds = []
    for i in range(2):
        assert cli.main(["generate", str(files / "p.png"), "hi", "--seed", "-1", *base,
                         "-o", str(tmp_path / f"{i}.mp4")]) == 0
        seeds.append(int(re.search(r"job video_\w+ \(seed (\d+)", capsys.readouterr().err).group(1)))
    assert seeds[0] != seeds[1]
    # the client: a video leaves the seed to the server; an avatar gets one drawn (its default is 0)
    assert "seed" not in AvatarClient._form(VideoRequest, "hi", {"seed": -1})
    assert int(AvatarClient._form(AvatarRequest, "hi", {"seed": -1})["seed"]) >= 0
    assert AvatarClient._form(VideoRequest, "hi", {"seed": 5})["seed"] == "5"


# ------------------------------------------------------------------ Ctrl-C cancels the job


def test_ctrl_c_cancels_the_server_job_and_exits_130(slow_url, files, tmp_path):
    http = httpx.Client(base_url=slow_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    before = {j["id"] for j in http.get("/v1/videos").json()["data"]}
    proc = subprocess.Popen([sys.executable, "-m", "deployments.cli", "generate", str(files / "p.png"), "hi",
                             "--steps", "20", "--url", slow_url, "--api-key", KEY, "-o", str(tmp_path / "o.mp4")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # Ctrl-C as in a terminal, even when this suite runs with SIGINT ignored
                            # (a background job of a non-interactive shell), which a child inherits.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while True:  # until the job has started denoising
            jobs = [j for j in http.get("/v1/videos").json()["data"] if j["id"] not in before]
            if jobs and (jobs[0].get("step") or 0) >= 1:
                break
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else jobs
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    job_id = jobs[0]["id"]
    assert proc.returncode == 130, err
    assert "Traceback" not in err and f"interrupted: job {job_id} cancelled on the server" in err, err
    deadline = time.monotonic() + 30
    while (job := http.get(f"/v1/videos/{job_id}").json())["status"] not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert job["status"] == "cancelled" and job["step"] < 20, job
    assert not (tmp_path / "o.mp4").exists()


# ------------------------------------------------------------------ avatar preparation progress


def test_speak_shows_the_avatar_being_prepared(slow_url, files, tmp_path, capsys):
    out = tmp_path / "s.mp4"
    assert cli.main(["speak", str(files / "a.wav"), "--image", str(files / "p.png"), "--prompt", "progress",
                     "--size", "32x32", "--seed", "-1", "--url", slow_url, "--api-key", KEY, "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "base clip: denoise step" in err, err
    assert "[##############################] 100% ready" in err
    seed = int(re.search(r"avatar avatar_\w+ \(seed (\d+)\)", err).group(1))
    assert seed >= 0
    assert durations(out.read_bytes())[0] == 15


def test_live_streams_a_file_at_real_time_pace_and_saves_the_session(url, files, tmp_path, capsys):
    """`avatar-serve live`: the file's speech goes out in 100 ms pieces after a little idle, the
    session ends after a little idle again; the one continuous MP4 holds idle and speech, and the
    events say where the speech is. Without a key: one line and exit 1."""
    avatar = AvatarClient(url, api_key=KEY).create_avatar(files / "p.png", "live", size="32x32")["id"]
    out = tmp_path / "live.mp4"
    (tmp_path / "s.wav").write_bytes(wav_bytes(0.4))
    assert cli.main(["live", avatar, "--audio", str(tmp_path / "s.wav"), "--out", str(out), "--lead-in", "0.2",
                     "--tail", "0.2", "--url", url, "--api-key", KEY]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    events = {e["type"]: e for e in map(json.loads, lines) if "type" in e}
    assert events["ready"]["avatar_id"] == avatar
    assert events["speech_ended"]["frame"] - events["speech_started"]["frame"] == 10  # 0.4 s
    assert durations(out.read_bytes())[0] >= events["speech_ended"]["frame"]
    assert cli.main(["live", avatar, "--audio", str(tmp_path / "s.wav"), "--out", str(out), "--url", url]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "live session closed (4401)" in err and "Traceback" not in err
    assert f"this server needs an API key: give --api-key or set {API_KEY_ENV}" in err


def test_avatar_printer_labels():
    buf = io.StringIO()
    show = avatar_printer(buf, width=10)
    for avatar in ({"status": "queued", "queue_position": 2, "progress": 0},
                   {"status": "in_progress", "stage": "encode", "progress": 5},
                   {"status": "in_progress", "stage": "denoise", "step": 3, "progress": 40},
                   {"status": "in_progress", "stage": "lipsync", "progress": 90},
                   {"status": "ready", "progress": 100}):
        show(avatar)
    text = buf.getvalue()
    for label in ("queued (position 2)", "encoding the prompt and portrait", "base clip: denoise step 3",
                  "lip-sync preparation", "[##########] 100% ready"):
        assert label in text
    assert text.endswith("\n")


# ------------------------------------------------------------------ download --dry-run offline


def test_offline_dry_run_asks_the_hub_once_and_answers_from_saved_listings(tmp_path, monkeypatch):
    """An unreachable Hub is probed once, without retries, and not asked again for the other
    repositories (huggingface_hub's own retries made this take over 90 s)."""
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AVATAR_SERVE_STORAGE", str(tmp_path / "in-process"))
    probes, probe = [], dl.probe_hub
    monkeypatch.setattr(dl, "probe_hub", lambda *a, **k: (probes.append(1), probe(*a, **k)))
    monkeypatch.setattr(HfApi, "list_repo_files", lambda *a, **k: pytest.fail("listed through huggingface_hub"))
    assert cli.main(["download", "wan22-i2v-a14b-distill-fp8", "--dry-run"]) == 0
    assert probes == [1]

    env = {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "AVATAR_SERVE_STORAGE": str(tmp_path),
           "HF_HUB_OFFLINE": "0"}
    args = ["download", "wan22-i2v-a14b-distill-fp8", "--dry-run"]
    r = run_cli(args, timeout=60, env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.count("(no listing: ConnectError; the patterns above decide)") == 5, r.stdout
    assert "to see the files offline: run this once online" in r.stdout

    # saved listings (what an online dry run keeps) answer
    saved = tmp_path / "hub-listings"
    shutil.copytree(LISTINGS, saved)
    r = run_cli(args, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(", saved earlier; the Hub: ConnectError):") == 5, r.stdout
    assert "wan2.2_i2v_A14b_high_noise_scaled_fp8_e4m3_lightx2v_4step.safetensors" in r.stdout
    assert "diffusion_pytorch_model-00001-of-00012" not in r.stdout


def test_dry_run_saves_the_hubs_listings_and_respects_offline_mode(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AVATAR_SERVE_STORAGE", str(tmp_path))
    monkeypatch.setattr(dl, "hub_listing", lambda repo: dl.read_listing(dl.listing_file(LISTINGS, repo)))
    assert cli.main(["download", "wan22-i2v-a14b-gguf-q8", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("(listing from the Hub):") == 5
    assert len(list((tmp_path / "hub-listings").glob("*.txt"))) == 5

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(dl, "hub_listing", lambda repo: pytest.fail("offline mode asked the Hub"))
    monkeypatch.setattr(dl, "probe_hub", lambda *a: pytest.fail("offline mode asked the Hub"))
    assert cli.main(["download", "wan22-i2v-a14b-gguf-q8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("saved earlier; the Hub: HF_HUB_OFFLINE is set):") == 5, out
    assert "  2 files (listing from" in out and "HighNoise/Wan2.2-I2V-A14B-HighNoise-Q8_0.gguf" in out


def test_an_unreachable_hub_is_asked_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AVATAR_SERVE_STORAGE", str(tmp_path))
    calls = []

    def refused(timeout=None):
        calls.append(1)
        raise httpx.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(dl, "probe_hub", refused)
    assert cli.main(["download", "wan22-i2v-a14b-gguf-q8", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("(no listing: ConnectError; the patterns above decide)") == 5
    assert len(calls) == 1


# ------------------------------------------------------------------ the demo's inputs and note


def test_demo_speech_is_a_speech_like_wav():
    data = demo_speech(2.0)
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 16000, 32000)
    x = decode_audio(data).astype("float64")  # what the ingress does with an upload
    frames = x[: len(x) // 400 * 400].reshape(-1, 400)        # 25 ms windows at 16 kHz
    energy = (frames ** 2).mean(axis=1)
    loud, quiet = (energy > 0.1 * energy.max()).mean(), (energy < 1e-4 * energy.max()).mean()
    assert 0.4 < loud < 0.9 and quiet > 0.1  # syllables and pauses, not a steady tone


def test_the_random_weights_note_names_a_real_profile():
    note = random_weights_note("tiny")
    profile = re.search(r"avatar-serve download (\S+)`", note).group(1)
    assert (ROOT / "configs" / f"{profile}.yaml").is_file()
    assert "noise" in note and "serve_config.yaml" in note
    assert random_weights_note(profile) is None
