// The MPI backend: point-to-point neighbour ops and collectives over a
// communicator duplicated from the one mpi4py hands us, with a progress
// thread that drives non-blocking handles while Python computes.
//
// csrc/mpi_backend.cpp is the engine (lifecycle, progress thread, op life,
// housekeeping); each op family is in csrc/ops/: neighbor_allreduce.cpp,
// neighbor_allgather.cpp, collectives.cpp (what they share: csrc/ops/internal.h).
#pragma once

#include "common.h"

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>

namespace decomm {

class MpiBackend;

// Timeline timestamps of one op (steady_clock = CLOCK_MONOTONIC, in ns; 0 = not
// recorded). Taken only while MpiBackend::timeline() is on, so the off path costs
// one relaxed atomic load per point.
enum OpTime : int { kTimeBegin = 0, kTimePosted = 1, kTimeArrived = 2, kTimeDone = 3 };
using OpTimes = std::array<int64_t, 4>;
int64_t steady_ns();
// The timestamps of the last op this thread ran to completion inside run() (a
// blocking call), for the timeline of ops that return no handle.
OpTimes last_op_times();

// One in-flight operation. `advance()` is called repeatedly (by the caller's
// thread for blocking ops, by the progress thread for handles) until it
// returns true; then `error` is empty on success.
class Op {
 public:
  virtual ~Op() = default;
  bool advance();  // returns true once finished (successfully or not)
  bool finished() const { return finished_.load(); }
  const std::string& error() const { return error_; }
  // A peer process failed during this op (the ULFM classes), not a misuse.
  bool peer_failed() const { return peer_failed_; }
  // Throws the op's error: PeerFailure after a peer failure, else DecommError.
  [[noreturn]] void raise() const;
  at::Tensor result;
  const OpTimes& times() const { return times_; }
  void mark(int point);  // records times_[point] when the timeline is on

 protected:
  Op(MpiBackend* be, int32_t kind, std::string name, int64_t seq = -1);
  virtual bool step() = 0;        // drive MPI; true when all requests are done
  virtual std::string pending() const = 0;  // who we are still waiting for
  // A message naming a rank this op still waits on that has shut down without
  // making this call ("" when none): then the op fails at once.
  virtual std::string departed() const { return ""; }
  void fail(const std::string& msg);
  // A peer failed: revoke the communicator (so ranks that are not its
  // neighbours stop waiting too), then let every request complete in error
  // and release it, so the op's buffers are free again.
  void fail_peer(const std::string& msg);
  // Every request the op may still have in flight.
  virtual void requests(std::vector<MPI_Request*>& out);
  virtual void abandon_requests();  // cancel and free them (a timeout, a misuse)

  MpiBackend* be_;
  int32_t kind_;
  std::string name_;
  std::vector<MPI_Request> reqs_;
  std::chrono::steady_clock::time_point deadline_;
  std::string error_;
  std::atomic<bool> finished_{false};
  std::vector<at::Tensor> keep_alive_;  // buffers MPI may still touch
  OpTimes times_{};
  int64_t seq_;        // this rank's call number of the op's family (-1: none)
  uint32_t polls_ = 0;
  bool peer_failed_ = false;
  bool settled_ = false;  // every request completed after a revoke: nothing to bury

  friend class MpiBackend;
};

// The Python-visible handle of a non-blocking op.
class Handle {
 public:
  explicit Handle(std::shared_ptr<Op> op, MpiBackend* be) : op_(std::move(op)), be_(be) {}
  bool poll();
  at::Tensor wait();  // raises DecommError on failure
  OpTimes times() const { return op_->times(); }
 private:
  std::shared_ptr<Op> op_;
  MpiBackend* be_;
};

struct Peers {
  std::vector<int64_t> ranks;
  std::vector<double> weights;
};

class MpiBackend {
 public:
  MpiBackend(int64_t comm_f, double timeout_s, bool check, bool progress_thread = true);
  ~MpiBackend();
  void close();

  // Fault tolerance (ULFM). revoke(): once, on the first peer failure seen;
  // every pending and later call on this communicator then fails on every
  // rank. failed_ranks(): the ranks of this communicator this process knows
  // to have failed (local knowledge; only a shrink makes it the same on all).
  // abandon(): after a failure, stop the progress thread (pending handles
  // fail) and drop the communicator without byes and without freeing it.
  void revoke();
  bool revoked() const;  // by this rank or (ULFM) by any other
  std::vector<int64_t> failed_ranks() const;
  void abandon();
  // With fault tolerance a peer that shut down before making a call this rank
  // waits for is a lost rank (a PeerFailure), not a misuse.
  void set_fault_tolerant(bool on) { fault_tolerant_ = on; }
  bool fault_tolerant() const { return fault_tolerant_; }
  // Tell every peer this rank has shut down (once; close() does it too).
  void say_goodbye();

  int rank() const { return rank_; }
  int size() const { return size_; }
  bool has_progress_thread() const { return progress_.joinable(); }
  void set_timeout(double s) { timeout_s_ = s; }
  double timeout() const { return timeout_s_; }
  void set_check(bool c) { check_ = c; }
  bool check() const { return check_; }  // cross-rank header checks on
  bool timeline() const { return timeline_.load(std::memory_order_relaxed); }
  // How long a blocking wait spins before it yields the core (ns; 0: yield at once).
  void set_spin_us(double us) { spin_ns_.store(static_cast<int64_t>(us * 1e3)); }
  double spin_us() const { return spin_ns_.load() / 1e3; }
  void set_timeline(bool on) { timeline_.store(on, std::memory_order_relaxed); }

  // out = self_weight * x + sum_j src.weights[j] * x_j over src.ranks, while x
  // (scaled by dst.weights) is sent to every rank in dst.ranks.
  std::shared_ptr<Handle> neighbor_allreduce(const at::Tensor& x, const at::Tensor& out,
                                             double self_weight, const Peers& src,
                                             const Peers& dst, const std::string& name,
                                             int64_t round, uint64_t topo_hash, bool async);
  at::Tensor neighbor_allgather(const at::Tensor& x, const std::vector<int64_t>& src,
                                const std::vector<int64_t>& dst, const std::string& name,
                                int64_t round, uint64_t topo_hash);
  std::shared_ptr<Handle> allreduce(const at::Tensor& x, const at::Tensor& out, bool average,
                                    const std::string& name, bool async);
  void broadcast(const at::Tensor& inout, int root, const std::string& name);
  at::Tensor allgather(const at::Tensor& x, const std::string& name);
  void barrier();

  // Runs `op` to completion on this thread (GIL released by the caller).
  void run(Op& op);
  std::chrono::steady_clock::time_point deadline() const;

  // Receives byes from ranks that shut down, drains what failed calls left in
  // flight, and completes those drains; cheap, called every few polls.
  void housekeeping();
  // The call count at which `peer` shut down (-1 while it runs).
  int64_t gone_p2p(int peer) const { return gone_p2p_[peer].load(std::memory_order_relaxed); }
  int64_t gone_coll(int peer) const { return gone_coll_[peer].load(std::memory_order_relaxed); }
  bool any_gone() const { return gone_count_.load(std::memory_order_relaxed) > 0; }
  // "rank 1 has shut down after 40 ... calls; this rank is at call 41" for the
  // first of `peers` that left before making call `seq` ("" when none did).
  std::string departed_peers(const std::vector<int64_t>& peers, int64_t seq, bool p2p) const;
  // Remember a failed neighbour call, so its leftover messages get drained.
  void note_failed_call(int64_t seq);
  // After call `seq` completed: a rank that sent this rank a message for that
  // call which it did not receive ("" when none). The message is drained.
  std::string unexpected_sender(int64_t seq);

  std::atomic<int64_t> bytes_sent{0};
  std::atomic<int64_t> bytes_received{0};
  MPI_Comm comm() const { return comm_; }

 private:
  void progress_loop();
  // Blocking: run to completion here; async: hand to the progress thread.
  std::shared_ptr<Handle> launch(const std::shared_ptr<Op>& op, bool async);
  // Keeps a failed op (and the buffers MPI may still touch) alive for good.
  void bury(const std::shared_ptr<Op>& op);
  void enqueue(std::shared_ptr<Op> op);
  // Gathers every rank's header and raises on all ranks if any differ.
  std::vector<Header> check_collective(const Header& mine, bool ignore_first_dim,
                                       bool compare_root);

  void stop_progress(const char* why, bool peer);

  MPI_Comm comm_ = MPI_COMM_NULL;
  std::atomic<bool> revoked_{false};
  bool fault_tolerant_ = false;
  bool byes_sent_ = false;
  bool byes_done_ = false;  // every bye was delivered
  int rank_ = 0, size_ = 1;
  double timeout_s_;
  bool check_;
  std::atomic<bool> timeline_{false};
  std::atomic<int64_t> spin_ns_{0};
  int64_t p2p_seq_ = 0, coll_seq_ = 0;

  std::thread progress_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Op>> active_;
  bool stop_ = false;
  const char* stop_why_ = "";
  bool stop_peer_ = false;
  std::vector<std::shared_ptr<Op>> graveyard_;  // timed-out ops whose buffers MPI may hold

  // Departures and leftovers (guarded by house_mu_).
  struct Orphan {  // a leftover message, received only to be thrown away
    MPI_Request req = MPI_REQUEST_NULL;
    at::Tensor buf;
  };
  void drain_tag(int tag);
  bool send_byes();  // true when no peer can still send on comm_
  std::mutex house_mu_;
  struct ByeMsg {
    uint32_t magic;
    int32_t pad;
    int64_t p2p_calls;
    int64_t coll_calls;
  };
  ByeMsg bye_in_{};
  MPI_Request bye_req_ = MPI_REQUEST_NULL;
  std::unique_ptr<std::atomic<int64_t>[]> gone_p2p_, gone_coll_;
  std::atomic<int> gone_count_{0};
  std::deque<int64_t> failed_seqs_;
  std::atomic<bool> have_failed_{false};
  std::vector<Orphan> orphans_;

  friend class Handle;
  friend class Op;
};

}  // namespace decomm
