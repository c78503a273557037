"""8-bit self-attention for the Wan experts: `attention_backend: fa3_fp8` (FlashAttention-3's FP8
forward kernel) or `cudnn_fp8` (cuDNN's FP8 flash attention).

Why: at 832x480x81 an expert step's self-attention (40 calls over 32,760 tokens) takes 1.51 s of
its 2.45 s on an H200 with PyTorch's fastest kernel (cuDNN, bf16; bench/README.md), and 8-bit
attention is what is left to gain there. PyTorch's SDPA has no 8-bit path and SageAttention >= 2
is not on PyPI; two 8-bit kernels are: FlashAttention-3's forward, packaged for torch's stable ABI
as `fa3-fwd`, and cuDNN's, through `nvidia-cudnn-frontend` (optional: the `fp8-attention` extra).
Hand-written here is only what those packages lack: the scaling around each kernel (plain torch
code, so a compiled block fuses it with the projections, RMSNorm and rotary embedding around it),
a torch custom op per kernel (one opaque call in a compiled block), for cuDNN the choice of the
fastest of the plans it offers (timed once per shape, at warm-up), and the processor that routes
the experts' self-attention to them. Cross-attention (512 text tokens, well under 1% of a step)
stays on diffusers' path.

The numbers, on the GPU and in the references (the CPU path and the tests' yardstick):
    cudnn_fp8: Q, K, V -> e4m3, one scale per tensor (448 / max|x|)
        S = Q K^T / sqrt(d); P = exp(S - rowmax S) -> e4m3 (scale 448); O = (P V) / rowsum
        O -> e4m3 with scale 448 / max|V| (a row of O averages rows of V, so |O| <= max|V|), -> bf16
        (on Hopper cuDNN's FP8 kernel writes its output in e4m3 only)
    fa3_fp8: Q, K, V -> e4m3, one scale per head; P = 256 exp(S - rowmax S) -> e4m3; O in bf16
(the kernels keep a running max and sum per block where the references take the row's, so the
two agree closely, not bit for bit).

Speed and error on the card are measured by bench/gpu_paths.py. On an H200 at 32,760 tokens:
fa3_fp8's kernel 23.6 ms, cuDNN's 25.2-26.7 ms with the plan chosen here (28.6 ms with its first
choice), PyTorch's bf16 cuDNN kernel 38.2 ms; a compiled fp8 expert step 1.89 s (fa3_fp8) and
2.01 s (cudnn_fp8) against 2.43 s in bf16; cudnn_fp8's expert output is 1.65% from bf16
attention's, fa3_fp8's 1.4% from cudnn_fp8's (random full-size weights): the fp8 profiles take
fa3_fp8.
"""

from __future__ import annotations

import logging
import math
import threading

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

log = logging.getLogger("avatar_serve.fp8_attention")

NAME = "cudnn_fp8"  # the `attention_backend` value that selects this
FA3_NAME = "fa3_fp8"  # FlashAttention-3's FP8 forward instead (package `fa3-fwd`): see `attention_fa3`
BACKENDS = (NAME, FA3_NAME)
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448.0
MIN_CAPABILITY = (9, 0)  # cuDNN's FP8 flash attention: Hopper (sm90) and newer
_TINY = 1e-12  # an all-zero tensor gets this amax (any positive scale is exact for zeros)


def quantise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any float dtype) -> (e4m3 tensor, descale (1, 1, 1, 1) fp32): x ~= x8.float() * descale.
    One scale for the whole tensor (max|x| onto 448); the layout (strides) is kept."""
    descale = (x.abs().amax().float().clamp(min=_TINY) / FP8_MAX).to(x.dtype)  # the one divided by
    return (x / descale).to(FP8), descale.float().reshape(1, 1, 1, 1)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Non-causal attention of (B, S, H, D) tensors with 8-bit inputs (module docstring) -> (B, S,
    H, D) in query's dtype. The scaling around the kernel is plain torch code, so in a compiled
    block it fuses with what produces Q, K, V and consumes O; the kernel is one opaque op."""
    return _scaled(torch.ops.avatar_serve.fp8_sdpa, query, key, value)


def quantise_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, S, H, D) -> (e4m3 (B, S, H, D), descale (B, H) fp32): one scale per batch item and
    head (max|x| over its tokens onto 448), the granularity FlashAttention-3's FP8 kernel takes."""
    # Over D first (contiguous), then over S: one reduction over (S, D) at once compiles to a
    # strided read at a tenth of the card's bandwidth (bench/gpu_paths.py --profile: 66 ms a step).
    amax = x.abs().amax(dim=3).amax(dim=1).float().clamp(min=_TINY)
    descale = (amax / FP8_MAX).to(x.dtype)  # the one divided by, exactly as stored in fp32
    return (x / descale[:, None, :, None]).to(FP8), descale.float()


def attention_fa3(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`attention` through FlashAttention-3's FP8 forward kernel (`attention_backend: fa3_fp8`):
    Q, K, V in e4m3 with one scale per head (`quantise_per_head`), O straight out of the kernel in
    bf16 (no 8-bit output as cuDNN's on Hopper) -> (B, S, H, D) in query's dtype."""
    (q8, dq), (k8, dk), (v8, dv) = (quantise_per_head(t) for t in (query, key, value))
    return torch.ops.avatar_serve.fa3_fp8_sdpa(q8, k8, v8, dq, dk, dv).to(query.dtype)


def _scaled(kernel, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Q, K, V -> e4m3 with their descales -> `kernel` -> O back in query's dtype."""
    (q8, dq), (k8, dk), (v8, dv) = quantise(query), quantise(key), quantise(value)
    return (kernel(q8, k8, v8, dq, dk, dv).float() * dv).to(query.dtype)  # O was scaled by 1 / dv


def sdpa_reference(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                   dv: torch.Tensor) -> torch.Tensor:
    """The kernel's recipe in fp32 with explicit e4m3 rounding: e4m3 (B, S, H, D) x3 and their
    descales -> O in e4m3, scaled by 1 / dv. Memory is O(S^2) per head: for tests and CPUs."""
    q = (q8.float() * dq).transpose(1, 2)  # (B, H, S, D)
    k = (k8.float() * dk).transpose(1, 2)
    v = (v8.float() * dv).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    total = p.sum(dim=-1, keepdim=True)
    p = (p * FP8_MAX).to(FP8).float() / FP8_MAX
    out = (p @ v) / total
    return (out / dv).to(FP8).transpose(1, 2).contiguous()


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The whole FP8 recipe on (B, S, H, D) tensors, on any device: what `attention` computes on
    a CPU, the yardstick of the tests."""
    return _scaled(sdpa_reference, query, key, value)


# FlashAttention-3's FP8 softmax shifts the row max by 8 in base 2, so P lies in [0, 256] and
# uses e4m3's range (its softmax.h, Max_offset); the row sums are taken before P is rounded.
_FA3_P_SCALE = 256.0


def fa3_sdpa_reference(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                       dv: torch.Tensor) -> torch.Tensor:
    """FlashAttention-3's FP8 recipe in fp32 with explicit e4m3 rounding: e4m3 (B, S, H, D) x3 and
    (B, H) descales -> O (B, S, H, D) bf16. O(S^2) memory per head: for tests and CPUs."""
    def real(t8, d):
        return (t8.float() * d[:, None, :, None]).transpose(1, 2)  # (B, H, S, D)

    q, k, v = real(q8, dq), real(k8, dk), real(v8, dv)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True)) * _FA3_P_SCALE
    out = (p.to(FP8).float() @ v) / p.sum(dim=-1, keepdim=True)
    return out.transpose(1, 2).contiguous().to(torch.bfloat16)


def reference_fa3(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`attention_fa3`'s whole recipe on any device (the CPU path and the tests' yardstick)."""
    (q8, dq), (k8, dk), (v8, dv) = (quantise_per_head(t) for t in (query, key, value))
    return fa3_sdpa_reference(q8, k8, v8, dq, dk, dv).to(query.dtype)


# cuDNN handles and built plans belong to one thread (cuDNN's plans are not thread-safe); a stage
# runs its model on one thread (ModelLock), so each replica builds a shape's plan once.
_local = threading.local()
# What choosing a plan measured, per shape: {(B, S, H, D): {"plans": {name: ms}, "chosen": name}}
# (for logs and bench/gpu_paths.py).
PLAN_TIMES: dict[tuple, dict] = {}
_TIMING_RUNS = 3  # per plan, after one warm-up run


def _cudnn_sdpa(*tensors: torch.Tensor) -> torch.Tensor:
    graphs = _local.__dict__.setdefault("graphs", {})
    q8, k8, v8 = tensors[:3]
    signature = (q8.device.index, *(tuple(t.shape) + tuple(t.stride()) for t in (q8, k8, v8)))
    run = graphs.get(signature)
    if run is None:
        run = graphs[signature] = _build(*tensors)
    return run(*tensors)


def _bhsd(t: torch.Tensor) -> dict:
    """A (B, S, H, D) tensor as cuDNN's (B, H, S, D) dims, its strides saying the layout."""
    (b, s, h, d), (sb, ss, sh, sd) = t.shape, t.stride()
    return {"dim": (b, h, s, d), "stride": (sb, sh, ss, sd)}


def _build(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
           dv: torch.Tensor):
    """A cuDNN FP8 SDPA graph for tensors laid out as these (B, S, H, D) ones -> run(...). Of the
    execution plans cuDNN's heuristics offer, each that builds is timed once on these inputs and
    the fastest kept (cuDNN's first choice is not always its fastest; this runs at warm-up)."""
    import cudnn  # nvidia-cudnn-frontend: only where this backend is chosen

    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    handle = _local.__dict__.get("handle")
    if handle is None:
        handle = _local.handle = cudnn.create_handle()
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)

    def bhsd(name: str, t: torch.Tensor):
        return graph.tensor(name=name, **_bhsd(t), data_type=e4m3)

    tq, tk, tv = bhsd("q", q8), bhsd("k", k8), bhsd("v", v8)
    scalar = {"dim": (1, 1, 1, 1), "stride": (1, 1, 1, 1), "data_type": fp32}
    tdq, tdk, tdv, tds, tss, tso = (graph.tensor(name=n, **scalar) for n in
                                    ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"))
    to, _, amax_s, amax_o = graph.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=tdq, descale_k=tdk, descale_v=tdv,
                                           descale_s=tds, scale_s=tss, scale_o=tso, generate_stats=False,
                                           attn_scale=1.0 / math.sqrt(q8.shape[-1]), use_causal_mask=False)
    layout = _bhsd(torch.empty(q8.shape, device="meta"))  # the output: contiguous (B, S, H, D)
    to.set_output(True).set_dim(layout["dim"]).set_stride(layout["stride"]).set_data_type(e4m3)
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(fp32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    built = []
    for index in range(graph.get_execution_plan_count()):
        try:
            graph.build_plan_at_index(index)
            built.append((index, graph.get_plan_name_at_index(index)))
        except Exception as exc:  # a plan this GPU or install cannot build: cuDNN offers the others
            log.debug("fp8 attention: plan %d not built: %s", index, exc)
    if not built:
        raise RuntimeError(f"cuDNN offered no FP8 attention plan that builds for shape {tuple(q8.shape)} "
                           f"on {q8.device}; set attention_backend: null to use bf16 attention")
    device = q8.device
    workspace = torch.empty(max(graph.get_workspace_size_plan_at_index(i) for i, _ in built),
                            device=device, dtype=torch.uint8)
    amaxes = [torch.empty(1, 1, 1, 1, device=device, dtype=torch.float32) for _ in range(2)]
    p_scale = torch.full((1, 1, 1, 1), FP8_MAX, device=device)
    p_descale = 1.0 / p_scale

    def execute(index: int, q8, k8, v8, dq, dk, dv) -> torch.Tensor:
        out = torch.empty(q8.shape, dtype=q8.dtype, device=device)  # as the fake says: contiguous
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(device).cuda_stream)
        graph.execute_plan_at_index({tq: q8, tk: k8, tv: v8, tdq: dq, tdk: dk, tdv: dv, tds: p_descale,
                                     tss: p_scale, tso: 1.0 / dv, to: out, amax_s: amaxes[0], amax_o: amaxes[1]},
                                    workspace, index=index, handle=handle)
        return out

    chosen, name = built[0]
    if len(built) > 1:
        times = {}
        for index, plan in built:
            execute(index, q8, k8, v8, dq, dk, dv)  # warm-up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(_TIMING_RUNS):
                execute(index, q8, k8, v8, dq, dk, dv)
            end.record()
            end.synchronize()
            times[(index, plan)] = start.elapsed_time(end) / _TIMING_RUNS
        chosen, name = min(times, key=times.get)
        PLAN_TIMES[tuple(q8.shape)] = {"plans": {f"{i}:{p}": round(ms, 3) for (i, p), ms in times.items()},
                                       "chosen": f"{chosen}:{name}"}
        log.info("fp8 attention at %s: plan %s, %.2f ms (of %s)", tuple(q8.shape), name, times[(chosen, name)],
                 ", ".join(f"{p} {ms:.2f} ms" for (_, p), ms in times.items()))
    return lambda *tensors: execute(chosen, *tensors)


@torch.library.custom_op("avatar_serve::fp8_sdpa", mutates_args=())
def fp8_sdpa(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
             dv: torch.Tensor) -> torch.Tensor:
    """The 8-bit kernel alone: e4m3 (B, S, H, D) Q, K, V and their (1, 1, 1, 1) fp32 descales ->
    O in e4m3 (B, S, H, D), contiguous, scaled by 1 / dv. cuDNN on a GPU, `sdpa_reference`
    elsewhere."""
    if q8.device.type == "cuda":
        return _cudnn_sdpa(q8, k8, v8, dq, dk, dv)
    return sdpa_reference(q8, k8, v8, dq, dk, dv)


@fp8_sdpa.register_fake
def _(q8, k8, v8, dq, dk, dv) -> torch.Tensor:
    return torch.empty(q8.shape, dtype=q8.dtype, device=q8.device)  # contiguous, as both return


@torch.library.custom_op("avatar_serve::fa3_fp8_sdpa", mutates_args=())
def fa3_fp8_sdpa(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                 dv: torch.Tensor) -> torch.Tensor:
    """FlashAttention-3's FP8 forward alone: e4m3 (B, S, H, D) Q, K, V and (B, H) fp32 descales ->
    O (B, S, H, D) bf16, contiguous. The `fa3-fwd` package on a GPU, `fa3_sdpa_reference` elsewhere."""
    if q8.device.type == "cuda":
        from fa3_fwd_interface import flash_attn_func  # package fa3-fwd: only where chosen

        return flash_attn_func(q8, k8, v8, q_descale=dq, k_descale=dk, v_descale=dv).contiguous()
    return fa3_sdpa_reference(q8, k8, v8, dq, dk, dv)


@fa3_fp8_sdpa.register_fake
def _(q8, k8, v8, dq, dk, dv) -> torch.Tensor:
    return torch.empty(q8.shape, dtype=torch.bfloat16, device=q8.device)


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

    def __init__(self, kernel=attention):
        self.plain = WanAttnProcessor()
        self.kernel = kernel  # `attention` (cuDNN) or `attention_fa3`

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
        out = self.kernel(query, key, value).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


# What each backend imports on a GPU, and how to install it (checked at start-up).
_PACKAGES = {NAME: ("cudnn", "nvidia-cudnn-frontend"), FA3_NAME: ("fa3_fwd_interface", "fa3-fwd")}


def use_fp8_self_attention(transformer, device: torch.device, backend: str = NAME) -> int:
    """Route every block's self-attention (`attn1`) through `Fp8SelfAttention` with `backend`'s
    kernel (one of BACKENDS); -> blocks changed. Call before compiling. On a GPU the backend's
    package must import and the GPU be Hopper or newer (checked here, at start-up)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown 8-bit attention backend {backend!r}; one of {', '.join(BACKENDS)}")
    if device.type == "cuda":
        module, package = _PACKAGES[backend]
        try:
            __import__(module)
        except ModuleNotFoundError as exc:
            raise RuntimeError(f"attention_backend {backend!r} needs the {package} package "
                               f"(pip install {package}): {exc}") from exc
        except (ImportError, OSError) as exc:  # installed, but its compiled kernels do not load here
            other = FA3_NAME if backend == NAME else NAME
            raise RuntimeError(f"attention_backend {backend!r}: the {package} package is installed but does not "
                               f"load with this torch and CUDA (fa3-fwd is built for CUDA 13 and torch's stable "
                               f"ABI, torch >= 2.10): {exc}; set attention_backend: {other} or null") from exc
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:  # neither kernel has FP8 attention below Hopper
            raise RuntimeError(f"attention_backend {backend!r} needs a Hopper or newer GPU (compute capability "
                               f"{'.'.join(map(str, MIN_CAPABILITY))}+); {torch.cuda.get_device_name(device)} is "
                               f"{'.'.join(map(str, capability))}: set attention_backend: null for this GPU")
        if backend == FA3_NAME and capability[0] != 9:  # FlashAttention-3's kernels are Hopper's (sm90) only
            raise RuntimeError(f"attention_backend {backend!r} runs on Hopper GPUs (compute capability 9.x) only; "
                               f"{torch.cuda.get_device_name(device)} is {'.'.join(map(str, capability))}: "
                               f"set attention_backend: {NAME} (cuDNN's FP8 attention) for this GPU")
    kernel = attention if backend == NAME else attention_fa3
    for block in transformer.blocks:
        block.attn1.set_processor(Fp8SelfAttention(kernel))
    return len(transformer.blocks)
