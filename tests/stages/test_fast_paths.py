"""Speed options of the video stages against the plain path (each is a config value; the gain
is measured in bench/README.md, the output pinned here)."""

import numpy as np
import pytest
import torch

from deployments.config_weights import RandomWeights
from deployments.models.wan.components import load_vae, set_conv_format


def test_channels_last_vae_decodes_the_same_frames():
    """`decoder.channels_last` (on in the full profiles): only the memory layout of the 3-D
    convolution weights changes, so the decoded frames equal the plain path's to fp32 rounding
    (on an H200 in bf16, where cuDNN then picks other algorithms, they differ by 2.2% relative)."""
    vae = load_vae(RandomWeights(arch="tiny", seed=0), torch.float32, "cpu")
    z = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = vae.decode(z, return_dict=False)[0]
        set_conv_format(vae, torch.channels_last_3d)
        convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv3d)]
        assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last_3d) for m in convs)
        fast = vae.decode(z, return_dict=False)[0]
    assert fast.shape == plain.shape == (1, 3, 9, 32, 32)
    assert float((fast - plain).norm() / plain.norm()) < 1e-5


def test_channels_last_vae_encodes_the_same_latents():
    """`encoder.channels_last` (on in the full profiles): the condition's latents equal the plain
    path's to fp32 rounding (on an H200 in fp32 they differ by 0.1% relative: other algorithms)."""
    vae = load_vae(RandomWeights(arch="tiny", seed=0), torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    video = torch.cat([torch.rand(1, 3, 1, 32, 32, generator=g) * 2 - 1, torch.zeros(1, 3, 8, 32, 32)], dim=2)
    with torch.no_grad():
        plain = vae.encode(video).latent_dist.mode()
        set_conv_format(vae, torch.channels_last_3d)
        fast = vae.encode(video).latent_dist.mode()
    assert fast.shape == plain.shape == (1, 16, 3, 4, 4)
    assert float((fast - plain).norm() / plain.norm()) < 1e-5


def _done_state(frames_latent: int = 3, width: int = 32, height: int = 16):
    from deployments.common.payloads import DenoiseState
    from deployments.common.transport import pack
    from deployments.config import SamplerConfig
    from deployments.models.wan.sampler import export_state, make_scheduler
    from helpers import get_dummy_params

    latents = torch.randn(1, 16, frames_latent, height // 8, width // 8, generator=torch.Generator().manual_seed(7))
    params = get_dummy_params(width=width, height=height, num_frames=(frames_latent - 1) * 4 + 1)
    return DenoiseState(params=params, latents=pack(latents), sampler=export_state(make_scheduler(SamplerConfig())),
                        next_step=2, total_steps=2), latents


@pytest.fixture(scope="module")
def decoder():
    from deployments.config import DecoderConfig
    from deployments.decoder import Decoder

    return Decoder(DecoderConfig())


def test_chunked_decode_gives_the_whole_clips_frames(decoder):
    """The decoder's own per-latent-frame loop (so that H.264 encoding overlaps the decode)
    produces exactly the frames of diffusers' whole-clip decode: 1 frame, then 4 per chunk."""
    _, latents = _done_state(frames_latent=4)
    chunks = []
    decoder.decode_chunks(latents, chunks.append)
    assert [c.shape[0] for c in chunks] == [1, 4, 4, 4]
    np.testing.assert_array_equal(np.concatenate(chunks), decoder.decode_uint8(latents))


def test_the_streamed_mp4_is_the_file_of_the_whole_clip(decoder):
    """decode_fmp4 (chunks encoded while the next decodes, pieces handed on as they are cut)
    writes byte for byte the fMP4 that encoding the whole decoded clip at once writes; the
    whole-clip path (tiled VAE) too; the first piece (header + first fragment) comes before the
    last chunk is decoded, and the file plays as the clip."""
    from deployments.media.fmp4 import encode_clip
    from deployments.media.video import decode_mp4

    state, _ = _done_state(frames_latent=9)  # 33 frames at 16 fps: fragments at 16 and 32
    whole = encode_clip(decoder.decode(state).frames, state.params.fps)
    decoded = []
    real = decoder._decode_chunks

    def noting(latents, on_chunk):
        return real(latents, lambda chunk: (decoded.append(len(chunk)), on_chunk(chunk)))

    decoder._decode_chunks = noting
    try:
        pieces = []
        for piece in decoder.decode_fmp4(state):
            pieces.append((piece, sum(decoded)))
    finally:
        del decoder._decode_chunks
    assert b"".join(p for p, _ in pieces) == whole == decoder.decode_mp4(state)
    assert len(pieces) >= 2 and pieces[0][1] < 33, [(len(p), n) for p, n in pieces]
    frames, fps = decode_mp4(whole)
    assert frames.shape == (33, 16, 32, 3) and fps == state.params.fps
    decoder.vae.use_tiling = True
    try:
        assert not decoder._streams()
        assert decoder.decode_mp4(state) == whole
    finally:
        decoder.vae.use_tiling = False


def test_a_reader_that_stops_early_stops_the_decode_and_frees_the_decoder(decoder):
    state, _ = _done_state(frames_latent=9)
    whole = decoder.decode_mp4(state)
    stream = decoder.decode_fmp4(state)
    next(stream)
    stream.close()  # the client left after the first piece
    assert not decoder.model.locked()
    assert decoder.decode_mp4(state) == whole  # feature cache cleared, nothing left behind


def test_a_writer_failure_fails_the_request_and_leaves_the_decoder_working(decoder, monkeypatch):
    from deployments.media import fmp4

    state, _ = _done_state()
    good = decoder.decode_mp4(state)
    calls = {"n": 0}
    real_write = fmp4.FragmentedMP4Writer.write

    def failing(self, frames):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real_write(self, frames)

    monkeypatch.setattr(fmp4.FragmentedMP4Writer, "write", failing)
    with pytest.raises(OSError, match="simulated"):
        decoder.decode_mp4(state)
    monkeypatch.undo()
    assert decoder.decode_mp4(state) == good  # lock released, feature cache cleared


def test_decode_mp4_refuses_unfinished_latents(decoder):
    from dataclasses import replace

    state, _ = _done_state()
    with pytest.raises(ValueError, match="step 1 of 2"):
        decoder.decode_mp4(replace(state, next_step=1))
