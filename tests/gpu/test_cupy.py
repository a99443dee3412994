"""cupy arrays in, cupy arrays out (zero-copy through DLPack / __cuda_array_interface__)."""

from __future__ import annotations

import pytest
from gpu_util import run_ranks


def test_interop_round_trip_is_zero_copy():
    cupy = pytest.importorskip("cupy")
    from decomm import interop

    a = cupy.arange(12, dtype=cupy.float32).reshape(3, 4)
    t, back = interop.as_torch(a)
    assert t.is_cuda and t.data_ptr() == a.data.ptr and tuple(t.shape) == (3, 4)
    t.mul_(2)
    assert float(a[1, 1]) == 10.0
    b = back(t)
    assert isinstance(b, cupy.ndarray) and b.data.ptr == a.data.ptr
    h = cupy.arange(8, dtype=cupy.float16)
    th, _ = interop.as_torch(h)
    assert str(th.dtype) == "torch.float16"
    assert interop.is_cupy_array(a) and not interop.is_cupy_array(t)


def test_non_contiguous_cupy_array():
    cupy = pytest.importorskip("cupy")
    from decomm import interop

    a = cupy.arange(20, dtype=cupy.float64).reshape(4, 5)[:, ::2]
    t, _ = interop.as_torch(a)
    assert t.is_cuda and t.tolist() == cupy.asnumpy(a).tolist()


@pytest.mark.parametrize("np_", [2, 3])
def test_ops_take_and_return_cupy(np_):
    pytest.importorskip("cupy")
    proc = run_ranks(np_, "cupy")
    assert "cupy in, cupy out ok" in proc.stdout
