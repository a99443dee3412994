// Fused weighted-sum kernels on CUDA devices; see weighted_sum.cuh.
#include "weighted_sum.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>

namespace decomm {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kMaxDevices = 64;

// Per element type: the accumulator type, conversions, and the arithmetic.
// Multiplies and adds are rounded separately (__fmul_rn / __fadd_rn are never
// contracted into an FMA), matching the CPU kernel's arithmetic.
template <typename T>
struct Math;

template <>
struct Math<float> {
  using Acc = float;
  __device__ __forceinline__ static Acc load(float v) { return v; }
  __device__ __forceinline__ static float store(Acc a) { return a; }
  __device__ __forceinline__ static Acc mul(Acc a, Acc b) { return __fmul_rn(a, b); }
  __device__ __forceinline__ static Acc add(Acc a, Acc b) { return __fadd_rn(a, b); }
};

template <>
struct Math<double> {
  using Acc = double;
  __device__ __forceinline__ static Acc load(double v) { return v; }
  __device__ __forceinline__ static double store(Acc a) { return a; }
  __device__ __forceinline__ static Acc mul(Acc a, Acc b) { return __dmul_rn(a, b); }
  __device__ __forceinline__ static Acc add(Acc a, Acc b) { return __dadd_rn(a, b); }
};

template <>
struct Math<__half> {
  using Acc = float;
  __device__ __forceinline__ static Acc load(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half store(Acc a) { return __float2half_rn(a); }
  __device__ __forceinline__ static Acc mul(Acc a, Acc b) { return __fmul_rn(a, b); }
  __device__ __forceinline__ static Acc add(Acc a, Acc b) { return __fadd_rn(a, b); }
};

template <>
struct Math<__nv_bfloat16> {
  using Acc = float;
  __device__ __forceinline__ static Acc load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 store(Acc a) { return __float2bfloat16_rn(a); }
  __device__ __forceinline__ static Acc mul(Acc a, Acc b) { return __fmul_rn(a, b); }
  __device__ __forceinline__ static Acc add(Acc a, Acc b) { return __fadd_rn(a, b); }
};

// The neighbour inputs of one launch, passed by value as a kernel parameter
// (at most 32 * (8 + 8) = 512 bytes, well inside the 4 KB parameter limit).
template <typename A>
struct Terms {
  const void* r[kMaxFusedInputs];
  A w[kMaxFusedInputs];
};

// V consecutive elements, aligned so that one load or store moves all of them
// (16 bytes for the vector path: ld.global.v4.b32 / v2.f64).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// One element, for the tail and for misaligned inputs.
template <typename T, int K>
__device__ __forceinline__ void one_element(T* out, const T* x, typename Math<T>::Acc w0,
                                            const Terms<typename Math<T>::Acc>& terms, int k,
                                            int64_t i) {
  using M = Math<T>;
  typename M::Acc acc = M::mul(w0, M::load(x[i]));
  const int kk = K >= 0 ? K : k;
#pragma unroll
  for (int j = 0; j < kk; ++j) {
    acc = M::add(acc, M::mul(terms.w[j], M::load(static_cast<const T*>(terms.r[j])[i])));
  }
  out[i] = M::store(acc);
}

// Packs [0, npacks) of V elements each, then elements [tail_begin, n) one by one.
// K >= 0 fixes the number of neighbour inputs at compile time (fully unrolled:
// all loads of a pack are issued before the first add); K = -1 reads it from k.
template <typename T, int V, int K>
__global__ void __launch_bounds__(kThreads)
fused_kernel(T* out, const T* x, typename Math<T>::Acc w0, Terms<typename Math<T>::Acc> terms,
             int k, int64_t npacks, int64_t tail_begin, int64_t n) {
  using M = Math<T>;
  using A = typename M::Acc;
  using P = Pack<T, V>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int kk = K >= 0 ? K : k;
  for (int64_t i = tid; i < npacks; i += stride) {
    const P xp = reinterpret_cast<const P*>(x)[i];
    A acc[V];
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] = M::mul(w0, M::load(xp.v[e]));
#pragma unroll(K >= 0 ? (K > 0 ? K : 1) : 4)
    for (int j = 0; j < kk; ++j) {
      const P rp = reinterpret_cast<const P*>(terms.r[j])[i];
      const A w = terms.w[j];
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = M::add(acc[e], M::mul(w, M::load(rp.v[e])));
    }
    P op;
#pragma unroll
    for (int e = 0; e < V; ++e) op.v[e] = M::store(acc[e]);
    reinterpret_cast<P*>(out)[i] = op;
  }
  for (int64_t i = tail_begin + tid; i < n; i += stride) {
    one_element<T, K>(out, x, w0, terms, k, i);
  }
}

// Enough blocks to fill every SM once; larger inputs are covered by the grid-stride loop.
int max_blocks() {
  static std::atomic<int> cache[kMaxDevices];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return 1024;
  int b = cache[dev].load(std::memory_order_relaxed);
  if (b > 0) return b;
  int sms = 0, per_sm = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, dev) !=
          cudaSuccess) {
    cudaGetLastError();  // clear, and fall back to a fixed grid
    return 1024;
  }
  b = std::max(1, sms * std::max(1, per_sm / kThreads));
  cache[dev].store(b, std::memory_order_relaxed);
  return b;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T, int V, int K>
void launch_k(T* out, const T* x, typename Math<T>::Acc w0,
              const Terms<typename Math<T>::Acc>& terms, int k, int64_t n,
              cudaStream_t stream) {
  const int64_t npacks = V > 1 ? n / V : 0;
  const int64_t tail_begin = npacks * V;
  const int64_t work = std::max<int64_t>(npacks, n - tail_begin);
  const int64_t want = (work + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, max_blocks())));
  fused_kernel<T, V, K><<<blocks, kThreads, 0, stream>>>(out, x, w0, terms, k, npacks,
                                                         tail_begin, n);
}

// Small neighbour counts (the common case: a few peers per round) get a fully
// unrolled kernel; the rest share one with a runtime loop.
template <typename T, int V>
void launch(T* out, const T* x, typename Math<T>::Acc w0,
            const Terms<typename Math<T>::Acc>& terms, int k, int64_t n, cudaStream_t stream) {
  switch (k) {
    case 0: launch_k<T, V, 0>(out, x, w0, terms, k, n, stream); break;
    case 1: launch_k<T, V, 1>(out, x, w0, terms, k, n, stream); break;
    case 2: launch_k<T, V, 2>(out, x, w0, terms, k, n, stream); break;
    case 3: launch_k<T, V, 3>(out, x, w0, terms, k, n, stream); break;
    case 4: launch_k<T, V, 4>(out, x, w0, terms, k, n, stream); break;
    default: launch_k<T, V, -1>(out, x, w0, terms, k, n, stream); break;
  }
}

template <typename T>
cudaError_t weighted_sum_t(void* out_v, const void* x_v, double w_self, const void* const* rs,
                           const double* ws, int64_t k, int64_t n, cudaStream_t stream) {
  using A = typename Math<T>::Acc;
  constexpr int V = static_cast<int>(16 / sizeof(T));
  auto* out = static_cast<T*>(out_v);
  const T* src = static_cast<const T*>(x_v);
  A w0 = static_cast<A>(w_self);
  int64_t done = 0;
  do {
    const int chunk = static_cast<int>(std::min<int64_t>(k - done, kMaxFusedInputs));
    Terms<A> terms{};
    bool vec = aligned16(out) && aligned16(src);
    for (int j = 0; j < chunk; ++j) {
      terms.r[j] = rs[done + j];
      terms.w[j] = static_cast<A>(ws[done + j]);
      vec = vec && aligned16(rs[done + j]);
    }
    if (vec) {
      launch<T, V>(out, src, w0, terms, chunk, n, stream);
    } else {
      launch<T, 1>(out, src, w0, terms, chunk, n, stream);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    // Further passes add the next inputs onto what is already in `out`.
    done += chunk;
    src = out;
    w0 = static_cast<A>(1);
  } while (done < k);
  return cudaSuccess;
}

}  // namespace

size_t element_size(FloatType t) {
  switch (t) {
    case FloatType::kHalf: return 2;
    case FloatType::kBFloat16: return 2;
    case FloatType::kFloat: return 4;
    case FloatType::kDouble: return 8;
  }
  return 0;
}

const char* float_type_name(FloatType t) {
  switch (t) {
    case FloatType::kHalf: return "float16";
    case FloatType::kBFloat16: return "bfloat16";
    case FloatType::kFloat: return "float32";
    case FloatType::kDouble: return "float64";
  }
  return "unknown";
}

bool vector_path(const void* out, const void* x, const void* const* rs, int64_t k) {
  bool ok = aligned16(out) && aligned16(x);
  for (int64_t j = 0; j < k && ok; ++j) ok = aligned16(rs[j]);
  return ok;
}

cudaError_t weighted_sum(void* out, const void* x, double w_self, const void* const* rs,
                         const double* ws, int64_t k, int64_t n, FloatType t,
                         cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (k < 0 || (k > 0 && (rs == nullptr || ws == nullptr))) return cudaErrorInvalidValue;
  switch (t) {
    case FloatType::kHalf: return weighted_sum_t<__half>(out, x, w_self, rs, ws, k, n, stream);
    case FloatType::kBFloat16:
      return weighted_sum_t<__nv_bfloat16>(out, x, w_self, rs, ws, k, n, stream);
    case FloatType::kFloat: return weighted_sum_t<float>(out, x, w_self, rs, ws, k, n, stream);
    case FloatType::kDouble: return weighted_sum_t<double>(out, x, w_self, rs, ws, k, n, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t scaled_copy(void* dst, const void* src, double w, int64_t n, FloatType t,
                        cudaStream_t stream) {
  return weighted_sum(dst, src, w, nullptr, nullptr, 0, n, t, stream);
}

}  // namespace cuda
}  // namespace decomm
