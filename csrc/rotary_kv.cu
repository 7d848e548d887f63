// Rotary embedding (rotate-half, in place, fp32 cos/sin tables, partial rotary, per-token
// positions) and KV-cache append. Both work on arbitrary strides, so the engine can pass
// views (e.g. q/k slices of a fused QKV projection) without copies.
#include "common.cuh"

namespace fastrlhf {

struct Strides4 {
  int64_t b, h, s, d;
};

static Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// One block per (batch, token): all q and k heads of that token; pairs (i, i + half).
template <typename T>
__global__ void rotary_kernel(T* q, Strides4 qs, int hq, T* k, Strides4 ks, int hk, const float* __restrict__ cos,
                              const float* __restrict__ sin, int64_t tab_stride, int64_t max_pos,
                              const int64_t* __restrict__ pos, int64_t pos_sb, int64_t pos_ss, int S, int half) {
  const int b = blockIdx.x / S, s = blockIdx.x % S;
  const int64_t p = pos[b * pos_sb + s * pos_ss];
  if (p < 0 || p >= max_pos) return;  // outside the table: left untouched (documented)
  const float* c = cos + p * tab_stride;
  const float* sn = sin + p * tab_stride;
  const int total = (hq + hk) * half;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int head = idx / half, i = idx % half;
    const bool is_q = head < hq;
    const Strides4& st = is_q ? qs : ks;
    T* base = is_q ? q + b * st.b + int64_t(head) * st.h + s * st.s
                   : k + b * st.b + int64_t(head - hq) * st.h + s * st.s;
    const float x1 = to_float(base[i * st.d]);
    const float x2 = to_float(base[(i + half) * st.d]);
    const float cv = c[i], sv = sn[i];
    base[i * st.d] = from_float<T>(x1 * cv - x2 * sv);
    base[(i + half) * st.d] = from_float<T>(x2 * cv + x1 * sv);
  }
}

void rotary_(at::Tensor& q, at::Tensor& k, const at::Tensor& cos_in, const at::Tensor& sin_in,
             const at::Tensor& positions, int64_t rotary_dim) {
  FASTRLHF_CHECK_CUDA(q);
  FASTRLHF_CHECK_FLOATING(q);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "rotary: q and k must be [B, H, S, D]");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "rotary: q and k must share a dtype");
  const int64_t B = q.size(0), S = q.size(2), D = q.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(2) == S && k.size(3) == D, "rotary: k ", k.sizes(),
              " does not match q ", q.sizes(), " in batch, sequence or head dim");
  const int64_t rd = rotary_dim < 0 ? D : rotary_dim;  // -1: the whole head dim
  TORCH_CHECK(rd % 2 == 0 && rd <= D, "rotary: rotary_dim ", rd, " must be even and <= head dim ", D);
  const int64_t half = rd / 2;
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == B && positions.size(1) == S,
              "rotary: positions must be [B, S] = [", B, ", ", S, "], got ", positions.sizes());
  TORCH_CHECK(cos_in.dim() == 2 && sin_in.sizes() == cos_in.sizes() && cos_in.size(1) >= half,
              "rotary: cos/sin must be equal tables [max_pos, >= rotary_dim/2 = ", half, "], got ", cos_in.sizes(),
              " and ", sin_in.sizes());
  c10::cuda::CUDAGuard guard(q.device());
  // The tables are fp32 by contract; other dtypes are widened (a copy) rather than refused.
  at::Tensor cos = cos_in.to(q.device(), at::kFloat).contiguous();
  at::Tensor sin = sin_in.to(q.device(), at::kFloat).contiguous();
  at::Tensor pos = positions.to(q.device(), at::kLong);
  if (B * S == 0 || half == 0) return;
  TORCH_CHECK(B * S < (int64_t(1) << 31), "rotary: too many tokens");
  const int threads = int(std::min<int64_t>(256, ((q.size(1) + k.size(1)) * half + 31) / 32 * 32));
  FASTRLHF_DISPATCH_FLOAT(q.scalar_type(), "rotary", [&] {
    rotary_kernel<scalar_t><<<unsigned(B * S), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<scalar_t*>(q.data_ptr()), strides_of(q), int(q.size(1)),
        reinterpret_cast<scalar_t*>(k.data_ptr()), strides_of(k), int(k.size(1)), cos.data_ptr<float>(),
        sin.data_ptr<float>(), cos.stride(0), cos.size(0), pos.data_ptr<int64_t>(), pos.stride(0), pos.stride(1),
        int(S), int(half));
    FASTRLHF_LAUNCH_CHECK();
  });
}

// One block per (batch, kv head, new token): copy D features of k and v.
template <typename T>
__global__ void kv_append_kernel(T* kc, Strides4 kcs, T* vc, Strides4 vcs, const T* __restrict__ k, Strides4 ks,
                                 const T* __restrict__ v, Strides4 vs, const int64_t* __restrict__ pos, int H, int Tn,
                                 int D, int64_t smax) {
  const int t = blockIdx.x % Tn;
  const int h = (blockIdx.x / Tn) % H;
  const int b = blockIdx.x / (Tn * H);
  const int64_t p = pos[b] + t;
  if (p < 0 || p >= smax) return;  // past the cache: dropped (the caller sizes the cache)
  T* kd = kc + b * kcs.b + int64_t(h) * kcs.h + p * kcs.s;
  T* vd = vc + b * vcs.b + int64_t(h) * vcs.h + p * vcs.s;
  const T* kr = k + b * ks.b + int64_t(h) * ks.h + int64_t(t) * ks.s;
  const T* vr = v + b * vs.b + int64_t(h) * vs.h + int64_t(t) * vs.s;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    kd[d * kcs.d] = kr[d * ks.d];
    vd[d * vcs.d] = vr[d * vs.d];
  }
}

void kv_cache_append_(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k_in, const at::Tensor& v_in,
                      const at::Tensor& positions) {
  FASTRLHF_CHECK_CUDA(k_cache);
  FASTRLHF_CHECK_FLOATING(k_cache);
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "kv_cache_append: caches must be equal [B, Hkv, Smax, D] tensors");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "kv_cache_append: caches must share a dtype");
  TORCH_CHECK(k_in.dim() == 4 && v_in.sizes() == k_in.sizes(), "kv_cache_append: k and v must be equal [B, Hkv, T, D]");
  const int64_t B = k_cache.size(0), H = k_cache.size(1), smax = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(k_in.size(0) == B && k_in.size(1) == H && k_in.size(3) == D, "kv_cache_append: k ", k_in.sizes(),
              " does not fit caches ", k_cache.sizes());
  TORCH_CHECK(positions.numel() == B, "kv_cache_append: positions needs one entry per sequence");
  c10::cuda::CUDAGuard guard(k_cache.device());
  // New tokens are cast to the cache dtype, like the reference's .to(k_cache.dtype).
  at::Tensor k = k_in.to(k_cache.device(), k_cache.scalar_type());
  at::Tensor v = v_in.to(k_cache.device(), k_cache.scalar_type());
  at::Tensor pos = positions.to(k_cache.device(), at::kLong).reshape({B}).contiguous();
  const int64_t Tn = k.size(2);
  if (B * H * Tn == 0 || D == 0) return;
  TORCH_CHECK(B * H * Tn < (int64_t(1) << 31), "kv_cache_append: too many rows");
  const int threads = int(std::min<int64_t>(256, (D + 31) / 32 * 32));
  FASTRLHF_DISPATCH_FLOAT(k_cache.scalar_type(), "kv_cache_append", [&] {
    kv_append_kernel<scalar_t><<<unsigned(B * H * Tn), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<scalar_t*>(k_cache.data_ptr()), strides_of(k_cache),
        reinterpret_cast<scalar_t*>(v_cache.data_ptr()), strides_of(v_cache),
        reinterpret_cast<const scalar_t*>(k.data_ptr()), strides_of(k), reinterpret_cast<const scalar_t*>(v.data_ptr()),
        strides_of(v), pos.data_ptr<int64_t>(), int(H), int(Tn), int(D), smax);
    FASTRLHF_LAUNCH_CHECK();
  });
}

}  // namespace fastrlhf
