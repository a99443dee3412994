// neighbor_allreduce over MPI: the message protocol (header + payload, one or
// two messages by size), the mismatch handling, and the fused weighted sum
// once every message has arrived.
#include "mpi_backend.h"

#include "ops/internal.h"
#include "weighted_sum.h"

#include <climits>
#include <cstring>
#include <sstream>

namespace decomm {

using namespace detail;

// Two ways a payload travels, chosen by the sender per call and announced in the
// header (kFlagPayloadApart), so that ranks need not agree on it:
// - staged: one message [header | payload] from a pooled buffer. No second message,
//   and no MPI struct datatype over the two addresses (that cost about 1 us to
//   create, commit and free per neighbour and call); the receiver sums straight
//   from its staging buffer. Used up to kSmallMessage, but past one eager fragment
//   of Open MPI's shared-memory transport (4 KiB including MPI's own header;
//   measured: 3968 bytes still eager, 4032 not) only for in-place calls.
// - apart: a header message, then the payload as contiguous messages straight
//   from x, which lets MPI use its single-copy path.
// Past the eager size both go by rendezvous, and for a buffer that stays clean
// between calls (out of place) the staging copy costs more than the second
// message: with mpi4py on 2 ranks at 64 KiB, 15.7 us staged against 6.2 us apart
// (the floor's single message: 4.8 us); decomm out of place 20.2 -> 11.7 us. For
// a buffer the sum has just written (in place, what the optimizers do) apart was
// slower (19.4 -> 23.6 us quiet on 2 ranks, and 8x under load): the peer's
// single-copy read of freshly written memory costs more than our copy of it.
// Every receiver takes the header (and a staged payload) into a buffer of
// kHeadCapacity bytes, room for any staged message (see internal.h); one of at
// most kSmallMessage bytes also takes a payload sent apart right behind the
// header there, a larger one into its own buffer. The receiver learns the
// sender's size and form from the header, so it can still consume every message
// when two ranks disagree.
constexpr int64_t kHeaderBytes = static_cast<int64_t>(sizeof(Header));
constexpr int64_t kSmallMessage = kMaxStagedPayload;
constexpr int64_t kEagerMessage = (4 << 10) - 128;
static_assert(sizeof(Header) % alignof(double) == 0, "the payload after the header is aligned");

static int64_t payload_bytes(const Header& h) {
  if (h.dtype < 0 || h.numel < 0) return 0;
  return h.numel * static_cast<int64_t>(c10::elementSize(static_cast<c10::ScalarType>(h.dtype)));
}

class NeighborAllreduceOp : public NeighborOp {
 public:
  NeighborAllreduceOp(MpiBackend* be, at::Tensor x, at::Tensor out, double self_w, Peers src,
                      Peers dst, const std::string& name, Header hdr)
      : NeighborOp(be, kNeighborAllreduce, name, hdr.seq),
        x_(std::move(x)), out_(std::move(out)), self_w_(self_w),
        src_(std::move(src)), dst_(std::move(dst)), mine_(hdr) {}

  void post() {
    const auto dtype = x_.scalar_type();
    const int64_t n = x_.numel();
    nbytes_ = n * static_cast<int64_t>(x_.element_size());
    small_ = nbytes_ <= kSmallMessage;
    count_ = small_ ? static_cast<int>(kHeaderBytes + nbytes_) : 0;  // a staged message
    const bool in_place = out_.data_ptr() == x_.data_ptr();
    apart_ = !small_ || (kHeaderBytes + nbytes_ > kEagerMessage && !in_place);
    if (apart_) mine_.flags |= kFlagPayloadApart;
    const size_t S = src_.ranks.size(), D = dst_.ranks.size();
    in_.resize(S);
    head_.resize(S);
    recv_.resize(S);
    send_hdr_.assign(D, MPI_REQUEST_NULL);
    send_data_.assign(D, {});
    MPI_Comm comm = be_->comm();
    for (size_t s = 0; s < S; ++s) {
      const int peer = static_cast<int>(src_.ranks[s]);
      in_[s].hdr.magic = 0;  // so a header that never arrived cannot pass for one
      head_[s] = borrow(kHeadCapacity);
      const uint32_t none = 0;
      std::memcpy(head_[s].data_ptr(), &none, sizeof(none));  // the staged header's magic
      check_mpi(MPI_Irecv(head_[s].data_ptr(), static_cast<int>(kHeadCapacity), MPI_BYTE, peer,
                          head_tag(mine_.seq), comm, &in_[s].head), "MPI_Irecv");
      // A payload sent apart is received when its header has arrived (tagged with
      // the sender's call number, so it cannot match another call's payload).
      if (!small_) recv_[s] = borrow(nbytes_);
    }
    void* unscaled = nullptr;  // the staged [header | x], shared by every unscaled send
    for (size_t d = 0; d < D; ++d) {
      const int peer = static_cast<int>(dst_.ranks[d]);
      const double w = dst_.weights[d];
      if (!apart_) {
        void* msg = w == 1.0 ? unscaled : nullptr;
        if (msg == nullptr) {
          msg = borrow(kHeaderBytes + nbytes_).data_ptr();
          std::memcpy(msg, &mine_, sizeof(Header));
          char* body = static_cast<char*>(msg) + kHeaderBytes;
          if (w == 1.0) {
            if (nbytes_ > 0) std::memcpy(body, x_.data_ptr(), static_cast<size_t>(nbytes_));
            unscaled = msg;
          } else if (n > 0) {
            scaled_copy(body, x_.data_ptr(), w, n, dtype);
          }
        }
        check_mpi(MPI_Isend(msg, count_, MPI_BYTE, peer, head_tag(mine_.seq), comm,
                            &send_hdr_[d]), "MPI_Isend");
      } else {
        const void* payload = x_.data_ptr();
        if (w != 1.0 && n > 0) {
          at::Tensor scaled = borrow(nbytes_);
          scaled_copy(scaled.data_ptr(), x_.data_ptr(), w, n, dtype);
          payload = scaled.data_ptr();
        }
        check_mpi(MPI_Isend(&mine_, sizeof(Header), MPI_BYTE, peer, head_tag(mine_.seq), comm,
                            &send_hdr_[d]), "MPI_Isend");
        isend_chunks(payload, nbytes_, peer, bulk_tag(mine_.seq), comm, send_data_[d]);
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
        if (is_peer_failure(rc)) check_mpi(rc, "MPI_Test");
        if (flag || in.head == MPI_REQUEST_NULL) {
          on_header(s, st, rc != MPI_SUCCESS);
        } else {
          if (rc != MPI_SUCCESS) check_mpi(rc, "MPI_Test");
          all_done = false;
        }
      }
      if (in.bulk_open) {
        bool pending = false;
        for (auto& r : in.bulk) {
          if (r == MPI_REQUEST_NULL) continue;
          int flag = 0;
          MPI_Status st;
          int rc = MPI_Test(&r, &flag, &st);
          if (is_peer_failure(rc)) check_mpi(rc, "MPI_Test");
          if (flag || r == MPI_REQUEST_NULL) {
            int got = 0;
            MPI_Get_count(&st, MPI_BYTE, &got);
            in.bulk_bad |= rc != MPI_SUCCESS;
            in.bulk_got += got;
          } else {
            pending = true;
          }
        }
        if (pending) {
          all_done = false;
        } else {
          in.bulk_open = false;
          if ((in.bulk_bad || in.bulk_got != nbytes_) && !in.mismatch)
            fail("in-neighbour " + std::to_string(src_.ranks[s]) + " sent " +
                 (in.bulk_bad ? std::string("more than ") : std::to_string(in.bulk_got) + " of ") +
                 "the " + std::to_string(nbytes_) + " payload bytes this rank expected");
          else if (!in.mismatch)
            be_->bytes_received += in.bulk_got;
        }
      }
    }
    {
      int flag = 0;
      testall(send_hdr_, &flag, "MPI_Testall");
      all_done &= flag != 0;
    }
    for (auto& v : send_data_) {
      int flag = 0;
      testall(v, &flag, "MPI_Testall");
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
      for (size_t s = 0; s < recv_.size(); ++s)
        rs[s] = small_ ? static_cast<const char*>(head_[s].data_ptr()) + kHeaderBytes
                       : recv_[s].data_ptr();
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

  void waiting(bool headers_only, std::vector<int64_t>& in,
               std::vector<int64_t>& out) const override {
    auto open = [](const std::vector<MPI_Request>& v) {
      for (const auto& r : v)
        if (r != MPI_REQUEST_NULL) return true;
      return false;
    };
    for (size_t s = 0; s < in_.size(); ++s)
      if (in_[s].head != MPI_REQUEST_NULL || (!headers_only && open(in_[s].bulk)))
        in.push_back(src_.ranks[s]);
    for (size_t d = 0; d < send_hdr_.size(); ++d)
      if (send_hdr_[d] != MPI_REQUEST_NULL || open(send_data_[d]))
        out.push_back(dst_.ranks[d]);
  }

  void requests(std::vector<MPI_Request*>& out) override {
    for (auto& in : in_) {
      out.push_back(&in.head);
      for (auto& r : in.bulk) out.push_back(&r);
    }
    for (auto& r : send_hdr_) out.push_back(&r);
    for (auto& v : send_data_)
      for (auto& r : v) out.push_back(&r);
  }

 private:
  struct Incoming {
    Header hdr;
    MPI_Request head = MPI_REQUEST_NULL;  // the header (with the payload when small)
    std::vector<MPI_Request> bulk;  // the chunks of a large message's payload
    bool bulk_open = false;         // chunks still to complete (or to account for)
    bool bulk_bad = false;
    int64_t bulk_got = 0;
    bool mismatch = false;
    at::Tensor drain;
  };

  bool be_check() const;

  void on_header(size_t s, MPI_Status& st, bool truncated) {
    Incoming& in = in_[s];
    std::memcpy(&in.hdr, head_[s].data_ptr(), sizeof(Header));  // the header leads the message
    const std::string who = "in-neighbour " + std::to_string(src_.ranks[s]);
    int got = 0;
    MPI_Get_count(&st, MPI_BYTE, &got);
    // No message from decomm is longer than the receive (kHeadCapacity); should
    // one be cut short all the same, its header still leads it.
    const bool have_header = truncated ? in.hdr.magic == kHeaderMagic
                                       : got >= static_cast<int>(sizeof(Header));
    // Only a neighbor_allreduce sends a payload apart, on the bulk tags; what a
    // neighbor_allgather sent instead is drained as a failed call's leftover.
    const bool apart = have_header && in.hdr.op == kNeighborAllreduce &&
                       (in.hdr.flags & kFlagPayloadApart) != 0;
    const int64_t theirs = have_header ? payload_bytes(in.hdr) : 0;
    const int64_t expect = kHeaderBytes + (apart ? 0 : nbytes_);
    const bool size_differs = truncated || got != expect || (apart && theirs != nbytes_);
    std::string diff;
    if (have_header && (be_check() || size_differs))
      diff = header_diff(mine_, in.hdr, false, false);
    if (diff.empty() && size_differs) diff = "message size (shape or dtype differ)";
    if (diff.empty()) {
      if (!apart) {
        be_->bytes_received += got;
      } else {
        char* at = small_ ? static_cast<char*>(head_[s].data_ptr()) + kHeaderBytes
                          : static_cast<char*>(recv_[s].data_ptr());
        irecv_chunks(at, nbytes_, static_cast<int>(src_.ranks[s]), bulk_tag(in.hdr.seq),
                     be_->comm(), in.bulk);
        in.bulk_open = true;
      }
      return;
    }
    fail(who + " called differently: " + diff + " (that rank's value vs this rank's)");
    in.mismatch = true;
    if (apart) {
      // Consume the neighbour's payload message, so nothing is left in flight.
      in.drain = at::empty({theirs}, at::kByte);
      irecv_chunks(in.drain.data_ptr(), theirs, static_cast<int>(src_.ranks[s]),
                   bulk_tag(in.hdr.seq), be_->comm(), in.bulk);
      in.bulk_open = true;
    }
  }

  at::Tensor x_, out_;
  double self_w_;
  Peers src_, dst_;
  Header mine_;
  std::vector<Incoming> in_;
  std::vector<at::Tensor> head_;  // per in-neighbour: [header | staged payload], kHeadCapacity
  std::vector<at::Tensor> recv_;  // per in-neighbour: a payload of over kSmallMessage bytes
  std::vector<MPI_Request> send_hdr_;
  std::vector<std::vector<MPI_Request>> send_data_;  // per out-neighbour: the chunks
  int64_t nbytes_ = 0;
  int count_ = 0;       // bytes of this rank's staged message
  bool small_ = true;   // this rank's payload fits behind the header in head_
  bool apart_ = false;  // this rank sends its payload apart from the header
};
bool NeighborAllreduceOp::be_check() const { return be_->check(); }

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

}  // namespace decomm
