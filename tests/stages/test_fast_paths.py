"""Speed options of the video stages against the plain path (each is a config value; the gain
is measured in bench/README.md, the output pinned here)."""

import torch

from deployments.config import RandomWeights
from deployments.decoder import set_conv_format
from deployments.models.wan.components import load_vae


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
