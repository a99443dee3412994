// Built only when setup.py found NCCL (it then defines DECOMM_HAVE_NCCL=1).
#if DECOMM_HAVE_NCCL

#include "nccl_backend.h"

#include "weighted_sum.cuh"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include <sched.h>

#include <algorithm>
#include <cstdio>
#include <optional>
#include <set>
#include <sstream>

namespace decomm {

namespace {

// Tag of the header messages on decomm's NCCL-side MPI communicator.
constexpr int kTagNcclHeader = 201;

std::string join(const std::vector<int64_t>& v) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  os << "]";
  return os.str();
}

void check_nccl(ncclResult_t r, const char* call, ncclComm_t comm = nullptr) {
  if (r == ncclSuccess) return;
  std::ostringstream os;
  os << call << " failed: " << ncclGetErrorString(r);
#if NCCL_VERSION_CODE >= 21300
  if (comm != nullptr) {
    const char* last = ncclGetLastError(comm);
    if (last != nullptr && *last) os << " (" << last << ")";
  }
#else
  (void)comm;
#endif
  throw DecommError(os.str());
}

void check_cuda(cudaError_t e, const char* call) {
  if (e == cudaSuccess) return;
  throw DecommError(std::string(call) + " failed: " + cudaGetErrorString(e));
}

bool nccl_float_type(at::ScalarType t, ncclDataType_t* nt, cuda::FloatType* ft) {
  switch (t) {
    case at::kHalf: *nt = ncclFloat16; *ft = cuda::FloatType::kHalf; return true;
    case at::kBFloat16: *nt = ncclBfloat16; *ft = cuda::FloatType::kBFloat16; return true;
    case at::kFloat: *nt = ncclFloat32; *ft = cuda::FloatType::kFloat; return true;
    case at::kDouble: *nt = ncclFloat64; *ft = cuda::FloatType::kDouble; return true;
    default: return false;
  }
}

// NCCL reductions exist for these integer types (not int16 or bool).
bool nccl_int_type(at::ScalarType t, ncclDataType_t* nt) {
  switch (t) {
    case at::kChar: *nt = ncclInt8; return true;
    case at::kByte: *nt = ncclUint8; return true;
    case at::kInt: *nt = ncclInt32; return true;
    case at::kLong: *nt = ncclInt64; return true;
    default: return false;
  }
}

// Balances ncclGroupStart with ncclGroupEnd even when a call inside throws.
class Group {
 public:
  explicit Group(ncclComm_t comm) : comm_(comm) { check_nccl(ncclGroupStart(), "ncclGroupStart"); }
  void end() {
    open_ = false;
    check_nccl(ncclGroupEnd(), "ncclGroupEnd", comm_);
  }
  ~Group() {
    if (open_) ncclGroupEnd();
  }

 private:
  ncclComm_t comm_;
  bool open_ = true;
};

// Tells the caching allocator that `t` (allocated for another stream) is in
// use on `stream`, so its memory is not handed out again before decomm's work
// on it has finished. A no-op for memory torch did not allocate (e.g. cupy's).
void used_on(const at::Tensor& t, const c10::cuda::CUDAStream& stream) {
  if (!t.defined() || t.numel() == 0) return;
  c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), stream);
}

int64_t nbytes_of(const at::Tensor& t) {
  return t.numel() * static_cast<int64_t>(t.element_size());
}

}  // namespace

// ---------------------------------------------------------------- CudaEvent
CudaEvent::~CudaEvent() {
  if (ev_ != nullptr) cudaEventDestroy(ev_);
}

void CudaEvent::record(cudaStream_t stream) {
  if (ev_ == nullptr) check_cuda(cudaEventCreateWithFlags(&ev_, cudaEventDisableTiming),
                                 "cudaEventCreateWithFlags");
  check_cuda(cudaEventRecord(ev_, stream), "cudaEventRecord");
}

void CudaEvent::block(cudaStream_t stream) const {
  if (ev_ != nullptr) check_cuda(cudaStreamWaitEvent(stream, ev_, 0), "cudaStreamWaitEvent");
}

bool CudaEvent::query() const {
  if (ev_ == nullptr) return true;
  const cudaError_t e = cudaEventQuery(ev_);
  if (e == cudaErrorNotReady) {
    (void)cudaGetLastError();  // "not ready" is not an error: do not leave it behind
    return false;
  }
  return true;  // reached, or failed (the watchdog's NCCL error check reports why)
}

// --------------------------------------------------------------- NcclHandle
bool NcclHandle::poll() {
  if (be_->failed()) return true;
  if (work_->finished.load()) return true;
  return work_->done.query();
}

at::Tensor NcclHandle::wait() {
  be_->raise_if_failed();
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(be_->device()));
  work_->done.block(
      c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(be_->device())).stream());
  return work_->result;
}

at::Tensor NcclHandle::synchronize() {
  at::Tensor r = wait();
  while (!work_->done.query()) {
    be_->raise_if_failed();  // the watchdog ends a stuck op after the timeout
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  be_->raise_if_failed();
  return r;
}

// -------------------------------------------------------------- NcclBackend
NcclBackend::NcclBackend(int64_t comm_f, int device, double timeout_s, bool check)
    : device_(device), timeout_s_(timeout_s), check_(check),
      stream_(c10::cuda::getStreamFromPool(/*isHighPriority=*/true,
                                           static_cast<c10::DeviceIndex>(device))) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) throw DecommError("MPI is not initialized (import mpi4py.MPI first)");
  check_mpi(MPI_Comm_dup(MPI_Comm_f2c(static_cast<MPI_Fint>(comm_f)), &mpi_), "MPI_Comm_dup");
  MPI_Comm_set_errhandler(mpi_, MPI_ERRORS_RETURN);
  MPI_Comm_rank(mpi_, &rank_);
  MPI_Comm_size(mpi_, &size_);
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));

  // Rank 0 makes the id and broadcasts it, with a flag so that a failure there
  // is reported on every rank instead of leaving the others in ncclCommInitRank.
  struct {
    int32_t ok;
    char msg[196];
    ncclUniqueId id;
  } boot{};
  if (rank_ == 0) {
    ncclResult_t r = ncclGetUniqueId(&boot.id);
    boot.ok = r == ncclSuccess;
    if (!boot.ok) std::snprintf(boot.msg, sizeof(boot.msg), "%s", ncclGetErrorString(r));
  }
  check_mpi(MPI_Bcast(&boot, sizeof(boot), MPI_BYTE, 0, mpi_), "MPI_Bcast (NCCL unique id)");
  if (!boot.ok) {
    MPI_Comm_free(&mpi_);
    throw DecommError(std::string("NCCL backend: ncclGetUniqueId failed on rank 0: ") + boot.msg);
  }
  ncclResult_t r = ncclCommInitRank(&comm_, size_, boot.id, rank_);
  // Every rank learns whether every rank got a communicator.
  int ok = r == ncclSuccess, all_ok = 0;
  check_mpi(MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, mpi_), "MPI_Allreduce");
  if (!all_ok) {
    std::string why = r == ncclSuccess ? std::string("it failed on another rank")
                                       : std::string(ncclGetErrorString(r));
    if (comm_ != nullptr) ncclCommAbort(comm_);
    comm_ = nullptr;
    MPI_Comm_free(&mpi_);
    throw DecommError("NCCL backend: ncclCommInitRank on rank " + std::to_string(rank_) +
                      " (CUDA device " + std::to_string(device_) + "): " + why +
                      "; use decomm.init(backend='mpi') to run CUDA tensors over MPI");
  }
  watchdog_ = std::thread([this] { watchdog_loop(); });
}

NcclBackend::~NcclBackend() {
  try {
    close();
  } catch (...) {
  }
}

void NcclBackend::close() {
  std::lock_guard<std::mutex> launch(launch_mu_);
  if (closed_) return;
  closed_ = true;
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_.store(true);
  }
  cv_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
  if (comm_ != nullptr && !aborted_.exchange(true)) {
    // Let queued work drain (bounded by the timeout), then free the communicator
    // with ncclCommAbort: a local call, where ncclCommDestroy may wait for peers
    // that have already exited, so shutdown never hangs on another rank.
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    const auto dl = deadline();
    while (cudaStreamQuery(stream_.stream()) == cudaErrorNotReady && !failed_.load() &&
           std::chrono::steady_clock::now() < dl) {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    (void)cudaGetLastError();
    ncclCommAbort(comm_);
  }
  comm_ = nullptr;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && mpi_ != MPI_COMM_NULL) MPI_Comm_free(&mpi_);
  mpi_ = MPI_COMM_NULL;
  {
    std::lock_guard<std::mutex> lk(mu_);
    pending_.clear();
  }
}

std::string NcclBackend::error() const {
  std::lock_guard<std::mutex> lk(mu_);
  return error_;
}

void NcclBackend::raise_if_failed() const {
  if (failed_.load()) throw DecommError(error());
}

std::chrono::steady_clock::time_point NcclBackend::deadline() const {
  return std::chrono::steady_clock::now() +
         std::chrono::microseconds(static_cast<int64_t>(timeout_s_ * 1e6));
}

std::string NcclBackend::where(int32_t kind, const std::string& name) const {
  return op_where(kind, name, rank_);
}

void NcclBackend::record_failure(const std::string& why) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (error_.empty()) {
      error_ = why + "; the NCCL communicator was aborted, so decomm ops on CUDA tensors fail "
               "from now on (call decomm.shutdown() and decomm.init() to start again)";
    }
  }
  failed_.store(true);
}

void NcclBackend::abort_comm() {
  if (comm_ != nullptr && !aborted_.exchange(true)) ncclCommAbort(comm_);
}

void NcclBackend::fail(const std::string& why) {
  record_failure(why);
  // Abort only while no op is being queued (queueing never waits on the GPU, so
  // the lock comes free soon); close() aborts instead if it is shutting down.
  std::unique_lock<std::mutex> launch(launch_mu_, std::defer_lock);
  while (!launch.try_lock()) {
    if (stop_.load()) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  abort_comm();
}

template <typename F>
void NcclBackend::group(int32_t kind, const std::string& name, F&& body) {
  try {
    Group g(comm_);
    body();
    g.end();
  } catch (const std::exception& e) {
    record_failure(where(kind, name) + ": " + e.what());
    abort_comm();
    throw DecommError(error());
  }
}

void NcclBackend::watchdog_loop() {
  // Without this, the CUDA runtime would create a context on device 0 for
  // this thread on its first call, on every rank.
  cudaSetDevice(device_);
  std::vector<std::shared_ptr<NcclWork>> local;
  while (true) {
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait_for(lk, std::chrono::milliseconds(pending_.empty() ? 200 : 5),
                   [&] { return stop_.load(); });
      if (stop_.load()) return;
      local.assign(pending_.begin(), pending_.end());
    }
    if (failed_.load()) continue;
    const auto now = std::chrono::steady_clock::now();
    for (auto& w : local) {
      if (w->done.query()) {
        w->finished.store(true);
      } else if (now > w->deadline) {
        std::ostringstream os;
        os << w->what << ": timed out after " << timeout_s_ << " s waiting for " << w->peers
           << " on the GPU (a rank died, is stuck, or did not make the matching call; set the "
              "limit with decomm.init(timeout=...) or DECOMM_TIMEOUT)";
        fail(os.str());
        break;
      }
    }
    if (!failed_.load() && comm_ != nullptr) {
      ncclResult_t async_err = ncclSuccess;
      if (ncclCommGetAsyncError(comm_, &async_err) == ncclSuccess &&
          async_err != ncclSuccess && async_err != ncclInProgress) {
        fail(std::string("NCCL reported an asynchronous error: ") + ncclGetErrorString(async_err));
      }
    }
    std::lock_guard<std::mutex> lk(mu_);
    pending_.erase(std::remove_if(pending_.begin(), pending_.end(),
                                  [](const std::shared_ptr<NcclWork>& w) {
                                    return w->finished.load();
                                  }),
                   pending_.end());
  }
}

void NcclBackend::validate(const at::Tensor& t, const char* what, const std::string& op,
                           const std::string& name) const {
  if (!t.is_cuda()) {
    throw DecommError(op + " '" + name + "' on rank " + std::to_string(rank_) + ": " + what +
                      " is on " + t.device().str() + ", not a CUDA device");
  }
  if (t.device().index() != device_) {
    throw DecommError(op + " '" + name + "' on rank " + std::to_string(rank_) + ": " + what +
                      " is on " + t.device().str() + ", but decomm's NCCL communicator on this "
                      "rank uses cuda:" + std::to_string(device_) +
                      " (call torch.cuda.set_device() before decomm.init(), or move the tensor)");
  }
  if (!t.is_contiguous()) {
    throw DecommError(op + " '" + name + "': " + what + " must be contiguous");
  }
}

std::vector<Header> NcclBackend::exchange_headers(const Header& mine,
                                                  const std::vector<int64_t>& src,
                                                  const std::vector<int64_t>& dst,
                                                  bool ignore_first_dim) {
  // Every neighbour on either side gets this rank's header and sends its own.
  std::set<int64_t> peer_set(src.begin(), src.end());
  peer_set.insert(dst.begin(), dst.end());
  const std::vector<int64_t> peers(peer_set.begin(), peer_set.end());
  // peers.size() incoming headers, then the outgoing one: one buffer, kept alive
  // (leaked) if MPI may still use it after a timeout.
  auto theirs = std::make_shared<std::vector<Header>>(peers.size() + 1);
  theirs->back() = mine;
  const Header* out_hdr = &theirs->back();
  std::vector<MPI_Request> reqs(2 * peers.size(), MPI_REQUEST_NULL);
  for (size_t p = 0; p < peers.size(); ++p) {
    (*theirs)[p].magic = 0;
    check_mpi(MPI_Irecv(&(*theirs)[p], sizeof(Header), MPI_BYTE, static_cast<int>(peers[p]),
                        kTagNcclHeader, mpi_, &reqs[p]), "MPI_Irecv");
  }
  for (size_t p = 0; p < peers.size(); ++p) {
    check_mpi(MPI_Isend(out_hdr, sizeof(Header), MPI_BYTE, static_cast<int>(peers[p]),
                        kTagNcclHeader, mpi_, &reqs[peers.size() + p]), "MPI_Isend");
  }
  const auto dl = deadline();
  int flag = 0;
  while (true) {
    check_mpi(MPI_Testall(static_cast<int>(reqs.size()), reqs.data(), &flag, MPI_STATUSES_IGNORE),
              "MPI_Testall");
    if (flag) break;
    if (std::chrono::steady_clock::now() > dl) {
      std::vector<int64_t> in_missing, out_missing;
      for (size_t p = 0; p < peers.size(); ++p) {
        if (reqs[p] != MPI_REQUEST_NULL) in_missing.push_back(peers[p]);
        if (reqs[peers.size() + p] != MPI_REQUEST_NULL) out_missing.push_back(peers[p]);
      }
      for (auto& r : reqs) {
        if (r == MPI_REQUEST_NULL) continue;
        MPI_Cancel(&r);
        MPI_Request_free(&r);
      }
      // MPI may still use the buffers of cancelled requests: never free them.
      new std::shared_ptr<std::vector<Header>>(theirs);
      std::ostringstream os;
      os << where(mine.op, mine.name) << ": timed out after " << timeout_s_ << " s waiting for ";
      if (!in_missing.empty()) os << "neighbour(s) " << join(in_missing) << " to make the call";
      if (!out_missing.empty())
        os << (in_missing.empty() ? "" : " and ") << "neighbour(s) " << join(out_missing)
           << " to receive this rank's header";
      os << " (a rank died, is stuck, or did not make the matching call; set the limit with "
            "decomm.init(timeout=...) or DECOMM_TIMEOUT)";
      throw DecommError(os.str());
    }
    sched_yield();
  }
  std::ostringstream errs;
  int bad = 0;
  for (size_t p = 0; p < peers.size(); ++p) {
    std::string d = header_diff(mine, (*theirs)[p], ignore_first_dim, false);
    if (d.empty()) continue;
    errs << (bad++ ? "; " : "") << "neighbour " << peers[p] << " called differently: " << d;
  }
  if (bad) {
    throw DecommError(where(mine.op, mine.name) + ": " + errs.str() +
                      " (that rank's value vs this rank's)");
  }
  std::vector<Header> from_src;
  for (int64_t s : src) {
    const size_t p = static_cast<size_t>(
        std::lower_bound(peers.begin(), peers.end(), s) - peers.begin());
    from_src.push_back((*theirs)[p]);
  }
  return from_src;
}

std::vector<Header> NcclBackend::check_collective(const Header& mine, bool ignore_first_dim,
                                                  bool compare_root) {
  // size_ gathered headers, then this rank's (the send buffer), kept alive together.
  auto all = std::make_shared<std::vector<Header>>(static_cast<size_t>(size_) + 1);
  all->back() = mine;
  MPI_Request req = MPI_REQUEST_NULL;
  check_mpi(MPI_Iallgather(&all->back(), sizeof(Header), MPI_BYTE, all->data(), sizeof(Header),
                           MPI_BYTE, mpi_, &req), "MPI_Iallgather");
  const auto dl = deadline();
  int flag = 0;
  while (true) {
    check_mpi(MPI_Test(&req, &flag, MPI_STATUS_IGNORE), "MPI_Test");
    if (flag) break;
    if (std::chrono::steady_clock::now() > dl) {
      new std::shared_ptr<std::vector<Header>>(all);  // MPI may still write into it
      throw DecommError(where(mine.op, mine.name) + ": timed out after " +
                        std::to_string(timeout_s_) + " s waiting for the other ranks to make "
                        "the call (a rank died, is stuck, or called something else)");
    }
    sched_yield();
  }
  check_agreement(all->data(), size_, mine, rank_, ignore_first_dim, compare_root);
  all->pop_back();
  return *all;
}

std::shared_ptr<NcclWork> NcclBackend::finish(int32_t kind, const std::string& name,
                                              std::string peers, at::Tensor result,
                                              const c10::cuda::CUDAStream& caller,
                                              bool order_caller) {
  auto w = std::make_shared<NcclWork>();
  w->what = where(kind, name);
  w->peers = std::move(peers);
  w->result = std::move(result);
  w->deadline = deadline();
  w->done.record(stream_.stream());
  if (order_caller) w->done.block(caller.stream());
  {
    std::lock_guard<std::mutex> lk(mu_);
    pending_.push_back(w);
  }
  cv_.notify_all();
  return w;
}

// ------------------------------------------------------------------- Launch
// The scope in which one op is queued, the same for every op. From its
// construction it holds launch_mu_ (one op is queued at a time: NCCL groups
// are per thread, and the watchdog aborts only between ops) and has refused a
// backend that has failed or is closed. on_device(), called once the headers
// agree, makes this rank's device current and has decomm's stream wait for an
// event on the caller's current stream, so the op reads its inputs once they
// are ready; it returns that caller stream, which finish() orders after the op.
// All of it is undone, in reverse, when the scope ends.
class NcclBackend::Launch {
 public:
  explicit Launch(NcclBackend& be) : be_(be), lock_(be.launch_mu_) {
    be_.raise_if_failed();
    if (be_.closed_) throw DecommError("NCCL backend is closed (decomm.shutdown() was called)");
  }
  Launch(const Launch&) = delete;
  Launch& operator=(const Launch&) = delete;

  const c10::cuda::CUDAStream& on_device() {
    const auto dev = static_cast<c10::DeviceIndex>(be_.device_);
    guard_.emplace(dev);
    caller_.emplace(c10::cuda::getCurrentCUDAStream(dev));
    CudaEvent ready;  // decomm's stream starts once the caller's work so far is done
    ready.record(caller_->stream());
    ready.block(be_.stream_.stream());
    return *caller_;
  }

 private:
  NcclBackend& be_;
  std::lock_guard<std::mutex> lock_;
  std::optional<c10::cuda::CUDAGuard> guard_;
  std::optional<c10::cuda::CUDAStream> caller_;
};

// -------------------------------------------------------- neighbor_allreduce
std::shared_ptr<NcclHandle> NcclBackend::neighbor_allreduce(
    const at::Tensor& x, const at::Tensor& out, double self_weight,
    const std::vector<int64_t>& src, const std::vector<double>& src_w,
    const std::vector<int64_t>& dst, const std::vector<double>& dst_w, const std::string& name,
    int64_t round, uint64_t topo_hash, bool async) {
  static const std::string op = "neighbor_allreduce";
  Launch launch(*this);
  validate(x, "the tensor", op, name);
  validate(out, "the output", op, name);
  ncclDataType_t nt = ncclFloat32;
  cuda::FloatType ft = cuda::FloatType::kFloat;
  if (!nccl_float_type(x.scalar_type(), &nt, &ft) || out.scalar_type() != x.scalar_type() ||
      out.numel() != x.numel()) {
    throw DecommError(op + " '" + name + "': needs float16/bfloat16/float32/float64 tensors of "
                      "one dtype and size");
  }
  if (src.size() != src_w.size() || dst.size() != dst_w.size()) {
    throw DecommError(op + " '" + name + "': one weight per rank");
  }
  Header hdr = make_header(kNeighborAllreduce, p2p_seq_++, x, name, round, topo_hash);
  if (check_) exchange_headers(hdr, src, dst, false);

  const c10::cuda::CUDAStream& caller = launch.on_device();
  const int64_t n = x.numel();
  std::vector<at::Tensor> recv(src.size());
  std::vector<const void*> payload(dst.size(), x.data_ptr());
  std::vector<at::Tensor> scaled;
  {
    // Scratch memory belongs to decomm's stream: the caching allocator reuses
    // it only for later work on that stream, so it may be dropped at once.
    c10::cuda::CUDAStreamGuard on_ours(stream_);
    for (size_t s = 0; s < src.size(); ++s) recv[s] = at::empty({n}, x.options());
    for (size_t d = 0; d < dst.size(); ++d) {
      if (dst_w[d] == 1.0 || n == 0) continue;
      scaled.push_back(at::empty({n}, x.options()));
      check_cuda(cuda::scaled_copy(scaled.back().data_ptr(), x.data_ptr(), dst_w[d], n, ft,
                                   stream_.stream()), "scaled_copy kernel");
      payload[d] = scaled.back().data_ptr();
    }
  }
  if (n > 0 && !(src.empty() && dst.empty())) {
    group(kNeighborAllreduce, name, [&] {
      for (size_t s = 0; s < src.size(); ++s)
        check_nccl(ncclRecv(recv[s].data_ptr(), static_cast<size_t>(n), nt,
                            static_cast<int>(src[s]), comm_, stream_.stream()), "ncclRecv",
                   comm_);
      for (size_t d = 0; d < dst.size(); ++d)
        check_nccl(ncclSend(payload[d], static_cast<size_t>(n), nt, static_cast<int>(dst[d]),
                            comm_, stream_.stream()), "ncclSend", comm_);
    });
  }
  // Stream order puts the sum after every receive has landed and every send has
  // read x, so out may alias x.
  std::vector<const void*> rs(recv.size());
  for (size_t s = 0; s < recv.size(); ++s) rs[s] = recv[s].data_ptr();
  check_cuda(cuda::weighted_sum(out.data_ptr(), x.data_ptr(), self_weight, rs.data(),
                                src_w.data(), static_cast<int64_t>(rs.size()), n, ft,
                                stream_.stream()), "weighted_sum kernel");
  used_on(x, stream_);
  used_on(out, stream_);
  bytes_sent += nbytes_of(x) * static_cast<int64_t>(dst.size());
  bytes_received += nbytes_of(x) * static_cast<int64_t>(src.size());
  std::string peers = "in-neighbour(s) " + join(src) + " and out-neighbour(s) " + join(dst);
  auto w = finish(kNeighborAllreduce, name, std::move(peers), out, caller, !async);
  return std::make_shared<NcclHandle>(w, shared_from_this());
}

// -------------------------------------------------------- neighbor_allgather
at::Tensor NcclBackend::neighbor_allgather(const at::Tensor& x, const std::vector<int64_t>& src,
                                           const std::vector<int64_t>& dst,
                                           const std::string& name, int64_t round,
                                           uint64_t topo_hash) {
  static const std::string op = "neighbor_allgather";
  Launch launch(*this);
  validate(x, "the tensor", op, name);
  if (x.dim() == 0) throw DecommError(op + " '" + name + "': needs at least one dimension");
  Header hdr = make_header(kNeighborAllgather, p2p_seq_++, x, name, round, topo_hash);
  // Always exchanged: the headers carry each neighbour's first dimension.
  std::vector<Header> theirs = exchange_headers(hdr, src, dst, true);

  const c10::cuda::CUDAStream& caller = launch.on_device();
  int64_t row_bytes = static_cast<int64_t>(x.element_size());
  for (int64_t d = 1; d < x.dim(); ++d) row_bytes *= x.size(d);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  int64_t total = 0;
  for (const auto& h : theirs) total += h.shape[0];
  shape[0] = total;
  at::Tensor out = at::empty(shape, x.options());  // the caller's stream owns it
  auto* base = static_cast<uint8_t*>(out.data_ptr());
  if (row_bytes > 0) {
    group(kNeighborAllgather, name, [&] {
      int64_t offset = 0;
      for (size_t s = 0; s < src.size(); ++s) {
        const int64_t bytes = theirs[s].shape[0] * row_bytes;
        if (bytes > 0)
          check_nccl(ncclRecv(base + offset, static_cast<size_t>(bytes), ncclUint8,
                              static_cast<int>(src[s]), comm_, stream_.stream()), "ncclRecv",
                     comm_);
        offset += bytes;
        bytes_received += bytes;
      }
      const int64_t mine = nbytes_of(x);
      for (int64_t d : dst) {
        if (mine > 0)
          check_nccl(ncclSend(x.data_ptr(), static_cast<size_t>(mine), ncclUint8,
                              static_cast<int>(d), comm_, stream_.stream()), "ncclSend", comm_);
        bytes_sent += mine;
      }
    });
  }
  used_on(x, stream_);
  used_on(out, stream_);
  finish(kNeighborAllgather, name, "in-neighbour(s) " + join(src) + " and out-neighbour(s) " +
         join(dst), out, caller, true);
  return out;
}

// ------------------------------------------------------------------ allreduce
std::shared_ptr<NcclHandle> NcclBackend::allreduce(const at::Tensor& x, const at::Tensor& out,
                                                   bool average, const std::string& name,
                                                   bool async) {
  static const std::string op = "allreduce";
  Launch launch(*this);
  validate(x, "the tensor", op, name);
  validate(out, "the output", op, name);
  ncclDataType_t nt = ncclFloat32;
  cuda::FloatType ft = cuda::FloatType::kFloat;
  const bool is_float = nccl_float_type(x.scalar_type(), &nt, &ft);
  if (!is_float && !nccl_int_type(x.scalar_type(), &nt)) {
    throw DecommError(op + " '" + name + "': NCCL has no sum for dtype " +
                      std::string(c10::toString(x.scalar_type())));
  }
  if (average && !is_float) throw DecommError(op + " '" + name + "': average needs a float dtype");
  Header hdr = make_header(kAllreduce, coll_seq_++, x, name, -1, 0);
  hdr.flags = average ? 1 : 0;
  if (check_) check_collective(hdr, false, false);

  const c10::cuda::CUDAStream& caller = launch.on_device();
  const int64_t n = x.numel();
  if (n > 0) {
    group(kAllreduce, name, [&] {
      check_nccl(ncclAllReduce(x.data_ptr(), out.data_ptr(), static_cast<size_t>(n), nt,
                               ncclSum, comm_, stream_.stream()), "ncclAllReduce", comm_);
    });
    if (average) {
      check_cuda(cuda::scaled_copy(out.data_ptr(), out.data_ptr(), 1.0 / size_, n, ft,
                                   stream_.stream()), "scaled_copy kernel");
    }
  }
  used_on(x, stream_);
  used_on(out, stream_);
  bytes_sent += nbytes_of(x);
  auto w = finish(kAllreduce, name, "all ranks", out, caller, !async);
  return std::make_shared<NcclHandle>(w, shared_from_this());
}

// ------------------------------------------------------------------ broadcast
void NcclBackend::broadcast(const at::Tensor& inout, int root, const std::string& name) {
  static const std::string op = "broadcast";
  Launch launch(*this);
  validate(inout, "the tensor", op, name);
  Header hdr = make_header(kBroadcast, coll_seq_++, inout, name, -1, 0);
  hdr.root = root;
  if (check_) check_collective(hdr, false, true);
  const c10::cuda::CUDAStream& caller = launch.on_device();
  const int64_t nbytes = nbytes_of(inout);
  if (nbytes > 0) {
    group(kBroadcast, name, [&] {
      check_nccl(ncclBroadcast(inout.data_ptr(), inout.data_ptr(), static_cast<size_t>(nbytes),
                               ncclUint8, root, comm_, stream_.stream()), "ncclBroadcast",
                 comm_);
    });
  }
  used_on(inout, stream_);
  if (rank_ == root) bytes_sent += nbytes;
  finish(kBroadcast, name, "root " + std::to_string(root), inout, caller, true);
}

// ------------------------------------------------------------------ allgather
at::Tensor NcclBackend::allgather(const at::Tensor& x, const std::string& name) {
  static const std::string op = "allgather";
  Launch launch(*this);
  validate(x, "the tensor", op, name);
  if (x.dim() == 0) throw DecommError(op + " '" + name + "': needs at least one dimension");
  Header hdr = make_header(kAllgather, coll_seq_++, x, name, -1, 0);
  // Gathered and compared whatever check says: they carry every rank's first dimension.
  const std::vector<Header> all = check_collective(hdr, true, false);

  const c10::cuda::CUDAStream& caller = launch.on_device();
  int64_t row_bytes = static_cast<int64_t>(x.element_size());
  for (int64_t d = 1; d < x.dim(); ++d) row_bytes *= x.size(d);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  std::vector<int64_t> offsets(static_cast<size_t>(size_) + 1, 0);
  for (int r = 0; r < size_; ++r) offsets[r + 1] = offsets[r] + all[r].shape[0];
  shape[0] = offsets[size_];
  at::Tensor out = at::empty(shape, x.options());
  auto* base = static_cast<uint8_t*>(out.data_ptr());
  const int64_t mine = nbytes_of(x);
  if (row_bytes > 0 && shape[0] > 0) {
    // This rank's own rows: a device copy on decomm's stream.
    if (mine > 0)
      check_cuda(cudaMemcpyAsync(base + offsets[rank_] * row_bytes, x.data_ptr(),
                                 static_cast<size_t>(mine), cudaMemcpyDeviceToDevice,
                                 stream_.stream()), "cudaMemcpyAsync");
    group(kAllgather, name, [&] {
      for (int r = 0; r < size_; ++r) {
        if (r == rank_) continue;
        const int64_t bytes = all[r].shape[0] * row_bytes;
        if (bytes > 0)
          check_nccl(ncclRecv(base + offsets[r] * row_bytes, static_cast<size_t>(bytes),
                              ncclUint8, r, comm_, stream_.stream()), "ncclRecv", comm_);
        if (mine > 0)
          check_nccl(ncclSend(x.data_ptr(), static_cast<size_t>(mine), ncclUint8, r, comm_,
                              stream_.stream()), "ncclSend", comm_);
        bytes_received += bytes;
        bytes_sent += mine;
      }
    });
  }
  used_on(x, stream_);
  used_on(out, stream_);
  finish(kAllgather, name, "all ranks", out, caller, true);
  return out;
}

void NcclBackend::barrier() {
  Launch launch(*this);
  MPI_Request req = MPI_REQUEST_NULL;
  check_mpi(MPI_Ibarrier(mpi_, &req), "MPI_Ibarrier");
  const auto dl = deadline();
  int flag = 0;
  while (true) {
    check_mpi(MPI_Test(&req, &flag, MPI_STATUS_IGNORE), "MPI_Test");
    if (flag) return;
    if (std::chrono::steady_clock::now() > dl) {
      throw DecommError("barrier on rank " + std::to_string(rank_) + ": timed out after " +
                        std::to_string(timeout_s_) + " s waiting for the other ranks");
    }
    sched_yield();
  }
}

}  // namespace decomm

#endif  // DECOMM_HAVE_NCCL
