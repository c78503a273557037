"""The Ingress as a DeploymentHandle caller sees it: typed methods, no HTTP, on the in-process
graph (stage calls are counted). Also the contract: the ingress process needs no torch, and the
public models carry no internal stage state."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import threading

import numpy as np
import pytest

from deployments.api.jobs import AvatarRecord
from deployments.api.protocol import ORIENTATION_TAG, ApiError, Avatar, Deleted, Job, VideoList, decode_image, size_for_image
from deployments.local import LocalGraph, LocalResponse
from helpers import get_dummy_image, png_bytes, wav_bytes

REQUEST = {"prompt": "a man smiles", "size": "16x16", "num_frames": 5, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def graph(tiny_cfg):
    return LocalGraph(tiny_cfg)


def test_python_api_returns_frames_and_fills_the_seed(graph):
    result = asyncio.run(graph.ingress.generate(REQUEST, get_dummy_image(), output="frames"))
    assert result.frames.shape == (5, 16, 16, 3) and result.frames.dtype == np.uint8
    assert result.params.seed >= 0 and result.mp4 is None
    # Same seed, same frames.
    again = asyncio.run(graph.ingress.generate({**REQUEST, "seed": result.params.seed}, get_dummy_image(),
                                               output="frames"))
    np.testing.assert_array_equal(again.frames, result.frames)


@pytest.mark.parametrize("image_wh,clip_wh", [((40, 80), (16, 32)), ((80, 40), (32, 16)), ((50, 50), (32, 32)),
                                               ((480, 832), (16, 32)), ((1920, 1080), (32, 16))])
def test_an_image_sent_without_size_keeps_its_aspect(graph, tiny_cfg, image_wh, clip_wh):
    """Without `size`, the clip takes the image's aspect at the profile's default pixel count
    (tiny: 32x32) by Wan's rule (floored to multiples of 16); a portrait gives a portrait clip; the
    job reports the size."""
    image = get_dummy_image(width=image_wh[0], height=image_wh[1])
    request = {k: v for k, v in REQUEST.items() if k != "size"}
    result = asyncio.run(graph.ingress.generate(request, image, output="frames"))
    assert (result.params.width, result.params.height) == clip_wh
    assert result.frames.shape == (5, clip_wh[1], clip_wh[0], 3)
    assert (clip_wh[0] < clip_wh[1]) == (image_wh[0] < image_wh[1]) or image_wh[0] == image_wh[1]

    async def job_size():
        job = await graph.ingress.submit(request, png_bytes(image))
        return job.size

    assert asyncio.run(job_size()) == f"{clip_wh[0]}x{clip_wh[1]}"


def jpeg_with_orientation(pixels: np.ndarray, orientation: int) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


@pytest.mark.parametrize("orientation,shown", [(1, lambda a: a), (3, lambda a: np.rot90(a, 2)),
                                               (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1))])
def test_an_exif_orientation_is_applied_before_anything_else(graph, orientation, shown):
    """A phone's portrait stored sideways (landscape pixels + EXIF orientation 6 or 8) is decoded
    upright, and becomes a portrait clip, not a landscape one with the face on its side."""
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:20, :40] = (250, 30, 30)  # one red quarter says which way up the pixels came out
    stored[20:, 40:] = (30, 30, 250)
    data = jpeg_with_orientation(stored, orientation)
    decoded = decode_image(data, len(data), fit=(160, 160))
    expected = shown(stored)
    assert decoded.shape == expected.shape
    assert np.abs(decoded.astype(int) - expected).mean() < 8
    request = {k: v for k, v in REQUEST.items() if k != "size"}
    result = asyncio.run(graph.ingress.generate(request, data, output="frames"))
    assert (result.params.width < result.params.height) == (orientation in (6, 8))


def test_python_api_validates_too(graph):
    calls = graph.stage_calls
    with pytest.raises(ApiError) as exc:
        asyncio.run(graph.ingress.generate({"prompt": "x", "num_frames": 6}, get_dummy_image()))
    assert exc.value.status == 422 and exc.value.param == "num_frames"
    with pytest.raises(ApiError) as exc:
        asyncio.run(graph.ingress.generate({"prompt": "x", "colour": "red"}, get_dummy_image()))
    assert exc.value.status == 422 and exc.value.param == "colour"
    assert graph.stage_calls == calls


def test_lip_synced_frames_come_from_the_stage_without_an_mp4_round_trip(graph):
    calls = dict(graph.lipsync.calls)
    result = asyncio.run(graph.ingress.generate(REQUEST, get_dummy_image(), output="frames",
                                                audio=wav_bytes(0.5)))
    assert result.frames.shape == (12, 16, 16, 3)  # floor(0.5 s * 25 fps)
    assert graph.lipsync.calls["lipsync_frames"] == calls.get("lipsync_frames", 0) + 1
    assert graph.lipsync.calls["lipsync_mp4"] == calls.get("lipsync_mp4", 0)


def test_typed_answers_for_jobs_and_avatars(graph):
    async def scenario():
        job = await graph.ingress.submit(REQUEST, png_bytes(get_dummy_image()))
        listed = graph.ingress.list_jobs()
        avatar, created = await graph.ingress.create_avatar({**REQUEST, "face_box": "2,2,14,14"},
                                                      png_bytes(get_dummy_image()))
        while not (graph.ingress.job(job.id).final and graph.ingress.avatar(avatar.id).final):
            await asyncio.sleep(0.05)
        return job, listed, avatar, created, graph.ingress.cancel_or_delete(job.id), \
            await graph.ingress.delete_avatar(avatar.id)

    job, listed, avatar, created, deleted_job, deleted_avatar = asyncio.run(scenario())
    assert isinstance(job, Job) and isinstance(listed, VideoList) and listed.data[0].id == job.id
    assert type(avatar) is Avatar and created and avatar.seed == 0  # an avatar's seed defaults to 0
    assert isinstance(deleted_job, Deleted) and deleted_job.object == "video.deleted"
    assert deleted_avatar == Deleted(id=avatar.id, object="avatar.deleted")


def test_public_avatar_has_no_stage_state():
    assert "prepared_id" not in Avatar.model_fields and "prepared_id" in AvatarRecord.model_fields
    record = AvatarRecord(id="avatar_x", created_at=0, model="tiny", prompt="p", size="16x16", num_frames=5,
                          seed=0, prepared_id="internal")
    assert "prepared_id" not in record.public().model_dump()


def test_the_ingress_and_the_api_import_no_torch():
    """The ingress replica and HTTP clients run without torch (CPU-only hosts, light clients)."""
    code = ("import sys, deployments.ingress, deployments.api.routes, deployments.api.client, "
            "deployments.api.queue; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_ready_once_every_stage_answers(graph):
    ready, stages = asyncio.run(graph.ingress.ready())
    assert ready and set(stages) == {"encoder", "high", "low", "decoder", "lipsync"}
    assert all(isinstance(s, float) for s in stages.values())


def test_not_ready_while_a_stage_is_starting(tiny_cfg, monkeypatch):
    """A stage that has not answered by the probe's timeout (the one /readyz uses) counts as
    starting; this one answers only after the probe is over, however long that takes."""
    graph = LocalGraph(tiny_cfg)
    probed = threading.Event()

    def still_loading():
        probed.wait()
        return {}

    async def probe():
        try:
            return await graph.ingress.ready()
        finally:
            probed.set()

    monkeypatch.setattr(graph.decoder.target, "info", still_loading)
    ready, stages = asyncio.run(probe())
    assert not ready and stages["decoder"] == "starting" and stages["encoder"] != "starting"


def test_talk_turns_beyond_capacity_get_429_with_retry_after(tiny_cfg):
    cfg = tiny_cfg.model_copy(update={"serving": tiny_cfg.serving.model_copy(
        update={"max_talk_turns": 1, "turn_retry_after_s": 2})})
    graph = LocalGraph(cfg)

    async def scenario():
        avatar, _ = await graph.ingress.create_avatar(REQUEST, png_bytes(get_dummy_image()))
        while not graph.ingress.avatar(avatar.id).final:
            await asyncio.sleep(0.02)
        first = graph.ingress.speak(avatar.id, wav_bytes(2.0))
        await anext(first)  # streaming: one turn in flight
        with pytest.raises(ApiError) as refused:
            await anext(graph.ingress.speak(avatar.id, wav_bytes(0.5)))
        calls = graph.lipsync.calls["stream"]
        await first.aclose()  # the first turn's client leaves
        again = [piece async for piece in graph.ingress.speak(avatar.id, wav_bytes(0.5))]
        return refused.value, calls, again

    refused, calls, again = asyncio.run(scenario())
    assert refused.status == 429 and refused.headers == {"Retry-After": "2"} and calls == 1
    assert again and graph.ingress.turns == 0


def test_cancelling_a_job_cancels_the_stage_calls_it_dispatched(tiny_cfg):
    """A job cancelled while its encoder call runs: that call is cancelled too, not left to finish
    for nobody (and its slot frees at once)."""
    graph = LocalGraph(tiny_cfg)
    cancelled = []

    class Running(LocalResponse):  # an encoder call that never finishes by itself
        def cancel(self):
            cancelled.append(True)
            super().cancel()

    async def forever(*_):
        await asyncio.Event().wait()

    class Encoder:
        class encode:  # noqa: N801 - mimics handle.encode.remote
            @staticmethod
            def remote(*args):
                return Running(forever, args, {})

    graph.ingress.encoder = Encoder()

    async def scenario():
        job = await graph.ingress.submit(REQUEST, png_bytes(get_dummy_image()))
        while job.status != "in_progress":
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        graph.ingress.cancel_or_delete(job.id)
        while not job.final:
            await asyncio.sleep(0.01)
        return job

    job = asyncio.run(scenario())
    assert job.status == "cancelled" and cancelled == [True] and graph.ingress.queue.running == 0


def wan_size(image_w: int, image_h: int, max_area: int) -> tuple[int, int]:
    """Wan2.2's generate.py / LightX2V, as they write it (VAE stride 8, patch 2)."""
    vae_stride, patch_size = (4, 8, 8), (1, 2, 2)
    aspect_ratio = image_h / image_w
    lat_h = round(np.sqrt(max_area * aspect_ratio) // vae_stride[1] // patch_size[1] * patch_size[1])
    lat_w = round(np.sqrt(max_area / aspect_ratio) // vae_stride[2] // patch_size[2] * patch_size[2])
    return lat_w * vae_stride[2], lat_h * vae_stride[1]


ASPECTS = [(1080, 1920), (1920, 1080), (720, 1280), (1000, 1500), (1500, 1000), (768, 1024), (1024, 768),
           (512, 512), (832, 480), (480, 832), (1200, 1600), (2000, 900)]  # 2000x900: 1431 wide at 720p's area


@pytest.mark.parametrize("area", [(832, 480), (1280, 720), (640, 640), (512, 288), (320, 192)])
@pytest.mark.parametrize("image_wh", ASPECTS)
def test_the_size_without_size_is_wans_rule(area, image_wh):
    """Wan's floor to the latent grid, for several aspects and areas: 1080x1920 at 832x480's area
    is 464x832 (rounding to the nearest gave 480x848, past the area)."""
    from deployments.profiles import load_profile

    cfg = load_profile("random-a14b", {"defaults": {"width": area[0], "height": area[1]}})
    size, wan = size_for_image(*image_wh, cfg), wan_size(*image_wh, area[0] * area[1])
    lim = cfg.limits
    if wan[0] <= lim.max_width and wan[1] <= lim.max_height:
        assert size == wan
    else:  # past the profile's 1280 side limit: scaled down to it, then floored the same way
        assert size[0] == lim.max_width and size[1] == int(lim.max_width * image_wh[1] / image_wh[0]) // 16 * 16
    assert size[0] * size[1] <= area[0] * area[1]


def test_a_phone_portrait_at_480p_is_464x832():
    from deployments.profiles import load_profile

    assert size_for_image(1080, 1920, load_profile("random-a14b")) == (464, 832)


@pytest.mark.parametrize("image_wh", [(1000, 1500), (1080, 1920), (768, 1024), (900, 1000)])
def test_a_portrait_stays_a_portrait_at_every_profiles_area(image_wh):
    """2:3, 9:16, 3:4 and 9:10 portraits are taller than wide at each profile's default area (a 2:3
    portrait turned square at the tiny area when sides were rounded to the nearest 16)."""
    from deployments.profiles import load_profile, profile_names

    for name in profile_names():
        cfg = load_profile(name)
        width, height = size_for_image(*image_wh, cfg)
        assert width < height, (name, image_wh, (width, height))
        assert width * height <= cfg.defaults.width * cfg.defaults.height, name
