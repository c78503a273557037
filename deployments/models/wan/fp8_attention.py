"""8-bit self-attention for the Wan experts: cuDNN's FP8 flash attention (`attention_backend:
cudnn_fp8`).

Why: at 832x480x81 an expert step's self-attention (40 calls over 32,760 tokens) takes 1.51 s of
its 2.45 s on an H200 with PyTorch's fastest kernel (cuDNN, bf16; bench/README.md), and 8-bit
attention is what is left to gain there. PyTorch's SDPA has no 8-bit path, SageAttention >= 2
and FlashAttention-3's FP8 kernels are not on PyPI; cuDNN's FP8 flash attention is, through the
`nvidia-cudnn-frontend` package (optional: `pip install nvidia-cudnn-frontend`). Hand-written
here is only what that package lacks: the per-tensor scaling around it, a torch custom op (so a
compiled block keeps it as one opaque call) and the processor that routes the experts'
self-attention to it. Cross-attention (512 text tokens, well under 1% of a step) stays on
diffusers' path.

The numbers, on the GPU and in `reference` (the CPU path and the tests' yardstick):
    Q, K, V -> e4m3, one scale each: 448 / max|x|
    S = Q K^T / sqrt(d); P = exp(S - rowmax S) -> e4m3 (scale 448); O = (P V) / rowsum
    O -> e4m3 with scale 448 / max|V| (a row of O averages rows of V, so |O| <= max|V|), -> bf16
(on Hopper the FP8 kernel writes its output in e4m3 only; cuDNN keeps a running max and sum per
block where `reference` takes the row's, so the two agree closely, not bit for bit).

Speed and error on the card are measured by bench/gpu_paths.py (`cudnn_fp8`). On an H200 at
32,760 tokens: 30.3 ms per call, quantising included, against 38.2 ms for PyTorch's bf16 cuDNN
kernel; a compiled fp8 expert step 2.09 s against 2.43 s, its output 2.1% from bf16 attention
(random full-size weights): the fp8 profiles turn it on.
"""

from __future__ import annotations

import math
import threading

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

NAME = "cudnn_fp8"  # the `attention_backend` value that selects this
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448.0
MIN_CAPABILITY = (9, 0)  # cuDNN's FP8 flash attention: Hopper (sm90) and newer
_TINY = 1e-12  # an all-zero tensor gets this amax (any positive scale is exact for zeros)


def quantise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any float dtype) -> (e4m3 tensor, descale (1, 1, 1, 1) fp32): x ~= x8.float() * descale.
    One scale for the whole tensor (max|x| onto 448); the layout (strides) is kept."""
    descale = (x.abs().amax().float().clamp(min=_TINY) / FP8_MAX).to(x.dtype)  # the one divided by
    return (x / descale).to(FP8), descale.float().reshape(1, 1, 1, 1)


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The FP8 recipe above in fp32 with explicit e4m3 rounding: (B, S, H, D) x3 -> (B, S, H, D)
    in query's dtype. Memory is O(S^2) per head: for tests and CPUs, not for full-size clips."""
    (q8, dq), (k8, dk), (v8, dv) = quantise(query), quantise(key), quantise(value)
    q = (q8.float() * dq).transpose(1, 2)  # (B, H, S, D)
    k = (k8.float() * dk).transpose(1, 2)
    v = (v8.float() * dv).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    total = p.sum(dim=-1, keepdim=True)
    p = (p * FP8_MAX).to(FP8).float() / FP8_MAX
    out = (p @ v) / total
    out_scale = 1.0 / dv  # 448 / max|V|
    out = (out * out_scale).to(FP8).float() / out_scale
    return out.transpose(1, 2).to(query.dtype).contiguous()


# cuDNN handles and built plans belong to one thread (cuDNN's plans are not thread-safe); a stage
# runs its model on one thread (ModelLock), so each replica builds a shape's plan once.
_local = threading.local()


def _cudnn_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    graphs = _local.__dict__.setdefault("graphs", {})
    signature = (query.device.index, *(tuple(t.shape) + tuple(t.stride()) for t in (query, key, value)))
    run = graphs.get(signature)
    if run is None:
        run = graphs[signature] = _build(query, key, value)
    return run(query, key, value)


def _bhsd(t: torch.Tensor) -> dict:
    """A (B, S, H, D) tensor as cuDNN's (B, H, S, D) dims, its strides saying the layout."""
    (b, s, h, d), (sb, ss, sh, sd) = t.shape, t.stride()
    return {"dim": (b, h, s, d), "stride": (sb, sh, ss, sd)}


def _build(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """A cuDNN FP8 SDPA graph for tensors laid out as these (B, S, H, D) ones -> run(q, k, v)."""
    import cudnn  # nvidia-cudnn-frontend: only where this backend is chosen

    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    handle = _local.__dict__.get("handle")
    if handle is None:
        handle = _local.handle = cudnn.create_handle()
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)

    def bhsd(name: str, t: torch.Tensor):
        return graph.tensor(name=name, **_bhsd(t), data_type=e4m3)

    tq, tk, tv = bhsd("q", query), bhsd("k", key), bhsd("v", value)
    scalar = {"dim": (1, 1, 1, 1), "stride": (1, 1, 1, 1), "data_type": fp32}
    dq, dk, dv, ds, ss, so = (graph.tensor(name=n, **scalar) for n in
                              ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"))
    to, _, amax_s, amax_o = graph.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=dq, descale_k=dk, descale_v=dv,
                                           descale_s=ds, scale_s=ss, scale_o=so, generate_stats=False,
                                           attn_scale=1.0 / math.sqrt(query.shape[-1]), use_causal_mask=False)
    layout = _bhsd(query)  # the output is laid out as the query
    to.set_output(True).set_dim(layout["dim"]).set_stride(layout["stride"]).set_data_type(e4m3)
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(fp32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    device = query.device
    workspace = torch.empty(graph.get_workspace_size(), device=device, dtype=torch.uint8)
    amaxes = [torch.empty(1, 1, 1, 1, device=device, dtype=torch.float32) for _ in range(2)]
    p_scale = torch.full((1, 1, 1, 1), FP8_MAX, device=device)
    p_descale = 1.0 / p_scale

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        (q8, q_descale), (k8, k_descale), (v8, v_descale) = quantise(q), quantise(k), quantise(v)
        out_scale = 1.0 / v_descale  # 448 / max|V|
        out = torch.empty_like(q8)
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(device).cuda_stream)
        graph.execute({tq: q8, tk: k8, tv: v8, dq: q_descale, dk: k_descale, dv: v_descale, ds: p_descale,
                       ss: p_scale, so: out_scale, to: out, amax_s: amaxes[0], amax_o: amaxes[1]},
                      workspace, handle=handle)
        return (out.float() * v_descale).to(q.dtype).contiguous()

    return run


@torch.library.custom_op("avatar_serve::fp8_attention", mutates_args=())
def fp8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Non-causal attention of (B, S, H, D) tensors with 8-bit inputs (module docstring): cuDNN on
    a GPU, `reference` elsewhere. -> contiguous (B, S, H, D) in query's dtype."""
    if query.device.type == "cuda":
        return _cudnn_attention(query, key, value)
    return reference(query, key, value)


@fp8_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return query.new_empty(query.shape)  # contiguous, as both implementations return


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on (B, S, H, D), as diffusers' WanAttnProcessor applies it (there a
    nested function, so not importable)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class Fp8SelfAttention:
    """diffusers' WanAttnProcessor with the self-attention through `fp8_attention`. Anything
    else (cross-attention, a mask, fused projections, I2V image keys) goes to the plain processor."""

    def __init__(self):
        self.plain = WanAttnProcessor()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None \
                or getattr(attn, "fused_projections", False):
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = rotate(query, *rotary_emb), rotate(key, *rotary_emb)
        out = torch.ops.avatar_serve.fp8_attention(query, key, value).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def use_fp8_self_attention(transformer, device: torch.device) -> int:
    """Route every block's self-attention (`attn1`) through `Fp8SelfAttention`; -> blocks changed.
    Call before compiling. On a GPU the cuDNN frontend must import (checked here, at start-up)."""
    if device.type == "cuda":
        try:
            import cudnn  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(f"attention_backend {NAME!r} needs the nvidia-cudnn-frontend package "
                               f"(pip install nvidia-cudnn-frontend): {exc}") from exc
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:  # cuDNN builds no FP8 attention plan below Hopper
            raise RuntimeError(f"attention_backend {NAME!r} needs a Hopper or newer GPU (compute capability "
                               f"{'.'.join(map(str, MIN_CAPABILITY))}+); {torch.cuda.get_device_name(device)} is "
                               f"{'.'.join(map(str, capability))}: set attention_backend: null for this GPU")
    for block in transformer.blocks:
        block.attn1.set_processor(Fp8SelfAttention())
    return len(transformer.blocks)
