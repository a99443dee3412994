"""One rank of a multi-rank GPU test; started by tests/gpu/test_*.py through ``mpirun``.

    mpirun -np N python -m mpi4py tests/gpu/mpi_worker.py SCENARIO

Every check compares against a closed form computed locally (rank j's input is
``j + offsets``, so rank i expects ``sum_j W[i, j] x_j``) and, where the path promises
it, bitwise against the CPU path's result on the same input. A failed check raises;
``python -m mpi4py`` then aborts the whole job, so the test sees a non-zero exit. A
scenario that cannot run here prints ``SKIP: reason`` and exits 0.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import decomm
from decomm import _state, cuda_ops
from decomm import topology as T

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SHAPES = [(), (0,), (7,), (3, 5), (1000,), (4097,)]


def say(msg: str) -> None:
    print(f"[rank {decomm.rank()}] {msg}", flush=True)


def world_rank_size() -> tuple[int, int]:
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()


def skip(reason: str) -> None:
    if world_rank_size()[0] == 0:
        print(f"SKIP: {reason}", flush=True)
    decomm.shutdown()
    sys.exit(0)


def rank_value(j: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    numel = int(np.prod(shape)) if shape else 1
    offsets = (np.arange(numel, dtype=np.float64) % 13) / 16.0
    return torch.from_numpy((j + offsets).reshape(shape)).to(dtype)


def expected(W: np.ndarray, i: int, shape: tuple) -> np.ndarray:
    stack = np.stack([rank_value(j, shape, torch.float64).numpy() for j in range(W.shape[0])])
    return np.tensordot(W[i], stack, axes=1)


def assert_close(got: torch.Tensor, want: np.ndarray, dtype: torch.dtype, what: str) -> None:
    assert got.dtype == dtype, (what, got.dtype, dtype)
    assert tuple(got.shape) == tuple(want.shape), (what, got.shape, want.shape)
    g = got.detach().cpu().double().numpy()
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    assert np.allclose(g, want, rtol=0, atol=TOL[dtype] * scale), (what, g, want)


def init(backend: str, timeout: float = 60.0) -> None:
    decomm.init(backend=backend, timeout=timeout)  # sets up the CUDA path too


def device() -> torch.device:
    dev = cuda_ops.status()["device"]
    if dev is None:
        dev = decomm.local_rank() % torch.cuda.device_count()
    return torch.device("cuda", dev)


def ops_take_cuda() -> bool:
    """Whether decomm's public ops accept CUDA tensors (the ops.py hooks are in)."""
    try:
        decomm.ops._to_torch(torch.zeros(1, device=device()), "probe", "probe")
    except decomm.DecommError:
        return False
    return True


def peers(W: np.ndarray, r: int):
    n = W.shape[0]
    src = [j for j in range(n) if j != r and W[r, j] != 0]
    dst = [i for i in range(n) if i != r and W[i, r] != 0]
    return float(W[r, r]), src, [float(W[r, j]) for j in src], dst, [1.0] * len(dst)


def random_directed(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    W = rng.random((n, n)) * (rng.random((n, n)) < 0.5)
    np.fill_diagonal(W, rng.random(n) + 0.1)
    return W / W.sum(axis=1, keepdims=True)


def topologies(n: int):
    yield "ring", T.RingGraph(n)
    yield "exponential", T.ExponentialGraph(n)
    yield "fully", T.FullyConnectedGraph(n)
    yield "random", random_directed(n, 7)


# ---------------------------------------------------------------- neighbour ops
def check_neighbor_allreduce(path: str, bitwise_dtypes: tuple) -> None:
    """Low-level backend (whatever backend_for picks) and, if hooked, the public ops."""
    state = _state.require()
    n, r = decomm.size(), decomm.rank()
    dev = device()
    public = ops_take_cuda()
    for tname, topo in topologies(n):
        decomm.set_topology(topo)
        W = decomm.get_topology().matrix(0)
        sw, src, src_w, dst, dst_w = peers(np.asarray(W), r)
        for dtype in DTYPES:
            for shape in SHAPES:
                what = f"{path} {tname} {dtype} {shape}"
                x = rank_value(r, shape, dtype).to(dev)
                be = cuda_ops.backend_for(state, x, "neighbor_allreduce")
                kind = type(be).__name__
                assert (kind == "NcclBackend") == (path == "nccl"), (what, kind)
                xc = x.reshape(-1).contiguous()
                out = torch.empty_like(xc)
                be.neighbor_allreduce(xc, out, sw, src, src_w, dst, dst_w, "na", state.round,
                                      state.topo_hash, False)
                assert out.is_cuda and out.device == dev, what
                want = expected(np.asarray(W), r, shape)
                assert_close(out.reshape(shape), want, dtype, what)
                cpu_out = torch.empty_like(xc.cpu())
                state.backend.neighbor_allreduce(xc.cpu(), cpu_out, sw, src, src_w, dst, dst_w,
                                                 "na", state.round, state.topo_hash, False)
                if dtype in bitwise_dtypes:
                    assert torch.equal(out.cpu(), bitwise_reference(path, cpu_out, xc, sw, src,
                                                                    src_w, shape, dtype)), (
                        what, "not bitwise equal to its CPU twin")
                if public:
                    y = decomm.neighbor_allreduce(x, name="pub")
                    assert y.is_cuda and y.dtype == dtype and y.shape == x.shape, what
                    assert_close(y, want, dtype, what + " public")
                    z = x.clone()
                    assert decomm.neighbor_allreduce_(z, name="pub_") is z
                    assert_close(z, want, dtype, what + " in-place")
                    h = decomm.neighbor_allreduce_nonblocking(x, name="pub_nb")
                    assert_close(h.wait(), want, dtype, what + " nonblocking")
        if public and n > 1:  # non-contiguous input
            x2 = rank_value(r, (6, 4), torch.float32).to(dev).t()
            y = decomm.neighbor_allreduce(x2, name="noncontig")
            want = expected(np.asarray(W), r, (6, 4)).T
            assert_close(y, want, torch.float32, f"{path} {tname} non-contiguous")
        say(f"neighbor_allreduce over {path}: {tname} ok")


def bitwise_reference(path: str, cpu_out: torch.Tensor, xc: torch.Tensor, sw: float,
                      src: list, src_w: list, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """What the CUDA result must equal bit for bit.

    The staged path runs the CPU backend itself, so: the CPU path's result. The NCCL
    path runs the CUDA kernel, which weighs every term (``w_self x + sum_j w_j x_j``,
    each product rounded, added in order) and has no uniform-weight path, whereas the
    CPU backend sums uniform weights ``1/m`` first and scales once (``mean_sum``): for
    the ring or a full graph the two differ in the last bit. Its CPU twin is the CPU
    weighted-sum kernel (``decomm._C.weighted_sum``, always the weighted form) on the
    same inputs: this rank's tensor and each in-neighbour's (``rank_value(j)``, sent
    unscaled since dst weights are 1).
    """
    if path != "nccl":
        return cpu_out
    import decomm._C as cpu_kernel

    rs = [rank_value(j, shape, dtype).reshape(-1).contiguous() for j in src]
    return cpu_kernel.weighted_sum(xc.cpu(), sw, rs, src_w)


def check_collectives_low_level(path: str) -> None:
    state = _state.require()
    n, r = decomm.size(), decomm.rank()
    dev = device()
    x = rank_value(r, (33,), torch.float32).to(dev)
    be = cuda_ops.backend_for(state, x, "allreduce")
    out = torch.empty_like(x)
    be.allreduce(x, out, True, "ar", False)
    want = np.mean([rank_value(j, (33,), torch.float64).numpy() for j in range(n)], axis=0)
    assert_close(out, want, torch.float32, f"{path} allreduce average")
    xi = torch.full((5,), r + 1, dtype=torch.int64, device=dev)
    outi = torch.empty_like(xi)
    cuda_ops.backend_for(state, xi, "allreduce").allreduce(xi, outi, False, "ar_int", False)
    assert outi.cpu().tolist() == [n * (n + 1) // 2] * 5, outi
    b = torch.full((4, 3), float(r), device=dev)
    root = n - 1
    be.broadcast(b, root, "bc")
    assert torch.equal(b.cpu(), torch.full((4, 3), float(root))), b
    g = torch.full((r + 1, 2), float(r), device=dev)
    gathered = cuda_ops.backend_for(state, g, "allgather").allgather(g, "ag")
    assert gathered.is_cuda
    want_g = torch.cat([torch.full((j + 1, 2), float(j)) for j in range(n)])
    assert torch.equal(gathered.cpu(), want_g), gathered
    decomm.set_topology(T.RingGraph(n))
    W = np.asarray(decomm.get_topology().matrix(0))
    _, src, _, dst, _ = peers(W, r)
    ng = cuda_ops.backend_for(state, g, "neighbor_allgather").neighbor_allgather(
        g, src, dst, "nag", state.round, state.topo_hash)
    want_ng = (torch.cat([torch.full((j + 1, 2), float(j)) for j in src]) if src
               else torch.empty(0, 2))
    assert torch.equal(ng.cpu(), want_ng), ng
    say(f"collectives over {path} ok")


def check_collectives_public() -> None:
    if not ops_take_cuda():
        say("public ops do not take CUDA tensors yet (ops.py hooks missing): skipped")
        return
    n, r = decomm.size(), decomm.rank()
    dev = device()
    for dtype in DTYPES:
        x = rank_value(r, (17,), dtype).to(dev)
        y = decomm.allreduce(x)
        want = np.mean([rank_value(j, (17,), torch.float64).numpy() for j in range(n)], axis=0)
        assert y.is_cuda
        assert_close(y, want, dtype, f"public allreduce {dtype}")
    b = decomm.broadcast(torch.full((3,), float(r), device=dev), n - 1)
    assert b.is_cuda and b.cpu().tolist() == [float(n - 1)] * 3
    g = decomm.allgather(torch.full((2,), float(r), device=dev))
    assert g.is_cuda and g.cpu().tolist() == [float(j) for j in range(n) for _ in range(2)]
    model = torch.nn.Linear(3, 2).to(dev)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(r))
    decomm.broadcast_parameters(model.state_dict(), root=0)
    assert all(bool((p == 0).all()) for p in model.parameters())
    say("public collectives on CUDA tensors ok")


# -------------------------------------------------------------------- scenarios
def scenario_staged() -> None:
    init("mpi")
    assert cuda_ops.status()["mode"] == "mpi", cuda_ops.status()
    # staged results come from the CPU kernel: bitwise equal to the CPU path for every dtype
    check_neighbor_allreduce("mpi", tuple(DTYPES))
    check_collectives_low_level("mpi")
    check_collectives_public()


def scenario_oversubscribed() -> None:
    init("auto")
    st = cuda_ops.status()
    assert st["mode"] == "mpi", st
    if decomm.nccl_available() and decomm.size() > 1:
        assert "NCCL needs one GPU per rank" in st["reason"], st
    say(f"cuda path: {st}")
    check_neighbor_allreduce("mpi", tuple(DTYPES))


def scenario_nccl() -> None:
    if not decomm.nccl_available():
        skip("decomm was built without NCCL")
    size = world_rank_size()[1]
    if torch.cuda.device_count() < size:
        skip(f"{size} ranks need {size} GPUs, found {torch.cuda.device_count()}")
    init("nccl")
    assert cuda_ops.status()["mode"] == "nccl", cuda_ops.status()
    check_neighbor_allreduce("nccl", (torch.float32, torch.float64))
    check_collectives_low_level("nccl")
    check_collectives_public()
    check_mismatch_raises()
    check_stream_order_and_handles()


def scenario_nccl_single() -> None:
    """One rank, one GPU: what NCCL allows - point-to-point with itself."""
    if not decomm.nccl_available():
        skip("decomm was built without NCCL")
    init("nccl")
    assert decomm.size() == 1
    st = cuda_ops.status()
    assert st["mode"] == "nccl", st
    state = _state.require()
    dev = device()
    for dtype in DTYPES:
        x = rank_value(3, (1001,), dtype).to(dev)
        be = cuda_ops.backend_for(state, x, "neighbor_allreduce")
        out = torch.empty_like(x)
        # self-loop: receive 2x from itself, weigh 0.5 each: 0.5 x + 0.5 (2 x) = 1.5 x (exact)
        be.neighbor_allreduce(x, out, 0.5, [0], [0.5], [0], [2.0], "self", 0, 0, False)
        assert torch.equal(out.cpu(), (x.double() * 1.5).to(dtype).cpu()), (dtype, out)
    check_stream_order_and_handles()
    x = rank_value(0, (9,), torch.float32).to(dev)
    be = cuda_ops.backend_for(state, x, "allreduce")
    out = torch.empty_like(x)
    be.allreduce(x, out, True, "ar1", False)
    assert torch.equal(out.cpu(), x.cpu())
    assert torch.equal(be.allgather(x.reshape(3, 3), "ag1").cpu(), x.reshape(3, 3).cpu())
    ng = be.neighbor_allgather(x.reshape(3, 3), [0], [0], "nag1", 0, 0)
    assert torch.equal(ng.cpu(), x.reshape(3, 3).cpu())
    if ops_take_cuda():
        y = decomm.neighbor_allreduce(x)
        assert y.is_cuda and torch.equal(y.cpu(), x.cpu())
        say("public neighbor_allreduce on 1 rank over NCCL ok")
    say("NCCL self-loop (1 rank) ok")


def check_stream_order_and_handles() -> None:
    """decomm's stream waits for the caller's current stream (x written late on a side
    stream is what gets sent), and the caller's stream waits for the result."""
    state = _state.require()
    n, r = decomm.size(), decomm.rank()
    dev = device()
    side = torch.cuda.Stream(device=dev)
    x = torch.zeros(1 << 20, device=dev)
    be = cuda_ops.backend_for(state, x, "neighbor_allreduce")
    if n == 1:
        sw, src, src_w, dst, dst_w = 0.5, [0], [0.5], [0], [1.0]
    else:
        sw, src, src_w, dst, dst_w = 0.5, [(r - 1) % n], [0.5], [(r + 1) % n], [1.0]
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # keeps the side stream busy for a while
        x.fill_(float(r + 1))
        out = torch.empty_like(x)
        be.neighbor_allreduce(x, out, sw, src, src_w, dst, dst_w, "order", 0, 0, False)
        got = out.cpu()  # on the side stream: must see the finished sum
    left = src[0]
    want = 0.5 * (r + 1) + 0.5 * (left + 1)
    assert bool((got == want).all()), (got[:4], want)
    # non-blocking handle
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        h = be.neighbor_allreduce(x, out, sw, src, src_w, dst, dst_w, "order_nb", 0, 0, True)
        first = h.poll()
        res = h.wait()
        assert res.data_ptr() == out.data_ptr()
        assert bool((res.cpu() == want).all())
    assert isinstance(first, bool)
    h.synchronize()
    assert h.poll() is True
    say("stream ordering and handles ok")


def check_mismatch_raises() -> None:
    """Ranks that disagree on the shape get DecommError (before any NCCL work), and the
    communicator keeps working afterwards."""
    state = _state.require()
    n, r = decomm.size(), decomm.rank()
    dev = device()
    decomm.set_topology(T.FullyConnectedGraph(n))
    W = np.asarray(decomm.get_topology().matrix(0))
    sw, src, src_w, dst, dst_w = peers(W, r)
    x = torch.ones(10 if r == 0 else 11, device=dev)
    be = cuda_ops.backend_for(state, x, "neighbor_allreduce")
    try:
        be.neighbor_allreduce(x, torch.empty_like(x), sw, src, src_w, dst, dst_w, "bad",
                              state.round, state.topo_hash, False)
    except decomm.DecommError as e:
        assert "shape" in str(e), e
    else:
        raise AssertionError("a shape mismatch was not reported")
    x = torch.ones(10, device=dev)
    out = torch.empty_like(x)
    be.neighbor_allreduce(x, out, sw, src, src_w, dst, dst_w, "good", state.round,
                          state.topo_hash, False)
    assert torch.allclose(out.cpu(), torch.ones(10))
    say("mismatch raises, then the backend still works")


def scenario_nccl_timeout() -> None:
    """Rank 1 never makes the call: rank 0 gets DecommError (header exchange), and with
    checks off the watchdog turns the stuck NCCL op into DecommError too."""
    if not decomm.nccl_available():
        skip("decomm was built without NCCL")
    if torch.cuda.device_count() < 2 or world_rank_size()[1] != 2:
        skip("needs 2 ranks on 2 GPUs")
    init("nccl", timeout=5.0)
    state = _state.require()
    r = decomm.rank()
    be = cuda_ops.backend_for(state, torch.zeros(1, device=device()), "neighbor_allreduce")
    if r == 0:
        x = torch.ones(100, device=device())
        t0 = time.time()
        try:
            be.neighbor_allreduce(x, torch.empty_like(x), 0.5, [1], [0.5], [1], [1.0], "lost",
                                  0, 0, False)
        except decomm.DecommError as e:
            assert "timed out" in str(e) and "1" in str(e), e
        else:
            raise AssertionError("no timeout from the header exchange")
        say(f"header-exchange timeout after {time.time() - t0:.1f} s ok")
        be.set_check(False)
        be.neighbor_allreduce(x, torch.empty_like(x), 0.5, [1], [0.5], [1], [1.0], "stuck",
                              0, 0, False)  # queued; the GPU waits for rank 1 forever
        deadline = time.time() + 60
        while not be.failed and time.time() < deadline:
            time.sleep(0.2)
        assert be.failed, "the watchdog did not abort a stuck op"
        try:
            be.neighbor_allreduce(x, torch.empty_like(x), 0.5, [1], [0.5], [1], [1.0], "after",
                                  0, 0, False)
        except decomm.DecommError as e:
            assert "timed out" in str(e), e
        else:
            raise AssertionError("ops after an abort must raise")
        say("watchdog timeout ok")
    state.backend.timeout = 120.0
    state.backend.barrier()  # rank 1 waits here for rank 0
    sys.stdout.flush()
    os._exit(0)  # the aborted communicator's peer must not wait on it at teardown


def scenario_cupy() -> None:
    try:
        import cupy
    except ImportError:
        skip("cupy is not installed")
        return
    init("auto")
    from decomm import interop

    n, r = decomm.size(), decomm.rank()
    dev = device()
    with cupy.cuda.Device(dev.index):
        a = cupy.arange(10, dtype=cupy.float32) + r
        t, back = interop.as_torch(a)
        assert t.is_cuda and t.data_ptr() == a.data.ptr, "as_torch must not copy"
        t.add_(1)
        assert float(a[0]) == r + 1, "the torch view must share cupy's memory"
        a -= 1
        c = back(t)
        assert isinstance(c, cupy.ndarray) and c.data.ptr == t.data_ptr()
        if not ops_take_cuda():
            skip("public ops do not take CUDA tensors yet (ops.py hooks missing)")
        decomm.set_topology(T.RingGraph(n))
        W = np.asarray(decomm.get_topology().matrix(0))
        y = decomm.neighbor_allreduce(a)
        assert isinstance(y, cupy.ndarray), type(y)
        want = W[r] @ np.stack([np.arange(10, dtype=np.float64) + j for j in range(n)])
        assert np.allclose(cupy.asnumpy(y), want, atol=1e-5), (cupy.asnumpy(y), want)
        same = decomm.neighbor_allreduce_(a)
        assert same is a and np.allclose(cupy.asnumpy(a), want, atol=1e-5)
        g = decomm.allgather(cupy.full((2,), r, dtype=cupy.int64))
        assert isinstance(g, cupy.ndarray) and cupy.asnumpy(g).tolist() == [
            j for j in range(n) for _ in range(2)]
    say("cupy in, cupy out ok")


SCENARIOS = {
    "staged": scenario_staged,
    "oversubscribed": scenario_oversubscribed,
    "nccl": scenario_nccl,
    "nccl_single": scenario_nccl_single,
    "nccl_timeout": scenario_nccl_timeout,
    "cupy": scenario_cupy,
}

if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("SKIP: no CUDA device", flush=True)
        sys.exit(0)
    SCENARIOS[sys.argv[1]]()
    decomm.shutdown()
