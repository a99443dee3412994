#include "mpi_backend.h"

#include "weighted_sum.h"

#include <sched.h>

#include <algorithm>
#include <climits>
#include <map>
#include <sstream>

namespace decomm {

namespace {

// Point-to-point tags. Each kind of message has its own tag, so a header can
// never be matched with a data message; calls pair up in program order
// (MPI's non-overtaking rule), and the sequence number in the header catches
// ranks that skipped or added a call.
constexpr int kTagNaData = 102;
// Large payloads: tag derived from the sender's call number (see bulk_tag).
constexpr int kTagBulkBase = 1000;
int g_tag_span = 1 << 20;  // clamped at init to what MPI_TAG_UB allows
int bulk_tag(int64_t seq) { return kTagBulkBase + static_cast<int>(seq % g_tag_span); }
constexpr int kTagNgHeader = 103;
constexpr int kTagNgData = 104;

int checked_count(int64_t nbytes, const std::string& what) {
  if (nbytes > INT_MAX) {
    throw DecommError(what + ": message of " + std::to_string(nbytes) +
                      " bytes exceeds the 2 GiB per-message limit of this build; split the tensor");
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
Op::Op(MpiBackend* be, int32_t kind, std::string name)
    : be_(be), kind_(kind), name_(std::move(name)), deadline_(be->deadline()) {
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
      : Op(be, kNeighborAllreduce, name),
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
    count_ = checked_count(nbytes_, "neighbor_allreduce '" + name_ + "'");
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
        int rc = MPI_Irecv(MPI_BOTTOM, 1, t, peer, kTagNaData, comm, &in_[s].head);
        MPI_Type_free(&t);
        check_mpi(rc, "MPI_Irecv");
      } else {
        // The payload's receive is posted when the header arrives (tagged with
        // the sender's call number, so it cannot match another call's payload).
        check_mpi(MPI_Irecv(&in_[s].hdr, sizeof(Header), MPI_BYTE, peer, kTagNaData, comm,
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
        int rc = MPI_Isend(MPI_BOTTOM, 1, t, peer, kTagNaData, comm, &send_hdr_[d]);
        MPI_Type_free(&t);
        check_mpi(rc, "MPI_Isend");
      } else {
        check_mpi(MPI_Isend(&mine_, sizeof(Header), MPI_BYTE, peer, kTagNaData, comm,
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
    // Everything has arrived and every send is done, so the output may alias
    // the input: one fused pass, in a fixed order.
    const int64_t n = x_.numel();
    if (n > 0) {
      std::vector<const void*> rs(recv_.size());
      for (size_t s = 0; s < recv_.size(); ++s) rs[s] = recv_[s].data_ptr();
      weighted_sum(out_.data_ptr(), x_.data_ptr(), self_w_, rs.data(), src_.weights.data(),
                   static_cast<int64_t>(rs.size()), n, x_.scalar_type());
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
    const bool their_bulk = have_header && theirs > kSmallMessage && theirs <= INT_MAX;
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
      : Op(be, kNeighborAllgather, name), x_(std::move(x)), src_(std::move(src)),
        dst_(std::move(dst)), mine_(hdr) {}

  void post() {
    const int64_t nbytes = x_.numel() * static_cast<int64_t>(x_.element_size());
    const int count = checked_count(nbytes, "neighbor_allgather '" + name_ + "'");
    row_bytes_ = static_cast<int64_t>(x_.element_size());
    for (int64_t d = 1; d < x_.dim(); ++d) row_bytes_ *= x_.size(d);
    const size_t S = src_.size(), D = dst_.size();
    in_hdr_.resize(S);
    parts_.resize(S);
    hdr_reqs_.assign(S, MPI_REQUEST_NULL);
    data_reqs_.assign(S, MPI_REQUEST_NULL);
    data_posted_.assign(S, 0);
    send_reqs_.assign(2 * D, MPI_REQUEST_NULL);
    MPI_Comm comm = be_->comm();
    for (size_t s = 0; s < S; ++s)
      check_mpi(MPI_Irecv(&in_hdr_[s], sizeof(Header), MPI_BYTE, static_cast<int>(src_[s]),
                          kTagNgHeader, comm, &hdr_reqs_[s]), "MPI_Irecv");
    for (size_t d = 0; d < D; ++d) {
      const int peer = static_cast<int>(dst_[d]);
      check_mpi(MPI_Isend(&mine_, sizeof(Header), MPI_BYTE, peer, kTagNgHeader, comm,
                          &send_reqs_[2 * d]), "MPI_Isend");
      check_mpi(MPI_Isend(x_.data_ptr(), count, MPI_BYTE, peer, kTagNgData, comm,
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
        check_mpi(MPI_Test(&hdr_reqs_[s], &flag, MPI_STATUS_IGNORE), "MPI_Test");
        if (!flag) {
          all_done = false;
          continue;
        }
        std::string diff = header_diff(mine_, in_hdr_[s], true, false);
        if (!diff.empty())
          fail("in-neighbour " + std::to_string(src_[s]) + " called differently: " + diff +
               " (that rank's value vs this rank's)");
        // Receive whatever the neighbour announced, even on a mismatch, so
        // that its send completes and no message is left in flight.
        const int64_t rows = in_hdr_[s].ndim > 0 ? in_hdr_[s].shape[0] : 1;
        const int64_t nbytes = in_hdr_[s].numel * static_cast<int64_t>(x_.element_size());
        std::vector<int64_t> shape(x_.sizes().begin(), x_.sizes().end());
        if (shape.empty()) shape.push_back(1);
        shape[0] = rows;
        parts_[s] = diff.empty() ? at::empty(shape, x_.options())
                                 : at::empty({std::max<int64_t>(nbytes, 1)}, at::kByte);
        check_mpi(MPI_Irecv(parts_[s].data_ptr(), checked_count(nbytes, "neighbor_allgather"),
                            MPI_BYTE, static_cast<int>(src_[s]), kTagNgData, comm,
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
               bool average)
      : Op(be, kind, name), out_(std::move(out)), average_(average) {
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
  if (has_ub && tag_ub && *tag_ub - kTagBulkBase < g_tag_span)
    g_tag_span = std::max(1, *tag_ub - kTagBulkBase);
  MPI_Comm_size(comm_, &size_);
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
  if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  comm_ = MPI_COMM_NULL;
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
  CollectiveOp op(this, mine.op, mine.name, at::Tensor(), false);
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
  auto op = std::make_shared<CollectiveOp>(this, kAllreduce, name, out, average);
  const int count = static_cast<int>(x.numel());
  if (x.numel() > INT_MAX) checked_count(x.numel(), "allreduce '" + name + "'");
  const void* sendbuf = out.data_ptr() == x.data_ptr() ? MPI_IN_PLACE : x.data_ptr();
  check_mpi(MPI_Iallreduce(sendbuf, out.data_ptr(), count, mpi_datatype(x.scalar_type()), MPI_SUM,
                           comm_, op->request()), "MPI_Iallreduce");
  if (t0) op->times_[kTimeBegin] = t0;
  op->mark(kTimePosted);
  bytes_sent += x.numel() * static_cast<int64_t>(x.element_size());
  return launch(op, async);
}

void MpiBackend::broadcast(const at::Tensor& inout, int root, const std::string& name) {
  const int64_t t0 = timeline() ? steady_ns() : 0;
  Header hdr = make_header(kBroadcast, coll_seq_++, inout, name, -1, 0);
  hdr.root = root;
  if (check_) check_collective(hdr, false, true);
  const int64_t nbytes = inout.numel() * static_cast<int64_t>(inout.element_size());
  CollectiveOp op(this, kBroadcast, name, inout, false);
  check_mpi(MPI_Ibcast(inout.data_ptr(), checked_count(nbytes, "broadcast '" + name + "'"),
                       MPI_BYTE, root, comm_, op.request()), "MPI_Ibcast");
  if (t0) op.times_[kTimeBegin] = t0;
  op.mark(kTimePosted);
  if (rank_ == root) bytes_sent += nbytes;
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
    counts[r] = checked_count(all[r].shape[0], "allgather '" + name + "'");
    displs[r] = checked_count(total, "allgather '" + name + "'");
    total += all[r].shape[0];
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = total;
  at::Tensor out = at::empty(shape, x.options());
  if (row_bytes == 0 || total == 0) return out;
  MPI_Datatype row;
  check_mpi(MPI_Type_contiguous(checked_count(row_bytes, "allgather row"), MPI_BYTE, &row),
            "MPI_Type_contiguous");
  MPI_Type_commit(&row);
  CollectiveOp op(this, kAllgather, name, out, false);
  int rc = MPI_Iallgatherv(x.data_ptr(), counts[rank_], row, out.data_ptr(), counts.data(),
                           displs.data(), row, comm_, op.request());
  MPI_Type_free(&row);
  check_mpi(rc, "MPI_Iallgatherv");
  if (t0) op.times_[kTimeBegin] = t0;
  op.mark(kTimePosted);
  bytes_sent += x.numel() * static_cast<int64_t>(x.element_size());
  run(op);
  if (!op.error().empty()) throw DecommError(op.error());
  return out;
}

void MpiBackend::barrier() {
  CollectiveOp op(this, kBarrier, "barrier", at::Tensor(), false);
  check_mpi(MPI_Ibarrier(comm_, op.request()), "MPI_Ibarrier");
  op.mark(kTimePosted);
  run(op);
  if (!op.error().empty()) throw DecommError(op.error());
}

}  // namespace decomm
