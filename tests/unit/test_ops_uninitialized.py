"""Every public op called before decomm.init() raises DecommError saying so."""

from __future__ import annotations

import pytest
import torch

import decomm


@pytest.mark.parametrize("call", [
    lambda: decomm.neighbor_allreduce(torch.zeros(2)),
    lambda: decomm.neighbor_allreduce_nonblocking(torch.zeros(2)),
    lambda: decomm.neighbor_mix_delta(torch.zeros(2), torch.zeros(2)),
    lambda: decomm.allreduce(torch.zeros(2)),
    lambda: decomm.broadcast(torch.zeros(2), 0),
    lambda: decomm.allgather(torch.zeros(2)),
    lambda: decomm.neighbor_allgather(torch.zeros(2)),
    lambda: decomm.barrier(),
    lambda: decomm.rank(),
    lambda: decomm.size(),
    lambda: decomm.set_topology(decomm.topology.RingGraph(2)),
    lambda: decomm.current_round(),
    lambda: decomm.advance_round(),
    lambda: decomm.in_neighbors(),
])
def test_before_init(call):
    assert not decomm.is_initialized()
    with pytest.raises(decomm.DecommError, match=r"decomm.init\(\)"):
        call()
