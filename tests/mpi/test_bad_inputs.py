"""One table of bad weight inputs, tried against every entry point that takes weights.

``neighbor_allreduce`` (``src_weights``), ``hierarchical_neighbor_allreduce``
(``src_machine_weights``) and the window ops (``win_update``'s ``neighbor_weights``,
``win_put``'s ``dst_weights``) validate through one implementation, so each bad input
must raise the same exception with the same words everywhere, naming the op and the rank.
Weights of either sign are accepted everywhere (checked against a closed form).
"""

from __future__ import annotations

import pytest
import torch

import decomm
from decomm import hierarchical as H
from decomm import topology as T

NAN, INF = float("nan"), float("inf")


def bad_maps(me: int, other: int, size: int) -> list[tuple[object, type, str]]:
    """(weight map, exception, words in the message) for ranks/machines of ``size``."""
    return [
        ({other: "a"}, TypeError, "must be a number"),
        ({other: True}, TypeError, "must be a number"),
        ({other: NAN}, ValueError, "= nan must be finite"),
        ({other: INF}, ValueError, "= inf must be finite"),
        ({"x": 0.5}, TypeError, "key 'x' is not a"),
        ({True: 0.5}, TypeError, "key True is not a"),
        ({size + 3: 0.5}, ValueError, f"out of range for {size}"),
        ({me: 0.5}, ValueError, "itself"),
        ("abc", TypeError, "must be a dict"),
        ([other, other], ValueError, "twice"),
    ]


def entry_points():
    """name -> (call(weights), this rank's id, a neighbour id, the id space's size)."""
    n, r = decomm.size(), decomm.rank()
    x = torch.ones(3)
    left = (r - 1) % n

    def ops(w):
        decomm.set_topology(T.RingGraph(n))
        decomm.neighbor_allreduce(x, self_weight=0.5, src_weights=w, name="t")

    def hier(w):
        H.init_machines(1)
        H.set_machine_topology(T.RingGraph(n))
        H.hierarchical_neighbor_allreduce(x, self_weight=0.5, src_machine_weights=w, name="t")

    def win_update(w):
        decomm.win_update("bad.w", self_weight=0.5, neighbor_weights=w)

    def win_put(w):
        decomm.win_put(x, "bad.w", dst_weights=w)

    return {"neighbor_allreduce": (ops, r, left, n),
            "hierarchical_neighbor_allreduce": (hier, r, left, n),
            "win_update": (win_update, r, left, n), "win_put": (win_put, r, (r + 1) % n, n)}


def test_every_entry_point_refuses_the_same_bad_inputs_alike():
    if decomm.size() < 2:
        pytest.skip("needs 2 ranks (a neighbour to name)")
    r = decomm.rank()
    decomm.set_topology(T.RingGraph(decomm.size()))
    decomm.win_create(torch.ones(3), "bad.w")
    try:
        for op, (call, me, other, size) in entry_points().items():
            for weights, exc, words in bad_maps(me, other, size):
                with pytest.raises(exc) as err:
                    call(weights)
                msg = str(err.value)
                assert words in msg and f"on rank {r}" in msg and op in msg, (op, weights, msg)
    finally:
        decomm.win_free("bad.w")


def test_negative_weights_are_accepted_with_the_closed_form():
    n, r = decomm.size(), decomm.rank()
    if n < 2:
        pytest.skip("needs 2 ranks")
    decomm.set_topology(T.RingGraph(n))
    left = (r - 1) % n
    got = decomm.neighbor_allreduce(torch.tensor([float(r)], dtype=torch.float64),
                                    self_weight=-0.5, src_weights={left: 1.5}, name="signed")
    assert got.item() == -0.5 * r + 1.5 * left
