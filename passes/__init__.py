"""fp8fx.passes: compile-time FX/Inductor passes (installed from the repository's passes/).

    linear.py    fp8fx.linear -> aten act-quant (fused by Inductor) + fp8fx.block_gemm
    lowering.py  Inductor lowering of fp8fx.block_gemm (extern kernel choice)
    norm_quant.py  RMSNorm (+ residual add) feeding an act_quant -> fp8fx.rms_norm_quant
    prologue.py  decode: RMSNorm (+ residual add) or silu(g) * u feeding a linear_cat -> one
                 gemv launch with the producer in its prologue
    quant_kernel.py  CUDA: the act_quant of silu(g) * u or of the attention output, and the
                 fused RMSNorms -> fp8fx's Triton kernels as user-defined kernels Inductor launches
    moe.py       (Dynamo graph, from the backend's weight freeze) MoE expert GEMMs on bf16
                 3-D expert weights -> fp8fx.grouped_linear on frozen fp8 constants
    topk.py      aten.topk over short rows (MoE routing) -> fp8fx.topk (one launch on CUDA)

``PostGradPass`` is what ``fp8fx.backend`` installs as Inductor's
``post_grad_custom_post_pass``; its ``uuid()`` hashes these sources and the config, so the
FX graph cache is invalidated whenever either changes.
"""

from __future__ import annotations

import glob
import os
from typing import Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

__all__ = ["PostGradPass"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def _sources() -> tuple[str, ...]:
    # The passes, the op definitions they rewrite, the dispatch table that decides the
    # decode grouping and the lowering's choice, the gemv whose limits decide the prologue
    # rewrite (gemv.prologue_fuses) and the quant and norm kernels whose source and launch
    # config passes/quant_kernel.py puts in the graph: a change to any changes the compiled
    # graph.
    import fp8fx.kernels.act_quant
    import fp8fx.kernels.dispatch
    import fp8fx.kernels.gemv
    import fp8fx.kernels.norm_quant
    import fp8fx.ops
    import fp8fx.reference

    return tuple(sorted(glob.glob(os.path.join(_HERE, "*.py")))) + (
        fp8fx.ops.__file__, fp8fx.reference.__file__, fp8fx.kernels.dispatch.__file__, fp8fx.kernels.gemv.__file__,
        fp8fx.kernels.act_quant.__file__, fp8fx.kernels.norm_quant.__file__)


class PostGradPass(CustomGraphPass):
    """fp8fx's post-grad pass: splits every fp8fx.linear into fusable aten act-quant + block_gemm
    (and gives short-row top-k its own kernel).

    ``config`` (a BlockFP8Config or None) enters the uuid only: the rewrite itself reads
    everything it needs (scale format, static scales) from the graph. ``quant_in_gemv``:
    decode GEMMs on the gemv route quantize their input in the kernel (passes/linear.py).
    ``fused_topk``: top-k over short rows (MoE routing) becomes fp8fx.topk (passes/topk.py).
    ``fused_norm``: an RMSNorm feeding a quantization becomes fp8fx.rms_norm_quant
    (passes/norm_quant.py): None (the default) on CUDA tensors only, True on every device
    (CPU: the reference), False never. ``gemv_prologue`` (same values): a decode RMSNorm or
    SwiGLU product feeding a linear_cat moves into the gemv's prologue (passes/prologue.py).
    ``quant_kernels``: on CUDA, the quantization of a SwiGLU product or of the attention
    output, and the fused RMSNorms, run fp8fx's Triton kernels, which Inductor launches
    (passes/quant_kernel.py). ``packing`` (backend.packing_signature: which weight inputs
    share a buffer) enters the uuid only, like ``config``: the rewrite reads it from the
    graph's fake tensors.
    """

    def __init__(self, config: Optional[object] = None, quant_in_gemv: bool = True, fused_topk: bool = True,
                 fused_norm: Optional[bool] = None, gemv_prologue: Optional[bool] = None, quant_kernels: bool = True,
                 packing: str = ""):
        self.config = config
        self.quant_in_gemv = quant_in_gemv
        self.fused_topk = fused_topk
        self.fused_norm = fused_norm
        self.gemv_prologue = gemv_prologue
        self.quant_kernels = quant_kernels
        self.packing = packing

    def __call__(self, graph: torch.fx.Graph) -> None:
        from fp8fx.passes import linear, topk

        devices = {None: ("cuda",), True: ("cuda", "cpu"), False: ()}
        linear.rewrite(graph, self.quant_in_gemv, devices[self.fused_norm], devices[self.gemv_prologue],
                       self.quant_kernels)
        if self.fused_topk:
            topk.rewrite(graph)

    def uuid(self) -> bytes:
        from fp8fx.kernels import dispatch

        # The kernel preference (FP8FX_KERNEL, set_preference) changes the grouping too.
        extra = f"{self.config!r} {self.quant_in_gemv} {self.fused_topk} {self.fused_norm} {self.gemv_prologue} "
        extra += f"{self.quant_kernels} {self.packing} "
        extra += dispatch.get_preference()
        return get_hash_for_files(_sources(), extra=extra)
