// Prefill attention: tiled online softmax on tensor cores (WMMA 16x16x16, fp16/bf16 in,
// fp32 accumulate; sm_80+).
//
// One block of 4 warps owns 64 query rows of one (batch, head); each warp owns 16 rows.
// Per 64-key tile: S = Q·Kᵀ on tensor cores -> shared memory (fp32); each lane pair
// applies the masks (bottom-right causal, key padding mask, sequence end) and the online
// softmax update for one row; P (rounded to the input dtype) and V go through tensor
// cores again into the fp32 output accumulator, which lives in shared memory so that the
// per-row rescale (which WMMA fragments cannot address) is a plain loop.
// Rows that see no key end with l == 0 and are written as zeros.
#include <mma.h>

#include <string>

#include "common.cuh"

namespace fastrlhf {

constexpr int kBM = 64;  // query rows per block
constexpr int kBN = 64;  // keys per tile
constexpr int kPrefillThreads = 128;

template <typename T, int D>
struct PrefillLayout {
  // Row pitches (elements). Padding breaks shared-memory bank conflicts; every pitch keeps
  // 16-row fragment starts 32-byte aligned as WMMA requires.
  static constexpr int LDT = D + 8;     // Q, K, V tiles (T)
  static constexpr int LDS = kBN + 4;   // scores (fp32)
  static constexpr int LDP = kBN + 8;   // probabilities (T)
  static constexpr int LDO = D + 4;     // output accumulator (fp32)
  static constexpr size_t kQ = size_t(kBM) * LDT * sizeof(T);
  static constexpr size_t kK = size_t(kBN) * LDT * sizeof(T);
  static constexpr size_t kS = size_t(kBM) * LDS * sizeof(float);
  static constexpr size_t kP = size_t(kBM) * LDP * sizeof(T);
  static constexpr size_t kO = size_t(kBM) * LDO * sizeof(float);
  static constexpr size_t bytes = kQ + 2 * kK + kS + kP + kO;
};

template <typename T, int D>
__global__ void __launch_bounds__(kPrefillThreads) prefill_kernel(
    const T* __restrict__ q, int64_t q_sb, int64_t q_sh, int64_t q_ss,
    const T* __restrict__ k, int64_t k_sb, int64_t k_sh, int64_t k_ss,
    const T* __restrict__ v, int64_t v_sb, int64_t v_sh, int64_t v_ss,
    T* __restrict__ out, int64_t o_sb, int64_t o_sh, int64_t o_ss,
    const bool* __restrict__ key_mask,  // [B, Sk] contiguous, or null
    int Hq, int group, int Sq, int Sk, int n_tiles, bool causal, float scale_log2) {
  using namespace nvcuda;
  using L = PrefillLayout<T, D>;
  constexpr int V = Vec<T>::N;
  constexpr int CH = D / V;  // 16-byte chunks per row
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = reinterpret_cast<T*>(smem + L::kQ);
  T* sV = reinterpret_cast<T*>(smem + L::kQ + L::kK);
  float* sS = reinterpret_cast<float*>(smem + L::kQ + 2 * L::kK);
  T* sP = reinterpret_cast<T*>(smem + L::kQ + 2 * L::kK + L::kS);
  float* sO = reinterpret_cast<float*>(smem + L::kQ + 2 * L::kK + L::kS + L::kP);

  // Flattened grid (tile fastest): consecutive blocks share a head's K/V in L2.
  const int q0 = int(blockIdx.x % n_tiles) * kBM;
  const int bh = int(blockIdx.x / n_tiles);
  const int b = bh / Hq, h = bh % Hq, kvh = h / group;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T* qb = q + b * q_sb + int64_t(h) * q_sh;
  const T* kb = k + b * k_sb + int64_t(kvh) * k_sh;
  const T* vb = v + b * v_sb + int64_t(kvh) * v_sh;
  const bool* mrow = key_mask ? key_mask + int64_t(b) * Sk : nullptr;

  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int c = tid; c < kBM * CH; c += kPrefillThreads) {
    const int r = c / CH, col = (c % CH) * V;
    uint4 val = zero;
    if (q0 + r < Sq) val = *reinterpret_cast<const uint4*>(qb + (q0 + r) * q_ss + col);
    *reinterpret_cast<uint4*>(sQ + r * L::LDT + col) = val;
  }
  for (int c = tid; c < kBM * D; c += kPrefillThreads) sO[(c / D) * L::LDO + c % D] = 0.f;

  // Each lane pair owns one row of this warp's 16; lane&1 picks the half of the columns.
  const int my_row = warp * 16 + (lane >> 1);
  const int qi = q0 + my_row;
  const int half = lane & 1;
  const int diag = Sk - Sq;  // bottom-right causal alignment
  float m_run = -INFINITY, l_run = 0.f;

  int k_end = Sk;
  if (causal) k_end = min(Sk, min(q0 + kBM, Sq) - 1 + diag + 1);  // keys the last row may see
  __syncthreads();

  for (int k0 = 0; k0 < k_end; k0 += kBN) {
    for (int c = tid; c < kBN * CH; c += kPrefillThreads) {
      const int r = c / CH, col = (c % CH) * V;
      uint4 kv = zero, vv = zero;
      if (k0 + r < Sk) {
        kv = *reinterpret_cast<const uint4*>(kb + (k0 + r) * k_ss + col);
        vv = *reinterpret_cast<const uint4*>(vb + (k0 + r) * v_ss + col);
      }
      *reinterpret_cast<uint4*>(sK + r * L::LDT + col) = kv;
      *reinterpret_cast<uint4*>(sV + r * L::LDT + col) = vv;
    }
    __syncthreads();

    // S[16 x 64] = Q[16 x D] · K[64 x D]ᵀ for this warp's rows.
#pragma unroll
    for (int nt = 0; nt < kBN / 16; ++nt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_frag;
      wmma::fill_fragment(s_frag, 0.f);
#pragma unroll
      for (int kt = 0; kt < D / 16; ++kt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_frag;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b_frag;  // Kᵀ
        wmma::load_matrix_sync(a_frag, sQ + warp * 16 * L::LDT + kt * 16, L::LDT);
        wmma::load_matrix_sync(b_frag, sK + nt * 16 * L::LDT + kt * 16, L::LDT);
        wmma::mma_sync(s_frag, a_frag, b_frag, s_frag);
      }
      wmma::store_matrix_sync(sS + warp * 16 * L::LDS + nt * 16, s_frag, L::LDS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax for (my_row, 32 keys of this half).
    float* srow = sS + my_row * L::LDS + half * 32;
    float tile_max = -INFINITY;
#pragma unroll 8
    for (int c = 0; c < 32; ++c) {
      const int kj = k0 + half * 32 + c;
      const bool ok = kj < Sk && (!causal || kj <= qi + diag) && (mrow == nullptr || mrow[kj]);
      const float s = ok ? srow[c] * scale_log2 : -INFINITY;
      srow[c] = s;
      tile_max = fmaxf(tile_max, s);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float m_new = fmaxf(m_run, tile_max);
    // m_new == -inf: nothing visible yet; keep everything at zero without inf - inf.
    const float alpha = m_new == -INFINITY ? 1.f : exp2f(m_run - m_new);
    const float base = m_new == -INFINITY ? 0.f : m_new;
    T* prow = sP + my_row * L::LDP + half * 32;
    float psum = 0.f;
#pragma unroll 8
    for (int c = 0; c < 32; ++c) {
      const float s = srow[c];
      const float p = s == -INFINITY ? 0.f : exp2f(s - base);
      prow[c] = from_float<T>(p);
      psum += p;
    }
    psum += __shfl_xor_sync(0xffffffffu, psum, 1);
    l_run = l_run * alpha + psum;
    m_run = m_new;
    float* orow = sO + my_row * L::LDO + half * (D / 2);
    for (int c = 0; c < D / 2; ++c) orow[c] *= alpha;
    __syncwarp();

    // O[16 x D] += P[16 x 64] · V[64 x D]
#pragma unroll
    for (int dt = 0; dt < D / 16; ++dt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag;
      wmma::load_matrix_sync(o_frag, sO + warp * 16 * L::LDO + dt * 16, L::LDO, wmma::mem_row_major);
#pragma unroll
      for (int kt = 0; kt < kBN / 16; ++kt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> p_frag;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> v_frag;
        wmma::load_matrix_sync(p_frag, sP + warp * 16 * L::LDP + kt * 16, L::LDP);
        wmma::load_matrix_sync(v_frag, sV + kt * 16 * L::LDT + dt * 16, L::LDT);
        wmma::mma_sync(o_frag, p_frag, v_frag, o_frag);
      }
      wmma::store_matrix_sync(sO + warp * 16 * L::LDO + dt * 16, o_frag, L::LDO, wmma::mem_row_major);
    }
    __syncthreads();  // all warps are done with sK/sV (and sO is visible) before the next tile
  }

  if (qi < Sq) {
    const float inv = l_run > 0.f ? 1.f / l_run : 0.f;  // fully masked row -> 0
    const float* orow = sO + my_row * L::LDO + half * (D / 2);
    T* dst = out + b * o_sb + int64_t(h) * o_sh + int64_t(qi) * o_ss + half * (D / 2);
#pragma unroll
    for (int c = 0; c < D / 2; c += V) {
      float vals[V];
#pragma unroll
      for (int i = 0; i < V; ++i) vals[i] = orow[c + i] * inv;
      store_vec(dst + c, vals);
    }
  }
}

template <typename T, int D>
static void launch_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                           const bool* mask, int group, bool causal, float scale_log2) {
  using L = PrefillLayout<T, D>;
  auto kernel = prefill_kernel<T, D>;
  // > 48 KiB of dynamic shared memory needs an opt-in, once per device and instantiation.
  static bool opted_in[128] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 128 || !opted_in[dev]) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(L::bytes)));
    if (dev >= 0 && dev < 128) opted_in[dev] = true;
  }
  const int B = int(q.size(0)), Hq = int(q.size(1)), Sq = int(q.size(2)), Sk = int(k.size(2));
  const int n_tiles = (Sq + kBM - 1) / kBM;
  const dim3 grid(unsigned(int64_t(n_tiles) * B * Hq));
  kernel<<<grid, kPrefillThreads, L::bytes, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(q.data_ptr()), q.stride(0), q.stride(1), q.stride(2),
      reinterpret_cast<const T*>(k.data_ptr()), k.stride(0), k.stride(1), k.stride(2),
      reinterpret_cast<const T*>(v.data_ptr()), v.stride(0), v.stride(1), v.stride(2),
      reinterpret_cast<T*>(out.data_ptr()), out.stride(0), out.stride(1), out.stride(2), mask, Hq, group,
      Sq, Sk, n_tiles, causal, scale_log2);
  FASTRLHF_LAUNCH_CHECK();
}

// attention_prefill_mma.cu: the register-resident mma.sync variant (opt-in, see there).
void prefill_mma(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, const bool* mask,
                 int group, bool causal, float scale_log2);

static bool use_mma_variant() {
  const char* kind = std::getenv("FASTRLHF_PREFILL_KERNEL");
  return kind != nullptr && std::string(kind) == "mma";
}

bool prefill_supported_head_dim(int64_t d) { return d == 64 || d == 80 || d == 96 || d == 128; }

at::Tensor attention_prefill(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                             bool causal, const c10::optional<at::Tensor>& attention_mask, double scale) {
  FASTRLHF_CHECK_CUDA(q_in);
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4,
              "attention_prefill: q, k, v must be [B, H, S, D]");
  TORCH_CHECK(q_in.scalar_type() == at::kHalf || q_in.scalar_type() == at::kBFloat16,
              "attention_prefill (cuda): needs float16 or bfloat16 (got ", q_in.scalar_type(),
              "); use the torch or triton backend for float32");
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
              "attention_prefill: q, k, v must share a dtype");
  TORCH_CHECK(k_in.sizes() == v_in.sizes(), "attention_prefill: k ", k_in.sizes(), " and v ",
              v_in.sizes(), " must have the same shape");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Sq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Sk = k_in.size(2);
  TORCH_CHECK(k_in.size(0) == B && k_in.size(3) == D, "attention_prefill: k ", k_in.sizes(),
              " does not match q ", q_in.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "attention_prefill: query heads (", Hq,
              ") must be a multiple of KV heads (", Hkv, ")");
  TORCH_CHECK(prefill_supported_head_dim(D), "attention_prefill (cuda): head dim ", D,
              " not compiled (64, 80, 96, 128); use the triton or torch backend");
  TORCH_CHECK(Sq < (int64_t(1) << 31) && Sk < (int64_t(1) << 31) && int64_t((Sq + kBM - 1) / kBM) * B * Hq < (int64_t(1) << 31),
              "attention_prefill: sizes too large");
  c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t V = 8;
  at::Tensor q = vector_friendly(q_in, V) ? q_in : q_in.contiguous();
  at::Tensor k = vector_friendly(k_in, V) ? k_in : k_in.contiguous();
  at::Tensor v = vector_friendly(v_in, V) ? v_in : v_in.contiguous();
  at::Tensor mask;
  if (attention_mask.has_value()) {
    TORCH_CHECK(attention_mask->dim() == 2 && attention_mask->size(0) == B && attention_mask->size(1) == Sk,
                "attention_prefill: attention_mask must be [B, Sk] = [", B, ", ", Sk, "], got ",
                attention_mask->sizes());
    mask = attention_mask->to(q.device()).ne(0).contiguous();
  }
  auto out = at::empty({B, Hq, Sq, D}, q.options());
  poison_for_tests(out);
  if (out.numel() == 0) return out;
  const float scale_log2 = float(scale) * 1.4426950408889634f;
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const int group = int(Hq / Hkv);
  if (use_mma_variant()) {
    prefill_mma(q, k, v, out, mp, group, causal, scale_log2);
    return out;
  }
  FASTRLHF_DISPATCH_HALF(q.scalar_type(), "attention_prefill", [&] {
    switch (D) {
      case 64: launch_prefill<scalar_t, 64>(q, k, v, out, mp, group, causal, scale_log2); break;
      case 80: launch_prefill<scalar_t, 80>(q, k, v, out, mp, group, causal, scale_log2); break;
      case 96: launch_prefill<scalar_t, 96>(q, k, v, out, mp, group, causal, scale_log2); break;
      default: launch_prefill<scalar_t, 128>(q, k, v, out, mp, group, causal, scale_log2); break;
    }
  });
  return out;
}

}  // namespace fastrlhf
