#include "mpi_backend.h"

#include "weighted_sum.h"

#include <sched.h>

#include <algorithm>
#include <climits>
#include <map>
#include <sstream>

namespace decomm {

namespace {

// Point-to-point tags. Every neighbour-op message is tagged with the sender's
// call number (p2p_seq_), in one of three ranges: the header (with the
// payload when small), the large payload of neighbor_allreduce, and the data
// of neighbor_allgather. A receive for call s therefore only ever matches a
// message of call s: whatever a failed or mismatched call leaves in flight
// cannot pair with a later call, and is drained (see MpiBackend::housekeeping).
// neighbor_allreduce and neighbor_allgather share the header range, so a rank
// making one while its neighbour makes the other gets a clear error.
constexpr int kTagBye = 105;       // "this rank has shut down after N calls"
constexpr int kTagSeqBase = 1000;
int64_t g_tag_span = int64_t(1) << 26;  // clamped at init to what MPI_TAG_UB allows
int head_tag(int64_t seq) { return kTagSeqBase + static_cast<int>(seq % g_tag_span); }
int bulk_tag(int64_t seq) {
  return kTagSeqBase + static_cast<int>(g_tag_span + seq % g_tag_span);
}
int ng_data_tag(int64_t seq) {
  return kTagSeqBase + static_cast<int>(2 * g_tag_span + seq % g_tag_span);
}
constexpr uint32_t kByeMagic = 0xDEC0B1E5u;

// MPI counts are C ints: one message carries at most 2^31-1 bytes here.
int checked_count(int64_t nbytes, const std::string& what, int rank) {
  if (nbytes > INT_MAX) {
    throw DecommError(what + " on rank " + std::to_string(rank) + ": a message of " +
                      std::to_string(nbytes) + " bytes exceeds the per-message limit of "
                      "2^31-1 bytes (MPI counts are 32-bit); split the tensor into pieces "
                      "under 2 GiB");
  }
  return static_cast<int>(nbytes);
}

MPI_Datatype mpi_datatype(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return MPI_FLOAT;
    case c10::ScalarType::Double: return MPI_DOUBLE;
    case c10::ScalarType::Long: return MPI_INT64_T;
    case c10::ScalarType::Int: return MPI_INT32_T;
    case c10::ScalarType::Short: return MPI_INT16_T;
    case c10::ScalarType::Char: return MPI_INT8_T;
    case c10::ScalarType::Byte: return MPI_UINT8_T;
    default:
      throw DecommError(std::string("allreduce: dtype ") + c10::toString(t) +
                        " has no MPI reduction here");
  }
}

std::string join_ranks(const std::vector<int64_t>& v) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  os << "]";
  return os.str();
}

double seconds_left(std::chrono::steady_clock::time_point dl) {
  return std::chrono::duration<double>(dl - std::chrono::steady_clock::now()).count();
}

}  // namespace

// ---------------------------------------------------------------- buffer pool
// Scratch buffers are reused across calls: training repeats the same sizes
// every step, and fresh large allocations pay page faults on every call.
class BufferPool {
 public:
  at::Tensor get(int64_t nbytes) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      auto it = free_.find(nbytes);
      if (it != free_.end()) {
        at::Tensor t = it->second;
        free_.erase(it);
        cached_ -= nbytes;
        return t;
      }
    }
    return at::empty({std::max<int64_t>(nbytes, 1)}, at::TensorOptions().dtype(at::kByte));
  }
  void put(at::Tensor t, int64_t nbytes) {
    std::lock_guard<std::mutex> lk(mu_);
    if (cached_ + nbytes > kMaxCached) return;
    cached_ += nbytes;
    free_.emplace(nbytes, std::move(t));
  }

 private:
  static constexpr int64_t kMaxCached = int64_t(1) << 30;
  std::mutex mu_;
  std::multimap<int64_t, at::Tensor> free_;
  int64_t cached_ = 0;
};

static BufferPool& pool() {
  static BufferPool* p = new BufferPool();  // never destroyed: ops may outlive the backend
  return *p;
}

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
  std::ostringstream os;
  os << op_kind_name(kind_) << " '" << name_ << "' on rank " << be_->rank() << ": " << msg;
  error_ = os.str();
}

void Op::abandon_requests() {
  for (auto& r : reqs_) {
    if (r == MPI_REQUEST_NULL) continue;
    MPI_Cancel(&r);
    MPI_Request_free(&r);
  }
}

bool Op::advance() {
  if (finished_.load()) return true;
  bool done = false;
  try {
    done = step();
  } catch (const std::exception& e) {
    fail(e.what());
    abandon_requests();
    done = true;
  }
  // Every few polls (the first included): byes from ranks that shut down, and
  // leftovers of failed calls. A rank waiting on one that left fails at once.
  if (!done && (polls_++ & 31u) == 0) be_->housekeeping();
  if (!done && be_->any_gone()) {
    std::string gone = departed();
    if (!gone.empty()) {
      fail(gone);
      abandon_requests();
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

// -------------------------------------------------------- neighbor_allreduce
// Small payloads travel in one message with the header in front (an MPI struct
// datatype over both addresses, nothing staged): a second message per
// neighbour measured several times slower at small sizes. Large payloads go as
// a header message plus a contiguous data message, which lets MPI use its
// single-copy path (the struct type measured ~10x slower at 64 MB). The
// receiver learns the sender's size from the header, so it can still consume
// every message when two ranks disagree (and pick different protocols).
constexpr int64_t kSmallMessage = 64 << 10;

static MPI_Datatype header_plus_payload(const void* hdr, const void* data, int count) {
  int lens[2] = {static_cast<int>(sizeof(Header)), count};
  MPI_Aint disp[2];
  MPI_Get_address(hdr, &disp[0]);
  MPI_Get_address(data, &disp[1]);
  MPI_Datatype types[2] = {MPI_BYTE, MPI_BYTE};
  MPI_Datatype t;
  check_mpi(MPI_Type_create_struct(2, lens, disp, types, &t), "MPI_Type_create_struct");
  check_mpi(MPI_Type_commit(&t), "MPI_Type_commit");
  return t;
}

static int64_t payload_bytes(const Header& h) {
  if (h.dtype < 0 || h.numel < 0) return 0;
  return h.numel * static_cast<int64_t>(c10::elementSize(static_cast<c10::ScalarType>(h.dtype)));
}

class NeighborAllreduceOp : public Op {
 public:
  NeighborAllreduceOp(MpiBackend* be, at::Tensor x, at::Tensor out, double self_w, Peers src,
                      Peers dst, const std::string& name, Header hdr)
      : Op(be, kNeighborAllreduce, name, hdr.seq),
        x_(std::move(x)), out_(std::move(out)), self_w_(self_w),
        src_(std::move(src)), dst_(std::move(dst)), mine_(hdr) {}

  ~NeighborAllreduceOp() override {
    if (!finished_.load()) return;  // abandoned: MPI may still own the buffers
    for (auto& b : pooled_) pool().put(b.first, b.second);
  }

  void post() {
    const auto dtype = x_.scalar_type();
    const int64_t n = x_.numel();
    nbytes_ = n * static_cast<int64_t>(x_.element_size());
    count_ = checked_count(nbytes_, "neighbor_allreduce '" + name_ + "'", be_->rank());
    small_ = nbytes_ <= kSmallMessage;
    const size_t S = src_.ranks.size(), D = dst_.ranks.size();
    in_.resize(S);
    recv_.resize(S);
    send_hdr_.assign(D, MPI_REQUEST_NULL);
    send_data_.assign(D, MPI_REQUEST_NULL);
    MPI_Comm comm = be_->comm();
    for (size_t s = 0; s < S; ++s) {
      const int peer = static_cast<int>(src_.ranks[s]);
      in_[s].hdr.magic = 0;  // so a header that never arrived cannot pass for one
      recv_[s] = borrow(nbytes_);
      if (small_) {
        MPI_Datatype t = header_plus_payload(&in_[s].hdr, recv_[s].data_ptr(), count_);
        int rc = MPI_Irecv(MPI_BOTTOM, 1, t, peer, head_tag(mine_.seq), comm, &in_[s].head);
        MPI_Type_free(&t);
        check_mpi(rc, "MPI_Irecv");
      } else {
        // The payload's receive is posted when the header arrives (tagged with
        // the sender's call number, so it cannot match another call's payload).
        check_mpi(MPI_Irecv(&in_[s].hdr, sizeof(Header), MPI_BYTE, peer, head_tag(mine_.seq), comm,
                            &in_[s].head), "MPI_Irecv");
      }
    }
    for (size_t d = 0; d < D; ++d) {
      const int peer = static_cast<int>(dst_.ranks[d]);
      const void* payload = x_.data_ptr();
      if (dst_.weights[d] != 1.0 && n > 0) {
        at::Tensor scaled = borrow(nbytes_);
        scaled_copy(scaled.data_ptr(), x_.data_ptr(), dst_.weights[d], n, dtype);
        payload = scaled.data_ptr();
      }
      if (small_) {
        MPI_Datatype t = header_plus_payload(&mine_, payload, count_);
        int rc = MPI_Isend(MPI_BOTTOM, 1, t, peer, head_tag(mine_.seq), comm, &send_hdr_[d]);
        MPI_Type_free(&t);
        check_mpi(rc, "MPI_Isend");
      } else {
        check_mpi(MPI_Isend(&mine_, sizeof(Header), MPI_BYTE, peer, head_tag(mine_.seq), comm,
                            &send_hdr_[d]), "MPI_Isend");
        check_mpi(MPI_Isend(payload, count_, MPI_BYTE, peer, bulk_tag(mine_.seq), comm,
                            &send_data_[d]), "MPI_Isend");
      }
      be_->bytes_sent += nbytes_ + static_cast<int64_t>(sizeof(Header));
    }
    mark(kTimePosted);
  }

 protected:
  bool step() override {
    bool all_done = true;
    for (size_t s = 0; s < in_.size(); ++s) {
      Incoming& in = in_[s];
      if (in.head != MPI_REQUEST_NULL) {
        int flag = 0;
        MPI_Status st;
        int rc = MPI_Test(&in.head, &flag, &st);
        if (flag || in.head == MPI_REQUEST_NULL) {
          on_header(s, st, rc != MPI_SUCCESS);
        } else {
          if (rc != MPI_SUCCESS) check_mpi(rc, "MPI_Test");
          all_done = false;
        }
      }
      if (in.bulk != MPI_REQUEST_NULL) {
        int flag = 0;
        MPI_Status st;
        int rc = MPI_Test(&in.bulk, &flag, &st);
        if (flag || in.bulk == MPI_REQUEST_NULL) {
          int got = 0;
          MPI_Get_count(&st, MPI_BYTE, &got);
          if ((rc != MPI_SUCCESS || got != count_) && !in.mismatch)
            fail("in-neighbour " + std::to_string(src_.ranks[s]) + " sent " +
                 (rc != MPI_SUCCESS ? std::string("more than ") : std::to_string(got) + " of ") +
                 "the " + std::to_string(nbytes_) + " payload bytes this rank expected");
          else if (!in.mismatch)
            be_->bytes_received += got;
        } else {
          all_done = false;
        }
      }
    }
    for (auto* v : {&send_hdr_, &send_data_}) {
      int flag = 0;
      check_mpi(MPI_Testall(static_cast<int>(v->size()), v->data(), &flag, MPI_STATUSES_IGNORE),
                "MPI_Testall");
      all_done &= flag != 0;
    }
    if (!all_done) return false;
    mark(kTimeArrived);
    if (!error_.empty()) return true;
    std::string stray = be_->unexpected_sender(mine_.seq);
    if (!stray.empty()) {
      fail(stray);
      return true;
    }
    // Everything has arrived and every send is done, so the output may alias
    // the input: one fused pass, in a fixed order.
    const int64_t n = x_.numel();
    if (n > 0) {
      std::vector<const void*> rs(recv_.size());
      for (size_t s = 0; s < recv_.size(); ++s) rs[s] = recv_[s].data_ptr();
      const int64_t k = static_cast<int64_t>(rs.size());
      if (k > 0 && is_uniform_mean(self_w_, src_.weights.data(), k))
        mean_sum(out_.data_ptr(), x_.data_ptr(), rs.data(), k, n, x_.scalar_type());
      else
        weighted_sum(out_.data_ptr(), x_.data_ptr(), self_w_, rs.data(), src_.weights.data(), k,
                     n, x_.scalar_type());
    }
    result = out_;
    return true;
  }

  std::string pending() const override {
    std::vector<int64_t> in_missing, out_missing;
    for (size_t s = 0; s < in_.size(); ++s)
      if (in_[s].head != MPI_REQUEST_NULL || in_[s].bulk != MPI_REQUEST_NULL)
        in_missing.push_back(src_.ranks[s]);
    for (size_t d = 0; d < send_hdr_.size(); ++d)
      if (send_hdr_[d] != MPI_REQUEST_NULL || send_data_[d] != MPI_REQUEST_NULL)
        out_missing.push_back(dst_.ranks[d]);
    std::ostringstream os;
    if (!in_missing.empty()) os << "in-neighbour(s) " << join_ranks(in_missing) << " to send";
    if (!out_missing.empty())
      os << (in_missing.empty() ? "" : " and ") << "out-neighbour(s) " << join_ranks(out_missing)
         << " to receive";
    return os.str();
  }

  std::string departed() const override {
    std::vector<int64_t> peers;
    for (size_t s = 0; s < in_.size(); ++s)
      if (in_[s].head != MPI_REQUEST_NULL) peers.push_back(src_.ranks[s]);
    for (size_t d = 0; d < send_hdr_.size(); ++d)
      if (send_hdr_[d] != MPI_REQUEST_NULL || send_data_[d] != MPI_REQUEST_NULL)
        peers.push_back(dst_.ranks[d]);
    return be_->departed_peers(peers, mine_.seq, true);
  }

  void abandon_requests() override {
    auto drop = [](MPI_Request& r) {
      if (r == MPI_REQUEST_NULL) return;
      MPI_Cancel(&r);
      MPI_Request_free(&r);
    };
    for (auto& in : in_) {
      drop(in.head);
      drop(in.bulk);
    }
    for (auto* v : {&send_hdr_, &send_data_})
      for (auto& r : *v) drop(r);
  }

 private:
  struct Incoming {
    Header hdr;
    MPI_Request head = MPI_REQUEST_NULL;  // the header (with the payload when small)
    MPI_Request bulk = MPI_REQUEST_NULL;  // the payload of a large message
    bool mismatch = false;
    at::Tensor drain;
  };

  bool be_check() const;

  void on_header(size_t s, MPI_Status& st, bool truncated) {
    Incoming& in = in_[s];
    const std::string who = "in-neighbour " + std::to_string(src_.ranks[s]);
    int got = 0;
    MPI_Get_count(&st, MPI_BYTE, &got);
    const int64_t expect = static_cast<int64_t>(sizeof(Header)) + (small_ ? nbytes_ : 0);
    // The header leads the message, so it arrives whole even when the payload
    // is cut short by a larger message (MPI fills the buffer up to its size).
    const bool have_header = truncated ? in.hdr.magic == kHeaderMagic
                                       : got >= static_cast<int>(sizeof(Header));
    std::string diff;
    if (have_header && (be_check() || truncated || got != expect))
      diff = header_diff(mine_, in.hdr, false, false);
    if (diff.empty() && (truncated || got != expect))
      diff = "message size (shape or dtype differ)";
    const int64_t theirs = have_header ? payload_bytes(in.hdr) : 0;
    // Only a neighbor_allreduce announces a payload on the bulk tags; what a
    // neighbor_allgather sent instead is drained as a failed call's leftover.
    const bool their_bulk = have_header && in.hdr.op == kNeighborAllreduce &&
                            theirs > kSmallMessage && theirs <= INT_MAX;
    if (diff.empty()) {
      if (small_) {
        be_->bytes_received += got;
      } else {
        check_mpi(MPI_Irecv(recv_[s].data_ptr(), count_, MPI_BYTE,
                            static_cast<int>(src_.ranks[s]), bulk_tag(in.hdr.seq), be_->comm(),
                            &in.bulk), "MPI_Irecv");
      }
      return;
    }
    fail(who + " called differently: " + diff + " (that rank's value vs this rank's)");
    in.mismatch = true;
    if (their_bulk) {
      // Consume the neighbour's payload message, so nothing is left in flight.
      in.drain = at::empty({theirs}, at::kByte);
      check_mpi(MPI_Irecv(in.drain.data_ptr(), static_cast<int>(theirs), MPI_BYTE,
                          static_cast<int>(src_.ranks[s]), bulk_tag(in.hdr.seq), be_->comm(),
                          &in.bulk), "MPI_Irecv");
    }
  }

  at::Tensor borrow(int64_t nbytes) {
    at::Tensor t = pool().get(nbytes);
    pooled_.emplace_back(t, nbytes);
    keep_alive_.push_back(t);
    return t;
  }

  at::Tensor x_, out_;
  double self_w_;
  Peers src_, dst_;
  Header mine_;
  std::vector<Incoming> in_;
  std::vector<at::Tensor> recv_;
  std::vector<MPI_Request> send_hdr_, send_data_;
  std::vector<std::pair<at::Tensor, int64_t>> pooled_;
  int64_t nbytes_ = 0;
  int count_ = 0;
  bool small_ = true;
};

// -------------------------------------------------------- neighbor_allgather
class NeighborAllgatherOp : public Op {
 public:
  NeighborAllgatherOp(MpiBackend* be, at::Tensor x, std::vector<int64_t> src,
                      std::vector<int64_t> dst, const std::string& name, Header hdr)
      : Op(be, kNeighborAllgather, name, hdr.seq), x_(std::move(x)), src_(std::move(src)),
        dst_(std::move(dst)), mine_(hdr) {}

  void post() {
    const int64_t nbytes = x_.numel() * static_cast<int64_t>(x_.element_size());
    const int count = checked_count(nbytes, "neighbor_allgather '" + name_ + "'", be_->rank());
    row_bytes_ = static_cast<int64_t>(x_.element_size());
    for (int64_t d = 1; d < x_.dim(); ++d) row_bytes_ *= x_.size(d);
    const size_t S = src_.size(), D = dst_.size();
    in_hdr_.resize(S);
    for (auto& h : in_hdr_) h.magic = 0;  // so a header that never arrived cannot pass for one
    parts_.resize(S);
    hdr_reqs_.assign(S, MPI_REQUEST_NULL);
    data_reqs_.assign(S, MPI_REQUEST_NULL);
    data_posted_.assign(S, 0);
    send_reqs_.assign(2 * D, MPI_REQUEST_NULL);
    MPI_Comm comm = be_->comm();
    for (size_t s = 0; s < S; ++s)
      check_mpi(MPI_Irecv(&in_hdr_[s], sizeof(Header), MPI_BYTE, static_cast<int>(src_[s]),
                          head_tag(mine_.seq), comm, &hdr_reqs_[s]), "MPI_Irecv");
    for (size_t d = 0; d < D; ++d) {
      const int peer = static_cast<int>(dst_[d]);
      check_mpi(MPI_Isend(&mine_, sizeof(Header), MPI_BYTE, peer, head_tag(mine_.seq), comm,
                          &send_reqs_[2 * d]), "MPI_Isend");
      check_mpi(MPI_Isend(x_.data_ptr(), count, MPI_BYTE, peer, ng_data_tag(mine_.seq), comm,
                          &send_reqs_[2 * d + 1]), "MPI_Isend");
      be_->bytes_sent += nbytes + static_cast<int64_t>(sizeof(Header));
    }
    mark(kTimePosted);
  }

 protected:
  bool step() override {
    bool all_done = true;
    MPI_Comm comm = be_->comm();
    for (size_t s = 0; s < src_.size(); ++s) {
      if (!data_posted_[s]) {
        int flag = 0;
        const int rc = MPI_Test(&hdr_reqs_[s], &flag, MPI_STATUS_IGNORE);
        // A neighbor_allreduce message (header + payload) is cut to the header
        // here; the header leads, so it still says what the neighbour called.
        const bool truncated = rc != MPI_SUCCESS &&
                               (flag || hdr_reqs_[s] == MPI_REQUEST_NULL) &&
                               in_hdr_[s].magic == kHeaderMagic;
        if (rc != MPI_SUCCESS && !truncated) check_mpi(rc, "MPI_Test");
        if (!flag && !truncated) {
          all_done = false;
          continue;
        }
        std::string diff = header_diff(mine_, in_hdr_[s], true, false);
        if (diff.empty() && truncated) diff = "message size";
        if (!diff.empty()) {
          fail("in-neighbour " + std::to_string(src_[s]) + " called differently: " + diff +
               " (that rank's value vs this rank's)");
          if (in_hdr_[s].op != kNeighborAllgather) {  // nothing more comes on the data tag
            data_posted_[s] = 1;
            continue;
          }
        }
        // Receive whatever the neighbour announced, even on a mismatch, so
        // that its send completes and no message is left in flight.
        const int64_t rows = in_hdr_[s].ndim > 0 ? in_hdr_[s].shape[0] : 1;
        const int64_t nbytes = in_hdr_[s].numel * static_cast<int64_t>(x_.element_size());
        std::vector<int64_t> shape(x_.sizes().begin(), x_.sizes().end());
        if (shape.empty()) shape.push_back(1);
        shape[0] = rows;
        parts_[s] = diff.empty() ? at::empty(shape, x_.options())
                                 : at::empty({std::max<int64_t>(nbytes, 1)}, at::kByte);
        check_mpi(MPI_Irecv(parts_[s].data_ptr(),
                            checked_count(nbytes, "neighbor_allgather '" + name_ + "'",
                                          be_->rank()),
                            MPI_BYTE, static_cast<int>(src_[s]), ng_data_tag(mine_.seq), comm,
                            &data_reqs_[s]), "MPI_Irecv");
        be_->bytes_received += nbytes;
        data_posted_[s] = 1;
      }
      int flag = 0;
      check_mpi(MPI_Test(&data_reqs_[s], &flag, MPI_STATUS_IGNORE), "MPI_Test");
      all_done &= flag != 0;
    }
    int flag = 0;
    check_mpi(MPI_Testall(static_cast<int>(send_reqs_.size()), send_reqs_.data(), &flag,
                          MPI_STATUSES_IGNORE), "MPI_Testall");
    all_done &= flag != 0;
    if (!all_done) return false;
    mark(kTimeArrived);
    if (!error_.empty()) return true;
    std::string stray = be_->unexpected_sender(mine_.seq);
    if (!stray.empty()) {
      fail(stray);
      return true;
    }
    if (parts_.empty()) {
      std::vector<int64_t> shape(x_.sizes().begin(), x_.sizes().end());
      if (shape.empty()) shape.push_back(1);
      shape[0] = 0;
      result = at::empty(shape, x_.options());
    } else {
      result = at::cat(parts_, 0);
    }
    return true;
  }

  std::string pending() const override {
    std::vector<int64_t> in_missing, out_missing;
    for (size_t s = 0; s < src_.size(); ++s)
      if (hdr_reqs_[s] != MPI_REQUEST_NULL || data_reqs_[s] != MPI_REQUEST_NULL)
        in_missing.push_back(src_[s]);
    for (size_t d = 0; d < dst_.size(); ++d)
      if (send_reqs_[2 * d] != MPI_REQUEST_NULL || send_reqs_[2 * d + 1] != MPI_REQUEST_NULL)
        out_missing.push_back(dst_[d]);
    std::ostringstream os;
    if (!in_missing.empty()) os << "in-neighbour(s) " << join_ranks(in_missing) << " to send";
    if (!out_missing.empty())
      os << (in_missing.empty() ? "" : " and ") << "out-neighbour(s) " << join_ranks(out_missing)
         << " to receive";
    return os.str();
  }

  std::string departed() const override {
    std::vector<int64_t> peers;
    for (size_t s = 0; s < src_.size(); ++s)
      if (hdr_reqs_[s] != MPI_REQUEST_NULL) peers.push_back(src_[s]);
    for (size_t d = 0; d < dst_.size(); ++d)
      if (send_reqs_[2 * d] != MPI_REQUEST_NULL || send_reqs_[2 * d + 1] != MPI_REQUEST_NULL)
        peers.push_back(dst_[d]);
    return be_->departed_peers(peers, mine_.seq, true);
  }

  void abandon_requests() override {
    for (auto* v : {&hdr_reqs_, &data_reqs_, &send_reqs_})
      for (auto& r : *v)
        if (r != MPI_REQUEST_NULL) {
          MPI_Cancel(&r);
          MPI_Request_free(&r);
        }
  }

 private:
  at::Tensor x_;
  std::vector<int64_t> src_, dst_;
  Header mine_;
  std::vector<Header> in_hdr_;
  std::vector<at::Tensor> parts_;
  std::vector<MPI_Request> hdr_reqs_, data_reqs_, send_reqs_;
  std::vector<char> data_posted_;
  int64_t row_bytes_ = 0;
};

// ------------------------------------------------------ collective (1 request)
class CollectiveOp : public Op {
 public:
  CollectiveOp(MpiBackend* be, int32_t kind, const std::string& name, at::Tensor out,
               bool average, int64_t seq)
      : Op(be, kind, name, seq), out_(std::move(out)), average_(average) {
    reqs_.assign(1, MPI_REQUEST_NULL);
  }
  MPI_Request* request() { return &reqs_[0]; }

 protected:
  bool step() override {
    int flag = 0;
    check_mpi(MPI_Test(&reqs_[0], &flag, MPI_STATUS_IGNORE), op_kind_name(kind_));
    if (!flag) return false;
    mark(kTimeArrived);
    if (average_ && out_.numel() > 0) out_.div_(be_->size());
    result = out_;
    return true;
  }
  std::string pending() const override {
    return "the other ranks to join (every rank must make the same collective call)";
  }
  std::string departed() const override {
    std::vector<int64_t> all(static_cast<size_t>(be_->size()));
    for (int r = 0; r < be_->size(); ++r) all[r] = r;
    return be_->departed_peers(all, seq_, false);
  }
  // A pending collective cannot be cancelled; leave it to the dying job.
  void abandon_requests() override {}

 private:
  at::Tensor out_;
  bool average_;
};

bool NeighborAllreduceOp::be_check() const { return be_->check_; }

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
    throw DecommError(op_->error());
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

void MpiBackend::close() {
  if (progress_.joinable()) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    progress_.join();
  }
  int finalized = 0;
  MPI_Finalized(&finalized);
  // A message that reaches a freed communicator is queued by Open MPI for the
  // next communicator that reuses its context id, and kills the job there
  // (seen with init_machines twice). So the communicator is freed only once
  // every peer has said it is done with it; otherwise it is left to MPI_Finalize.
  if (!finalized && comm_ != MPI_COMM_NULL && send_byes()) MPI_Comm_free(&comm_);
  comm_ = MPI_COMM_NULL;
}

// Tells every other rank this one has shut down, and after how many calls: a
// rank still waiting for it then fails at once, naming it, instead of after
// the timeout.
bool MpiBackend::send_byes() {
  housekeeping();  // byes that have already arrived
  std::lock_guard<std::mutex> lk(house_mu_);
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
  if (failed_seqs_.size() >= 64) failed_seqs_.pop_front();
  failed_seqs_.push_back(seq);
  have_failed_ = true;
}

std::string MpiBackend::unexpected_sender(int64_t seq) {
  // This call's tag, and the previous call's (a message may land just after
  // that call ended), unless that call failed and its leftovers are expected.
  for (int64_t q : {seq, seq - 1}) {
    if (q < 0) continue;
    if (q != seq && have_failed_.load()) {
      std::lock_guard<std::mutex> lk(house_mu_);
      if (std::find(failed_seqs_.begin(), failed_seqs_.end(), q) != failed_seqs_.end()) continue;
    }
    int flag = 0;
    MPI_Status st;
    MPI_Iprobe(MPI_ANY_SOURCE, head_tag(q), comm_, &flag, &st);
    if (!flag) continue;
    note_failed_call(q);  // drains it (and any payload it announces)
    return "rank " + std::to_string(st.MPI_SOURCE) + " sent this rank a message in " +
           (q == seq ? std::string("this call") : "the previous call") + " (call " +
           std::to_string(q + 1) +
           "), but this rank did not receive from it then: the send and receive sides of that "
           "call disagree (check src_weights/dst_weights); the message was discarded";
  }
  return "";
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
  while (!op.advance()) sched_yield();
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
          op->fail("decomm.shutdown() while the operation was in flight");
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
    new std::vector<Header>(std::move(all));
    throw DecommError(op.error());
  }
  if (!check_) return all;
  std::ostringstream os;
  int bad = 0;
  for (int r = 1; r < size_; ++r) {
    std::string d = header_diff(all[0], all[r], ignore_first_dim, compare_root);
    if (d.empty()) continue;
    os << (bad++ ? "; " : "") << "rank " << r << ": " << d;
  }
  if (bad) {
    std::ostringstream msg;
    msg << op_kind_name(mine.op) << " '" << mine.name << "' on rank " << rank_
        << ": ranks called it differently (each entry: that rank's value vs rank 0's): "
        << os.str();
    throw DecommError(msg.str());
  }
  return all;
}

std::shared_ptr<Handle> MpiBackend::launch(const std::shared_ptr<Op>& op, bool async) {
  if (async && has_progress_thread()) {
    enqueue(op);
  } else if (!async) {
    run(*op);
    if (!op->error().empty()) {
      bury(op);
      throw DecommError(op->error());
    }
  }
  return std::make_shared<Handle>(op, this);
}

void MpiBackend::bury(const std::shared_ptr<Op>& op) {
  std::lock_guard<std::mutex> lk(mu_);
  graveyard_.push_back(op);
}

std::shared_ptr<Handle> MpiBackend::neighbor_allreduce(const at::Tensor& x, const at::Tensor& out,
                                                       double self_weight, const Peers& src,
                                                       const Peers& dst, const std::string& name,
                                                       int64_t round, uint64_t topo_hash,
                                                       bool async) {
  Header hdr = make_header(kNeighborAllreduce, p2p_seq_++, x, name, round, topo_hash);
  auto op = std::make_shared<NeighborAllreduceOp>(this, x, out, self_weight, src, dst, name, hdr);
  op->post();
  return launch(op, async);
}

at::Tensor MpiBackend::neighbor_allgather(const at::Tensor& x, const std::vector<int64_t>& src,
                                          const std::vector<int64_t>& dst,
                                          const std::string& name, int64_t round,
                                          uint64_t topo_hash) {
  Header hdr = make_header(kNeighborAllgather, p2p_seq_++, x, name, round, topo_hash);
  auto op = std::make_shared<NeighborAllgatherOp>(this, x, src, dst, name, hdr);
  op->post();
  run(*op);
  if (timeline()) tl_last_times = op->times();
  if (!op->error().empty()) {
    bury(op);
    throw DecommError(op->error());
  }
  return op->result;
}

std::shared_ptr<Handle> MpiBackend::allreduce(const at::Tensor& x, const at::Tensor& out,
                                              bool average, const std::string& name,
                                              bool async) {
  const int64_t t0 = timeline() ? steady_ns() : 0;
  Header hdr = make_header(kAllreduce, coll_seq_++, x, name, -1, 0);
  hdr.flags = average ? 1 : 0;
  if (check_) check_collective(hdr, false, false);
  auto op = std::make_shared<CollectiveOp>(this, kAllreduce, name, out, average, hdr.seq);
  if (x.numel() > INT_MAX)  // MPI_Iallreduce counts elements, in a C int
    throw DecommError("allreduce '" + name + "' on rank " + std::to_string(rank_) + ": " +
                      std::to_string(x.numel()) + " elements exceed the 2^31-1 elements one MPI "
                      "reduction takes (MPI counts are 32-bit); split the tensor");
  const int count = static_cast<int>(x.numel());
  const void* sendbuf = out.data_ptr() == x.data_ptr() ? MPI_IN_PLACE : x.data_ptr();
  check_mpi(MPI_Iallreduce(sendbuf, out.data_ptr(), count, mpi_datatype(x.scalar_type()), MPI_SUM,
                           comm_, op->request()), "MPI_Iallreduce");
  if (t0) op->times_[kTimeBegin] = t0;
  op->mark(kTimePosted);
  if (size_ > 1) bytes_sent += x.numel() * static_cast<int64_t>(x.element_size());
  return launch(op, async);
}

void MpiBackend::broadcast(const at::Tensor& inout, int root, const std::string& name) {
  const int64_t t0 = timeline() ? steady_ns() : 0;
  Header hdr = make_header(kBroadcast, coll_seq_++, inout, name, -1, 0);
  hdr.root = root;
  if (check_) check_collective(hdr, false, true);
  const int64_t nbytes = inout.numel() * static_cast<int64_t>(inout.element_size());
  CollectiveOp op(this, kBroadcast, name, inout, false, hdr.seq);
  check_mpi(MPI_Ibcast(inout.data_ptr(), checked_count(nbytes, "broadcast '" + name + "'", rank_),
                       MPI_BYTE, root, comm_, op.request()), "MPI_Ibcast");
  if (t0) op.times_[kTimeBegin] = t0;
  op.mark(kTimePosted);
  if (rank_ == root && size_ > 1) bytes_sent += nbytes;
  run(op);
  if (!op.error().empty()) throw DecommError(op.error());
}

at::Tensor MpiBackend::allgather(const at::Tensor& x, const std::string& name) {
  const int64_t t0 = timeline() ? steady_ns() : 0;
  Header hdr = make_header(kAllgather, coll_seq_++, x, name, -1, 0);
  const bool saved = check_;
  check_ = true;  // the gathered headers also carry every rank's first dimension
  std::vector<Header> all;
  try {
    all = check_collective(hdr, true, false);
  } catch (...) {
    check_ = saved;
    throw;
  }
  check_ = saved;
  int64_t row_bytes = static_cast<int64_t>(x.element_size());
  for (int64_t d = 1; d < x.dim(); ++d) row_bytes *= x.size(d);
  std::vector<int> counts(size_), displs(size_);
  int64_t total = 0;
  for (int r = 0; r < size_; ++r) {
    counts[r] = checked_count(all[r].shape[0], "allgather '" + name + "'", rank_);
    displs[r] = checked_count(total, "allgather '" + name + "'", rank_);
    total += all[r].shape[0];
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = total;
  at::Tensor out = at::empty(shape, x.options());
  if (row_bytes == 0 || total == 0) return out;
  MPI_Datatype row;
  check_mpi(MPI_Type_contiguous(checked_count(row_bytes, "allgather '" + name + "' row", rank_),
                                MPI_BYTE, &row),
            "MPI_Type_contiguous");
  MPI_Type_commit(&row);
  CollectiveOp op(this, kAllgather, name, out, false, hdr.seq);
  int rc = MPI_Iallgatherv(x.data_ptr(), counts[rank_], row, out.data_ptr(), counts.data(),
                           displs.data(), row, comm_, op.request());
  MPI_Type_free(&row);
  check_mpi(rc, "MPI_Iallgatherv");
  if (t0) op.times_[kTimeBegin] = t0;
  op.mark(kTimePosted);
  if (size_ > 1) bytes_sent += x.numel() * static_cast<int64_t>(x.element_size());
  run(op);
  if (!op.error().empty()) throw DecommError(op.error());
  return out;
}

void MpiBackend::barrier() {
  CollectiveOp op(this, kBarrier, "barrier", at::Tensor(), false, coll_seq_++);
  check_mpi(MPI_Ibarrier(comm_, op.request()), "MPI_Ibarrier");
  op.mark(kTimePosted);
  run(op);
  if (!op.error().empty()) throw DecommError(op.error());
}

}  // namespace decomm
