"""CUDA tensors in decomm's ops: over NCCL when it can, else over MPI via pinned host memory.

Two paths, chosen once per job at ``decomm.init`` (:func:`setup`, collective) and then
per call by :func:`backend_for`:

* **NCCL** (``decomm._C_cuda.NcclBackend``): ``ncclSend``/``ncclRecv`` per neighbour in one
  group plus the fused CUDA weighted-sum kernel, on decomm's own stream, ordered after
  the caller's current stream. Used when every rank has a CUDA device, the CUDA
  extension was built with NCCL, and no two ranks share a GPU.
* **MPI, staged** (:class:`StagedBackend`): the tensor is copied to pinned host memory,
  the CPU backend (``decomm._C.MpiBackend``) exchanges and sums it, and the result is
  copied back on the caller's current stream. Works everywhere torch has CUDA (even
  without ``decomm._C_cuda``); its results are bitwise identical to the CPU path's.

More ranks than GPUs (``mpirun -np 25`` on an 8-GPU node): NCCL refuses two ranks on
one GPU, so :func:`setup` compares the GPUs' UUIDs across all ranks and, when any two
ranks share one, sends CUDA tensors over the staged MPI path and says so once (on
rank 0) instead of letting NCCL fail with "invalid usage".

Device choice for NCCL: the current device if the program picked one before
``decomm.init`` (``torch.cuda.set_device``), else ``local_rank() % torch.cuda.device_count()``
(made current), or ``DECOMM_CUDA_DEVICE`` when set. CUDA tensors must live on that device.

Everything here imports and runs on a CPU-only machine: the CUDA parts are reached only
for CUDA tensors, and the NCCL extension is imported only when it exists.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _agree, backends
from .errors import DecommError

__all__ = [
    "CudaPlan",
    "StagedBackend",
    "backend_for",
    "check_device",
    "setup",
    "status",
    "teardown",
]

# dtypes NCCL can sum (allreduce); others take the staged MPI path.
_NCCL_SUM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                    torch.int8, torch.uint8, torch.int32, torch.int64)


# ------------------------------------------------------------------ staged path
def _host_like(t: torch.Tensor) -> torch.Tensor:
    """An empty host tensor of ``t``'s shape and dtype, pinned when ``t`` is on a GPU."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of the CUDA tensor ``t``, complete when this returns."""
    host = _host_like(t)
    if t.numel():
        if t.device.type == "cuda":
            host.copy_(t, non_blocking=True)
            torch.cuda.current_stream(t.device).synchronize()
        else:  # (CPU tensors only reach here in tests of this glue)
            host.copy_(t)
    return host


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.device == b.device


class _StagedHandle:
    """A staged non-blocking op: the host op's handle, then the copy back on wait()."""

    def __init__(self, c_handle: Any, out: torch.Tensor, host_out: torch.Tensor) -> None:
        self._c = c_handle
        self._out = out
        self._host_out = host_out

    def poll(self) -> bool:
        return bool(self._c.poll())

    def wait(self) -> torch.Tensor:
        self._c.wait()
        # Ordered on the waiting thread's current stream; torch's pinned-memory
        # allocator keeps host_out alive until this copy has run.
        self._out.copy_(self._host_out, non_blocking=True)
        return self._out


class StagedBackend:
    """``decomm._C.MpiBackend``'s methods for CUDA tensors, staged through pinned memory.

    The exchange and the fused weighted sum run on the host (the same kernel as for
    CPU tensors); what moves over PCIe is the tensor down and the result up, not one
    copy per neighbour.
    """

    def __init__(self, mpi_backend: Any) -> None:
        self._mpi = mpi_backend

    def neighbor_allreduce(self, x: torch.Tensor, out: torch.Tensor, self_weight: float,
                           src: list[int], src_w: list[float], dst: list[int],
                           dst_w: list[float], name: str, round_: int, topo_hash: int,
                           nonblocking: bool) -> Any:
        hx = _to_pinned(x)
        hout = hx if _same_memory(x, out) else _host_like(x)
        h = self._mpi.neighbor_allreduce(hx, hout, self_weight, src, src_w, dst, dst_w, name,
                                         round_, topo_hash, nonblocking)
        return self._finish(h, out, hout, nonblocking)

    def allreduce(self, x: torch.Tensor, out: torch.Tensor, average: bool, name: str,
                  nonblocking: bool) -> Any:
        hx = _to_pinned(x)
        hout = hx if _same_memory(x, out) else _host_like(x)
        h = self._mpi.allreduce(hx, hout, average, name, nonblocking)
        return self._finish(h, out, hout, nonblocking)

    def broadcast(self, inout: torch.Tensor, root: int, name: str) -> None:
        host = _to_pinned(inout)
        self._mpi.broadcast(host, root, name)
        inout.copy_(host, non_blocking=True)

    def allgather(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self._mpi.allgather(_to_pinned(x), name).to(x.device)

    def neighbor_allgather(self, x: torch.Tensor, src: list[int], dst: list[int], name: str,
                           round_: int, topo_hash: int) -> torch.Tensor:
        r = self._mpi.neighbor_allgather(_to_pinned(x), src, dst, name, round_, topo_hash)
        return r.to(x.device)

    def barrier(self) -> None:
        self._mpi.barrier()

    @staticmethod
    def _finish(h: Any, out: torch.Tensor, hout: torch.Tensor, nonblocking: bool) -> Any:
        if nonblocking:
            return _StagedHandle(h, out, hout)
        out.copy_(hout, non_blocking=True)
        return h


# --------------------------------------------------------------------- the plan
@dataclass
class CudaPlan:
    """How this job moves CUDA tensors (the same on every rank)."""

    mode: str  # "nccl" or "mpi"
    reason: str  # why not NCCL ("" when mode == "nccl")
    device: int | None  # this rank's CUDA device for NCCL
    state: Any = None  # the runtime state this plan belongs to
    nccl: Any = None  # decomm._C_cuda.NcclBackend
    staged: StagedBackend | None = None
    announce_on_use: bool = False  # say `reason` (on rank 0) at the first CUDA op
    lock: threading.Lock = field(default_factory=threading.Lock)


_plan: CudaPlan | None = None


def _nccl_built() -> bool:
    return backends.nccl_built()


def _pick_device(local_rank: int) -> int:
    """The CUDA device this rank would use: the current one if the program chose one
    (``torch.cuda.set_device`` before ``decomm.init``), else ``local_rank % #GPUs``."""
    env = os.environ.get("DECOMM_CUDA_DEVICE")
    if env not in (None, ""):
        return int(env)
    if torch.cuda.is_initialized():
        return torch.cuda.current_device()
    return local_rank % max(1, torch.cuda.device_count())


def _gpu_identity(device: int) -> str:
    """A name of the physical GPU, the same in every process that sees it (its UUID)."""
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        return str(uuid)
    # Older torch: host + physical index (CUDA_VISIBLE_DEVICES maps the logical one).
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    physical = ids[device] if device < len(ids) else str(device)
    return f"{socket.gethostname()}:{physical}"


def _say(state: Any, message: str) -> None:
    if state.rank == 0:
        sys.stderr.write(f"[decomm] {message}\n")
        sys.stderr.flush()


def setup(state: Any, backend: str = "auto", *, check: bool | None = None) -> CudaPlan:
    """Decide how CUDA tensors travel (collective: call on every rank from ``init``).

    One small allgather over the CPU backend shares, per rank: whether CUDA works,
    whether NCCL was built, and which GPU (by UUID) the rank would use. NCCL is used
    when every rank has CUDA and NCCL and no two ranks share a GPU (and ``backend`` is
    not ``"mpi"``); ``backend="nccl"`` raises :class:`DecommError` on every rank when
    that is not so. Otherwise CUDA tensors take the staged MPI path.
    """
    global _plan
    teardown()
    if check is None:
        check = os.environ.get("DECOMM_CHECK", "1") != "0"
    has_cuda = torch.cuda.is_available()
    # Only a rank that could run NCCL picks a device and reads its UUID (CPU-only jobs on a
    # GPU machine leave CUDA alone beyond the availability check).
    nccl_built = has_cuda and backend != "mpi" and _nccl_built()
    device = _pick_device(state.local_rank) if nccl_built else None
    gpu = _agree.digest(_gpu_identity(device)) if device is not None else 0
    table = _agree.gather_rows(state.backend.allgather, [int(has_cuda), int(nccl_built), gpu],
                               "decomm.cuda_setup")

    no_cuda = [r for r, row in enumerate(table) if not row[0]]
    no_nccl = [r for r, row in enumerate(table) if row[0] and not row[1]]
    shared: dict[int, list[int]] = {}
    for r, row in enumerate(table):
        if row[1]:
            shared.setdefault(row[2], []).append(r)
    groups = [ranks for ranks in shared.values() if len(ranks) > 1]

    announce_now = False
    if backend == "mpi":
        reason = "decomm.init(backend='mpi') was asked for"
    elif len(no_cuda) == len(table):
        reason = "no rank has a usable CUDA device"
    elif no_cuda:
        reason = (f"rank(s) {no_cuda} have no usable CUDA device, so CUDA tensors (where they "
                  "exist) go over MPI")
    elif no_nccl:
        reason = (f"decomm was built without the NCCL backend on rank(s) {no_nccl} "
                  "(decomm.nccl_available() is False there), so CUDA tensors go over MPI, "
                  "staged through pinned host memory")
    elif groups:
        n_gpus = len(shared)
        sample = "; ".join(f"ranks {g} share one GPU" for g in groups[:4])
        more = f" (and {len(groups) - 4} more groups)" if len(groups) > 4 else ""
        reason = (f"{state.size} ranks but only {n_gpus} distinct GPU(s): {sample}{more}. "
                  "NCCL needs one GPU per rank, so CUDA tensors go over MPI, staged through "
                  "pinned host memory (slower; use at most one rank per GPU for NCCL, or "
                  "decomm.init(backend='mpi') to silence this message)")
        announce_now = True
    else:
        reason = ""
    if backend == "nccl" and reason:
        raise DecommError(f"decomm.init(backend='nccl'): NCCL cannot be used: {reason}")

    plan = CudaPlan(mode="mpi", reason=reason, device=device, state=state,
                    staged=StagedBackend(state.backend))
    if not reason:
        if not torch.cuda.is_initialized() or torch.cuda.current_device() != device:
            torch.cuda.set_device(device)
        from . import _C_cuda  # type: ignore[attr-defined]

        try:
            plan.nccl = _C_cuda.NcclBackend(state.comm.py2f(), device,
                                            float(state.backend.timeout), bool(check))
            plan.mode = "nccl"
        except DecommError as e:  # raised on every rank alike (the C++ side agrees first)
            if backend == "nccl":
                raise
            plan.reason = f"the NCCL communicator could not be created ({e}); CUDA tensors " \
                          "go over MPI, staged through pinned host memory"
            announce_now = True
    if announce_now:
        _say(state, plan.reason)
    else:
        plan.announce_on_use = bool(plan.reason) and backend != "mpi"
    _plan = plan
    return plan


def teardown(state: Any = None) -> None:
    """Close the NCCL backend (if any); from ``shutdown`` (safe to call twice)."""
    global _plan
    plan = _plan
    if plan is None or (state is not None and plan.state is not state):
        return
    _plan = None
    if plan.nccl is not None:
        plan.nccl.close()


atexit.register(teardown)


def _plan_for(state: Any) -> CudaPlan:
    """The plan of this runtime state. Without one (``init`` did not call :func:`setup`),
    CUDA tensors take the staged MPI path, which needs no agreement between ranks."""
    global _plan
    plan = _plan
    if plan is None or plan.state is not state:
        plan = CudaPlan(mode="mpi", reason="", device=None, state=state,
                        staged=StagedBackend(state.backend))
        _plan = plan
    return plan


def check_device(t: torch.Tensor, where: str) -> None:
    """Raise for tensors on devices decomm cannot move (anything but CPU and CUDA);
    ``where`` starts the message (``"neighbor_allreduce 'x' on rank 3"``)."""
    if t.device.type not in ("cpu", "cuda"):
        raise DecommError(f"{where}: tensor is on {t.device}; decomm moves CPU and CUDA "
                          "tensors only")


def backend_for(state: Any, t: torch.Tensor, op: str = "") -> Any:
    """The object that runs ``op`` on ``t``: ``state.backend`` for CPU tensors; for CUDA
    tensors the NCCL backend or the staged MPI one. All have MpiBackend's methods."""
    if not t.is_cuda:  # (t.device.type costs 5x more: this is on every op's path)
        return state.backend
    plan = _plan_for(state)
    if plan.nccl is not None and (op != "allreduce" or t.dtype in _NCCL_SUM_DTYPES):
        timeout = state.backend.timeout
        if plan.nccl.timeout != timeout:  # follow decomm.set_timeout()
            plan.nccl.timeout = timeout
        return plan.nccl
    if plan.announce_on_use:
        with plan.lock:
            if plan.announce_on_use:
                plan.announce_on_use = False
                _say(state, plan.reason)
    return plan.staged


def status() -> dict[str, Any]:
    """How CUDA tensors travel in this job: ``{"mode": "nccl"|"mpi"|None, "reason", "device"}``."""
    plan = _plan
    if plan is None:
        return {"mode": None, "reason": "decomm is not initialized (or init did not set up "
                "CUDA)", "device": None}
    return {"mode": plan.mode, "reason": plan.reason, "device": plan.device}
