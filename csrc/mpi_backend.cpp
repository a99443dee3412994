// The MPI backend's engine: backend lifecycle (communicator, progress thread,
// shutdown and the byes that tell peers about it), the life of an op (advance,
// timeouts, launch, bury), handles, the scratch-buffer pool, the drain of what
// failed calls leave in flight, and the header agreement of collectives.
//
// The op families live beside it, one file each, the way Horovod keeps
// common/ops/: csrc/ops/neighbor_allreduce.cpp, csrc/ops/neighbor_allgather.cpp
// and csrc/ops/collectives.cpp (allreduce, broadcast, allgather, barrier).
#include "mpi_backend.h"

#include "ops/internal.h"

#include <sched.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <map>
#include <sstream>

namespace decomm {

namespace detail {

int64_t g_tag_span = int64_t(1) << 26;  // clamped at init to what MPI_TAG_UB allows

int checked_count(int64_t nbytes, const std::string& what, int rank) {
  if (nbytes > INT_MAX) {
    throw DecommError(what + " on rank " + std::to_string(rank) + ": a message of " +
                      std::to_string(nbytes) + " bytes exceeds the per-message limit of "
                      "2^31-1 bytes (MPI counts are 32-bit); split the tensor into pieces "
                      "under 2 GiB");
  }
  return static_cast<int>(nbytes);
}

int64_t g_max_chunk = (int64_t(INT_MAX) / 4096) * 4096;

void isend_chunks(const void* buf, int64_t nbytes, int peer, int tag, MPI_Comm comm,
                  std::vector<MPI_Request>& reqs) {
  const char* p = static_cast<const char*>(buf);
  for_each_chunk(nbytes, g_max_chunk, [&](int64_t, int64_t off, int n) {
    reqs.push_back(MPI_REQUEST_NULL);
    check_mpi(MPI_Isend(p + off, n, MPI_BYTE, peer, tag, comm, &reqs.back()), "MPI_Isend");
  });
}

void irecv_chunks(void* buf, int64_t nbytes, int peer, int tag, MPI_Comm comm,
                  std::vector<MPI_Request>& reqs) {
  char* p = static_cast<char*>(buf);
  for_each_chunk(nbytes, g_max_chunk, [&](int64_t, int64_t off, int n) {
    reqs.push_back(MPI_REQUEST_NULL);
    check_mpi(MPI_Irecv(p + off, n, MPI_BYTE, peer, tag, comm, &reqs.back()), "MPI_Irecv");
  });
}

std::string join_ranks(const std::vector<int64_t>& v) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  os << "]";
  return os.str();
}

// ---------------------------------------------------------------- buffer pool
namespace {

// Scratch buffers are reused across calls: training repeats the same sizes
// every step, and fresh large allocations pay page faults on every call (a fresh
// 100 MB buffer measured ~72 ms, against ~10 ms for a pass over it). The pool holds
// at most limit() bytes; a buffer that does not fit evicts the least recently
// returned ones, so the sizes in use now stay cached whatever ran before (a full
// pool that kept its first sizes forever made a 25M-parameter PushSum step fault
// 49k pages).
class BufferPool {
 public:
  at::Tensor get(int64_t nbytes) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      auto it = free_.find(nbytes);
      if (it != free_.end()) {
        at::Tensor t = std::move(it->second.tensor);
        free_.erase(it);
        cached_ -= nbytes;
        return t;
      }
    }
    return at::empty({std::max<int64_t>(nbytes, 1)}, at::TensorOptions().dtype(at::kByte));
  }
  void put(at::Tensor t, int64_t nbytes) {
    std::lock_guard<std::mutex> lk(mu_);
    if (nbytes > limit_) return;
    while (cached_ + nbytes > limit_) {
      auto oldest = free_.begin();
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->second.stamp < oldest->second.stamp) oldest = it;
      cached_ -= oldest->first;
      free_.erase(oldest);
    }
    cached_ += nbytes;
    free_.emplace(nbytes, Entry{std::move(t), ++clock_});
  }
  std::vector<int64_t> sizes() {
    std::lock_guard<std::mutex> lk(mu_);
    std::vector<int64_t> out;
    for (const auto& e : free_) out.push_back(e.first);
    return out;
  }
  int64_t limit() {
    std::lock_guard<std::mutex> lk(mu_);
    return limit_;
  }
  void set_limit(int64_t bytes) {
    std::lock_guard<std::mutex> lk(mu_);
    limit_ = std::max<int64_t>(bytes, 0);
    while (cached_ > limit_) {
      cached_ -= free_.begin()->first;
      free_.erase(free_.begin());
    }
  }

 private:
  struct Entry {
    at::Tensor tensor;
    uint64_t stamp;  // when it was returned: the smallest is evicted first
  };
  std::mutex mu_;
  std::multimap<int64_t, Entry> free_;
  int64_t cached_ = 0;
  int64_t limit_ = int64_t(1) << 30;
  uint64_t clock_ = 0;
};

BufferPool& pool() {
  static BufferPool* p = new BufferPool();  // never destroyed: ops may outlive the backend
  return *p;
}

}  // namespace

at::Tensor pool_get(int64_t nbytes) { return pool().get(nbytes); }
void pool_put(at::Tensor t, int64_t nbytes) { pool().put(std::move(t), nbytes); }
std::vector<int64_t> pool_sizes() { return pool().sizes(); }
int64_t pool_limit() { return pool().limit(); }
void set_pool_limit(int64_t bytes) { pool().set_limit(bytes); }

}  // namespace detail

using namespace detail;

// ------------------------------------------------------------------ timeline
int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

static thread_local OpTimes tl_last_times{};

OpTimes last_op_times() { return tl_last_times; }

void Op::mark(int point) {
  if (be_->timeline()) times_[point] = steady_ns();
}

// ------------------------------------------------------------------------ Op
Op::Op(MpiBackend* be, int32_t kind, std::string name, int64_t seq)
    : be_(be), kind_(kind), name_(std::move(name)), deadline_(be->deadline()), seq_(seq) {
  mark(kTimeBegin);
}

void Op::fail(const std::string& msg) {
  if (!error_.empty()) return;
  error_ = op_where(kind_, name_, be_->rank()) + ": " + msg;
}

void Op::requests(std::vector<MPI_Request*>& out) {
  for (auto& r : reqs_) out.push_back(&r);
}

void Op::abandon_requests() {
  std::vector<MPI_Request*> rs;
  requests(rs);
  for (MPI_Request* r : rs) {
    if (*r == MPI_REQUEST_NULL) continue;
    MPI_Cancel(r);
    MPI_Request_free(r);
  }
}

void Op::fail_peer(const std::string& msg) {
  if (error_.empty()) {
    peer_failed_ = true;
    std::vector<int64_t> failed = be_->failed_ranks();
    be_->revoke();
    fail(failed.empty()
             ? "a peer process failed (another rank revoked the communicator after seeing the "
               "failure; " + msg + ")"
             : "peer process(es) " + join_ranks(failed) + " failed (" + msg + ")");
  }
  // After the revoke every request completes (in error) promptly; give them a
  // moment, then free what is left.
  std::vector<MPI_Request*> rs;
  requests(rs);
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(500);
  bool pending = true;
  while (pending && std::chrono::steady_clock::now() < until) {
    pending = false;
    for (MPI_Request* r : rs) {
      if (*r == MPI_REQUEST_NULL) continue;
      int flag = 0;
      MPI_Test(r, &flag, MPI_STATUS_IGNORE);
      if (!flag && *r != MPI_REQUEST_NULL) pending = true;
    }
    if (pending) sched_yield();
  }
  settled_ = !pending;
  if (pending)
    for (MPI_Request* r : rs)
      if (*r != MPI_REQUEST_NULL) MPI_Request_free(r);
}

void Op::raise() const {
  if (peer_failed_) throw PeerFailure(error_);
  throw DecommError(error_);
}

bool Op::advance() {
  if (finished_.load()) return true;
  bool done = false;
  try {
    done = step();
  } catch (const PeerFailure& e) {
    fail_peer(e.what());
    done = true;
  } catch (const std::exception& e) {
    fail(e.what());
    abandon_requests();
    done = true;
  }
  // Every 32 polls (an op that completes sooner never pays for it): byes from
  // ranks that shut down, and leftovers of failed calls. A rank waiting on one
  // that left fails at once.
  if (!done && (++polls_ & 31u) == 0) be_->housekeeping();
  if (!done && be_->any_gone()) {
    std::string gone = departed();
    if (!gone.empty()) {
      if (be_->fault_tolerant()) {
        fail_peer(gone);  // also completes and releases the requests
      } else {
        fail(gone);
        abandon_requests();
      }
      done = true;
    }
  }
  if (!done && std::chrono::steady_clock::now() > deadline_) {
    std::ostringstream os;
    os << "timed out after " << be_->timeout() << " s waiting for " << pending()
       << " (a rank died, is stuck, or did not make the matching call; set the limit with "
          "decomm.init(timeout=...) or DECOMM_TIMEOUT)";
    fail(os.str());
    abandon_requests();
    done = true;
  }
  if (done) {
    if (!error_.empty() && seq_ >= 0 && (kind_ == kNeighborAllreduce || kind_ == kNeighborAllgather))
      be_->note_failed_call(seq_);
    mark(kTimeDone);
    finished_.store(true);
  }
  return done;
}
// -------------------------------------------------------------------- Handle
bool Handle::poll() {
  if (be_->has_progress_thread()) return op_->finished();
  return op_->advance();
}

at::Tensor Handle::wait() {
  if (be_->has_progress_thread()) {
    std::unique_lock<std::mutex> lk(be_->mu_);
    be_->cv_.wait(lk, [&] { return op_->finished(); });
  } else {
    be_->run(*op_);
  }
  if (!op_->error().empty()) {
    be_->bury(op_);  // a failed op's buffers may still be referenced by MPI
    op_->raise();
  }
  return op_->result;
}

// ---------------------------------------------------------------- MpiBackend
MpiBackend::MpiBackend(int64_t comm_f, double timeout_s, bool check, bool progress_thread)
    : timeout_s_(timeout_s), check_(check) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) throw DecommError("MPI is not initialized (import mpi4py.MPI first)");
  MPI_Comm parent = MPI_Comm_f2c(static_cast<MPI_Fint>(comm_f));
  check_mpi(MPI_Comm_dup(parent, &comm_), "MPI_Comm_dup");
  MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  MPI_Comm_rank(comm_, &rank_);
  int* tag_ub = nullptr;
  int has_ub = 0;
  MPI_Comm_get_attr(comm_, MPI_TAG_UB, &tag_ub, &has_ub);
  if (has_ub && tag_ub && (*tag_ub - kTagSeqBase) / 3 < g_tag_span)
    g_tag_span = std::max<int64_t>(1, (*tag_ub - kTagSeqBase) / 3);
  MPI_Comm_size(comm_, &size_);
  if (const char* env = std::getenv("DECOMM_MAX_CHUNK_BYTES")) {
    const long long v = std::atoll(env);
    if (v > 0 && v < g_max_chunk) g_max_chunk = v;
  }
  gone_p2p_.reset(new std::atomic<int64_t>[size_]);
  gone_coll_.reset(new std::atomic<int64_t>[size_]);
  for (int r = 0; r < size_; ++r) {
    gone_p2p_[r] = -1;
    gone_coll_[r] = -1;
  }
  if (size_ > 1)
    check_mpi(MPI_Irecv(&bye_in_, sizeof(ByeMsg), MPI_BYTE, MPI_ANY_SOURCE, kTagBye, comm_,
                        &bye_req_), "MPI_Irecv");
  int level = MPI_THREAD_SINGLE;
  MPI_Query_thread(&level);
  // A progress thread needs MPI_THREAD_MULTIPLE; without it non-blocking
  // handles progress inside wait()/poll() on the caller's thread.
  if (progress_thread && level == MPI_THREAD_MULTIPLE)
    progress_ = std::thread([this] { progress_loop(); });
}

MpiBackend::~MpiBackend() { close(); }

void MpiBackend::stop_progress(const char* why, bool peer) {
  if (progress_.joinable()) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      stop_why_ = why;
      stop_peer_ = peer;
    }
    cv_.notify_all();
    progress_.join();
  }
}

void MpiBackend::revoke() {
#ifdef MPIX_ERR_REVOKED
  if (comm_ != MPI_COMM_NULL && !revoked_.exchange(true)) MPIX_Comm_revoke(comm_);
#endif
}

bool MpiBackend::revoked() const {
  if (revoked_.load()) return true;
  int flag = 0;
#ifdef MPIX_ERR_REVOKED
  if (comm_ != MPI_COMM_NULL) MPIX_Comm_is_revoked(comm_, &flag);
#endif
  return flag != 0;
}

void MpiBackend::say_goodbye() {
  if (comm_ != MPI_COMM_NULL && !revoked()) send_byes();
}

std::vector<int64_t> MpiBackend::failed_ranks() const {
  std::vector<int64_t> out;
#ifdef OMPI_HAVE_MPIX_COMM_GET_FAILED
  if (comm_ == MPI_COMM_NULL) return out;
  MPI_Group failed = MPI_GROUP_NULL, all = MPI_GROUP_NULL;
  if (MPIX_Comm_get_failed(comm_, &failed) != MPI_SUCCESS) return out;
  int n = 0;
  MPI_Group_size(failed, &n);
  if (n > 0) {
    MPI_Comm_group(comm_, &all);
    std::vector<int> idx(n), ranks(n);
    for (int i = 0; i < n; ++i) idx[i] = i;
    MPI_Group_translate_ranks(failed, n, idx.data(), all, ranks.data());
    for (int r : ranks)
      if (r != MPI_UNDEFINED) out.push_back(r);
    std::sort(out.begin(), out.end());
    MPI_Group_free(&all);
  }
  MPI_Group_free(&failed);
#endif
  return out;
}

void MpiBackend::abandon() {
  revoke();
  stop_progress("recovery after a peer failure began while the operation was in flight", true);
  comm_ = MPI_COMM_NULL;  // revoked: no byes; left to MPI_Finalize (or the process's end)
}

void MpiBackend::close() {
  stop_progress("decomm.shutdown() while the operation was in flight", false);
  int finalized = 0;
  MPI_Finalized(&finalized);
  // A message that reaches a freed communicator is queued by Open MPI for the
  // next communicator that reuses its context id, and kills the job there
  // (seen with init_machines twice). So the communicator is freed only once
  // every peer has said it is done with it; otherwise it is left to MPI_Finalize.
  if (!finalized && comm_ != MPI_COMM_NULL && !revoked_.load() && send_byes())
    MPI_Comm_free(&comm_);
  comm_ = MPI_COMM_NULL;
}

// Tells every other rank this one has shut down, and after how many calls: a
// rank still waiting for it then fails at once, naming it, instead of after
// the timeout.
bool MpiBackend::send_byes() {
  housekeeping();  // byes that have already arrived
  std::lock_guard<std::mutex> lk(house_mu_);
  if (byes_sent_) return byes_done_ && gone_count_.load() == size_ - 1 && orphans_.empty();
  byes_sent_ = true;
  if (bye_req_ != MPI_REQUEST_NULL) {
    MPI_Cancel(&bye_req_);
    MPI_Wait(&bye_req_, MPI_STATUS_IGNORE);
  }
  if (size_ < 2) return true;
  // Heap-allocated: if a send is still pending after the grace period below,
  // MPI may read the buffer later, so it is never freed then.
  auto* msg = new ByeMsg{kByeMagic, 0, p2p_seq_, coll_seq_};
  std::vector<MPI_Request> reqs;
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    MPI_Request q = MPI_REQUEST_NULL;
    if (MPI_Isend(msg, sizeof(ByeMsg), MPI_BYTE, r, kTagBye, comm_, &q) == MPI_SUCCESS)
      reqs.push_back(q);
  }
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  int flag = 0;
  while (!flag && std::chrono::steady_clock::now() < until) {
    if (MPI_Testall(static_cast<int>(reqs.size()), reqs.data(), &flag, MPI_STATUSES_IGNORE) !=
        MPI_SUCCESS)
      break;
    if (!flag) sched_yield();
  }
  byes_done_ = flag != 0;
  if (flag) {
    delete msg;
  } else {
    for (auto& q : reqs)
      if (q != MPI_REQUEST_NULL) MPI_Request_free(&q);
  }
  return flag && gone_count_.load() == size_ - 1 && orphans_.empty();
}

void MpiBackend::housekeeping() {
  std::unique_lock<std::mutex> lk(house_mu_, std::try_to_lock);
  if (!lk.owns_lock() || comm_ == MPI_COMM_NULL) return;
  while (bye_req_ != MPI_REQUEST_NULL) {
    int flag = 0;
    MPI_Status st;
    if (MPI_Test(&bye_req_, &flag, &st) != MPI_SUCCESS || !flag) break;
    const int src = st.MPI_SOURCE;
    if (bye_in_.magic == kByeMagic && src >= 0 && src < size_ && gone_p2p_[src] < 0) {
      gone_coll_[src] = bye_in_.coll_calls;
      gone_p2p_[src] = bye_in_.p2p_calls;
      gone_count_.fetch_add(1);
    }
    check_mpi(MPI_Irecv(&bye_in_, sizeof(ByeMsg), MPI_BYTE, MPI_ANY_SOURCE, kTagBye, comm_,
                        &bye_req_), "MPI_Irecv");
  }
  if (!have_failed_.load()) return;
  // Forget failed calls once no straggler of theirs can still be on its way.
  while (!failed_seqs_.empty() && failed_seqs_.front() + 4096 < p2p_seq_) failed_seqs_.pop_front();
  // A failed call's headers, and the payloads they announce, may arrive at
  // any time while the call is remembered: drain all three tag ranges.
  for (int64_t f : failed_seqs_) {
    drain_tag(head_tag(f));
    drain_tag(bulk_tag(f));
    drain_tag(ng_data_tag(f));
  }
  for (auto it = orphans_.begin(); it != orphans_.end();) {
    int flag = 0;
    MPI_Test(&it->req, &flag, MPI_STATUS_IGNORE);
    it = flag ? orphans_.erase(it) : it + 1;
  }
  have_failed_ = !failed_seqs_.empty() || !orphans_.empty();
}

void MpiBackend::drain_tag(int tag) {
  while (true) {
    int flag = 0;
    MPI_Message m;
    MPI_Status st;
    if (MPI_Improbe(MPI_ANY_SOURCE, tag, comm_, &flag, &m, &st) != MPI_SUCCESS || !flag) return;
    int count = 0;
    MPI_Get_count(&st, MPI_BYTE, &count);
    Orphan o;
    o.buf = at::empty({std::max(count, 1)}, at::kByte);
    if (MPI_Imrecv(o.buf.data_ptr(), count, MPI_BYTE, &m, &o.req) != MPI_SUCCESS) return;
    orphans_.push_back(std::move(o));
  }
}

void MpiBackend::note_failed_call(int64_t seq) {
  std::lock_guard<std::mutex> lk(house_mu_);
  // A stray message fails its call, which then reports the same call again.
  if (std::find(failed_seqs_.begin(), failed_seqs_.end(), seq) != failed_seqs_.end()) return;
  if (failed_seqs_.size() >= 64) failed_seqs_.pop_front();
  failed_seqs_.push_back(seq);
  have_failed_ = true;
}

std::string MpiBackend::unexpected_sender(int64_t seq) {
  // One probe per call (each MPI_Iprobe runs MPI's progress engine, about a
  // microsecond): the first unmatched message of any tag. A header of this call
  // or of a recent one that nobody received - its call did not fail here - means
  // the send and receive sides of that call disagreed. Headers of later calls
  // (a neighbour running ahead) and payload tags are left alone.
  int flag = 0;
  MPI_Status st;
  MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, comm_, &flag, &st);
  if (!flag || st.MPI_TAG < kTagSeqBase || st.MPI_TAG >= kTagSeqBase + g_tag_span) return "";
  const int64_t behind = ((seq % g_tag_span) - (st.MPI_TAG - kTagSeqBase) + g_tag_span) % g_tag_span;
  if (behind > 1024) return "";  // a later call's header, or one from long ago
  const int64_t q = seq - behind;
  if (have_failed_.load()) {
    std::lock_guard<std::mutex> lk(house_mu_);
    if (std::find(failed_seqs_.begin(), failed_seqs_.end(), q) != failed_seqs_.end()) return "";
  }
  note_failed_call(q);  // drains it (and any payload it announces)
  return "rank " + std::to_string(st.MPI_SOURCE) + " sent this rank a message in " +
         (q == seq ? std::string("this call") : "an earlier call") + " (call " +
         std::to_string(q + 1) +
         "), but this rank did not receive from it then: the send and receive sides of that "
         "call disagree (check src_weights/dst_weights); the message was discarded";
}

std::string MpiBackend::departed_peers(const std::vector<int64_t>& peers, int64_t seq,
                                       bool p2p) const {
  for (int64_t p : peers) {
    if (p < 0 || p >= size_) continue;
    const int64_t calls = p2p ? gone_p2p(static_cast<int>(p)) : gone_coll(static_cast<int>(p));
    if (calls < 0 || calls > seq) continue;  // running, or it made this call before leaving
    const char* what = p2p ? " neighbour-op call(s)" : " collective call(s), decomm's own included";
    std::ostringstream os;
    os << "rank " << p << " has shut down after " << calls << what << "; this rank is at call "
       << seq + 1 << " (one rank made more calls than another: an extra call or optimizer step "
       << "on this rank, or a skipped one or an early exit there)";
    return os.str();
  }
  return "";
}

std::chrono::steady_clock::time_point MpiBackend::deadline() const {
  return std::chrono::steady_clock::now() +
         std::chrono::microseconds(static_cast<int64_t>(timeout_s_ * 1e6));
}

void MpiBackend::run(Op& op) {
  // Spin for up to spin_ns_ before yielding, as MPI's own wait does: under
  // load, each sched_yield hands the core to another busy process for a whole
  // time slice (measured: 7 ms per 4 KiB call with two spinners on two cores,
  // against 0.1 ms for mpi4py's Waitall). With more ranks than cores the peer
  // needs this core to make progress, and spin_ns_ is 0 (set by the runtime).
  const int64_t budget = spin_ns_.load(std::memory_order_relaxed);
  const int64_t t0 = budget > 0 ? steady_ns() : 0;
  uint32_t k = 0;
  while (!op.advance()) {
    if (budget > 0 && ((++k & 15u) != 0 || steady_ns() - t0 < budget)) continue;
    sched_yield();
  }
  if (timeline()) tl_last_times = op.times();
}

void MpiBackend::enqueue(std::shared_ptr<Op> op) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    active_.push_back(std::move(op));
  }
  cv_.notify_all();
}

void MpiBackend::progress_loop() {
  std::vector<std::shared_ptr<Op>> local;
  int idle = 0;
  while (true) {
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_ || !active_.empty(); });
      if (stop_) {
        for (auto& op : active_) {
          if (stop_peer_)
            op->fail_peer(stop_why_);
          else
            op->fail(stop_why_);
          op->finished_.store(true);
          graveyard_.push_back(op);
        }
        active_.clear();
        cv_.notify_all();
        return;
      }
      local.assign(active_.begin(), active_.end());
    }
    bool any_done = false;
    for (auto& op : local) any_done |= op->advance();
    if (any_done) {
      std::lock_guard<std::mutex> lk(mu_);
      for (auto it = active_.begin(); it != active_.end();) {
        if ((*it)->finished()) {
          if (!(*it)->error().empty()) graveyard_.push_back(*it);
          it = active_.erase(it);
        } else {
          ++it;
        }
      }
      idle = 0;
    } else if (++idle < 64) {
      sched_yield();
    } else {
      // Back off so an oversubscribed machine is not starved by polling.
      std::this_thread::sleep_for(std::chrono::microseconds(idle < 1024 ? 20 : 200));
    }
    if (any_done) cv_.notify_all();
  }
}

std::vector<Header> MpiBackend::check_collective(const Header& mine, bool ignore_first_dim,
                                                 bool compare_root) {
  std::vector<Header> all(static_cast<size_t>(size_));
  CollectiveOp op(this, mine.op, mine.name, at::Tensor(), false, mine.seq);
  check_mpi(MPI_Iallgather(&mine, sizeof(Header), MPI_BYTE, all.data(), sizeof(Header), MPI_BYTE,
                           comm_, op.request()), "MPI_Iallgather");
  run(op);
  if (!op.error().empty()) {
    // MPI may still write into `all` after a timeout: keep it alive.
    if (!op.settled_) new std::vector<Header>(std::move(all));
    op.raise();
  }
  check_agreement(all.data(), size_, mine, rank_, ignore_first_dim, compare_root);
  return all;
}

std::shared_ptr<Handle> MpiBackend::launch(const std::shared_ptr<Op>& op, bool async) {
  if (async && has_progress_thread()) {
    enqueue(op);
  } else if (!async) {
    run(*op);
    if (!op->error().empty()) {
      bury(op);
      op->raise();
    }
  }
  return std::make_shared<Handle>(op, this);
}

void MpiBackend::bury(const std::shared_ptr<Op>& op) {
  if (op->settled_) return;  // its requests completed after a revoke: MPI holds nothing
  std::lock_guard<std::mutex> lk(mu_);
  graveyard_.push_back(op);
}

}  // namespace decomm
