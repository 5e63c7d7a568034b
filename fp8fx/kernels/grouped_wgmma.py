"""Grouped (MoE) block-FP8 GEMM, contiguous layout, as a warp-specialized Hopper kernel (Gluon).

The same problem as grouped_gemm.grouped_gemm (that module's docstring has the legend):

    y[T, N] = for each expert e, rows offs[e-1]:offs[e]:  dequant(a) @ dequant(b[e]).T

The Triton kernel tops out near 800 TFLOP/s on large groups: each K block's MMA waits for
the previous block's promotion (``acc += dot * scale``), and Triton 3.6 neither overlaps the
two nor splits the tile across independent warpgroups (kernels/NOTES.md, eighth session).
This kernel writes the schedule out in Gluon, Triton's explicit-layout dialect:

- a persistent grid (``balanced_programs``): program p takes output tiles p, p + P, ... of
  128 x BLOCK_N (BLOCK_N 256 where N allows, ``block_n_for``) in the Triton kernel's GROUP_M
  order, each tile's (expert, first row) derived on the device from offs (no host
  synchronisation);
- a loader partition (one warp) streams a's two 64-row halves and the expert's weight tile
  through a STAGES-deep shared-memory ring with TMA, signalling ``ready`` mbarriers; it runs
  ahead across tiles, so the next tile's loads overlap this tile's epilogue;
- two math partitions (one warpgroup each, 64 rows of the tile each) run, per K block and
  128-column block, a fresh asynchronous wgmma, wait for it, and promote into their fp32
  accumulator with sa * sb (one 64-register MMA result live at a time); the stage is
  released (``empty``) after the last block. The two warpgroups are not synchronised with
  each other, so one's promotion runs while the other's MMA occupies the tensor cores;
- the epilogue stores bf16/fp16/fp32 rows with masks (a tile's rows past its expert's end
  belong to the next tile).

``grouped_gemm_masked_wgmma`` runs the masked layout (grouped_masked.py) through the same
kernel: expert e's rows are rows e * M + [0, M) of one a[E * M, K]; the device-side count
bounds the computed rows and the capacity the stored ones (zeros past the count).

The accumulation order is the Triton kernel's (fp8 MMAs of 128 K values, promoted in fp32
per K block), so the two give the same bits. Measurements and the variants tried:
kernels/NOTES.md, fourteenth session.

Rows of a tile past its expert's end are read (TMA zero-fills past T) and computed but
never stored; the tail past offs[-1] is zeroed by its own tiles, as in the Triton kernel.

``available()`` says whether this Triton has Gluon's Hopper API and the device is SM90;
``supports()`` whether a problem fits (TMA needs 16-byte aligned rows and base pointers).
"""

from __future__ import annotations

import functools
import warnings

import torch
from triton.compiler.errors import CompilationError

from fp8fx import reference
from fp8fx.kernels.host import cdiv, next_power_of_2

__all__ = [
    "Unavailable",
    "available",
    "balanced_programs",
    "block_n_for",
    "grouped_gemm_masked_wgmma",
    "grouped_gemm_wgmma",
    "run_contiguous",
    "supports",
]

BLOCK_M = 128  # two 64-row warpgroups
BLOCK_K = 128

try:  # Gluon's Hopper API; without it the Triton kernel serves every call
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # Triton 3.6 names the TMA load async_copy_global_to_shared; later releases async_load.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _IMPORT_ERROR: Exception | None = None
except Exception as exc:  # noqa: BLE001 - any failure means "not available", with the reason kept
    _IMPORT_ERROR = exc


class Unavailable(RuntimeError):
    """This Triton could not compile the kernel; the caller falls back to the Triton kernel."""


_DISABLED: str | None = None  # why the kernel is off in this process (its compile failed)


@functools.lru_cache(maxsize=None)
def _triton_ok() -> bool:
    """The kernel is written against Triton 3.6's Gluon (warp_specialize taking a list of
    (function, args) pairs); 3.5 and older spell the API differently."""
    import triton

    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 6)


def available(device: torch.device | None = None) -> bool:
    """Gluon's Hopper API imports, the Triton is 3.6 or newer, the kernel has not failed to
    compile in this process, and ``device`` (default: the current CUDA device) is SM90."""
    if _IMPORT_ERROR is not None or _DISABLED is not None or (device is not None and device.type != "cuda"):
        return False
    return _is_sm90(device.index if device is not None else None)


@functools.lru_cache(maxsize=None)
def _is_sm90(index: int | None) -> bool:
    """Cached: a grouped GEMM asks on every call (None: the current device at the first ask)."""
    if not torch.cuda.is_available() or not _triton_ok():
        return False
    return torch.cuda.get_device_capability(index) == (9, 0)


def supports(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether (a[T, K], b[E, N, K]) can take this kernel: CUDA SM90, fp8 e4m3, K contiguous,
    16-byte aligned bases and row strides (TMA), b's experts back to back, and an output
    dtype the epilogue writes."""
    if a.dim() != 2 or b.dim() != 3 or not a.is_cuda or not available(a.device):
        return False
    if a.dtype != reference.FP8_DTYPE or b.dtype != reference.FP8_DTYPE:
        return False
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if a.stride(1) != 1 or b.stride(2) != 1 or b.stride(0) != b.shape[1] * b.stride(1):
        return False
    return (
        a.data_ptr() % 16 == 0
        and b.data_ptr() % 16 == 0
        and a.stride(0) % 16 == 0
        and b.stride(1) % 16 == 0
        and a.shape[1] % 16 == 0
    )


if _IMPORT_ERROR is None:

    _BM = gl.constexpr(BLOCK_M)
    _BK = gl.constexpr(BLOCK_K)

    @gluon.jit
    def _add(x, y):
        return x + y

    @gluon.jit
    def _expert_tile(offs_ptr, tile, T, E, E_POW2: gl.constexpr):
        """grouped_gemm.expert_tile for 128-row tiles: (g, row0, row_end) of row tile ``tile``;
        g == E is the tail past offs[E-1], g > E a tile past the last one."""
        lay: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
        e_ids = gl.arange(0, E_POW2, layout=lay)
        ends = gl.load(offs_ptr + e_ids, mask=e_ids < E, other=0)
        ends = gl.where(e_ids == E, T, ends)
        starts = gl.load(offs_ptr + e_ids - 1, mask=(e_ids > 0) & (e_ids <= E), other=0)
        starts = gl.where(e_ids == E, gl.load(offs_ptr + E - 1), starts)
        tiles = gl.where(e_ids <= E, (gl.maximum(ends - starts, 0) + _BM - 1) // _BM, 0)
        tile_end = gl.associative_scan(tiles, 0, _add)
        g = gl.sum((tile_end <= tile).to(gl.int32), 0)
        pick = e_ids == g
        first_tile = gl.sum(gl.where(pick, tile_end - tiles, 0), 0)
        row0 = gl.sum(gl.where(pick, starts, 0), 0) + (tile - first_tile) * _BM
        row_end = gl.sum(gl.where(pick, ends, 0), 0)
        return g, row0, row_end

    @gluon.jit
    def _tile(tile_id, offs_ptr, T, N, E, row_tiles, E_POW2: gl.constexpr, BLOCK_N: gl.constexpr,
              GROUP_M: gl.constexpr, MASKED: gl.constexpr):
        """(g, row0, row_end, store_end, n0) of output tile ``tile_id`` in the Triton kernel's
        order: GROUP_M row tiles share each sweep over the columns (their a rows are read from
        DRAM once and each expert's weight tile is reused from L2). Rows row0 + [0, 128) below
        row_end are computed, those below store_end stored (zeros from row_end on). Contiguous:
        the rows of expert g < E (store_end = row_end; g == E the tail, zeros; g > E past the
        last tile). MASKED (T is the capacity M, offs the counts): expert g's rows are g * M +
        [0, M), the first min(max(count, 0), M) of them valid."""
        tiles_n = (N + BLOCK_N - 1) // BLOCK_N
        group = GROUP_M * tiles_n
        first_m = (tile_id // group) * GROUP_M
        rows_in_group = gl.minimum(row_tiles - first_m, GROUP_M)
        pid_m = first_m + (tile_id % group) % rows_in_group
        pid_n = (tile_id % group) // rows_in_group
        if MASKED:
            tiles_e = (T + _BM - 1) // _BM
            g = pid_m // tiles_e
            base = g * T
            row0 = base + (pid_m % tiles_e) * _BM
            row_end = base + gl.minimum(gl.maximum(gl.load(offs_ptr + g), 0), T)
            store_end = base + T
        else:
            g, row0, row_end = _expert_tile(offs_ptr, pid_m, T, E, E_POW2)
            store_end = row_end
        return g, row0, row_end, store_end, pid_n * BLOCK_N

    @gluon.jit
    def _load_partition(a_desc, b_desc, a_bufs, b_bufs, ready, empty, offs_ptr, T, N, K, E, row_tiles,
                        E_POW2: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
                        STAGES: gl.constexpr, MASKED: gl.constexpr):
        """One warp: for each of this CTA's tiles, streams K block kb of a's two 64-row halves
        and of the weight tile into the next ring stage once both math warpgroups released it.
        Runs ahead across tiles, so the next tile's loads overlap this tile's epilogue."""
        nbytes: gl.constexpr = 2 * a_desc.block_type.nbytes + b_desc.block_type.nbytes
        n_kb = (K + _BK - 1) // _BK
        total = row_tiles * ((N + BLOCK_N - 1) // BLOCK_N)
        it = 0  # K blocks issued so far: ring stage it % STAGES, phase (it // STAGES) & 1
        for tile_id in range(gl.program_id(0), total, gl.num_programs(0)):
            g, row0, row_end, store_end, n0 = _tile(tile_id, offs_ptr, T, N, E, row_tiles, E_POW2, BLOCK_N,
                                                    GROUP_M, MASKED)
            if (g < E) & (row0 < row_end):
                b_row0 = g * N + n0
                for kb in range(n_kb):
                    s = it % STAGES
                    mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)  # the first round passes
                    bar = ready.index(s)
                    mbarrier.expect(bar, nbytes)
                    k = kb * _BK
                    _tma_load(a_desc, [row0, k], bar, a_bufs.index(2 * s))
                    _tma_load(a_desc, [row0 + _BM // 2, k], bar, a_bufs.index(2 * s + 1))
                    _tma_load(b_desc, [b_row0, k], bar, b_bufs.index(s))
                    it += 1

    @gluon.jit
    def _weight_scale(ptr, ok, B_SCALE_E8M0: gl.constexpr):
        if B_SCALE_E8M0:  # 2**(e - 127) from the biased exponent e, as an fp32 bit pattern
            v = (gl.load(ptr, mask=ok, other=127).to(gl.int32) << 23).to(gl.float32, bitcast=True)
        else:
            v = gl.load(ptr, mask=ok, other=0.0)
        return v

    @gluon.jit
    def _store_rows(c_ptr, acc, row0, row_end, store_end, col0, N, stride_cm, HM: gl.constexpr,
                    MASKED: gl.constexpr):
        """acc [HM, 128] fp32 -> c rows row0 + [0, HM) below store_end (zeros from row_end on
        when MASKED: padding rows may hold anything, NaN included), columns col0 + [0, 128)
        below N."""
        out_l: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        out = gl.convert_layout(acc.to(c_ptr.dtype.element_ty), out_l)
        rows = row0 + gl.arange(0, HM, layout=gl.SliceLayout(1, out_l))
        cols = col0 + gl.arange(0, 128, layout=gl.SliceLayout(0, out_l))
        if MASKED:
            out = gl.where(gl.expand_dims(rows < row_end, 1), out, 0.0)
        ptrs = c_ptr + gl.expand_dims(rows.to(gl.int64) * stride_cm, 1) + gl.expand_dims(cols, 0)
        gl.store(ptrs, out, mask=gl.expand_dims(rows < store_end, 1) & gl.expand_dims(cols < N, 0))

    @gluon.jit
    def _math_partition(a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptr, c_ptr, offs_ptr, T, N, K, E, row_tiles,
                        stride_sam, stride_sak, stride_sbe, stride_sbn, stride_sbk, stride_cm,
                        HALF: gl.constexpr, B_SCALE_E8M0: gl.constexpr, E_POW2: gl.constexpr,
                        BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                        MASKED: gl.constexpr):
        """One warpgroup: rows 64 * HALF + [0, 64) of each of this CTA's tiles, all BLOCK_N columns,
        as BLOCK_N // 128 column blocks of one weight scale each (an fp32 accumulator of 64
        registers per block, and one 64-register MMA result live at a time)."""
        HM: gl.constexpr = _BM // 2
        NSUB: gl.constexpr = BLOCK_N // 128
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, 128, 32])
        n_kb = (K + _BK - 1) // _BK
        total = row_tiles * ((N + BLOCK_N - 1) // BLOCK_N)
        fresh = gl.zeros([HM, 128], gl.float32, mma)
        it = 0
        for tile_id in range(gl.program_id(0), total, gl.num_programs(0)):
            g, row0, row_end, store_end, n0 = _tile(tile_id, offs_ptr, T, N, E, row_tiles, E_POW2, BLOCK_N,
                                                    GROUP_M, MASKED)
            if g <= E:
                acc0 = gl.zeros([HM, 128], gl.float32, mma)
                acc1 = gl.zeros([HM, 128], gl.float32, mma)
                if (g < E) & (row0 < row_end):
                    rows = row0 + HALF * HM + gl.arange(0, HM, layout=gl.SliceLayout(1, mma))
                    sa_ptrs = sa_ptr + gl.where(rows < row_end, rows, row0).to(gl.int64) * stride_sam
                    sb_ptrs = sb_ptr + g * stride_sbe + (n0 // 128) * stride_sbn
                    has1 = n0 + 128 < N
                    for kb in range(n_kb):
                        s = it % STAGES
                        sa = gl.load(sa_ptrs + kb * stride_sak)  # issued before the wait hides its latency
                        sb0 = _weight_scale(sb_ptrs + kb * stride_sbk, True, B_SCALE_E8M0)
                        mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                        a_s = a_bufs.index(2 * s + HALF)
                        b_s = b_bufs.index(s)
                        if NSUB == 1:
                            part = warpgroup_mma(a_s, b_s.permute((1, 0)), fresh, use_acc=False, is_async=True)
                            part = warpgroup_mma_wait(num_outstanding=0, deps=(part,))
                            mbarrier.arrive(empty.index(s), count=1)
                            acc0 += part * gl.expand_dims(sa * sb0, 1)
                        else:
                            sb1 = _weight_scale(sb_ptrs + stride_sbn + kb * stride_sbk, has1, B_SCALE_E8M0)
                            part = warpgroup_mma(a_s, b_s.slice(0, 128).permute((1, 0)), fresh,
                                                 use_acc=False, is_async=True)
                            part = warpgroup_mma_wait(num_outstanding=0, deps=(part,))
                            acc0 += part * gl.expand_dims(sa * sb0, 1)
                            part = warpgroup_mma(a_s, b_s.slice(128, 128).permute((1, 0)), fresh,
                                                 use_acc=False, is_async=True)
                            part = warpgroup_mma_wait(num_outstanding=0, deps=(part,))
                            mbarrier.arrive(empty.index(s), count=1)
                            acc1 += part * gl.expand_dims(sa * sb1, 1)
                        it += 1
                # no rows to compute (the contiguous tail, a masked expert's padding): zeros stored
                _store_rows(c_ptr, acc0, row0 + HALF * HM, row_end, store_end, n0, N, stride_cm, HM, MASKED)
                if NSUB == 2:
                    _store_rows(c_ptr, acc1, row0 + HALF * HM, row_end, store_end, n0 + 128, N, stride_cm, HM,
                                MASKED)

    @gluon.jit
    def _grouped_wgmma_kernel(
        a_desc, b_desc, sa_ptr, sb_ptr, c_ptr, offs_ptr,
        T, N, K, E, row_tiles,
        stride_sam, stride_sak, stride_sbe, stride_sbn, stride_sbk, stride_cm,
        B_SCALE_E8M0: gl.constexpr, E_POW2: gl.constexpr, BLOCK_N: gl.constexpr,
        GROUP_M: gl.constexpr, STAGES: gl.constexpr, MATH_REGS: gl.constexpr, MASKED: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        # Persistent: program p takes tiles p, p + P, ... (P programs, at most one per SM).
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [2 * STAGES] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # one arrival per math warpgroup

        gl.warp_specialize([
            (_math_partition, (a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptr, c_ptr, offs_ptr, T, N, K, E, row_tiles,
                               stride_sam, stride_sak, stride_sbe, stride_sbn, stride_sbk, stride_cm,
                               0, B_SCALE_E8M0, E_POW2, BLOCK_N, GROUP_M, STAGES, MASKED)),
            (_math_partition, (a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptr, c_ptr, offs_ptr, T, N, K, E, row_tiles,
                               stride_sam, stride_sak, stride_sbe, stride_sbn, stride_sbk, stride_cm,
                               1, B_SCALE_E8M0, E_POW2, BLOCK_N, GROUP_M, STAGES, MASKED)),
            (_load_partition, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, offs_ptr, T, N, K, E, row_tiles,
                               E_POW2, BLOCK_N, GROUP_M, STAGES, MASKED)),
        ], [4, 1], [MATH_REGS, 40])


@functools.lru_cache(maxsize=None)
def _layouts(block_n: int):
    """The shared-memory layouts of a's and the weight's TMA tiles (built once: building them
    is a third of the launch's host time)."""
    return (gl.NVMMASharedLayout.get_default_for([BLOCK_M // 2, BLOCK_K], gl.float8e4nv),
            gl.NVMMASharedLayout.get_default_for([block_n, BLOCK_K], gl.float8e4nv))


def _descriptors(a: torch.Tensor, b: torch.Tensor, block_n: int):
    e, n, k = b.shape
    a_layout, b_layout = _layouts(block_n)
    a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), [BLOCK_M // 2, BLOCK_K], a_layout)
    b_desc = TensorDescriptor(b, [e * n, k], [b.stride(1), 1], [block_n, BLOCK_K], b_layout)
    return a_desc, b_desc


def block_n_for(n: int) -> int:
    """128 x 256 tiles (two weight-scale column blocks per warpgroup) when N fills them, else
    128 x 128. On the H200 at 4 x 8192 x 4096 x 7168: 1004-1015 TFLOP/s against 936-964
    (scripts/probe_gluon_grouped.py; kernels/NOTES.md)."""
    return 256 if n % 256 == 0 else 128


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def _reason(exc: BaseException) -> str:
    """The innermost cause of a Triton compile error, in one line (the outer errors carry the
    caller's source excerpt)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = (getattr(exc, "error_message", None) or str(exc) or repr(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def balanced_programs(rows: int, n: int, block_n: int, sms: int) -> int:
    """Persistent programs for about cdiv(rows, 128) x cdiv(n, block_n) tiles (the tiles with
    experts aligned to 128 rows; each unaligned expert adds at most one row of tiles): as
    few as finish them in the same number of rounds as one program per SM. At 4 x 8192 rows
    x 4096 (4096 tiles of 128 x 256, 132 SMs) that is 128 programs of 32 tiles instead of
    132 of 31 or 32: 1007 against 991 TFLOP/s in graph replays on the H200 (the last round
    takes as long either way, and the busy rounds run on four fewer SMs' power)."""
    tiles = max(cdiv(rows, BLOCK_M) * cdiv(n, block_n), 1)
    return cdiv(tiles, cdiv(tiles, sms))


def grouped_gemm_wgmma(
    a: torch.Tensor,
    sa: torch.Tensor,
    b: torch.Tensor,
    sb: torch.Tensor,
    offs: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block_n: int = 128,
    stages: int | None = None,
    group_m: int = 8,
    math_regs: int = 232,
    maxnreg: int | None = None,
    programs: int | None = None,
) -> torch.Tensor:
    """a[T, K] fp8, sa[T, nK] fp32, b[E, N, K] fp8, sb[E, nN, nK] fp32/e8m0, offs[E] -> y[T, N].
    Checks the operands' shapes, then the device and layout (``supports``), with an error
    that says what was wrong; ``run_contiguous`` is the same without the checks."""
    if a.dim() != 2 or b.dim() != 3:
        raise ValueError(f"fp8fx grouped_gemm_wgmma: expected a[T, K] and b[E, N, K], got {tuple(a.shape)}, {tuple(b.shape)}")
    t, k = a.shape
    e, n, _ = b.shape
    if b.shape[2] != k:
        raise ValueError(f"fp8fx grouped_gemm_wgmma: a and b must share K, got {k} and {b.shape[2]}")
    if block_n not in (128, 256):
        raise ValueError(f"fp8fx grouped_gemm_wgmma: block_n must be 128 or 256, got {block_n}")
    if stages is not None and not 2 <= stages <= (4 if block_n == 256 else 5):
        raise ValueError(f"fp8fx grouped_gemm_wgmma: {stages} stages of 128 x {block_n} tiles do not fit shared memory")
    if tuple(sa.shape) != (t, cdiv(k, BLOCK_K)) or sa.dtype != torch.float32:
        raise ValueError(
            f"fp8fx grouped_gemm_wgmma: activation scales must be fp32 ({t}, {cdiv(k, BLOCK_K)}), got {sa.dtype} {tuple(sa.shape)}"
        )
    if tuple(offs.shape) != (e,):
        raise ValueError(f"fp8fx grouped_gemm_wgmma: offs must have shape ({e},), got {tuple(offs.shape)}")
    if tuple(sb.shape) != (e, cdiv(n, 128), cdiv(k, BLOCK_K)):
        raise ValueError(
            f"fp8fx grouped_gemm_wgmma: weight scales must be one per 128 x 128 block, ({e}, {cdiv(n, 128)}, "
            f"{cdiv(k, BLOCK_K)}), got {tuple(sb.shape)}"
        )
    if not supports(a, b, out_dtype):
        raise ValueError(
            "fp8fx grouped_gemm_wgmma: needs SM90 CUDA fp8 e4m3 a[T, K] and b[E, N, K] with K contiguous, "
            f"16-byte aligned rows and a bf16/fp16/fp32 output; got a {a.dtype} {tuple(a.shape)} "
            f"stride {a.stride()}, b {b.dtype} {tuple(b.shape)} stride {b.stride()}, out {out_dtype}"
        )
    return run_contiguous(a, sa, b, sb, offs, out_dtype, block_n, stages, group_m, math_regs, maxnreg, programs)


def run_contiguous(a, sa, b, sb, offs, out_dtype, block_n, stages=None, group_m=8, math_regs=232, maxnreg=None,
                   programs=None) -> torch.Tensor:
    """grouped_gemm_wgmma without its checks, for a caller that made them (grouped_linear:
    fp8fx::grouped_linear checked the weight and its scales, act_quant made a and sa, and it
    asked ``supports``). sa may have any strides; column-major (act_quant's ``col_major``, as
    grouped_linear asks) lets a warpgroup read 64 rows' scales of a K block as one run."""
    t, k = a.shape
    e, n, _ = b.shape
    out = torch.empty(t, n, dtype=out_dtype, device=a.device)
    if t == 0 or n == 0:
        return out
    from fp8fx.kernels.grouped_gemm import max_row_tiles

    _launch(a, sa, b, sb, offs.to(torch.int32), out, t, max_row_tiles(t, e, BLOCK_M), block_n, stages,
            group_m, math_regs, maxnreg, programs, masked=False)
    return out


def grouped_gemm_masked_wgmma(
    a: torch.Tensor,
    sa: torch.Tensor,
    b: torch.Tensor,
    sb: torch.Tensor,
    masked_m: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    programs: int | None = None,
) -> torch.Tensor:
    """The masked layout (grouped_masked.py's legend) on this kernel: a[E, M, K] fp8, sa[E, M,
    nK] fp32 (any strides), b[E, N, K], sb[E, nN, nK], masked_m[E] (clamped to [0, M] on the
    device) -> y[E, M, N], rows past masked_m[e] zero. Expert e's rows are rows e * M + [0, M)
    of a[E * M, K]; a tile past an expert's count stores its zeros without loading; padding
    rows inside a tile are computed (whatever they hold) and stored as zeros. 128 x 128 tiles:
    at 256 columns the masked epilogue's extra registers made ptxas spill in the K loop."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(
            f"fp8fx grouped_gemm_masked_wgmma: expected a[E, M, K] and b[E, N, K], got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    e, m, k = a.shape
    n = b.shape[1]
    if tuple(sa.shape) != (e, m, cdiv(k, BLOCK_K)) or sa.dtype != torch.float32:
        raise ValueError(
            f"fp8fx grouped_gemm_masked_wgmma: activation scales must be fp32 {(e, m, cdiv(k, BLOCK_K))}, "
            f"got {sa.dtype} {tuple(sa.shape)}"
        )
    if tuple(sb.shape) != (e, cdiv(n, 128), cdiv(k, BLOCK_K)):
        raise ValueError(
            f"fp8fx grouped_gemm_masked_wgmma: weight scales must be one per 128 x 128 block, "
            f"{(e, cdiv(n, 128), cdiv(k, BLOCK_K))}, got {tuple(sb.shape)}"
        )
    if tuple(masked_m.shape) != (e,) or masked_m.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"fp8fx grouped_gemm_masked_wgmma: masked_m must be int32/int64 of shape ({e},), "
            f"got {masked_m.dtype} {tuple(masked_m.shape)}"
        )
    a2 = a.reshape(e * m, k)
    if not supports(a2, b, out_dtype):
        raise ValueError(
            "fp8fx grouped_gemm_masked_wgmma: needs SM90 CUDA fp8 e4m3 a[E, M, K] (rows back to back) and "
            f"b[E, N, K] with K contiguous and 16-byte aligned rows; got a {a.dtype} {tuple(a.shape)} stride "
            f"{a.stride()}, b {b.dtype} {tuple(b.shape)} stride {b.stride()}, out {out_dtype}"
        )
    out = torch.empty(e, m, n, dtype=out_dtype, device=a.device)
    if out.numel() == 0:
        return out
    _launch(a2, sa.reshape(e * m, -1), b, sb, masked_m.to(torch.int32), out.view(e * m, n), m, e * cdiv(m, BLOCK_M),
            128, None, 8, 232, None, programs, masked=True)
    return out


def _launch(a, sa, b, sb, counts, out, t_arg, row_tiles, block_n, stages, group_m, math_regs, maxnreg, programs,
            masked):
    """One launch over a[rows, K] and out[rows, N]: ``t_arg`` is T (contiguous; counts = the
    cumulative ends) or the capacity M (masked; counts = the per-expert counts)."""
    e, n, k = b.shape
    stages = stages or (3 if block_n == 256 else 4)  # at 256 columns 3 ran as fast as 4 (H200)
    e8m0 = sb.dtype == reference.E8M0_DTYPE
    sb_t = sb.view(torch.uint8) if e8m0 else sb.float()
    a_desc, b_desc = _descriptors(a, b, block_n)
    grid = (min(row_tiles * cdiv(n, block_n), programs or balanced_programs(a.shape[0], n, block_n, _sm_count(a.device))),)
    launch = {} if maxnreg is None else {"maxnreg": maxnreg}
    try:
        _grouped_wgmma_kernel[grid](
            a_desc, b_desc, sa, sb_t, out, counts,
            t_arg, n, k, e, row_tiles,
            sa.stride(0), sa.stride(1), sb_t.stride(0), sb_t.stride(1), sb_t.stride(2), out.stride(0),
            B_SCALE_E8M0=e8m0, E_POW2=next_power_of_2(e + 1), BLOCK_N=block_n, GROUP_M=group_m,
            STAGES=stages, MATH_REGS=math_regs, MASKED=masked, num_warps=4, **launch,
        )
    except CompilationError as exc:  # a Triton whose Gluon differs from the one this was written for
        global _DISABLED
        _DISABLED = _reason(exc)
        warnings.warn(
            f"fp8fx: the Hopper grouped GEMM (grouped_wgmma) did not compile with this Triton ({_DISABLED}); "
            "grouped GEMMs use the Triton kernel in this process",
            RuntimeWarning,
            stacklevel=3,
        )
        raise Unavailable(_DISABLED) from exc
