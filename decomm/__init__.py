"""decomm: decentralized-learning communication for PyTorch.

Every rank keeps its own model and averages with a few neighbours per step
(``neighbor_allreduce``) over a topology that may change every step - Base-(k+1),
exponential, ring, EquiDyn, ... Typical use, launched with ``decomm-run -np 8 python
train.py`` (or ``mpirun``)::

    import decomm
    decomm.init()
    decomm.set_topology(decomm.topology.BaseGraph(decomm.size(), k=2))
    opt = decomm.optim.DSGD(torch.optim.SGD(model.parameters(), lr=0.1))

Convention: ``W[i, j]`` is the weight rank i gives to the value received from rank j;
one round of gossip is ``x <- W @ x``.
"""

from . import checkpoint, compression, fault, hierarchical, timeline, topology, win
from ._version import __version__
from .backends import built_with_cuda, cuda_available, nccl_available
from .errors import DecommError, PeerFailureError
from .fault import failed_ranks, launch_rank, recover
from .hierarchical import (
    get_machine_topology,
    hierarchical_neighbor_allreduce,
    hierarchical_neighbor_allreduce_,
    machine_rank,
    machine_size,
    set_machine_topology,
)
from .ops import (
    Handle,
    allgather,
    allreduce,
    allreduce_,
    allreduce_nonblocking,
    allreduce_nonblocking_,
    barrier,
    broadcast,
    broadcast_,
    broadcast_parameters,
    neighbor_allgather,
    neighbor_allreduce,
    neighbor_allreduce_,
    neighbor_allreduce_nonblocking,
    neighbor_allreduce_nonblocking_,
    neighbor_mix_delta,
    poll,
    synchronize,
)
from .runtime import (
    advance_round,
    current_round,
    get_timeout,
    get_topology,
    in_neighbors,
    init,
    is_initialized,
    local_rank,
    local_size,
    mpi_library_version,
    out_neighbors,
    rank,
    reset_stats,
    set_round,
    set_timeout,
    set_topology,
    shutdown,
    size,
    stats,
)
from .win import (
    win_accumulate,
    win_create,
    win_free,
    win_get,
    win_put,
    win_update,
    win_update_then_collect,
)

__all__ = [
    "DecommError",
    "Handle",
    "PeerFailureError",
    "__version__",
    "advance_round",
    "allgather",
    "allreduce",
    "allreduce_",
    "allreduce_nonblocking",
    "allreduce_nonblocking_",
    "barrier",
    "broadcast",
    "broadcast_",
    "broadcast_parameters",
    "built_with_cuda",
    "checkpoint",
    "compression",
    "cuda_available",
    "current_round",
    "failed_ranks",
    "fault",
    "get_machine_topology",
    "get_timeout",
    "get_topology",
    "hierarchical",
    "hierarchical_neighbor_allreduce",
    "hierarchical_neighbor_allreduce_",
    "in_neighbors",
    "init",
    "is_initialized",
    "launch_rank",
    "local_rank",
    "local_size",
    "machine_rank",
    "machine_size",
    "mpi_library_version",
    "nccl_available",
    "neighbor_allgather",
    "neighbor_allreduce",
    "neighbor_allreduce_",
    "neighbor_allreduce_nonblocking",
    "neighbor_allreduce_nonblocking_",
    "neighbor_mix_delta",
    "out_neighbors",
    "poll",
    "rank",
    "recover",
    "reset_stats",
    "set_machine_topology",
    "set_round",
    "set_timeout",
    "set_topology",
    "shutdown",
    "size",
    "stats",
    "synchronize",
    "timeline",
    "topology",
    "win",
    "win_accumulate",
    "win_create",
    "win_free",
    "win_get",
    "win_put",
    "win_update",
    "win_update_then_collect",
]


def __getattr__(name: str):  # lazy subpackages: optimizers and simulator pull in more
    if name in ("optim", "sim"):
        import importlib

        return importlib.import_module(f"decomm.{name}")
    raise AttributeError(f"module 'decomm' has no attribute {name!r}")
