#include "weighted_sum.h"

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace decomm {

namespace {

// Runs body(0, n) on the calling thread: the kernels are serial on purpose.
// The sum is memory-bound (one core nearly saturates bandwidth), ranks usually
// share a node's cores, and spinning up a thread pool per call measured several
// times slower at 1 MB. The [begin, end) shape keeps the bodies ready for a
// split should that ever change.
template <typename F>
void serial_range(int64_t n, F&& body) {
  body(0, n);
}

// Elements per block: the float accumulator block (8 KB) stays in L1.
constexpr int64_t kBlock = 2048;

template <typename T>
void fused_impl(void* out_v, const void* x_v, double w_self, const void* const* rs,
                const double* ws, int64_t k, int64_t n) {
  using A = at::opmath_type<T>;
  auto* out = static_cast<T*>(out_v);
  const auto* x = static_cast<const T*>(x_v);
  const A w0 = static_cast<A>(w_self);
  serial_range(n, [&](int64_t b, int64_t e) {
    A acc[kBlock];
    for (int64_t s = b; s < e; s += kBlock) {
      const int64_t m = std::min(kBlock, e - s);
      for (int64_t i = 0; i < m; ++i) acc[i] = w0 * static_cast<A>(x[s + i]);
      for (int64_t j = 0; j < k; ++j) {
        const auto* r = static_cast<const T*>(rs[j]) + s;
        const A w = static_cast<A>(ws[j]);
        for (int64_t i = 0; i < m; ++i) acc[i] += w * static_cast<A>(r[i]);
      }
      for (int64_t i = 0; i < m; ++i) out[s + i] = static_cast<T>(acc[i]);
    }
  });
}

// Uniform weights 1/m: the terms are summed first, in float64 (exact for a
// handful of float32 or half values of similar magnitude), and divided once,
// so that values already in consensus come back exactly unchanged (scaling
// each term by a rounded 1/m and adding drifts by an ulp per call).
template <typename T>
void mean_impl(void* out_v, const void* x_v, const void* const* rs, int64_t k, int64_t n) {
  auto* out = static_cast<T*>(out_v);
  const auto* x = static_cast<const T*>(x_v);
  const double m = static_cast<double>(k + 1);
  serial_range(n, [&](int64_t b, int64_t e) {
    double acc[kBlock];
    for (int64_t s = b; s < e; s += kBlock) {
      const int64_t len = std::min(kBlock, e - s);
      for (int64_t i = 0; i < len; ++i) acc[i] = static_cast<double>(x[s + i]);
      for (int64_t j = 0; j < k; ++j) {
        const auto* r = static_cast<const T*>(rs[j]) + s;
        for (int64_t i = 0; i < len; ++i) acc[i] += static_cast<double>(r[i]);
      }
      for (int64_t i = 0; i < len; ++i) out[s + i] = static_cast<T>(acc[i] / m);
    }
  });
}

template <typename T>
void scaled_copy_impl(void* dst_v, const void* src_v, double w, int64_t n) {
  using A = at::opmath_type<T>;
  auto* dst = static_cast<T*>(dst_v);
  const auto* src = static_cast<const T*>(src_v);
  const A wa = static_cast<A>(w);
  serial_range(n, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dst[i] = static_cast<T>(wa * static_cast<A>(src[i]));
  });
}

#define DECOMM_FLOAT_SWITCH(t, CALL)                          \
  switch (t) {                                                \
    case c10::ScalarType::Float: CALL(float); break;          \
    case c10::ScalarType::Double: CALL(double); break;        \
    case c10::ScalarType::Half: CALL(c10::Half); break;       \
    case c10::ScalarType::BFloat16: CALL(c10::BFloat16); break; \
    default: throw std::invalid_argument("weighted sum: unsupported dtype"); \
  }

}  // namespace

bool is_supported_float(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::Double ||
         t == c10::ScalarType::Half || t == c10::ScalarType::BFloat16;
}

void weighted_sum(void* out, const void* x, double w_self, const void* const* rs,
                  const double* ws, int64_t k, int64_t n, c10::ScalarType t) {
#define CALL(T) fused_impl<T>(out, x, w_self, rs, ws, k, n)
  DECOMM_FLOAT_SWITCH(t, CALL)
#undef CALL
}

bool is_uniform_mean(double w_self, const double* ws, int64_t k) {
  const double m = static_cast<double>(k + 1);
  auto is_inv_m = [m](double w) { return std::abs(w * m - 1.0) <= 1e-12; };
  if (!is_inv_m(w_self)) return false;
  for (int64_t j = 0; j < k; ++j)
    if (!is_inv_m(ws[j])) return false;
  return true;
}

void mean_sum(void* out, const void* x, const void* const* rs, int64_t k, int64_t n,
              c10::ScalarType t) {
#define CALL(T) mean_impl<T>(out, x, rs, k, n)
  DECOMM_FLOAT_SWITCH(t, CALL)
#undef CALL
}

void scaled_copy(void* dst, const void* src, double w, int64_t n, c10::ScalarType t) {
#define CALL(T) scaled_copy_impl<T>(dst, src, w, n)
  DECOMM_FLOAT_SWITCH(t, CALL)
#undef CALL
}

}  // namespace decomm
