// One decoder layer of the fp32 CPU path in one call: the ops of the other files in sequence.
//
// Owns `tsllm_cpu::decoder_layer`. A decode step at batch 1 spends ~0.5 ms of Python and
// dispatch per layer around ~1 ms of weight reads (SmolLM2, this project's CPU); calling the
// ops as C++ functions leaves one dispatch per layer. The arithmetic is exactly that of the
// ops called one by one (engine/models/decoder.py's layer with these kernels): RMSNorm with
// the residual add, fused q/k/v projection, optional per-head q/k RMSNorm (Qwen3), rotary,
// KV store, paged attention (decode rows in place, prefill chunks by SDPA), output
// projection, RMSNorm with the residual add, gate/up projection, silu * up, down projection.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops.h"

namespace tsllm {

// weights: input norm, qkv, o, post-attention norm, gate_up, down (linears packed);
// extras: qkv, o, gate_up and down biases, q and k norms (any may be None);
// sizes: the four linears' output widths. Returns the MLP output (not yet in the residual).
at::Tensor decoder_layer(const at::Tensor& x, at::Tensor& residual, at::TensorList weights,
                         const c10::List<c10::optional<at::Tensor>>& extras, at::IntArrayRef sizes,
                         double eps, const at::Tensor& cos, const at::Tensor& sin,
                         at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping,
                         const at::Tensor& block_tables, const at::Tensor& seq_lens,
                         const at::Tensor& query_start_loc, double scale, int64_t num_heads,
                         int64_t num_kv_heads, int64_t head_dim) {
    TORCH_CHECK(weights.size() == 6 && extras.size() == 6 && sizes.size() == 4,
                "decoder_layer: 6 weights, 6 extras and 4 sizes");
    const int64_t tokens = x.size(0), q_size = num_heads * head_dim;
    const int64_t kv_size = num_kv_heads * head_dim;
    TORCH_CHECK(sizes[0] == q_size + 2 * kv_size, "decoder_layer: qkv width");
    auto extra = [&](size_t i) { return static_cast<c10::optional<at::Tensor>>(extras.get(i)); };
    const at::Tensor qkv = linear_packed(rms_norm(x, weights[0], eps, residual), weights[1],
                                         sizes[0], extra(0));
    at::Tensor q = qkv.narrow(1, 0, q_size).view({tokens, num_heads, head_dim});
    at::Tensor k = qkv.narrow(1, q_size, kv_size).view({tokens, num_kv_heads, head_dim});
    const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).contiguous()
                             .view({tokens, num_kv_heads, head_dim});
    const c10::optional<at::Tensor> q_norm = extra(4), k_norm = extra(5);
    if (q_norm.has_value() && q_norm->defined()) {
        q = rms_norm(q.reshape({-1, head_dim}), *q_norm, eps, {}).view(q.sizes());
        k = rms_norm(k.reshape({-1, head_dim}), *k_norm, eps, {}).view(k.sizes());
    }
    std::tie(q, k) = rotary(q, k, cos, sin);
    store_kv(k, v, k_cache, v_cache, slot_mapping);
    at::Tensor attn = at::empty_like(q);
    paged_decode(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, attn);
    if (tokens > seq_lens.size(0))
        paged_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, attn);
    const at::Tensor o = linear_packed(attn.view({tokens, q_size}), weights[2], sizes[1], extra(1));
    const at::Tensor gate_up = linear_packed(rms_norm(o, weights[3], eps, residual), weights[4],
                                             sizes[2], extra(2));
    return linear_packed(silu_mul(gate_up), weights[5], sizes[3], extra(3));
}

}  // namespace tsllm

TORCH_LIBRARY_FRAGMENT(tsllm_cpu, m) {
    m.def("decoder_layer(Tensor x, Tensor(a!) residual, Tensor[] weights, Tensor?[] extras, "
          "int[] sizes, float eps, Tensor cos, Tensor sin, Tensor(b!) k_cache, "
          "Tensor(c!) v_cache, Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, "
          "Tensor query_start_loc, float scale, int num_heads, int num_kv_heads, "
          "int head_dim) -> Tensor");
    m.impl("decoder_layer", c10::DispatchKey::CPU, &tsllm::decoder_layer);
}
