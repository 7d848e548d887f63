// Prefill attention, register-resident variant (FlashAttention-2 layout) on mma.sync
// m16n8k16 (sm_80+). Selected with FASTRLHF_PREFILL_KERNEL=mma until it has been
// validated on a GPU by tests/test_cuda_ops.py; the WMMA kernel is the default.
//
// Differences from the WMMA kernel: S, P and the output accumulator never leave registers.
// Each thread holds rows g = lane/4 and g + 8 of its warp's 16 rows, columns 2t, 2t+1 of
// every 8-wide tile (t = lane % 4) - the documented accumulator layout of m16n8k16 - so
// the accumulator of S·scale is, after the softmax, exactly the A operand of P·V, and the
// per-row rescale is a multiply on registers. Row statistics reduce over the 4 threads of
// a row with two shuffles; l is kept per thread and summed once at the end.
#include "common.cuh"

namespace fastrlhf {

namespace {
constexpr int kMmaBM = 64;  // query rows per block (16 per warp)
constexpr int kMmaBN = 64;  // keys per tile
constexpr int kMmaThreads = 128;

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two values as one 32-bit operand register; the lower column goes in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <typename T>
__device__ __forceinline__ uint32_t ld32(const T* p) {  // two adjacent elements, 4-byte aligned
  return *reinterpret_cast<const uint32_t*>(p);
}
}  // namespace

template <typename T, int D>
__global__ void __launch_bounds__(kMmaThreads) prefill_mma_kernel(
    const T* __restrict__ q, int64_t q_sb, int64_t q_sh, int64_t q_ss,
    const T* __restrict__ k, int64_t k_sb, int64_t k_sh, int64_t k_ss,
    const T* __restrict__ v, int64_t v_sb, int64_t v_sh, int64_t v_ss,
    T* __restrict__ out, int64_t o_sb, int64_t o_sh, int64_t o_ss,
    const bool* __restrict__ key_mask, int Hq, int group, int Sq, int Sk, int n_tiles, bool causal,
    float scale_log2) {
  constexpr int LDT = D + 8;  // row pitch of the Q/K/V tiles: breaks bank conflicts, stays even
  constexpr int V = Vec<T>::N;
  constexpr int CH = D / V;
  constexpr int KS = D / 16;  // k-steps of Q·Kᵀ
  constexpr int ND = D / 8;   // 8-wide output column tiles
  extern __shared__ __align__(16) unsigned char smem_mma[];
  T* sQ = reinterpret_cast<T*>(smem_mma);
  T* sK = sQ + kMmaBM * LDT;
  T* sV = sK + kMmaBN * LDT;
  const uint16_t* sV16 = reinterpret_cast<const uint16_t*>(sV);

  const int q0 = int(blockIdx.x % n_tiles) * kMmaBM;
  const int bh = int(blockIdx.x / n_tiles);
  const int b = bh / Hq, h = bh % Hq, kvh = h / group;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const T* qb = q + b * q_sb + int64_t(h) * q_sh;
  const T* kb = k + b * k_sb + int64_t(kvh) * k_sh;
  const T* vb = v + b * v_sb + int64_t(kvh) * v_sh;
  const bool* mrow = key_mask ? key_mask + int64_t(b) * Sk : nullptr;
  const uint4 zero = make_uint4(0, 0, 0, 0);

  for (int c = tid; c < kMmaBM * CH; c += kMmaThreads) {
    const int r = c / CH, col = (c % CH) * V;
    uint4 val = zero;
    if (q0 + r < Sq) val = *reinterpret_cast<const uint4*>(qb + (q0 + r) * q_ss + col);
    *reinterpret_cast<uint4*>(sQ + r * LDT + col) = val;
  }
  __syncthreads();

  const int r0 = warp * 16 + g;  // this thread's rows: r0 and r0 + 8 of the block
  uint32_t qf[KS][4];
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    qf[ks][0] = ld32(sQ + r0 * LDT + ks * 16 + 2 * t);
    qf[ks][1] = ld32(sQ + (r0 + 8) * LDT + ks * 16 + 2 * t);
    qf[ks][2] = ld32(sQ + r0 * LDT + ks * 16 + 8 + 2 * t);
    qf[ks][3] = ld32(sQ + (r0 + 8) * LDT + ks * 16 + 8 + 2 * t);
  }
  float o[ND][4];
#pragma unroll
  for (int nd = 0; nd < ND; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_part[2] = {0.f, 0.f};
  const int qi[2] = {q0 + r0, q0 + r0 + 8};
  const int diag = Sk - Sq;
  int k_end = Sk;
  if (causal) k_end = min(Sk, min(q0 + kMmaBM, Sq) - 1 + diag + 1);

  for (int k0 = 0; k0 < k_end; k0 += kMmaBN) {
    __syncthreads();  // every warp is done with the previous K/V tile
    for (int c = tid; c < kMmaBN * CH; c += kMmaThreads) {
      const int r = c / CH, col = (c % CH) * V;
      uint4 kv = zero, vv = zero;
      if (k0 + r < Sk) {
        kv = *reinterpret_cast<const uint4*>(kb + (k0 + r) * k_ss + col);
        vv = *reinterpret_cast<const uint4*>(vb + (k0 + r) * v_ss + col);
      }
      *reinterpret_cast<uint4*>(sK + r * LDT + col) = kv;
      *reinterpret_cast<uint4*>(sV + r * LDT + col) = vv;
    }
    __syncthreads();

    float s[kMmaBN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kMmaBN / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      const T* krow = sK + (nt * 8 + g) * LDT + 2 * t;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) mma16816<T>(s[nt], qf[ks], ld32(krow + ks * 16), ld32(krow + ks * 16 + 8));
    }

    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kMmaBN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int kj = k0 + nt * 8 + 2 * t + (e & 1);
        const bool ok = kj < Sk && (!causal || kj <= qi[r] + diag) && (mrow == nullptr || mrow[kj]);
        s[nt][e] = ok ? s[nt][e] * scale_log2 : -INFINITY;
        mx[r] = fmaxf(mx[r], s[nt][e]);
      }
    }
    float alpha[2], base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m_run[r], mx[r]);
      alpha[r] = m_new == -INFINITY ? 1.f : exp2f(m_run[r] - m_new);  // no inf - inf
      base[r] = m_new == -INFINITY ? 0.f : m_new;
      m_run[r] = m_new;
      l_part[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < kMmaBN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const float p = s[nt][e] == -INFINITY ? 0.f : exp2f(s[nt][e] - base[r]);
        s[nt][e] = p;
        l_part[r] += p;
      }
    }
#pragma unroll
    for (int nd = 0; nd < ND; ++nd) {
      o[nd][0] *= alpha[0];
      o[nd][1] *= alpha[0];
      o[nd][2] *= alpha[1];
      o[nd][3] *= alpha[1];
    }

    // O += P·V; P's A fragment for keys [16kk, 16kk+16) is S tiles 2kk and 2kk+1.
#pragma unroll
    for (int kk = 0; kk < kMmaBN / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const uint16_t* v0 = sV16 + (kk * 16 + 2 * t) * LDT + g;  // keys 2t, 2t+1 (+8), column g
#pragma unroll
      for (int nd = 0; nd < ND; ++nd) {
        const int c = nd * 8;
        const uint32_t b0 = uint32_t(v0[c]) | (uint32_t(v0[LDT + c]) << 16);
        const uint32_t b1 = uint32_t(v0[8 * LDT + c]) | (uint32_t(v0[9 * LDT + c]) << 16);
        mma16816<T>(o[nd], pa, b0, b1);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_part[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (qi[r] < Sq) {
      const float inv = l > 0.f ? 1.f / l : 0.f;  // fully masked row -> 0
      T* dst = out + b * o_sb + int64_t(h) * o_sh + int64_t(qi[r]) * o_ss + 2 * t;
#pragma unroll
      for (int nd = 0; nd < ND; ++nd)
        *reinterpret_cast<uint32_t*>(dst + nd * 8) = pack2<T>(o[nd][2 * r] * inv, o[nd][2 * r + 1] * inv);
    }
  }
}

template <typename T, int D>
static void launch_prefill_mma(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                               const bool* mask, int group, bool causal, float scale_log2) {
  constexpr size_t bytes = size_t(kMmaBM + 2 * kMmaBN) * (D + 8) * sizeof(T);
  auto kernel = prefill_mma_kernel<T, D>;
  static bool opted_in[128] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 128 || !opted_in[dev]) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    if (dev >= 0 && dev < 128) opted_in[dev] = true;
  }
  const int B = int(q.size(0)), Hq = int(q.size(1)), Sq = int(q.size(2)), Sk = int(k.size(2));
  const int n_tiles = (Sq + kMmaBM - 1) / kMmaBM;
  kernel<<<unsigned(int64_t(n_tiles) * B * Hq), kMmaThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(q.data_ptr()), q.stride(0), q.stride(1), q.stride(2),
      reinterpret_cast<const T*>(k.data_ptr()), k.stride(0), k.stride(1), k.stride(2),
      reinterpret_cast<const T*>(v.data_ptr()), v.stride(0), v.stride(1), v.stride(2),
      reinterpret_cast<T*>(out.data_ptr()), out.stride(0), out.stride(1), out.stride(2), mask, Hq, group, Sq, Sk,
      n_tiles, causal, scale_log2);
  FASTRLHF_LAUNCH_CHECK();
}

// Called by attention_prefill() after its checks (same layout/alignment guarantees).
void prefill_mma(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, const bool* mask,
                 int group, bool causal, float scale_log2) {
  const int64_t D = q.size(3);
  FASTRLHF_DISPATCH_HALF(q.scalar_type(), "attention_prefill", [&] {
    switch (D) {
      case 64: launch_prefill_mma<scalar_t, 64>(q, k, v, out, mask, group, causal, scale_log2); break;
      case 80: launch_prefill_mma<scalar_t, 80>(q, k, v, out, mask, group, causal, scale_log2); break;
      case 96: launch_prefill_mma<scalar_t, 96>(q, k, v, out, mask, group, causal, scale_log2); break;
      default: launch_prefill_mma<scalar_t, 128>(q, k, v, out, mask, group, causal, scale_log2); break;
    }
  });
}

}  // namespace fastrlhf
