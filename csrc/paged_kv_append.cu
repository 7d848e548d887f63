// Paged KV append: write new keys/values k, v [T, Hkv, D] into the pools [num_blocks, Hkv,
// block_size, D] at slot_mapping[t] = block * block_size + offset, in place. Slots < 0 are
// skipped (padding rows of a static-shape batch); a slot past the pool is dropped rather than
// written out of bounds (the ops layer checks slots on CPU tensors; here that would sync).
#include "common.cuh"

namespace fastrlhf {

struct RowStrides {
  int64_t a, b, c;  // strides of the first three dims; the last one is contiguous (checked)
};

static RowStrides row_strides(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.dim() == 4 ? t.stride(2) : 0};
}

// One block per token: every head's D features of k and v, one 16-byte vector per thread step.
template <typename T>
__global__ void paged_append_kernel(T* __restrict__ kp, RowStrides kps, T* __restrict__ vp, RowStrides vps,
                                    const T* __restrict__ k, RowStrides ks, const T* __restrict__ v, RowStrides vs,
                                    const int64_t* __restrict__ slots, int H, int D, int block_size,
                                    int64_t n_slots) {
  constexpr int V = Vec<T>::N;
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  if (slot < 0 || slot >= n_slots) return;
  const int64_t blk = slot / block_size, row = slot % block_size;
  const int n_vec = D / V;
  for (int e = threadIdx.x; e < H * n_vec; e += blockDim.x) {
    const int h = e / n_vec, d = (e % n_vec) * V;
    const int64_t src_k = t * ks.a + h * ks.b + d, src_v = t * vs.a + h * vs.b + d;
    *reinterpret_cast<uint4*>(kp + blk * kps.a + h * kps.b + row * kps.c + d) =
        *reinterpret_cast<const uint4*>(k + src_k);
    *reinterpret_cast<uint4*>(vp + blk * vps.a + h * vps.b + row * vps.c + d) =
        *reinterpret_cast<const uint4*>(v + src_v);
  }
}

void paged_kv_append_(at::Tensor& k_pool, at::Tensor& v_pool, const at::Tensor& k_in, const at::Tensor& v_in,
                      const at::Tensor& slot_mapping) {
  FASTRLHF_CHECK_CUDA(k_pool);
  FASTRLHF_CHECK_FLOATING(k_pool);
  TORCH_CHECK(k_pool.dim() == 4 && v_pool.sizes() == k_pool.sizes() && v_pool.scalar_type() == k_pool.scalar_type(),
              "paged_kv_append: k_pool and v_pool must be equal [num_blocks, Hkv, block_size, D] tensors");
  const int64_t H = k_pool.size(1), block_size = k_pool.size(2), D = k_pool.size(3);
  TORCH_CHECK(k_in.dim() == 3 && v_in.sizes() == k_in.sizes() && k_in.size(1) == H && k_in.size(2) == D,
              "paged_kv_append: k and v must be [T, Hkv, D] matching the pools ", k_pool.sizes());
  const int64_t T = k_in.size(0);
  TORCH_CHECK(slot_mapping.numel() == T, "paged_kv_append: slot_mapping needs one slot per token");
  const int64_t V = vec_elems(k_pool.scalar_type());
  TORCH_CHECK(vector_friendly(k_pool, V) && vector_friendly(v_pool, V),
              "paged_kv_append: the pools must be 16-byte aligned with a contiguous last dim");
  c10::cuda::CUDAGuard guard(k_pool.device());
  // New tokens are cast to the pool dtype, like the reference's .to(k_pool.dtype).
  at::Tensor k = k_in.to(k_pool.device(), k_pool.scalar_type());
  at::Tensor v = v_in.to(k_pool.device(), k_pool.scalar_type());
  if (!vector_friendly(k, V)) k = k.contiguous();
  if (!vector_friendly(v, V)) v = v.contiguous();
  at::Tensor slots = slot_mapping.to(k_pool.device(), at::kLong).reshape({T}).contiguous();
  if (T == 0 || H * D == 0) return;
  TORCH_CHECK(T < (int64_t(1) << 31), "paged_kv_append: too many tokens");
  const int threads = int(std::min<int64_t>(256, (H * D / V + 31) / 32 * 32));
  FASTRLHF_DISPATCH_FLOAT(k_pool.scalar_type(), "paged_kv_append", [&] {
    paged_append_kernel<scalar_t><<<unsigned(T), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<scalar_t*>(k_pool.data_ptr()), row_strides(k_pool),
        reinterpret_cast<scalar_t*>(v_pool.data_ptr()), row_strides(v_pool),
        reinterpret_cast<const scalar_t*>(k.data_ptr()), row_strides(k),
        reinterpret_cast<const scalar_t*>(v.data_ptr()), row_strides(v), slots.data_ptr<int64_t>(), int(H), int(D),
        int(block_size), k_pool.size(0) * block_size);
    FASTRLHF_LAUNCH_CHECK();
  });
}

}  // namespace fastrlhf
