"""The fused CUDA weighted-sum kernel (decomm._C_cuda.weighted_sum) against torch.

Reference: the same sum computed by torch in float64, then rounded to the dtype. The
kernel accumulates float16/bfloat16 in float32, so it may differ from the reference by
the dtype's rounding only. For float32/float64 it must match decomm's CPU kernel
bitwise (same order, separately rounded multiply and add) on x86-64, where the CPU
build does not contract to FMA.
"""

from __future__ import annotations

import platform

import pytest
import torch

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# relative to max |value|: half-precision outputs are rounded once (2^-11, 2^-8)
TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6, torch.float64: 1e-14}
SIZES = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 127, 1000, 1023, 1025, 4097, 65537, 1 << 20]
KS = [0, 1, 2, 3, 4, 5, 8, 33, 40]  # 33 and 40: more than one launch (32 fused inputs each)


def _inputs(n: int, k: int, dtype: torch.dtype, seed: int = 0, offset: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    def one():
        buf = torch.randn(n + offset, generator=g, device="cuda", dtype=torch.float64)
        return buf.to(dtype)[offset:]
    x = one()
    rs = [one() for _ in range(k)]
    ws = [float(w) for w in torch.rand(k, generator=g, device="cuda", dtype=torch.float64)]
    return x, rs, ws


def _reference(x, self_w, rs, ws):
    acc = x.double() * self_w
    for r, w in zip(rs, ws):
        acc = acc + r.double() * w
    return acc


def _check(out, ref, dtype):
    assert out.dtype == dtype
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    err = float((out.double() - ref).abs().max()) if ref.numel() else 0.0
    assert err <= TOL[dtype] * scale * 4, (dtype, err, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", KS)
def test_matches_torch_reference(cuda_ext, dtype, k):
    for n in SIZES:
        x, rs, ws = _inputs(n, k, dtype, seed=n + k)
        out = cuda_ext.weighted_sum(x, 0.375, rs, ws)
        _check(out, _reference(x, 0.375, rs, ws), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_inputs_take_the_scalar_path(cuda_ext, dtype):
    for n in (1, 9, 1001, 65539):
        x, rs, ws = _inputs(n, 3, dtype, seed=n, offset=1)  # data_ptr not 16-byte aligned
        out = torch.empty(n + 1, device="cuda", dtype=dtype)[1:]
        assert not cuda_ext.uses_vector_path(out, x, rs)
        got = cuda_ext.weighted_sum(x, 0.5, rs, ws, out=out)
        assert got.data_ptr() == out.data_ptr()
        _check(out, _reference(x, 0.5, rs, ws), dtype)
    x, rs, _ = _inputs(64, 2, dtype)
    assert cuda_ext.uses_vector_path(torch.empty_like(x), x, rs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_may_alias_x(cuda_ext, dtype):
    x, rs, ws = _inputs(100_003, 4, dtype, seed=5)
    ref = _reference(x, 0.25, rs, ws)
    got = cuda_ext.weighted_sum(x, 0.25, rs, ws, out=x)
    assert got.data_ptr() == x.data_ptr()
    _check(x, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_reproducible(cuda_ext, dtype):
    x, rs, ws = _inputs(300_001, 6, dtype, seed=11)
    a = cuda_ext.weighted_sum(x, 0.3, rs, ws)
    b = cuda_ext.weighted_sum(x, 0.3, rs, ws)
    assert torch.equal(a, b)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="the CPU kernel may contract to FMA on this architecture")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_equal_to_cpu_kernel(cuda_ext, dtype):
    import decomm._C as cpu

    for k in (0, 1, 3, 7, 33):
        x, rs, ws = _inputs(50_001, k, dtype, seed=k)
        gpu = cuda_ext.weighted_sum(x, 0.3, rs, ws).cpu()
        host = cpu.weighted_sum(x.cpu(), 0.3, [r.cpu() for r in rs], ws)
        if dtype in (torch.float32, torch.float64) or k <= 32:
            assert torch.equal(gpu, host), (dtype, k)


def test_runs_on_the_current_stream(cuda_ext):
    x, rs, ws = _inputs(1 << 20, 2, torch.float32)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        x.fill_(2.0)
        out = cuda_ext.weighted_sum(x, 0.5, rs, ws)
        got = out.cpu()
    ref = 1.0 + rs[0].cpu().double() * ws[0] + rs[1].cpu().double() * ws[1]
    assert torch.allclose(got.double(), ref, atol=1e-5)


def test_rejects_bad_input(cuda_ext):
    x, rs, ws = _inputs(10, 2, torch.float32)
    with pytest.raises(RuntimeError, match="one weight per neighbour"):
        cuda_ext.weighted_sum(x, 0.5, rs, ws[:1])
    with pytest.raises(RuntimeError, match="neighbour tensor 1"):
        cuda_ext.weighted_sum(x, 0.5, [rs[0], rs[1][:5]], ws)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        cuda_ext.weighted_sum(x.cpu(), 0.5, [], [])
    import decomm

    with pytest.raises(decomm.DecommError, match="not supported"):
        cuda_ext.weighted_sum(x.int(), 0.5, [], [])


def test_peak_bandwidth_is_reported(cuda_ext):
    peak = cuda_ext.memory_peak_gbps(torch.cuda.current_device())
    assert peak == 0.0 or 100.0 < peak < 100_000.0
