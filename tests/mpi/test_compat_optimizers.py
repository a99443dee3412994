"""BlueFog-compat optimizers and the collective topology helpers, against closed forms.

Model: one parameter vector ``x_i`` per rank (d = 3, float64) and the loss
``<x, a>``, whose gradient is the input ``a`` itself; with SGD(lr) the update is
``u = lr * a``.  Every rank computes the expected parameters of *all* ranks with
numpy (the mixing matrix ``W[i, j]`` from the weights the test sets) and checks its
own row, exactly up to float64 rounding (1e-12).
"""

from __future__ import annotations

import warnings

import networkx as nx
import numpy as np
import pytest
import torch
from torch import nn

import decomm
import decomm.compat.bluefog as bf
from decomm.compat.bluefog import optimizers as bfo
from decomm.compat.bluefog import topology_util as tu

D = 3
LR = 0.1
TOL = 1e-12


class Vec(nn.Module):
    def __init__(self, init: np.ndarray) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(init, dtype=torch.float64))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return (self.x * a).sum()


def x0(n: int) -> np.ndarray:
    return np.array([[i + 0.5 * k for k in range(D)] for i in range(n)], dtype=np.float64)


def grad_input(i: int, t: int) -> np.ndarray:
    return np.array([1.0 + i + t, -0.5 * i, 0.25 * (t + 1)])


def setup(n: int, r: int, opt_factory, **kw):
    model = Vec(x0(n)[r])
    opt = opt_factory(torch.optim.SGD(model.parameters(), lr=LR), model, **kw)
    return model, opt


def train_step(model, opt, r, t, micro=1):
    opt.zero_grad()
    for m in range(micro):
        model(torch.tensor(grad_input(r, t + 100 * m))).backward()
    opt.step()


def u_all(n: int, t: int, micro=1) -> np.ndarray:
    return LR * np.array([sum(grad_input(i, t + 100 * m) for m in range(micro))
                          for i in range(n)])


def mine(model) -> np.ndarray:
    return model.x.detach().numpy().copy()


def uniform_ring(n: int) -> np.ndarray:
    W = np.zeros((n, n))
    for i in range(n):
        ins = sorted({(i - 1) % n, (i + 1) % n} - {i})
        W[i, i] = 1.0 / (len(ins) + 1)
        for j in ins:
            W[i, j] = 1.0 / (len(ins) + 1)
    return W


def set_graph(G: nx.DiGraph, is_weighted: bool = False) -> None:
    """bf.set_topology, forced through even if the compat layer already holds ``G``
    (the MPI conftest resets decomm's own topology before every test)."""
    n = decomm.size()
    identity = nx.DiGraph()
    identity.add_weighted_edges_from([(i, i, 1.0) for i in range(n)])
    assert bf.set_topology(identity)
    assert bf.set_topology(G, is_weighted=is_weighted)


@pytest.fixture(autouse=True)
def ring():
    set_graph(tu.RingGraph(decomm.size()))
    yield


# ------------------------------------------------------------- ATC / AWC
@pytest.mark.parametrize("atc", [True, False])
def test_static_default_weights(atc):
    n, r = decomm.size(), decomm.rank()
    fac = (bfo.DistributedAdaptThenCombineOptimizer if atc
           else bfo.DistributedAdaptWithCombineOptimizer)
    model, opt = setup(n, r, fac)
    X, W = x0(n), uniform_ring(n)
    for t in range(3):
        train_step(model, opt, r, t)
        X = W @ (X - u_all(n, t)) if atc else W @ X - u_all(n, t)
        np.testing.assert_allclose(mine(model), X[r], rtol=0, atol=TOL)
    opt.close()


def test_default_weights_follow_bluefog_rule():
    """Unweighted graph: uniform 1/(indeg+1), whatever its edge weights; weighted: its weights."""
    n, r = decomm.size(), decomm.rank()
    if n == 1:
        pytest.skip("needs a neighbour")
    W = 0.7 * np.eye(n) + 0.3 * np.roll(np.eye(n), -1, axis=1)  # i receives from i - 1
    G = nx.from_numpy_array(W.T, create_using=nx.DiGraph)  # BlueFog: edge j -> i, weight W[i, j]
    U = 0.5 * np.eye(n) + 0.5 * np.roll(np.eye(n), -1, axis=1)  # uniform over {i, i - 1}
    for weighted, M in ((False, U), (True, W)):
        set_graph(G, is_weighted=weighted)
        model, opt = setup(n, r, bfo.DistributedAdaptThenCombineOptimizer)
        train_step(model, opt, r, 0)
        np.testing.assert_allclose(mine(model), (M @ (x0(n) - u_all(n, 0)))[r], atol=TOL)
        opt.close()


@pytest.mark.parametrize("atc", [True, False])
def test_dynamic_knobs_take_effect(atc):
    """self_weight/src_weights/dst_weights set before each step define that step's W."""
    n, r = decomm.size(), decomm.rank()
    if n == 1:
        pytest.skip("needs a neighbour")
    fac = (bfo.DistributedAdaptThenCombineOptimizer if atc
           else bfo.DistributedAdaptWithCombineOptimizer)
    model, opt = setup(n, r, fac)
    X = x0(n)
    for t in range(4):
        shift = 1 + t % max(n - 1, 1)  # one peer: send to i + shift, receive from i - shift
        sw = 0.25 + 0.05 * t
        W = sw * np.eye(n)
        for i in range(n):
            W[i, (i - shift) % n] += 1 - sw
        opt.self_weight = sw
        opt.src_weights = {(r - shift) % n: 1 - sw}
        opt.dst_weights = [(r + shift) % n]  # BlueFog's list form: weight 1
        opt.enable_topo_check = bool(t % 2)
        train_step(model, opt, r, t)
        X = W @ (X - u_all(n, t)) if atc else W @ X - u_all(n, t)
        np.testing.assert_allclose(mine(model), X[r], rtol=0, atol=TOL)
    opt.close()


def test_dst_weights_scale_what_is_sent():
    n, r = decomm.size(), decomm.rank()
    if n == 1:
        pytest.skip("needs a neighbour")
    model, opt = setup(n, r, bfo.DistributedAdaptThenCombineOptimizer)
    opt.self_weight, opt.src_weights = 0.5, {(r - 1) % n: 1.0}
    opt.dst_weights = {(r + 1) % n: 0.5}  # the receiver's weight 1 times the sender's 0.5
    train_step(model, opt, r, 0)
    W = 0.5 * np.eye(n) + 0.5 * np.roll(np.eye(n), -1, axis=1)
    if n == 2:
        W = np.full((2, 2), 0.5)
    np.testing.assert_allclose(mine(model), (W @ (x0(n) - u_all(n, 0)))[r], atol=TOL)
    opt.close()


def test_enable_topo_check_reports_mismatch():
    n, r = decomm.size(), decomm.rank()
    if n == 1:
        pytest.skip("needs a neighbour")
    model, opt = setup(n, r, bfo.DistributedAdaptThenCombineOptimizer)
    opt.enable_topo_check = True
    opt.self_weight, opt.dst_weights = 0.5, [(r + 1) % n]
    # every rank expects its message from i + 1 while it arrives from i - 1 (n >= 3);
    # for n = 2 rank 1 lists nobody
    opt.src_weights = {(r + 1) % n: 0.5} if n > 2 else ({} if r == 1 else {1: 0.5})
    with pytest.raises(ValueError, match="topology check"):
        train_step(model, opt, r, 0)
    opt.close()


@pytest.mark.parametrize("atc", [True, False])
def test_num_steps_per_communication_counts_passes_local_steps(atc):
    """J forward/backward/step iterations: J - 1 local steps, then one exchange."""
    n, r = decomm.size(), decomm.rank()
    J = 3
    fac = (bfo.DistributedAdaptThenCombineOptimizer if atc
           else bfo.DistributedAdaptWithCombineOptimizer)
    model, opt = setup(n, r, fac, num_steps_per_communication=J)
    X, W = x0(n), uniform_ring(n)
    for t in range(2 * J):
        train_step(model, opt, r, t)
        mix = n > 1 and (t + 1) % J == 0
        if not mix:
            X = X - u_all(n, t)
        else:
            X = W @ (X - u_all(n, t)) if atc else W @ X - u_all(n, t)
        np.testing.assert_allclose(mine(model), X[r], rtol=0, atol=TOL)
    opt.close()


@pytest.mark.parametrize("atc", [True, False])
def test_num_steps_per_communication_gradient_accumulation(atc):
    """J micro-batches then one step: every step exchanges, with the accumulated gradient."""
    n, r = decomm.size(), decomm.rank()
    J = 2
    fac = (bfo.DistributedAdaptThenCombineOptimizer if atc
           else bfo.DistributedAdaptWithCombineOptimizer)
    model, opt = setup(n, r, fac, num_steps_per_communication=J)
    X, W = x0(n), uniform_ring(n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Unexpected behavior" warning on J passes
        for t in range(3):
            train_step(model, opt, r, t, micro=J)
            X = W @ (X - u_all(n, t, J)) if atc else W @ X - u_all(n, t, J)
            np.testing.assert_allclose(mine(model), X[r], rtol=0, atol=TOL)
    opt.close()


def test_eval_forward_is_not_counted_and_extra_passes_warn():
    n, r = decomm.size(), decomm.rank()
    if n == 1:
        pytest.skip("passes are counted only with neighbours (as in BlueFog)")
    model, opt = setup(n, r, bfo.DistributedAdaptWithCombineOptimizer,
                       num_steps_per_communication=2)
    model.eval()
    with torch.no_grad():
        for _ in range(5):
            model(torch.ones(D))
    assert opt._passes == 0
    model.train()
    with pytest.warns(UserWarning, match="Unexpected behavior"):
        for _ in range(3):
            model(torch.ones(D))
    opt.zero_grad()
    model(torch.ones(D)).backward()
    opt.step()  # due: exchanges (collectively, on every rank) and resets the count
    assert opt._passes == 0
    opt.close()


@pytest.mark.parametrize("atc", [True, False])
@pytest.mark.parametrize("kind", ["allreduce", "empty"])
def test_allreduce_and_empty(atc, kind):
    n, r = decomm.size(), decomm.rank()
    fac = (bfo.DistributedAdaptThenCombineOptimizer if atc
           else bfo.DistributedAdaptWithCombineOptimizer)
    model, opt = setup(n, r, fac, communication_type=bfo.CommunicationType[kind])
    X = x0(n)
    M = np.full((n, n), 1.0 / n) if kind == "allreduce" else np.eye(n)
    for t in range(2):
        train_step(model, opt, r, t)
        X = M @ (X - u_all(n, t)) if atc else M @ X - u_all(n, t)
        np.testing.assert_allclose(mine(model), X[r], rtol=0, atol=TOL)
    opt.close()


@pytest.mark.parametrize("atc", [True, False])
def test_hierarchical_on_one_machine_is_the_global_average(atc):
    """All ranks of this job share one host (one machine): the machine mean is the
    global mean and there is no other machine to gossip with."""
    n, r = decomm.size(), decomm.rank()
    if n == 1 or bf.machine_size() != 1:
        pytest.skip("needs 2+ ranks on one machine")
    bf.set_machine_topology(tu.ExponentialGraph(1))
    fac = (bfo.DistributedAdaptThenCombineOptimizer if atc
           else bfo.DistributedAdaptWithCombineOptimizer)
    model, opt = setup(n, r, fac,
                       communication_type=bfo.CommunicationType.hierarchical_neighbor_allreduce)
    M = np.full((n, n), 1.0 / n)
    X = x0(n)
    for t in range(2):
        train_step(model, opt, r, t)
        X = M @ (X - u_all(n, t)) if atc else M @ X - u_all(n, t)
        np.testing.assert_allclose(mine(model), X[r], rtol=0, atol=TOL)
    opt.close()


def test_communication_type_switch_and_deprecated_aliases():
    n, r = decomm.size(), decomm.rank()
    with pytest.warns(PendingDeprecationWarning, match="deprecated"):
        model, opt = setup(n, r, bfo.DistributedAllreduceOptimizer)
    assert opt.communication_type is bfo.CommunicationType.allreduce
    train_step(model, opt, r, 0)
    X = np.full((n, n), 1.0 / n) @ x0(n) - u_all(n, 0)
    np.testing.assert_allclose(mine(model), X[r], atol=TOL)
    opt.communication_type = bfo.CommunicationType.empty
    train_step(model, opt, r, 1)
    np.testing.assert_allclose(mine(model), (X - u_all(n, 1))[r], atol=TOL)
    with pytest.raises(TypeError, match="CommunicationType"):
        opt.communication_type = "allreduce"
    opt.close()
    with pytest.warns(PendingDeprecationWarning):
        _, opt = setup(n, r, bfo.DistributedNeighborAllreduceOptimizer)
    assert opt.communication_type is bfo.CommunicationType.neighbor_allreduce
    opt.close()


def test_constructor_errors():
    n, r = decomm.size(), decomm.rank()
    model = Vec(x0(n)[r])
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.raises(TypeError, match="communication_type"):
        bfo.DistributedAdaptWithCombineOptimizer(sgd, model, communication_type="allreduce")
    with pytest.raises(ValueError, match="num_steps_per_communication"):
        bfo.DistributedAdaptThenCombineOptimizer(sgd, model, num_steps_per_communication=0)
    with pytest.raises(ValueError, match="not parameters of the model"):
        bfo.DistributedAdaptThenCombineOptimizer(sgd, Vec(x0(n)[r]))
    with pytest.raises(TypeError, match="model must be"):
        bfo.DistributedGradientAllreduceOptimizer(sgd, "model")


@pytest.mark.filterwarnings("ignore:Unexpected behavior")  # the failed steps do not reset
def test_knob_errors():
    n, r = decomm.size(), decomm.rank()
    if n == 1:
        pytest.skip("knobs are read at exchanges only")
    model, opt = setup(n, r, bfo.DistributedAdaptThenCombineOptimizer)
    opt.dst_weights = [(r + 1) % n]
    with pytest.raises(ValueError, match="should be presented"):
        train_step(model, opt, r, 0)
    opt.dst_weights, opt.self_weight = None, 0.5
    with pytest.raises(ValueError, match="same time"):
        train_step(model, opt, r, 0)
    opt.close()


def test_register_step_function():
    n, r = decomm.size(), decomm.rank()
    model, opt = setup(n, r, bfo.DistributedAdaptThenCombineOptimizer)

    def double_lr(self, p, grad, group):
        p.data.add_(grad, alpha=-2 * group["lr"])

    opt.register_step_function(double_lr)
    train_step(model, opt, r, 0)
    np.testing.assert_allclose(mine(model), (uniform_ring(n) @ (x0(n) - 2 * u_all(n, 0)))[r],
                               atol=TOL)
    with pytest.raises(TypeError, match="callable"):
        opt.register_step_function(3)
    opt.close()


def test_turn_on_timeline_records_forward_and_backward(tmp_path):
    n, r = decomm.size(), decomm.rank()
    model, opt = setup(n, r, bfo.DistributedAdaptWithCombineOptimizer)
    decomm.timeline.start(str(tmp_path / "tl-"))
    try:
        opt.turn_on_timeline()
        train_step(model, opt, r, 0)
        spans = [e["name"] for e in decomm.timeline.events()]
        assert spans.count("FORWARD") == 1 and spans.count("GRADIENT COMPT.") == 1, spans
        opt.turn_off_timeline()
        train_step(model, opt, r, 1)
        spans = [e["name"] for e in decomm.timeline.events()]
        assert spans.count("FORWARD") == 1 and spans.count("GRADIENT COMPT.") == 1, spans
    finally:
        decomm.timeline.stop()
        opt.close()


# ------------------------------------------------------- gradient allreduce
def test_gradient_allreduce():
    n, r = decomm.size(), decomm.rank()
    model, opt = setup(n, r, bfo.DistributedGradientAllreduceOptimizer)
    X = x0(n)
    for t in range(2):
        train_step(model, opt, r, t)
        X = X - u_all(n, t).mean(axis=0)
        np.testing.assert_allclose(mine(model), X[r], rtol=0, atol=TOL)
    # Horovod pattern: synchronize, look at (or clip) the averaged gradient, then step
    opt.zero_grad()
    model(torch.tensor(grad_input(r, 7))).backward()
    opt.synchronize()
    np.testing.assert_allclose(model.x.grad.numpy(), u_all(n, 7).mean(axis=0) / LR, atol=TOL)
    with opt.skip_synchronize():
        opt.step()
    X = X - u_all(n, 7).mean(axis=0)
    np.testing.assert_allclose(mine(model), X[r], rtol=0, atol=TOL)
    opt.close()


# ---------------------------------------------------------- window optimizers
def test_win_put_lock_step_with_dynamic_dst():
    """Put to one out-neighbour per step; the window keeps the others' last values."""
    n, r = decomm.size(), decomm.rank()
    model, opt = setup(n, r, bfo.DistributedWinPutOptimizer, window_prefix="t")
    opt.force_barrier = True
    X = x0(n)
    ins = [sorted({(i - 1) % n, (i + 1) % n} - {i}) for i in range(n)]
    slots = [{j: X[i].copy() for j in ins[i]} for i in range(n)]  # BlueFog: own value
    for t in range(4):
        if n > 1:
            opt.dst_weights = {(r + 1) % n: 1.0} if t % 2 == 0 else [(r - 1) % n]
        train_step(model, opt, r, t)
        decomm.barrier()  # lock-step: no put of step t + 1 lands before every update of t
        if n > 1:
            for i in range(n):
                j = (i + 1) % n if t % 2 == 0 else (i - 1) % n
                slots[j][i] = X[i].copy()
        mixed = np.array([(X[i] + sum(slots[i].values())) / (len(ins[i]) + 1)
                          for i in range(n)])
        X = mixed - u_all(n, t)
        np.testing.assert_allclose(mine(model), X[r], rtol=0, atol=TOL)
    opt.close()
    assert not [w for w in decomm.win.win_names() if "compat" in w]


def test_pull_get_lock_step():
    n, r = decomm.size(), decomm.rank()
    model, opt = setup(n, r, bfo.DistributedPullGetOptimizer)
    opt.force_barrier = True
    X, W = x0(n), uniform_ring(n)
    for t in range(3):
        train_step(model, opt, r, t)
        decomm.barrier()
        X = W @ X - u_all(n, t)
        np.testing.assert_allclose(mine(model), X[r], rtol=0, atol=TOL)
    opt.close()


def test_push_sum_carries_the_weight():
    """Directed ring with rank-dependent shares: z_i = x_i / w_i, exact push-sum."""
    n, r = decomm.size(), decomm.rank()
    P = np.eye(n) if n == 1 else np.zeros((n, n))  # P[j, i]: share of i's mass sent to j
    keep = [0.3 + 0.1 * (i % 3) for i in range(n)]
    if n > 1:
        set_graph(tu.RingGraph(n, connect_style=2))  # i sends to i + 1
        for i in range(n):
            P[i, i] = keep[i]
            P[(i + 1) % n, i] += 1 - keep[i]
    model, opt = setup(n, r, bfo.DistributedPushSumOptimizer)
    if n > 1:
        assert opt.self_weight == 0.5 and opt.dst_weights == {(r + 1) % n: 0.5}
        opt.self_weight, opt.dst_weights = keep[r], {(r + 1) % n: 1 - keep[r]}
    Z, w = x0(n), np.ones(n)
    for t in range(4):
        train_step(model, opt, r, t)
        decomm.barrier()
        mass, w = P @ (w[:, None] * Z), P @ w
        Z = mass / w[:, None] - u_all(n, t)
        np.testing.assert_allclose(mine(model), Z[r], rtol=0, atol=TOL)
    if n > 2:
        assert abs(float(opt._w[0]) - w[r]) < TOL and abs(w[r] - 1.0) > 1e-3  # non-trivial
    # the weight is part of the state: a resumed run continues exactly
    sd = opt.state_dict()
    saved = float(sd["decomm"]["state"]["push_sum_weight"][0])
    assert abs(saved - w[r]) < TOL
    opt._w[0].fill_(1.0)
    opt.load_state_dict(sd)
    assert abs(float(opt._w[0]) - w[r]) < TOL
    opt.close()


# ------------------------------------------------------------ Infer* helpers
def test_infer_source_and_destination_on_a_ring():
    n, r = decomm.size(), decomm.rank()
    if n == 1:
        assert tu.InferSourceFromDestinationRanks([]) == []
        return
    src, A = tu.InferSourceFromDestinationRanks([(r + 1) % n], construct_adjacency_matrix=True)
    assert src == [(r - 1) % n]
    expected = np.eye(n)
    for i in range(n):
        expected[i, (i + 1) % n] = 1.0
    expected /= expected.sum(axis=0)
    np.testing.assert_allclose(A, expected)
    dst = tu.InferDestinationFromSourceRanks([(r - 1) % n])
    assert dst == [(r + 1) % n]


def test_infer_non_regular_graph_columns_sum_to_one():
    n, r = decomm.size(), decomm.rank()
    if n < 3:
        pytest.skip("needs a node whose in- and out-degree differ")
    dst = list(range(1, n)) if r == 0 else []  # rank 0 sends to all, the others to nobody
    src, A = tu.InferSourceFromDestinationRanks(dst, construct_adjacency_matrix=True)
    assert src == ([] if r == 0 else [0])
    expected = np.eye(n) * 0.5
    expected[0, 0] = 1.0
    expected[0, 1:] = 0.5
    np.testing.assert_allclose(A, expected)
    np.testing.assert_allclose(A.sum(axis=0), 1.0)
    # the mirror: the others name rank 0 as their source
    got, B = tu.InferDestinationFromSourceRanks([] if r == 0 else [0],
                                                construct_adjacency_matrix=True)
    assert got == (list(range(1, n)) if r == 0 else [])
    np.testing.assert_allclose(B, expected)


def test_infer_errors():
    n, r = decomm.size(), decomm.rank()
    with pytest.raises(ValueError, match="contains this rank itself"):
        tu.InferSourceFromDestinationRanks([r])
    with pytest.raises(ValueError, match="out of range"):
        tu.InferDestinationFromSourceRanks([n])
    with pytest.raises(TypeError, match="not an int rank"):
        tu.InferSourceFromDestinationRanks(["0"])
    if n > 1:
        with pytest.raises(ValueError, match="twice"):
            tu.InferSourceFromDestinationRanks([(r + 1) % n, (r + 1) % n])
