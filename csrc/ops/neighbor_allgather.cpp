// neighbor_allgather over MPI: each in-neighbour's header announces its first
// dimension, then its rows arrive on the data tag and are concatenated in the
// order of the in-neighbours.
#include "mpi_backend.h"

#include "ops/internal.h"

#include <cstring>
#include <sstream>

namespace decomm {

using namespace detail;

class NeighborAllgatherOp : public NeighborOp {
 public:
  NeighborAllgatherOp(MpiBackend* be, at::Tensor x, std::vector<int64_t> src,
                      std::vector<int64_t> dst, const std::string& name, Header hdr)
      : NeighborOp(be, kNeighborAllgather, name, hdr.seq), x_(std::move(x)), src_(std::move(src)),
        dst_(std::move(dst)), mine_(hdr) {}

  void post() {
    const int64_t nbytes = x_.numel() * static_cast<int64_t>(x_.element_size());
    row_bytes_ = static_cast<int64_t>(x_.element_size());
    for (int64_t d = 1; d < x_.dim(); ++d) row_bytes_ *= x_.size(d);
    const size_t S = src_.size(), D = dst_.size();
    in_hdr_.resize(S);
    for (auto& h : in_hdr_) h.magic = 0;  // so a header that never arrived cannot pass for one
    parts_.resize(S);
    hdr_reqs_.assign(S, MPI_REQUEST_NULL);
    data_reqs_.assign(S, {});
    data_posted_.assign(S, 0);
    send_hdr_.assign(D, MPI_REQUEST_NULL);
    send_data_.assign(D, {});
    MPI_Comm comm = be_->comm();
    // Room for a neighbor_allreduce's staged message too (see kHeadCapacity): a
    // neighbour making that call instead must not overrun the receive.
    head_.resize(S);
    for (size_t s = 0; s < S; ++s) {
      head_[s] = borrow(kHeadCapacity);
      std::memcpy(head_[s].data_ptr(), &in_hdr_[s], sizeof(Header));  // magic 0: not arrived
      check_mpi(MPI_Irecv(head_[s].data_ptr(), static_cast<int>(kHeadCapacity), MPI_BYTE,
                          static_cast<int>(src_[s]), head_tag(mine_.seq), comm, &hdr_reqs_[s]),
                "MPI_Irecv");
    }
    for (size_t d = 0; d < D; ++d) {
      const int peer = static_cast<int>(dst_[d]);
      check_mpi(MPI_Isend(&mine_, sizeof(Header), MPI_BYTE, peer, head_tag(mine_.seq), comm,
                          &send_hdr_[d]), "MPI_Isend");
      isend_chunks(x_.data_ptr(), nbytes, peer, ng_data_tag(mine_.seq), comm, send_data_[d]);
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
        if (is_peer_failure(rc)) check_mpi(rc, "MPI_Test");
        if (flag || hdr_reqs_[s] == MPI_REQUEST_NULL)  // arrived: MPI no longer writes it
          std::memcpy(&in_hdr_[s], head_[s].data_ptr(), sizeof(Header));
        // The header leads every message on this tag, so even a message cut short
        // still says what the neighbour called.
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
        irecv_chunks(parts_[s].data_ptr(), nbytes, static_cast<int>(src_[s]),
                     ng_data_tag(mine_.seq), comm, data_reqs_[s]);
        be_->bytes_received += nbytes;
        data_posted_[s] = 1;
      }
      int flag = 0;
      testall(data_reqs_[s], &flag, "MPI_Testall");
      all_done &= flag != 0;
    }
    int flag = 0;
    testall(send_hdr_, &flag, "MPI_Testall");
    all_done &= flag != 0;
    for (auto& v : send_data_) {
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

  void waiting(bool headers_only, std::vector<int64_t>& in,
               std::vector<int64_t>& out) const override {
    auto open = [](const std::vector<MPI_Request>& v) {
      for (const auto& r : v)
        if (r != MPI_REQUEST_NULL) return true;
      return false;
    };
    for (size_t s = 0; s < src_.size(); ++s)
      if (hdr_reqs_[s] != MPI_REQUEST_NULL || (!headers_only && open(data_reqs_[s])))
        in.push_back(src_[s]);
    for (size_t d = 0; d < dst_.size(); ++d)
      if (send_hdr_[d] != MPI_REQUEST_NULL || open(send_data_[d])) out.push_back(dst_[d]);
  }

  void requests(std::vector<MPI_Request*>& out) override {
    for (auto* v : {&hdr_reqs_, &send_hdr_})
      for (auto& r : *v) out.push_back(&r);
    for (auto* vv : {&data_reqs_, &send_data_})
      for (auto& v : *vv)
        for (auto& r : v) out.push_back(&r);
  }

 private:
  at::Tensor x_;
  std::vector<int64_t> src_, dst_;
  Header mine_;
  std::vector<Header> in_hdr_;
  std::vector<at::Tensor> head_;  // per in-neighbour: the header message, kHeadCapacity bytes
  std::vector<at::Tensor> parts_;
  std::vector<MPI_Request> hdr_reqs_, send_hdr_;
  std::vector<std::vector<MPI_Request>> data_reqs_, send_data_;  // chunks per peer
  std::vector<char> data_posted_;
  int64_t row_bytes_ = 0;
};
at::Tensor MpiBackend::neighbor_allgather(const at::Tensor& x, const std::vector<int64_t>& src,
                                          const std::vector<int64_t>& dst,
                                          const std::string& name, int64_t round,
                                          uint64_t topo_hash) {
  Header hdr = make_header(kNeighborAllgather, p2p_seq_++, x, name, round, topo_hash);
  auto op = std::make_shared<NeighborAllgatherOp>(this, x, src, dst, name, hdr);
  op->post();
  run(*op);  // records the timeline times of this thread's last op
  if (!op->error().empty()) {
    bury(op);
    op->raise();
  }
  return op->result;
}

}  // namespace decomm
