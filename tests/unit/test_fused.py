"""decomm.optim._fused.linear_map_ against an independent numpy computation.

outs[i] = sum_j c[i][j] ins[j], each sum taken left to right over the non-zero
coefficients in the kernel's accumulator (float64 for float32 and float64 inputs,
float32 for half precision) and rounded once: numpy evaluates exactly that order,
so the C++ kernel's results must be bitwise equal to it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from decomm.optim._fused import linear_map_

CASES = [(torch.float64, np.float64), (torch.float32, np.float64),
         (torch.float16, np.float32), (torch.bfloat16, np.float32)]


def reference(rows: list[list[float]], ins: list[torch.Tensor], acc: type,
              dtype: torch.dtype) -> list[torch.Tensor]:
    wide = [t.to(torch.float64).numpy().astype(acc) for t in ins]
    outs = []
    for row in rows:
        total = None
        for c, a in zip(row, wide):
            if c == 0.0:
                continue
            term = acc(c) * a
            total = term if total is None else total + term
        if total is None:
            total = np.zeros_like(wide[0])
        outs.append(torch.from_numpy(np.asarray(total, dtype=np.float64)).to(dtype))
    return outs


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.numel() else t


@pytest.mark.parametrize("dtype,acc", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("n", [0, 1, 7, 511, 512, 513, 100_003])
def test_bitwise_equal_to_numpy_with_outputs_aliasing_inputs(dtype, acc, n):
    g = torch.Generator().manual_seed(n)
    a, b, c = (torch.randn(n, generator=g).to(dtype) for _ in range(3))
    extra = torch.empty(n, dtype=dtype)
    rows = [[0.9, 0.25, -0.25], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.5, -1.5, 2.0]]
    want = reference(rows, [a, b, c], acc, dtype)
    # a and c are overwritten: every output must have been summed from the old values
    linear_map_([a, c, torch.empty(n, dtype=dtype), extra], rows, [a, b, c])
    for got, exp in zip([a, c, None, extra], want):
        if got is not None:
            assert got.dtype == dtype and torch.equal(bits(got), bits(exp))


def test_difference_of_close_iterates_is_kept_in_float32():
    # m <- mu m + c (x0 - x) with x0 within a few ulps of x: the float64 accumulator
    # keeps the result within one float32 ulp of the exact value; float32 arithmetic on
    # c*x0 - c*x cancels and is off by many ulps
    g = torch.Generator().manual_seed(3)
    x = torch.rand(10_000, generator=g) + 1.0
    x0 = x + torch.randint(-3, 4, (10_000,), generator=g).float() * 2.0 ** -23
    m = torch.randn(10_000, generator=g) * 1e-6
    mu, c = 0.9, 1.0 / 0.05
    exact = (mu * m.double() + c * (x0.double() - x.double())).float()
    naive = mu * m + c * x0 - c * x  # float32 throughout
    ulp = torch.abs(torch.nextafter(exact, torch.full_like(exact, np.inf)) - exact).double()
    # one float32 rounding, plus the float64 rounding of the products c*x0 and c*x
    tol = ulp + 4 * 2.0 ** -52 * c * x.double().abs()
    linear_map_([m], [[mu, c, -c]], [m, x0, x])
    assert bool(((m.double() - exact.double()).abs() <= tol).all())
    assert float(((naive.double() - exact.double()).abs() / tol).max()) > 100.0


def test_torch_path_for_non_contiguous_tensors_matches_the_kernel():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 3000, generator=g, dtype=torch.float64)
    x, h = base[0].clone(), base[1].clone()
    xs, hs = torch.randn(3000, 2, dtype=torch.float64).t()  # strided views
    xs.copy_(x)
    hs.copy_(h)
    assert not xs.is_contiguous()
    linear_map_([x, h], [[1.0, 1.0], [1.0, 0.0]], [x, h])
    linear_map_([xs, hs], [[1.0, 1.0], [1.0, 0.0]], [xs, hs])
    assert torch.equal(xs, x) and torch.equal(hs, h)
    assert torch.equal(h, base[0])  # h <- the old x, exactly


def test_bad_arguments_are_named():
    a = torch.zeros(8)
    with pytest.raises(ValueError, match="1 to 4 outputs"):
        linear_map_([a] * 5, [[1.0]] * 5, [a])
    with pytest.raises(RuntimeError, match="1 to 4 inputs, got 5"):
        linear_map_([a], [[1.0] * 5], [torch.zeros(8) for _ in range(5)])
    with pytest.raises(ValueError, match="2 outputs and 1 rows"):
        linear_map_([a, torch.zeros(8)], [[1.0]], [a])
    with pytest.raises(RuntimeError, match="row 0 has 1 coefficients for 2 inputs"):
        linear_map_([a], [[1.0]], [a, torch.zeros(8)])
    with pytest.raises(RuntimeError, match="input 1 must be a contiguous CPU tensor of 8 "
                                           "elements of dtype Float, got 7 of Float"):
        linear_map_([a], [[1.0, 1.0]], [a, torch.zeros(7)])
    with pytest.raises(RuntimeError, match="input 0 .* got 8 of Double"):
        linear_map_([a], [[1.0]], [torch.zeros(8, dtype=torch.float64)])
    buf = torch.zeros(16)
    with pytest.raises(RuntimeError, match="output 0 partly overlaps input 0"):
        linear_map_([buf[:8]], [[1.0]], [buf[4:12]])
    with pytest.raises(RuntimeError, match="outputs 0 and 1 overlap"):
        linear_map_([a, a], [[1.0], [2.0]], [torch.ones(8)])
