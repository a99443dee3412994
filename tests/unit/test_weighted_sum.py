"""The fused C++ weighted sum against an independent numpy computation of the same order.

out = w0*x + w1*r1 + w2*r2 ..., accumulated left to right in float32 (float64 for
float64 inputs) and rounded once at the end: numpy evaluates exactly that order, so
the results must be bitwise equal, whatever the number of threads (chunking) and
whether the term count takes the one-pass kernel (up to 8 neighbours) or the blocked one.

The uniform mean (x + r1 + ... + rk) / (k + 1) sums exactly in float64 for float32
(float32 for float16/bfloat16) and scales once by 1/(k + 1); float64 divides by k + 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from decomm import _C

CASES = [(torch.float64, np.float64), (torch.float32, np.float32),
         (torch.float16, np.float32), (torch.bfloat16, np.float32)]


def numpy_reference(x: torch.Tensor, w0: float, rs: list[torch.Tensor], ws: list[float],
                    acc: type) -> torch.Tensor:
    def wide(t: torch.Tensor) -> np.ndarray:
        return t.to(torch.float64 if acc is np.float64 else torch.float32).numpy()

    out = acc(w0) * wide(x)
    for r, w in zip(rs, ws):
        out = out + acc(w) * wide(r)
    return torch.from_numpy(out).to(x.dtype)


@pytest.mark.parametrize("dtype,acc", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("n", [0, 1, 7, 2048, 2049, 300_001])
def test_bitwise_equal_to_numpy(dtype, acc, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g).to(dtype)
    rs = [torch.randn(n, generator=g).to(dtype) for _ in range(3)]
    ws = [0.2, 0.3, 0.1]
    got = _C.weighted_sum(x, 0.4, rs, ws)
    want = numpy_reference(x, 0.4, rs, ws, acc)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got.view(torch.uint8) if n else got, want.view(torch.uint8) if n else want)


@pytest.mark.parametrize("dtype,acc", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 5, 8, 9, 12])
def test_bitwise_equal_to_numpy_for_every_neighbour_count(dtype, acc, k):
    n = 4099  # not a multiple of any vector width or of the blocked kernel's block
    g = torch.Generator().manual_seed(100 + k)
    x = torch.randn(n, generator=g).to(dtype)
    rs = [torch.randn(n, generator=g).to(dtype) for _ in range(k)]
    ws = [0.5 / (j + 1) for j in range(k)]
    want = numpy_reference(x, 0.3, rs, ws, acc)
    assert torch.equal(_C.weighted_sum(x, 0.3, rs, ws).view(torch.uint8), want.view(torch.uint8))
    y = x.clone()
    _C.weighted_sum(y, 0.3, rs, ws, y)
    assert torch.equal(y.view(torch.uint8), want.view(torch.uint8))


def mean_reference(x: torch.Tensor, rs: list[torch.Tensor]) -> torch.Tensor:
    wide = torch.float64 if x.dtype in (torch.float32, torch.float64) else torch.float32
    acc = {torch.float64: np.float64, torch.float32: np.float32}[wide]
    total = x.to(wide).numpy().copy()
    for r in rs:
        total = total + r.to(wide).numpy()
    m = len(rs) + 1
    mean = total / acc(m) if x.dtype == torch.float64 else total * (acc(1) / acc(m))
    return torch.from_numpy(mean).to(x.dtype)


@pytest.mark.parametrize("dtype", [c[0] for c in CASES], ids=str)
@pytest.mark.parametrize("k", [1, 2, 4, 7, 8, 9, 11])
def test_mean_bitwise_equal_to_numpy_and_exact_at_consensus(dtype, k):
    n = 2048 * 3 + 5
    g = torch.Generator().manual_seed(k)
    x = torch.randn(n, generator=g).to(dtype)
    rs = [torch.randn(n, generator=g).to(dtype) for _ in range(k)]
    want = mean_reference(x, rs)
    assert torch.equal(_C.mean_sum(x, rs).view(torch.uint8), want.view(torch.uint8))
    y = x.clone()
    _C.mean_sum(y, rs, y)
    assert torch.equal(y.view(torch.uint8), want.view(torch.uint8))
    # values already in consensus come back unchanged, bit for bit
    assert torch.equal(_C.mean_sum(x, [x.clone() for _ in range(k)]), x)


def test_mean_refuses_bad_operands():
    x = torch.randn(10)
    with pytest.raises(RuntimeError, match="at least one neighbour tensor"):
        _C.mean_sum(x, [])
    with pytest.raises(RuntimeError, match="neighbour tensor 1 must match x"):
        _C.mean_sum(x, [torch.randn(10), torch.randn(9)])
    with pytest.raises(RuntimeError, match="out overlaps neighbour tensor 0"):
        r = torch.randn(10)
        _C.mean_sum(x, [r], r)


def test_same_bits_for_any_thread_count():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1_000_003, generator=g)
    rs = [torch.randn(1_000_003, generator=g) for _ in range(4)]
    ws = [0.1, 0.2, 0.3, 0.15]
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_C.weighted_sum(x, 0.25, rs, ws))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_no_neighbours_is_a_scaled_copy():
    x = torch.arange(5, dtype=torch.float64)
    assert torch.equal(_C.weighted_sum(x, 1.0, [], []), x)


def test_out_argument_writes_in_place_and_refuses_overlap():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5000, generator=g)
    rs = [torch.randn(5000, generator=g) for _ in range(2)]
    want = numpy_reference(x, 0.5, rs, [0.25, 0.25], np.float32)
    out = torch.empty(5000)
    assert _C.weighted_sum(x, 0.5, rs, [0.25, 0.25], out) is not None
    assert torch.equal(out, want)
    y = x.clone()
    _C.weighted_sum(y, 0.5, rs, [0.25, 0.25], y)  # out may be x itself
    assert torch.equal(y, want)
    buf = torch.zeros(10_000)
    with pytest.raises(RuntimeError, match="out overlaps neighbour tensor 1"):
        _C.weighted_sum(x, 0.5, [rs[0], buf[2500:7500]], [0.25, 0.25], buf[4000:9000])
    with pytest.raises(RuntimeError, match="out partly overlaps x"):
        _C.weighted_sum(buf[:5000], 0.5, rs, [0.25, 0.25], buf[4000:9000])
    with pytest.raises(RuntimeError, match="out must be a contiguous CPU tensor like x"):
        _C.weighted_sum(x, 0.5, rs, [0.25, 0.25], torch.empty(4999))
