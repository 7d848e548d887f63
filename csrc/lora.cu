// Fused LoRA linear for decode shapes, and LoRA fuse/unfuse of the base weight.
//
// y = x·Wᵀ + b + scaling·(x·Aᵀ)·Bᵀ, W [out, in], A [r, in], B [out, r].
// Small M (<= kMaxRows tokens, i.e. decode): the product is memory bound on W, so a GEMV
// streams W once with 16-byte loads; the low-rank path is a tiny x·Aᵀ kernel followed by
// the r-term dot with B[o] folded into the same warp reduction as the base product.
// Larger M goes to cuBLAS (addmm) with the low-rank term added by one more addmm.
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>

#include "common.cuh"

namespace fastrlhf {

constexpr int kMaxRows = 8;       // GEMV path for up to this many tokens
constexpr int kGemvWarps = 4;
constexpr int kRowsPerWarp = 2;   // output features per warp (reuses the x loads)

// xa[m, j] = Σ_i x[m, i]·A[j, i] in fp32; one warp per rank row j.
template <typename T>
__global__ void lora_down_kernel(const T* __restrict__ x, const T* __restrict__ a, float* __restrict__ xa,
                                 int M, int in, int r) {
  constexpr int V = Vec<T>::N;
  const int lane = threadIdx.x & 31;
  const int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (j >= r) return;  // whole warp leaves together
  float acc[kMaxRows];
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) acc[m] = 0.f;
  for (int i = lane * V; i < in; i += 32 * V) {
    float av[V];
    load_vec(a + int64_t(j) * in + i, av);
#pragma unroll
    for (int m = 0; m < kMaxRows; ++m) {
      if (m < M) {
        float xv[V];
        load_vec(x + int64_t(m) * in + i, xv);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[m] = fmaf(av[e], xv[e], acc[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) {
    if (m < M) {
      const float s = warp_sum(acc[m]);
      if (lane == 0) xa[m * r + j] = s;
    }
  }
}

// y[m, o] = Σ_i x[m, i]·W[o, i] + bias[o] + scaling·Σ_j xa[m, j]·B[o, j]
template <typename T>
__global__ void __launch_bounds__(kGemvWarps * 32) lora_gemv_kernel(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
    const float* __restrict__ xa, const T* __restrict__ lb, float scaling, T* __restrict__ y,
    int M, int in, int out, int r) {
  constexpr int V = Vec<T>::N;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int o0 = (blockIdx.x * kGemvWarps + warp) * kRowsPerWarp;
  if (o0 >= out) return;  // warp-uniform
  float acc[kRowsPerWarp][kMaxRows];
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k)
#pragma unroll
    for (int m = 0; m < kMaxRows; ++m) acc[k][m] = 0.f;

  for (int i = lane * V; i < in; i += 32 * V) {
    float wv[kRowsPerWarp][V];
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      if (o0 + k < out) {
        load_vec(w + int64_t(o0 + k) * in + i, wv[k]);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) wv[k][e] = 0.f;
      }
    }
#pragma unroll
    for (int m = 0; m < kMaxRows; ++m) {
      if (m < M) {
        float xv[V];
        load_vec(x + int64_t(m) * in + i, xv);
#pragma unroll
        for (int k = 0; k < kRowsPerWarp; ++k)
#pragma unroll
          for (int e = 0; e < V; ++e) acc[k][m] = fmaf(wv[k][e], xv[e], acc[k][m]);
      }
    }
  }
  // Low-rank term, spread over the lanes before the one reduction.
  if (xa != nullptr) {
    for (int j = lane; j < r; j += 32) {
#pragma unroll
      for (int k = 0; k < kRowsPerWarp; ++k) {
        if (o0 + k < out) {
          const float bj = scaling * to_float(lb[int64_t(o0 + k) * r + j]);
#pragma unroll
          for (int m = 0; m < kMaxRows; ++m)
            if (m < M) acc[k][m] = fmaf(bj, xa[m * r + j], acc[k][m]);
        }
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
#pragma unroll
    for (int m = 0; m < kMaxRows; ++m) {
      if (m < M) {
        const float s = warp_sum(acc[k][m]);
        if (lane == 0 && o0 + k < out) {
          const float bv = bias ? to_float(bias[o0 + k]) : 0.f;
          y[int64_t(m) * out + o0 + k] = from_float<T>(s + bv);
        }
      }
    }
  }
}

at::Tensor lora_linear(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& lora_a, const c10::optional<at::Tensor>& lora_b,
                       double scaling) {
  FASTRLHF_CHECK_CUDA(x_in);
  FASTRLHF_CHECK_FLOATING(x_in);
  TORCH_CHECK(weight.dim() == 2 && x_in.dim() >= 1 && x_in.size(-1) == weight.size(1),
              "lora_linear: x [..., in] and weight [out, in] disagree: ", x_in.sizes(), " vs ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x_in.scalar_type(), "lora_linear: weight dtype ", weight.scalar_type(),
              " must match x dtype ", x_in.scalar_type());
  const int64_t in = weight.size(1), out = weight.size(0);
  const bool has_lora = lora_a.has_value() && lora_b.has_value() && scaling != 0.0;
  TORCH_CHECK(lora_a.has_value() == lora_b.has_value(), "lora_linear: pass both lora_a and lora_b or neither");
  int64_t r = 0;
  if (lora_a.has_value()) {
    TORCH_CHECK(lora_a->dim() == 2 && lora_b->dim() == 2 && lora_a->size(1) == in && lora_b->size(0) == out &&
                    lora_b->size(1) == lora_a->size(0),
                "lora_linear: expected lora_a [r, ", in, "] and lora_b [", out, ", r], got ", lora_a->sizes(),
                " and ", lora_b->sizes());
    TORCH_CHECK(lora_a->scalar_type() == x_in.scalar_type() && lora_b->scalar_type() == x_in.scalar_type(),
                "lora_linear: lora_a/lora_b must have x's dtype ", x_in.scalar_type());
    r = lora_a->size(0);
  }
  if (bias.has_value())
    TORCH_CHECK(bias->numel() == out && bias->scalar_type() == x_in.scalar_type(),
                "lora_linear: bias must be [", out, "] with x's dtype");
  c10::cuda::CUDAGuard guard(x_in.device());
  auto out_shape = x_in.sizes().vec();
  out_shape.back() = out;
  at::Tensor x = x_in.reshape({-1, in});
  const int64_t M = x.size(0);
  const int64_t V = vec_elems(x.scalar_type());

  // The GEMV kernels index W and A as dense [rows, in] with 16-byte loads.
  auto dense_vec = [&](const at::Tensor& t) { return t.is_contiguous() && vector_friendly(t, V); };
  const bool gemv = M <= kMaxRows && in % V == 0 && dense_vec(weight) && (!has_lora || dense_vec(*lora_a));
  if (!gemv) {  // cuBLAS for prefill/training shapes
    at::Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
    if (has_lora) y.addmm_(at::mm(x, lora_a->t()), lora_b->t(), 1.0, scaling);
    return y.reshape(out_shape);
  }
  x = x.contiguous();
  if (!vector_friendly(x, V)) x = x.clone();
  at::Tensor y = at::empty({M, out}, x.options());
  poison_for_tests(y);
  if (M == 0 || out == 0) return y.reshape(out_shape);
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor xa, lb, b = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (has_lora && r > 0) {
    xa = at::empty({M, r}, x.options().dtype(at::kFloat));
    lb = lora_b->contiguous();
    poison_for_tests(xa);
  }
  FASTRLHF_DISPATCH_FLOAT(x.scalar_type(), "lora_linear", [&] {
    if (xa.defined()) {
      lora_down_kernel<scalar_t><<<unsigned((r + 3) / 4), 128, 0, stream>>>(
          reinterpret_cast<const scalar_t*>(x.data_ptr()), reinterpret_cast<const scalar_t*>(lora_a->data_ptr()),
          xa.data_ptr<float>(), int(M), int(in), int(r));
      FASTRLHF_LAUNCH_CHECK();
    }
    const int64_t rows_per_block = kGemvWarps * kRowsPerWarp;
    lora_gemv_kernel<scalar_t><<<unsigned((out + rows_per_block - 1) / rows_per_block), kGemvWarps * 32, 0, stream>>>(
        reinterpret_cast<const scalar_t*>(x.data_ptr()), reinterpret_cast<const scalar_t*>(weight.data_ptr()),
        b.defined() ? reinterpret_cast<const scalar_t*>(b.data_ptr()) : nullptr,
        xa.defined() ? xa.data_ptr<float>() : nullptr,
        lb.defined() ? reinterpret_cast<const scalar_t*>(lb.data_ptr()) : nullptr, float(scaling),
        reinterpret_cast<scalar_t*>(y.data_ptr()), int(M), int(in), int(out), int(r));
    FASTRLHF_LAUNCH_CHECK();
  });
  return y.reshape(out_shape);
}

// ---- fuse / unfuse: out = W + scaling·B·A (fp32 math, one rounding) --------------------
constexpr int kFuseCols = 256;  // threads per block, one input column each
constexpr int kFuseRows = 16;   // output rows per block (A column reused 16 times)
constexpr int kFuseRank = 256;  // rank chunk staged in shared memory

template <typename T>
__global__ void __launch_bounds__(kFuseCols) lora_fuse_kernel(const T* w, const float* __restrict__ a,
                                                              const float* __restrict__ lb, float scaling, T* dst,
                                                              int64_t out, int64_t in, int r) {
  __shared__ float sB[kFuseRows][kFuseRank];
  const int64_t i = int64_t(blockIdx.x) * kFuseCols + threadIdx.x;
  const int64_t o0 = int64_t(blockIdx.y) * kFuseRows;
  float acc[kFuseRows];
#pragma unroll
  for (int k = 0; k < kFuseRows; ++k) acc[k] = 0.f;
  for (int r0 = 0; r0 < r; r0 += kFuseRank) {
    const int rc = min(kFuseRank, r - r0);
    __syncthreads();  // previous chunk fully consumed
    for (int idx = threadIdx.x; idx < kFuseRows * kFuseRank; idx += kFuseCols) {
      const int row = idx / kFuseRank, j = idx % kFuseRank;
      sB[row][j] = (o0 + row < out && j < rc) ? lb[(o0 + row) * r + r0 + j] : 0.f;
    }
    __syncthreads();
    if (i < in) {
      for (int j = 0; j < rc; ++j) {
        const float av = a[int64_t(r0 + j) * in + i];
#pragma unroll
        for (int k = 0; k < kFuseRows; ++k) acc[k] = fmaf(sB[k][j], av, acc[k]);
      }
    }
  }
  if (i < in) {
#pragma unroll
    for (int k = 0; k < kFuseRows; ++k) {
      const int64_t o = o0 + k;
      if (o < out) dst[o * in + i] = from_float<T>(to_float(w[o * in + i]) + scaling * acc[k]);
    }
  }
}

void lora_fuse_out(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
                   at::Tensor& out) {
  FASTRLHF_CHECK_CUDA(weight);
  FASTRLHF_CHECK_FLOATING(weight);
  TORCH_CHECK(weight.dim() == 2 && lora_a.dim() == 2 && lora_b.dim() == 2 && lora_a.size(1) == weight.size(1) &&
                  lora_b.size(0) == weight.size(0) && lora_b.size(1) == lora_a.size(0),
              "lora_fuse: expected weight [out, in], lora_a [r, in], lora_b [out, r]; got ", weight.sizes(), ", ",
              lora_a.sizes(), ", ", lora_b.sizes());
  TORCH_CHECK(out.sizes() == weight.sizes() && out.device() == weight.device(),
              "lora_fuse: out must have weight's shape and device");
  c10::cuda::CUDAGuard guard(weight.device());
  const int64_t n_out = weight.size(0), n_in = weight.size(1), r = lora_a.size(0);
  at::Tensor a = lora_a.to(at::kFloat).contiguous();
  at::Tensor lb = lora_b.to(at::kFloat).contiguous();
  at::Tensor w = weight.contiguous();
  // Write straight into `out` when it can hold the result in W's layout and dtype;
  // otherwise (other dtype, strided) compute into a temporary and copy.
  const bool direct = out.is_contiguous() && out.scalar_type() == weight.scalar_type();
  at::Tensor dst = direct ? out : at::empty_like(w);
  if (!direct) poison_for_tests(dst);  // never poison `out`: it may be the weight itself
  if (w.numel() > 0) {
    TORCH_CHECK(n_in < (int64_t(1) << 31) && (n_out + kFuseRows - 1) / kFuseRows < 65536 && r < (1 << 30),
                "lora_fuse: weight too large");
    const dim3 grid(unsigned((n_in + kFuseCols - 1) / kFuseCols), unsigned((n_out + kFuseRows - 1) / kFuseRows));
    FASTRLHF_DISPATCH_FLOAT(w.scalar_type(), "lora_fuse", [&] {
      lora_fuse_kernel<scalar_t><<<grid, kFuseCols, 0, c10::cuda::getCurrentCUDAStream()>>>(
          reinterpret_cast<const scalar_t*>(w.data_ptr()), a.data_ptr<float>(), lb.data_ptr<float>(), float(scaling),
          reinterpret_cast<scalar_t*>(dst.data_ptr()), n_out, n_in, int(r));
      FASTRLHF_LAUNCH_CHECK();
    });
  }
  if (!direct) out.copy_(dst);
}

at::Tensor lora_fuse(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling) {
  at::Tensor out = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  lora_fuse_out(weight, lora_a, lora_b, scaling, out);
  return out;
}

}  // namespace fastrlhf
