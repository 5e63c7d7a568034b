"""Host-side integer helpers for the kernel wrappers.

``triton.cdiv`` and ``triton.next_power_of_2`` are Triton constexpr functions: about 4 us per
call from Python (Triton 3.9, measured), and a GEMM call's wrapper made several. These are the
plain-Python equivalents for host code; kernels keep ``tl.cdiv``.
"""

from __future__ import annotations

__all__ = ["cdiv", "next_power_of_2"]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0, as triton.next_power_of_2)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()
