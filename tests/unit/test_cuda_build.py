"""The GPU path as a CPU-only machine can check it.

* the availability queries answer (False here) without raising;
* csrc/cuda/weighted_sum.cu compiles with plain nvcc (one arch), with 16-byte vector
  loads and no FMA contraction in its PTX;
* setup.py's CUDA decision is False here, and DECOMM_WITH_CUDA=1 fails loudly;
* decomm.cuda_ops / decomm.interop import and behave on CPU, including the staging
  glue (driven with CPU tensors and a stand-in for the MPI backend).
"""

from __future__ import annotations

import ast
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import decomm

ROOT = Path(__file__).resolve().parents[2]
CPU_ONLY_TORCH = torch.version.cuda is None


# ----------------------------------------------------------------- availability
def test_availability_queries_answer_without_raising():
    for fn in (decomm.built_with_cuda, decomm.cuda_available, decomm.nccl_available):
        assert isinstance(fn(), bool)
    if CPU_ONLY_TORCH or not torch.cuda.is_available():
        assert decomm.cuda_available() is False
        assert decomm.nccl_available() is False
    if CPU_ONLY_TORCH:  # the CUDA extension cannot have been built
        assert decomm.built_with_cuda() is False


def test_gpu_modules_import_on_cpu():
    from decomm import cuda_ops, interop

    st = cuda_ops.status()
    assert set(st) == {"mode", "reason", "device"}
    assert callable(cuda_ops.backend_for) and callable(interop.as_torch)


# ------------------------------------------------------------------------ nvcc
def _nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


@pytest.mark.timeout(300)
def test_kernel_compiles_with_nvcc(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    src = ROOT / "csrc" / "cuda" / "weighted_sum.cu"
    obj = tmp_path / "weighted_sum.o"
    cmd = [nvcc, "-c", "-O3", "-std=c++17", "-arch=sm_80", "--keep", "--keep-dir",
           str(tmp_path), str(src), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, f"{shlex.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert obj.stat().st_size > 0
    ptx = "\n".join(p.read_text() for p in tmp_path.glob("*.ptx"))
    assert ptx, "nvcc --keep left no PTX"
    # 16-byte loads: 8 halves / 4 floats as v4 words, 2 doubles as v2.f64
    assert "ld.global.v4" in ptx and "ld.global.v2.f64" in ptx
    # multiplies and adds rounded separately, as in the CPU kernel
    assert "fma.rn" not in ptx
    assert "ld.local" not in ptx and "st.local" not in ptx  # no spills / local copies


# ----------------------------------------------------------------------- setup
def _setup_functions() -> dict:
    """want_cuda_extension and find_nvcc from setup.py, without running setup()."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    wanted = {"find_nvcc", "want_cuda_extension"}
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {n.name for n in body} == wanted
    ns = {"os": os, "shutil": shutil, "sys": sys, "Path": Path}
    exec(compile("from __future__ import annotations", "setup.py", "exec"), ns)
    exec(compile(ast.Module(body=body, type_ignores=[]), "setup.py", "exec"), ns)
    return ns


@pytest.mark.skipif(not CPU_ONLY_TORCH, reason="torch here has CUDA")
def test_setup_decides_no_cuda_extension_here():
    fns = _setup_functions()
    assert fns["want_cuda_extension"]({}) is False
    assert fns["want_cuda_extension"]({"DECOMM_WITH_CUDA": "0"}) is False


def test_setup_cuda_switch_is_validated():
    fns = _setup_functions()
    assert fns["want_cuda_extension"]({"DECOMM_WITH_CUDA": "0"}) is False
    with pytest.raises(SystemExit, match="DECOMM_WITH_CUDA must be 0 or 1"):
        fns["want_cuda_extension"]({"DECOMM_WITH_CUDA": "yes"})


@pytest.mark.skipif(not CPU_ONLY_TORCH, reason="torch here has CUDA")
def test_forcing_cuda_without_cuda_torch_fails_loudly():
    fns = _setup_functions()
    with pytest.raises(SystemExit, match=r"DECOMM_WITH_CUDA=1.*torch\.version\.cuda is None"):
        fns["want_cuda_extension"]({"DECOMM_WITH_CUDA": "1"})


@pytest.mark.timeout(120)
@pytest.mark.skipif(not CPU_ONLY_TORCH, reason="torch here has CUDA")
def test_setup_py_with_forced_cuda_exits_with_the_reason():
    env = dict(os.environ, DECOMM_WITH_CUDA="1")
    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "DECOMM_WITH_CUDA=1" in proc.stderr and "no CUDA support" in proc.stderr, proc.stderr


# -------------------------------------------------------------- interop (numpy)
def test_interop_numpy_and_torch():
    from decomm import interop

    a = np.arange(6, dtype=np.float32)
    t, back = interop.as_torch(a)
    assert t.data_ptr() == a.ctypes.data  # contiguous: no copy
    out = back(t * 2)
    assert isinstance(out, np.ndarray) and out.tolist() == [0, 2, 4, 6, 8, 10]
    x = torch.ones(3, requires_grad=True)
    tx, back_t = interop.as_torch(x)
    assert not tx.requires_grad and tx.data_ptr() == x.data_ptr() and back_t(tx) is tx
    assert interop.as_torch([1.0, 2.0]) is None
    assert not interop.is_cupy_array(a)
    with pytest.raises(TypeError, match="not supported"):
        interop.as_torch(np.array(["a"]))


# ------------------------------------------------------ cuda_ops glue on the CPU
class _FakeMpi:
    """Stands in for decomm._C.MpiBackend: records calls, computes 2*x."""

    def __init__(self):
        self.calls = []
        self.timeout = 30.0

    def neighbor_allreduce(self, x, out, *args):
        self.calls.append(("neighbor_allreduce", x, out, args))
        out.copy_(x * 2)
        return _FakeHandle(out)

    def allreduce(self, x, out, average, name, nonblocking):
        self.calls.append(("allreduce", x, out, average))
        out.copy_(x * 2)
        return _FakeHandle(out)

    def broadcast(self, t, root, name):
        t.fill_(float(root))

    def allgather(self, x, name):
        return torch.cat([x, x])

    def neighbor_allgather(self, x, src, dst, name, rnd, h):
        return torch.cat([x] * len(src))


class _FakeHandle:
    def __init__(self, out):
        self.out = out

    def poll(self):
        return True

    def wait(self):
        return self.out


class _FakeState:
    def __init__(self):
        self.backend = _FakeMpi()


def test_backend_for_keeps_cpu_tensors_on_the_cpu_backend():
    from decomm import cuda_ops

    state = _FakeState()
    assert cuda_ops.backend_for(state, torch.zeros(2), "neighbor_allreduce") is state.backend
    cuda_ops.check_device(torch.zeros(1), "op 'name' on rank 0")
    with pytest.raises(decomm.DecommError, match="op 'name' on rank 0: tensor is on meta"):
        cuda_ops.check_device(torch.zeros(1, device="meta"), "op 'name' on rank 0")


def test_staged_backend_copies_through_host_buffers():
    from decomm.cuda_ops import StagedBackend

    fake = _FakeMpi()
    sb = StagedBackend(fake)
    x = torch.arange(4.0)
    out = torch.empty(4)
    sb.neighbor_allreduce(x, out, 0.5, [1], [0.5], [1], [1.0], "n", 0, 0, False)
    assert out.tolist() == [0, 2, 4, 6]
    _, hx, hout, _ = fake.calls[-1]
    assert hx.data_ptr() != x.data_ptr() and hout.data_ptr() != hx.data_ptr()
    # in place: one host buffer serves as input and output
    sb.neighbor_allreduce(x, x, 0.5, [1], [0.5], [1], [1.0], "n", 0, 0, False)
    _, hx, hout, _ = fake.calls[-1]
    assert hx.data_ptr() == hout.data_ptr() and x.tolist() == [0, 2, 4, 6]
    # non-blocking: the copy back happens in wait()
    y = torch.ones(3)
    res = torch.zeros(3)
    h = sb.allreduce(y, res, True, "a", True)
    assert res.tolist() == [0, 0, 0] and h.poll()
    assert h.wait() is res and res.tolist() == [2, 2, 2]
    b = torch.zeros(2)
    sb.broadcast(b, 1, "b")
    assert b.tolist() == [1, 1]
    assert sb.allgather(torch.ones(2), "g").tolist() == [1, 1, 1, 1]
    assert sb.neighbor_allgather(torch.ones(1), [0, 2], [0, 2], "ng", 0, 0).tolist() == [1, 1]
