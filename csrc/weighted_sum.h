// Fused weighted-sum kernels for neighbor_allreduce on the CPU.
//
// out = w_self * x + sum_j w_j * r_j in one pass over memory: the sum is built
// block by block in a small cache-resident accumulator, adding terms in a fixed
// order (self first, then neighbours by ascending rank) so results are bitwise
// reproducible. float16/bfloat16 accumulate in float32. `out` may alias `x`.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace decomm {

// out = w_self * x + sum_{j<k} ws[j] * rs[j], all of dtype t, one pass.
void weighted_sum(void* out, const void* x, double w_self, const void* const* rs,
                  const double* ws, int64_t k, int64_t n, c10::ScalarType t);

// True when every weight (self included) is 1/(k+1): then mean_sum applies.
bool is_uniform_mean(double w_self, const double* ws, int64_t k);

// out = (x + sum_{j<k} rs[j]) / (k+1): the sum exact in a wider accumulator, rounded once.
void mean_sum(void* out, const void* x, const void* const* rs, int64_t k, int64_t n,
              c10::ScalarType t);

// dst = w * src, both of dtype t (the scaled copy sent to one out-neighbour)
void scaled_copy(void* dst, const void* src, double w, int64_t n, c10::ScalarType t);

// outs[i] = sum_{j<k} c[i*k + j] * ins[j] for i < m (1 <= m <= kMaxLinearMapOutputs,
// k <= kMaxLinearMapTerms),
// all of dtype t and n elements, in one pass: each input and output is touched once.
// Sums run in a fixed order in the accumulator type and are rounded once. An output
// may be one of the inputs (the same memory exactly); zero coefficients are skipped.
// For updates that torch would run as several passes over model-sized buffers.
constexpr int64_t kMaxLinearMapOutputs = 4;
constexpr int64_t kMaxLinearMapTerms = 4;
void linear_map(void* const* outs, int64_t m, const void* const* ins, int64_t k, const double* c,
                int64_t n, c10::ScalarType t);

bool is_supported_float(c10::ScalarType t);

}  // namespace decomm
