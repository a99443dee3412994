// The NCCL backend: neighbour ops and collectives on CUDA tensors.
//
// * The communicator is created at construction from a unique id that rank 0
//   makes and broadcasts over MPI (decomm's own duplicate of the communicator
//   mpi4py hands us); the MPI communicator also carries the small per-call
//   headers that let ranks that disagree (op, name, shape, dtype, round, call
//   count) raise a DecommError before any NCCL work is queued, and the
//   first-dimension sizes that allgather needs.
// * Every op runs on decomm's own stream, which first waits for an event
//   recorded on the caller's current stream (so the input is ready); a
//   blocking op then makes the caller's stream wait for decomm's (so whatever
//   the caller queues next sees the result), and a non-blocking op does that
//   in `NcclHandle::wait()`. Neither blocks the host on the GPU.
// * neighbor_allreduce = ncclRecv from every in-neighbour and ncclSend to every
//   out-neighbour inside one ncclGroupStart/End, then the fused weighted-sum
//   kernel (csrc/cuda/weighted_sum.cu) on the same stream.
// * A watchdog thread polls each op's completion event: an op still running
//   after the timeout (a rank died or never made the matching call), or an
//   asynchronous NCCL error, aborts the communicator, and every later call
//   raises DecommError with the reason instead of hanging.
//
// Built only with NCCL (DECOMM_HAVE_NCCL=1); see setup.py.
#pragma once

#include "common.h"

#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>  // before nccl.h: older NCCL headers define ncclBfloat16 only after it
#include <nccl.h>

#if NCCL_VERSION_CODE < 21000
#error "decomm's NCCL backend needs NCCL >= 2.10 (bfloat16 and point-to-point send/recv)"
#endif

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace decomm {

class NcclBackend;

// A CUDA event for ordering and completion only (no timing), created when first
// recorded. Plain CUDA runtime, so this header needs none of ATen's CUDA headers.
class CudaEvent {
 public:
  CudaEvent() = default;
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  ~CudaEvent();
  void record(cudaStream_t stream);       // throws DecommError on failure
  void block(cudaStream_t stream) const;  // stream waits for the event
  bool query() const;                     // true once reached (or never recorded)

 private:
  cudaEvent_t ev_ = nullptr;
};

// One op queued on decomm's stream: its completion event and its result.
struct NcclWork {
  std::string what;  // e.g. "neighbor_allreduce 'grad' on rank 3"
  std::string peers; // who it exchanges with, for the timeout message
  CudaEvent done;
  at::Tensor result;
  std::chrono::steady_clock::time_point deadline;
  std::atomic<bool> finished{false};
};

// The Python-visible handle of a non-blocking op.
class NcclHandle {
 public:
  NcclHandle(std::shared_ptr<NcclWork> work, std::shared_ptr<NcclBackend> be)
      : work_(std::move(work)), be_(std::move(be)) {}
  // True once the op's GPU work has completed (or the backend has failed).
  bool poll();
  // Orders the caller's current stream after the op and returns the result;
  // raises DecommError when the backend has failed. Does not block the host.
  at::Tensor wait();
  // Blocks the host until the op has completed on the GPU (bounded by the timeout).
  at::Tensor synchronize();

 private:
  std::shared_ptr<NcclWork> work_;
  std::shared_ptr<NcclBackend> be_;
};

class NcclBackend : public std::enable_shared_from_this<NcclBackend> {
 public:
  // Collective over the MPI communicator `comm_f` (Fortran handle, from mpi4py's
  // comm.py2f()). `device` is this rank's CUDA device; no two ranks may share one.
  NcclBackend(int64_t comm_f, int device, double timeout_s, bool check);
  ~NcclBackend();
  void close();

  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }
  double timeout() const { return timeout_s_; }
  void set_timeout(double s) { timeout_s_ = s; }
  void set_check(bool c) { check_ = c; }
  bool failed() const { return failed_.load(); }
  std::string error() const;

  std::shared_ptr<NcclHandle> neighbor_allreduce(
      const at::Tensor& x, const at::Tensor& out, double self_weight,
      const std::vector<int64_t>& src, const std::vector<double>& src_w,
      const std::vector<int64_t>& dst, const std::vector<double>& dst_w,
      const std::string& name, int64_t round, uint64_t topo_hash, bool async);
  at::Tensor neighbor_allgather(const at::Tensor& x, const std::vector<int64_t>& src,
                                const std::vector<int64_t>& dst, const std::string& name,
                                int64_t round, uint64_t topo_hash);
  std::shared_ptr<NcclHandle> allreduce(const at::Tensor& x, const at::Tensor& out, bool average,
                                        const std::string& name, bool async);
  void broadcast(const at::Tensor& inout, int root, const std::string& name);
  at::Tensor allgather(const at::Tensor& x, const std::string& name);
  void barrier();

  std::atomic<int64_t> bytes_sent{0};
  std::atomic<int64_t> bytes_received{0};

  // Raises DecommError if the watchdog has aborted the communicator.
  void raise_if_failed() const;

 private:
  // The scope of one op being queued: the lock, the failed/closed checks, the
  // device and the stream ordering after the caller's stream (nccl_backend.cpp).
  class Launch;

  // Exchanges headers with every rank in src and dst (both directions on each
  // edge, so both ends of a mismatched edge find out) and raises on any
  // difference or after the timeout. Returns the headers received from src.
  std::vector<Header> exchange_headers(const Header& mine, const std::vector<int64_t>& src,
                                       const std::vector<int64_t>& dst, bool ignore_first_dim);
  // Gathers every rank's header; raises (on every rank) if any differ
  // (decomm::check_agreement, shared with the MPI backend).
  std::vector<Header> check_collective(const Header& mine, bool ignore_first_dim,
                                       bool compare_root);
  void validate(const at::Tensor& t, const char* what, const std::string& op,
                const std::string& name) const;
  std::string where(int32_t kind, const std::string& name) const;
  std::shared_ptr<NcclWork> finish(int32_t kind, const std::string& name, std::string peers,
                                   at::Tensor result, const c10::cuda::CUDAStream& caller,
                                   bool order_caller);
  void watchdog_loop();
  // Records the first failure; every later call raises it.
  void record_failure(const std::string& why);
  void abort_comm();                  // caller holds launch_mu_ (or the backend is closing)
  void fail(const std::string& why);  // from the watchdog: record, then abort when safe
  // Queues the NCCL calls of `body` as one group; if any of them (or the group)
  // fails, the communicator is aborted: peers may already wait for the rest.
  template <typename F>
  void group(int32_t kind, const std::string& name, F&& body);
  std::chrono::steady_clock::time_point deadline() const;

  MPI_Comm mpi_ = MPI_COMM_NULL;
  ncclComm_t comm_ = nullptr;
  int rank_ = 0, size_ = 1, device_ = 0;
  double timeout_s_;
  bool check_;
  int64_t p2p_seq_ = 0, coll_seq_ = 0;
  c10::cuda::CUDAStream stream_;

  std::mutex launch_mu_;  // one op is queued at a time (NCCL groups are per thread)
  std::thread watchdog_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<NcclWork>> pending_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> failed_{false};
  std::atomic<bool> aborted_{false};
  std::string error_;
  bool closed_ = false;
};

}  // namespace decomm
