"""Probe: how close can an M = 1 block-FP8 GEMV get to HBM bandwidth? (GPU, one process)

Times, per Llama-3-8B decode shape, against the same process's bf16 cuBLAS linear and
fp8fx's gemv at its measured config:
  tma  - the weight tile [BN, 128] loaded through a host-side TMA descriptor (Triton
         tensor descriptor), tl.dot on 16 repeated activation columns, split-K by atomics
  wide - no tensor cores: [BN, BKK] fp8 weight tiles (BKK up to 512 bytes of a row),
         fp32 FMAs against the scaled activation, one reduction at the end
The two probe kernels are timing probes (split-K partials go through fp32 atomics into a
buffer that is not zeroed between timed calls); each is checked once against fp8fx's gemv.
Weights rotate over enough copies to overflow L2; times are CUDA-graph replay medians.

    python scripts/probe_gemv.py [--rep 200] > probe.txt
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fp8fx.kernels.bench import _WeightRotation
from fp8fx.kernels.gemv import gemv

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


@triton.jit
def _tma_kernel(w_desc, x_ptr, sx_ptr, sw_ptr, y_ptr, N, n_kb, KB_PER_SPLIT, stride_swn,
                SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    cols = tl.arange(0, 16)
    kb_start = pid_k * KB_PER_SPLIT
    kb_end = tl.minimum(kb_start + KB_PER_SPLIT, n_kb)
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    sw_row = sw_ptr + (pid_n * BLOCK_N // 128) * stride_swn
    for kb in range(kb_start, kb_end):
        w = w_desc.load([pid_n * BLOCK_N, kb * BLOCK_K])
        xq = tl.load(x_ptr + kb * BLOCK_K + offs_k)
        xq16 = tl.broadcast_to(xq[None, :], (16, BLOCK_K))
        s = tl.load(sx_ptr + kb) * tl.load(sw_row + kb)
        acc += tl.dot(w, tl.trans(xq16)) * s
    y = tl.sum(tl.where(cols[None, :] == 0, acc, 0.0), axis=1)
    if SPLIT:
        tl.atomic_add(y_ptr + offs_n, y, mask=offs_n < N, sem="relaxed")
    else:
        tl.store(y_ptr + offs_n, y, mask=offs_n < N)


@triton.jit
def _wide_kernel(w_ptr, x_ptr, sx_ptr, sw_ptr, y_ptr, N, K, KB_PER_SPLIT, stride_wn, stride_swn,
                 SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_KK)
    rn = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    k_start = pid_k * KB_PER_SPLIT * BLOCK_KK
    k_end = tl.minimum(k_start + KB_PER_SPLIT * BLOCK_KK, K)
    acc = tl.zeros((BLOCK_N, BLOCK_KK), dtype=tl.float32)
    sw_row = sw_ptr + (pid_n * BLOCK_N // 128) * stride_swn
    for k0 in range(k_start, k_end, BLOCK_KK):
        kk = k0 + offs_k
        w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :])
        xs = tl.load(x_ptr + kk).to(tl.float32) * tl.load(sx_ptr + kk // 128) * tl.load(sw_row + kk // 128)
        acc += w.to(tl.float32) * xs[None, :]
    y = tl.sum(acc, axis=1)
    if SPLIT:
        tl.atomic_add(y_ptr + offs_n, y, mask=offs_n < N, sem="relaxed")
    else:
        tl.store(y_ptr + offs_n, y, mask=offs_n < N)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rep", type=int, default=200)
    args = ap.parse_args()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    sms, l2 = props.multi_processor_count, props.L2_cache_size
    print(f"# {props.name}, torch {torch.__version__}, triton {triton.__version__}, {sms} SMs")
    for n, k in SHAPES:
        rot = _WeightRotation(1, n, k, l2)  # bench gemm's rotated sets (bf16 and fp8 weights, codes, scales)
        sets = rot.sets
        for s in sets:
            s["y"] = torch.zeros(n, device=dev, dtype=torch.float32)
        n_kb = k // 128
        fp8_bytes = n * k
        res = {}

        def bench(name, fn, nbytes=fp8_bytes):
            try:
                ms = triton.testing.do_bench_cudagraph(fn, rep=args.rep, return_mode="median")
            except Exception as e:  # a probe variant that does not compile is a result
                print(f"  {name}: failed {type(e).__name__}: {str(e)[:160]}")
                return
            res[name] = (ms * 1e3, nbytes / ms / 1e9)

        bench("bf16 cublas", rot(lambda s: torch.nn.functional.linear(s["x"], s["w"])), 2 * fp8_bytes)
        bench("fp8fx gemv", rot(lambda s: gemv(s["xq"], s["xs"], s["wq"], s["ws"])))
        ref = gemv(sets[0]["xq"], sets[0]["xs"], sets[0]["wq"], sets[0]["ws"]).float()[0]

        for bn in (64, 128):
            for stages in (3, 4, 5):
                for split in (1, 2, 4, 8):
                    tiles = triton.cdiv(n, bn)
                    if tiles * split > 8 * sms or n_kb % split or (split > 1 and tiles * split < sms):
                        continue
                    for s in sets:
                        s[f"d{bn}"] = TensorDescriptor.from_tensor(s["wq"], [bn, 128])

                    def launch(s, bn=bn, stages=stages, split=split, tiles=tiles):
                        _tma_kernel[(tiles, split)](s[f"d{bn}"], s["xq"], s["xs"], s["ws"], s["y"], n, n_kb,
                                                    n_kb // split, s["ws"].stride(0), SPLIT=split > 1,
                                                    BLOCK_N=bn, BLOCK_K=128, num_warps=4, num_stages=stages)

                    s0 = sets[0]
                    s0["y"].zero_()
                    launch(s0)
                    err = (s0["y"] - ref).abs().max().item() / ref.abs().max().item()
                    bench(f"tma n{bn} s{stages} k{split} (err {err:.1e})", rot(launch))
        for bn in (8, 16, 32):
            for bkk in (256, 512):
                for stages in (1, 3):
                    for split in (1, 2, 4, 8):
                        tiles = triton.cdiv(n, bn)
                        per = k // bkk
                        if per % split or tiles * split > 32 * sms or (split > 1 and tiles * split < 2 * sms):
                            continue

                        def launch(s, bn=bn, bkk=bkk, stages=stages, split=split, tiles=tiles, per=per):
                            _wide_kernel[(tiles, split)](s["wq"], s["xq"], s["xs"], s["ws"], s["y"], n, k,
                                                         per // split, k, s["ws"].stride(0), SPLIT=split > 1,
                                                         BLOCK_N=bn, BLOCK_KK=bkk, num_warps=4, num_stages=stages)

                        s0 = sets[0]
                        s0["y"].zero_()
                        launch(s0)
                        err = (s0["y"] - ref).abs().max().item() / ref.abs().max().item()
                        bench(f"wide n{bn} k{bkk} s{stages} k{split} (err {err:.1e})", rot(launch))
        print(f"\n## N={n} K={k} ({fp8_bytes / 1e6:.1f} MB fp8)")
        best = sorted(res.items(), key=lambda kv: kv[1][0])
        for name, (us, gbs) in best[:12] + [kv for kv in best[12:] if kv[0] in ("bf16 cublas", "fp8fx gemv")]:
            print(f"  {name:40s} {us:8.2f} us  {gbs:7.0f} GB/s")


if __name__ == "__main__":
    main()
