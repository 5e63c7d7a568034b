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
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton

from fp8fx import reference

__all__ = [
    "load",
    "supports",
    "mn_major_tma_aligned",
    "pack_ue8m0_mn_major",
    "unpack_ue8m0_mn_major",
    "prepare_weight_scale",
    "prepare_act_scale",
    "gemm",
]

log = logging.getLogger("fp8fx")
_HUB_REPO = "kernels-community/deep-gemm"


def _tma_align(mn: int) -> int:
    return triton.cdiv(mn, 4) * 4


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
    """sf[MN, G] fp32 -> the same values with strides (1, A(MN)) (SM90 sfa)."""
    mn, g = sf.shape
    out = torch.empty(g, _tma_align(mn), dtype=torch.float32, device=sf.device)
    out[:, :mn] = sf.t()
    return out[:, :mn].t()


def pack_ue8m0_mn_major(sf: torch.Tensor) -> torch.Tensor:
    """sf[MN, G] fp32 powers of two (or e8m0) -> int32 [MN, ceil(G/4)], strides (1, A(MN))."""
    mn, g = sf.shape
    if sf.dtype == reference.E8M0_DTYPE:
        exponents = sf.view(torch.uint8)
    else:
        bits = sf.float().contiguous().view(torch.int32)
        if bool(((bits & 0x7FFFFF) != 0).any()):
            raise ValueError("fp8fx deepgemm: UE8M0 packing needs power-of-two scales")
        exponents = (bits >> 23).to(torch.uint8)
    g4 = triton.cdiv(g, 4) * 4
    padded = torch.zeros(mn, g4, dtype=torch.uint8, device=sf.device)
    padded[:, :g] = exponents
    words = padded.view(torch.int32)  # [MN, g4 / 4], little-endian: byte j = block 4i + j
    out = torch.zeros(g4 // 4, _tma_align(mn), dtype=torch.int32, device=sf.device)
    out[:, :mn] = words.t()
    return out[:, :mn].t()


def unpack_ue8m0_mn_major(packed: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of pack_ue8m0_mn_major: int32 [MN, ceil(G/4)] -> fp32 [MN, G]."""
    exponents = packed.contiguous().view(torch.uint8)[:, :groups].to(torch.int32)
    return (exponents << 23).view(torch.float32)


def prepare_weight_scale(wscale: torch.Tensor, n: int, arch_major: int = 9) -> torch.Tensor:
    """Weight scale [nN, nK] (fp32 or e8m0) -> DeepGEMM's sfb for this arch. Once per weight."""
    if arch_major == 9:
        return wscale.float().contiguous()
    rows = torch.arange(n, device=wscale.device) // 128
    broadcast = wscale.view(torch.uint8)[rows].view(wscale.dtype) if wscale.dtype == reference.E8M0_DTYPE else wscale[rows]
    return pack_ue8m0_mn_major(broadcast)


def prepare_act_scale(xs: torch.Tensor, arch_major: int = 9) -> torch.Tensor:
    """Activation scale [M, nK] fp32 -> DeepGEMM's sfa (a no-op when already MN-major aligned)."""
    m = xs.shape[0]
    if arch_major == 9:
        if xs.stride() == (1, _tma_align(m)) or (m % 4 == 0 and xs.stride() == (1, m)):
            return xs
        return mn_major_tma_aligned(xs)
    return pack_ue8m0_mn_major(xs)


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
