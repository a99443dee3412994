// Shared types of the decomm C++ core: the error type, the per-message header
// used to detect mismatched calls, and small helpers.
#pragma once

#include <mpi.h>
#if __has_include(<mpi-ext.h>)
#include <mpi-ext.h>  // ULFM: MPIX_ERR_PROC_FAILED, MPIX_Comm_revoke
#endif
#include <torch/extension.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace decomm {

// Raised for every misuse or communication failure; translated to Python's
// decomm.DecommError by the bindings.
class DecommError : public std::runtime_error {
 public:
  explicit DecommError(const std::string& what) : std::runtime_error(what) {}
};

// A peer process failed (or another rank revoked the communicator after
// seeing one): the ULFM error classes. Translated to decomm.PeerFailureError.
class PeerFailure : public DecommError {
 public:
  using DecommError::DecommError;
};

// True for the ULFM classes MPI_ERR_PROC_FAILED, _PENDING and MPI_ERR_REVOKED:
// a dead peer, not a misuse (a failed receive must not read as truncation).
bool is_peer_failure(int code);

constexpr int kMaxHeaderDims = 8;
constexpr int kHeaderNameLen = 48;
constexpr uint32_t kHeaderMagic = 0xDEC0AA11u;
// Header.flags bits. kFlagAverage is part of the call (allreduce's average=) and is
// compared across ranks; kFlagPayloadApart is how this message travels (the
// neighbor_allreduce payload follows in its own message) and is not.
constexpr int32_t kFlagAverage = 1;
constexpr int32_t kFlagPayloadApart = 2;

enum OpKind : int32_t {
  kNeighborAllreduce = 1,
  kAllreduce = 2,
  kBroadcast = 3,
  kAllgather = 4,
  kNeighborAllgather = 5,
  kBarrier = 6,
};

const char* op_kind_name(int32_t kind);

// Describes one rank's side of a call. Every message (point-to-point) or every
// collective (gathered once) carries it, so that ranks that disagree on the op,
// the tensor's name, dtype or shape, the topology round or the call count find
// out before any data is combined - instead of hanging or reading garbage.
struct Header {
  uint32_t magic = kHeaderMagic;
  int32_t op = 0;
  int64_t seq = 0;        // how many calls of this family this rank has made
  int64_t round = -1;     // topology round (neighbour ops), -1 otherwise
  uint64_t topo_hash = 0; // fingerprint of the topology in force
  int32_t dtype = -1;     // c10::ScalarType as int
  int32_t ndim = 0;
  int64_t shape[kMaxHeaderDims] = {0};
  uint64_t shape_hash = 0;  // covers shapes with more than kMaxHeaderDims dims
  int64_t numel = 0;
  int32_t root = -1;        // broadcast root
  int32_t flags = 0;        // kFlagAverage, kFlagPayloadApart
  char name[kHeaderNameLen] = {0};
};

Header make_header(int32_t op, int64_t seq, const at::Tensor& t, const std::string& name,
                   int64_t round, uint64_t topo_hash);

std::string describe_shape(const Header& h);
std::string dtype_name(int32_t dtype);

// Names the fields on which `theirs` differs from `mine`, e.g.
// "shape [4, 5] vs [4, 6], dtype float32 vs float64". `ignore_first_dim`
// serves allgather, where ranks may differ in the first dimension.
std::string header_diff(const Header& mine, const Header& theirs, bool ignore_first_dim,
                        bool compare_root);

// "allreduce 'grad' on rank 3": how every error message names the call.
std::string op_where(int32_t kind, const std::string& name, int rank);

// The header agreement of a collective, shared by the MPI and NCCL backends:
// `all[r]` is rank r's header of the call (n ranks, gathered on every rank);
// raises DecommError, naming `mine`'s call on `rank` and each rank whose
// header differs from rank 0's and how (same text on every rank), unless all
// agree. The flags are header_diff's.
void check_agreement(const Header* all, int n, const Header& mine, int rank,
                     bool ignore_first_dim, bool compare_root);

// Raise DecommError on an MPI failure code, naming the call (PeerFailure for
// the ULFM classes).
void check_mpi(int code, const char* what);

// MPI_Testall that reads the per-request statuses: with MPI_ERR_IN_STATUS the
// real class is only there. Raises like check_mpi.
void testall(std::vector<MPI_Request>& reqs, int* flag, const char* what);

}  // namespace decomm
