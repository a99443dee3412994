#include "weighted_sum.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <stdexcept>

namespace decomm {

namespace {

// Chunks large enough that threading pays off; below it, a plain loop.
constexpr int64_t kGrain = 1 << 16;

template <typename F>
void parallel_chunks(int64_t n, F&& body) {
  if (n <= kGrain) {
    body(0, n);
  } else {
    at::parallel_for(0, n, kGrain, body);
  }
}

template <typename T>
void init_impl(void* acc_v, const void* x_v, double w, int64_t n) {
  using A = at::opmath_type<T>;
  auto* acc = static_cast<A*>(acc_v);
  const auto* x = static_cast<const T*>(x_v);
  const A wa = static_cast<A>(w);
  parallel_chunks(n, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) acc[i] = wa * static_cast<A>(x[i]);
  });
}

template <typename T>
void add_impl(void* acc_v, const void* r_v, double w, int64_t n) {
  using A = at::opmath_type<T>;
  auto* acc = static_cast<A*>(acc_v);
  const auto* r = static_cast<const T*>(r_v);
  const A wa = static_cast<A>(w);
  parallel_chunks(n, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) acc[i] += wa * static_cast<A>(r[i]);
  });
}

template <typename T>
void store_impl(void* out_v, const void* acc_v, int64_t n) {
  using A = at::opmath_type<T>;
  auto* out = static_cast<T*>(out_v);
  const auto* acc = static_cast<const A*>(acc_v);
  parallel_chunks(n, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) out[i] = static_cast<T>(acc[i]);
  });
}

template <typename T>
void scaled_copy_impl(void* dst_v, const void* src_v, double w, int64_t n) {
  using A = at::opmath_type<T>;
  auto* dst = static_cast<T*>(dst_v);
  const auto* src = static_cast<const T*>(src_v);
  const A wa = static_cast<A>(w);
  parallel_chunks(n, [&](int64_t b, int64_t e) {
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

c10::ScalarType accumulator_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Double ? c10::ScalarType::Double : c10::ScalarType::Float;
}

void weighted_init(void* acc, const void* x, double w, int64_t n, c10::ScalarType t) {
#define CALL(T) init_impl<T>(acc, x, w, n)
  DECOMM_FLOAT_SWITCH(t, CALL)
#undef CALL
}

void weighted_add(void* acc, const void* r, double w, int64_t n, c10::ScalarType t) {
#define CALL(T) add_impl<T>(acc, r, w, n)
  DECOMM_FLOAT_SWITCH(t, CALL)
#undef CALL
}

void weighted_store(void* out, const void* acc, int64_t n, c10::ScalarType t) {
#define CALL(T) store_impl<T>(out, acc, n)
  DECOMM_FLOAT_SWITCH(t, CALL)
#undef CALL
}

void scaled_copy(void* dst, const void* src, double w, int64_t n, c10::ScalarType t) {
#define CALL(T) scaled_copy_impl<T>(dst, src, w, n)
  DECOMM_FLOAT_SWITCH(t, CALL)
#undef CALL
}

}  // namespace decomm
