// The compiled CPU ops as C++ functions, so that decoder_layers.cpp calls them directly (no
// dispatcher, no Python); each is defined, and registered as `torch.ops.tsllm_cpu.<name>`, in
// the file named beside it.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace tsllm {

// linear.cpp
at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                         const c10::optional<at::Tensor>& bias);
// norm_rope.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                    const c10::optional<at::Tensor>& residual);
std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& cos, const at::Tensor& sin);
// activation.cpp
at::Tensor silu_mul(const at::Tensor& gate_up);
// store_kv.cpp
void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
              at::Tensor& v_cache, const at::Tensor& slot_mapping);
// paged_attention.cpp
void paged_decode(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens,
                  const at::Tensor& query_start_loc, double scale, at::Tensor& out);
void paged_prefill(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& seq_lens,
                   const at::Tensor& query_start_loc, double scale, at::Tensor& out);

}  // namespace tsllm
