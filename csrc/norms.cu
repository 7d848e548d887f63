// Fused RMSNorm / LayerNorm over the last dimension, optionally adding a residual first.
//
// One block per row. With a residual, h = x + residual is rounded to the input dtype
// (that is what the next layer sees), written out, and the norm is taken of the rounded h,
// exactly as the torch reference does. Statistics are fp32; LayerNorm uses two passes
// (mean, then centred squares) so a large mean does not cancel the variance away.
// Later passes re-read the row, which is then hot in L1/L2.
#include "common.cuh"

namespace fastrlhf {

// NV elements per step: a 16-byte vector when the row allows it, else 1 (scalar path).
template <typename T, int NV>
__device__ __forceinline__ void load_n(const T* p, float (&v)[NV]) {
  if constexpr (NV == Vec<T>::N) {
    load_vec(p, v);
  } else {
#pragma unroll
    for (int e = 0; e < NV; ++e) v[e] = to_float(p[e]);
  }
}

template <typename T, int NV>
__device__ __forceinline__ void store_n(T* p, const float (&v)[NV]) {
  if constexpr (NV == Vec<T>::N) {
    store_vec(p, v);
  } else {
#pragma unroll
    for (int e = 0; e < NV; ++e) p[e] = from_float<T>(v[e]);
  }
}

// Load NV elements of h = x (+ residual, rounded to T); writes h_out when given.
template <typename T, int NV>
__device__ __forceinline__ void load_h(const T* x, const T* res, T* h_out, int64_t i, float (&v)[NV]) {
  load_n<T, NV>(x + i, v);
  if (res != nullptr) {
    float rv[NV];
    load_n<T, NV>(res + i, rv);
#pragma unroll
    for (int e = 0; e < NV; ++e) v[e] = to_float(from_float<T>(v[e] + rv[e]));
    store_n<T, NV>(h_out + i, v);
  }
}

template <typename T, typename W, int NV, bool RMS>
__global__ void norm_kernel(const T* __restrict__ x, const T* __restrict__ res, const W* __restrict__ weight,
                            const W* __restrict__ bias, T* __restrict__ y, T* __restrict__ h, int64_t n,
                            float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * n;
  const T* rr = res ? res + row * n : nullptr;
  T* hr = h ? h + row * n : nullptr;
  T* yr = y + row * n;
  const int64_t step = int64_t(blockDim.x) * NV;

  // Pass 1: h (written once) and its sum (LayerNorm) or sum of squares (RMSNorm).
  float s1 = 0.f;
  for (int64_t i = int64_t(threadIdx.x) * NV; i < n; i += step) {
    float v[NV];
    load_h<T, NV>(xr, rr, hr, i, v);
#pragma unroll
    for (int e = 0; e < NV; ++e) s1 += RMS ? v[e] * v[e] : v[e];
  }
  s1 = block_sum(s1, scratch);
  // h was written by this block's threads; make it visible before the re-reads below.
  if (hr) __syncthreads();
  const T* src = hr ? hr : xr;

  float mean = 0.f, rstd;
  if (RMS) {
    rstd = rsqrtf(s1 / float(n) + eps);
  } else {
    mean = s1 / float(n);
    float s2 = 0.f;
    for (int64_t i = int64_t(threadIdx.x) * NV; i < n; i += step) {
      float v[NV];
      load_n<T, NV>(src + i, v);
#pragma unroll
      for (int e = 0; e < NV; ++e) s2 += (v[e] - mean) * (v[e] - mean);
    }
    s2 = block_sum(s2, scratch);
    rstd = rsqrtf(s2 / float(n) + eps);
  }

  for (int64_t i = int64_t(threadIdx.x) * NV; i < n; i += step) {
    float v[NV];
    load_n<T, NV>(src + i, v);
#pragma unroll
    for (int e = 0; e < NV; ++e) {
      float o = (v[e] - mean) * rstd;
      if (weight) o *= to_float(weight[i + e]);
      if (bias) o += to_float(bias[i + e]);
      v[e] = o;
    }
    store_n<T, NV>(yr + i, v);
  }
}

// Shared host path of rms_norm / layer_norm (bias undefined for RMSNorm).
static std::tuple<at::Tensor, at::Tensor> norm_forward(const char* name, bool rms, const at::Tensor& x_in,
                                                      const c10::optional<at::Tensor>& weight,
                                                      const c10::optional<at::Tensor>& bias,
                                                      const c10::optional<at::Tensor>& residual, double eps) {
  FASTRLHF_CHECK_CUDA(x_in);
  FASTRLHF_CHECK_FLOATING(x_in);
  TORCH_CHECK(x_in.dim() >= 1, name, ": x must have at least one dimension");
  const int64_t n = x_in.size(-1);
  const auto wdtype = weight.has_value() ? weight->scalar_type() : (bias.has_value() ? bias->scalar_type() : x_in.scalar_type());
  for (const auto* p : {&weight, &bias}) {
    if (p->has_value()) {
      TORCH_CHECK((*p)->numel() == n, name, ": weight/bias must have ", n, " elements, got ", (*p)->sizes());
      TORCH_CHECK((*p)->scalar_type() == wdtype && (wdtype == x_in.scalar_type() || wdtype == at::kFloat), name,
                  ": weight/bias must be float32 or x's dtype ", x_in.scalar_type(), " (and the same)");
    }
  }
  if (residual.has_value())
    TORCH_CHECK(residual->sizes() == x_in.sizes() && residual->scalar_type() == x_in.scalar_type(), name,
                ": residual must match x in shape and dtype");
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous();
  at::Tensor res = residual.has_value() ? residual->contiguous() : at::Tensor();
  at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty_like(x);
  at::Tensor h = res.defined() ? at::empty_like(x) : at::Tensor();
  poison_for_tests(y);
  poison_for_tests(h);
  const int64_t rows = n > 0 ? x.numel() / n : 0;
  if (rows == 0 || n == 0) return {y, h};
  TORCH_CHECK(rows < (int64_t(1) << 31), name, ": too many rows");
  const int64_t V = vec_elems(x.scalar_type());
  const bool vec = n % V == 0 && is_aligned16(x) && (!res.defined() || is_aligned16(res));
  const int64_t per_thread = vec ? V : 1;
  const int threads = int(std::min<int64_t>(1024, std::max<int64_t>(32, ((n / per_thread + 31) / 32) * 32)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  FASTRLHF_DISPATCH_FLOAT(x.scalar_type(), name, [&] {
    auto go = [&](auto w_tag, auto nv_tag, auto rms_tag) {
      using W = decltype(w_tag);
      constexpr int NV = decltype(nv_tag)::value;
      constexpr bool RMS = decltype(rms_tag)::value;
      norm_kernel<scalar_t, W, NV, RMS><<<unsigned(rows), threads, 0, stream>>>(
          reinterpret_cast<const scalar_t*>(x.data_ptr()),
          res.defined() ? reinterpret_cast<const scalar_t*>(res.data_ptr()) : nullptr,
          w.defined() ? reinterpret_cast<const W*>(w.data_ptr()) : nullptr,
          b.defined() ? reinterpret_cast<const W*>(b.data_ptr()) : nullptr,
          reinterpret_cast<scalar_t*>(y.data_ptr()), h.defined() ? reinterpret_cast<scalar_t*>(h.data_ptr()) : nullptr,
          n, float(eps));
      FASTRLHF_LAUNCH_CHECK();
    };
    auto by_kind = [&](auto w_tag, auto nv_tag) {
      if (rms) go(w_tag, nv_tag, std::true_type{});
      else go(w_tag, nv_tag, std::false_type{});
    };
    auto by_width = [&](auto w_tag) {
      if (vec) by_kind(w_tag, std::integral_constant<int, Vec<scalar_t>::N>{});
      else by_kind(w_tag, std::integral_constant<int, 1>{});
    };
    if (wdtype == at::kFloat) by_width(float{});
    else by_width(scalar_t{});
  });
  return {y, h};
}

at::Tensor rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& weight, double eps) {
  return std::get<0>(norm_forward("rms_norm", true, x, weight, c10::nullopt, c10::nullopt, eps));
}

std::tuple<at::Tensor, at::Tensor> rms_norm_residual(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                                     double eps, const at::Tensor& residual) {
  return norm_forward("rms_norm", true, x, weight, c10::nullopt, residual, eps);
}

at::Tensor layer_norm(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias, double eps) {
  return std::get<0>(norm_forward("layer_norm", false, x, weight, bias, c10::nullopt, eps));
}

std::tuple<at::Tensor, at::Tensor> layer_norm_residual(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                                       const c10::optional<at::Tensor>& bias, double eps,
                                                       const at::Tensor& residual) {
  return norm_forward("layer_norm", false, x, weight, bias, residual, eps);
}

}  // namespace fastrlhf
