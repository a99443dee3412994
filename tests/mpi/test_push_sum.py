"""PushSum (Stochastic Gradient Push) under mpirun, against closed forms.

The test graphs are directed and row-stochastic but *not* column-stochastic, so plain
gossip (``neighbor_allreduce`` repeated, i.e. DSGD with lr = 0) converges to the
Perron-weighted average ``pi^T x`` - biased - while push-sum converges to the true
mean. A numpy re-implementation of SGP over n nodes is the oracle for the training
recursion.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import decomm
from decomm.optim import DSGD, LocalCommunicator
from decomm.optim.push_sum import PushSum
from decomm.topology import Topology

D = 4


@pytest.fixture(autouse=True)
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def directed_graph(n: int) -> np.ndarray:
    """Row-stochastic W of a strongly connected digraph with unequal out-degrees.

    Edges j -> i (W[i, j] > 0): the ring j -> j+1, plus 0 -> every node (n >= 3).
    Each node averages its in-neighbours and itself with uneven weights.
    """
    A = np.eye(n)
    for j in range(n):
        A[(j + 1) % n, j] = 1.0
        if n >= 3:
            A[:, 0] = 1.0
    W = A * (1.0 + np.arange(n))[None, :]  # weight in-neighbour j by (1 + j): not symmetric
    return W / W.sum(axis=1, keepdims=True)


def init_values(r: int) -> np.ndarray:
    return np.array([r * 1.0, r * r * 0.5, -1.0 * r, 3.0 + (r % 2)])


def make_model(r: int) -> nn.Module:
    m = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(init_values(r)).reshape(1, D))
    return m


def perron(W: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eig(W.T)
    v = np.real(vecs[:, np.argmin(np.abs(vals - 1))])
    return v / v.sum()


def uniform_push_matrix(W: np.ndarray) -> np.ndarray:
    """P[i, j] = 1 / (outdeg_j + 1) for i in out(j) ∪ {j}: the default split."""
    A = (W > 0).astype(np.float64)
    return A / A.sum(axis=0, keepdims=True)


def numpy_sgp(P_of_t, x0: np.ndarray, grads, lr: float, steps: int) -> np.ndarray:
    """z after ``steps`` SGP steps for all nodes (rows); grads(t, z) -> (n, D)."""
    x = x0.copy()
    w = np.ones(x.shape[0])
    z = x / w[:, None]
    for t in range(steps):
        P = P_of_t(t)
        x = x - lr * grads(t, z)
        x = P @ x
        w = P @ w
        z = x / w[:, None]
    return z


def test_push_sum_reaches_true_average_where_gossip_is_biased():
    n, r = decomm.size(), decomm.rank()
    if n < 2:
        pytest.skip("needs 2 ranks")
    W = directed_graph(n)
    decomm.set_topology(W)
    X0 = np.stack([init_values(j) for j in range(n)])
    mean, biased = X0.mean(axis=0), perron(W) @ X0
    assert np.abs(mean - biased).max() > 0.05  # the graph really is biased
    # plain gossip (DSGD, lr = 0): converges to pi^T x
    m1 = make_model(r)
    dsgd = DSGD(torch.optim.SGD(m1.parameters(), lr=0.0), broadcast_parameters=False)
    m2 = make_model(r)
    ps = PushSum(torch.optim.SGD(m2.parameters(), lr=0.0), broadcast_parameters=False)
    for _ in range(120):
        for m in (m1, m2):
            m.weight.grad = torch.zeros_like(m.weight)
        dsgd.step()
        decomm.set_round(decomm.current_round() - 1)  # both optimizers use the same round
        ps.step()
    got_gossip = m1.weight.detach().numpy().ravel()
    got_ps = m2.weight.detach().numpy().ravel()
    assert np.allclose(got_gossip, biased, atol=1e-8), (got_gossip, biased)
    assert np.allclose(got_ps, mean, atol=1e-8), (got_ps, mean)
    assert not np.allclose(got_gossip, mean, atol=1e-3)
    # the weights moved away from 1 (unequal out-degrees) and still sum to n
    w = torch.tensor(ps.push_weights[0], dtype=torch.float64).reshape(1)
    total = decomm.allreduce(w, average=False).item()
    assert abs(total - n) < 1e-9
    if n >= 3:  # unequal out-degrees: the weights spread out
        ws = decomm.allgather(torch.tensor([ps.push_weights[0]], dtype=torch.float64))
        assert float((ws - 1.0).abs().max()) > 0.1


def test_default_weights_are_uniform_out_split():
    n, r = decomm.size(), decomm.rank()
    W = directed_graph(n)
    decomm.set_topology(W)
    ps = PushSum(torch.optim.SGD(make_model(r).parameters(), lr=0.1))
    keep, src, dst = ps.push_sum_weights()
    P = uniform_push_matrix(W)
    assert keep == pytest.approx(P[r, r])
    assert dst == pytest.approx({j: P[j, r] for j in range(n) if j != r and P[j, r] > 0})
    assert src == {j: 1.0 for j in range(n) if j != r and P[r, j] > 0}


@pytest.mark.parametrize("custom", [False, True])
def test_sgp_matches_numpy_recursion(custom):
    """Quadratics f_i(z) = |z - b_i|^2 / 2 with SGD: the MPI run equals the numpy SGP."""
    n, r = decomm.size(), decomm.rank()
    W = directed_graph(n)
    decomm.set_topology(W)
    B = np.stack([np.sin(np.arange(D) + 3 * j) * (j + 1) for j in range(n)])
    if custom:
        rng = np.random.default_rng(5)
        Ps = []
        for _k in range(3):  # time-varying dense column-stochastic matrices
            P = rng.random((n, n)) + 0.05
            Ps.append(P / P.sum(axis=0, keepdims=True))
        P_of_t = lambda t: Ps[t % 3]  # noqa: E731
        kwargs = {"weights": Ps}
    else:
        P = uniform_push_matrix(W)
        P_of_t = lambda t: P  # noqa: E731
        kwargs = {}
    lr, steps = 0.1, 25
    model = make_model(r)
    opt = PushSum(torch.optim.SGD(model.parameters(), lr=lr), broadcast_parameters=False,
                  **kwargs)
    b = torch.from_numpy(B[r]).reshape(1, D)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (model.weight - b).square().sum()).backward()
        opt.step()
    X0 = np.stack([init_values(j) for j in range(n)])
    Z = numpy_sgp(P_of_t, X0, lambda t, z: z - B, lr, steps)
    assert np.allclose(model.weight.detach().numpy().ravel(), Z[r], rtol=0, atol=1e-10)


def test_sgp_converges_to_the_optimum_with_decaying_lr():
    n, r = decomm.size(), decomm.rank()
    decomm.set_topology(directed_graph(n))
    B = np.stack([np.cos(np.arange(D) * (j + 1)) * 2 + j for j in range(n)])
    model = make_model(r)
    inner = torch.optim.SGD(model.parameters(), lr=0.5)
    opt = PushSum(inner)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + 0.2 * t))
    b = torch.from_numpy(B[r]).reshape(1, D)
    for _ in range(300):
        opt.zero_grad()
        (0.5 * (model.weight - b).square().sum()).backward()
        opt.step()
        sched.step()
    # the distance to the optimum is O(lr) (0.034 at n = 5 in the numpy recursion) and
    # shrinks as lr decays; row-stochastic gossip would sit at the Perron-weighted optimum
    W = directed_graph(n)
    assert np.allclose(model.weight.detach().numpy().ravel(), B.mean(axis=0), atol=0.06)
    if n >= 3:
        assert np.abs(perron(W) @ B - B.mean(axis=0)).max() > 0.2
    assert opt.consensus_distance() < 1e-2


def test_float32_local_steps_global_steps_and_state_dict():
    n, r = decomm.size(), decomm.rank()
    decomm.set_topology(directed_graph(n))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = PushSum(torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
                  communicate_every=2, global_every=3)
    g = torch.Generator().manual_seed(100 + r)
    data = [(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)) for _ in range(12)]

    def run(o, batches):
        for x, y in batches:
            o.zero_grad()
            ((net(x) - y) ** 2).mean().backward()
            o.step()

    run(opt, data[:5])
    sd = copy.deepcopy(opt.state_dict())  # torch returns live momentum buffers
    params = [p.detach().clone() for p in net.parameters()]
    w = opt.push_weights
    run(opt, data[5:])
    after = [p.detach().clone() for p in net.parameters()]
    # resume: restore model + optimizer, replay -> bitwise the same
    with torch.no_grad():
        for p, q in zip(net.parameters(), params):
            p.copy_(q)
    opt.load_state_dict(sd)
    assert opt.push_weights == w
    run(opt, data[5:])
    for p, q in zip(net.parameters(), after):
        assert torch.equal(p.detach(), q)
    assert opt.steps == 12 and opt.communication_steps == 6
    # the 6th communicating step was a global average: all ranks agree exactly... until
    # now (steps 11, 12 are local and gossip); check the weights still sum to n
    total = decomm.allreduce(torch.tensor([opt.push_weights[0]], dtype=torch.float64),
                             average=False).item()
    assert abs(total - n) < 1e-4


def test_global_step_gives_exact_average():
    n, r = decomm.size(), decomm.rank()
    decomm.set_topology(directed_graph(n))
    model = make_model(r)
    opt = PushSum(torch.optim.SGD(model.parameters(), lr=0.0), global_every=2,
                  broadcast_parameters=False)
    for _ in range(2):  # gossip, then global
        model.weight.grad = torch.zeros_like(model.weight)
        opt.step()
    X0 = np.stack([init_values(j) for j in range(n)])
    assert np.allclose(model.weight.detach().numpy().ravel(), X0.mean(axis=0), atol=1e-12)
    assert opt.push_weights == [pytest.approx(1.0)]


def test_errors():
    n, r = decomm.size(), decomm.rank()
    model = make_model(r)
    with pytest.raises(TypeError, match="MPI runtime"):
        PushSum(torch.optim.SGD(model.parameters(), lr=0.1), communicator=LocalCommunicator())
    with pytest.raises(ValueError, match="column"):
        bad = np.full((n, n), 1.0 / n)
        bad[0, 0] += 0.5
        PushSum(torch.optim.SGD(model.parameters(), lr=0.1), weights=bad)
    with pytest.raises(ValueError, match="matrix"):
        PushSum(torch.optim.SGD(model.parameters(), lr=0.1), weights=np.eye(n + 1))
    with pytest.raises(ValueError, match="non-negative"):
        neg = np.eye(n)
        neg[0, 0] = -1.0
        PushSum(torch.optim.SGD(model.parameters(), lr=0.1), weights=neg)
    with pytest.raises(TypeError):
        PushSum(model)
    if n >= 2:
        # ranks passing different P are told so, on every rank
        rng = np.random.default_rng(r)
        P = rng.random((n, n)) + 0.1
        P /= P.sum(axis=0, keepdims=True)
        with pytest.raises(decomm.DecommError, match="different push weights"):
            PushSum(torch.optim.SGD(model.parameters(), lr=0.1), weights=P)
    # a topology with a node that receives nothing makes w collapse -> clear error
    if n >= 2:
        W = np.eye(n)
        W[1:, 0] = 1.0  # 0 -> everyone, nobody -> 0 ... except 0 keeps a share
        W = W / W.sum(axis=1, keepdims=True)
        decomm.set_topology(Topology.from_matrices(W))
        m = make_model(r)
        opt = PushSum(torch.optim.SGD(m.parameters(), lr=0.0))
        m.weight.grad = torch.zeros_like(m.weight)
        opt.step()  # w_0 = 1/n, still positive: fine
        assert opt.push_weights[0] > 0
