#include "weighted_sum.h"

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <stdexcept>

namespace decomm {

namespace {

// The kernels are inlined into the entry points below, which are compiled twice
// where the compiler can (x86-64 GCC/Clang): for AVX2 and for the baseline, the
// loader picking one per machine. AVX2 measured 2.3x (weighted) and 2.7x (uniform
// mean) faster at 1 MB than the SSE2 baseline the wheel-style build targets. The
// loops are element-wise (no reassociation) and FMA is not enabled, so both
// versions give bitwise the same results.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define DECOMM_CLONES __attribute__((target_clones("avx2", "default")))
#define DECOMM_INLINE inline __attribute__((always_inline))
#else
#define DECOMM_CLONES
#define DECOMM_INLINE inline
#endif


// Runs body(0, n) on the calling thread: the kernels are serial on purpose.
// The sum is memory-bound (one core nearly saturates bandwidth), ranks usually
// share a node's cores, and spinning up a thread pool per call measured several
// times slower at 1 MB. The [begin, end) shape keeps the bodies ready for a
// split should that ever change.
template <typename F>
DECOMM_INLINE void serial_range(int64_t n, F&& body) {
  body(0, n);
}

// Elements per block: the float accumulator block (8 KB) stays in L1.
constexpr int64_t kBlock = 2048;

template <typename T>
DECOMM_INLINE void fused_impl(void* out_v, const void* x_v, double w_self, const void* const* rs,
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

// Uniform weights 1/m: the terms are summed first and scaled once, so that
// values already in consensus come back exactly unchanged (scaling each term by
// a rounded 1/m and adding drifts by an ulp per call). The sum is exact in a
// wider accumulator: float64 for float32, float32 for float16/bfloat16. Then a
// product by 1/m is within one accumulator ulp of the true mean - far below half
// an ulp of T - so the stored value is the mean rounded once to T (to x itself
// at consensus). float64 input has no wider type: it is summed in float64 and
// divided, which is exact at consensus whenever m * x is.
template <typename T>
struct MeanAcc {
  using type = std::conditional_t<std::is_same_v<T, float>, double, at::opmath_type<T>>;
};

template <typename T>
DECOMM_INLINE void mean_impl(void* out_v, const void* x_v, const void* const* rs, int64_t k, int64_t n) {
  using A = typename MeanAcc<T>::type;
  auto* out = static_cast<T*>(out_v);
  const auto* x = static_cast<const T*>(x_v);
  const A m = static_cast<A>(k + 1);
  const A inv_m = A(1) / m;
  serial_range(n, [&](int64_t b, int64_t e) {
    A acc[kBlock];
    for (int64_t s = b; s < e; s += kBlock) {
      const int64_t len = std::min(kBlock, e - s);
      for (int64_t i = 0; i < len; ++i) acc[i] = static_cast<A>(x[s + i]);
      for (int64_t j = 0; j < k; ++j) {
        const auto* r = static_cast<const T*>(rs[j]) + s;
        for (int64_t i = 0; i < len; ++i) acc[i] += static_cast<A>(r[i]);
      }
      if constexpr (std::is_same_v<T, double>) {
        for (int64_t i = 0; i < len; ++i) out[s + i] = acc[i] / m;
      } else {
        for (int64_t i = 0; i < len; ++i) out[s + i] = static_cast<T>(acc[i] * inv_m);
      }
    }
  });
}

template <typename T>
DECOMM_INLINE void scaled_copy_impl(void* dst_v, const void* src_v, double w, int64_t n) {
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

DECOMM_CLONES void weighted_sum(void* out, const void* x, double w_self, const void* const* rs,
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

DECOMM_CLONES void mean_sum(void* out, const void* x, const void* const* rs, int64_t k, int64_t n,
              c10::ScalarType t) {
#define CALL(T) mean_impl<T>(out, x, rs, k, n)
  DECOMM_FLOAT_SWITCH(t, CALL)
#undef CALL
}

DECOMM_CLONES void scaled_copy(void* dst, const void* src, double w, int64_t n,
                               c10::ScalarType t) {
#define CALL(T) scaled_copy_impl<T>(dst, src, w, n)
  DECOMM_FLOAT_SWITCH(t, CALL)
#undef CALL
}

}  // namespace decomm
