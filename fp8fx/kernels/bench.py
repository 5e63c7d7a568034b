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

    from fp8fx.kernels import cublas, dispatch, linear_cuda
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
    ms = {}
    for name, fn in fns.items():
        try:
            ms[name] = _bench(fn, rep_ms)
        except Exception as e:  # a backend refusing a shape is a result, not a crash
            print(f"  {name} failed at {m}x{n}x{k}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            ms[name] = float("nan")
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fp8fx bench gemm", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", help="shapes.json (default: shared/bench/shapes.json, else a built-in copy)")
    p.add_argument("--sets", nargs="*", help="dense sets to run (dsv3 llama3_8b edge); default all")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time per measurement, ms")
    p.add_argument("--sweep", action="store_true", help="time every Triton config instead")
    p.add_argument("--json", help="write the raw numbers here")
    p.add_argument("--from-json", help="re-render a saved run's table with the current dispatch tables")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        print(saved["header"])
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
