"""Timeline under mpirun: each rank's Chrome-trace JSON has well-formed ops and phases.

The ops' internal dispatchers are traced by decorators in ``decomm.ops``.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
import torch

import decomm
from decomm import hierarchical as H
from decomm import timeline
from decomm import topology as T

OP_PHASES = ["validate", "pack", "send/recv", "reduce", "unpack"]
EPS_US = 1.0  # rounding of ns -> us floats


@pytest.fixture
def tl():
    was_on, old_prefix = timeline.enabled, timeline._prefix
    d = tempfile.mkdtemp(prefix=f"decomm-tl-{decomm.rank()}-")
    timeline._reset_for_tests()
    timeline.start(os.path.join(d, "trace-"))
    yield d
    timeline.stop()
    timeline._reset_for_tests()
    if was_on and old_prefix:
        timeline.start(old_prefix)


def load(path: str) -> list[dict]:
    with open(path) as f:
        doc = json.load(f)
    assert doc["displayTimeUnit"] == "ms"
    assert doc["otherData"]["rank"] == decomm.rank()
    evs = doc["traceEvents"]
    assert isinstance(evs, list)
    for e in evs:
        assert e["ph"] in ("X", "M"), e
        assert e["pid"] == decomm.rank() and isinstance(e["tid"], int)
        if e["ph"] == "X":
            assert isinstance(e["name"], str) and e["cat"] in ("op", "phase", "wait", "activity")
            assert isinstance(e["ts"], float) and e["ts"] > 0
            assert isinstance(e["dur"], float) and e["dur"] >= 0
    names = {e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {f"rank {decomm.rank()}"}
    return [e for e in evs if e["ph"] == "X"]


def phases_of(op: dict, evs: list[dict]) -> list[dict]:
    lo, hi = op["ts"] - EPS_US, op["ts"] + op["dur"] + EPS_US
    return sorted((e for e in evs if e["cat"] == "phase" and e["tid"] == op["tid"]
                   and lo <= e["ts"] and e["ts"] + e["dur"] <= hi), key=lambda e: e["ts"])


def assert_contiguous(ph: list[dict], op: dict) -> None:
    assert abs(ph[0]["ts"] - op["ts"]) <= EPS_US
    for a, b in zip(ph, ph[1:]):
        assert abs(a["ts"] + a["dur"] - b["ts"]) <= EPS_US, (a, b)  # back to back
    assert abs(ph[-1]["ts"] + ph[-1]["dur"] - (op["ts"] + op["dur"])) <= EPS_US


def test_blocking_ops_have_all_phases(tl):
    n = decomm.size()
    decomm.set_topology(T.RingGraph(n))
    x = torch.arange(1000, dtype=torch.float64) + decomm.rank()
    for k in range(3):
        decomm.neighbor_allreduce(x, name=f"na{k}")
    decomm.neighbor_allreduce(x, self_weight=0.5, src_weights={}, dst_weights={}, name="dyn")
    decomm.allreduce(torch.ones(10), name="ar")
    path = timeline.stop()
    assert path == os.path.join(tl, f"trace-{decomm.rank()}.json") and os.path.exists(path)
    evs = load(path)
    ops = [e for e in evs if e["cat"] == "op"]
    assert [e["args"]["name"] for e in ops] == ["na0", "na1", "na2", "dyn", "ar"]
    assert [e["name"] for e in ops] == ["neighbor_allreduce"] * 4 + ["allreduce"]
    assert ops[0]["args"]["bytes"] == 8000 and ops[0]["args"]["dtype"] == "float64"
    assert ops[0]["args"]["shape"] == [1000]
    for a, b in zip(ops, ops[1:]):
        assert a["ts"] + a["dur"] <= b["ts"] + EPS_US  # sequential on the main lane
    for op in ops:
        ph = phases_of(op, evs)
        assert [p["name"] for p in ph] == OP_PHASES, (op, ph)
        assert_contiguous(ph, op)


def test_nonblocking_op_on_its_own_lane(tl):
    n = decomm.size()
    decomm.set_topology(T.RingGraph(n))
    x = torch.ones(500) * decomm.rank()
    h1 = decomm.neighbor_allreduce_nonblocking(x, name="nb1")
    h2 = decomm.neighbor_allreduce_nonblocking(x.clone(), name="nb2")
    h2.wait()
    h1.wait()
    h1.wait()  # a second wait records nothing more
    evs = load(timeline.flush())
    ops = {e["args"]["name"]: e for e in evs if e["cat"] == "op"}
    assert set(ops) == {"nb1", "nb2"}
    assert all(o["args"]["nonblocking"] for o in ops.values())
    lanes = {o["tid"] for o in ops.values()}
    assert len(lanes) == 2 and min(lanes) >= timeline.ASYNC_LANE_BASE
    waits = [e for e in evs if e["cat"] == "wait"]
    assert sorted(w["args"]["name"] for w in waits) == ["nb1", "nb2"]
    assert all(w["tid"] < timeline.ASYNC_LANE_BASE for w in waits)
    for op in ops.values():
        names = [p["name"] for p in phases_of(op, evs)]
        assert names[:4] == OP_PHASES[:4] and names[-1] == "unpack"
    # a lane is reused once its op has been waited for
    h3 = decomm.neighbor_allreduce_nonblocking(x, name="nb3")
    h3.wait()
    evs = load(timeline.flush())
    nb3 = next(e for e in evs if e["cat"] == "op" and e["args"]["name"] == "nb3")
    assert nb3["tid"] == timeline.ASYNC_LANE_BASE


def test_hierarchical_and_activity(tl):
    n = decomm.size()
    H.init_machines(2 if n >= 2 else 1)
    with timeline.activity("user-step", step=1):
        H.hierarchical_neighbor_allreduce(torch.ones(64), name="hier")
    evs = load(timeline.stop())
    act = [e for e in evs if e["cat"] == "activity"]
    assert len(act) == 1 and act[0]["name"] == "user-step" and act[0]["args"] == {"step": 1}
    op = [e for e in evs if e["cat"] == "op" and e["name"] == "hierarchical_neighbor_allreduce"]
    assert len(op) == 1
    assert act[0]["ts"] <= op[0]["ts"] and op[0]["ts"] + op[0]["dur"] <= act[0]["ts"] + \
        act[0]["dur"] + EPS_US
    names = [p["name"] for p in phases_of(op[0], evs)]
    expect = ["validate"]
    if H.machine_local_size() > 1:
        expect.append("local_allreduce")
    if H.machine_local_rank() == 0 and H.machine_size() > 1:
        expect.append("machine_gossip")
    if H.machine_local_size() > 1:
        expect.append("local_broadcast")
    expect.append("unpack")
    assert names == expect


def test_failed_op_is_recorded_with_its_error(tl):
    with pytest.raises(TypeError):
        decomm.neighbor_allreduce(torch.zeros(3, dtype=torch.int64), name="bad")
    evs = load(timeline.stop())
    bad = [e for e in evs if e["cat"] == "op"]
    assert len(bad) == 1 and "TypeError" in bad[0]["args"]["error"]


def test_timestamps_align_across_ranks(tl):
    """CLOCK_MONOTONIC is one clock per host: a barrier's events overlap on all ranks."""
    decomm.barrier()
    x = torch.ones(4)
    decomm.allreduce(x, name="sync")
    evs = load(timeline.stop())
    op = next(e for e in evs if e["cat"] == "op" and e["args"]["name"] == "sync")
    span = torch.tensor([op["ts"], op["ts"] + op["dur"]], dtype=torch.float64)
    spans = decomm.allgather(span.reshape(1, 2))
    # every rank's allreduce overlaps every other rank's (they wait for each other)
    assert float(spans[:, 0].max()) <= float(spans[:, 1].min()) + 1e3


def test_profiler_sees_decomm_ranges():
    from torch.profiler import ProfilerActivity, profile

    n = decomm.size()
    decomm.set_topology(T.RingGraph(n))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decomm.neighbor_allreduce(torch.ones(8), name="prof")
        h = decomm.neighbor_allreduce_nonblocking(torch.ones(8), name="prof2")
        h.wait()
    keys = {e.key for e in prof.key_averages()}
    assert "decomm::neighbor_allreduce" in keys, sorted(keys)[:20]
    assert "decomm::neighbor_allreduce.wait" in keys


def test_off_records_nothing():
    assert not timeline.enabled or os.environ.get("DECOMM_TIMELINE")
    if timeline.enabled:
        pytest.skip("DECOMM_TIMELINE is set for this run")
    timeline._reset_for_tests()
    decomm.neighbor_allreduce(torch.ones(3))
    assert timeline.events() == []
    assert np.isclose(decomm.allreduce(torch.ones(1)).item(), 1.0)
