"""Host-side helpers for the kernel wrappers: integer arithmetic and a lean launcher.

``triton.cdiv`` and ``triton.next_power_of_2`` are Triton constexpr functions: about 4 us per
call from Python (Triton 3.9, measured), and a GEMM call's wrapper made several. These are the
plain-Python equivalents for host code; kernels keep ``tl.cdiv``. ``Launcher`` skips the JIT's
per-call argument binding for kernels launched from Python on a compiled graph's hot path.
"""

from __future__ import annotations

import os

import torch
import triton

__all__ = ["cdiv", "next_power_of_2", "Launcher"]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0, as triton.next_power_of_2)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


class Launcher:
    """Repeated launches of one ``@triton.jit`` kernel without the JIT's per-call binding.

    ``kernel[grid](...)`` binds every argument, computes the specialization and cache key and
    looks the compiled kernel up: 17 us of host time per launch on an H200 host, against 37 us
    for the whole RMSNorm wrapper around it (``scripts/prefill_host_split.py --micro``), and a
    compiled prefill issues such launches from Python for every RMSNorm. Here the first launch
    of each specialization goes through the JIT (compiling if needed) and keeps the compiled
    kernel; later launches with the same specialization call its launcher directly.

    The key holds everything Triton 3.x specializes a kernel on: each tensor's dtype and
    16-byte alignment, each int's equality to 1, divisibility by 16 and width, bools and
    None, the constexprs and launch options, and the device. Under TRITON_INTERPRET, while
    Triton launch hooks are set (profilers), or when a Triton version's compiled kernel lacks
    the launcher fields used here, every launch goes through the JIT.
    """

    def __init__(self, fn):
        self.fn = fn
        self.names = list(fn.arg_names)
        self.kernels: dict = {}

    @staticmethod
    def _spec(v):
        if isinstance(v, bool) or v is None:
            return v
        if isinstance(v, int):
            return (v == 1, v % 16 == 0, -(1 << 31) <= v < (1 << 31))
        if isinstance(v, float):
            return 0.0
        return (v.dtype, v.data_ptr() % 16 == 0)  # a tensor

    def __call__(self, grid: tuple, args: tuple, constexprs: dict, **options) -> None:
        """Launch ``fn[grid](*args, **constexprs, **options)``; ``args`` are the kernel's
        leading parameters in order, ``constexprs`` the remaining ones by name."""
        if os.environ.get("TRITON_INTERPRET", "0") == "1" or _hooks_set():
            self.fn[grid](*args, **constexprs, **options)
            return
        device = torch.cuda.current_device()
        key = (device, tuple(map(self._spec, args)), tuple(constexprs.items()), tuple(options.items()))
        kernel = self.kernels.get(key)
        if kernel is None:
            kernel = self.fn[grid](*args, **constexprs, **options)
            fields = ("run", "function", "packed_metadata")
            if all(getattr(kernel, f, None) is not None for f in fields) and len(args) + len(constexprs) == len(self.names):
                self.kernels[key] = kernel
            return
        tail = [constexprs[n] for n in self.names[len(args):]]
        grid3 = (*grid, 1, 1)
        kernel.run(grid3[0], grid3[1], grid3[2], torch._C._cuda_getCurrentRawStream(device), kernel.function,
                   kernel.packed_metadata, None, None, None, *args, *tail)


def _hooks_set() -> bool:
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None:
        return True  # an older Triton: no knobs to check, so take the JIT path
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False
