"""Host time of one eager gemv launch, TMA descriptors vs pointer loads (GPU).

    python scripts/host_cost_tma.py
"""

import time

import torch

from fp8fx import reference
from fp8fx.kernels import gemv as gemv_mod
from fp8fx.kernels.gemv import GemvConfig, gemv, gemv_cat


def _per_call_us(fn, n=2000):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main():
    cfg = GemvConfig(128, 4, 3, 8, tma=True)
    ws = [reference.quantize_weight(torch.randn(n, 4096, device="cuda") * 0.05) for n in (4096, 1024, 1024)]
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for tma_eager in (False, True, False, True):
        gemv_mod.TMA_EAGER = tma_eager
        one = _per_call_us(lambda: gemv(x, None, *ws[0], None, torch.bfloat16, config=cfg))
        cat = _per_call_us(lambda: gemv_cat(x, None, [w for w, _ in ws], [s for _, s in ws], None, torch.bfloat16, config=cfg))
        print(f"{'TMA descriptors' if tma_eager else 'pointer loads  '}: gemv {one:6.1f} us/call, gemv_cat (3 weights) {cat:6.1f} us/call")


if __name__ == "__main__":
    main()
