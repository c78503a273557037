"""Each stage on its own, in pipeline order (text and image encoding, one step per expert, VAE
decode), against diffusers' components with the same weights: a regression shows up at the first
stage that fails."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import WanImageToVideoPipeline

from deployments.common.payloads import DenoiseState
from deployments.common.transport import pack, unpack
from deployments.config import DecoderConfig, EncoderConfig, ExpertConfig, SamplerConfig
from deployments.decoder import Decoder, to_uint8
from deployments.dit_expert import DitExpert, initial_noise
from deployments.encoder import Encoder, centre_crop
from deployments.models.wan.components import get_dummy_components
from deployments.models.wan.sampler import export_state, make_scheduler, set_timesteps
from helpers import get_dummy_image, get_dummy_params

SAMPLER = SamplerConfig(scheduler="unipc", flow_shift=3.0, num_inference_steps=2, high_steps=1,
                        guidance_scale=5.0, guidance_scale_2=3.0)


@pytest.fixture(autouse=True)
def _no_grad():
    # The pipeline's __call__ runs under no_grad; with autograd on, some kernels differ in the
    # last bit, so reference pieces called outside __call__ must run under it too.
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def pipe():
    return WanImageToVideoPipeline(**get_dummy_components(0), scheduler=make_scheduler(SAMPLER),
                                   boundary_ratio=0.9)


@pytest.fixture(scope="module")
def encoder():
    return Encoder(EncoderConfig())


def test_text_encoding_equals_the_pipelines_prompt_embeddings(pipe, encoder):
    ref, ref_neg = pipe.encode_prompt("a cat talks", negative_prompt="dog", max_sequence_length=512,
                                      device="cpu")
    context = encoder.encode_text("a cat talks")
    assert context.shape == (1, 512, 32) and context.dtype == torch.float32
    assert torch.equal(context, ref)
    assert torch.equal(encoder.encode_text("dog"), ref_neg)
    # Padding positions are zero, real tokens are not.
    assert context[0, 20:].abs().sum() == 0 and context[0, 0].abs().sum() > 0


@pytest.mark.parametrize("image_w,image_h,width,height", [
    (24, 20, 32, 16), (480, 832, 832, 480), (1920, 1080, 480, 832), (1000, 1000, 832, 480), (640, 480, 64, 48),
    (3000, 100, 16, 256), (7, 5, 16, 16)])
def test_the_encoder_crops_to_the_clip_aspect_and_never_stretches(image_w, image_h, width, height):
    box = centre_crop(image_w, image_h, width, height)
    x1, y1, x2, y2 = box or (0, 0, image_w, image_h)
    assert 0 <= x1 < x2 <= image_w and 0 <= y1 < y2 <= image_h
    assert abs((x2 - x1) / (y2 - y1) / (width / height) - 1) <= 0.01 or min(x2 - x1, y2 - y1) < 50  # rounding of tiny crops
    assert (x1 + x2) / 2 == pytest.approx(image_w / 2, abs=1) and (y1 + y2) / 2 == pytest.approx(image_h / 2, abs=1)
    assert (x2 - x1 == image_w) or (y2 - y1 == image_h)  # only the excess side is trimmed


def test_image_encoding_equals_the_pipelines_condition_latents(pipe, encoder):
    image = get_dummy_image()  # 24x20: the encoder centre-crops it to 2:1 (24x12), never stretches
    picture = PIL.Image.fromarray(image).crop((0, 4, 24, 16))
    assert centre_crop(24, 20, 32, 16) == (0, 4, 24, 16)
    pixels = pipe.video_processor.preprocess(picture, height=16, width=32)
    _, ref_condition = pipe.prepare_latents(pixels.to(torch.float32), 1, 16, 16, 32, 9, torch.float32,
                                            "cpu", torch.Generator().manual_seed(0))
    condition = encoder.encode_image(image, width=32, height=16, num_frames=9)
    assert condition.shape == (1, 20, 3, 2, 4)  # 4 mask + 16 latent channels, T=(9-1)/4+1, /8
    assert torch.equal(condition, ref_condition)
    # The mask marks latent frame 0 only (the given image).
    assert torch.all(condition[0, :4, 0] == 1) and torch.all(condition[0, :4, 1:] == 0)


def test_encode_payload_is_numpy_with_shapes(encoder):
    cond = encoder.encode(get_dummy_params(width=32, height=16), get_dummy_image())
    assert isinstance(cond.prompt_embeds.data, np.ndarray)
    assert cond.prompt_embeds.shape == (1, 512, 32)
    assert cond.negative_prompt_embeds is not None  # guidance > 1 needs the negative prompt
    assert cond.latent_shape == (1, 16, 3, 2, 4)
    no_cfg = encoder.encode(get_dummy_params(guidance_scale=1.0, guidance_scale_2=1.0), get_dummy_image())
    assert no_cfg.negative_prompt_embeds is None


def test_empty_negative_prompt_means_the_profiles_default(encoder, monkeypatch):
    """Wan2.2's image2video.py: `if n_prompt == "": n_prompt = self.sample_neg_prompt`. The tiny
    profile's default is "" (the empty prompt is encoded); the full-size profiles set Wan's."""
    image = get_dummy_image()
    plain = encoder.encode(get_dummy_params(negative_prompt=""), image)
    assert torch.equal(unpack(plain.negative_prompt_embeds), encoder.encode_text(""))
    monkeypatch.setattr(encoder, "cfg", encoder.cfg.model_copy(update={"default_negative_prompt": "smudged"}))
    cond = encoder.encode(get_dummy_params(negative_prompt=""), image)
    assert torch.equal(unpack(cond.negative_prompt_embeds), encoder.encode_text("smudged"))
    assert cond.params.negative_prompt == ""  # the request as given; the default is the encoder's
    own = encoder.encode(get_dummy_params(negative_prompt="dog"), image)
    assert torch.equal(unpack(own.negative_prompt_embeds), encoder.encode_text("dog"))


def test_the_high_expert_shifts_by_the_clips_size(encoder):
    sampler = SAMPLER.model_copy(update={"flow_shift_720p": 5.0})
    expert = DitExpert(ExpertConfig(), sampler, "high")
    small = expert.start(encoder.encode(get_dummy_params(width=32, height=16), get_dummy_image()))
    assert small.sampler.config["flow_shift"] == 3.0
    cond = encoder.encode(get_dummy_params(width=32, height=16), get_dummy_image())
    big = replace(cond, params=replace(cond.params, width=1280, height=720))  # only the size is read
    assert expert.start(big).sampler.config["flow_shift"] == 5.0


def _reference_step(pipe, transformer, cond, latents, scheduler, index, guidance):
    """One denoise step computed directly on diffusers components."""
    t = scheduler.timesteps[index]
    x = torch.cat([latents, unpack(cond.condition)], dim=1)
    kw = dict(hidden_states=x, timestep=t.expand(1), return_dict=False)
    pos = transformer(encoder_hidden_states=unpack(cond.prompt_embeds), **kw)[0]
    neg = transformer(encoder_hidden_states=unpack(cond.negative_prompt_embeds), **kw)[0]
    return scheduler.step(neg + guidance * (pos - neg), t, latents, return_dict=False)[0]


def test_each_expert_runs_its_own_step_as_the_pipelines_transformer_does(pipe, encoder):
    params = get_dummy_params(num_inference_steps=2)
    cond = encoder.encode(params, get_dummy_image())
    high = DitExpert(ExpertConfig(), SAMPLER, "high")
    low = DitExpert(ExpertConfig(), SAMPLER, "low")

    after_high = high.denoise(cond)
    assert [s.expert for s in after_high.steps] == ["high"] and after_high.next_step == 1
    scheduler = make_scheduler(SAMPLER)
    set_timesteps(scheduler, SAMPLER, 2, "cpu")
    ref = initial_noise(cond.latent_shape, params.seed, "cpu")
    ref = _reference_step(pipe, pipe.transformer, cond, ref, scheduler, 0, params.guidance_scale)
    assert torch.equal(unpack(after_high.latents), ref)

    after_low = low.denoise(cond, after_high)
    assert [s.expert for s in after_low.steps] == ["high", "low"] and after_low.done
    ref = _reference_step(pipe, pipe.transformer_2, cond, ref, scheduler, 1, params.guidance_scale_2)
    assert torch.equal(unpack(after_low.latents), ref)
    assert high.steps_run == 1 and low.steps_run == 1


def test_expert_leaves_other_experts_steps_alone(encoder):
    cond = encoder.encode(get_dummy_params(num_inference_steps=2), get_dummy_image())
    low = DitExpert(ExpertConfig(), SAMPLER, "low")
    state = low.denoise(cond)  # a fresh state starts at step 0, which belongs to the high expert
    assert state.next_step == 0 and state.steps == () and low.steps_run == 0


def test_vae_decode_equals_the_pipelines_frames(pipe):
    decoder = Decoder(DecoderConfig())
    latents = torch.randn(1, 16, 3, 2, 4, generator=torch.Generator().manual_seed(3))
    scheduler = make_scheduler(SAMPLER)
    state = DenoiseState(params=get_dummy_params(width=32, height=16), latents=pack(latents),
                         sampler=export_state(scheduler), next_step=2, total_steps=2)
    frames = decoder.decode_float(state)
    assert frames.shape == (9, 16, 32, 3) and frames.dtype == np.float32
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        video = vae.decode(latents * std + mean, return_dict=False)[0]
    ref = pipe.video_processor.postprocess_video(video, output_type="np")[0]
    np.testing.assert_array_equal(frames, ref)
    out = decoder.decode(state)
    assert out.frames.dtype == np.uint8 and out.fps == 16
    np.testing.assert_array_equal(out.frames, to_uint8(ref))


def test_decoder_refuses_unfinished_latents():
    decoder = Decoder(DecoderConfig())
    state = DenoiseState(params=get_dummy_params(), latents=pack(torch.zeros(1, 16, 3, 2, 2)),
                         sampler=export_state(make_scheduler(SAMPLER)), next_step=1, total_steps=2)
    with pytest.raises(ValueError, match="step 1 of 2"):
        decoder.decode(state)


def test_stages_report_health_and_placement(encoder):
    encoder.check_health()
    info = encoder.info()
    assert info["device"] == "cpu" and "cuda_visible_devices" in info


def test_warm_up_shapes_run_before_the_stage_reports_ready():
    from deployments.config import WarmupShape
    from deployments.dit_expert import WARMUP_FORWARDS

    assert WARMUP_FORWARDS == 2
    shapes = [WarmupShape(width=32, height=16, num_frames=5)]
    encoder = Encoder(EncoderConfig(device="cpu", warmup=shapes))
    expert = DitExpert(ExpertConfig(device="cpu", warmup=shapes), SAMPLER, "high")
    decoder = Decoder(DecoderConfig(device="cpu", warmup=shapes))
    for stage, runs in ((encoder, 1), (expert, WARMUP_FORWARDS), (decoder, 1)):
        # each ran its model under its lock during construction (the expert's warm-up is two
        # forwards per shape: DitExpert.warm_up), and says how long start-up took
        assert sum(len(v) for v in stage.metrics.wait.values.values()) == runs
        assert stage.info()["startup_s"] > 0
    assert expert.steps_run == 0  # a warm-up is not a denoise step of any request


def test_the_decoders_warm_up_runs_the_mp4_path_of_a_request(monkeypatch):
    """The decoder's warm-up decodes AND encodes an MP4 at the shape (x264's one-time set-up is
    paid at start-up), and none of it is counted as a request in the stage's latency metric."""
    import deployments.decoder as decoder_module
    from deployments.config import WarmupShape

    from deployments.media import fmp4

    written, finished = [], []
    make_writer = fmp4.clip_writer

    def recording(fps):
        writer = make_writer(fps)
        write, close = writer.write, writer.close
        writer.write = lambda frames: (written.append(frames.shape), write(frames))[1]
        writer.close = lambda: (finished.append(close()), finished[-1])[1]
        return writer

    monkeypatch.setattr(decoder_module, "clip_writer", recording)
    decoder = Decoder(DecoderConfig(device="cpu", warmup=[WarmupShape(width=32, height=16, num_frames=5)]))
    assert {shape[1:] for shape in written} == {(16, 32, 3)} and sum(shape[0] for shape in written) == 5
    assert len(finished) == 1 and finished[0]  # the file's tail: x264 ran to the end
    assert not any(decoder.metrics.latency.values.values())
