"""decomm.timeline without MPI: the decorator, the event format, the file, the env var."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decomm import timeline

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture
def tl(tmp_path):
    assert not timeline.enabled, "DECOMM_TIMELINE must not be set for the unit tests"
    timeline._reset_for_tests()
    timeline.start(str(tmp_path / "sub" / "t-"))
    yield tmp_path
    timeline.stop()
    timeline._reset_for_tests()


@timeline.traced("demo")
def demo(tensor, scale, name=None):
    with timeline.phase("inner", k=1):
        return tensor * scale


@timeline.traced("boom")
def boom(tensor, name=None):
    raise ValueError("bad input")


def test_off_is_a_plain_call():
    timeline._reset_for_tests()
    assert demo(torch.ones(2), 3.0, name="x").tolist() == [3.0, 3.0]
    assert timeline.events() == []
    assert demo.__decomm_traced__ == "demo" and demo.__wrapped__.__name__ == "demo"
    assert timeline.phase("p") is timeline.activity("a")  # the shared no-op context


def test_events_and_file(tl):
    x = torch.zeros(3, 4, dtype=torch.float64)
    demo(x, 2.0, name="first")
    demo(x, 2.0, name="second")
    with timeline.activity("user", step=7):
        demo(torch.ones(1), 1.0)
    with pytest.raises(ValueError):
        boom(torch.ones(1), name="b")
    path = timeline.flush()
    assert path == str(tl / "sub" / "t-0.json") and os.path.exists(path)
    doc = json.loads(Path(path).read_text())
    assert doc["displayTimeUnit"] == "ms" and doc["otherData"]["clock"] == "CLOCK_MONOTONIC"
    evs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    meta = [e for e in doc["traceEvents"] if e["ph"] == "M"]
    assert {"process_name", "thread_name"} <= {m["name"] for m in meta}
    ops = [e for e in evs if e["cat"] == "op"]
    assert [(e["name"], e["args"]["name"]) for e in ops] == [
        ("demo", "first"), ("demo", "second"), ("demo", "demo"), ("boom", "b")]
    assert ops[0]["args"]["bytes"] == 96 and ops[0]["args"]["dtype"] == "float64"
    assert ops[0]["args"]["shape"] == [3, 4]
    assert "ValueError: bad input" in ops[3]["args"]["error"]
    inner = [e for e in evs if e["name"] == "inner"]
    assert len(inner) == 3 and inner[0]["args"] == {"k": 1}
    for op, ph in zip(ops, inner):
        assert op["ts"] <= ph["ts"] and ph["ts"] + ph["dur"] <= op["ts"] + op["dur"] + 1e-3
    act = [e for e in evs if e["cat"] == "activity"]
    assert len(act) == 1 and act[0]["args"] == {"step": 7}
    assert act[0]["ts"] <= ops[2]["ts"]
    for e in evs:
        assert isinstance(e["ts"], float) and e["dur"] >= 0 and e["pid"] == 0
    assert timeline.events() == [e for e in evs]  # the same dicts as the file


def test_stop_writes_and_disables(tl):
    demo(torch.ones(1), 1.0)
    path = timeline.stop()
    assert not timeline.enabled and os.path.exists(path)
    demo(torch.ones(1), 1.0)
    assert len([e for e in timeline.events() if e["cat"] == "op"]) == 1
    timeline.start(str(tl / "again-"))  # the fixture's stop() needs a started timeline


def test_event_cap_counts_drops(tl, monkeypatch):
    monkeypatch.setattr(timeline, "MAX_EVENTS", 5)
    for _ in range(10):
        demo(torch.ones(1), 1.0)
    doc = json.loads(Path(timeline.flush()).read_text())
    assert len([e for e in doc["traceEvents"] if e["ph"] == "X"]) == 5
    assert doc["otherData"]["dropped_events"] == 15


def test_bad_arguments():
    with pytest.raises(ValueError):
        timeline.start("")
    with pytest.raises(ValueError):
        timeline.activity("")


def test_threads_get_their_own_lanes(tl):
    import threading

    th = threading.Thread(target=lambda: demo(torch.ones(1), 1.0, name="bg"), name="worker-1")
    th.start()
    th.join()
    demo(torch.ones(1), 1.0, name="fg")
    doc = json.loads(Path(timeline.flush()).read_text())
    ops = {e["args"]["name"]: e["tid"] for e in doc["traceEvents"] if e.get("cat") == "op"}
    assert ops["bg"] != ops["fg"]
    names = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names[ops["bg"]] == "worker-1"


def test_profiler_range_without_timeline():
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        demo(torch.ones(2), 2.0)
    assert "decomm::demo" in {e.key for e in prof.key_averages()}
    assert timeline.events() == []


def test_env_var_writes_file_at_exit(tmp_path):
    """A singleton MPI process with DECOMM_TIMELINE set: the file appears at exit."""
    prefix = str(tmp_path / "env-")
    code = (
        "import torch, decomm\n"
        "from decomm import timeline\n"
        "assert timeline.enabled\n"
        "decomm.init()\n"
        "decomm.neighbor_allreduce(torch.ones(8), name='env-op')\n"
        "with timeline.activity('work'):\n"
        "    pass\n"
    )
    env = dict(os.environ, DECOMM_TIMELINE=prefix, PYTHONPATH=str(ROOT),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(Path(prefix + "0.json").read_text())
    evs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    op = [e for e in evs if e["cat"] == "op" and e["args"]["name"] == "env-op"]
    assert len(op) == 1
    phases = [e["name"] for e in evs if e["cat"] == "phase"]
    assert phases == ["validate", "pack", "send/recv", "reduce", "unpack"]
    assert any(e["cat"] == "activity" and e["name"] == "work" for e in evs)


def test_env_var_process_that_never_joined_writes_nothing(tmp_path):
    """DECOMM_TIMELINE reaches every process that imports decomm, decomm-run included;
    one that never calls decomm.init() must leave the ranks' files alone at exit."""
    prefix = str(tmp_path / "env-")
    rank0 = Path(prefix + "0.json")
    rank0.write_text('{"traceEvents": ["a real rank wrote this"]}')
    code = "import decomm\nassert decomm.timeline.enabled\n"
    env = dict(os.environ, DECOMM_TIMELINE=prefix, PYTHONPATH=str(ROOT))
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert rank0.read_text() == '{"traceEvents": ["a real rank wrote this"]}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env-0.json"]
