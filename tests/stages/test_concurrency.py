"""Several requests inside one stage object at once (Ray Serve runs a replica's sync methods in a
thread pool) give exactly what each gives alone. Threads here call the same stage objects the
way Ray's pool does; the same rule over HTTP on a cluster is in tests/test_cluster.py."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from deployments.local import LocalGraph
from deployments.profiles import load_profile
from helpers import get_dummy_image, png_bytes, wav_bytes

# Different seeds, sizes and frame counts, so any state shared between calls shows.
REQUESTS = [
    {"prompt": "a woman talks", "size": "32x16", "num_frames": 5, "seed": 1, "num_inference_steps": 2},
    {"prompt": "a man smiles", "size": "16x32", "num_frames": 9, "seed": 2, "num_inference_steps": 3},
    {"prompt": "a cat", "size": "48x32", "num_frames": 5, "seed": 3, "num_inference_steps": 2},
    {"prompt": "a portrait", "size": "32x32", "num_frames": 13, "seed": 4, "num_inference_steps": 4},
    {"prompt": "the camera", "size": "16x16", "num_frames": 1, "seed": 5, "num_inference_steps": 2},
    {"prompt": "a woman smiles", "size": "64x32", "num_frames": 9, "seed": 6, "num_inference_steps": 2},
]


@pytest.fixture(scope="module")
def graph(tiny_cfg):
    return LocalGraph(tiny_cfg)


def at_once(fn, args_list):
    """Call fn(*args) for every args at the same time from a pool of threads, like Ray's."""
    with ThreadPoolExecutor(len(args_list)) as pool:
        return list(pool.map(lambda a: fn(*a), args_list))


def test_encoder_and_decoder_calls_at_once_equal_calls_alone(graph):
    ingress, encoder, decoder = graph.ingress, graph.encoder.target, graph.decoder.target
    inputs = [(ingress.prepare(r, get_dummy_image(i))[0], get_dummy_image(i)) for i, r in enumerate(REQUESTS)]
    alone = [encoder.encode(*a) for a in inputs]
    for _ in range(3):
        together = at_once(encoder.encode, inputs)
        for a, b in zip(alone, together):
            np.testing.assert_array_equal(a.condition.data, b.condition.data)
            np.testing.assert_array_equal(a.prompt_embeds.data, b.prompt_embeds.data)
    states = [graph.low.target.denoise(c, graph.high.target.denoise(c)) for c in alone]
    frames_alone = [decoder.decode(s).frames for s in states]
    for _ in range(3):
        for a, b in zip(frames_alone, at_once(decoder.decode, [(s,) for s in states])):
            np.testing.assert_array_equal(a.frames if hasattr(a, "frames") else a, b.frames)
    # The MP4 path decodes chunk by chunk with the VAE's feature cache and encodes in a writer
    # thread per call: byte for byte the same files at once as alone.
    mp4_alone = [decoder.decode_mp4(s) for s in states]
    for _ in range(3):
        assert at_once(decoder.decode_mp4, [(s,) for s in states]) == mp4_alone


def test_whole_requests_at_once_equal_requests_alone(graph):
    async def alone():
        return [await graph.ingress.generate(r, get_dummy_image(i), "frames") for i, r in enumerate(REQUESTS)]

    async def together():
        return await asyncio.gather(*[graph.ingress.generate(r, get_dummy_image(i), "frames")
                                      for i, r in enumerate(REQUESTS)])

    expected = asyncio.run(alone())
    for _ in range(2):
        for a, b in zip(expected, asyncio.run(together())):
            np.testing.assert_array_equal(a.frames, b.frames)


@pytest.mark.slow  # twelve talk turns on the CPU
def test_talk_turns_at_once_equal_turns_alone(graph):
    async def prepare():
        avatar, _ = await graph.ingress.create_avatar(REQUESTS[3], png_bytes(get_dummy_image()))
        while not graph.ingress.avatar(avatar.id).final:
            await asyncio.sleep(0.02)
        return avatar.id

    async def turn(avatar_id, audio, start):
        return b"".join([piece async for piece in graph.ingress.speak(avatar_id, audio, start)])

    avatar_id = asyncio.run(prepare())
    turns = [(wav_bytes(0.3 + 0.2 * i, rate=16000, channels=1), i * 3) for i in range(4)]
    alone = [asyncio.run(turn(avatar_id, *t)) for t in turns]

    async def together():
        return await asyncio.gather(*[turn(avatar_id, *t) for t in turns])

    for _ in range(2):
        assert asyncio.run(together()) == alone


def test_every_model_call_runs_on_its_stage_model_thread(tmp_path):
    """PyTorch keeps CUDA library state per thread (cuDNN's attention plans, library handles),
    so a stage whose model ran on whatever thread Ray's pool handed it would rebuild that state
    for each new thread. Every module call of every stage -- warm-up and concurrent requests,
    video and talk turns -- runs on that stage's one model thread."""
    warmup = [{"width": 32, "height": 32, "num_frames": 5}]
    cfg = load_profile("tiny", {"stages": {name: {"warmup": warmup} for name in ("encoder", "high", "low", "decoder")},
                                "serving": {"storage_dir": str(tmp_path)}})
    calls: list[tuple[torch.nn.Module, int]] = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: calls.append((module, threading.get_ident())))
    try:
        graph = LocalGraph(cfg)
        warm_up_calls = len(calls)

        async def requests():
            avatar, _ = await graph.ingress.create_avatar(REQUESTS[3], png_bytes(get_dummy_image()))
            videos = [graph.ingress.generate(r, get_dummy_image(i), "mp4") for i, r in enumerate(REQUESTS[:4])]
            await asyncio.gather(*videos)
            while not graph.ingress.avatar(avatar.id).final:
                await asyncio.sleep(0.02)

            async def turn(start):
                audio = wav_bytes(0.4, rate=16000, channels=1)
                return b"".join([piece async for piece in graph.ingress.speak(avatar.id, audio, start)])

            return await asyncio.gather(*(turn(i) for i in range(3)))

        assert all(asyncio.run(requests()))
    finally:
        hook.remove()
    stages = {name: getattr(graph, name).target for name in ("encoder", "high", "low", "decoder", "lipsync")}
    model_threads = {stage.model.thread_id for stage in stages.values()}
    assert len(model_threads) == 5 and warm_up_calls > 0 and len(calls) > warm_up_calls
    assert {thread for _, thread in calls} <= model_threads  # nothing ran on a caller's thread
    for name, stage in stages.items():
        holders = [stage, *([stage.pipeline] if hasattr(stage, "pipeline") else [])]  # LipSync's models
        own = {id(m) for h in holders for v in vars(h).values() if isinstance(v, torch.nn.Module) for m in v.modules()}
        threads = {thread for module, thread in calls if id(module) in own}
        assert threads == {stage.model.thread_id}, name


def test_two_jobs_on_one_expert_take_turns_step_by_step(graph, tiny_cfg):
    """The expert's model thread serves calls first in, first out, and each job queues its next
    step only once its last one is done: two jobs inside one expert alternate, A0 B0 A1 B1 ...,
    each keeping its own latents and sampler (the same result as alone)."""
    from deployments.dit_expert import DitExpert
    from deployments.encoder import Encoder

    cfg = tiny_cfg.model_copy(update={"stages": tiny_cfg.stages.model_copy(update={
        "high": tiny_cfg.stages.high.model_copy(update={"simulate_step_seconds": 0.05})})})
    encoder, expert = Encoder(cfg.stages.encoder), DitExpert(cfg.stages.high, cfg.sampler, "high")
    ingress = graph.ingress  # only to validate the requests (prepare)
    conds = {name: encoder.encode(ingress.prepare({**REQUESTS[0], "num_inference_steps": 8, "seed": seed},
                                                   get_dummy_image(seed), job_id=name)[0], get_dummy_image(seed))
             for name, seed in (("A", 1), ("B", 2))}
    order, step = [], expert._step

    def noted(run):
        order.append((run.state.params.request_id, run.index))
        return step(run)

    async def run(name):
        async for item in expert.denoise_stream(conds[name]):
            last = item
        return last

    alone = {name: asyncio.run(run(name)) for name in conds}
    expert._step = noted

    async def together():
        return await asyncio.gather(run("A"), run("B"))

    states = asyncio.run(together())
    steps = len(alone["A"].steps)
    assert steps >= 3  # enough steps on the high expert to see the turns
    assert order == [(name, i) for i in range(steps) for name in ("A", "B")]
    for name, state in zip(("A", "B"), states):
        np.testing.assert_array_equal(state.latents.data, alone[name].latents.data)
