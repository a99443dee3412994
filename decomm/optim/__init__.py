"""Decentralized optimizer wrappers around any ``torch.optim.Optimizer``.

Typical use (under ``mpirun -np N``)::

    import decomm
    from decomm.optim import DSGD, GradientTracking, D2

    decomm.init()
    decomm.set_topology(decomm.topology.BaseGraph(decomm.size(), 2))
    model = Net()
    opt = GradientTracking(torch.optim.SGD(model.parameters(), lr=0.1))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()          # local update + ONE neighbor_allreduce per dtype + advance_round
        sched.step()
    print(decomm.optim.consensus_distance(model))

The constructor broadcasts rank 0's parameters (``broadcast_parameters=False``
to skip) after checking that all ranks wrap parameters of the same shapes
(``decomm.DecommError`` naming the parameter and rank otherwise), and moves the
parameters into one flat buffer per dtype (``p.data`` becomes a view), so a
step communicates one contiguous buffer with no copy.  The same classes run
over n virtual nodes in one process with :mod:`decomm.sim`.
"""

from ._base import DecentralizedOptimizer, Mix
from .async_gossip import AsyncGossip
from .choco import ChocoSGD
from .comm import Communicator, LocalCommunicator, MPICommunicator, PendingExchange
from .d2 import D2
from .dsgd import DSGD
from .exact_diffusion import ExactDiffusion
from .gradient_tracking import GradientTracking
from .monitor import consensus_distance
from .push_digging import PushDIGing
from .push_sum import PushSum
from .qgm import QGDSGDm

__all__ = [
    "D2",
    "DSGD",
    "AsyncGossip",
    "ChocoSGD",
    "Communicator",
    "DecentralizedOptimizer",
    "ExactDiffusion",
    "GradientTracking",
    "LocalCommunicator",
    "MPICommunicator",
    "Mix",
    "PendingExchange",
    "PushDIGing",
    "PushSum",
    "QGDSGDm",
    "consensus_distance",
]
