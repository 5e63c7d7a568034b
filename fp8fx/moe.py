"""Block-FP8 experts for transformers v5 MoE modules: the "fp8fx" experts implementation.

    tokens [T, H], top_k_index [T, k], top_k_weights [T, k]
      sort the T*k (token, expert) pairs by expert -> x [S, H], offs [E] (device tensors)
      h = fp8fx::grouped_linear(x, gate_up_proj)  -> gate(h) -> fp8fx::grouped_linear(.., down_proj)
      weight by routing, unsort (a gather), sum over k -> [T, H]

No host synchronisation: counts come from histc, offsets from cumsum, and out-of-range
expert ids trip a device-side assert instead of an ``.item()`` check. Up to
UNSORTED_MAX_ROWS (token, expert) pairs (decode) nothing is sorted: fp8fx::expert_linear
reads each row's expert id itself.
quantize_ switches a model's experts to this implementation when it converts them.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fp8fx.tensor import BlockFP8Tensor

__all__ = ["EXPERTS_IMPLEMENTATION", "register_experts_implementation", "use_fp8_experts", "grouped_experts_forward", "sort_by_expert"]

EXPERTS_IMPLEMENTATION = "fp8fx"


def _grouped(x: torch.Tensor, w: BlockFP8Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch.ops.fp8fx.grouped_linear(x, w.qdata, w.scale, offs, w.act_scale, list(w.block_size))


def _assert_ids(ids: torch.Tensor, num_experts: int) -> None:
    torch._assert_async(((ids >= 0) & (ids < num_experts)).all(), f"fp8fx: expert ids must lie in [0, {num_experts})")


def _expert_mlp(self, x, up, row_experts, project):
    """up projection, bias, gate, down projection, bias over rows whose experts are
    ``row_experts``; ``project(x, weight)`` is the grouped or the unsorted block-FP8 GEMM."""
    h = project(x, up)
    if getattr(self, "has_bias", False):
        h = h + (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias)[row_experts]
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    y = project(h, self.down_proj)
    if getattr(self, "has_bias", False):
        y = y + self.down_proj_bias[row_experts]
    return y


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int):
    """expert_ids [*L] int -> (ids_sorted [S], perm [S], offs [E] int32), S = prod(L): the
    (token, expert) pairs in expert order and each expert's cumulative end row. No host sync;
    an id outside [0, num_experts) trips a device-side assert."""
    ids = expert_ids.reshape(-1)
    _assert_ids(ids, num_experts)
    ids_sorted, perm = torch.sort(ids)
    # histc takes floats on CPU; on CUDA ints keep it exact and graph-capturable.
    counts_in = ids_sorted.float() if ids_sorted.device.type == "cpu" else ids_sorted.int()
    counts = torch.histc(counts_in, bins=num_experts, min=0, max=num_experts - 1)
    return ids_sorted, perm, torch.cumsum(counts, dim=0, dtype=torch.int32)


def grouped_experts_forward(self: nn.Module, hidden_states, top_k_index, top_k_weights):
    """transformers experts forward over BlockFP8Tensor weights (see the module docstring)."""
    up = self.gate_up_proj if self.has_gate else self.up_proj
    if not isinstance(up, BlockFP8Tensor) or not isinstance(self.down_proj, BlockFP8Tensor):
        # This module's experts stayed in high precision (excluded): transformers' own path.
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if getattr(self, "has_post_expert_norm", False) or getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError("fp8fx: experts with a post-expert norm or expert parallelism are not supported yet")
    num_experts = up.shape[0]
    k = top_k_index.shape[-1]
    tokens, hidden = hidden_states.shape
    if tuple(top_k_weights.shape) != tuple(top_k_index.shape):
        raise ValueError(
            f"fp8fx: routing weights have shape {tuple(top_k_weights.shape)}, the expert ids {tuple(top_k_index.shape)}; "
            f"they must match ([tokens, top_k])"
        )
    # A static row count only (statically_known_true adds no guard): under dynamic shapes a
    # size test would guard and recompile.
    few = statically_known_true(tokens * k <= UNSORTED_MAX_ROWS)
    if few and up.act_scale is None and self.down_proj.act_scale is None:
        return _unsorted_forward(self, up, hidden_states, top_k_index, top_k_weights)
    ids_sorted, perm, offs = sort_by_expert(top_k_index, num_experts)
    x = hidden_states[perm // k]  # [S, H], grouped by expert
    y = _expert_mlp(self, x, up, ids_sorted, lambda a, w: _grouped(a, w, offs))
    y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1).to(y.dtype)
    # Back to (token, k) order by a gather through the inverse permutation (the same values
    # as the scatter out[perm] = y): on CUDA that index_put took 306 us at 4096 tokens x
    # top-8 x 2048 (H200), a gather of as many rows 49 us.
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return y[inv].view(tokens, k, hidden).sum(dim=1).to(hidden_states.dtype)


# Up to this many (token, expert) rows, when the count is static (eager, or a graph compiled
# for fixed shapes, as CUDA-graph decode is), the experts run unsorted (fp8fx::expert_linear: no
# sort, histogram, gather or scatter launches; each row streams its expert's weights, so an
# expert shared by rows is read once per row). H200, Qwen3-30B-A3B experts: streaming per row
# is the fastest tiling at 1-2 tokens x top-8 (bench moe --only small, block_m 1).
UNSORTED_MAX_ROWS = 16


def _unsorted_forward(self, up, hidden_states, top_k_index, top_k_weights):
    tokens, hidden = hidden_states.shape
    ids = top_k_index.reshape(-1)
    # One check for both projections, in this (traced) code where Inductor fuses it; the op
    # calls skip theirs (check_ids=False).
    _assert_ids(ids, up.shape[0])

    def project(a, w):
        return torch.ops.fp8fx.expert_linear(a, ids, w.qdata, w.scale, None, list(w.block_size), False)

    y = _expert_mlp(self, hidden_states, up, ids, project)
    y = y.view(tokens, -1, hidden) * top_k_weights.unsqueeze(-1).to(y.dtype)
    return y.sum(dim=1).to(hidden_states.dtype)


@functools.cache
def register_experts_implementation() -> bool:
    """Register "fp8fx" with transformers' experts interface (once); False without it."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return False
    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, grouped_experts_forward)
    return True


def use_fp8_experts(model: nn.Module) -> list[str]:
    """Point every transformers experts module whose weights are BlockFP8Tensor at the fp8fx
    implementation. Returns the names of the modules switched."""
    switched = []
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        weight = getattr(module, "gate_up_proj", None)
        if weight is None:
            weight = getattr(module, "up_proj", None)
        if not isinstance(weight, BlockFP8Tensor) or weight.dim() != 3 or config is None:
            continue
        if not hasattr(config, "_experts_implementation") or not register_experts_implementation():
            continue
        if config._experts_implementation != EXPERTS_IMPLEMENTATION:
            config._experts_implementation = EXPERTS_IMPLEMENTATION
        switched.append(name)
    return switched
