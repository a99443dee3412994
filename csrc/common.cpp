#include "common.h"

#include <cstring>
#include <sstream>

namespace decomm {

const char* op_kind_name(int32_t kind) {
  switch (kind) {
    case kNeighborAllreduce: return "neighbor_allreduce";
    case kAllreduce: return "allreduce";
    case kBroadcast: return "broadcast";
    case kAllgather: return "allgather";
    case kNeighborAllgather: return "neighbor_allgather";
    case kBarrier: return "barrier";
    default: return "unknown-op";
  }
}

static uint64_t fnv1a(const void* data, size_t n, uint64_t h = 1469598103934665603ull) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

Header make_header(int32_t op, int64_t seq, const at::Tensor& t, const std::string& name,
                   int64_t round, uint64_t topo_hash) {
  Header h;
  h.op = op;
  h.seq = seq;
  h.round = round;
  h.topo_hash = topo_hash;
  if (t.defined()) {
    h.dtype = static_cast<int32_t>(t.scalar_type());
    h.ndim = static_cast<int32_t>(t.dim());
    uint64_t sh = fnv1a(&h.ndim, sizeof(h.ndim));
    for (int64_t d = 0; d < t.dim(); ++d) {
      int64_t s = t.size(d);
      if (d < kMaxHeaderDims) h.shape[d] = s;
      sh = fnv1a(&s, sizeof(s), sh);
    }
    h.shape_hash = sh;
    h.numel = t.numel();
  }
  std::strncpy(h.name, name.c_str(), kHeaderNameLen - 1);
  return h;
}

std::string describe_shape(const Header& h) {
  std::ostringstream os;
  os << "[";
  for (int d = 0; d < h.ndim; ++d) {
    if (d) os << ", ";
    if (d < kMaxHeaderDims) {
      os << h.shape[d];
    } else {
      os << "...";
      break;
    }
  }
  os << "]";
  return os.str();
}

std::string dtype_name(int32_t dtype) {
  if (dtype < 0) return "none";
  return std::string(c10::toString(static_cast<c10::ScalarType>(dtype)));
}

std::string header_diff(const Header& mine, const Header& theirs, bool ignore_first_dim,
                        bool compare_root) {
  std::ostringstream os;
  auto sep = [&]() { if (os.tellp() > 0) os << ", "; };
  if (theirs.magic != kHeaderMagic) {
    os << "corrupt message header";
    return os.str();
  }
  if (mine.op != theirs.op) {
    sep();
    os << "op " << op_kind_name(theirs.op) << " vs " << op_kind_name(mine.op);
  }
  if (std::strncmp(mine.name, theirs.name, kHeaderNameLen) != 0) {
    sep();
    os << "name '" << theirs.name << "' vs '" << mine.name << "'";
    if (mine.name[0] == '@' || theirs.name[0] == '@')
      os << " (a call without name= is named after its line: these ranks are making different "
            "calls, e.g. one skipped or added a call; if both lines are the same exchange, give "
            "them the same name=)";
  }
  if (mine.dtype != theirs.dtype) {
    sep();
    os << "dtype " << dtype_name(theirs.dtype) << " vs " << dtype_name(mine.dtype);
  }
  bool shape_differs = mine.ndim != theirs.ndim;
  if (!shape_differs) {
    if (ignore_first_dim) {
      for (int d = 1; d < mine.ndim && d < kMaxHeaderDims; ++d)
        shape_differs |= mine.shape[d] != theirs.shape[d];
    } else {
      shape_differs = mine.shape_hash != theirs.shape_hash;
    }
  }
  if (shape_differs) {
    sep();
    os << "shape " << describe_shape(theirs) << " vs " << describe_shape(mine);
  }
  if (mine.round != theirs.round) {
    sep();
    os << "topology round " << theirs.round << " vs " << mine.round;
  }
  if (mine.topo_hash != theirs.topo_hash) {
    sep();
    os << "topology (set_topology called with different graphs)";
  }
  if (mine.seq != theirs.seq) {
    sep();
    os << "call number " << theirs.seq << " vs " << mine.seq << " (a rank skipped or added a call)";
  }
  if (compare_root && mine.root != theirs.root) {
    sep();
    os << "root " << theirs.root << " vs " << mine.root;
  }
  if ((mine.flags & kFlagAverage) != (theirs.flags & kFlagAverage)) {
    sep();
    os << "average=" << (theirs.flags & kFlagAverage ? "True" : "False") << " vs "
       << (mine.flags & kFlagAverage ? "True" : "False");
  }
  return os.str();
}

std::string op_where(int32_t kind, const std::string& name, int rank) {
  return std::string(op_kind_name(kind)) + " '" + name + "' on rank " + std::to_string(rank);
}

void check_agreement(const Header* all, int n, const Header& mine, int rank,
                     bool ignore_first_dim, bool compare_root) {
  std::ostringstream os;
  int bad = 0;
  for (int r = 1; r < n; ++r) {
    std::string d = header_diff(all[0], all[r], ignore_first_dim, compare_root);
    if (d.empty()) continue;
    os << (bad++ ? "; " : "") << "rank " << r << ": " << d;
  }
  if (bad) {
    throw DecommError(op_where(mine.op, mine.name, rank) +
                      ": ranks called it differently (each entry: that rank's value vs rank "
                      "0's): " + os.str());
  }
}

bool is_peer_failure(int code) {
  if (code == MPI_SUCCESS) return false;
  int cls = code;
  MPI_Error_class(code, &cls);
#ifdef MPIX_ERR_PROC_FAILED
  return cls == MPIX_ERR_PROC_FAILED || cls == MPIX_ERR_PROC_FAILED_PENDING ||
         cls == MPIX_ERR_REVOKED;
#else
  return false;
#endif
}

void check_mpi(int code, const char* what) {
  if (code == MPI_SUCCESS) return;
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, buf, &len);
  const std::string msg = std::string("MPI error in ") + what + ": " + std::string(buf, len);
  if (is_peer_failure(code)) throw PeerFailure(msg);
  throw DecommError(msg);
}

void testall(std::vector<MPI_Request>& reqs, int* flag, const char* what) {
  thread_local std::vector<MPI_Status> st;
  st.resize(reqs.size());
  const int rc = MPI_Testall(static_cast<int>(reqs.size()), reqs.data(), flag, st.data());
  if (rc == MPI_ERR_IN_STATUS) {
    for (const auto& s : st)
      if (s.MPI_ERROR != MPI_SUCCESS && s.MPI_ERROR != MPI_ERR_PENDING) check_mpi(s.MPI_ERROR, what);
  }
  check_mpi(rc, what);
}

}  // namespace decomm
