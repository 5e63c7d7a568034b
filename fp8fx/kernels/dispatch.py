"""Which block-FP8 GEMM backend runs a given shape, and which Triton config.

    preference "auto"     -> the measured table below, per shape class
    preference "triton"   -> fp8fx's Triton kernels (AUTO_GEMM / AUTO_LINEAR pick the kernel
                             per class: "gemv" small-M weight streaming, "triton" block GEMM,
                             "triton_fused" block GEMM quantizing in its K loop)
    preference "cublas"   -> torch._scaled_mm blockwise (bf16 output, dynamic 1x128 scales)
    preference "deepgemm" -> DeepGEMM when it loads (bf16 output, K % 128 == 0, N % 64 == 0)
A backend that cannot run a shape falls through: deepgemm -> cublas -> triton.

Shape classes are token-count buckets (M). The tables come from ``python -m fp8fx bench gemm`` (and ``--sweep`` for the Triton
configs); NOTES.md beside this file holds the measurements they were read from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os

import torch

from fp8fx.kernels.block_gemm import GemmConfig
from fp8fx.kernels.gemv import GemvConfig

__all__ = [
    "PREFERENCES",
    "set_preference",
    "get_preference",
    "preference",
    "shape_class",
    "choose",
    "triton_config",
    "gemv_config",
    "cat_takes_gemv",
    "expert_gemv_config",
]

PREFERENCES = ("auto", "triton", "cublas", "deepgemm")

# (upper bound on M, name). The first bucket whose bound is >= M is the shape class.
SHAPE_CLASSES = ((16, "decode"), (64, "m64"), (128, "m128"), (512, "m512"), (float("inf"), "large"))

# "auto": the winner of each benchmarked shape, (GEMM alone, linear incl. activation quant),
# from ``python -m fp8fx bench gemm`` on an H200 (torch 2.11+cu130, Triton 3.6, CUDA-graph
# medians, 2026-11-22; NOTES.md). A shape not in the table takes the choice of the nearest
# measured shape in its class (distance: sum of |log2| ratios of M, N and K).
MEASURED = {
    (64, 2112, 7168): ("triton", "triton"),
    (64, 24576, 1536): ("triton", "triton"),
    (64, 32768, 512): ("cublas", "cublas"),
    (64, 7168, 16384): ("cublas", "cublas"),
    (64, 4096, 7168): ("triton", "triton"),
    (64, 7168, 2048): ("cublas", "cublas"),
    (128, 2112, 7168): ("triton", "triton"),
    (128, 24576, 1536): ("cublas", "cublas"),
    (128, 32768, 512): ("cublas", "cublas"),
    (128, 7168, 16384): ("cublas", "cublas"),
    (128, 4096, 7168): ("cublas", "cublas"),
    (128, 7168, 2048): ("cublas", "cublas"),
    (4096, 2112, 7168): ("cublas", "cublas"),
    (4096, 24576, 1536): ("cublas", "cublas"),
    (4096, 32768, 512): ("cublas", "cublas"),
    (4096, 7168, 16384): ("cublas", "cublas"),
    (4096, 4096, 7168): ("cublas", "cublas"),
    (4096, 7168, 2048): ("cublas", "cublas"),
    (128, 6144, 4096): ("cublas", "cublas"),
    (128, 4096, 4096): ("cublas", "cublas"),
    (128, 28672, 4096): ("cublas", "cublas"),
    (128, 4096, 14336): ("triton", "triton"),
    (2048, 6144, 4096): ("cublas", "cublas"),
    (2048, 4096, 4096): ("cublas", "cublas"),
    (2048, 28672, 4096): ("cublas", "cublas"),
    (2048, 4096, 14336): ("cublas", "cublas"),
    (8192, 6144, 4096): ("cublas", "cublas"),
    (8192, 4096, 4096): ("cublas", "cublas"),
    (8192, 28672, 4096): ("cublas", "cublas"),
    (8192, 4096, 14336): ("cublas", "cublas"),
    (300, 576, 7168): ("triton", "triton"),
    (300, 2112, 7168): ("cublas", "cublas"),
    (300, 4096, 4480): ("triton", "triton"),
    # decode (M <= 16): ``bench gemm --small-m``, H200, 2026-11-22 (NOTES.md, "gemv")
    (1, 2112, 7168): ('gemv', 'gemv'),
    (1, 24576, 1536): ('gemv', 'gemv'),
    (1, 32768, 512): ('gemv', 'gemv'),
    (1, 7168, 16384): ('gemv', 'gemv'),
    (1, 4096, 7168): ('gemv', 'gemv'),
    (1, 7168, 2048): ('gemv', 'gemv'),
    (1, 6144, 4096): ('gemv', 'gemv'),
    (1, 4096, 4096): ('gemv', 'gemv'),
    (1, 28672, 4096): ('gemv', 'gemv'),
    (1, 4096, 14336): ('gemv', 'gemv'),
    (1, 576, 7168): ('gemv', 'gemv'),
    (1, 4096, 4480): ('gemv', 'gemv'),
    (16, 2112, 7168): ('gemv', 'gemv'),
    (16, 24576, 1536): ('gemv', 'gemv'),
    (16, 32768, 512): ('gemv', 'gemv'),
    (16, 7168, 16384): ('triton', 'gemv'),
    (16, 4096, 7168): ('gemv', 'gemv'),
    (16, 7168, 2048): ('gemv', 'gemv'),
    (16, 6144, 4096): ('triton', 'gemv'),
    (16, 4096, 4096): ('gemv', 'gemv'),
    (16, 28672, 4096): ('triton', 'gemv'),
    (16, 4096, 14336): ('gemv', 'gemv'),
    (2, 6144, 4096): ('gemv', 'gemv'),
    (2, 4096, 4096): ('gemv', 'gemv'),
    (2, 28672, 4096): ('gemv', 'gemv'),
    (2, 4096, 14336): ('gemv', 'gemv'),
    (4, 6144, 4096): ('gemv', 'gemv'),
    (4, 4096, 4096): ('gemv', 'gemv'),
    (4, 28672, 4096): ('gemv', 'cublas'),
    (4, 4096, 14336): ('gemv', 'gemv'),
    (8, 6144, 4096): ('gemv', 'gemv'),
    (8, 4096, 4096): ('gemv', 'gemv'),
    (8, 28672, 4096): ('cublas', 'cublas'),
    (8, 4096, 14336): ('gemv', 'gemv'),
    (7, 576, 7168): ('gemv', 'gemv'),
    (7, 2112, 7168): ('gemv', 'gemv'),
    (7, 4096, 4480): ('gemv', 'gemv'),
    # Qwen3-30B-A3B attention q/k/v and o (bench gemm --small-m, fifth session)
    (1, 5120, 2048): ('gemv', 'gemv'),
    (1, 2048, 4096): ('gemv', 'gemv'),
    (16, 5120, 2048): ('cublas', 'gemv'),
    (16, 2048, 4096): ('gemv', 'gemv'),
}

# The Triton family's route per class, used under preference "triton": GEMM alone (fp8
# activations in) and linear (activation quant included).
AUTO_GEMM = {
    "decode": "gemv",
    "m64": "triton",
    "m128": "triton",
    "m512": "triton",
    "large": "triton",
}
AUTO_LINEAR = {
    "decode": "gemv",
    "m64": "triton",
    "m128": "triton",
    "m512": "triton",
    "large": "triton",
}

# Best of block_gemm.CONFIGS per class in the sweep of NOTES.md (H200, run 1).
TRITON_DEFAULTS = {
    "decode": GemmConfig(16, 64, 4, 4),
    "m64": GemmConfig(64, 64, 4, 4),
    "m128": GemmConfig(64, 128, 4, 4),
    "m512": GemmConfig(64, 64, 4, 4),
    "large": GemmConfig(128, 128, 8, 4),
}

# gemv (small-M weight streaming): the best of gemv.CONFIGS x split-K x launch variants per
# measured shape, (GEMM alone on fp8 activations, linear quantizing bf16 in the kernel), from
# ``python -m fp8fx bench gemm --small-m --sweep`` (H200, Triton 3.6, 2026-11-22; per shape
# the faster of two runs, NOTES.md "gemv"; the Llama-3-8B and Qwen3-MoE attention rows at
# M = 1 and 16 from the fifth session's sweep with the TMA configs); other shapes take the
# nearest one's.
GEMV_MEASURED = {
    (1, 2112, 7168): (GemvConfig(128, 8, 3, 14, use_dot=False, pdl=True, prefetch=4), GemvConfig(128, 8, 3, 14, use_dot=False, pdl=True)),
    (1, 24576, 1536): (GemvConfig(128, 4, 4, 2, pdl=True), GemvConfig(128, 4, 4, 2, pdl=True)),
    (1, 32768, 512): (GemvConfig(128, 8, 3, 1, use_dot=False, pdl=True), GemvConfig(128, 8, 3, 1, use_dot=False, pdl=True)),
    (1, 7168, 16384): (GemvConfig(128, 4, 3, 8, pdl=True), GemvConfig(128, 4, 3, 8, pdl=True)),
    (1, 4096, 7168): (GemvConfig(128, 4, 3, 14, pdl=True), GemvConfig(128, 4, 3, 14, pdl=True)),
    (1, 7168, 2048): (GemvConfig(128, 8, 3, 4, use_dot=False, pdl=True, prefetch=4), GemvConfig(128, 8, 3, 4, use_dot=False, pdl=True)),
    (1, 6144, 4096): (GemvConfig(128, 4, 4, 8, pdl=True, tma=True), GemvConfig(128, 4, 4, 8, pdl=True, prefetch=4, tma=True)),
    (1, 4096, 4096): (GemvConfig(128, 8, 3, 8, use_dot=False, pdl=True), GemvConfig(128, 4, 3, 8, pdl=True, tma=True)),
    (1, 28672, 4096): (GemvConfig(128, 4, 3, 2, tma=True), GemvConfig(128, 4, 3, 2, prefetch=4, tma=True)),
    (1, 4096, 14336): (GemvConfig(128, 4, 3, 16, pdl=True), GemvConfig(128, 4, 3, 16, pdl=True, prefetch=4, tma=True)),
    (1, 576, 7168): (GemvConfig(128, 8, 3, 28, use_dot=False, pdl=True, prefetch=4), GemvConfig(128, 8, 3, 28, use_dot=False, pdl=True)),
    (1, 4096, 4480): (GemvConfig(128, 4, 4, 12, pdl=True), GemvConfig(128, 4, 4, 12, pdl=True)),
    (16, 2112, 7168): (GemvConfig(64, 4, 4, 14, pdl=True), GemvConfig(128, 8, 4, 14, pdl=True)),
    (16, 24576, 1536): (GemvConfig(128, 8, 4, 1, pdl=True), GemvConfig(128, 4, 3, 2, pdl=True)),
    (16, 32768, 512): (GemvConfig(128, 8, 4, 1), GemvConfig(128, 8, 4, 1, pdl=True)),
    (16, 7168, 16384): (GemvConfig(256, 8, 3, 8), GemvConfig(256, 8, 3, 8)),
    (16, 4096, 7168): (GemvConfig(128, 8, 4, 8), GemvConfig(128, 8, 4, 8, pdl=True, prefetch=4)),
    (16, 7168, 2048): (GemvConfig(128, 8, 4, 4), GemvConfig(128, 8, 4, 4, pdl=True)),
    (16, 6144, 4096): (GemvConfig(128, 4, 3, 8, pdl=True), GemvConfig(128, 4, 3, 8, pdl=True)),
    (16, 4096, 4096): (GemvConfig(128, 8, 4, 8), GemvConfig(128, 8, 4, 8, pdl=True)),
    (16, 28672, 4096): (GemvConfig(256, 8, 3, 2), GemvConfig(256, 8, 3, 2)),
    (16, 4096, 14336): (GemvConfig(128, 8, 4, 8), GemvConfig(128, 8, 4, 8, pdl=True, prefetch=4)),
    (2, 6144, 4096): (GemvConfig(128, 4, 4, 8, pdl=True), GemvConfig(128, 4, 3, 8)),
    (2, 4096, 4096): (GemvConfig(128, 4, 3, 8), GemvConfig(128, 4, 3, 8)),
    (2, 28672, 4096): (GemvConfig(128, 4, 3, 2), GemvConfig(128, 4, 3, 1, pdl=True, prefetch=4, kb_iter=2)),
    (2, 4096, 14336): (GemvConfig(128, 4, 3, 16, pdl=True), GemvConfig(128, 4, 3, 16, pdl=True, prefetch=4)),
    (4, 6144, 4096): (GemvConfig(256, 8, 3, 8, pdl=True), GemvConfig(256, 8, 3, 8, pdl=True)),
    (4, 4096, 4096): (GemvConfig(256, 8, 3, 16, pdl=True), GemvConfig(256, 8, 3, 16, pdl=True, prefetch=4)),
    (4, 28672, 4096): (GemvConfig(256, 8, 3, 2, pdl=True, prefetch=4), GemvConfig(256, 8, 3, 2, pdl=True)),
    (4, 4096, 14336): (GemvConfig(256, 8, 3, 16, pdl=True, prefetch=4), GemvConfig(256, 8, 3, 16, pdl=True)),
    (8, 6144, 4096): (GemvConfig(128, 4, 3, 8), GemvConfig(128, 4, 3, 8, pdl=True, prefetch=4)),
    (8, 4096, 4096): (GemvConfig(256, 8, 3, 16, pdl=True, prefetch=4), GemvConfig(256, 8, 3, 16, pdl=True, prefetch=4)),
    (8, 28672, 4096): (GemvConfig(256, 8, 3, 2, pdl=True, prefetch=4), GemvConfig(256, 8, 3, 2, pdl=True, prefetch=4)),
    (8, 4096, 14336): (GemvConfig(256, 8, 3, 16, pdl=True, prefetch=4), GemvConfig(256, 8, 3, 16, pdl=True)),
    (7, 576, 7168): (GemvConfig(128, 8, 4, 28, pdl=True, prefetch=4), GemvConfig(128, 8, 4, 28, pdl=True, prefetch=4)),
    (7, 2112, 7168): (GemvConfig(128, 8, 4, 14, pdl=True), GemvConfig(256, 8, 3, 28, pdl=True, prefetch=4)),
    (7, 4096, 4480): (GemvConfig(256, 8, 3, 12, pdl=True, prefetch=4), GemvConfig(256, 8, 3, 12, pdl=True, prefetch=4)),
    (1, 5120, 2048): (GemvConfig(128, 4, 4, 8, pdl=True), GemvConfig(128, 4, 4, 8, pdl=True)),
    (1, 2048, 4096): (GemvConfig(128, 8, 3, 16, use_dot=False, pdl=True, prefetch=4), GemvConfig(128, 8, 3, 16, use_dot=False, pdl=True)),
    (16, 5120, 2048): (GemvConfig(128, 4, 3, 8, pdl=True, prefetch=4), GemvConfig(128, 4, 3, 8, pdl=True, prefetch=4)),
    (16, 2048, 4096): (GemvConfig(128, 8, 3, 8, pdl=True, prefetch=4, kb_iter=2), GemvConfig(64, 4, 4, 16, pdl=True, prefetch=4)),
}

_preference = os.environ.get("FP8FX_KERNEL", "auto")


def _check(pref: str) -> str:
    if pref not in PREFERENCES:
        raise ValueError(f"fp8fx: kernel preference must be one of {PREFERENCES}, got {pref!r}")
    return pref


def set_preference(pref: str) -> None:
    """Process-wide kernel preference (BlockFP8Config's ``kernel`` sets this)."""
    global _preference
    _preference = _check(pref)


def get_preference() -> str:
    return _check(_preference)


@contextlib.contextmanager
def preference(pref: str):
    """Scoped kernel preference: ``with dispatch.preference("cublas"): ...``."""
    global _preference
    saved, _preference = _preference, _check(pref)
    try:
        yield
    finally:
        _preference = saved


def shape_class(m: int) -> str:
    return next(name for bound, name in SHAPE_CLASSES if m <= bound)


def _measured_choice(m: int, n: int, k: int) -> tuple[str, str]:
    cls = shape_class(m)
    same_class = [key for key in MEASURED if shape_class(key[0]) == cls] or list(MEASURED)
    dist = lambda key: sum(abs(math.log2(a / b)) for a, b in zip((m, n, k), key))
    return MEASURED[min(same_class, key=dist)]


def triton_config(m: int, n: int, k: int, a_hp: bool = False) -> GemmConfig:
    return TRITON_DEFAULTS[shape_class(m)]


# fp8fx::grouped_linear takes the grouped gemv (gemv.grouped_gemv) up to this many rows
# (token-expert pairs), act quant + the tiled grouped GEMM beyond. H200, Qwen3-30B-A3B experts
# (bench moe --only small, NOTES.md): the gemv is 1.2-1.8x faster at 1-2 tokens x top-8,
# even at 4-16 tokens (32-128 rows), 0.8x at 256 rows and 0.45x at 512.
GROUPED_GEMV_MAX_ROWS = 128

# fp8fx::grouped_linear beyond the gemv: the warp-specialized Hopper (Gluon) grouped GEMM
# (grouped_wgmma.py) from this many rows per expert on average, the Triton kernel below it.
# H200, GEMM alone (scripts/probe_gluon_grouped.py --table): Hopper / Triton 0.87x at 64 rows
# per expert (Qwen3-30B-A3B gate/up), 1.12x at 128, 1.26-1.56x from 256 on.
GROUPED_WGMMA_MIN_ROWS = 128

# expert_gemv (fp8fx::expert_linear at decode, rows unsorted): the grouped gemv's tile with TMA
# weight loads, faster at all six Qwen3-30B-A3B decode shapes measured (bench moe --only
# experts --sweep, H200, Triton 3.6, fifth session; NOTES.md), and per measured (rows, N, K)
# the split-K factor that beat gemv.pick_split's.
EXPERT_GEMV_CONFIG = GemvConfig(128, 4, 3, tma=True)
EXPERT_GEMV_MEASURED = {(8, 1536, 2048): GemvConfig(128, 4, 3, 4, tma=True)}


def expert_gemv_config(rows: int, n: int, k: int) -> GemvConfig:
    """The expert gemv's config for ``rows`` unsorted rows of an N x K expert GEMM."""
    return EXPERT_GEMV_MEASURED.get((rows, n, k), EXPERT_GEMV_CONFIG)


@functools.lru_cache(maxsize=4096)
def gemv_config(m: int, n: int, k: int, fp8_in: bool) -> GemvConfig:
    """The gemv config measured at the nearest measured shape (distance as for MEASURED);
    ``fp8_in``: activations arrive quantized (GEMM alone), else bf16 (linear). The measured
    split-K factor is kept only for the same (N, K); otherwise gemv.pick_split's rule."""
    dist = lambda key: sum(abs(math.log2(a / b)) for a, b in zip((max(m, 1), max(n, 1), max(k, 1)), key))
    key = min(GEMV_MEASURED, key=dist)
    cfg = GEMV_MEASURED[key][0 if fp8_in else 1]
    return cfg if key[1:] == (n, k) else dataclasses.replace(cfg, split_k=0)


def _cublas_ok(k: int, out_dtype: torch.dtype, static_act: bool) -> bool:
    from fp8fx.kernels import cublas

    return cublas.supports(k, out_dtype) and not static_act


def _deepgemm_ok(m, n, k, out_dtype, device, static_act) -> bool:
    from fp8fx.kernels import deepgemm

    return not static_act and deepgemm.supports(m, n, k, out_dtype, device)


def choose(
    m: int,
    n: int,
    k: int,
    out_dtype: torch.dtype,
    device: torch.device,
    *,
    fused_quant: bool = False,
    static_act: bool = False,
    pref: str | None = None,
) -> str:
    """Backend for one GEMM: "gemv" (small M), "triton_fused" (only when ``fused_quant``),
    "triton", "cublas" or "deepgemm". "gemv" takes every case (static scales, UE8M0, any
    output dtype). ``fused_quant``: the caller holds high-precision activations (linear).

    Memoized per shape: it runs on every GEMM call, where Python time is decode latency."""
    return _choose(m, n, k, out_dtype, device, fused_quant, static_act, _check(pref or _preference))


def cat_takes_gemv(m: int, ns: tuple, k: int, out_dtype: torch.dtype, device: torch.device, static_act: bool = False,
                   fused_quant: bool = False) -> bool:
    """GEMMs of one input (widths ``ns``) run as one gemv_cat launch: when their concatenated
    shape takes the gemv route, or when each of them alone would (one launch then replaces
    several gemv launches of the same kernel: Llama-3-8B q/k/v at M = 16, whose concatenated
    shape measured faster on the Triton block GEMM, ran as three gemvs of 10.5 + 7.6 + 7.3 us).
    ``fused_quant``: the launch quantizes high-precision activations (the linear routes)."""
    kw = dict(static_act=static_act, fused_quant=fused_quant)
    if choose(m, sum(ns), k, out_dtype, device, **kw) == "gemv":
        return True
    return all(choose(m, n, k, out_dtype, device, **kw) == "gemv" for n in ns)


@functools.lru_cache(maxsize=4096)
def _choose(m, n, k, out_dtype, device, fused_quant, static_act, pref) -> str:
    cls = shape_class(m)
    measured = pref == "auto"
    if measured:
        gemm_choice, linear_choice = _measured_choice(m, n, k)
        pref = linear_choice if fused_quant else gemm_choice
    if pref == "deepgemm":
        if _deepgemm_ok(m, n, k, out_dtype, device, static_act):
            return "deepgemm"
        pref = "cublas"
    if pref == "cublas":
        if _cublas_ok(k, out_dtype, static_act):
            return "cublas"
        pref, measured = "triton", False  # the Triton family's choice for this class
    if pref == "triton" and not measured:
        pref = (AUTO_LINEAR if fused_quant else AUTO_GEMM)[cls]  # the Triton family's choice
    if pref == "triton_fused" and (not fused_quant or static_act):
        pref = "triton"
    return pref
