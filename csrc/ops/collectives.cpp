// The collectives over MPI: allreduce, broadcast, allgather and barrier, each
// one non-blocking MPI request (CollectiveOp), checked first by gathering
// every rank's header (MpiBackend::check_collective).
#include "mpi_backend.h"

#include "ops/internal.h"

#include <climits>

namespace decomm {

using namespace detail;

namespace {

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

}  // namespace

// ------------------------------------------------------ collective (1 request)
bool CollectiveOp::step() {
  int flag = 0;
  check_mpi(MPI_Test(&reqs_[0], &flag, MPI_STATUS_IGNORE), op_kind_name(kind_));
  if (!flag) return false;
  mark(kTimeArrived);
  if (average_ && out_.numel() > 0) out_.div_(be_->size());
  result = out_;
  return true;
}

std::string CollectiveOp::departed() const {
  std::vector<int64_t> all(static_cast<size_t>(be_->size()));
  for (int r = 0; r < be_->size(); ++r) all[r] = r;
  return be_->departed_peers(all, seq_, false);
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
  if (!op.error().empty()) op.raise();
}

at::Tensor MpiBackend::allgather(const at::Tensor& x, const std::string& name) {
  const int64_t t0 = timeline() ? steady_ns() : 0;
  Header hdr = make_header(kAllgather, coll_seq_++, x, name, -1, 0);
  // Gathered and compared whatever check says: they carry every rank's first dimension.
  const std::vector<Header> all = check_collective(hdr, true, false);
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
  if (!op.error().empty()) op.raise();
  return out;
}

void MpiBackend::barrier() {
  CollectiveOp op(this, kBarrier, "barrier", at::Tensor(), false, coll_seq_++);
  check_mpi(MPI_Ibarrier(comm_, op.request()), "MPI_Ibarrier");
  op.mark(kTimePosted);
  run(op);
  if (!op.error().empty()) op.raise();
}

}  // namespace decomm
