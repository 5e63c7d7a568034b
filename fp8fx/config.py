"""BlockFP8Config: the one configuration object of fp8fx's block-FP8 workflow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["BlockFP8Config", "SUPPORTED_BLOCK_SIZES", "KERNELS"]

# The layout of DeepSeek-V3 and transformers' FineGrainedFP8 checkpoints; the kernels are
# written for it (one weight block = one activation group = one K step of the GEMM).
SUPPORTED_BLOCK_SIZES = ((128, 128),)
KERNELS = ("auto", "triton", "cublas", "deepgemm")


@dataclass(frozen=True)
class BlockFP8Config:
    """How to quantize a model to block FP8.

    Attributes:
        block_size: weight block (out_features, in_features); only (128, 128) is supported.
        scale_fmt: "float32" scales, or "ue8m0" (powers of two, stored as float8_e8m0fnu;
            activation scales are then rounded up to powers of two too).
        activation_scheme: "dynamic" (per token, per 128-group, computed at run time) or
            "static" (one calibrated scale per tensor, read from a checkpoint).
        modules_to_not_convert: module-name patterns kept in high precision. A pattern
            matches a module whose qualified name equals it, ends with "." + pattern, or
            matches it as an fnmatch glob ("model.layers.0.*").
        kernel: GEMM backend preference on CUDA: "auto" picks per shape from measurements.
    """

    block_size: tuple[int, int] = (128, 128)
    scale_fmt: Literal["float32", "ue8m0"] = "float32"
    activation_scheme: Literal["dynamic", "static"] = "dynamic"
    modules_to_not_convert: tuple[str, ...] = ()
    kernel: Literal["auto", "triton", "cublas", "deepgemm"] = "auto"

    def __post_init__(self):
        block = tuple(self.block_size)
        if block not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"BlockFP8Config: block_size {block} is not supported; supported: {SUPPORTED_BLOCK_SIZES}")
        object.__setattr__(self, "block_size", block)
        if self.scale_fmt not in ("float32", "ue8m0"):
            raise ValueError(f"BlockFP8Config: scale_fmt must be 'float32' or 'ue8m0', got {self.scale_fmt!r}")
        if self.activation_scheme not in ("dynamic", "static"):
            raise ValueError(
                f"BlockFP8Config: activation_scheme must be 'dynamic' or 'static', got {self.activation_scheme!r}"
            )
        if self.kernel not in KERNELS:
            raise ValueError(f"BlockFP8Config: kernel must be one of {KERNELS}, got {self.kernel!r}")
        if isinstance(self.modules_to_not_convert, str):
            raise TypeError("BlockFP8Config: modules_to_not_convert is a tuple of patterns, not a string")
        object.__setattr__(self, "modules_to_not_convert", tuple(self.modules_to_not_convert))

    def excludes(self, module_name: str) -> str | None:
        """The first pattern that keeps ``module_name`` in high precision, or None."""
        from fnmatch import fnmatchcase

        for pattern in self.modules_to_not_convert:
            if module_name == pattern or module_name.endswith("." + pattern) or fnmatchcase(module_name, pattern):
                return pattern
        return None
