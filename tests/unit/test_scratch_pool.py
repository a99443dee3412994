"""The C++ scratch-buffer pool: buffers come back for reuse, and a full pool evicts
the least recently returned buffers so that the sizes in use stay cached."""

from __future__ import annotations

import pytest

from decomm import _C


@pytest.fixture
def small_pool():
    before = _C.pool_limit()
    _C.set_pool_limit(0)  # empty it
    _C.set_pool_limit(1000)
    yield
    _C.set_pool_limit(0)
    _C.set_pool_limit(before)


def test_a_returned_buffer_is_reused(small_pool):
    t = _C.pool_get(300)
    assert t.numel() >= 300
    ptr = t.data_ptr()
    _C.pool_put(t, 300)
    assert _C.pool_sizes() == [300]
    again = _C.pool_get(300)
    assert again.data_ptr() == ptr and _C.pool_sizes() == []
    assert _C.pool_get(300).data_ptr() != ptr  # not cached twice


def test_a_full_pool_evicts_the_least_recently_returned(small_pool):
    a, b, c = _C.pool_get(400), _C.pool_get(400), _C.pool_get(300)
    _C.pool_put(a, 400)
    _C.pool_put(b, 400)
    assert _C.pool_sizes() == [400, 400]
    _C.pool_put(c, 300)  # 1100 > 1000: a, the oldest, goes
    assert _C.pool_sizes() == [300, 400]
    assert _C.pool_get(400).data_ptr() == b.data_ptr()
    d = _C.pool_get(600)
    _C.pool_put(d, 600)  # 300 + 600 fits
    assert _C.pool_sizes() == [300, 600]
    e = _C.pool_get(900)
    _C.pool_put(e, 900)  # evicts both older ones
    assert _C.pool_sizes() == [900]


def test_a_buffer_larger_than_the_limit_is_not_kept(small_pool):
    _C.pool_put(_C.pool_get(200), 200)
    _C.pool_put(_C.pool_get(1001), 1001)
    assert _C.pool_sizes() == [200]
    _C.set_pool_limit(100)  # lowering the limit drops what no longer fits
    assert _C.pool_sizes() == []
