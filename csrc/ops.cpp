// Registration of the fastrlhf CUDA kernels as torch.library custom ops (namespace
// fastrlhf_cuda). Schemas declare which arguments are mutated so torch.compile can
// functionalise them; fake (meta) implementations live in fastrlhf/ops/cuda_backend.py.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

namespace fastrlhf {
at::Tensor attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& cache_lens, const c10::optional<at::Tensor>& cache_starts, double scale);
at::Tensor attention_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                             const c10::optional<at::Tensor>& attention_mask, double scale);
at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& lora_a, const c10::optional<at::Tensor>& lora_b,
                       double scaling);
at::Tensor lora_fuse(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling);
void lora_fuse_out(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
                   at::Tensor& out);
at::Tensor rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& weight, double eps);
std::tuple<at::Tensor, at::Tensor> rms_norm_residual(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                                     double eps, const at::Tensor& residual);
at::Tensor layer_norm(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias, double eps);
std::tuple<at::Tensor, at::Tensor> layer_norm_residual(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                                       const c10::optional<at::Tensor>& bias, double eps,
                                                       const at::Tensor& residual);
void rotary_(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
             int64_t rotary_dim);
void kv_cache_append_(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& positions);
// paged KV cache (paged_attention_decode.cu, paged_kv_append.cu); softcap <= 0 and window <= 0 mean none
at::Tensor paged_attention_decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                  const c10::optional<at::Tensor>& alibi_slopes, double scale, double softcap,
                                  int64_t window);
void paged_kv_append_(at::Tensor& k_pool, at::Tensor& v_pool, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& slot_mapping);
}  // namespace fastrlhf

TORCH_LIBRARY(fastrlhf_cuda, m) {
  m.def("attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, Tensor? cache_starts, "
        "float scale) -> Tensor");
  m.def("attention_prefill(Tensor q, Tensor k, Tensor v, bool causal, Tensor? attention_mask, float scale) -> Tensor");
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? lora_a, Tensor? lora_b, float scaling) -> Tensor");
  m.def("lora_fuse(Tensor weight, Tensor lora_a, Tensor lora_b, float scaling) -> Tensor");
  m.def("lora_fuse_out(Tensor weight, Tensor lora_a, Tensor lora_b, float scaling, Tensor(a!) out) -> ()");
  m.def("rms_norm(Tensor x, Tensor? weight, float eps) -> Tensor");
  m.def("rms_norm_residual(Tensor x, Tensor? weight, float eps, Tensor residual) -> (Tensor, Tensor)");
  m.def("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor");
  m.def("layer_norm_residual(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor residual) -> (Tensor, Tensor)");
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor positions, int rotary_dim) -> ()");
  m.def("kv_cache_append_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor positions) -> ()");
  m.def("paged_attention_decode(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, Tensor seq_lens, "
        "Tensor? alibi_slopes, float scale, float softcap, int window) -> Tensor");
  m.def("paged_kv_append_(Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor k, Tensor v, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(fastrlhf_cuda, CUDA, m) {
  m.impl("attention_decode", &fastrlhf::attention_decode);
  m.impl("attention_prefill", &fastrlhf::attention_prefill);
  m.impl("lora_linear", &fastrlhf::lora_linear);
  m.impl("lora_fuse", &fastrlhf::lora_fuse);
  m.impl("lora_fuse_out", &fastrlhf::lora_fuse_out);
  m.impl("rms_norm", &fastrlhf::rms_norm);
  m.impl("rms_norm_residual", &fastrlhf::rms_norm_residual);
  m.impl("layer_norm", &fastrlhf::layer_norm);
  m.impl("layer_norm_residual", &fastrlhf::layer_norm_residual);
  m.impl("rotary_", &fastrlhf::rotary_);
  m.impl("kv_cache_append_", &fastrlhf::kv_cache_append_);
  m.impl("paged_attention_decode", &fastrlhf::paged_attention_decode);
  m.impl("paged_kv_append_", &fastrlhf::paged_kv_append_);
}
