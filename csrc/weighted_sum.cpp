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
// loader picking one per machine. At 1 MB of float32 with one neighbour the AVX2
// mean measured 1.6x faster than the SSE2 baseline the wheel-style build targets
// (64 against 104 us); the weighted sum, lighter per element, is bound by memory
// and gains 1.0-1.2x. The loops are element-wise (no reassociation) and FMA is not
// enabled, so both versions give bitwise the same results.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define DECOMM_CLONES __attribute__((target_clones("avx2", "default")))
#define DECOMM_INLINE inline __attribute__((always_inline))
#else
#define DECOMM_CLONES
#define DECOMM_INLINE inline
#endif


// The kernels are serial on purpose: the sum is memory-bound (one core nearly
// saturates bandwidth), ranks usually share a node's cores, and spinning up a
// thread pool per call measured several times slower at 1 MB. They are plain
// loops in the inlined function, not a lambda handed to a range helper: GCC
// compiled such a lambda once, out of line and for the baseline only, so both
// clones ran the SSE2 loop, and a 1 MB neighbor_allreduce on 2 ranks took 290 us
// where MPI's transfer alone took 60 us.

// Up to 8 neighbours (the exponential graph and the hypercube up to 256 ranks,
// the torus, the ring, Base-(k+1) rounds) the sum runs in one pass, the term
// count a compile-time constant so that the accumulator stays in registers. More
// terms go block by block through an accumulator array in L1. Both add the same
// terms in the same order, so they give bitwise the same results. out may be x
// exactly (an element is read before it is written), hence ivdep.
// Elements per block of the general path: the float accumulator (8 KB) stays in L1.
constexpr int64_t kBlock = 2048;

template <typename T, int K>
DECOMM_INLINE void fused_fixed(T* out, const T* x, double w_self, const void* const* rs,
                               const double* ws, int64_t n) {
  using A = at::opmath_type<T>;
  const A w0 = static_cast<A>(w_self);
  const T* r[K > 0 ? K : 1];
  A w[K > 0 ? K : 1];
  for (int j = 0; j < K; ++j) {
    r[j] = static_cast<const T*>(rs[j]);
    w[j] = static_cast<A>(ws[j]);
  }
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    A acc = w0 * static_cast<A>(x[i]);
    for (int j = 0; j < K; ++j) acc += w[j] * static_cast<A>(r[j][i]);
    out[i] = static_cast<T>(acc);
  }
}

template <typename T>
DECOMM_INLINE void fused_impl(void* out_v, const void* x_v, double w_self, const void* const* rs,
                const double* ws, int64_t k, int64_t n) {
  using A = at::opmath_type<T>;
  auto* out = static_cast<T*>(out_v);
  const auto* x = static_cast<const T*>(x_v);
  switch (k) {
    case 0: return fused_fixed<T, 0>(out, x, w_self, rs, ws, n);
    case 1: return fused_fixed<T, 1>(out, x, w_self, rs, ws, n);
    case 2: return fused_fixed<T, 2>(out, x, w_self, rs, ws, n);
    case 3: return fused_fixed<T, 3>(out, x, w_self, rs, ws, n);
    case 4: return fused_fixed<T, 4>(out, x, w_self, rs, ws, n);
    case 5: return fused_fixed<T, 5>(out, x, w_self, rs, ws, n);
    case 6: return fused_fixed<T, 6>(out, x, w_self, rs, ws, n);
    case 7: return fused_fixed<T, 7>(out, x, w_self, rs, ws, n);
    case 8: return fused_fixed<T, 8>(out, x, w_self, rs, ws, n);
    default: break;
  }
  const A w0 = static_cast<A>(w_self);
  A acc[kBlock];
  for (int64_t s = 0; s < n; s += kBlock) {
    const int64_t m = std::min(kBlock, n - s);
    for (int64_t i = 0; i < m; ++i) acc[i] = w0 * static_cast<A>(x[s + i]);
    for (int64_t j = 0; j < k; ++j) {
      const auto* r = static_cast<const T*>(rs[j]) + s;
      const A w = static_cast<A>(ws[j]);
      for (int64_t i = 0; i < m; ++i) acc[i] += w * static_cast<A>(r[i]);
    }
    for (int64_t i = 0; i < m; ++i) out[s + i] = static_cast<T>(acc[i]);
  }
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

template <typename T, typename A>
DECOMM_INLINE T mean_of(A sum, A m, A inv_m) {
  if constexpr (std::is_same_v<T, double>) {
    return sum / m;
  } else {
    return static_cast<T>(sum * inv_m);
  }
}

template <typename T, int K>
DECOMM_INLINE void mean_fixed(T* out, const T* x, const void* const* rs, int64_t n) {
  using A = typename MeanAcc<T>::type;
  const A m = static_cast<A>(K + 1);
  const A inv_m = A(1) / m;
  const T* r[K];
  for (int j = 0; j < K; ++j) r[j] = static_cast<const T*>(rs[j]);
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    A acc = static_cast<A>(x[i]);
    for (int j = 0; j < K; ++j) acc += static_cast<A>(r[j][i]);
    out[i] = mean_of<T>(acc, m, inv_m);
  }
}

template <typename T>
DECOMM_INLINE void mean_impl(void* out_v, const void* x_v, const void* const* rs, int64_t k, int64_t n) {
  using A = typename MeanAcc<T>::type;
  auto* out = static_cast<T*>(out_v);
  const auto* x = static_cast<const T*>(x_v);
  switch (k) {
    case 1: return mean_fixed<T, 1>(out, x, rs, n);
    case 2: return mean_fixed<T, 2>(out, x, rs, n);
    case 3: return mean_fixed<T, 3>(out, x, rs, n);
    case 4: return mean_fixed<T, 4>(out, x, rs, n);
    case 5: return mean_fixed<T, 5>(out, x, rs, n);
    case 6: return mean_fixed<T, 6>(out, x, rs, n);
    case 7: return mean_fixed<T, 7>(out, x, rs, n);
    case 8: return mean_fixed<T, 8>(out, x, rs, n);
    default: break;
  }
  const A m = static_cast<A>(k + 1);
  const A inv_m = A(1) / m;
  A acc[kBlock];
  for (int64_t s = 0; s < n; s += kBlock) {
    const int64_t len = std::min(kBlock, n - s);
    for (int64_t i = 0; i < len; ++i) acc[i] = static_cast<A>(x[s + i]);
    for (int64_t j = 0; j < k; ++j) {
      const auto* r = static_cast<const T*>(rs[j]) + s;
      for (int64_t i = 0; i < len; ++i) acc[i] += static_cast<A>(r[i]);
    }
    for (int64_t i = 0; i < len; ++i) out[s + i] = mean_of<T>(acc[i], m, inv_m);
  }
}

template <typename T>
DECOMM_INLINE void scaled_copy_impl(void* dst_v, const void* src_v, double w, int64_t n) {
  using A = at::opmath_type<T>;
  auto* dst = static_cast<T*>(dst_v);
  const auto* src = static_cast<const T*>(src_v);
  const A wa = static_cast<A>(w);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(wa * static_cast<A>(src[i]));
}

// The accumulator is wider than T (float64 for float32), unlike the weighted sum's:
// updates such as m <- mu m + c (x0 - x) with x0 close to x cancel, and c x0 - c x
// summed in float32 would lose the difference that the unfused form computed exactly.
template <typename T>
using MapAcc = typename MeanAcc<T>::type;

// One output's non-zero terms, in input order.
template <typename T>
struct MapTerms {
  int count = 0;
  const T* in[kMaxLinearMapTerms];
  MapAcc<T> w[kMaxLinearMapTerms];
};

// y[i] = sum_j w_j x_j[i] for i < len, K terms known at compile time so that the
// loop is one vectorized pass. y may be one of the x_j exactly (an element is read
// before it is written), hence ivdep: no dependence crosses elements.
template <typename T, int K, typename Y>
DECOMM_INLINE void map_terms(Y* y, const MapTerms<T>& t, int64_t s, int64_t len) {
  using A = MapAcc<T>;
  const T* x[K];
  A w[K];
  for (int j = 0; j < K; ++j) {
    x[j] = t.in[j] + s;
    w[j] = t.w[j];
  }
#pragma GCC ivdep
  for (int64_t i = 0; i < len; ++i) {
    A acc = w[0] * static_cast<A>(x[0][i]);
    for (int j = 1; j < K; ++j) acc += w[j] * static_cast<A>(x[j][i]);
    y[i] = static_cast<Y>(acc);
  }
}

template <typename T, typename Y>
DECOMM_INLINE void map_block(Y* y, const MapTerms<T>& t, int64_t s, int64_t len) {
  switch (t.count) {
    case 0: std::fill(y, y + len, Y(0)); break;
    case 1: map_terms<T, 1>(y, t, s, len); break;
    case 2: map_terms<T, 2>(y, t, s, len); break;
    case 3: map_terms<T, 3>(y, t, s, len); break;
    default: map_terms<T, 4>(y, t, s, len); break;
  }
}

// One output: written straight through. Several: block by block, every output's
// block summed into its own accumulator before any output is written, so an output
// may be an input of another (the update "x, h <- x + h, x").
constexpr int64_t kMapBlock = 512;

template <typename T>
DECOMM_INLINE void linear_map_impl(void* const* outs, int64_t m, const void* const* ins,
                                   int64_t k, const double* c, int64_t n) {
  using A = MapAcc<T>;
  MapTerms<T> terms[kMaxLinearMapOutputs];
  for (int64_t o = 0; o < m; ++o)
    for (int64_t j = 0; j < k; ++j)
      if (c[o * k + j] != 0.0) {  // an input this output does not read
        auto& t = terms[o];
        t.in[t.count] = static_cast<const T*>(ins[j]);
        t.w[t.count] = static_cast<A>(c[o * k + j]);
        ++t.count;
      }
  if (m == 1) {
    map_block<T>(static_cast<T*>(outs[0]), terms[0], 0, n);
    return;
  }
  A acc[kMaxLinearMapOutputs][kMapBlock];
  for (int64_t s = 0; s < n; s += kMapBlock) {
    const int64_t len = std::min(kMapBlock, n - s);
    for (int64_t o = 0; o < m; ++o) map_block<T>(acc[o], terms[o], s, len);
    for (int64_t o = 0; o < m; ++o) {
      auto* y = static_cast<T*>(outs[o]) + s;
      for (int64_t i = 0; i < len; ++i) y[i] = static_cast<T>(acc[o][i]);
    }
  }
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

DECOMM_CLONES void linear_map(void* const* outs, int64_t m, const void* const* ins, int64_t k,
                              const double* c, int64_t n, c10::ScalarType t) {
  if (m < 1 || m > kMaxLinearMapOutputs || k > kMaxLinearMapTerms)
    throw std::invalid_argument("linear map: 1 to 4 outputs of at most 4 inputs");
#define CALL(T) linear_map_impl<T>(outs, m, ins, k, c, n)
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
