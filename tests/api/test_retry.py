"""A dead replica costs one stage, not the job (deployments/api/retry.py), in process: a stage
that 'dies' (raises Ray's ActorDiedError, as a Serve call to a dead replica does) mid-job runs
once more from its kept input, and the clip is byte-identical to an undisturbed run; a second
death, `stage_retries: 0` or an ordinary error fail the job. Served, with a replica really
killed: tests/test_cluster.py."""

from __future__ import annotations

import inspect
import json

import pytest
from fastapi.testclient import TestClient
from ray.exceptions import ActorDiedError

from deployments.local import LocalGraph
from deployments.profiles import load_profile
from helpers import get_dummy_image, png_bytes, wait_final, wav_bytes

IMAGE = png_bytes(get_dummy_image())
REQUEST = {"prompt": "a woman talks", "size": "32x16", "num_frames": "5", "num_inference_steps": "4", "seed": "11"}


class Dying:
    """A stage object whose replica dies in `method`: after `after` items of a streamed call, or
    before a plain call runs; `times` deaths in all, then it serves normally."""

    def __init__(self, target, method: str, after: int = 0, times: int = 1, error=ActorDiedError):
        self.target, self.method, self.after, self.times, self.error = target, method, after, times, error
        self.deaths = 0

    def __getattr__(self, name):
        attr = getattr(self.target, name)
        if name != self.method:
            return attr
        if inspect.isgeneratorfunction(attr):
            def generated(*args, **kwargs):
                for i, item in enumerate(attr(*args, **kwargs)):
                    if i == self.after and self.deaths < self.times:
                        self.deaths += 1
                        raise self.error()
                    yield item
            return generated
        if inspect.isasyncgenfunction(attr):
            async def streamed(*args, **kwargs):
                i = 0
                async for item in attr(*args, **kwargs):
                    if i == self.after and self.deaths < self.times:
                        self.deaths += 1
                        raise self.error()
                    i += 1
                    yield item
            return streamed

        def plain(*args, **kwargs):
            if self.deaths < self.times:
                self.deaths += 1
                raise self.error()
            return attr(*args, **kwargs)
        return plain


def graph(tmp_path, **serving):
    return LocalGraph(load_profile("tiny", {"serving": {"storage_dir": str(tmp_path / "store"), **serving}}))


def video(g, data=REQUEST, audio: bytes | None = None) -> tuple[dict, bytes | None, list[dict]]:
    """A job through the HTTP API -> (its final record, its MP4, its events)."""
    with TestClient(g.app()) as c:
        files = {"input_reference": ("p.png", IMAGE, "image/png")}
        if audio is not None:
            files["audio"] = ("a.wav", audio, "audio/wav")
        job = c.post("/v1/videos", data=data, files=files).json()
        final = wait_final(c, job["id"])
        with c.stream("GET", f"/v1/videos/{job['id']}/events") as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        content = c.get(f"/v1/videos/{job['id']}/content").content if final["status"] == "completed" else None
    return final, content, events


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    final, mp4, _ = video(graph(tmp_path_factory.mktemp("plain")))
    assert final["status"] == "completed"
    return mp4


# (stage handle, method, items before the death): the low expert mid-denoise (after a step
# record), the high expert at its first step, the encoder and the decoder before they run.
DEATHS = [("low", "denoise_stream", 1), ("high", "denoise_stream", 0), ("encoder", "encode", 0),
          ("decoder", "decode_fmp4", 0)]


@pytest.mark.parametrize("stage,method,after", DEATHS)
def test_a_stage_whose_replica_dies_runs_again_and_the_clip_is_byte_identical(tmp_path, undisturbed, stage,
                                                                                method, after):
    g = graph(tmp_path)
    handle = getattr(g, stage)
    handle.target = dying = Dying(handle.target, method, after)
    final, mp4, events = video(g)
    assert final["status"] == "completed", final
    assert dying.deaths == 1 and handle.calls[method] == 2
    assert mp4 == undisturbed
    retries = [e for e in events if e["event"] == "retry"]
    name = {"low": "low", "high": "high", "encoder": "encoder", "decoder": "decoder"}[stage]
    assert len(retries) == 1 and retries[0]["stage"] == name and "runs again" in retries[0]["reason"]
    assert events[-1]["event"] == "completed"
    if stage == "low":  # the low expert's steps are reported again from its first, after the retry
        steps = [e["step"] for e in events if e["event"] == "step" and e["expert"] == "low"]
        assert steps == [3, 3, 4], steps


def test_a_decoder_dying_mid_stream_runs_again_and_followers_see_one_file(tmp_path):
    """The decoder dies after its first fMP4 piece went out to the job's stream: the decode runs
    again, the piece already handed on is checked equal and skipped, and the stream is the file."""
    data = {**REQUEST, "num_frames": "33"}
    plain, plain_mp4, _ = video(graph(tmp_path / "plain"), data)
    g = graph(tmp_path / "dying")
    g.decoder.target = dying = Dying(g.decoder.target, "decode_fmp4", after=1)
    with TestClient(g.app()) as c:
        job = c.post("/v1/videos", data=data, files={"input_reference": ("p.png", IMAGE, "image/png")}).json()
        streamed = c.get(f"/v1/videos/{job['id']}/stream").content
        final = wait_final(c, job["id"])
        content = c.get(f"/v1/videos/{job['id']}/content").content
    assert plain["status"] == final["status"] == "completed" and dying.deaths == 1
    assert streamed == content == plain_mp4


def test_the_encoders_death_found_through_the_expert_that_was_given_its_output(tmp_path, undisturbed):
    """The expert's call fails because its input (the encoder's response) failed: the encoder
    runs again, not the expert's retry."""
    g = graph(tmp_path, stage_retries=1)
    g.encoder.target = Dying(g.encoder.target, "encode")
    g.high.target = Dying(g.high.target, "denoise_stream", after=0, times=0)  # counts, never dies
    final, mp4, events = video(g)
    assert final["status"] == "completed" and mp4 == undisturbed
    assert [e["stage"] for e in events if e["event"] == "retry"] == ["encoder"]


def test_a_second_death_of_the_same_stage_fails_the_job(tmp_path):
    g = graph(tmp_path)
    g.low.target = Dying(g.low.target, "denoise_stream", after=1, times=2)
    final, mp4, events = video(g)
    assert final["status"] == "failed" and final["error"]["code"] == "stage_unavailable", final
    assert mp4 is None and g.low.calls["denoise_stream"] == 2
    assert "Traceback" not in final["error"]["message"]
    assert [e["event"] for e in events].count("retry") == 1 and events[-1]["event"] == "failed"


def test_no_retries_configured_fails_at_the_first_death(tmp_path):
    g = graph(tmp_path, stage_retries=0)
    g.low.target = Dying(g.low.target, "denoise_stream", after=1)
    final, _, events = video(g)
    assert final["status"] == "failed" and final["error"]["code"] == "stage_unavailable"
    assert g.low.calls["denoise_stream"] == 1 and not [e for e in events if e["event"] == "retry"]


def test_an_ordinary_stage_error_is_not_retried(tmp_path):
    g = graph(tmp_path)
    g.low.target = Dying(g.low.target, "denoise_stream", after=1, error=lambda: RuntimeError("CUDA error: bad"))
    final, _, _ = video(g)
    assert final["status"] == "failed" and final["error"]["code"] == "stage_error", final
    assert g.low.calls["denoise_stream"] == 1


@pytest.mark.parametrize("stage,method", [("lipsync", "lipsync_mp4"), ("decoder", "decode")])
def test_a_lip_synced_job_survives_its_decoder_or_lipsync_replica_dying(tmp_path_factory, stage, method):
    audio = wav_bytes(0.6)
    plain, plain_mp4, _ = video(graph(tmp_path_factory.mktemp("plain")), audio=audio)
    g = graph(tmp_path_factory.mktemp("dying"))
    handle = getattr(g, stage)
    handle.target = Dying(handle.target, method)
    final, mp4, events = video(g, audio=audio)
    assert plain["status"] == final["status"] == "completed", final
    assert mp4 == plain_mp4
    assert [e["stage"] for e in events if e["event"] == "retry"] == [stage]


def test_an_avatar_survives_its_lipsync_replica_dying_while_it_is_prepared(tmp_path):
    g = graph(tmp_path)
    g.lipsync.target = Dying(g.lipsync.target, "create_avatar")
    with TestClient(g.app()) as c:
        avatar = c.post("/v1/avatars", data={k: v for k, v in REQUEST.items() if k != "seed"},
                        files={"input_reference": ("p.png", IMAGE, "image/png")}).json()
        final = wait_final(c, avatar["id"], kind="avatars")
    assert final["status"] == "ready", final
    assert g.lipsync.calls["create_avatar"] == 2
