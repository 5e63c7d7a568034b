"""Pure-torch block-FP8 numerics: the oracle every kernel and test is checked against.

Legend for shape comments:
    T tokens (activation rows), N out_features, K in_features, E experts,
    BN x BK the weight block (128 x 128), G = BK the activation group along K.

Contract (DESIGN.md):
    weight      w[N, K] ~= q[N, K] * s[ceil(N/BN), ceil(K/BK)]   (s is "weight_scale_inv")
    activation  x[T, K] ~= q[T, K] * s[T, ceil(K/G)]             (dynamic, per token)
                x[T, K] ~= q[T, K] * s[]                          (static, per tensor)
    s = amax / 448 (float32) or 2 ** ceil(log2(amax / 448)) (UE8M0); amax is clamped to
    AMAX_EPS so an all-zero block gets a finite scale and quantizes to zeros.
    The GEMM is the exact fp32 product of the dequantized operands.

Everything here works on any device and is written for clarity, not speed.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "E8M0_DTYPE",
    "AMAX_EPS",
    "scale_grid",
    "amax_to_scale",
    "quantize_weight",
    "dequantize_weight",
    "quantize_act",
    "quantize_act_static",
    "dequantize_act",
    "rms_norm",
    "rms_norm_quant",
    "linear",
    "block_gemm",
    "block_gemm_cat",
    "linear_cat",
    "grouped_linear",
    "grouped_linear_masked",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
E8M0_DTYPE = torch.float8_e8m0fnu
# Smallest amax a block is scaled for. 1e-12 / 448 is ~2**-49, far inside both fp32 and
# e8m0 (2**-127) range, so the scale is finite and x / s never divides by zero.
AMAX_EPS = 1e-12
SCALE_FMTS = ("float32", "ue8m0")
_HP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def scale_grid(n: int, k: int, block_size: tuple[int, int]) -> tuple[int, int]:
    """Shape of the scale grid for an (n, k) matrix: ceil-div, partial edge blocks allowed."""
    return math.ceil(n / block_size[0]), math.ceil(k / block_size[1])


def _pow2_ceil(v: torch.Tensor) -> torch.Tensor:
    """2 ** ceil(log2(v)) for positive normal fp32 v, exactly (bit arithmetic, no log2 rounding).

    Written with named bitwise ops so the compile pass (passes/linear.py) can trace this very
    function into aten ops Inductor lowers."""
    bits = v.view(torch.int32)
    exponent = torch.bitwise_and(torch.bitwise_right_shift(bits, 23), 0xFF)
    exponent = exponent + torch.ne(torch.bitwise_and(bits, 0x7FFFFF), 0).to(torch.int32)
    return torch.bitwise_left_shift(exponent, 23).view(torch.float32)


def amax_to_scale(amax: torch.Tensor, scale_fmt: str = "float32") -> torch.Tensor:
    """Dequantization scale (fp32 values) for a block whose largest magnitude is ``amax``."""
    _check_scale_fmt(scale_fmt)
    amax = amax.float().clamp(min=AMAX_EPS)
    # Tensor / tensor: CUDA turns division by a Python scalar into a multiplication by its
    # reciprocal, which is not IEEE division and flips 1-ulp scales against the CPU.
    s = amax / torch.full_like(amax, FP8_MAX)
    return _pow2_ceil(s) if scale_fmt == "ue8m0" else s


def _store_scale(s: torch.Tensor, scale_fmt: str) -> torch.Tensor:
    # UE8M0 scales are exact powers of two, so the e8m0 cast is lossless.
    return s.to(E8M0_DTYPE) if scale_fmt == "ue8m0" else s


def _check_scale_fmt(scale_fmt: str) -> None:
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")


def _check_hp(x: torch.Tensor, what: str) -> None:
    if x.dtype not in _HP_DTYPES:
        raise TypeError(
            f"{what}: expected a float32, float16 or bfloat16 tensor, got dtype {x.dtype}"
        )


def _to_fp8(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # Division (not multiplication by 1/s) is the contract: kernels divide too, so the
    # fp8 codes match bit for bit.
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _expand_blocks(s: torch.Tensor, shape: torch.Size, block_size: tuple[int, int]) -> torch.Tensor:
    # s: [..., ceil(N/BN), ceil(K/BK)] -> [..., N, K], cropping the partial edge blocks.
    s = s.float().repeat_interleave(block_size[0], dim=-2).repeat_interleave(block_size[1], dim=-1)
    return s[..., : shape[-2], : shape[-1]]


def quantize_weight(
    w: torch.Tensor,
    block_size: tuple[int, int] = (128, 128),
    scale_fmt: str = "float32",
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize w[..., N, K] to fp8 codes q[..., N, K] and block scales s[..., nN, nK].

    Leading dims (experts) are quantized independently. s is float32 or float8_e8m0fnu.
    """
    _check_scale_fmt(scale_fmt)
    _check_hp(w, name)
    if w.dim() < 2:
        raise ValueError(f"{name}: expected at least 2 dims (..., N, K), got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name}: contains NaN or Inf; block-FP8 quantization needs finite weights")
    bn, bk = block_size
    *lead, n, k = w.shape
    gn, gk = scale_grid(n, k, block_size)
    # Pad with zeros to whole blocks; zeros never raise a block's amax.
    wp = torch.nn.functional.pad(w.float(), (0, gk * bk - k, 0, gn * bn - n))
    blocks = wp.reshape(*lead, gn, bn, gk, bk)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., gn, gk]
    s = amax_to_scale(amax, scale_fmt)
    q = _to_fp8(w, _expand_blocks(s, w.shape, block_size))
    return q, _store_scale(s, scale_fmt)


def dequantize_weight(
    q: torch.Tensor,
    s: torch.Tensor,
    block_size: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """q[..., N, K] * s (block-expanded) -> [..., N, K] in ``dtype``."""
    *lead, n, k = q.shape
    expected = (*lead, *scale_grid(n, k, block_size))
    if tuple(s.shape) != expected:
        raise ValueError(
            f"weight scale has shape {tuple(s.shape)}, expected {expected} for a weight of shape "
            f"{tuple(q.shape)} with block_size {tuple(block_size)}"
        )
    return (q.float() * _expand_blocks(s, q.shape, block_size)).to(dtype)


def quantize_act(
    x: torch.Tensor, group_size: int = 128, scale_fmt: str = "float32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization: x[..., K] -> q[..., K] fp8, s[..., ceil(K/G)] fp32.

    Scales are always returned as float32 values (UE8M0 ones are powers of two), the layout
    GEMM kernels consume.
    """
    _check_hp(x, "activation")
    k = x.shape[-1]
    groups = math.ceil(k / group_size)
    xp = torch.nn.functional.pad(x.float(), (0, groups * group_size - k))
    amax = xp.reshape(*x.shape[:-1], groups, group_size).abs().amax(dim=-1)
    s = amax_to_scale(amax, scale_fmt)
    q = _to_fp8(x, s.repeat_interleave(group_size, dim=-1)[..., :k])
    return q, s


def quantize_act_static(x: torch.Tensor, act_scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor quantization with a calibrated scalar scale (from a checkpoint)."""
    _check_hp(x, "activation")
    # On x's device: a CPU scalar divisor would make CUDA multiply by its reciprocal.
    return _to_fp8(x, act_scale.float().reshape(()).to(x.device))


def dequantize_act(q: torch.Tensor, s: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """q[..., K] fp8 with s[..., ceil(K/G)] (or a scalar) -> fp32."""
    if s.dim() == 0 or s.numel() == 1:
        return q.float() * s.float().reshape(())
    return q.float() * s.float().repeat_interleave(group_size, dim=-1)[..., : q.shape[-1]]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm (Llama, Qwen, DeepSeek): normalized in fp32, cast back to x's
    dtype, then scaled by weight in that dtype."""
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm_quant(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    group_size: int = 128,
    scale_fmt: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h = x (+ residual); (q, s) = quantize_act(rms_norm(h, weight, eps)) -> (q, s, h)."""
    h = x if residual is None else x + residual
    q, s = quantize_act(rms_norm(h, weight, eps), group_size, scale_fmt)
    return q, s, h


def _scale_fmt_of(wscale: torch.Tensor) -> str:
    return "ue8m0" if wscale.dtype == E8M0_DTYPE else "float32"


def linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
    block_size: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """Block-FP8 linear: quantize x (dynamic 1 x G, or static per tensor), then the fp32
    product of the dequantized operands, plus bias, in x's dtype.

    x[..., K], qweight[N, K] fp8, wscale[nN, nK] fp32 or e8m0 -> y[..., N].
    With UE8M0 weight scales, dynamic activation scales are powers of two too.
    """
    if act_scale is None:
        xq, xs = quantize_act(x, block_size[1], _scale_fmt_of(wscale))
    else:
        xq, xs = quantize_act_static(x, act_scale), act_scale
    return block_gemm(xq, xs, qweight, wscale, bias, block_size, x.dtype)


def block_gemm(
    xq: torch.Tensor,
    xs: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_size: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The GEMM half of ``linear``, on activations already quantized: xq[..., K] fp8 with
    xs[..., nK] (or one static scale) -> the fp32 product of the dequantized operands, plus
    bias, in ``out_dtype``: y[..., N]."""
    y = dequantize_act(xq, xs, block_size[1]) @ dequantize_weight(qweight, wscale, block_size).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def block_gemm_cat(
    xq: torch.Tensor,
    xs: torch.Tensor,
    qweights: list[torch.Tensor],
    wscales: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    block_size: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Several weights reading one quantized input (q/k/v, gate/up): their block_gemm
    outputs concatenated along the last dim, y[..., N0 + N1 + ...]."""
    return torch.cat([block_gemm(xq, xs, w, s, b, block_size, out_dtype) for w, s, b in zip(qweights, wscales, biases)], -1)


def linear_cat(
    x: torch.Tensor,
    qweights: list[torch.Tensor],
    wscales: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    block_size: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """Several block-FP8 linears on one input with dynamic activation scales (UE8M0 when the
    weight scales are): x quantized once, the outputs concatenated, y[..., N0 + N1 + ...]
    in x's dtype."""
    xq, xs = quantize_act(x, block_size[1], _scale_fmt_of(wscales[0]))
    return block_gemm_cat(xq, xs, qweights, wscales, biases, block_size, x.dtype)


def rms_norm_linear_cat(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    qweights: list[torch.Tensor],
    wscales: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    block_size: tuple[int, int] = (128, 128),
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x (+ residual); (linear_cat(rms_norm(h, weight, eps), ...), h)."""
    h = x if residual is None else x + residual
    return linear_cat(rms_norm(h, weight, eps), qweights, wscales, biases, block_size), h


def silu_mul_linear_cat(
    gate: torch.Tensor,
    up: torch.Tensor,
    qweights: list[torch.Tensor],
    wscales: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    block_size: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """linear_cat(silu(gate) * up, ...): the SwiGLU product (in gate's dtype) into the GEMMs."""
    return linear_cat(torch.nn.functional.silu(gate) * up, qweights, wscales, biases, block_size)


def grouped_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    offs: torch.Tensor,
    act_scale: torch.Tensor | None = None,
    block_size: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """Grouped (MoE) block-FP8 linear over tokens sorted by expert.

    x[T, K]; qweight[E, N, K]; wscale[E, nN, nK]; offs[E] int, cumulative end row of each
    expert's tokens (as torch._grouped_mm takes them); act_scale None or [E] (static).
    Rows at or past offs[-1] are zeros. -> y[T, N] in x's dtype.
    """
    e, n, _ = qweight.shape
    if offs.shape != (e,):
        raise ValueError(f"offs must have shape ({e},) (one end offset per expert), got {tuple(offs.shape)}")
    y = x.new_zeros(x.shape[0], n)
    start = 0
    for i, end in enumerate(offs.tolist()):
        if end > start:
            a = None if act_scale is None else act_scale[i]
            y[start:end] = linear(x[start:end], qweight[i], wscale[i], None, a, block_size)
        start = end
    return y


def expert_linear(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    act_scale: torch.Tensor | None = None,
    block_size: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """MoE experts row by row, unsorted (decode): x[T, K]; expert_ids[R] int with R a multiple
    of T; qweight[E, N, K]; wscale[E, nN, nK]; act_scale None or [E] (static).
    -> y[R, N] in x's dtype, y[r] = linear(x[r // (R // T)]) with expert expert_ids[r]'s weight
    (R = T * top_k: row r is token r // top_k's r % top_k-th expert)."""
    e, n, _ = qweight.shape
    r = expert_ids.numel()
    if expert_ids.dim() != 1 or (x.shape[0] and r % x.shape[0]) or (not x.shape[0] and r):
        raise ValueError(f"expert_ids must be 1-D with a multiple of {x.shape[0]} (tokens) entries, got {tuple(expert_ids.shape)}")
    per_token = r // x.shape[0] if x.shape[0] else 1
    y = x.new_zeros(r, n)
    for i in expert_ids.unique().tolist():
        if not 0 <= i < e:
            raise ValueError(f"expert id {i} is outside [0, {e})")
        rows = (expert_ids == i).nonzero().flatten()
        a = None if act_scale is None else act_scale[i]
        y[rows] = linear(x[rows // per_token], qweight[i], wscale[i], None, a, block_size)
    return y


def grouped_linear_masked(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    masked_m: torch.Tensor,
    act_scale: torch.Tensor | None = None,
    block_size: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """Grouped (MoE) block-FP8 linear over per-expert padded batches (the "masked" layout).

    x[E, M, K]; qweight[E, N, K]; wscale[E, nN, nK]; masked_m[E] int, the number of valid rows
    of each expert's batch (0 <= masked_m[e] <= M); act_scale None or [E] (static).
    -> y[E, M, N] in x's dtype: y[e, :masked_m[e]] = linear(x[e, :masked_m[e]]), the other
    rows zeros (never computed from the padding, whatever it holds).
    """
    e, n, _ = qweight.shape
    if x.dim() != 3 or x.shape[0] != e:
        raise ValueError(f"x must be [E, M, K] with E = {e} experts, got shape {tuple(x.shape)}")
    if masked_m.shape != (e,):
        raise ValueError(f"masked_m must have shape ({e},) (one row count per expert), got {tuple(masked_m.shape)}")
    m = x.shape[1]
    counts = masked_m.tolist()
    bad = [(i, c) for i, c in enumerate(counts) if not 0 <= c <= m]
    if bad:
        i, c = bad[0]
        raise ValueError(f"masked_m[{i}] = {c} is outside [0, M = {m}] (M = x.shape[1], the rows per expert)")
    y = x.new_zeros(e, m, n)
    for i, c in enumerate(counts):
        if c:
            a = None if act_scale is None else act_scale[i]
            y[i, :c] = linear(x[i, :c], qweight[i], wscale[i], None, a, block_size)
    return y
