"""8-bit self-attention (`attention_backend: cudnn_fp8` or `fa3_fp8`,
deployments/models/wan/fp8_attention.py).

On this CPU machine each op runs its reference (the kernel's FP8 recipe in fp32 with e4m3
rounding); the cuDNN and FlashAttention-3 kernels they stand for are timed and compared on the GPU
by bench/gpu_paths.py. What is pinned
here: the recipe's error against full precision, the processor's wiring into the experts (same
output as diffusers' processor within a stated tolerance, every block routed), the op staying one
opaque call in a compiled block, and a clear start-up error when the GPU package is missing.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from deployments.config import ExpertConfig, SamplerConfig
from deployments.dit_expert import DitExpert
from deployments.models.wan import fp8_attention
from deployments.models.wan.fp8_attention import (
    FP8_MAX,
    quantise,
    quantise_per_head,
    reference,
    reference_fa3,
)

SAMPLER = SamplerConfig(scheduler="euler", flow_shift=5.0, num_inference_steps=2, high_steps=1,
                        sigmas=[1.0, 0.5], guidance_scale=1.0, guidance_scale_2=1.0)
# The tiny expert's output with 8-bit self-attention against diffusers' fp32 path, relative L2
# (measured 0.32%: attention is one term among residuals; a wrong scale gives tens of percent).
EXPERT_TOLERANCE = 0.02


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_quantise_keeps_layout_and_e4m3_precision():
    x = torch.randn(2, 50, 3, 16).transpose(1, 2) * 7  # not contiguous: its strides must stay
    x8, descale = quantise(x)
    assert x8.dtype == torch.float8_e4m3fn and x8.stride() == x.stride() and descale.shape == (1, 1, 1, 1)
    back = x8.float() * descale
    assert float(x8.float().abs().max()) == FP8_MAX  # the largest value maps onto e4m3's top
    big = x.abs() > x.abs().max() / 8  # normal numbers: 3 mantissa bits, half an ulp of error
    assert float(((back - x).abs() / x.abs())[big].max()) <= 2 ** -4
    zeros, descale = quantise(torch.zeros(4, 4, 2, 8))
    assert torch.isfinite(descale).all() and not zeros.float().any()


@pytest.mark.parametrize("recipe, spread, bound", [(reference, 1.0, 0.08), (reference, 3.0, 0.16),
                                                   (reference_fa3, 1.0, 0.08), (reference_fa3, 3.0, 0.16)])
def test_recipe_error_against_full_precision(recipe, spread, bound):
    """Each recipe's error on random inputs (flat attention, the hardest case for one scale per
    tensor or head), and that it does round. cuDNN's (O in e4m3, scaled by max|V|): measured 6.0%
    and 13.1%; FlashAttention-3's (per-head scales, P in e4m3 times 256, O in bf16): 5.4% and
    12.7% (Q and K's rounding is most of it here; on the H200 at 32,760 tokens 6.1% and 5.4%).
    bf16 SDPA: 0.4% and 0.8%."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 300, 4, 32, generator=g) * spread for _ in range(2))
    v = torch.randn(1, 300, 4, 32, generator=g)
    exact = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    out = recipe(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert 0.01 < rel(out, exact) < bound


def test_quantise_per_head_gives_each_head_its_own_scale():
    x = torch.randn(2, 50, 3, 16) * torch.tensor([0.01, 1.0, 300.0]).view(1, 1, 3, 1)  # heads far apart
    x8, descale = quantise_per_head(x)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape and descale.shape == (2, 3)
    assert descale.dtype == torch.float32
    top = x8.float().abs().amax(dim=(1, 3))
    assert torch.equal(top, torch.full((2, 3), FP8_MAX))  # every head's largest value onto e4m3's top
    back = x8.float() * descale[:, None, :, None]
    big = x.abs() > x.abs().amax(dim=(1, 3), keepdim=True) / 8
    assert float(((back - x).abs() / x.abs())[big].max()) <= 2 ** -4  # the quiet head keeps its precision too
    zeros, descale = quantise_per_head(torch.zeros(1, 4, 2, 8))
    assert torch.isfinite(descale).all() and not zeros.float().any()


def test_fa3_attention_on_a_cpu_is_the_recipe_and_the_kernel_op_returns_bf16():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 40, 2, 16, generator=g) for _ in range(3))
    assert torch.equal(fp8_attention.attention_fa3(q, k, v), reference_fa3(q, k, v))
    (q8, dq), (k8, dk), (v8, dv) = (quantise_per_head(t) for t in (q, k, v))
    out = torch.ops.avatar_serve.fa3_fp8_sdpa(q8, k8, v8, dq, dk, dv)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape and out.is_contiguous()


REFERENCES = {fp8_attention.NAME: "sdpa_reference", fp8_attention.FA3_NAME: "fa3_sdpa_reference"}


def tiny_inputs(transformer):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, transformer.config.in_channels, 3, 8, 8, generator=g)
    context = torch.randn(1, 16, transformer.config.text_dim, generator=g)
    return {"hidden_states": x, "timestep": torch.full((1,), 500.0), "encoder_hidden_states": context,
            "return_dict": False}


@pytest.mark.parametrize("backend", fp8_attention.BACKENDS)
def test_processor_routes_every_block_and_matches_diffusers_within_tolerance(monkeypatch, backend):
    transformer = DitExpert(ExpertConfig(), SAMPLER, "high").transformer
    inputs = tiny_inputs(transformer)
    with torch.no_grad():
        plain = transformer(**inputs)[0]
        assert fp8_attention.use_fp8_self_attention(transformer, torch.device("cpu"), backend) == len(transformer.blocks)
        calls = []
        original = getattr(fp8_attention, REFERENCES[backend])
        monkeypatch.setattr(fp8_attention, REFERENCES[backend], lambda *a: calls.append(a[0].shape) or original(*a))
        fast = transformer(**inputs)[0]
    assert len(calls) == len(transformer.blocks)  # self-attention of each block, cross-attention not
    assert 0 < rel(fast, plain) < EXPERT_TOLERANCE


@pytest.mark.slow  # torch.compile: Inductor builds C++ kernels
@pytest.mark.parametrize("backend", fp8_attention.BACKENDS)
def test_compiled_blocks_keep_the_op_as_one_call(backend):
    """fullgraph=True fails on a graph break: the custom op must be traceable as one call, with
    the same result as eager."""
    transformer = DitExpert(ExpertConfig(), SAMPLER, "low").transformer
    fp8_attention.use_fp8_self_attention(transformer, torch.device("cpu"), backend)
    inputs = tiny_inputs(transformer)
    with torch.no_grad():
        eager = transformer(**inputs)[0]
        torch._dynamo.reset()
        transformer.compile_repeated_blocks(fullgraph=True)
        compiled = transformer(**inputs)[0]
    assert rel(compiled, eager) < 1e-5


@pytest.mark.parametrize("backend", fp8_attention.BACKENDS)
def test_expert_stage_takes_it_from_the_config(backend):
    from deployments.common.transport import unpack
    from deployments.config import EncoderConfig
    from deployments.encoder import Encoder
    from helpers import get_dummy_image, get_dummy_params

    cond = Encoder(EncoderConfig()).encode(get_dummy_params(num_inference_steps=2, guidance_scale=1.0,
                                                            guidance_scale_2=1.0), get_dummy_image())
    plain = DitExpert(ExpertConfig(), SAMPLER, "high")
    fast = DitExpert(ExpertConfig(attention_backend=backend), SAMPLER, "high")
    assert all(isinstance(b.attn1.processor, fp8_attention.Fp8SelfAttention) for b in fast.transformer.blocks)
    kernel = fp8_attention.attention if backend == fp8_attention.NAME else fp8_attention.attention_fa3
    assert all(b.attn1.processor.kernel is kernel for b in fast.transformer.blocks)
    assert not any(isinstance(b.attn1.processor, fp8_attention.Fp8SelfAttention) for b in plain.transformer.blocks)
    a, b = unpack(plain.denoise(cond).latents), unpack(fast.denoise(cond).latents)
    assert 0 < rel(b, a) < EXPERT_TOLERANCE


@pytest.mark.parametrize("backend, module, package", [("cudnn_fp8", "cudnn", "nvidia-cudnn-frontend"),
                                                     ("fa3_fp8", "fa3_fwd_interface", "fa3-fwd")])
def test_a_gpu_without_the_backends_package_is_told_at_start_up(monkeypatch, backend, module, package):
    transformer = DitExpert(ExpertConfig(), SAMPLER, "high").transformer
    monkeypatch.setitem(sys.modules, module, None)  # import it -> ImportError
    with pytest.raises(RuntimeError, match=rf"{backend}.*pip install {package}"):
        fp8_attention.use_fp8_self_attention(transformer, torch.device("cuda"), backend)
    assert not any(isinstance(b.attn1.processor, fp8_attention.Fp8SelfAttention) for b in transformer.blocks)


def test_a_gpu_older_than_hopper_is_told_at_start_up(monkeypatch):
    transformer = DitExpert(ExpertConfig(), SAMPLER, "high").transformer
    monkeypatch.setitem(sys.modules, "cudnn", types.ModuleType("cudnn"))  # the package is there
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(RuntimeError, match=r"Hopper or newer.*A100-SXM4-80GB is 8\.0.*attention_backend: null"):
        fp8_attention.use_fp8_self_attention(transformer, torch.device("cuda"))
    assert not any(isinstance(b.attn1.processor, fp8_attention.Fp8SelfAttention) for b in transformer.blocks)


def test_a_backend_package_that_is_there_but_does_not_load_is_told_apart(monkeypatch):
    """A wheel built for another CUDA or torch fails at import with an OSError (a missing
    libcudart.so.13) or ImportError (undefined symbol): start-up says it is installed and names
    the other backend, not 'pip install' again."""
    import builtins

    transformer = DitExpert(ExpertConfig(), SAMPLER, "high").transformer
    real_import = builtins.__import__

    def failing(name, *args, **kwargs):
        if name == "fa3_fwd_interface":
            raise OSError("libcudart.so.13: cannot open shared object file: No such file or directory")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "fa3_fwd_interface", raising=False)
    monkeypatch.setattr(builtins, "__import__", failing)
    with pytest.raises(RuntimeError, match=r"fa3-fwd package is installed but does not load.*libcudart\.so\.13"
                                           r".*attention_backend: cudnn_fp8 or null"):
        fp8_attention.use_fp8_self_attention(transformer, torch.device("cuda"), "fa3_fp8")
    assert not any(isinstance(b.attn1.processor, fp8_attention.Fp8SelfAttention) for b in transformer.blocks)


def test_fa3_on_a_gpu_newer_than_hopper_is_told_at_start_up(monkeypatch):
    """FlashAttention-3's kernels are built for sm90 alone; a Blackwell card gets cuDNN's named."""
    transformer = DitExpert(ExpertConfig(), SAMPLER, "high").transformer
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", types.ModuleType("fa3_fwd_interface"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA B200")
    with pytest.raises(RuntimeError, match=r"Hopper GPUs .*9\.x.*B200 is 10\.0.*attention_backend: cudnn_fp8"):
        fp8_attention.use_fp8_self_attention(transformer, torch.device("cuda"), "fa3_fp8")
    assert not any(isinstance(b.attn1.processor, fp8_attention.Fp8SelfAttention) for b in transformer.blocks)
    monkeypatch.setitem(sys.modules, "cudnn", types.ModuleType("cudnn"))  # cuDNN's kernel is taken there
    assert fp8_attention.use_fp8_self_attention(transformer, torch.device("cuda"), "cudnn_fp8") == len(transformer.blocks)


def test_an_unknown_backend_is_refused():
    transformer = DitExpert(ExpertConfig(), SAMPLER, "high").transformer
    with pytest.raises(ValueError, match=r"'sage_fp8'.*cudnn_fp8, fa3_fp8"):
        fp8_attention.use_fp8_self_attention(transformer, torch.device("cpu"), "sage_fp8")


def test_attention_on_a_cpu_is_the_recipe_and_the_kernel_op_returns_scaled_e4m3():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 40, 2, 16, generator=g) for _ in range(3))
    assert torch.equal(fp8_attention.attention(q, k, v), reference(q, k, v))
    (q8, dq), (k8, dk), (v8, dv) = quantise(q), quantise(k), quantise(v)
    out8 = torch.ops.avatar_serve.fp8_sdpa(q8, k8, v8, dq, dk, dv)
    assert out8.dtype == torch.float8_e4m3fn and out8.shape == q.shape and out8.is_contiguous()
    assert float(out8.float().abs().max()) <= FP8_MAX  # O scaled by 448 / max|V| stays in range


def test_no_buildable_cudnn_plan_is_a_clear_error(monkeypatch):
    """cuDNN may offer plans none of which builds (a driver or cuDNN too old for the kernel): the
    first forward says so and names the way out, instead of failing inside the frontend."""

    class Graph:
        def __init__(self, **_):
            pass

        def tensor(self, **_):
            return self

        def sdpa_fp8(self, **_):
            return self, None, self, self

        def __getattr__(self, name):  # set_output, set_dim, validate, ...: chainable no-ops
            return lambda *a, **k: self

        def get_execution_plan_count(self):
            return 2

        def build_plan_at_index(self, index):
            raise RuntimeError(f"plan {index}: not supported")

    fake = types.SimpleNamespace(data_type=types.SimpleNamespace(FP8_E4M3=1, FLOAT=2), pygraph=Graph,
                                 heur_mode=types.SimpleNamespace(A=0, B=1, FALLBACK=2), create_handle=object)
    monkeypatch.setitem(sys.modules, "cudnn", fake)
    monkeypatch.setattr(fp8_attention, "_local", fp8_attention.threading.local())
    tensors = [quantise(torch.randn(1, 8, 2, 16))[0] for _ in range(3)] + [torch.ones(1, 1, 1, 1)] * 3
    with pytest.raises(RuntimeError, match=r"no FP8 attention plan.*\(1, 8, 2, 16\).*attention_backend: null"):
        fp8_attention._build(*tensors)


@pytest.mark.parametrize("backend", fp8_attention.BACKENDS)
def test_fp8_expert_denoises_requests_at_once_as_alone(backend):
    """Ray runs a replica's sync methods in a thread pool: several denoise calls of the fp8-attention
    expert at once (different seeds, sizes and frame counts) give each the latents it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    from deployments.common.transport import unpack
    from deployments.config import EncoderConfig
    from deployments.encoder import Encoder
    from helpers import get_dummy_image, get_dummy_params

    encoder = Encoder(EncoderConfig())
    shapes = [(32, 16, 5, 1), (16, 32, 9, 2), (48, 32, 5, 3), (32, 32, 13, 4)]
    conds = [encoder.encode(get_dummy_params(width=w, height=h, num_frames=f, seed=seed, num_inference_steps=2,
                                             guidance_scale=1.0, guidance_scale_2=1.0), get_dummy_image(seed))
             for w, h, f, seed in shapes]
    expert = DitExpert(ExpertConfig(attention_backend=backend), SAMPLER, "high")
    alone = [unpack(expert.denoise(c).latents) for c in conds]
    for _ in range(2):
        with ThreadPoolExecutor(len(conds)) as pool:
            together = list(pool.map(lambda c: unpack(expert.denoise(c).latents), conds))
        for a, b in zip(alone, together):
            assert torch.equal(a, b)
