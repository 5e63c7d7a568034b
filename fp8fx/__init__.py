"""fp8fx: DeepSeek-style block-FP8 (W8A8, 128x128 weight blocks, 1x128 activation groups)
inference for PyTorch models, native to torch.compile."""

from fp8fx.api import QuantizeReport, plan_quantization, quantize_
from fp8fx.backend import backend, backend_with
from fp8fx.checkpoint import load_quantized, save_quantized
from fp8fx.config import BlockFP8Config
from fp8fx.explain import explain
from fp8fx.hf import from_pretrained
from fp8fx.tensor import BlockFP8Tensor

__all__ = [
    "BlockFP8Config",
    "BlockFP8Tensor",
    "QuantizeReport",
    "backend",
    "backend_with",
    "explain",
    "from_pretrained",
    "load_quantized",
    "plan_quantization",
    "quantize_",
    "save_quantized",
]
__version__ = "0.1.0"
