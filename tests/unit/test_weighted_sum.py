"""The fused C++ weighted sum against an independent numpy computation of the same order.

out = w0*x + w1*r1 + w2*r2 ..., accumulated left to right in float32 (float64 for
float64 inputs) and rounded once at the end: numpy evaluates exactly that order, so
the results must be bitwise equal, whatever the number of threads (chunking).
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
