// Paged decode attention: one new query per sequence, over keys stored in fixed-size pool
// blocks (pools [num_blocks, Hkv, block_size, D], block tables [B, max_blocks], seq_lens [B]).
// Semantics: fastrlhf/ops/paged_reference.py.
//
// The structure of attention_decode.cu, with the key rows found through the block table:
// split-K with a FIXED split size (kPagedSplit positions, aligned to position 0) and splits
// merged in order, so a sequence's output depends only on its own keys, not on the batch or
// on the block table's width. One block = (split, KV head and up to kPagedMaxGroup of its
// query heads, sequence). The split's key row offsets are computed once into shared memory
// (a block id outside the pool makes the key absent: never read); phase 1 scores each key
// for the whole query group (16-byte vector loads), phase 2 turns scores into exp2 weights
// (one warp per head), phase 3 accumulates P·V; a second kernel merges the splits.
// Scores: (q·k)·scale -> softcap·tanh(s/softcap) (softcap > 0) -> + slope·(key pos - query
// pos) (ALiBi) -> window/length masks -> softmax in fp32 (log2 domain).
#include "common.cuh"

namespace fastrlhf {

constexpr int kPagedSplit = 256;   // key positions per split (fixed: see above)
constexpr int kPagedThreads = 128;
constexpr int kPagedMaxGroup = 8;  // query heads sharing one pass over a KV head
constexpr float kLog2e = 1.4426950408889634f;

struct PoolStrides {
  int64_t block, head, row;  // the last dim is contiguous (checked by the host)
};

template <typename T, int TPK>  // TPK: threads per key row (power of two <= 32)
__global__ void __launch_bounds__(kPagedThreads) paged_decode_split_kernel(
    const T* __restrict__ q, int64_t q_sb, int64_t q_sh, const T* __restrict__ kp, PoolStrides ks,
    const T* __restrict__ vp, PoolStrides vs, const int* __restrict__ tables, int64_t table_stride, int max_blocks,
    const int* __restrict__ lens, const float* __restrict__ slopes, float* __restrict__ ws_acc,
    float* __restrict__ ws_m, float* __restrict__ ws_l, int Hq, int group, int n_chunks, int n_splits, int D,
    int block_size, int64_t num_blocks, float scale, float softcap, int window) {
  constexpr int V = Vec<T>::N;
  constexpr int NSUB = kPagedThreads / TPK;  // key rows handled at once
  constexpr int NWARP = kPagedThreads / 32;
  __shared__ float s_p[kPagedMaxGroup][kPagedSplit];
  __shared__ float s_acc[NWARP][kPagedMaxGroup][TPK * V];
  __shared__ int64_t s_koff[kPagedSplit], s_voff[kPagedSplit];  // -1: absent key
  __shared__ float s_m[kPagedMaxGroup], s_l[kPagedMaxGroup];

  const int split = blockIdx.x;
  const int kvh = blockIdx.y / n_chunks;
  const int chunk = blockIdx.y % n_chunks;
  const int b = blockIdx.z;
  const int h0 = kvh * group + chunk * kPagedMaxGroup;
  const int ng = min(kPagedMaxGroup, group - chunk * kPagedMaxGroup);

  const int len = lens[b];
  const int q_pos = len - 1;
  const int first = window > 0 ? max(q_pos - window + 1, 0) : 0;
  const int lo = max(first, split * kPagedSplit);
  const int hi = min(len, (split + 1) * kPagedSplit);
  const int n = hi > lo ? hi - lo : 0;  // block-uniform

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t ws_row = (int64_t(b) * Hq + h0) * n_splits + split;  // + g * n_splits
  if (n == 0) {  // nothing visible in this split; the merge skips it (l == 0)
    if (tid < ng) {
      ws_m[ws_row + int64_t(tid) * n_splits] = -INFINITY;
      ws_l[ws_row + int64_t(tid) * n_splits] = 0.f;
    }
    return;
  }

  for (int j = tid; j < n; j += kPagedThreads) {
    const int pos = lo + j;
    const int col = pos / block_size;  // a length past the table's width reads no other row
    const int64_t blk = col < max_blocks ? tables[int64_t(b) * table_stride + col] : -1;
    const bool ok = blk >= 0 && blk < num_blocks;
    const int64_t row = pos % block_size;
    s_koff[j] = ok ? blk * ks.block + int64_t(kvh) * ks.head + row * ks.row : -1;
    s_voff[j] = ok ? blk * vs.block + int64_t(kvh) * vs.head + row * vs.row : -1;
  }

  const int sub = tid / TPK;   // key row this thread works on
  const int part = tid % TPK;  // which 16-byte slice of the head dim
  const int d0 = part * V;
  const bool has_d = d0 < D;

  float qr[kPagedMaxGroup][V];
  float slope[kPagedMaxGroup];
#pragma unroll
  for (int g = 0; g < kPagedMaxGroup; ++g) {
    float tmp[V];
#pragma unroll
    for (int i = 0; i < V; ++i) tmp[i] = 0.f;
    if (g < ng && has_d) load_vec(q + b * q_sb + int64_t(h0 + g) * q_sh + d0, tmp);
#pragma unroll
    for (int i = 0; i < V; ++i) qr[g][i] = tmp[i] * scale;
    slope[g] = (slopes != nullptr && g < ng) ? slopes[h0 + g] : 0.f;
  }
  __syncthreads();  // s_koff / s_voff ready

  // Phase 1: scores. Loop bounds are block-uniform, so the shuffles below are safe; an absent
  // key (block outside the pool) is not loaded and scores -inf.
  constexpr int kRowsInFlight = 2;
  for (int base = 0; base < n; base += NSUB * kRowsInFlight) {
    float kv[kRowsInFlight][V];
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      const int j = base + u * NSUB + sub;
#pragma unroll
      for (int i = 0; i < V; ++i) kv[u][i] = 0.f;
      if (j < n && has_d && s_koff[j] >= 0) load_vec(kp + s_koff[j] + d0, kv[u]);
    }
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      const int j = base + u * NSUB + sub;
#pragma unroll
      for (int g = 0; g < kPagedMaxGroup; ++g) {
        if (g < ng) {  // ng is block-uniform
          float s = 0.f;
#pragma unroll
          for (int i = 0; i < V; ++i) s = fmaf(qr[g][i], kv[u][i], s);
#pragma unroll
          for (int o = TPK / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
          if (part == 0 && j < n) {
            if (softcap > 0.f) s = softcap * tanhf(s / softcap);
            s += slope[g] * float(lo + j - q_pos);
            s_p[g][j] = s_koff[j] >= 0 ? s * kLog2e : -INFINITY;
          }
        }
      }
    }
  }
  __syncthreads();

  // Phase 2: per head, split max and exp2 weights; one warp per head.
  for (int g = warp; g < ng; g += NWARP) {
    float m = -INFINITY;
    for (int j = lane; j < n; j += 32) m = fmaxf(m, s_p[g][j]);
    m = warp_max(m);
    const float m_safe = m == -INFINITY ? 0.f : m;  // every key absent: all weights 0, no NaN
    float l = 0.f;
    for (int j = lane; j < n; j += 32) {
      const float p = exp2f(s_p[g][j] - m_safe);
      s_p[g][j] = p;
      l += p;
    }
    l = warp_sum(l);
    if (lane == 0) { s_m[g] = m; s_l[g] = l; }
  }
  __syncthreads();

  // Phase 3: unnormalised P·V for the rows of this thread's sub-group.
  float acc[kPagedMaxGroup][V];
#pragma unroll
  for (int g = 0; g < kPagedMaxGroup; ++g)
#pragma unroll
    for (int i = 0; i < V; ++i) acc[g][i] = 0.f;
  if (has_d) {
#pragma unroll 2
    for (int j = sub; j < n; j += NSUB) {
      if (s_voff[j] < 0) continue;  // absent key: weight 0, row never read
      float vv[V];
      load_vec(vp + s_voff[j] + d0, vv);
#pragma unroll
      for (int g = 0; g < kPagedMaxGroup; ++g) {
        if (g < ng) {
          const float p = s_p[g][j];
#pragma unroll
          for (int i = 0; i < V; ++i) acc[g][i] = fmaf(p, vv[i], acc[g][i]);
        }
      }
    }
  }
  // Sum the sub-groups inside a warp (lanes equal modulo TPK hold the same d), then across
  // warps in a fixed order (deterministic, no atomics).
#pragma unroll
  for (int g = 0; g < kPagedMaxGroup; ++g) {
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
  for (int idx = tid; idx < ng * D; idx += kPagedThreads) {
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

// Merge the splits of one (b, head) row in split order: out = Σ 2^(m_s-M)·acc_s / Σ 2^(m_s-M)·l_s.
template <typename T>
__global__ void paged_decode_merge_kernel(const float* __restrict__ ws_acc, const float* __restrict__ ws_m,
                                          const float* __restrict__ ws_l, T* __restrict__ out, int64_t out_sb,
                                          int64_t out_sh, int Hq, int n_splits, int D) {
  const int64_t row = blockIdx.x;  // b * Hq + h
  const float* m = ws_m + row * n_splits;
  const float* l = ws_l + row * n_splits;
  float M = -INFINITY;
  for (int s = 0; s < n_splits; ++s)
    if (l[s] > 0.f) M = fmaxf(M, m[s]);
  T* o = out + (row / Hq) * out_sb + (row % Hq) * out_sh;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float num = 0.f, den = 0.f;
    for (int s = 0; s < n_splits; ++s) {
      if (l[s] > 0.f) {  // empty splits never wrote their partial output
        const float w = exp2f(m[s] - M);
        num = fmaf(w, ws_acc[(row * n_splits + s) * D + d], num);
        den = fmaf(w, l[s], den);
      }
    }
    o[d] = from_float<T>(den > 0.f ? num / den : 0.f);  // no visible key -> 0
  }
}

static PoolStrides pool_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

at::Tensor paged_attention_decode(const at::Tensor& q_in, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                  const c10::optional<at::Tensor>& alibi_slopes, double scale, double softcap,
                                  int64_t window) {
  FASTRLHF_CHECK_CUDA(q_in);
  FASTRLHF_CHECK_FLOATING(q_in);
  TORCH_CHECK(q_in.dim() == 3, "paged_attention_decode: q must be [B, Hq, D], got ", q_in.sizes());
  TORCH_CHECK(k_pool.dim() == 4 && k_pool.sizes() == v_pool.sizes(),
              "paged_attention_decode: k_pool and v_pool must be equal [num_blocks, Hkv, block_size, D]");
  TORCH_CHECK(k_pool.scalar_type() == q_in.scalar_type() && v_pool.scalar_type() == q_in.scalar_type(),
              "paged_attention_decode: q and the pools must share a dtype");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2);
  const int64_t num_blocks = k_pool.size(0), Hkv = k_pool.size(1), block_size = k_pool.size(2);
  TORCH_CHECK(k_pool.size(3) == D, "paged_attention_decode: pools ", k_pool.sizes(), " do not match q ", q_in.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "paged_attention_decode: query heads (", Hq,
              ") must be a multiple of KV heads (", Hkv, ")");
  const int64_t V = vec_elems(q_in.scalar_type());
  TORCH_CHECK(D % V == 0 && D <= 32 * V, "paged_attention_decode: head dim ", D, " must be a multiple of ", V,
              " and at most ", 32 * V, " for ", q_in.scalar_type());
  TORCH_CHECK(vector_friendly(k_pool, V) && vector_friendly(v_pool, V),
              "paged_attention_decode: the pools must be 16-byte aligned with a contiguous last dim");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && seq_lens.numel() == B,
              "paged_attention_decode: block_tables [B, max_blocks] and seq_lens [B] must match q's batch");
  c10::cuda::CUDAGuard guard(q_in.device());

  at::Tensor q = vector_friendly(q_in, V) ? q_in : q_in.contiguous();
  at::Tensor tables = block_tables.to(q.device(), at::kInt);
  if (tables.size(1) > 1 && tables.stride(1) != 1) tables = tables.contiguous();
  at::Tensor lens = seq_lens.to(q.device(), at::kInt).contiguous();
  at::Tensor slopes;
  if (alibi_slopes.has_value()) {
    TORCH_CHECK(alibi_slopes->numel() == Hq, "paged_attention_decode: alibi_slopes needs one slope per query head");
    slopes = alibi_slopes->to(q.device(), at::kFloat).contiguous();
  }
  auto out = at::empty({B, Hq, D}, q.options());
  if (B == 0 || Hq == 0) return out;
  const int64_t n_splits = std::max<int64_t>(1, (tables.size(1) * block_size + kPagedSplit - 1) / kPagedSplit);
  auto fopts = q.options().dtype(at::kFloat);
  auto ws_acc = at::empty({B, Hq, n_splits, D}, fopts);
  auto ws_m = at::empty({B, Hq, n_splits}, fopts);
  auto ws_l = at::empty({B, Hq, n_splits}, fopts);
  for (auto* t : {&out, &ws_acc, &ws_m, &ws_l}) poison_for_tests(*t);

  const int group = int(Hq / Hkv);
  const int n_chunks = (group + kPagedMaxGroup - 1) / kPagedMaxGroup;
  TORCH_CHECK(Hkv * n_chunks < 65536 && B < 65536, "paged_attention_decode: batch or head count too large");
  const dim3 grid(unsigned(n_splits), unsigned(Hkv * n_chunks), unsigned(B));
  const int64_t n_vec = D / V;
  auto stream = c10::cuda::getCurrentCUDAStream();
  FASTRLHF_DISPATCH_FLOAT(q.scalar_type(), "paged_attention_decode", [&] {
    auto launch = [&](auto tpk) {
      constexpr int TPK = decltype(tpk)::value;
      paged_decode_split_kernel<scalar_t, TPK><<<grid, kPagedThreads, 0, stream>>>(
          reinterpret_cast<const scalar_t*>(q.data_ptr()), q.stride(0), q.stride(1),
          reinterpret_cast<const scalar_t*>(k_pool.data_ptr()), pool_strides(k_pool),
          reinterpret_cast<const scalar_t*>(v_pool.data_ptr()), pool_strides(v_pool), tables.data_ptr<int>(),
          tables.stride(0), int(tables.size(1)), lens.data_ptr<int>(), slopes.defined() ? slopes.data_ptr<float>() : nullptr,
          ws_acc.data_ptr<float>(), ws_m.data_ptr<float>(), ws_l.data_ptr<float>(), int(Hq), group, n_chunks,
          int(n_splits), int(D), int(block_size), num_blocks, float(scale), float(softcap), int(window));
    };
    if (n_vec <= 8) launch(std::integral_constant<int, 8>{});
    else if (n_vec <= 16) launch(std::integral_constant<int, 16>{});
    else launch(std::integral_constant<int, 32>{});
    FASTRLHF_LAUNCH_CHECK();
    paged_decode_merge_kernel<scalar_t><<<unsigned(B * Hq), 128, 0, stream>>>(
        ws_acc.data_ptr<float>(), ws_m.data_ptr<float>(), ws_l.data_ptr<float>(),
        reinterpret_cast<scalar_t*>(out.data_ptr()), out.stride(0), out.stride(1), int(Hq), int(n_splits), int(D));
    FASTRLHF_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace fastrlhf
