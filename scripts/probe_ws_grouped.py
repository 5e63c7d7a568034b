"""Probe: can a persistent, TMA-fed, warp-specialized Triton kernel take the grouped
(contiguous) block-FP8 GEMM past the plain per-K-block kernel's ~780 TFLOP/s?

Not part of the library. Times variants of one kernel on 4 x 8192 rows x 4096 x 7168 (issue 5's
shape) against fp8fx.kernels.grouped_gemm in the same process and checks each against its output:

    base        grouped_gemm as dispatched (pointer loads, one program per tile)
    desc        device-side tensor descriptors for a and b, one program per tile
    persist     descriptors + a persistent tile loop over the SMs
    persist-ws  the same loop with tl.range(warp_specialize=True) (Triton's Hopper autoWS)

    python scripts/probe_ws_grouped.py [--groups 4 --rows 8192 --n 4096 --k 7168] [--quick]

Under TRITON_INTERPRET=1 it runs a small shape and only checks the sums.
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch
import triton
import triton.language as tl

from fp8fx import reference
from fp8fx.kernels.act_quant import act_quant
from fp8fx.kernels.grouped_gemm import config_for, expert_tile, grouped_gemm, max_row_tiles

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _tile_of(tile_id, tiles_n, row_tiles, GROUP_M: tl.constexpr):
    group = GROUP_M * tiles_n
    first_m = (tile_id // group) * GROUP_M
    rows_in_group = min(row_tiles - first_m, GROUP_M)
    pid_m = first_m + (tile_id % group) % rows_in_group
    pid_n = (tile_id % group) // rows_in_group
    return pid_m, pid_n


@triton.jit
def _probe_kernel(
    a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, offs_ptr,
    T, N, K, E,
    stride_sam, stride_sak, stride_sbe, stride_sbn, stride_sbk,
    E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr, PERSISTENT: tl.constexpr, WS: tl.constexpr,
    STAGES: tl.constexpr,
):
    # row tiles of the experts (no tail: T == offs[E - 1] here)
    e_ids = tl.arange(0, E_POW2)
    ends = tl.load(offs_ptr + e_ids, mask=e_ids < E, other=0)
    starts = tl.load(offs_ptr + e_ids - 1, mask=(e_ids > 0) & (e_ids < E), other=0)
    tiles = tl.where(e_ids < E, tl.cdiv(tl.maximum(ends - starts, 0), BLOCK_M), 0)
    tile_end = tl.cumsum(tiles, 0)
    row_tiles = tl.sum(tiles, 0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    num_tiles = row_tiles * tiles_n

    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[T, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E * N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    k_blocks = tl.cdiv(K, BLOCK_K)
    start = tl.program_id(0)
    step = NUM_PROGRAMS if PERSISTENT else num_tiles  # not persistent: one tile per program
    for tile_id in tl.range(start, num_tiles, step, warp_specialize=WS):
        pid_m, pid_n = _tile_of(tile_id, tiles_n, row_tiles, GROUP_M)
        g = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
        pick = e_ids == g
        row0 = tl.sum(tl.where(pick, starts, 0), 0) + (pid_m - tl.sum(tl.where(pick, tile_end - tiles, 0), 0)) * BLOCK_M
        row_end = tl.sum(tl.where(pick, ends, 0), 0)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < row_end
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        sa_ptrs = sa_ptr + tl.where(m_ok, offs_m, row0).to(tl.int64) * stride_sam
        # per column: its 128-row weight block's scale (BLOCK_N may span two blocks)
        sb_ptrs = sb_ptr + g * stride_sbe + (offs_n // 128) * stride_sbn
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in tl.range(0, k_blocks, num_stages=STAGES):
            a = a_desc.load([row0, kb * BLOCK_K])
            b = b_desc.load([g * N + pid_n * BLOCK_N, kb * BLOCK_K])
            sa = tl.load(sa_ptrs + kb * stride_sak)
            sb = tl.load(sb_ptrs + kb * stride_sbk, mask=n_ok, other=0.0)
            acc += tl.dot(a, b.T) * (sa[:, None] * sb[None, :])
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def probe(a, sa, b, sb, offs, bm, bn, warps, stages, persistent, ws, group_m=8, sms=132):
    t, k = a.shape
    e, n, _ = b.shape
    out = torch.empty(t, n, dtype=torch.bfloat16, device=a.device)
    tiles = sum(triton.cdiv(int(r), bm) for r in torch.diff(offs, prepend=offs.new_zeros(1)).tolist()) * triton.cdiv(n, bn)
    programs = min(sms, tiles) if persistent else tiles
    _probe_kernel[(programs,)](
        a, sa, b.view(e * n, k), sb, out, offs,
        t, n, k, e,
        sa.stride(0), sa.stride(1), sb.stride(0), sb.stride(1), sb.stride(2),
        E_POW2=triton.next_power_of_2(e + 1), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=group_m,
        NUM_PROGRAMS=programs, PERSISTENT=persistent, WS=ws, STAGES=stages, num_warps=warps,
    )
    return out


@triton.jit
def _one_tile_kernel(
    a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, offs_ptr,
    T, N, K, E,
    stride_sam, stride_sak, stride_sbe, stride_sbn, stride_sbk,
    E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DESC: tl.constexpr, PIPE: tl.constexpr,
):
    # one program per tile, as grouped_gemm; BLOCK_N <= 128 (one weight scale per K block).
    # DESC: a and b through device-side descriptors; PIPE: issue K block kb's MMA before
    # scaling kb - 1's product into the accumulator (the overlap DeepGEMM gets from two
    # math warpgroups), keeping two fp32 products live.
    tiles_n = tl.cdiv(N, BLOCK_N)
    row_tiles = tl.num_programs(0) // tiles_n
    pid_m, pid_n = _tile_of(tl.program_id(0), tiles_n, row_tiles, GROUP_M)
    g, row0, row_end = expert_tile(offs_ptr, pid_m, T, E, E_POW2, BLOCK_M)
    if g >= E:
        return
    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    rm = tl.where(m_ok, offs_m, row0).to(tl.int64)
    rn = tl.where(n_ok, offs_n, 0).to(tl.int64)
    sa_ptrs = sa_ptr + rm * stride_sam
    sb_ptrs = sb_ptr + g * stride_sbe + (pid_n * BLOCK_N // 128) * stride_sbn
    k_blocks = tl.cdiv(K, BLOCK_K)
    if DESC:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[T, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E * N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    a_ptrs = a_ptr + rm[:, None] * K + offs_k[None, :]
    b_ptrs = b_ptr + (g.to(tl.int64) * N + rn[:, None]) * K + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    prev = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s_prev = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for kb in range(0, k_blocks):
        if DESC:
            a = a_desc.load([row0, kb * BLOCK_K])
            b = b_desc.load([g * N + pid_n * BLOCK_N, kb * BLOCK_K])
        else:
            a = tl.load(a_ptrs + kb * BLOCK_K)
            b = tl.load(b_ptrs + kb * BLOCK_K)
        s = tl.load(sa_ptrs + kb * stride_sak) * tl.load(sb_ptrs + kb * stride_sbk)
        if PIPE:
            d = tl.dot(a, b.T)
            acc += prev * s_prev[:, None]
            prev = d
            s_prev = s
        else:
            acc += tl.dot(a, b.T) * s[:, None]
    if PIPE:
        acc += prev * s_prev[:, None]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def one_tile(a, sa, b, sb, offs, bm, bn, warps, stages, desc, pipe, group_m=8):
    t, k = a.shape
    e, n, _ = b.shape
    out = torch.empty(t, n, dtype=torch.bfloat16, device=a.device)
    grid = (max_row_tiles(t, e, bm) * triton.cdiv(n, bn),)
    _one_tile_kernel[grid](
        a, sa, b.view(e * n, k), sb, out, offs,
        t, n, k, e,
        sa.stride(0), sa.stride(1), sb.stride(0), sb.stride(1), sb.stride(2),
        E_POW2=triton.next_power_of_2(e + 1), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=group_m,
        DESC=desc, PIPE=pipe, num_warps=warps, num_stages=stages,
    )
    return out


VARIANTS = [  # (name, bm, bn, warps, stages, persistent, ws): _probe_kernel (tile loop)
    ("desc-loop m128n128w8s4", 128, 128, 8, 4, False, False),
    ("persist m128n128w8s4", 128, 128, 8, 4, True, False),
    ("persist-ws m128n128w8s4", 128, 128, 8, 4, True, True),
]
ONE_TILE = [  # (name, bm, bn, warps, stages, desc, pipe): _one_tile_kernel
    ("ptr m128n128w8s4", 128, 128, 8, 4, False, False),
    ("ptr-pipe m128n128w8s4", 128, 128, 8, 4, False, True),
    ("ptr-pipe m128n128w8s3", 128, 128, 8, 3, False, True),
    ("desc m128n128w8s4", 128, 128, 8, 4, True, False),
    ("desc-pipe m128n128w8s4", 128, 128, 8, 4, True, True),
    ("desc-pipe m128n128w8s3", 128, 128, 8, 3, True, True),
    ("ptr-pipe m64n128w4s4", 64, 128, 4, 4, False, True),
    ("desc-pipe m64n128w4s4", 64, 128, 4, 4, True, True),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=7168)
    p.add_argument("--quick", action="store_true", help="the first variant of each kind only")
    args = p.parse_args()
    dev = "cpu" if INTERPRET else "cuda"
    if INTERPRET:
        args.groups, args.rows, args.n, args.k = 3, 70, 256, 384
    torch.manual_seed(0)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    counts = [args.rows] * args.groups
    if INTERPRET:
        counts = [70, 0, 130]
    t = sum(counts)
    x = torch.randn(t, args.k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(args.groups, args.n, args.k, device=dev, dtype=torch.bfloat16) / args.k**0.5
    qs = [reference.quantize_weight(w[i]) for i in range(args.groups)]
    b = torch.stack([q for q, _ in qs])
    sb = torch.stack([s for _, s in qs])
    offs = torch.tensor(list(itertools.accumulate(counts)), device=dev, dtype=torch.int32)
    if INTERPRET:
        xq, xs = reference.quantize_act(x)
        ref = torch.cat([reference.block_gemm(xq[s:e], xs[s:e], b[i], sb[i]) if e > s else x.new_zeros(0, args.n)
                         for i, (s, e) in enumerate(zip([0] + offs.tolist()[:-1], offs.tolist()))])
        for name, bm, bn, warps, stages, persistent, ws in VARIANTS:
            bm = min(bm, 64)
            y = probe(xq, xs, b, sb, offs, bm, bn, warps, stages, persistent, ws, sms=4)
            err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
            print(f"{name} (bm {bm}): rel err {err:.2e}")
            assert err < 1e-2
        for name, bm, bn, warps, stages, desc, pipe in ONE_TILE:
            bm = min(bm, 64)
            y = one_tile(xq, xs, b, sb, offs, bm, bn, warps, stages, desc, pipe)
            err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
            print(f"{name} (bm {bm}): rel err {err:.2e}")
            assert err < 1e-2
        return
    xq, xs = act_quant(x)
    flop = 2 * t * args.n * args.k
    bm, warps, stages = config_for(t, args.groups)
    base = grouped_gemm(xq, xs, b, sb, offs, block_m=bm, num_warps=warps, num_stages=stages)
    ms = triton.testing.do_bench(lambda: grouped_gemm(xq, xs, b, sb, offs, block_m=bm, num_warps=warps, num_stages=stages), rep=200)
    print(f"{args.groups} x {args.rows} x {args.n} x {args.k}, {torch.cuda.get_device_name()}, triton {triton.__version__}")
    print(f"{'variant':28s} {'TFLOP/s':>8s} {'vs base':>8s} {'max |diff|':>11s}")
    print(f"{'base ' + f'm{bm}w{warps}s{stages}':28s} {flop / ms / 1e9:8.0f} {1.0:8.2f}")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    runs = [(name, lambda c=c: one_tile(xq, xs, b, sb, offs, *c)) for name, *c in ONE_TILE]
    runs += [(name, lambda c=c: probe(xq, xs, b, sb, offs, *c, sms=sms)) for name, *c in VARIANTS]
    for name, fn in runs:
        try:
            y = fn()
            diff = (y.float() - base.float()).abs().max().item()
            ms_v = triton.testing.do_bench(fn, rep=200)
            print(f"{name:28s} {flop / ms_v / 1e9:8.0f} {ms / ms_v:8.2f} {diff:11.3e}", flush=True)
        except Exception as exc:  # a variant the compiler rejects: say so and go on
            print(f"{name:28s} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}", flush=True)


if __name__ == "__main__":
    main()
