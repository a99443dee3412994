// The collectives over MPI: allreduce, broadcast, allgather and barrier, each
// one non-blocking MPI request (CollectiveOp), checked first by gathering
// every rank's header (MpiBackend::check_collective).
#include "mpi_backend.h"

#include "ops/internal.h"

#include <algorithm>
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

// ------------------------------------------- collective (1 request per chunk)
bool CollectiveOp::step() {
  int flag = 0;
  if (reqs_.size() == 1)
    check_mpi(MPI_Test(&reqs_[0], &flag, MPI_STATUS_IGNORE), op_kind_name(kind_));
  else
    testall(reqs_, &flag, op_kind_name(kind_));
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
  hdr.flags = average ? kFlagAverage : 0;
  if (check_) check_collective(hdr, false, false);
  // One reduction per chunk of at most g_max_chunk bytes (MPI counts are C ints);
  // non-blocking collectives on one communicator complete in any order but match
  // in the order they were started, on every rank alike.
  const int64_t esize = static_cast<int64_t>(x.element_size());
  const int64_t per = std::max<int64_t>(1, g_max_chunk / esize);
  const int64_t numel = x.numel();
  auto op = std::make_shared<CollectiveOp>(this, kAllreduce, name, out, average, hdr.seq,
                                           chunk_count(numel, per));
  const bool in_place = out.data_ptr() == x.data_ptr();
  const MPI_Datatype type = mpi_datatype(x.scalar_type());
  for_each_chunk(numel, per, [&](int64_t k, int64_t lo, int count) {
    char* dst = static_cast<char*>(out.data_ptr()) + lo * esize;
    const void* src = in_place ? MPI_IN_PLACE
                               : static_cast<const char*>(x.data_ptr()) + lo * esize;
    check_mpi(MPI_Iallreduce(src, dst, count, type, MPI_SUM, comm_, op->request(k)),
              "MPI_Iallreduce");
  });
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
  CollectiveOp op(this, kBroadcast, name, inout, false, hdr.seq,
                  chunk_count(nbytes, g_max_chunk));
  for_each_chunk(nbytes, g_max_chunk, [&](int64_t k, int64_t lo, int count) {
    check_mpi(MPI_Ibcast(static_cast<char*>(inout.data_ptr()) + lo, count, MPI_BYTE, root,
                         comm_, op.request(k)), "MPI_Ibcast");
  });
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
