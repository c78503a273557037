"""The Python client and `avatar-serve generate` against the in-process graph (TestClient)."""

from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient

from deployments import cli
from deployments.api.client import AvatarClient, ClientError
from deployments.cli.progress import progress_printer
from deployments.local import LocalGraph
from deployments.media.video import decode_mp4
from deployments.profiles import load_profile
from helpers import get_dummy_image, png_bytes


@pytest.fixture()
def client(tmp_path):
    graph = LocalGraph(load_profile("tiny", {"serving": {"storage_dir": str(tmp_path), "api_keys": ["k"]}}))
    with TestClient(graph.app()) as http:
        yield AvatarClient(api_key="k", http=http)


def test_generate_follows_events_and_returns_the_mp4(client):
    seen = []
    mp4 = client.generate(png_bytes(get_dummy_image()), "a woman talks", on_event=seen.append,
                          size="16x16", num_frames=5, num_inference_steps=2)
    assert decode_mp4(mp4)[0].shape == (5, 16, 16, 3)
    assert seen[-1]["event"] == "completed" and any(e["event"] == "step" for e in seen)
    jobs = client.list_videos()["data"]
    assert len(jobs) == 1 and jobs[0]["status"] == "completed"
    assert client.delete_video(jobs[0]["id"])["deleted"]


def test_errors_carry_status_and_field(client):
    with pytest.raises(ClientError) as exc:
        client.create_video(png_bytes(get_dummy_image()), "x", num_frames=6)
    assert exc.value.status == 422 and exc.value.error["param"] == "num_frames"
    with pytest.raises(ClientError) as exc:
        client.get_video("video_none")
    assert exc.value.status == 404
    with pytest.raises(ClientError) as exc:
        AvatarClient(http=client.http.__class__(client.http.app)).models()  # no key
    assert exc.value.status == 401


def test_progress_bar_draws_each_event():
    out = io.StringIO()
    show = progress_printer(out, width=10)
    for e in [{"event": "requeued", "reason": "restart", "attempt": 2, "progress": 0},
              {"event": "queued", "position": 1, "progress": 0},
              {"event": "step", "step": 1, "total": 2, "expert": "high", "progress": 47},
              {"event": "retry", "stage": "low", "reason": "died", "progress": 47},
              {"event": "first_fragment", "bytes": 900, "progress": 90},
              {"event": "completed", "status": "completed", "progress": 100}]:
        show(e)
    text = out.getvalue()
    assert "re-queued after a server restart" in text
    assert "the low stage's replica died; it runs again" in text and "the MP4 streams now" in text
    assert "queued (position 1)" in text and "step 1/2 (high expert)" in text
    assert "[##########] 100% completed" in text and text.endswith("\n")


def test_generate_command_writes_the_file(client, tmp_path, monkeypatch):
    image = tmp_path / "p.png"
    image.write_bytes(png_bytes(get_dummy_image()))
    monkeypatch.setattr("deployments.api.client.AvatarClient", lambda url, api_key=None: AvatarClient(
        api_key="k", http=client.http))
    rc = cli.main(["generate", str(image), "a man smiles", "-o", str(tmp_path / "o.mp4"), "--size", "16x16",
                   "--frames", "5", "--steps", "2"])
    assert rc == 0 and decode_mp4((tmp_path / "o.mp4").read_bytes())[0].shape[0] == 5
    rc = cli.main(["generate", str(image), "x", "-o", str(tmp_path / "bad.mp4"), "--frames", "6"])
    assert rc == 1 and not (tmp_path / "bad.mp4").exists()


def test_speak_command_creates_the_avatar_and_streams_to_a_file(client, tmp_path, monkeypatch):
    from helpers import durations, wav_bytes

    image, audio = tmp_path / "p.png", tmp_path / "a.wav"
    image.write_bytes(png_bytes(get_dummy_image()))
    audio.write_bytes(wav_bytes(0.6))
    monkeypatch.setattr("deployments.api.client.AvatarClient", lambda url, api_key=None: AvatarClient(
        api_key="k", http=client.http))
    out = tmp_path / "s.mp4"
    assert cli.main(["speak", str(audio), "--image", str(image), "--prompt", "hi", "--size", "32x32",
                     "-o", str(out)]) == 0
    assert durations(out.read_bytes())[0] == 15  # floor(0.6 * 25)
    # Same inputs, same avatar: found ready at once (a new one would start queued).
    again = client.create_avatar(image.read_bytes(), "hi", size="32x32", wait=False)
    assert again["status"] == "ready"
    assert cli.main(["speak", str(audio), "--avatar", "avatar_missing", "-o", str(tmp_path / "x.mp4")]) == 1
