// What the MPI backend's engine (csrc/mpi_backend.cpp) and its op families
// (csrc/ops/*.cpp) share: the message tags, the scratch-buffer pool, small
// helpers, and the single-request op that every collective runs as.
// Internal to decomm._C; not part of any public header.
#pragma once

#include "mpi_backend.h"

#include <algorithm>
#include <climits>
#include <string>
#include <vector>

namespace decomm {
namespace detail {

// Point-to-point tags. Every neighbour-op message is tagged with the sender's
// call number (p2p_seq_), in one of three ranges: the header (with the
// payload when small), the large payload of neighbor_allreduce, and the data
// of neighbor_allgather. A receive for call s therefore only ever matches a
// message of call s: whatever a failed or mismatched call leaves in flight
// cannot pair with a later call, and is drained (see MpiBackend::housekeeping).
// neighbor_allreduce and neighbor_allgather share the header range, so a rank
// making one while its neighbour makes the other gets a clear error.
constexpr int kTagBye = 105;  // "this rank has shut down after N calls"
constexpr int kTagSeqBase = 1000;
constexpr uint32_t kByeMagic = 0xDEC0B1E5u;
// Width of each tag range: clamped at backend construction to what MPI_TAG_UB allows.
extern int64_t g_tag_span;
inline int head_tag(int64_t seq) { return kTagSeqBase + static_cast<int>(seq % g_tag_span); }
inline int bulk_tag(int64_t seq) {
  return kTagSeqBase + static_cast<int>(g_tag_span + seq % g_tag_span);
}
inline int ng_data_tag(int64_t seq) {
  return kTagSeqBase + static_cast<int>(2 * g_tag_span + seq % g_tag_span);
}

// The largest message on a header tag: a neighbor_allreduce payload of up to
// kMaxStagedPayload bytes travels staged behind its header. Every receive on a
// header tag has room for that much, whatever this rank expects: a message longer
// than its receive must never reach one, because Open MPI 5's shared-memory
// transport then writes the whole message past the buffer (measured: a 64176-byte
// message into a 60176-byte receive wrote 4000 bytes beyond it, and reported
// MPI_ERR_TRUNCATE only afterwards).
constexpr int64_t kMaxStagedPayload = 64 << 10;
constexpr int64_t kHeadCapacity = static_cast<int64_t>(sizeof(Header)) + kMaxStagedPayload;

// MPI counts are C ints: one message carries at most 2^31-1 bytes here.
int checked_count(int64_t nbytes, const std::string& what, int rank);

// Payloads are sent as messages of at most g_max_chunk bytes (2^31-1 rounded down
// to 4 KiB; DECOMM_MAX_CHUNK_BYTES sets less, for tests; every rank must use the
// same), so a tensor of any size travels. Messages of one source, tag and
// communicator are matched in the order they were sent, so the chunks pair up.
extern int64_t g_max_chunk;

// The chunks of a payload of `total` units, at most `per` units each (one chunk
// for an empty payload, so both sides still pair one message): how many, and
// post(k, offset, count) for each, in order.
inline int64_t chunk_count(int64_t total, int64_t per) {
  return std::max<int64_t>(1, (total + per - 1) / per);
}
template <typename Post>
void for_each_chunk(int64_t total, int64_t per, Post&& post) {
  const int64_t chunks = chunk_count(total, per);
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t lo = k * per;
    post(k, lo, static_cast<int>(std::min(per, total - lo)));
  }
}

void isend_chunks(const void* buf, int64_t nbytes, int peer, int tag, MPI_Comm comm,
                  std::vector<MPI_Request>& reqs);
void irecv_chunks(void* buf, int64_t nbytes, int peer, int tag, MPI_Comm comm,
                  std::vector<MPI_Request>& reqs);

// "[1, 4, 7]"
std::string join_ranks(const std::vector<int64_t>& v);

// Scratch buffers are reused across calls: training repeats the same sizes
// every step, and fresh large allocations pay page faults on every call.
// get() returns a byte tensor of at least max(nbytes, 1) bytes; put() hands it
// back under the same size. The pool holds at most pool_limit() bytes (1 GiB),
// evicting the least recently returned buffers first.
at::Tensor pool_get(int64_t nbytes);
void pool_put(at::Tensor t, int64_t nbytes);
std::vector<int64_t> pool_sizes();  // the cached buffers' sizes, ascending
int64_t pool_limit();
void set_pool_limit(int64_t bytes);

}  // namespace detail

// A neighbour op: what it still waits for, said one way for every op family.
// waiting() lists the in-neighbours whose message has not arrived (with
// `headers_only`, only those whose header has not: the others made this call
// and their payload is on its way) and the out-neighbours whose send is not done.
class NeighborOp : public Op {
 public:
  ~NeighborOp() override {
    if (!finished_.load()) return;  // abandoned: MPI may still own the buffers
    for (auto& b : pooled_) detail::pool_put(b.first, b.second);
  }

 protected:
  using Op::Op;

  // A scratch buffer from the pool, kept alive while MPI may use it and returned
  // to the pool when the op is destroyed after finishing.
  at::Tensor borrow(int64_t nbytes) {
    at::Tensor t = detail::pool_get(nbytes);
    pooled_.emplace_back(t, nbytes);
    keep_alive_.push_back(t);
    return t;
  }

  virtual void waiting(bool headers_only, std::vector<int64_t>& in,
                       std::vector<int64_t>& out) const = 0;

  std::string pending() const override {
    std::vector<int64_t> in, out;
    waiting(false, in, out);
    std::string s;
    if (!in.empty()) s = "in-neighbour(s) " + detail::join_ranks(in) + " to send";
    if (!out.empty())
      s += (in.empty() ? "" : " and ") + std::string("out-neighbour(s) ") +
           detail::join_ranks(out) + " to receive";
    return s;
  }

  std::string departed() const override {
    std::vector<int64_t> in, out;
    waiting(true, in, out);
    in.insert(in.end(), out.begin(), out.end());
    return be_->departed_peers(in, seq_, true);
  }

 private:
  std::vector<std::pair<at::Tensor, int64_t>> pooled_;
};

// MPI_I* collectives (allreduce, broadcast, allgather, barrier, the header
// gather of check_collective): one request, or one per chunk of a large
// payload. With `average`, the result is divided by the world size once every
// request completes.
class CollectiveOp : public Op {
 public:
  CollectiveOp(MpiBackend* be, int32_t kind, const std::string& name, at::Tensor out,
               bool average, int64_t seq, int64_t requests = 1)
      : Op(be, kind, name, seq), out_(std::move(out)), average_(average) {
    reqs_.assign(static_cast<size_t>(requests), MPI_REQUEST_NULL);
  }
  MPI_Request* request(int64_t k = 0) { return &reqs_[static_cast<size_t>(k)]; }

 protected:
  bool step() override;
  std::string pending() const override {
    return "the other ranks to join (every rank must make the same collective call)";
  }
  std::string departed() const override;
  // A pending collective cannot be cancelled; leave it to the dying job.
  void abandon_requests() override {}

 private:
  at::Tensor out_;
  bool average_;
};

}  // namespace decomm
