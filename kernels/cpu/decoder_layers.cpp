// The decoder layers of the fp32 CPU path in one call: the ops of the other files in sequence.
//
// Owns `tsllm_cpu::decoder_layers`. A decode step at batch 1 reads ~14 MB of weights per layer
// (SmolLM2: ~1 ms on this project's CPU), and each call from Python costs ~120 us of argument
// conversion and dispatch plus the module's own Python (measured); so the whole stack is one
// call, and inside it the ops are plain C++ function calls. The arithmetic is exactly that of
// the ops called one by one (engine/models/decoder.py's layer with these kernels): RMSNorm
// with the residual add, fused q/k/v projection, optional per-head q/k RMSNorm (Qwen3),
// rotary, KV store, paged attention (decode rows in place, prefill chunks by SDPA), output
// projection, RMSNorm with the residual add, gate/up projection, silu * up, down projection.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops.h"

#include <vector>

namespace tsllm {

namespace {

// One layer. w: input norm, qkv, o, post-attention norm, gate_up, down (linears packed);
// e: qkv, o, gate_up and down biases, q and k norms (any may be None).
at::Tensor layer(const at::Tensor& x, at::Tensor& residual, const at::Tensor* w,
                 const c10::optional<at::Tensor>* e, at::IntArrayRef sizes, double eps,
                 const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache,
                 at::Tensor v_cache, const at::Tensor& slot_mapping,
                 const at::Tensor& block_tables, const at::Tensor& seq_lens,
                 const at::Tensor& query_start_loc, double scale, int64_t num_heads,
                 int64_t num_kv_heads, int64_t head_dim) {
    const int64_t tokens = x.size(0), q_size = num_heads * head_dim;
    const int64_t kv_size = num_kv_heads * head_dim;
    const at::Tensor qkv = linear_packed(rms_norm(x, w[0], eps, residual), w[1], sizes[0], e[0]);
    at::Tensor q = qkv.narrow(1, 0, q_size).view({tokens, num_heads, head_dim});
    at::Tensor k = qkv.narrow(1, q_size, kv_size).view({tokens, num_kv_heads, head_dim});
    const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).contiguous()
                             .view({tokens, num_kv_heads, head_dim});
    if (e[4].has_value() && e[4]->defined()) {
        q = rms_norm(q.reshape({-1, head_dim}), *e[4], eps, {}).view(q.sizes());
        k = rms_norm(k.reshape({-1, head_dim}), *e[5], eps, {}).view(k.sizes());
    }
    std::tie(q, k) = rotary(q, k, cos, sin);
    store_kv(k, v, k_cache, v_cache, slot_mapping);
    at::Tensor attn = at::empty_like(q);
    paged_decode(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, attn);
    if (tokens > seq_lens.size(0))
        paged_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, attn);
    const at::Tensor o = linear_packed(attn.view({tokens, q_size}), w[2], sizes[1], e[1]);
    const at::Tensor gate_up = linear_packed(rms_norm(o, w[3], eps, residual), w[4], sizes[2],
                                             e[2]);
    return linear_packed(silu_mul(gate_up), w[5], sizes[3], e[3]);
}

}  // namespace

// weights and extras: six per layer, as `layer` takes them; k_caches, v_caches: one per layer;
// sizes: the four linears' output widths (the same in every layer). `residual` gains every
// layer's attention and MLP outputs but the last MLP's, which is returned (the model's final
// norm adds it).
at::Tensor decoder_layers(const at::Tensor& x, at::Tensor& residual, at::TensorList weights,
                          const c10::List<c10::optional<at::Tensor>>& extras,
                          at::IntArrayRef sizes, double eps, const at::Tensor& cos,
                          const at::Tensor& sin, at::TensorList k_caches,
                          at::TensorList v_caches, const at::Tensor& slot_mapping,
                          const at::Tensor& block_tables, const at::Tensor& seq_lens,
                          const at::Tensor& query_start_loc, double scale, int64_t num_heads,
                          int64_t num_kv_heads, int64_t head_dim) {
    const size_t layers = k_caches.size();
    TORCH_CHECK(v_caches.size() == layers && weights.size() == 6 * layers &&
                extras.size() == 6 * layers && sizes.size() == 4,
                "decoder_layers: 6 weights and 6 extras per layer, a K and a V cache per layer, "
                "4 sizes");
    TORCH_CHECK(sizes[0] == (num_heads + 2 * num_kv_heads) * head_dim,
                "decoder_layers: qkv width");
    const std::vector<c10::optional<at::Tensor>> e(extras.begin(), extras.end());
    at::Tensor h = x;
    for (size_t l = 0; l < layers; ++l)
        h = layer(h, residual, &weights[6 * l], &e[6 * l], sizes, eps, cos, sin, k_caches[l],
                  v_caches[l], slot_mapping, block_tables, seq_lens, query_start_loc, scale,
                  num_heads, num_kv_heads, head_dim);
    return h;
}

}  // namespace tsllm

TORCH_LIBRARY_FRAGMENT(tsllm_cpu, m) {
    m.def("decoder_layers(Tensor x, Tensor(a!) residual, Tensor[] weights, Tensor?[] extras, "
          "int[] sizes, float eps, Tensor cos, Tensor sin, Tensor(b!)[] k_caches, "
          "Tensor(c!)[] v_caches, Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, "
          "Tensor query_start_loc, float scale, int num_heads, int num_kv_heads, "
          "int head_dim) -> Tensor");
    m.impl("decoder_layers", c10::DispatchKey::CPU, &tsllm::decoder_layers);
}
