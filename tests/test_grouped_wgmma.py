"""The warp-specialized Hopper grouped GEMM (fp8fx/kernels/grouped_wgmma.py) without a GPU:
its eligibility checks, its errors, and its compilation for sm_90a through Triton's own
compiler with a stand-in driver (the kernel's numbers are checked on the GPU, test_moe_gpu)."""

import re

import pytest
import torch

from fp8fx import reference as R
from fp8fx.kernels import grouped_wgmma as gw

FP8 = R.FP8_DTYPE


def test_block_n_rule_and_cpu_is_not_supported():
    assert gw.block_n_for(4096) == 256 and gw.block_n_for(576) == 128 and gw.block_n_for(1536) == 256
    assert gw.balanced_programs(4 * 8192, 4096, 256, 132) == 128  # 32 rounds of 128 tiles, not 31.03 of 132
    assert gw.balanced_programs(1024, 4096, 256, 132) == 128  # one round
    assert gw.balanced_programs(5, 512, 128, 132) == 4 and gw.balanced_programs(0, 512, 128, 132) == 1
    a = torch.zeros(8, 256, dtype=FP8)
    b = torch.zeros(2, 256, 256, dtype=FP8)
    assert not gw.supports(a, b, torch.bfloat16)
    if not torch.cuda.is_available():
        assert not gw.available()


def test_bad_input_is_refused_with_what_is_accepted():
    a = torch.zeros(8, 256, dtype=FP8)
    b = torch.zeros(2, 256, 256, dtype=FP8)
    sa, sb, offs = torch.ones(8, 2), torch.ones(2, 2, 2), torch.tensor([4, 8])
    with pytest.raises(ValueError, match=r"expected a\[T, K\] and b\[E, N, K\]"):
        gw.grouped_gemm_wgmma(a[0], sa, b, sb, offs)
    with pytest.raises(ValueError, match="a and b must share K, got 256 and 128"):
        gw.grouped_gemm_wgmma(a, sa, b[:, :, :128], sb, offs)
    with pytest.raises(ValueError, match="block_n must be 128 or 256, got 64"):
        gw.grouped_gemm_wgmma(a, sa, b, sb, offs, block_n=64)
    with pytest.raises(ValueError, match="5 stages of 128 x 256 tiles do not fit"):
        gw.grouped_gemm_wgmma(a, sa, b, sb, offs, block_n=256, stages=5)
    with pytest.raises(ValueError, match=r"activation scales must be fp32 \(8, 2\)"):
        gw.grouped_gemm_wgmma(a, sa[:, :1], b, sb, offs)
    with pytest.raises(ValueError, match=r"offs must have shape \(2,\)"):
        gw.grouped_gemm_wgmma(a, sa, b, sb, offs[:1])
    with pytest.raises(ValueError, match=r"one per 128 x 128 block, \(2, 2, 2\), got \(2, 4, 2\)"):
        gw.grouped_gemm_wgmma(a, sa, b, torch.ones(2, 4, 2), offs)
    with pytest.raises(ValueError, match="SM90 CUDA fp8 e4m3"):  # all shapes right: the device is refused
        gw.grouped_gemm_wgmma(a, sa, b, sb, offs)


def test_masked_bad_input_is_refused():
    a = torch.zeros(2, 8, 256, dtype=FP8)
    b = torch.zeros(2, 256, 256, dtype=FP8)
    sa, sb, counts = torch.ones(2, 8, 2), torch.ones(2, 2, 2), torch.tensor([3, 8])
    with pytest.raises(ValueError, match=r"expected a\[E, M, K\] and b\[E, N, K\]"):
        gw.grouped_gemm_masked_wgmma(a[:1], sa, b, sb, counts)
    with pytest.raises(ValueError, match=r"activation scales must be fp32 \(2, 8, 2\)"):
        gw.grouped_gemm_masked_wgmma(a, sa[:, :4], b, sb, counts)
    with pytest.raises(ValueError, match=r"one per 128 x 128 block"):
        gw.grouped_gemm_masked_wgmma(a, sa, b, sb[:, :1], counts)
    with pytest.raises(ValueError, match=r"masked_m must be int32/int64 of shape \(2,\)"):
        gw.grouped_gemm_masked_wgmma(a, sa, b, sb, counts.float())
    with pytest.raises(ValueError, match="SM90 CUDA fp8 e4m3"):
        gw.grouped_gemm_masked_wgmma(a, sa, b, sb, counts)


def test_compile_failure_reason_is_the_innermost_cause():
    from triton.compiler.errors import CompilationError

    try:
        try:
            raise TypeError("Inconsistent return types: fp32 and uint8")
        except TypeError as inner:
            raise CompilationError("def f():\n    return x", None, None) from inner
    except CompilationError as exc:
        assert gw._reason(exc) == "TypeError: Inconsistent return types: fp32 and uint8"
    assert gw._reason(CompilationError("src", None, "simulated")) == "CompilationError: simulated"


class _Sm90Driver:
    """Enough of a Triton driver for the compiler to target sm_90 on a machine without a GPU."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


@pytest.fixture
def sm90_compiler():
    if gw._IMPORT_ERROR is not None or not gw._triton_ok():
        pytest.skip(f"no Gluon Hopper API in this Triton: {gw._IMPORT_ERROR}")
    import triton

    config = triton.runtime.driver
    saved = config._active
    config.set_active(_Sm90Driver())
    try:
        yield
    finally:
        config._active = saved
        gw._grouped_wgmma_kernel.device_caches.clear()  # nothing compiled here is launched later


@pytest.mark.parametrize("block_n,e8m0,masked", [(128, False, False), (256, True, False), (128, True, True)])
def test_kernel_compiles_for_sm90(sm90_compiler, block_n, e8m0, masked):
    """Compiles to PTX and a cubin (ptxas) for sm_90a, contiguous and masked: three partitions
    in 12 warps, fp8 wgmma of 64 x 128 x 32 (two per K step at 256 columns), registers moved
    by setmaxnreg."""
    t, k, e, n = 1024, 7168, 4, 4096
    a = torch.empty(t, k, dtype=FP8)
    b = torch.empty(e, n, k, dtype=FP8)
    sb = torch.empty(e, n // 128, k // 128, dtype=torch.uint8 if e8m0 else torch.float32)
    a_desc, b_desc = gw._descriptors(a, b, block_n)
    compiled = gw._grouped_wgmma_kernel.warmup(
        a_desc, b_desc, torch.empty(t, k // 128), sb, torch.empty(t, n, dtype=torch.bfloat16),
        torch.empty(e, dtype=torch.int32), t, n, k, e, 9,
        k // 128, 1, sb.stride(0), sb.stride(1), sb.stride(2), n,
        B_SCALE_E8M0=e8m0, E_POW2=8, BLOCK_N=block_n, GROUP_M=8, STAGES=3, MATH_REGS=232, MASKED=masked, num_warps=4,
        grid=(1,),
    )
    ptx = compiled.asm["ptx"]
    assert ".reqntid 384" in ptx
    mmas = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n128k32\.f32\.e4m3\.e4m3", ptx)
    assert len(mmas) == 2 * 4 * (block_n // 128)  # two warpgroups x four k32 steps per column block
    assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+232", ptx)
    assert "cp.async.bulk.tensor.2d" in ptx  # TMA loads
    assert compiled.asm["cubin"]
