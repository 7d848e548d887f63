// Shared helpers for the fastrlhf CUDA kernels: dtype conversion, 16-byte vector
// loads/stores, warp reductions, and host-side argument checks.
#pragma once

// Narrow ATen headers (not ATen/ATen.h): the full header dominates compile time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <limits>

namespace fastrlhf {

// ---- scalar conversion ----------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---- 16-byte vectors: 8 halves/bf16s or 4 floats ---------------------------------------
template <typename T>
struct Vec {
  static constexpr int N = 16 / sizeof(T);
};

// Load N = 16/sizeof(T) elements from a 16-byte aligned address and widen them to fp32.
template <typename T>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[Vec<T>::N]) {
  uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) out[i] = to_float(e[i]);
}

// Round N fp32 values to T and store them as one 16-byte write.
template <typename T>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&in)[Vec<T>::N]) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) e[i] = from_float<T>(in[i]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// ---- reductions -----------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over all threads of the block (blockDim.x a multiple of 32, at most 1024).
// `scratch` holds >= 32 floats; every thread gets the total. The order of additions is
// fixed, so the result is deterministic.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < n_warps ? scratch[lane] : 0.f;
  return warp_sum(t);
}

// ---- host-side helpers ----------------------------------------------------------------
inline bool is_aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
}

// True when every stride except the last (which must be 1) is a multiple of `vec`
// elements and the base pointer is 16-byte aligned: then 16-byte loads along the last
// dimension are legal at every row start.
inline bool vector_friendly(const at::Tensor& t, int64_t vec) {
  if (t.stride(-1) != 1 || t.size(-1) % vec != 0 || !is_aligned16(t)) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) % vec != 0) return false;
  return true;
}

inline int64_t vec_elems(at::ScalarType s) { return 16 / static_cast<int64_t>(c10::elementSize(s)); }

// With FASTRLHF_CUDA_POISON=1 (set by the tests) every output and workspace starts as
// NaN, so an element that a kernel fails to write cannot pass for a correct value.
inline void poison_for_tests(at::Tensor& t) {
  const char* flag = std::getenv("FASTRLHF_CUDA_POISON");
  if (flag != nullptr && flag[0] == '1' && t.defined() && t.is_floating_point())
    t.fill_(std::numeric_limits<double>::quiet_NaN());
}

#define FASTRLHF_CHECK_CUDA(t) \
  TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor (got device ", (t).device(), ")")

#define FASTRLHF_CHECK_FLOATING(t)                                                            \
  TORCH_CHECK((t).scalar_type() == at::kHalf || (t).scalar_type() == at::kBFloat16 ||       \
                  (t).scalar_type() == at::kFloat,                                          \
              #t " must be float16, bfloat16 or float32 (got ", (t).scalar_type(), ")")

#define FASTRLHF_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

// Dispatch over the three floating dtypes with `scalar_t` bound to the CUDA type.
#define FASTRLHF_DISPATCH_FLOAT(stype, NAME, ...)                                      \
  [&] {                                                                                \
    switch (stype) {                                                                   \
      case at::kHalf: { using scalar_t = __half; return __VA_ARGS__(); }               \
      case at::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }    \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }               \
      default: TORCH_CHECK(false, NAME, ": unsupported dtype ", stype);                 \
    }                                                                                  \
  }()

#define FASTRLHF_DISPATCH_HALF(stype, NAME, ...)                                       \
  [&] {                                                                                \
    switch (stype) {                                                                   \
      case at::kHalf: { using scalar_t = __half; return __VA_ARGS__(); }               \
      case at::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }    \
      default: TORCH_CHECK(false, NAME, ": needs float16 or bfloat16 (got ", stype, ")"); \
    }                                                                                  \
  }()

}  // namespace fastrlhf
