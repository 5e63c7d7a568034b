"""DeepGEMM extern: ``deep_gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)`` when it can be loaded.

Legend: M tokens, N out_features, K in_features, nK = ceil(K / 128), nN = ceil(N / 128),
A(x) = x rounded up to a multiple of 4 (16 bytes of fp32: DeepGEMM's TMA alignment).

Scale layouts DeepGEMM consumes (its transform_sf_into_required_layout, read 2026-11):
    SM90  sfa  fp32 [M, nK], MN-major: strides (1, A(M))            (1 x 128 per token)
          sfb  fp32 [nN, nK], K-major (as stored)                   (128 x 128 per block)
    SM100 sfa  int32 [M, ceil(nK/4)], strides (1, A(M)): four UE8M0 exponent bytes per word,
               byte j of word i = the scale of K block 4i + j
          sfb  the same packing after broadcasting each block scale over its 128 rows: [N, .]
We prepare these once (weights at load time); DeepGEMM would otherwise convert per call.

Loading: ``import deep_gemm``, else ``kernels.get_kernel("kernels-community/deep-gemm")``
with the Hugging Face hub forced offline (a cached copy only; set FP8FX_HUB_DOWNLOAD=1 to
allow a download). Failure is logged once, memoized, and the caller falls through.

Grouped (MoE) GEMMs, used only when DeepGEMM loads and the user asked for it
(``kernel="deepgemm"``). NEVER RUN: DeepGEMM is installed on none of our machines; the
layouts below are unit-tested on CPU against a stand-in that follows DeepGEMM's documented
semantics (tests/test_deepgemm_grouped.py), not against DeepGEMM. Legend adds E experts,
T tokens sorted by expert, offs[E] their cumulative end rows, Al the contiguous alignment.

    m_grouped_fp8_gemm_nt_contiguous((a[Tp, K], sfa), (b[E, N, K], sfb[E, .]), d[Tp, N],
                                     m_indices[Tp] int32)
        Each expert's rows must start at a multiple of Al = get_mk_alignment_for_contiguous_
        layout() (128); m_indices[r] is the expert of row r, -1 for padding rows, whose
        output is unspecified. fp8fx's rows are packed (offs), so ``grouped_contiguous`` pads
        on the device, without a host sync: every expert's segment is rounded up to Al in a
        buffer sized for the worst case, Tp = A_Al(T + E * (Al - 1)) rows; the quantized rows
        are scattered there (padding rows: zero codes, scale 1, m_indices -1), DeepGEMM runs,
        and the T output rows are gathered back (rows past offs[-1] read a zero row). Cost
        over a native kernel: one scatter of a and sfa, one gather of d, and up to
        E * (Al - 1) rows of padding that DeepGEMM skips by their -1 index.
    m_grouped_fp8_gemm_nt_masked((a[E, M, K], sfa[E, M, nK]), (b, sfb), d[E, M, N],
                                 masked_m[E] int32, expected_m)
        The layout of fp8fx::grouped_linear_masked. DeepGEMM leaves rows past masked_m[e]
        unspecified; ``grouped_masked`` zeroes them afterwards (fp8fx's contract). expected_m
        (a host-side hint for its tile choice) is M: the counts are on the device.
    sfa / sfb per expert as the dense ones above (SM90: fp32 MN-major TMA-aligned sfa per
    expert, strides (nK * A(M), 1, A(M)); sfb [E, nN, nK] as stored. SM100: packed UE8M0,
    UE8M0 scales only, since DeepGEMM would otherwise round fp32 scales to powers of two).
Older DeepGEMM releases (SM90 only) name these m_grouped_gemm_fp8_fp8_bf16_nt_{contiguous,
masked} with the same arguments; either name is used.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from fp8fx import reference
from fp8fx.kernels.host import cdiv

__all__ = [
    "load",
    "supports",
    "mn_major_tma_aligned",
    "pack_ue8m0_mn_major",
    "unpack_ue8m0_mn_major",
    "prepare_weight_scale",
    "prepare_act_scale",
    "gemm",
    "supports_grouped",
    "contiguous_alignment",
    "contiguous_layout",
    "grouped_contiguous",
    "grouped_masked",
]

log = logging.getLogger("fp8fx")
_HUB_REPO = "kernels-community/deep-gemm"


def _tma_align(mn: int) -> int:
    return cdiv(mn, 4) * 4


@functools.cache
def load():
    """The deep_gemm module, or None (logged once)."""
    try:
        import deep_gemm

        return deep_gemm
    except Exception as e:  # ImportError, or a broken build raising anything at import
        first_error = e
    try:
        return _load_from_hub()
    except Exception as e:
        log.info("fp8fx: DeepGEMM unavailable (import: %s; hub: %s); using the next backend", first_error, e)
        return None


def _load_from_hub():
    allow_download = os.environ.get("FP8FX_HUB_DOWNLOAD") == "1"
    saved = os.environ.get("HF_HUB_OFFLINE")
    if not allow_download:
        # huggingface_hub reads HF_HUB_OFFLINE when first imported; patch its constant too.
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import kernels  # imported lazily: not installed on every machine

        if not allow_download:
            import huggingface_hub.constants as hub_constants

            old_constant = hub_constants.HF_HUB_OFFLINE
            hub_constants.HF_HUB_OFFLINE = True
            try:
                return kernels.get_kernel(_HUB_REPO)
            finally:
                hub_constants.HF_HUB_OFFLINE = old_constant
        return kernels.get_kernel(_HUB_REPO)
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def _arch_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def supports(m: int, n: int, k: int, out_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the DeepGEMM path can run this GEMM here (loaded, SM90/SM100, its alignment)."""
    if device.type != "cuda" or out_dtype != torch.bfloat16 or k % 128 or n % 64:
        return False
    if _arch_major(device) not in (9, 10):
        return False
    return load() is not None


def mn_major_tma_aligned(sf: torch.Tensor) -> torch.Tensor:
    """sf[..., MN, G] fp32 -> the same values with strides (..., 1, A(MN)) (SM90 sfa); a
    leading expert dim has stride G * A(MN)."""
    *lead, mn, g = sf.shape
    out = torch.empty(*lead, g, _tma_align(mn), dtype=torch.float32, device=sf.device)
    out[..., :mn] = sf.transpose(-1, -2)
    return out[..., :mn].transpose(-1, -2)


def pack_ue8m0_mn_major(sf: torch.Tensor, check: bool = True) -> torch.Tensor:
    """sf[..., MN, G] fp32 powers of two (or e8m0) -> int32 [..., MN, ceil(G/4)], strides
    (..., 1, A(MN)). ``check=False`` skips the power-of-two check (a host sync) for scales
    that are powers of two by construction (UE8M0 activation quant)."""
    *lead, mn, g = sf.shape
    if sf.dtype == reference.E8M0_DTYPE:
        exponents = sf.view(torch.uint8)
    else:
        bits = sf.float().contiguous().view(torch.int32)
        if check and bool(((bits & 0x7FFFFF) != 0).any()):
            raise ValueError("fp8fx deepgemm: UE8M0 packing needs power-of-two scales")
        exponents = (bits >> 23).to(torch.uint8)
    g4 = cdiv(g, 4) * 4
    padded = torch.zeros(*lead, mn, g4, dtype=torch.uint8, device=sf.device)
    padded[..., :g] = exponents
    words = padded.view(torch.int32)  # [..., MN, g4 / 4], little-endian: byte j = block 4i + j
    out = torch.zeros(*lead, g4 // 4, _tma_align(mn), dtype=torch.int32, device=sf.device)
    out[..., :mn] = words.transpose(-1, -2)
    return out[..., :mn].transpose(-1, -2)


def unpack_ue8m0_mn_major(packed: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of pack_ue8m0_mn_major: int32 [..., MN, ceil(G/4)] -> fp32 [..., MN, G]."""
    # Through 1-D: a [MN, 1] tensor with strides (1, A(MN)) counts as contiguous yet refuses
    # a byte view of its last dim.
    words = packed.contiguous().flatten().view(torch.uint8)
    exponents = words.reshape(*packed.shape[:-1], -1)[..., :groups].to(torch.int32)
    return (exponents << 23).view(torch.float32)


def prepare_weight_scale(wscale: torch.Tensor, n: int, arch_major: int = 9) -> torch.Tensor:
    """Weight scale [..., nN, nK] (fp32 or e8m0; a leading expert dim for grouped GEMMs) ->
    DeepGEMM's sfb for this arch. Once per weight."""
    if arch_major == 9:
        return wscale.float().contiguous()
    rows = torch.arange(n, device=wscale.device) // 128
    if wscale.dtype == reference.E8M0_DTYPE:
        broadcast = wscale.view(torch.uint8).index_select(-2, rows).view(wscale.dtype)
    else:
        broadcast = wscale.index_select(-2, rows)
    return pack_ue8m0_mn_major(broadcast)


def _is_mn_major_aligned(xs: torch.Tensor) -> bool:
    m, g = xs.shape[-2:]
    a = _tma_align(m)
    if xs.stride(-2) != 1 or (xs.stride(-1) != a and g > 1):
        return False
    return xs.dim() == 2 or xs.stride(0) == g * a


def prepare_act_scale(xs: torch.Tensor, arch_major: int = 9, check: bool = True) -> torch.Tensor:
    """Activation scale [..., M, nK] fp32 -> DeepGEMM's sfa (a no-op when already MN-major
    aligned on SM90). ``check``: see pack_ue8m0_mn_major."""
    m = xs.shape[-2]
    if arch_major == 9:
        if _is_mn_major_aligned(xs) or (xs.dim() == 2 and m % 4 == 0 and xs.stride() == (1, m)):
            return xs
        return mn_major_tma_aligned(xs)
    return pack_ue8m0_mn_major(xs, check)


def gemm(
    xq: torch.Tensor,
    xs: torch.Tensor,
    w: torch.Tensor,
    wscale_prepared: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """y[M, N] = DeepGEMM(xq[M, K], w[N, K]) with prepared scales (+ bias)."""
    dg = load()
    if dg is None:
        raise RuntimeError("fp8fx: DeepGEMM is not available")
    arch = _arch_major(xq.device)
    out = torch.empty(xq.shape[0], w.shape[0], dtype=out_dtype, device=xq.device)
    dg.fp8_gemm_nt((xq, prepare_act_scale(xs, arch)), (w, wscale_prepared), out)
    if bias is not None:
        out += bias.to(out_dtype)
    return out


# --- grouped (MoE) GEMMs ------------------------------------------------------------------

_GROUPED_NAMES = {
    "contiguous": ("m_grouped_fp8_gemm_nt_contiguous", "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous"),
    "masked": ("m_grouped_fp8_gemm_nt_masked", "m_grouped_gemm_fp8_fp8_bf16_nt_masked"),
}


def _grouped_fn(dg, layout: str):
    return next((getattr(dg, name) for name in _GROUPED_NAMES[layout] if hasattr(dg, name)), None)


def supports_grouped(
    layout: str, n: int, k: int, out_dtype: torch.dtype, device: torch.device, ue8m0: bool
) -> bool:
    """Whether DeepGEMM's grouped GEMM of ``layout`` ("contiguous" | "masked") can run here:
    loaded with that function, SM90 (any scales) or SM100 (UE8M0 scales), bf16 output,
    K % 128 == 0, N % 64 == 0."""
    if layout not in _GROUPED_NAMES:
        raise ValueError(f"fp8fx deepgemm: layout must be one of {tuple(_GROUPED_NAMES)}, got {layout!r}")
    if device.type != "cuda" or out_dtype != torch.bfloat16 or k % 128 or n % 64:
        return False
    arch = _arch_major(device)
    if arch not in (9, 10) or (arch == 10 and not ue8m0):
        return False
    dg = load()
    return dg is not None and _grouped_fn(dg, layout) is not None


def contiguous_alignment(dg) -> int:
    """DeepGEMM's per-expert M alignment for the contiguous layout (128 when it does not say)."""
    for name in ("get_mk_alignment_for_contiguous_layout", "get_m_alignment_for_contiguous_layout"):
        if hasattr(dg, name):
            return int(getattr(dg, name)())
    return 128


def contiguous_layout(offs: torch.Tensor, t: int, align: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows sorted by expert (offs[E], cumulative ends) -> DeepGEMM's aligned layout,
    on the device and without a host sync.

    Returns dest[T] int64, the padded row of each input row (Tp for rows past offs[-1], a
    spare row past the end), and m_indices[Tp] int32 (the expert of each padded row, -1 for
    padding), Tp = T + E * (align - 1) rounded up to align: the worst case."""
    e = offs.numel()
    ends = offs.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    counts = (ends - starts).clamp_min(0)
    padded = (counts + align - 1) // align * align
    padded_starts = padded.cumsum(0) - padded
    tp = cdiv(t + e * (align - 1), align) * align
    rows = torch.arange(t, device=offs.device)
    expert = torch.searchsorted(ends, rows, right=True)  # E for rows no expert owns
    owned = expert < e
    ex = expert.clamp_max(e - 1)
    dest = torch.where(owned, padded_starts[ex] + rows - starts[ex], tp)
    m_indices = torch.full((tp + 1,), -1, dtype=torch.int32, device=offs.device)
    m_indices[dest] = torch.where(owned, expert, -1).to(torch.int32)
    return dest, m_indices[:tp]


def grouped_contiguous(
    xq: torch.Tensor,
    xs: torch.Tensor,
    w: torch.Tensor,
    wscale_prepared: torch.Tensor,
    offs: torch.Tensor,
    out_dtype: torch.dtype,
    arch_major: int,
) -> torch.Tensor:
    """y[T, N] = DeepGEMM contiguous grouped GEMM of xq[T, K] (sorted by expert, offs[E]) with
    scales xs[T, nK] fp32 and w[E, N, K] with a prepared sfb; rows past offs[-1] are zeros."""
    dg = load()
    if dg is None or _grouped_fn(dg, "contiguous") is None:
        raise RuntimeError("fp8fx: DeepGEMM's m_grouped_fp8_gemm_nt_contiguous is not available")
    t, k = xq.shape
    n = w.shape[1]
    dest, m_indices = contiguous_layout(offs, t, contiguous_alignment(dg))
    tp = m_indices.numel()
    # One spare row (index Tp) takes the rows no expert owns; it is cut off before DeepGEMM.
    a = torch.zeros(tp + 1, k, dtype=torch.uint8, device=xq.device)
    a[dest] = xq.view(torch.uint8)  # fp8 through a byte view: index_put has no fp8 kernels
    s = torch.ones(tp + 1, xs.shape[1], dtype=torch.float32, device=xq.device)
    s[dest] = xs
    sfa = prepare_act_scale(s[:tp], arch_major, check=False)
    d = torch.empty(tp + 1, n, dtype=out_dtype, device=xq.device)
    d[tp] = 0
    _grouped_fn(dg, "contiguous")((a[:tp].view(reference.FP8_DTYPE), sfa), (w, wscale_prepared), d[:tp], m_indices)
    return d[dest]


def grouped_masked(
    xq: torch.Tensor,
    xs: torch.Tensor,
    w: torch.Tensor,
    wscale_prepared: torch.Tensor,
    masked_m: torch.Tensor,
    out_dtype: torch.dtype,
    arch_major: int,
) -> torch.Tensor:
    """y[E, M, N] = DeepGEMM masked grouped GEMM of xq[E, M, K] with scales xs[E, M, nK] fp32
    (MN-major per expert, see masked_act_quant) and w[E, N, K] with a prepared sfb;
    masked_m[E] int32 in [0, M]. Rows past masked_m[e] are zeros."""
    dg = load()
    if dg is None or _grouped_fn(dg, "masked") is None:
        raise RuntimeError("fp8fx: DeepGEMM's m_grouped_fp8_gemm_nt_masked is not available")
    e, m, _ = xq.shape
    n = w.shape[1]
    sfa = prepare_act_scale(xs, arch_major, check=False)
    d = torch.empty(e, m, n, dtype=out_dtype, device=xq.device)
    _grouped_fn(dg, "masked")((xq, sfa), (w, wscale_prepared), d, masked_m.to(torch.int32), max(m, 1))
    rows = torch.arange(m, device=xq.device)
    return d.masked_fill_(rows[None, :, None] >= masked_m[:, None, None], 0)
