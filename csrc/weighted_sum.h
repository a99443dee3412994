// Fused weighted-sum kernels for neighbor_allreduce on the CPU.
//
// out = w_self * x + sum_j w_j * r_j is built in a fixed order (self first,
// then neighbours by ascending rank) so results are bitwise reproducible, and
// one neighbour at a time as its message lands, so the arithmetic overlaps the
// network. float16/bfloat16 accumulate in float32.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace decomm {

// dtype of the accumulator used for inputs of dtype `t`.
c10::ScalarType accumulator_dtype(c10::ScalarType t);

// acc = w * x   (acc has accumulator_dtype(t), x has t)
void weighted_init(void* acc, const void* x, double w, int64_t n, c10::ScalarType t);
// acc += w * r
void weighted_add(void* acc, const void* r, double w, int64_t n, c10::ScalarType t);
// out = acc, converted to t
void weighted_store(void* out, const void* acc, int64_t n, c10::ScalarType t);
// dst = w * src, both of dtype t (the scaled copy sent to one out-neighbour)
void scaled_copy(void* dst, const void* src, double w, int64_t n, c10::ScalarType t);

bool is_supported_float(c10::ScalarType t);

}  // namespace decomm
