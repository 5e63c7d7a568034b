"""``python -m fp8fx bench gemm``: block-FP8 GEMM and activation-quant throughput on one GPU.

For each dense shape (M tokens, N out_features, K in_features) of shared/bench/shapes.json,
in one process, with triton.testing.do_bench medians:
    bf16      F.linear on bf16 weights (cuBLAS)
    cublas    torch._scaled_mm blockwise, GEMM alone (inputs pre-quantized, padded layout)
    triton    fp8fx Triton GEMM alone (fp8 activations + scales), default config of the class
    auto      the backend dispatch.choose picks for the GEMM alone (that backend's time here)
    lin/cub   act quant + cuBLAS blockwise (what a plain port runs)
    lin/tri   act quant + fp8fx Triton GEMM
    lin/fused fp8fx Triton GEMM quantizing bf16 activations in its K loop (M <= 512)
    lin/auto  the linear route dispatch.choose picks (that route's time here)
Times are CUDA-graph replays (do_bench_cudagraph medians). Inputs rotate over several copies
when a shape's working set fits in L2, so no row times L2. ``--from-json`` re-renders a saved
run with the current dispatch tables.
``--sweep`` times every Triton config in block_gemm.CONFIGS per shape class instead.

``--small-m``: decode shapes (M <= 16; Llama-3-8B at M = 1, 2, 4, 8, 16, DSV3 and edge at
M = 1 and 16 / 7), reported as GB/s of weight bytes (fp8: N*K, bf16: 2*N*K), weights rotated
over enough copies to span 4x L2: bf16 F.linear, every previous fp8fx route (lin/cub,
lin/tri, lin/fused; cublas, triton for the GEMM alone) and the gemv (linear = bf16 in, quant
fused; gemm = fp8 codes + column-major scales in, as the compiled graph calls it).
``--small-m --sweep`` first times every gemv.CONFIGS entry x split-K factor per shape (linear
mode; the four best again with fp8 input), then the comparison with the winners.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

# Mirrors shared/bench/shapes.json ("dense"), used when that file is not found (the GPU
# machine receives the repository only).
_DENSE_FALLBACK = {
    "dsv3": {"M": [64, 128, 4096], "NK": [[2112, 7168], [24576, 1536], [32768, 512], [7168, 16384], [4096, 7168], [7168, 2048]]},
    "llama3_8b": {"M": [1, 16, 128, 2048, 8192], "NK": [[6144, 4096], [4096, 4096], [28672, 4096], [4096, 14336]]},
    "edge": {"M": [1, 7, 300], "NK": [[576, 7168], [2112, 7168], [4096, 4480]]},
}

# DESIGN.md anchors, H200, torch 2.11 (TFLOP/s): the classic Triton block kernel.
CLASSIC_TRITON_TF = {(64, 2112, 7168): 49, (128, 7168, 16384): 82, (4096, 7168, 16384): 332, (8192, 4096, 14336): 333}


def _load_dense(path: str | None) -> dict:
    candidates = [path] if path else ["shared/bench/shapes.json", "../shared/bench/shapes.json"]
    for c in candidates:
        if c and Path(c).is_file():
            return json.loads(Path(c).read_text())["dense"]
    if path:
        raise FileNotFoundError(path)
    return _DENSE_FALLBACK


def _shapes(dense: dict, sets: list[str] | None) -> list[tuple[str, int, int, int]]:
    out = []
    for name, spec in dense.items():
        if sets and name not in sets:
            continue
        for m in spec["M"]:
            for n, k in spec["NK"]:
                out.append((name, m, n, k))
    return out


def _time_all(fns: dict, rep_ms: float, shape: str) -> dict:
    """ms per call of every named fn; a backend refusing a shape is a result (nan), not a crash."""
    ms = {}
    for name, fn in fns.items():
        try:
            ms[name] = _bench(fn, rep_ms)
        except Exception as e:
            print(f"  {name} failed at {shape}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            ms[name] = float("nan")
    return ms


def _bench(fn, rep_ms: int) -> float:
    """Median ms of fn's GPU work, replayed from a CUDA graph: decode-sized GEMMs take a few
    microseconds, less than Python takes to launch them, and serving runs them in graphs."""
    import triton

    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


class _Rotating:
    """Call fn(inputs[i]) for i cycling over input copies; enough copies to overflow L2."""

    def __init__(self, make, bytes_per_set: int, l2_bytes: int):
        copies = 1 if bytes_per_set > 2 * l2_bytes else min(8, math.ceil(3 * l2_bytes / max(bytes_per_set, 1)))
        self.sets = [make(i) for i in range(copies)]
        self.i = 0

    def __call__(self, fn):
        def run():
            self.i = (self.i + 1) % len(self.sets)
            return fn(self.sets[self.i])

        return run


def _make_set(m, n, k, device, seed):
    from fp8fx import reference
    from fp8fx.kernels import cublas
    from fp8fx.kernels.act_quant import act_quant

    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=g)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=g) * 0.05
    wq, ws = reference.quantize_weight(w, (128, 128), "float32")
    xq, xs = act_quant(x)
    xq_p, xs_p = act_quant(x, col_major=True, pad_rows=cublas.M_ALIGN)
    return dict(x=x, w=w, wq=wq, ws=ws, ws_cublas=cublas.prepare_weight_scale(ws), xq=xq, xs=xs, xq_p=xq_p, xs_p=xs_p)


def _bench_shape(m, n, k, rep_ms, l2):
    import torch.nn.functional as F

    from fp8fx.kernels import cublas
    from fp8fx.kernels.act_quant import act_quant
    from fp8fx.kernels.block_gemm import block_gemm

    dev = torch.device("cuda")
    per_set = m * k * 2 + n * k * 3 + m * n * 2
    rot = _Rotating(lambda i: _make_set(m, n, k, dev, 1234 + i), per_set, l2)
    fns = {
        "bf16": rot(lambda s: F.linear(s["x"], s["w"])),
        "cublas": rot(lambda s: cublas.gemm(s["xq_p"], s["xs_p"], s["wq"], s["ws_cublas"], None, torch.bfloat16, m)),
        "triton": rot(lambda s: block_gemm(s["xq"], s["xs"], s["wq"], s["ws"], None, torch.bfloat16)),
        "lin/cub": rot(lambda s: cublas.gemm(*act_quant(s["x"], col_major=True, pad_rows=cublas.M_ALIGN), s["wq"], s["ws_cublas"], None, torch.bfloat16, m)),
        "lin/tri": rot(lambda s: block_gemm(*act_quant(s["x"]), s["wq"], s["ws"], None, torch.bfloat16)),
    }
    if m <= 512:
        fns["lin/fused"] = rot(lambda s: block_gemm(s["x"], None, s["wq"], s["ws"], None, torch.bfloat16))
    if not cublas.supports(k, torch.bfloat16):
        del fns["cublas"], fns["lin/cub"]
    ms = _time_all(fns, rep_ms, f"{m}x{n}x{k}")
    flop = 2.0 * m * n * k
    tf = {key: flop / (t * 1e-3) / 1e12 for key, t in ms.items()}
    return dict(m=m, n=n, k=k, ms=ms, tflops=tf)


_LINEAR_ROUTE = {"cublas": "lin/cub", "triton": "lin/tri", "triton_fused": "lin/fused", "deepgemm": "lin/cub"}


def _add_auto(r: dict) -> None:
    """auto = the measured time of the route the current dispatch tables choose."""
    from fp8fx.kernels import dispatch

    m, n, k, tf = r["m"], r["n"], r["k"], r["tflops"]
    cuda = torch.device("cuda")
    r["gemm_choice"] = dispatch.choose(m, n, k, torch.bfloat16, cuda)
    r["linear_choice"] = dispatch.choose(m, n, k, torch.bfloat16, cuda, fused_quant=True)
    tf["auto"] = tf.get(r["gemm_choice"], float("nan"))
    tf["lin/auto"] = tf.get(_LINEAR_ROUTE[r["linear_choice"]], float("nan"))


def _bench_act_quant(rep_ms: int, m=8192, k=7168) -> dict:
    from fp8fx.kernels.act_quant import act_quant

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    t_copy = _bench(lambda: y.copy_(x), rep_ms)
    q_bytes = m * k * 2 + m * k + m * math.ceil(k / 128) * 4
    gbs = lambda t: q_bytes / (t * 1e-3) / 1e9
    variants = {}
    for block_t in (16, 32, 64):
        for warps in (4, 8):
            t = _bench(lambda: act_quant(x, block_t=block_t, num_warps=warps), rep_ms)
            variants[f"t{block_t}w{warps}"] = gbs(t)
    t_qc = _bench(lambda: act_quant(x, col_major=True, pad_rows=4), rep_ms)
    return dict(copy_gbs=2 * m * k * 2 / (t_copy * 1e-3) / 1e9, quant_gbs=variants["t32w4"],
                quant_col_gbs=gbs(t_qc), variants=variants)


def _sweep(rep_ms: int, l2: int) -> list[dict]:
    """Time every Triton config (fp8 input and fused quant) on a few shapes per class."""
    from fp8fx.kernels import dispatch
    from fp8fx.kernels.block_gemm import CONFIGS, block_gemm

    shapes = [(1, 2112, 7168), (16, 6144, 4096), (16, 4096, 14336), (64, 2112, 7168), (64, 7168, 16384),
              (128, 7168, 16384), (128, 24576, 1536), (300, 4096, 4480), (2048, 4096, 4096), (4096, 7168, 16384)]
    dev = torch.device("cuda")
    rows = []
    for m, n, k in shapes:
        per_set = m * k * 2 + n * k * 3
        rot = _Rotating(lambda i: _make_set(m, n, k, dev, 99 + i), per_set, l2)
        for cfg in CONFIGS:
            if cfg.block_m > 2 * max(16, m) or (m >= 1024 and cfg.block_m < 64):
                continue
            for fused in (False, True):
                if fused and m > 512:
                    continue
                fn = rot((lambda s, cfg=cfg: block_gemm(s["x"], None, s["wq"], s["ws"], None, torch.bfloat16, config=cfg))
                         if fused else
                         (lambda s, cfg=cfg: block_gemm(s["xq"], s["xs"], s["wq"], s["ws"], None, torch.bfloat16, config=cfg)))
                try:
                    t = _bench(fn, rep_ms)
                except Exception as e:
                    print(f"  sweep {cfg} failed: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
                    continue
                rows.append(dict(m=m, n=n, k=k, cls=dispatch.shape_class(m), cfg=str(cfg), fused=fused,
                                 ms=t, tflops=2.0 * m * n * k / (t * 1e-3) / 1e12))
                print(f"  sweep {m}x{n}x{k} {'fused' if fused else 'fp8  '} {cfg}: {rows[-1]['tflops']:.0f} TF", flush=True)
    return rows


def _table(rows: list[dict], aq: dict | None) -> str:
    for r in rows:
        _add_auto(r)
    cols = ["bf16", "cublas", "triton", "auto", "lin/cub", "lin/tri", "lin/fused", "lin/auto"]
    out = ["| set | M x N x K | " + " | ".join(cols) + " | auto/cublas | auto/bf16 | triton/cublas | lin auto/cub | choice (gemm, linear) |",
           "|---|---|" + "---|" * (len(cols) + 5)]
    for r in rows:
        tf = r["tflops"]
        ratio = lambda a, b: tf.get(a, float("nan")) / tf[b] if tf.get(b, 0) > 0 else float("nan")
        out.append(
            f"| {r['set']} | {r['m']} x {r['n']} x {r['k']} | " + " | ".join(f"{tf.get(c, float('nan')):.0f}" for c in cols)
            + f" | {ratio('auto', 'cublas'):.2f} | {ratio('auto', 'bf16'):.2f} | {ratio('triton', 'cublas'):.2f}"
            + f" | {ratio('lin/auto', 'lin/cub'):.2f} | {r['gemm_choice']}, {r['linear_choice']} |"
        )

    def geo(sel, a, b):
        v = [r["tflops"][a] / r["tflops"][b] for r in rows
             if sel(r) and r["tflops"].get(b, 0) > 0 and r["tflops"].get(a, 0) > 0]
        return statistics.geometric_mean(v) if v else float("nan")

    small_dsv3 = lambda r: r["set"] == "dsv3" and r["m"] <= 128
    large = lambda r: r["m"] >= 2048
    out += [
        "",
        "| summary (geomean of ratios) | value | target |",
        "|---|---|---|",
        f"| auto / cublas, every shape cuBLAS runs (min) | {min((r['tflops']['auto'] / r['tflops']['cublas'] for r in rows if r['tflops'].get('cublas', 0) > 0), default=float('nan')):.2f} | >= 1.0 |",
        f"| auto / bf16, M >= 2048 (min) | {min((r['tflops']['auto'] / r['tflops']['bf16'] for r in rows if large(r)), default=float('nan')):.2f} | >= 1.5 |",
        f"| auto / cublas, DSV3 M <= 128 | {geo(small_dsv3, 'auto', 'cublas'):.2f} | >= 1.3 |",
        f"| triton / cublas, M >= 2048 | {geo(large, 'triton', 'cublas'):.2f} | >= 0.85 |",
        f"| lin auto / lin cublas, all | {geo(lambda r: True, 'lin/auto', 'lin/cub'):.2f} | |",
    ]
    if aq:
        best = max(aq.get("variants", {"default": aq["quant_gbs"]}).items(), key=lambda kv: kv[1])
        out.append(f"| act quant 8192 x 7168 bf16: GB/s default (t32w4) / best ({best[0]}) / col-major vs copy | "
                   f"{aq['quant_gbs']:.0f} / {best[1]:.0f} / {aq['quant_col_gbs']:.0f} vs {aq['copy_gbs']:.0f} "
                   f"({aq['quant_gbs'] / aq['copy_gbs']:.0%} / {best[1] / aq['copy_gbs']:.0%}) | >= 90% |")
    return "\n".join(out)


# --- small M (decode): the gemv against bf16 and the previous routes -------------------------

_DEVICE = "cuda"  # a dry run of this code path under TRITON_INTERPRET=1 sets "cpu"


# Qwen3-30B-A3B's attention projections (shapes.json models: hidden 2048, 32 query and 4
# key/value heads of 128): q/k/v concatenated and o, the dense GEMMs of its decode.
_QWEN3_MOE_ATTN = {"qwen3_moe_attn": {"M": [1, 16], "NK": [[5120, 2048], [2048, 4096]]}}


def _small_m_shapes(dense: dict) -> list[tuple[str, int, int, int]]:
    ms = {"llama3_8b": (1, 2, 4, 8, 16), "dsv3": (1, 16), "edge": (1, 7), "qwen3_moe_attn": (1, 16)}
    dense = {**dense, **_QWEN3_MOE_ATTN}
    out = []
    for m in (1, 16, 2, 4, 8, 7):  # M = 1 first: the sweep may stop at its deadline
        for name, spec in dense.items():
            out += [(name, m, n, k) for n, k in spec["NK"] if m in ms.get(name, ())]
    return out


def _gemv_splits(m: int, n: int, k: int, cfg, sms: int) -> list[int]:
    """Split-K factors worth timing: 1, and powers of two giving sms/2 .. 4*sms programs."""
    from fp8fx.kernels.gemv import BLOCK_K
    from fp8fx.kernels.host import cdiv

    tiles = cdiv(n, cfg.block_n) * cdiv(m, 16)
    kb = cdiv(k, BLOCK_K)
    out = {1}
    for s in (2, 4, 8, 16, 32, 64):
        if s <= kb and sms // 2 <= tiles * s <= 4 * sms:
            out.add(cdiv(kb, cdiv(kb, s)))  # the factor gemv really uses
    return sorted(out)


def _sweep_variants(m, n, k, sms):
    from dataclasses import replace

    from fp8fx.kernels.gemv import CONFIGS

    for cfg in CONFIGS:
        if not cfg.use_dot and m > 1:
            continue
        for split in _gemv_splits(m, n, k, cfg, sms):
            yield replace(cfg, split_k=split)


def _launch_variants(cfgs):
    from dataclasses import replace

    from fp8fx.kernels.gemv import LAUNCH_VARIANTS

    return [replace(c, pdl=pdl, prefetch=pf) for c in cfgs for pdl, pf in LAUNCH_VARIANTS]


def _small_m_set(m, n, k, device, seed):
    from fp8fx import reference
    from fp8fx.kernels import cublas
    from fp8fx.kernels.act_quant import act_quant

    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=g)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=g) * 0.05
    wq, ws = reference.quantize_weight(w, (128, 128), "float32")
    xq, xs = act_quant(x, col_major=True)  # the layout the compiled graph passes
    xq_p, xs_p = act_quant(x, col_major=True, pad_rows=cublas.M_ALIGN)
    return dict(x=x, w=w, wq=wq, ws=ws, ws_cublas=cublas.prepare_weight_scale(ws), xq=xq, xs=xs, xq_p=xq_p, xs_p=xs_p)


class _WeightRotation(_Rotating):
    """Enough copies that the fp8 weights alone span 4x L2 (at most 48)."""

    def __init__(self, m, n, k, l2):
        dev = torch.device(_DEVICE)
        copies = max(1, min(48, math.ceil(4 * l2 / (n * k))))
        self.sets = [_small_m_set(m, n, k, dev, 4321 + i) for i in range(copies)]
        self.i = 0


def _gemv_fns(rot, m, fp8_in: bool, cfg=None):
    from fp8fx.kernels.gemv import gemv

    if fp8_in:
        return rot(lambda s: gemv(s["xq"], s["xs"], s["wq"], s["ws"], None, torch.bfloat16, config=cfg))
    return rot(lambda s: gemv(s["x"], None, s["wq"], s["ws"], None, torch.bfloat16, config=cfg))


def _warm_worker(job) -> int:
    """Compile (into Triton's disk cache) every gemv variant the sweep will time, for one config."""
    cfg, pairs, sms, device = job
    from dataclasses import replace

    global _DEVICE
    _DEVICE = device

    from fp8fx.kernels.act_quant import act_quant
    from fp8fx.kernels.gemv import gemv

    n_done = 0
    cfgs = [cfg]
    for m, n, k in pairs:
        x = torch.randn(m, k, device=_DEVICE, dtype=torch.bfloat16)
        xq, xs = act_quant(x, col_major=True)
        wq = torch.zeros(n, k, device=_DEVICE).to(torch.float8_e4m3fn)
        ws = torch.ones((n + 127) // 128, (k + 127) // 128, device=_DEVICE)
        for c in [replace(c0, split_k=s) for c0 in cfgs for s in _gemv_splits(m, n, k, c0, sms)]:
            if not c.use_dot and m > 1:
                continue
            for a, sa in ((x, None), (xq, xs)):
                try:
                    gemv(a, sa, wq, ws, None, torch.bfloat16, config=c)
                    n_done += 1
                except Exception as e:  # reported; the sweep skips what fails again
                    print(f"  precompile {c} {m}x{n}x{k} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    if _DEVICE == "cuda":
        torch.cuda.synchronize()
    return n_done


def _precompile(pairs, sms, jobs: int, configs) -> None:
    import concurrent.futures as cf
    import multiprocessing as mp
    import time

    t0 = time.time()
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
        done = sum(ex.map(_warm_worker, [(cfg, pairs, sms, _DEVICE) for cfg in configs]))
    print(f"  precompiled {done} gemv launches in {time.time() - t0:.0f} s ({jobs} processes)", flush=True)


def _small_m_sweep(shapes, rep_ms, l2, sms, deadline) -> dict:
    """Best gemv config per (M, N, K): linear mode over all variants, fp8-input over the top 4."""
    import time

    best = {}
    for set_name, m, n, k in shapes:
        if time.time() > deadline:
            print(f"  sweep deadline reached before {m}x{n}x{k}", flush=True)
            break
        rot = _WeightRotation(m, n, k, l2)
        timed = []
        for cfg in _sweep_variants(m, n, k, sms):
            try:
                timed.append((_bench(_gemv_fns(rot, m, False, cfg), rep_ms), cfg))
            except Exception as e:
                print(f"  sweep {cfg} failed at {m}x{n}x{k}: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
        timed.sort(key=lambda t: t[0])
        for cfg in _launch_variants([c for _, c in timed[:3]]):
            try:
                timed.append((_bench(_gemv_fns(rot, m, False, cfg), rep_ms), cfg))
            except Exception as e:
                print(f"  sweep {cfg} failed at {m}x{n}x{k}: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
        timed.sort(key=lambda t: t[0])
        timed_fp8 = []
        for _, cfg in timed[:4]:
            try:
                timed_fp8.append((_bench(_gemv_fns(rot, m, True, cfg), rep_ms), cfg))
            except Exception as e:
                print(f"  sweep fp8 {cfg} failed at {m}x{n}x{k}: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
        timed_fp8.sort(key=lambda t: t[0])
        del rot
        if not timed:
            continue
        gbs = lambda t: n * k / (t * 1e-3) / 1e9
        best[(m, n, k)] = dict(linear=timed[0][1], gemm=timed_fp8[0][1] if timed_fp8 else timed[0][1],
                               all=[(str(c), gbs(t)) for t, c in timed], fp8=[(str(c), gbs(t)) for t, c in timed_fp8])
        no_pdl = [t for t in timed if not t[1].pdl]
        best[(m, n, k)]["linear_no_pdl"] = no_pdl[0][1] if no_pdl else timed[0][1]
        print(f"  sweep {set_name} {m}x{n}x{k}: linear {timed[0][1]} {gbs(timed[0][0]):.0f} GB/s"
              + (f", fp8-in {timed_fp8[0][1]} {gbs(timed_fp8[0][0]):.0f} GB/s" if timed_fp8 else "")
              + f" ({len(timed)} variants; worst {gbs(timed[-1][0]):.0f})", flush=True)
    return best


def _small_m_bench(set_name, m, n, k, rep_ms, l2, cfgs) -> dict:
    from dataclasses import replace

    import torch.nn.functional as F

    from fp8fx.kernels import cublas
    from fp8fx.kernels.act_quant import act_quant
    from fp8fx.kernels.block_gemm import block_gemm

    rot = _WeightRotation(m, n, k, l2)
    fns = {
        "bf16": rot(lambda s: F.linear(s["x"], s["w"])),
        "lin/cub": rot(lambda s: cublas.gemm(*act_quant(s["x"], col_major=True, pad_rows=cublas.M_ALIGN), s["wq"], s["ws_cublas"], None, torch.bfloat16, m)),
        "lin/tri": rot(lambda s: block_gemm(*act_quant(s["x"]), s["wq"], s["ws"], None, torch.bfloat16)),
        "lin/fused": rot(lambda s: block_gemm(s["x"], None, s["wq"], s["ws"], None, torch.bfloat16)),
        "lin/gemv": _gemv_fns(rot, m, False, cfgs.get("linear")),
        "cublas": rot(lambda s: cublas.gemm(s["xq_p"], s["xs_p"], s["wq"], s["ws_cublas"], None, torch.bfloat16, m)),
        "triton": rot(lambda s: block_gemm(s["xq"], s["xs"].contiguous(), s["wq"], s["ws"], None, torch.bfloat16)),
        "gemv": _gemv_fns(rot, m, True, cfgs.get("gemm")),
        # PDL overlaps a gemv with the gemv before it in these back-to-back replays; in a
        # model the neighbours are other kernels (see the layer chain), so both are shown.
        "lin/gemv/nopdl": _gemv_fns(rot, m, False, replace(cfgs["linear"], pdl=False)),
        "gemv/nopdl": _gemv_fns(rot, m, True, replace(cfgs["gemm"], pdl=False)),
    }
    if not cublas.supports(k, torch.bfloat16):
        del fns["cublas"], fns["lin/cub"]
    ms = _time_all(fns, rep_ms, f"{m}x{n}x{k}")
    gbs = {key: (2 if key == "bf16" else 1) * n * k / (t * 1e-3) / 1e9 for key, t in ms.items()}
    return dict(set=set_name, m=m, n=n, k=k, ms=ms, gbs=gbs, cfg={key: str(c) for key, c in cfgs.items()})


def _small_m_table(rows: list[dict]) -> str:
    nan = float("nan")
    out = ["| set | M x N x K | bf16 GB/s | lin/gemv GB/s | gemv (fp8 in) GB/s | no PDL: lin/gemv, gemv GB/s | best old linear (route) GB/s | best old GEMM (route) GB/s "
           "| lin/gemv vs bf16 | lin/gemv vs old | gemv vs bf16 | gemv vs old GEMM | no PDL: lin/gemv, gemv vs bf16 | gemv us | config (linear; gemm) |",
           "|---|---|" + "---|" * 13]
    for r in rows:
        t = r["ms"]
        old_lin = min((c for c in ("lin/cub", "lin/tri", "lin/fused") if t.get(c, nan) == t.get(c, nan)), key=lambda c: t[c], default=None)
        old_gemm = min((c for c in ("cublas", "triton") if t.get(c, nan) == t.get(c, nan)), key=lambda c: t[c], default=None)
        ratio = lambda a, b: t[b] / t[a] if a in t and b in t and t[a] > 0 else nan  # speedup of a over b
        out.append(
            f"| {r['set']} | {r['m']} x {r['n']} x {r['k']} | {r['gbs']['bf16']:.0f} | {r['gbs']['lin/gemv']:.0f} | {r['gbs']['gemv']:.0f} "
            f"| {r['gbs'].get('lin/gemv/nopdl', nan):.0f}, {r['gbs'].get('gemv/nopdl', nan):.0f} "
            f"| {r['gbs'].get(old_lin, nan):.0f} ({old_lin}) | {r['gbs'].get(old_gemm, nan):.0f} ({old_gemm}) "
            f"| {ratio('lin/gemv', 'bf16'):.2f} | {ratio('lin/gemv', old_lin):.2f} | {ratio('gemv', 'bf16'):.2f} | {ratio('gemv', old_gemm):.2f} "
            f"| {ratio('lin/gemv/nopdl', 'bf16'):.2f}, {ratio('gemv/nopdl', 'bf16'):.2f} "
            f"| {t['gemv'] * 1e3:.1f} | {r['cfg'].get('linear', 'default')}; {r['cfg'].get('gemm', 'default')} |"
        )

    def geo(a, b, sel=lambda r: True):
        v = [r["ms"][b] / r["ms"][a] for r in rows if sel(r) and r["ms"].get(a, 0) > 0 and r["ms"].get(b, 0) > 0]
        return statistics.geometric_mean(v) if v else nan

    def best_old(r, names):
        return min((r["ms"][c] for c in names if r["ms"].get(c, nan) == r["ms"].get(c, nan)), default=nan)

    for r in rows:
        r["ms"]["old_lin"] = best_old(r, ("lin/cub", "lin/tri", "lin/fused"))
        r["ms"]["old_gemm"] = best_old(r, ("cublas", "triton"))
    llama = lambda r: r["set"] == "llama3_8b"
    out += ["", "| summary (geomean speedup) | all | llama3_8b |", "|---|---|---|"]
    for label, a, b in (("lin/gemv vs bf16", "lin/gemv", "bf16"), ("lin/gemv vs best old linear", "lin/gemv", "old_lin"),
                        ("gemv (fp8 in) vs bf16", "gemv", "bf16"), ("gemv (fp8 in) vs best old GEMM", "gemv", "old_gemm"),
                        ("no PDL: lin/gemv vs bf16", "lin/gemv/nopdl", "bf16"), ("no PDL: gemv (fp8 in) vs bf16", "gemv/nopdl", "bf16"),
                        ("no PDL: gemv (fp8 in) vs best old GEMM", "gemv/nopdl", "old_gemm")):
        out.append(f"| {label} | {geo(a, b):.2f} | {geo(a, b, llama):.2f} |")
    return "\n".join(out)


_CHAIN_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K)


def chain_layers() -> list[list[dict]]:
    """The layer chain's operands: 2 layers x _CHAIN_SHAPES of bf16 weight w, its fp8 wq / ws
    (fp32 scales) and a one-token bf16 input x."""
    from fp8fx import reference

    dev = torch.device(_DEVICE)
    layers = []
    for _ in range(2):
        lay = []
        for n, k in _CHAIN_SHAPES:
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
            wq, ws = reference.quantize_weight(w, (128, 128), "float32")
            lay.append(dict(w=w, wq=wq, ws=ws, x=torch.randn(1, k, device=dev, dtype=torch.bfloat16)))
        layers.append(lay)
    return layers


def _layer_chain(rep_ms: int, cfgs: dict) -> str:
    """Llama-3-8B decode linears at M = 1, each behind a producer kernel, as a layer runs them
    in a CUDA graph: qkv, o, gate_up (K = 4096), down (K = 14336), over 2 layers' weights
    (fp8 436 MB > L2). Producers: bf16 ``x * 1`` (bf16 F.linear, eager fp8 linear) or
    act_quant (the fp8 activation-quant fused into the producer, as compiled graphs run it,
    then the GEMM alone). Time per layer."""
    import torch.nn.functional as F

    from fp8fx.kernels.act_quant import act_quant
    from fp8fx.kernels.block_gemm import block_gemm
    from fp8fx.kernels.gemv import gemv

    layers = chain_layers()

    def run(step):
        state = {"i": 0}

        def fn():
            state["i"] ^= 1
            for d in layers[state["i"]]:
                step(d)

        return fn

    from dataclasses import replace

    def cfg_of(d, fp8_in, pdl):
        c = cfgs.get((1, d["wq"].shape[0], d["wq"].shape[1], fp8_in))
        return None if c is None else (c if pdl else replace(c, pdl=False))

    variants = {
        "bf16 (x*1 -> F.linear)": lambda d: F.linear(d["x"] * 1, d["w"]),
        "old fp8 compiled-style (act_quant -> Triton block GEMM)": lambda d: block_gemm(*act_quant(d["x"]), d["wq"], d["ws"], None),
        "gemv compiled-style (act_quant -> gemv fp8 in), no PDL": lambda d: gemv(*act_quant(d["x"], col_major=True), d["wq"], d["ws"], None, config=cfg_of(d, True, False)),
        "gemv compiled-style, table config (PDL where chosen)": lambda d: gemv(*act_quant(d["x"], col_major=True), d["wq"], d["ws"], None, config=cfg_of(d, True, True)),
        "gemv eager-style (x*1 -> gemv quantizing), no PDL": lambda d: gemv(d["x"] * 1, None, d["wq"], d["ws"], None, config=cfg_of(d, False, False)),
        "gemv eager-style, table config (PDL where chosen)": lambda d: gemv(d["x"] * 1, None, d["wq"], d["ws"], None, config=cfg_of(d, False, True)),
    }
    out = ["| Llama-3-8B decode linears, M = 1, one layer (4 linears + 4 producers) | us / layer | vs bf16 |", "|---|---|---|"]
    base = None
    for name, step in variants.items():
        try:
            t = _bench(run(step), rep_ms) * 1e3  # one layer per call
        except Exception as e:
            print(f"  chain {name} failed: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            t = float("nan")
        base = base or t
        out.append(f"| {name} | {t:.1f} | {base / t:.2f} |")
        print(f"  chain {name}: {t:.1f} us/layer", flush=True)
    return "\n".join(out)


def _cfg_src(c) -> str:
    """GemvConfig as dispatch.py spells it."""
    args = [str(c.block_n), str(c.num_warps), str(c.num_stages), str(c.split_k)]
    args += [f"{f}={v!r}" for f, v, d in (("use_dot", c.use_dot, True), ("pdl", c.pdl, False), ("prefetch", c.prefetch, 0),
                                               ("kb_iter", c.kb_iter, 1), ("tma", c.tma, False)) if v != d]
    return f"GemvConfig({', '.join(args)})"


def _measured_rows(rows) -> str:
    """dispatch.MEASURED rows: the fastest route of this run, GEMM alone and linear."""
    names = {"gemv": "gemv", "triton": "triton", "cublas": "cublas"}
    lin = {"lin/gemv": "gemv", "lin/tri": "triton", "lin/fused": "triton_fused", "lin/cub": "cublas"}
    out = []
    for r in rows:
        t = {key: v for key, v in r["ms"].items() if v == v}
        g = min((c for c in names if c in t), key=t.get)
        li = min((c for c in lin if c in t), key=t.get)
        out.append(f"    ({r['m']}, {r['n']}, {r['k']}): ({names[g]!r}, {lin[li]!r}),")
    return "\n".join(out)


def _small_m_main(args, l2: int, header: str) -> int:
    import time

    from fp8fx.kernels import dispatch
    from fp8fx.kernels.block_gemm import num_sms

    t_start = time.time()
    sms = num_sms(torch.device(_DEVICE))
    shapes = _small_m_shapes(_load_dense(args.shapes))
    if args.sets:
        shapes = [s for s in shapes if s[0] in args.sets]
    if args.ms:
        shapes = [s for s in shapes if s[1] in args.ms]
    best = {}
    if args.sweep:
        from fp8fx.kernels.gemv import CONFIGS

        if args.jobs > 1 or args.compile_only:
            # The base configs, and the launch variants of the first sweep's usual winners.
            likely = [c for c in CONFIGS if (c.block_n, c.num_warps, c.num_stages, c.use_dot) in
                      {(128, 4, 3, True), (128, 8, 4, True), (128, 8, 3, False)}]
            jobs = CONFIGS + _launch_variants(likely)
            _precompile(sorted({(m, n, k) for _, m, n, k in shapes}), sms, max(1, min(args.jobs, len(jobs))), jobs)
        if args.compile_only:
            return 0
        best = _small_m_sweep(shapes, args.sweep_rep, l2, sms, t_start + args.deadline)
        print("\n# GEMV_MEASURED (gemm, linear) from this sweep:")
        for (m, n, k), b in best.items():
            print(f"    ({m}, {n}, {k}): ({_cfg_src(b['gemm'])}, {_cfg_src(b['linear'])}),  # no PDL: {b['linear_no_pdl']}")
    rows = []
    for set_name, m, n, k in shapes:
        cfgs = {}
        if (m, n, k) in best:
            cfgs = dict(linear=best[(m, n, k)]["linear"], gemm=best[(m, n, k)]["gemm"])
        else:
            cfgs = dict(linear=dispatch.gemv_config(m, n, k, False), gemm=dispatch.gemv_config(m, n, k, True))
        rows.append(_small_m_bench(set_name, m, n, k, args.rep, l2, cfgs))
        r = rows[-1]
        print(f"  {set_name} {m}x{n}x{k}: " + ", ".join(f"{c} {v:.0f}" for c, v in r["gbs"].items()) + " GB/s", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(dict(header=header, rows=rows, sweep={str(key): dict(all=b["all"], fp8=b["fp8"]) for key, b in best.items()}), indent=1))
    chain_cfgs = {}
    for r in rows:
        for key, fp8_in in (("gemm", True), ("linear", False)):
            c = best.get((r["m"], r["n"], r["k"]), {}).get(key) or dispatch.gemv_config(r["m"], r["n"], r["k"], fp8_in)
            chain_cfgs[(r["m"], r["n"], r["k"], fp8_in)] = c
    chain = _layer_chain(args.rep, chain_cfgs) if any(r["set"] == "llama3_8b" for r in rows) else ""
    print("\n# MEASURED rows (gemm, linear) from this run:")
    print(_measured_rows(rows))
    print()
    print(header)
    print(_small_m_table(rows))
    print()
    print(chain)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fp8fx bench gemm", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", help="shapes.json (default: shared/bench/shapes.json, else a built-in copy)")
    p.add_argument("--sets", nargs="*", help="dense sets to run (dsv3 llama3_8b edge; --small-m also qwen3_moe_attn); default all")
    p.add_argument("--ms", nargs="*", type=int, help="--small-m: only these token counts M")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time per measurement, ms")
    p.add_argument("--sweep", action="store_true", help="time every Triton config instead")
    p.add_argument("--small-m", action="store_true", help="decode shapes: the gemv against bf16 and the previous routes")
    p.add_argument("--sweep-rep", type=int, default=5, help="--small-m --sweep: do_bench time per variant, ms")
    p.add_argument("--jobs", type=int, default=12, help="--small-m --sweep: processes compiling the variants first")
    p.add_argument("--deadline", type=float, default=1e9, help="--small-m --sweep: stop sweeping after this many seconds")
    p.add_argument("--compile-only", action="store_true", help="--small-m --sweep: only fill Triton's cache (--jobs processes)")
    p.add_argument("--json", help="write the raw numbers here")
    p.add_argument("--from-json", help="re-render a saved run's table with the current dispatch tables")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        print(saved["header"])
        if saved["rows"] and "gbs" in saved["rows"][0]:  # a --small-m run
            print(_small_m_table(saved["rows"]))
        else:
            print(_table(saved["rows"], saved.get("act_quant")))
        return 0
    if not torch.cuda.is_available():
        print("bench gemm needs a CUDA GPU", file=sys.stderr)
        return 2
    from fp8fx.kernels import register

    register()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    header = f"device {props.name}, torch {torch.__version__}, triton {__import__('triton').__version__}"
    print(header, flush=True)
    if args.small_m:
        return _small_m_main(args, l2, header)
    if args.sweep:
        rows = _sweep(args.rep, l2)
        if args.json:
            Path(args.json).write_text(json.dumps(dict(header=header, sweep=rows), indent=1))
        best = {}
        for r in rows:
            key = (r["m"], r["n"], r["k"], r["fused"])
            if key not in best or r["tflops"] > best[key]["tflops"]:
                best[key] = r
        print("\n| M x N x K | input | best config | TFLOP/s |\n|---|---|---|---|")
        for (m, n, k, fused), r in best.items():
            print(f"| {m} x {n} x {k} | {'bf16 (fused quant)' if fused else 'fp8'} | {r['cfg']} | {r['tflops']:.0f} |")
        return 0
    rows = []
    for set_name, m, n, k in _shapes(_load_dense(args.shapes), args.sets):
        r = _bench_shape(m, n, k, args.rep, l2)
        r["set"] = set_name
        rows.append(r)
        print(f"  {set_name} {m}x{n}x{k}: " + ", ".join(f"{c} {v:.0f}" for c, v in r["tflops"].items()), flush=True)
    aq = _bench_act_quant(args.rep)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header=header, rows=rows, act_quant=aq), indent=1))
    print()
    print(header)
    print(_table(rows, aq))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
