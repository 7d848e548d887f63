// Decode attention over a KV cache: one new query token per sequence.
//
// Split-K with a FIXED split size (kSplit keys): split s always covers cache positions
// [s*kSplit, (s+1)*kSplit), and the splits are combined in a fixed order. A sequence's
// result therefore does not depend on the batch it is in or on the cache capacity, so
// rollout log-probs match a recomputation by the trainer.
//
// One block = (batch b, KV head, up to kMaxGroup query heads of that KV head's group,
// split). Each K/V row is loaded once (16-byte vectors) and used by every query head of
// the group (GQA/MQA). Phase 1 writes scaled scores to shared memory, phase 2 turns them
// into exp2(score - split max) per head (one warp per head), phase 3 accumulates P·V.
// A second kernel merges the per-split (max, sum, partial output) triples.
#include "common.cuh"

namespace fastrlhf {

constexpr int kSplit = 256;        // keys per split (fixed: see above)
constexpr int kDecodeThreads = 128;
constexpr int kMaxGroup = 8;       // query heads sharing one pass over a KV head

template <typename T, int TPK>  // TPK: threads per key row (power of two <= 32)
__global__ void __launch_bounds__(kDecodeThreads) decode_split_kernel(
    const T* __restrict__ q, int64_t q_sb, int64_t q_sh,
    const T* __restrict__ kc, int64_t k_sb, int64_t k_sh, int64_t k_ss,
    const T* __restrict__ vc, int64_t v_sb, int64_t v_sh, int64_t v_ss,
    const int64_t* __restrict__ lens, const int64_t* __restrict__ starts,
    float* __restrict__ ws_acc, float* __restrict__ ws_m, float* __restrict__ ws_l,
    int Hq, int group, int n_chunks, int n_splits, int D, int64_t smax, float scale_log2) {
  constexpr int V = Vec<T>::N;
  constexpr int NSUB = kDecodeThreads / TPK;  // key rows handled at once
  constexpr int NWARP = kDecodeThreads / 32;
  __shared__ float s_p[kMaxGroup][kSplit];
  __shared__ float s_acc[NWARP][kMaxGroup][TPK * V];

  const int split = blockIdx.x;
  const int kvh = blockIdx.y / n_chunks;
  const int chunk = blockIdx.y % n_chunks;
  const int b = blockIdx.z;
  const int h0 = kvh * group + chunk * kMaxGroup;
  const int ng = min(kMaxGroup, group - chunk * kMaxGroup);

  const int64_t len = min(lens[b], smax);
  const int64_t start = starts ? max(starts[b], int64_t(0)) : int64_t(0);
  const int64_t lo = max(start, int64_t(split) * kSplit);
  const int64_t hi = min(len, int64_t(split + 1) * kSplit);
  const int n = hi > lo ? int(hi - lo) : 0;  // block-uniform

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t ws_row = (int64_t(b) * Hq + h0) * n_splits + split;  // + g * n_splits
  if (n == 0) {  // nothing visible in this split; the merge skips it (l == 0)
    if (tid < ng) {
      ws_m[ws_row + int64_t(tid) * n_splits] = -INFINITY;
      ws_l[ws_row + int64_t(tid) * n_splits] = 0.f;
    }
    return;
  }

  const int sub = tid / TPK;   // key row this thread works on
  const int part = tid % TPK;  // which 16-byte slice of the head dim
  const int d0 = part * V;
  const bool has_d = d0 < D;

  float qr[kMaxGroup][V];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    float tmp[V];
#pragma unroll
    for (int i = 0; i < V; ++i) tmp[i] = 0.f;
    if (g < ng && has_d) load_vec(q + b * q_sb + int64_t(h0 + g) * q_sh + d0, tmp);
#pragma unroll
    for (int i = 0; i < V; ++i) qr[g][i] = tmp[i] * scale_log2;
  }

  // Phase 1: scores (log2 domain). Each thread loads kRowsInFlight key rows before using
  // them, so enough bytes are in flight per SM to cover HBM latency. Loop bounds are
  // block-uniform, so the shuffles below are safe.
  constexpr int kRowsInFlight = 2;
  const T* kbase = kc + b * k_sb + int64_t(kvh) * k_sh + d0;
  for (int base = 0; base < n; base += NSUB * kRowsInFlight) {
    float kv[kRowsInFlight][V];
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      const int j = base + u * NSUB + sub;
#pragma unroll
      for (int i = 0; i < V; ++i) kv[u][i] = 0.f;
      if (j < n && has_d) load_vec(kbase + (lo + j) * k_ss, kv[u]);
    }
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      const int j = base + u * NSUB + sub;
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g < ng) {  // ng is block-uniform
          float s = 0.f;
#pragma unroll
          for (int i = 0; i < V; ++i) s = fmaf(qr[g][i], kv[u][i], s);
#pragma unroll
          for (int o = TPK / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
          if (part == 0 && j < n) s_p[g][j] = s;
        }
      }
    }
  }
  __syncthreads();

  // Phase 2: per head, split max and exp2 weights; one warp per head.
  __shared__ float s_m[kMaxGroup], s_l[kMaxGroup];
  for (int g = warp; g < ng; g += NWARP) {
    float m = -INFINITY;
    for (int j = lane; j < n; j += 32) m = fmaxf(m, s_p[g][j]);
    m = warp_max(m);
    float l = 0.f;
    for (int j = lane; j < n; j += 32) {
      const float p = exp2f(s_p[g][j] - m);
      s_p[g][j] = p;
      l += p;
    }
    l = warp_sum(l);
    if (lane == 0) { s_m[g] = m; s_l[g] = l; }
  }
  __syncthreads();

  // Phase 3: unnormalised P·V for the rows of this thread's sub-group.
  float acc[kMaxGroup][V];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g)
#pragma unroll
    for (int i = 0; i < V; ++i) acc[g][i] = 0.f;
  if (has_d) {
    const T* vbase = vc + b * v_sb + int64_t(kvh) * v_sh + d0;
#pragma unroll 2
    for (int j = sub; j < n; j += NSUB) {
      float vv[V];
      load_vec(vbase + (lo + j) * v_ss, vv);
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g < ng) {
          const float p = s_p[g][j];
#pragma unroll
          for (int i = 0; i < V; ++i) acc[g][i] = fmaf(p, vv[i], acc[g][i]);
        }
      }
    }
  }
  // Sum the sub-groups inside a warp (lanes equal modulo TPK hold the same d), then
  // across warps in a fixed order (deterministic, no atomics).
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (g < ng) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        float a = acc[g][i];
#pragma unroll
        for (int o = TPK; o < 32; o <<= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
        if (lane < TPK) s_acc[warp][g][lane * V + i] = a;
      }
    }
  }
  __syncthreads();
  for (int idx = tid; idx < ng * D; idx += kDecodeThreads) {
    const int g = idx / D, d = idx % D;
    float a = 0.f;
#pragma unroll
    for (int w = 0; w < NWARP; ++w) a += s_acc[w][g][d];
    ws_acc[(ws_row + int64_t(g) * n_splits) * D + d] = a;
  }
  if (tid < ng) {
    ws_m[ws_row + int64_t(tid) * n_splits] = s_m[tid];
    ws_l[ws_row + int64_t(tid) * n_splits] = s_l[tid];
  }
}

// Merge the splits of one (b, head) row: out = Σ 2^(m_s-M)·acc_s / Σ 2^(m_s-M)·l_s.
template <typename T>
__global__ void decode_merge_kernel(const float* __restrict__ ws_acc, const float* __restrict__ ws_m,
                                    const float* __restrict__ ws_l, T* __restrict__ out,
                                    int n_splits, int D) {
  const int64_t row = blockIdx.x;  // b * Hq + h
  const float* m = ws_m + row * n_splits;
  const float* l = ws_l + row * n_splits;
  float M = -INFINITY;
  for (int s = 0; s < n_splits; ++s)
    if (l[s] > 0.f) M = fmaxf(M, m[s]);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float num = 0.f, den = 0.f;
    for (int s = 0; s < n_splits; ++s) {
      if (l[s] > 0.f) {  // empty splits never wrote their partial output
        const float w = exp2f(m[s] - M);
        num = fmaf(w, ws_acc[(row * n_splits + s) * D + d], num);
        den = fmaf(w, l[s], den);
      }
    }
    out[row * D + d] = from_float<T>(den > 0.f ? num / den : 0.f);  // no visible key -> 0
  }
}

at::Tensor attention_decode(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            const at::Tensor& cache_lens, const c10::optional<at::Tensor>& cache_starts,
                            double scale) {
  FASTRLHF_CHECK_CUDA(q_in);
  FASTRLHF_CHECK_FLOATING(q_in);
  TORCH_CHECK(q_in.dim() == 3, "attention_decode: q must be [B, Hq, D], got ", q_in.sizes());
  TORCH_CHECK(k_in.dim() == 4 && v_in.dim() == 4,
              "attention_decode: k_cache and v_cache must be [B, Hkv, Smax, D]");
  TORCH_CHECK(k_in.sizes() == v_in.sizes(), "attention_decode: k_cache ", k_in.sizes(),
              " and v_cache ", v_in.sizes(), " must have the same shape");
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
              "attention_decode: q, k_cache and v_cache must share a dtype (cast the query)");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2);
  const int64_t Hkv = k_in.size(1), smax = k_in.size(2);
  TORCH_CHECK(k_in.size(0) == B && k_in.size(3) == D, "attention_decode: caches ", k_in.sizes(),
              " do not match q ", q_in.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "attention_decode: query heads (", Hq,
              ") must be a multiple of KV heads (", Hkv, ")");
  const int64_t V = vec_elems(q_in.scalar_type());
  TORCH_CHECK(D % V == 0 && D <= 32 * V, "attention_decode: head dim ", D, " must be a multiple of ",
              V, " and at most ", 32 * V, " for ", q_in.scalar_type());
  TORCH_CHECK(cache_lens.numel() == B, "attention_decode: cache_lens needs one entry per sequence");
  c10::cuda::CUDAGuard guard(q_in.device());

  at::Tensor q = vector_friendly(q_in, V) ? q_in : q_in.contiguous();
  at::Tensor kc = k_in, vc = v_in;
  if (!vector_friendly(kc, V) || !vector_friendly(vc, V)) {
    TORCH_WARN_ONCE("attention_decode: KV cache is not 16-byte aligned/contiguous in its last dim; "
                    "copying it every call (allocate the cache contiguous to avoid this)");
    kc = kc.contiguous();
    vc = vc.contiguous();
  }
  at::Tensor lens = cache_lens.to(q.device(), at::kLong).contiguous();
  at::Tensor starts;
  if (cache_starts.has_value()) {
    TORCH_CHECK(cache_starts->numel() == B, "attention_decode: cache_starts needs one entry per sequence");
    starts = cache_starts->to(q.device(), at::kLong).contiguous();
  }
  auto out = at::empty({B, Hq, D}, q.options());
  if (B == 0 || Hq == 0) return out;
  const int64_t n_splits = std::max<int64_t>(1, (smax + kSplit - 1) / kSplit);
  auto fopts = q.options().dtype(at::kFloat);
  auto ws_acc = at::empty({B, Hq, n_splits, D}, fopts);
  auto ws_m = at::empty({B, Hq, n_splits}, fopts);
  auto ws_l = at::empty({B, Hq, n_splits}, fopts);
  for (auto* t : {&out, &ws_acc, &ws_m, &ws_l}) poison_for_tests(*t);

  const int group = int(Hq / Hkv);
  const int n_chunks = (group + kMaxGroup - 1) / kMaxGroup;
  TORCH_CHECK(Hkv * n_chunks < 65536 && B < 65536, "attention_decode: batch or head count too large");
  const dim3 grid(unsigned(n_splits), unsigned(Hkv * n_chunks), unsigned(B));
  const float scale_log2 = float(scale) * 1.4426950408889634f;
  const int64_t n_vec = D / V;
  auto stream = c10::cuda::getCurrentCUDAStream();
  FASTRLHF_DISPATCH_FLOAT(q.scalar_type(), "attention_decode", [&] {
    auto launch = [&](auto tpk) {
      constexpr int TPK = decltype(tpk)::value;
      decode_split_kernel<scalar_t, TPK><<<grid, kDecodeThreads, 0, stream>>>(
          reinterpret_cast<const scalar_t*>(q.data_ptr()), q.stride(0), q.stride(1),
          reinterpret_cast<const scalar_t*>(kc.data_ptr()), kc.stride(0), kc.stride(1), kc.stride(2),
          reinterpret_cast<const scalar_t*>(vc.data_ptr()), vc.stride(0), vc.stride(1), vc.stride(2),
          lens.data_ptr<int64_t>(), starts.defined() ? starts.data_ptr<int64_t>() : nullptr,
          ws_acc.data_ptr<float>(), ws_m.data_ptr<float>(), ws_l.data_ptr<float>(), int(Hq), group,
          n_chunks, int(n_splits), int(D), smax, scale_log2);
    };
    if (n_vec <= 8) launch(std::integral_constant<int, 8>{});
    else if (n_vec <= 16) launch(std::integral_constant<int, 16>{});
    else launch(std::integral_constant<int, 32>{});
    FASTRLHF_LAUNCH_CHECK();
    decode_merge_kernel<scalar_t><<<unsigned(B * Hq), 128, 0, stream>>>(
        ws_acc.data_ptr<float>(), ws_m.data_ptr<float>(), ws_l.data_ptr<float>(),
        reinterpret_cast<scalar_t*>(out.data_ptr()), int(n_splits), int(D));
    FASTRLHF_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace fastrlhf
