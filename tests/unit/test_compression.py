"""decomm.compression: each operator against its closed form.

Statistical checks (unbiasedness, variance) average N independent draws and allow
6 standard errors computed from the closed-form variance: a false failure has
probability below 1e-8 per coordinate, and the seeds are fixed, so the tests are
deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from decomm.compression import QSGD, Compressor, Identity, Payload, RandomK, Sign, TopK

ALL = [Identity(), TopK(0.3), RandomK(0.3, seed=1), RandomK(0.3, seed=1, unbiased=True),
       QSGD(bits=8), QSGD(7), QSGD(1), QSGD(3, bits=8), Sign()]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def vec(d: int = 37, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------ TopK
@pytest.mark.parametrize("d, ratio, k", [(37, 0.3, 11), (10, 0.25, 3), (10, 0.01, 1),
                                         (10, 1.0, 10), (2000, 0.1, 200)])
def test_topk_keeps_exactly_the_k_largest_magnitudes(d, ratio, k):
    x = vec(d, seed=d)
    comp = TopK(ratio)
    assert comp.k(d) == k  # max(1, round(ratio * d))
    p = comp.compress(x)
    q = comp.decompress(p)
    kept = set(torch.nonzero(q).reshape(-1).tolist())
    order = np.argsort(-np.abs(x.numpy()))
    assert kept == set(order[:k].tolist())
    assert torch.equal(q[list(kept)], x[list(kept)])
    # contraction, exactly: the error is the energy of the d - k smallest entries
    err = float((x - q).square().sum())
    rest = float(np.sort(x.numpy() ** 2)[: d - k].sum())
    assert err == pytest.approx(rest, rel=1e-12)
    assert err <= (1 - k / d) * float(x.square().sum()) + 1e-12
    assert p.nbytes == k * (8 + 4) == comp.payload_bytes(d, torch.float64)
    assert p["indices"].dtype == torch.int32


# ---------------------------------------------------------------- RandomK
def test_randomk_same_seed_same_indices_and_k_distinct():
    x = vec(50)
    a, b, c = RandomK(0.2, seed=4), RandomK(0.2, seed=4), RandomK(0.2, seed=5)
    for _ in range(3):  # the same sequence of draws, call after call
        pa, pb, pc = a.compress(x), b.compress(x), c.compress(x)
        assert torch.equal(pa["indices"], pb["indices"])
        assert not torch.equal(pa["indices"], pc["indices"])
        idx = pa["indices"].long()
        assert idx.numel() == 10 and idx.unique().numel() == 10
        assert torch.equal(pa["values"], x[idx])
    g1 = a.make_generator(3, 0)
    g2 = a.make_generator(3, 0)
    g3 = a.make_generator(3, 1)
    i1, i2, i3 = (a.compress(x, generator=g)["indices"] for g in (g1, g2, g3))
    assert torch.equal(i1, i2) and not torch.equal(i1, i3)
    assert TopK(0.5).make_generator(0) is None  # deterministic: no stream


@pytest.mark.parametrize("unbiased", [False, True])
def test_randomk_mean_and_error_match_closed_forms(unbiased):
    d, ratio, n_draws = 20, 0.25, 20000
    x = vec(d, seed=3)
    comp = RandomK(ratio, seed=11, unbiased=unbiased)
    k = comp.k(d)
    p = k / d
    g = comp.make_generator(0)
    draws = torch.stack([comp(x, generator=g) for _ in range(n_draws)])
    scale = d / k if unbiased else 1.0
    # Q_i = scale * x_i * B_i with B_i ~ Bernoulli(k/d)
    mean = scale * p * x
    sd = scale * x.abs() * math.sqrt(p * (1 - p))
    assert bool(((draws.mean(0) - mean).abs() <= 6 * sd / math.sqrt(n_draws) + 1e-15).all())
    if not unbiased:  # every draw: ||x - Q||^2 = energy of the dropped entries
        err = (draws - x).square().sum(1)
        kept = draws != 0
        assert torch.allclose(err, (x.square() * ~kept).sum(1), rtol=1e-12, atol=0)
        # E||x - Q||^2 = (1 - k/d) ||x||^2
        se = float(err.std()) / math.sqrt(n_draws)
        assert abs(float(err.mean()) - (1 - p) * float(x.square().sum())) <= 6 * se


# ------------------------------------------------------------------- QSGD
def qsgd_closed_form(x: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[Q(x)], Var Q(x)_i) of QSGD with s levels, from its definition."""
    norm = float(x.norm())
    r = s * x.abs() / norm
    p = r - r.floor()
    return x.clone(), (norm / s) ** 2 * p * (1 - p)


@pytest.mark.parametrize("levels, bits", [(127, 8), (7, 4), (1, 2), (3, 8)])
def test_qsgd_is_unbiased_with_the_closed_form_variance(levels, bits):
    d, n_draws = 16, 20000
    x = vec(d, seed=levels)
    comp = QSGD(levels, bits=bits, seed=2)
    assert comp.bits == bits
    g = comp.make_generator(0)
    draws = torch.stack([comp(x, generator=g) for _ in range(n_draws)])
    mean, var = qsgd_closed_form(x, levels)
    se = var.sqrt() / math.sqrt(n_draws)
    assert bool(((draws.mean(0) - mean).abs() <= 6 * se + 1e-12).all())
    # total squared error: E||Q - x||^2 = sum_i Var_i <= min(d/s^2, sqrt(d)/s) ||x||^2
    err = (draws - x).square().sum(1)
    total = float(var.sum())
    assert abs(float(err.mean()) - total) <= 6 * float(err.std()) / math.sqrt(n_draws)
    assert total <= comp.variance_bound(d) * float(x.square().sum())
    # every value is on the grid ||x|| * l / s, l = floor or ceil of s|x_i| / ||x||
    levels_hit = draws.abs() * levels / float(x.norm())
    assert torch.allclose(levels_hit, levels_hit.round(), atol=1e-9)
    r = levels * x.abs() / float(x.norm())
    assert bool(((levels_hit.round() - r.floor()).abs() <= 1 + 1e-9).all())
    assert bool((torch.sign(draws) * torch.sign(x) >= 0).all())


def test_qsgd_payload_sizes_and_eight_bit_option():
    q8 = QSGD(bits=8)
    assert (q8.levels, q8.bits) == (127, 8)
    assert q8.payload_bytes(1000, torch.float32) == 1000 + 4  # one byte each + the norm
    assert q8.payload_bytes(1000, torch.float64) == 1000 + 8
    assert QSGD(7).bits == 4 and QSGD(7).payload_bytes(1001, torch.float32) == 501 + 4
    assert QSGD(1).bits == 2 and QSGD(1).payload_bytes(1001, torch.float32) == 251 + 4
    assert q8.ratio(1000, torch.float32) == pytest.approx(1004 / 4000)


def test_qsgd_rescale_divides_by_tau_and_zero_maps_to_zero():
    x = vec(30, seed=9)
    plain, scaled = QSGD(2, seed=5), QSGD(2, seed=5, rescale=True)
    tau = 1 + min(30 / 4, math.sqrt(30) / 2)
    assert torch.allclose(scaled(x), plain(x) / tau, rtol=1e-14, atol=0)
    z = torch.zeros(8, dtype=torch.float64)
    assert torch.equal(QSGD(bits=8)(z), z)
    assert torch.equal(Sign()(z), z)


# ------------------------------------------------------------------- Sign
def test_sign_is_the_scaled_sign_with_packed_bits():
    x = vec(21, seed=4)
    x[3] = 0.0  # sign(0) = +1
    comp = Sign()
    p = comp.compress(x)
    d = x.numel()
    scale = float(x.abs().sum()) / d
    expected = torch.where(x >= 0, 1.0, -1.0).double() * scale
    assert torch.allclose(comp.decompress(p), expected, rtol=1e-15, atol=0)
    # the bits: little-endian within each byte, 1 = non-negative
    bits = (x.numpy() >= 0).astype(np.uint8)
    assert np.array_equal(p["codes"].numpy(), np.packbits(bits, bitorder="little"))
    assert p.nbytes == math.ceil(d / 8) + 8
    # contraction, exactly: ||x - Q||^2 = ||x||^2 - ||x||_1^2 / d
    err = float((x - comp(x)).square().sum())
    assert err == pytest.approx(float(x.square().sum()) - float(x.abs().sum()) ** 2 / d,
                                rel=1e-12)


# ------------------------------------------------------------ all of them
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("comp", ALL, ids=repr)
def test_bytes_round_trip_and_sizes(comp, dtype):
    x = vec(37, seed=1, dtype=dtype).reshape(37, 1)
    gen = comp.make_generator(0)
    p = comp.compress(x, generator=gen)
    buf = p.to_bytes()
    assert buf.dtype == torch.uint8 and buf.numel() == p.nbytes
    assert p.nbytes == comp.payload_bytes(37, dtype)
    assert comp.ratio(37, dtype) == p.nbytes / (37 * x.element_size())
    back = comp.from_bytes(buf, 37, dtype)
    q = comp.decompress(p, x.shape)
    assert q.shape == x.shape and q.dtype == dtype
    assert torch.equal(comp.decompress(back, (37, 1)), q)
    out = vec(37, seed=2, dtype=dtype)
    want = out.clone().add_(q.reshape(-1), alpha=0.25)
    assert torch.equal(comp.decompress_add_(out, p, alpha=0.25), want)


def test_identity_and_payload_repr():
    x = vec(5)
    assert torch.equal(Identity()(x), x)
    p = TopK(0.4).compress(x)
    assert isinstance(p, Payload) and "24 bytes" in repr(p)


def test_compressors_are_stateless_apart_from_their_own_generator():
    x = vec(40)
    comp = RandomK(0.1, seed=3)
    g = comp.make_generator(1, 2)
    first = comp.compress(x, generator=g)["indices"]
    comp.compress(x)  # the compressor's own stream does not touch g's
    again = comp.compress(x, generator=comp.make_generator(1, 2))["indices"]
    assert torch.equal(first, again)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.5, float("nan")])
@pytest.mark.parametrize("cls", [TopK, RandomK])
def test_bad_ratio(cls, ratio):
    with pytest.raises(ValueError, match="ratio must be in"):
        cls(ratio)


@pytest.mark.parametrize("ratio", ["0.1", True, None])
def test_ratio_of_wrong_type(ratio):
    with pytest.raises(TypeError, match="ratio must be a float"):
        TopK(ratio)


@pytest.mark.parametrize("kw, match", [
    ({"levels": 0}, "levels must be a positive int"),
    ({"levels": -3}, "levels must be a positive int"),
    ({"levels": 1.5}, "levels must be a positive int"),
    ({"levels": 128}, "more than 8 bits hold"),
    ({"levels": 8, "bits": 4}, "more than bits=4 hold"),
    ({"bits": 3}, "bits must be 2, 4 or 8"),
    ({"bits": True}, "bits must be 2, 4 or 8"),
    ({}, "give levels"),
    ({"levels": 4, "seed": -1}, "seed must be a non-negative int"),
])
def test_bad_qsgd(kw, match):
    with pytest.raises(ValueError, match=match):
        QSGD(**kw)


def test_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        RandomK(0.1, seed=1.5)
    with pytest.raises(ValueError, match="stream ids"):
        RandomK(0.1).make_generator(-1)


@pytest.mark.parametrize("comp", [TopK(0.5), QSGD(bits=8), Sign()], ids=repr)
def test_bad_tensors(comp):
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        comp.compress(torch.arange(4))
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        comp.compress(torch.zeros(4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="numel must be a positive int"):
        comp.compress(torch.zeros(0))
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        comp.compress(np.zeros(4))
    p = comp.compress(torch.ones(6))
    with pytest.raises(ValueError, match="shape \\(4,\\) has 4 elements"):
        comp.decompress(p, (4,))
    with pytest.raises(TypeError, match="expected a Payload"):
        comp.decompress(torch.ones(6))
    with pytest.raises(ValueError, match="bytes, but the payload"):
        comp.from_bytes(p.to_bytes()[:-1], 6, torch.float32)
    with pytest.raises(TypeError, match="1-D uint8"):
        comp.from_bytes(p.to_bytes().float(), 6, torch.float32)


def test_payload_of_another_compressor_is_refused():
    p = TopK(0.5).compress(torch.ones(6))
    with pytest.raises(ValueError, match="another compressor"):
        Sign().decompress(p)
    with pytest.raises(ValueError, match="out must be flat"):
        TopK(0.5).decompress_add_(torch.zeros(5), p)


def test_compressor_is_abstract():
    with pytest.raises(TypeError):
        Compressor()  # type: ignore[abstract]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("comp", [TopK(0.3), Sign(), QSGD(bits=8), RandomK(0.3, seed=1)],
                         ids=repr)
def test_cuda_tensors_stay_on_the_device(comp):
    x = vec(37, seed=6, dtype=torch.float32)
    gen = comp.make_generator(0, device="cuda")
    p = comp.compress(x.cuda(), generator=gen)
    assert all(t.device.type == "cuda" for t in p.parts.values())
    q = comp.decompress(p)
    assert q.device.type == "cuda"
    assert torch.equal(comp.decompress(comp.from_bytes(p.to_bytes(), 37, x.dtype)), q)
    if not comp.stochastic:  # deterministic: the same numbers as on the CPU
        assert torch.allclose(q.cpu(), comp(x), rtol=1e-6, atol=1e-7)
