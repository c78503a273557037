"""LipSync stage (deployments/lipsync.py) with its avatar preparation. Offline, no Ray: tiny random
models on the CPU, and a real-layout checkpoint (MuseTalk unet.pth + musetalk.json, VAE and whisper
folders) written to tmp_path. Model-side pieces alone are in tests/models/test_musetalk.py."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperModel

from deployments.common.errors import AudioError, AvatarNotFound, MissingWeightsError
from deployments.common.payloads import Frames, Speech
from deployments.config import LipSyncConfig
from deployments.config_weights import MuseTalkWeights, RandomWeights
from deployments.lipsync import LipSync
from deployments.models.musetalk import pipeline as musetalk_pipeline
from deployments.models.musetalk.avatar import PreparedAvatar, blend_face, crop_face
from deployments.models.musetalk.components import TINY
from deployments.models.musetalk.pipeline import lipsync_dtype
from helpers import decode_mp4_tracks, synthetic_landmarks

H, W = 64, 96
BOX = (24, 8, 72, 56)  # (x1, y1, x2, y2) inside a 96x64 frame


def get_dummy_inputs(seed: int = 0, num_frames: int = 5) -> dict:
    """A 16 fps base clip (uint8 (N, 64, 96, 3)) and half a second of speech-like PCM."""
    g = np.random.default_rng(seed)
    frames = g.integers(0, 256, (num_frames, H, W, 3), dtype=np.uint8)
    t = np.arange(8000) / 16000
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    return {"frames": frames, "fps": 16, "audio": pcm}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("avatars")


@pytest.fixture(scope="module")
def stage(cache_dir) -> LipSync:
    cfg = LipSyncConfig(weights=RandomWeights(arch="tiny", seed=0), device="cpu",
                        avatar_cache_dir=str(cache_dir), batch_size=4)
    return LipSync(cfg)


@pytest.fixture(scope="module")
def avatar(stage) -> PreparedAvatar:
    return prepare(stage, get_dummy_inputs(), face_box=BOX)


def prepare(stage: LipSync, inputs: dict, **kwargs) -> PreparedAvatar:
    """The stage's create_avatar, and the prepared avatar it made."""
    info = stage.create_avatar(Frames(frames=inputs["frames"], fps=inputs["fps"]), **kwargs)
    return stage.get_avatar(info.prepared_id)


# ------------------------------------------------------------------ audio features and windows


def test_whisper_features_stack_all_five_hidden_states(stage):
    piece = stage.pipeline.encode_audio_piece(get_dummy_inputs()["audio"])
    assert piece.shape == (1500, 5, 384) and piece.dtype == torch.float32
    # Embeddings, four layers (the last layer-normed): five different states.
    assert all(not torch.allclose(piece[:, a], piece[:, b]) for a in range(5) for b in range(a + 1, 5))
    normed = piece[:, 4]
    assert normed.mean(-1).abs().max() < 1e-3  # LayerNorm output (random init: unit gain, zero bias)


# ------------------------------------------------------------------ blending


# ------------------------------------------------------------------ avatar preparation


def test_prepared_avatar_shapes(stage, avatar):
    n = 5
    assert avatar.frames.shape == (n, H, W, 3) and avatar.frames.dtype == np.uint8
    assert avatar.latents.shape == (n, 8, 32, 32) and avatar.latents.dtype == np.float32
    assert avatar.crops.shape == (n, 256, 256, 3) and avatar.crops.dtype == np.uint8
    assert avatar.masks.shape == (n, 256, 256) and avatar.masks.dtype == np.uint8
    assert avatar.boxes.tolist() == [list(BOX)] * n
    # 5 frames at 16 fps -> ceil(5 * 25 / 16) = 8 frames at 25 fps, nearest source frame each.
    assert avatar.source_index.tolist() == [0, 1, 1, 2, 3, 3, 4, 4]
    assert avatar.fps == 25 and avatar.info.num_frames == 8
    np.testing.assert_array_equal(avatar.crops[2], crop_face(avatar.frames[2], BOX))


def test_second_prepare_reuses_the_cache_without_vae_encodes(stage, avatar, cache_dir):
    inputs = get_dummy_inputs()
    encodes = stage.pipeline.vae_encodes
    again = prepare(stage, inputs, face_box=BOX)
    assert stage.pipeline.vae_encodes == encodes and again.prepared_id == avatar.prepared_id
    # A fresh stage (another replica) finds it on disk: no VAE encode either.
    other = LipSync(stage.cfg)
    from_disk = prepare(other, inputs, face_box=BOX)
    assert other.pipeline.vae_encodes == 0
    assert (cache_dir / f"{avatar.prepared_id}.npz").is_file()
    for name in PreparedAvatar._ARRAYS:
        np.testing.assert_array_equal(getattr(from_disk, name), getattr(avatar, name))
    assert other.get_avatar(avatar.prepared_id).prepared_id == avatar.prepared_id
    # Different content or settings -> a different avatar, prepared afresh.
    changed = inputs["frames"].copy()
    changed[0, 0, 0, 0] ^= 1
    for frames, fps, box in [(changed, 16, BOX), (inputs["frames"], 16, (20, 8, 72, 56)),
                             (inputs["frames"], 25, BOX)]:
        before = other.pipeline.vae_encodes
        assert prepare(other, {"frames": frames, "fps": fps}, face_box=box).prepared_id != avatar.prepared_id
        assert other.pipeline.vae_encodes > before


def test_vae_latents_mask_the_lower_half(stage):
    g = np.random.default_rng(2)
    a = g.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    b = a.copy()
    b[128:] = g.integers(0, 256, (128, 256, 3), dtype=np.uint8)  # differ only in the lower half
    latents = stage.pipeline.encode_crops(np.stack([a, b]))
    assert latents.shape == (2, 8, 32, 32)
    np.testing.assert_array_equal(latents[0, :4], latents[1, :4])  # masked: lower half unseen
    assert not np.allclose(latents[0, 4:], latents[1, 4:])  # reference: whole crop


# ------------------------------------------------------------------ the talk turn


def test_turn_frames_come_in_chunks_of_blended_frames(stage, avatar):
    audio = get_dummy_inputs()["audio"]  # 0.5 s -> 12 frames
    chunks = list(stage.pipeline.frames(avatar, audio, batch_size=5))
    assert [c.shape for c in chunks] == [(5, H, W, 3), (5, H, W, 3), (2, H, W, 3)]
    assert all(c.dtype == np.uint8 for c in chunks)
    frames = np.concatenate(chunks)
    x1, y1, x2, y2 = BOX
    outside = np.ones((H, W), bool)
    outside[y1:y2, x1:x2] = False
    cycle = [0, 1, 1, 2, 3, 3, 4, 4, 4, 4, 3, 3]  # retimed clip forward, then backward
    for i, frame in enumerate(frames):
        assert avatar.source_frame(i) == cycle[i]
        np.testing.assert_array_equal(frame[outside], avatar.frames[cycle[i]][outside])
    # Inside the mask the generated face replaced the base frame.
    lower = slice(y1 + 3 * (y2 - y1) // 4 - 2, y1 + 3 * (y2 - y1) // 4 + 2)
    assert not np.array_equal(frames[0][lower, x1 + 10:x2 - 10], avatar.frames[0][lower, x1 + 10:x2 - 10])
    # The first chunk is exactly the pipeline written out by hand.
    feats = stage.pipeline.audio_features(audio)
    crops = stage.pipeline.generate(avatar.latents[cycle[:5]], feats.windows(range(5)))
    assert crops.shape == (5, 256, 256, 3) and crops.dtype == np.uint8
    by_hand = [blend_face(avatar.frames[s], c, avatar.boxes[s], avatar.masks[s])
               for s, c in zip(cycle[:5], crops)]
    np.testing.assert_array_equal(chunks[0], np.stack(by_hand))


def test_turn_frames_continue_the_cycle_from_start_index(stage, avatar):
    audio = get_dummy_inputs()["audio"][:1280]  # 0.08 s -> 2 frames
    frames = np.concatenate(list(stage.pipeline.frames(avatar, audio, start_index=9)))
    x1, y1, x2, y2 = BOX
    assert frames.shape[0] == 2
    for i, frame in enumerate(frames):
        src = [4, 3][i]  # cycle positions 9 and 10 of 0 1 1 2 3 3 4 4 | 4 4 3 3 2 1 1 0
        np.testing.assert_array_equal(frame[:y1], avatar.frames[src][:y1])


def test_speak_refuses_bad_audio_before_any_model_runs(stage, avatar):
    before = stage.pipeline.frames_generated
    with pytest.raises(AudioError, match="limit"):
        next(stage.speak(avatar, np.zeros(int((stage.max_audio_seconds + 1) * 16000), np.float32)))
    with pytest.raises(AudioError, match="shorter than one video frame"):
        next(stage.speak(avatar, np.zeros(100, np.float32)))
    with pytest.raises(AudioError, match="reach 1e"):
        next(stage.speak(avatar, np.full(16000, 1e12, np.float32)))
    with pytest.raises(AudioError):
        next(stage.speak(avatar, b"not audio"))
    with pytest.raises(AvatarNotFound):
        next(stage.speak("0" * 32, np.zeros(16000, np.float32)))
    assert stage.pipeline.frames_generated == before


def test_admitted_speech_is_taken_as_checked_and_raw_audio_is_checked_once(stage, avatar, monkeypatch):
    """Audio is checked where it enters: a Speech (admitted by the ingress) goes straight to the
    models; raw PCM or a file is admitted by the stage, once per turn."""
    from deployments import lipsync

    checks = []
    admit = lipsync.admit_speech
    monkeypatch.setattr(lipsync, "admit_speech", lambda *a, **k: checks.append(1) or admit(*a, **k))
    pcm = get_dummy_inputs()["audio"]
    raw = b"".join(stage.speak(avatar, pcm))
    assert checks == [1]
    assert b"".join(stage.speak(avatar, Speech(pcm))) == raw and checks == [1]
    assert stage.lipsync_mp4(avatar, pcm) == raw and checks == [1, 1]


def test_speak_streams_a_playable_mp4(stage, avatar):
    audio = get_dummy_inputs()["audio"]
    pieces = list(stage.speak(avatar, audio))
    video, fps, audio_end = decode_mp4_tracks(b"".join(pieces))
    assert video.shape == (12, H, W, 3) and fps == 25
    assert abs(audio_end - 12 / 25) < 1 / 25


def test_delete_avatar(stage):
    prepared = prepare(stage, get_dummy_inputs(seed=5, num_frames=2), face_box=BOX)
    assert stage.delete_avatar(prepared.prepared_id)
    with pytest.raises(AvatarNotFound):
        stage.get_avatar(prepared.prepared_id)


# ------------------------------------------------------------------ dtypes and architectures


def test_dtype_policy_fp16_on_gpu_fp32_on_cpu():
    cfg = LipSyncConfig()
    assert lipsync_dtype(cfg, torch.device("cuda", 0)) == torch.float16
    assert lipsync_dtype(cfg, torch.device("cpu")) == torch.float32
    assert lipsync_dtype(LipSyncConfig(dtype="bfloat16"), torch.device("cuda", 0)) == torch.bfloat16


# ------------------------------------------------------------------ real-weights layout


def write_musetalk_layout(root, stage: LipSync):
    """The published layout, with the tiny models: musetalkV15/unet.pth + musetalk.json, a
    diffusers VAE folder and a transformers whisper folder (model + feature extractor)."""
    source = stage.pipeline
    (root / "musetalkV15").mkdir(parents=True)
    torch.save(source.unet.state_dict(), root / "musetalkV15" / "unet.pth")
    (root / "musetalkV15" / "musetalk.json").write_text(json.dumps(dict(source.unet.config)))
    source.vae.save_pretrained(root / "sd-vae-ft-mse")
    torch.manual_seed(0)
    whisper = WhisperModel(WhisperConfig(**TINY["whisper"]))
    whisper.encoder.load_state_dict(source.whisper.state_dict())
    whisper.save_pretrained(root / "whisper-tiny")
    source.feature_extractor.save_pretrained(root / "whisper-tiny")


def test_musetalk_layout_loads_and_matches_the_models_it_was_written_from(stage, tmp_path):
    write_musetalk_layout(tmp_path, stage)
    weights = MuseTalkWeights(repo=str(tmp_path), vae=str(tmp_path / "sd-vae-ft-mse"),
                              whisper=str(tmp_path / "whisper-tiny"))
    loaded = LipSync(LipSyncConfig(weights=weights, device="cpu")).pipeline
    ours = stage.pipeline
    assert isinstance(loaded.unet.config.block_out_channels, (list, tuple))
    for a, b in ((ours.unet, loaded.unet), (ours.vae, loaded.vae), (ours.whisper, loaded.whisper)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert loaded.scaling_factor == pytest.approx(0.18215)
    audio = get_dummy_inputs()["audio"]
    np.testing.assert_array_equal(loaded.encode_audio_piece(audio).numpy(),
                                  ours.encode_audio_piece(audio).numpy())
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 8, 32, 32, generator=g)
    feats = torch.randn(2, 50, 384, generator=g)
    np.testing.assert_array_equal(loaded.generate(latents, feats), ours.generate(latents, feats))


def test_missing_musetalk_files_name_the_download_command(stage, tmp_path):
    # A Hub repo id that is not in the (empty) cache: serving never downloads.
    weights = MuseTalkWeights(repo="TMElyralab/MuseTalk", vae="stabilityai/sd-vae-ft-mse",
                              whisper="openai/whisper-tiny")
    with pytest.raises(MissingWeightsError, match="avatar-serve download"):
        LipSync(LipSyncConfig(weights=weights, device="cpu"), weights_dir=str(tmp_path / "hub"))
    # A local layout without the UNet file.
    write_musetalk_layout(tmp_path / "layout", stage)
    (tmp_path / "layout" / "musetalkV15" / "unet.pth").unlink()
    weights = MuseTalkWeights(repo=str(tmp_path / "layout"), vae=str(tmp_path / "layout" / "sd-vae-ft-mse"),
                              whisper=str(tmp_path / "layout" / "whisper-tiny"))
    with pytest.raises(MissingWeightsError, match="unet.pth"):
        LipSync(LipSyncConfig(weights=weights, device="cpu"))


# ------------------------------------------------------------------ fragmented MP4


def test_default_batches_start_small_then_full(avatar, cache_dir):
    cfg = LipSyncConfig(weights=RandomWeights(arch="tiny", seed=0), device="cpu",
                        avatar_cache_dir=str(cache_dir), batch_size=4, first_batch_size=3)
    stage = LipSync(cfg)
    audio = get_dummy_inputs()["audio"]  # 12 frames
    assert [len(c) for c in stage.pipeline.frames(avatar, audio)] == [3, 4, 4, 1]


def test_padding_for_compiled_batch_sizes_changes_no_output(stage, avatar):
    """A compiled stage pads short batches up to a compiled size; the padding must not change
    the frames it returns (samples of a batch are independent)."""
    pipeline = stage.pipeline
    feats = pipeline.audio_features(get_dummy_inputs()["audio"])
    latents, audio = avatar.latents[[0, 1, 2]], feats.windows(range(3))
    plain = pipeline.generate(latents, audio)
    pipeline.compiled = True  # as after torch.compile: batches of 3 are padded up to batch_size 4
    try:
        padded = pipeline.generate(latents, audio)
    finally:
        pipeline.compiled = False
    assert padded.shape == plain.shape == (3, 256, 256, 3)
    assert np.abs(padded.astype(int) - plain.astype(int)).max() <= 1  # fp32 batch-size rounding


def test_landmark_detector_plugs_into_preparation(stage):
    from deployments.models.musetalk.avatar import LandmarkFaceDetector, face_boxes

    frames = get_dummy_inputs()["frames"]
    seen = []
    detector = LandmarkFaceDetector(box=lambda f: (0, 0, 8, 8),
                                    landmarks=lambda f, box: seen.append(box) or synthetic_landmarks(
                                        cx=20, nose_y=20, chin_y=40, half_width=10))
    boxes = face_boxes(frames, detector, extra_margin=3)
    # (10, 0, 30, 40) from the landmarks, 3 px more below the chin, clipped to the frame.
    h = frames.shape[1]
    assert boxes.tolist() == [[10, 0, 30, min(43, h)]] * len(frames)
    assert seen == [(0, 0, 8, 8)] * len(frames)  # landmarks are found inside the detector's box


def test_landmarks_detector_is_built_from_s3fd_and_fan(tmp_path):
    """face_detector: landmarks wires S3FD boxes and FAN landmarks into MuseTalk's rule; random
    models here (speed and plumbing), so boxes are checked for shape and bounds only."""
    from deployments.config_weights import MuseTalkWeights
    from deployments.models.musetalk.avatar import LandmarkFaceDetector

    cfg = LipSyncConfig(weights=RandomWeights(arch="tiny", seed=0), device="cpu", batch_size=4,
                        face_detector="landmarks", avatar_cache_dir=str(tmp_path))
    stage = LipSync(cfg)
    detector = stage.pipeline.detector
    assert isinstance(detector, LandmarkFaceDetector) and detector.name.startswith("s3fd+fan")
    inputs = get_dummy_inputs(num_frames=2)
    avatar = prepare(stage, inputs)
    n, h, w = inputs["frames"].shape[:3]
    assert avatar.boxes.shape == (n, 4)
    assert np.all(avatar.boxes[:, 0] < avatar.boxes[:, 2]) and np.all(avatar.boxes[:, 1] < avatar.boxes[:, 3])
    assert np.all(avatar.boxes >= 0) and np.all(avatar.boxes[:, 2] <= w) and np.all(avatar.boxes[:, 3] <= h)
    without_files = SimpleNamespace(cfg=LipSyncConfig(weights=MuseTalkWeights(), face_detector="landmarks"))
    with pytest.raises(ValueError, match="s3fd"):
        musetalk_pipeline.MuseTalkPipeline._landmark_detector(without_files)


def test_paste_back_on_the_device_gives_the_host_frames(stage, avatar, cache_dir):
    """`paste_back: device` (what a GPU stage does) against PIL on the host: the same turn within
    two levels; RGBA frames (for NVENC) carry the same colours and an opaque alpha."""
    audio = get_dummy_inputs()["audio"]
    host = np.concatenate(list(stage.pipeline.frames(avatar, audio)))
    cfg = stage.cfg.model_copy(update={"paste_back": "device"})
    on_device = LipSync(cfg)
    device = np.concatenate(list(on_device.pipeline.frames(avatar, audio)))
    rgba = np.concatenate(list(on_device.pipeline.frames(avatar, audio, rgba=True)))
    assert device.shape == host.shape and rgba.shape == (*host.shape[:3], 4)
    assert np.abs(device.astype(int) - host.astype(int)).max() <= 2
    np.testing.assert_array_equal(rgba[..., :3], device)
    assert (rgba[..., 3] == 255).all()
    assert on_device.delete_avatar(avatar.prepared_id) and not on_device.pipeline._pastes


def _speech(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


@pytest.mark.slow  # a fresh stage and a 50-frame turn each, on the CPU
@pytest.mark.parametrize("first_batch, chunks_before_first_bytes", [(14, 1), (13, 2)])
def test_first_bytes_leave_with_the_first_batch_of_keyframe_interval_plus_two(
        avatar, cache_dir, first_batch, chunks_before_first_bytes):
    """The streamed MP4 cuts its first fragment when frame `mp4_keyframe_interval` (12) leaves the
    muxer, which waits for audio past it: with the default first batch of 14 frames the first
    bytes go out after the first batch; with 13 they wait for the second (why the default is 14,
    not 12 or the 16 it was)."""
    cfg = LipSyncConfig(weights=RandomWeights(arch="tiny", seed=0), device="cpu", avatar_cache_dir=str(cache_dir),
                        batch_size=16, **({} if first_batch == 14 else {"first_batch_size": first_batch}))
    assert cfg.first_batch_size == first_batch and cfg.mp4_keyframe_interval == 12
    stage = LipSync(cfg)
    consumed = []
    frames = stage.pipeline.frames

    def counting(*args, **kwargs):
        for chunk in frames(*args, **kwargs):
            consumed.append(len(chunk))
            yield chunk

    stage.pipeline.frames = counting
    pieces = stage.speak(avatar, _speech(2.0))  # 50 frames
    first = next(p for p in pieces if p)
    assert len(consumed) == chunks_before_first_bytes, consumed
    assert consumed[0] == first_batch
    rest = b"".join(pieces)
    video, _, _ = decode_mp4_tracks(first + rest)
    assert video.shape[0] == 50


@pytest.mark.slow  # two 25-frame turns on the CPU
def test_on_a_gpu_the_first_batch_goes_out_before_the_second_is_launched(stage, avatar, monkeypatch):
    """With asynchronous copies (a GPU) later batches overlap -- batch k is blended while the
    device computes k+1 -- but the first chunk is yielded as soon as it is ready, before the
    second batch's features, launch or lock. Simulated here with a device-like copy event."""
    class Event:
        def synchronize(self):
            pass

    pipeline = stage.pipeline
    expected = list(pipeline.frames(avatar, _speech(1.0), batch_size=5))  # the synchronous path
    launched = []
    generate = pipeline._generate

    def counting_generate(*args, **kwargs):
        launched.append(1)
        return generate(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_generate", counting_generate)
    monkeypatch.setattr(musetalk_pipeline, "_to_host", lambda crops: (crops, Event()))
    chunks = pipeline.frames(avatar, _speech(1.0), batch_size=5)
    first = next(chunks)
    assert len(launched) == 1  # yielded before the second batch was launched
    second = next(chunks)
    assert len(launched) == 3  # from then on one batch ahead: the third runs while the second goes out
    got = [first, second, *chunks]
    assert len(got) == len(expected) == 5
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_live_batches_at_once_are_merged_into_fewer_model_calls_with_the_same_frames(stage, avatar):
    """Live sessions' batches that wait at the same time run as one UNet + VAE call (up to the
    largest batch size: 8 here, the live one); each caller gets its own crops, equal to its batch alone within
    rounding (another batch size: fp32 sums in another order; at most 2 levels)."""
    from concurrent.futures import ThreadPoolExecutor

    pipeline = stage.pipeline
    features = pipeline.audio_features(_speech(1.0))
    asks = [(0, 2, 0), (2, 2, 3), (4, 1, 7), (5, 2, 1), (7, 1, 9), (8, 2, 4)]  # (first, count, start_index)
    batches = [([avatar.source_frame(i, start) for i in range(first, first + count)],
                features.windows(range(first, first + count))) for first, count, start in asks]
    alone = [pipeline.run(pipeline._launch_batch, avatar, sources, windows, None)[0].numpy()
             for sources, windows in batches]
    calls = pipeline.merged_calls
    release = threading.Event()
    stage.model.submit(release.wait)  # the model thread is busy: every batch below waits, then merges
    with ThreadPoolExecutor(len(batches)) as pool:
        pending = [pool.submit(pipeline._launch_shared, avatar, sources, windows, None) for sources, windows in batches]
        deadline = time.monotonic() + 120  # a hang guard, not a speed bound
        while len(pipeline._shared) < len(batches):  # every batch is waiting for the model thread
            assert time.monotonic() < deadline, "the batches never queued"
            time.sleep(0.01)
        release.set()
        together = [p.result()[0].numpy() for p in pending]
    assert pipeline.batch_sizes[-1] == 8
    assert pipeline.merged_calls - calls == 2  # ten frames, at most 8 a call: two calls for six batches
    for a, b in zip(alone, together):
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 2
