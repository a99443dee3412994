// Fused weighted-sum kernels for neighbor_allreduce on CUDA devices.
//
//   out = w_self * x + sum_{j<k} ws[j] * rs[j]          (all n elements, one pass)
//
// One read of every input and one write of `out`: no temporaries, no extra
// launches per neighbour. The terms are added in a fixed order (self first, then
// rs[0], rs[1], ...) with separately rounded multiplies and adds (no FMA
// contraction), the same arithmetic as the CPU kernel in csrc/weighted_sum.cpp,
// so a result is bitwise identical on every run. float16 and bfloat16 accumulate
// in float32, float32 in float32 and float64 in float64. `out` may alias `x`
// (never an element of `rs`).
//
// Threads load 16 bytes at a time (8 halves, 4 floats, 2 doubles) when every
// pointer is 16-byte aligned; otherwise, and for the last n % (16 / size)
// elements, one element at a time.
//
// This header and weighted_sum.cu depend on the CUDA runtime only (no torch), so
// the kernel compiles with plain nvcc and can be tested or reused on its own.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace decomm {
namespace cuda {

enum class FloatType : int32_t {
  kHalf = 0,      // IEEE binary16 (__half)
  kBFloat16 = 1,  // __nv_bfloat16
  kFloat = 2,
  kDouble = 3,
};

// Neighbour inputs fused into one launch. More are handled by further passes
// over `out` (exact for float32/float64; float16/bfloat16 then round to their
// own precision once per 32 inputs).
constexpr int kMaxFusedInputs = 32;

size_t element_size(FloatType t);
const char* float_type_name(FloatType t);

// out = w_self * x + sum_{j<k} ws[j] * rs[j] on `stream`. Pointers are device
// pointers; `rs` and `ws` are host arrays of k entries (read before returning).
// Returns the launch status (cudaSuccess when n == 0).
cudaError_t weighted_sum(void* out, const void* x, double w_self, const void* const* rs,
                         const double* ws, int64_t k, int64_t n, FloatType t,
                         cudaStream_t stream);

// dst = w * src on `stream` (dst may equal src): the scaled copy sent to one
// out-neighbour, or the 1/size of an averaging allreduce.
cudaError_t scaled_copy(void* dst, const void* src, double w, int64_t n, FloatType t,
                        cudaStream_t stream);

// True when the kernel would take the 16-byte vector path for these pointers.
bool vector_path(const void* out, const void* x, const void* const* rs, int64_t k);

}  // namespace cuda
}  // namespace decomm
