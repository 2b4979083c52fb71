// The decoder of the CPU path in one call: embedding lookup, every layer, final norm, with
// the kernels of the other files in sequence on raw pointers into one workspace. Activations
// are fp32 whatever the weights' formats; the KV cache is fp32, fp16 or bf16 (rounded to
// nearest even when stored, read as fp32).
//
// Owns the `tsllm_cpu.Decoder` class. A decode step at batch 1 reads ~14 MB of weights per
// layer (SmolLM2: ~1 ms on this project's CPU); around that, each op called from Python cost
// ~120 us of argument conversion and dispatch, each ATen tensor between the kernels a few us
// (30 layers x ~15 tensors: ~1.4 ms a step), converting every layer's weights from a Python
// list ~0.4 ms a step, and each torch op left outside (embedding, rotary table, final norm)
// ~0.1 ms once the weights have streamed through the caches (all measured). So the weights
// are bound once, when the model is packed, a step is one method call, and inside it the
// kernels pass pointers into one workspace. The arithmetic is exactly that of the torch ops
// called one by one (engine/models/decoder.py's layer with these kernels): RMSNorm with the
// residual add, fused q/k/v projection, optional per-head q/k RMSNorm (Qwen3), rotary, KV
// store, paged attention (decode rows in place, prefill chunks by SDPA), output projection,
// RMSNorm with the residual add, gate/up projection, silu * up, down projection.
//
// A tensor-parallel shard (`shard`, engine/models/sharding.py) sums each rank's partial rows
// after the embedding lookup (vocab parallel), the output projection and the down projection
// (row parallel), in place on the workspace, by torch.distributed's functional all-reduce
// called through the dispatcher on the group named; no group: no call.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "ops.h"

#include <cstring>
#include <string>
#include <vector>

namespace tsllm {

namespace {

const float* pointer(const c10::optional<at::Tensor>& t, int64_t numel, const char* what) {
    if (!t.has_value() || !t->defined()) return nullptr;
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == numel,
                "Decoder: ", what, " must be contiguous fp32 of ", numel, " elements");
    return t->data_ptr<float>();
}

Matrix linear_of(const at::Tensor& values, const c10::optional<at::Tensor>& scales,
                 const c10::optional<at::Tensor>& mins, int64_t k, int64_t n, const char* what) {
    const Matrix m = matrix_of(values, scales, mins, n, what);
    TORCH_CHECK(m.k == k, "Decoder: ", what, " takes ", m.k, " inputs, the layer gives ", k);
    return m;
}

// rows [n] summed in place over the process group `group` (torch.distributed's functional ops)
void all_reduce(float* rows, int64_t n, const std::string& group) {
    static const c10::OperatorHandle reduce =
        c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::all_reduce_", "");
    static const c10::OperatorHandle wait =
        c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::wait_tensor", "");
    const at::Tensor t = at::from_blob(rows, {n}, at::TensorOptions().dtype(at::kFloat));
    std::vector<c10::IValue> stack{t, std::string("sum"), group};
    reduce.callBoxed(&stack);
    stack = {t};
    wait.callBoxed(&stack);
}

}  // namespace

// The decoder's weights, bound once; `forward` runs a step's tokens through all of it.
struct Decoder : torch::CustomClassHolder {
    // embed: the embedding table [vocab, hidden] packed as a Matrix (values, scales, mins;
    // a tied head's own). weights and extras: six per layer. Weights: input norm, qkv, o,
    // post-attention norm, gate_up, down (linears: packed values); extras: qkv, o, gate_up
    // and down biases, q and k norms (any may be None); quant: the four linears' scales and
    // mins (None for the unquantized formats). final_norm [hidden]; cos, sin: the rotary
    // tables [positions, head_dim]. sizes: the four linears' output widths; heads: (query
    // heads, KV heads, head dim).
    Decoder(std::vector<c10::optional<at::Tensor>> embed, int64_t vocab,
            std::vector<at::Tensor> weights, std::vector<c10::optional<at::Tensor>> extras,
            std::vector<c10::optional<at::Tensor>> quant, at::Tensor final_norm, at::Tensor cos,
            at::Tensor sin, std::vector<int64_t> sizes, double eps, double scale,
            std::vector<int64_t> heads)
        : embed_(std::move(embed)), weights_(std::move(weights)), extras_(std::move(extras)),
          quant_(std::move(quant)), final_norm_(std::move(final_norm)), cos_(std::move(cos)),
          sin_(std::move(sin)), eps_(eps), scale_(scale) {
        TORCH_CHECK(sizes.size() == 4 && heads.size() == 3, "Decoder: 4 sizes, 3 head numbers");
        TORCH_CHECK(!weights_.empty() && weights_.size() % 6 == 0 &&
                    extras_.size() == weights_.size() && 3 * quant_.size() == 4 * weights_.size()
                    && embed_.size() == 3 && embed_[0].has_value(),
                    "Decoder: 6 weights, 6 extras and 8 scales or mins per layer; an embedding "
                    "of 3 tensors");
        layers_ = static_cast<int64_t>(weights_.size() / 6);
        heads_ = heads[0], kv_heads_ = heads[1], head_dim_ = heads[2];
        hidden_ = weights_[0].numel(), inter_ = sizes[2] / 2;
        TORCH_CHECK(heads_ % kv_heads_ == 0 && head_dim_ % 2 == 0 &&
                    sizes[0] == (heads_ + 2 * kv_heads_) * head_dim_ && sizes[1] == hidden_ &&
                    sizes[2] == 2 * inter_ && sizes[3] == hidden_, "Decoder: layer shapes");
        embed_matrix_ = linear_of(*embed_[0], embed_[1], embed_[2], hidden_, vocab, "embedding");
        pointer(final_norm_, hidden_, "final norm");
        for (const at::Tensor* t : {&cos_, &sin_})
            TORCH_CHECK(t->dim() == 2 && t->size(1) == head_dim_ && t->is_contiguous() &&
                        t->scalar_type() == at::kFloat && t->sizes() == cos_.sizes(),
                        "Decoder: rotary tables fp32 [positions, head_dim]");
        const int64_t q = heads_ * head_dim_;
        for (int64_t l = 0; l < layers_; ++l) {
            const at::Tensor* w = &weights_[6 * l];
            const c10::optional<at::Tensor>* e = &extras_[6 * l];
            const c10::optional<at::Tensor>* s = &quant_[8 * l];
            mats_.insert(mats_.end(), {
                linear_of(w[1], s[0], s[1], hidden_, sizes[0], "qkv"),
                linear_of(w[2], s[2], s[3], q, hidden_, "o"),
                linear_of(w[4], s[4], s[5], hidden_, sizes[2], "gate_up"),
                linear_of(w[5], s[6], s[7], inter_, hidden_, "down")});
            ptrs_.insert(ptrs_.end(), {
                pointer(w[0], hidden_, "input norm"), pointer(w[3], hidden_, "post-attention norm"),
                pointer(e[0], sizes[0], "qkv bias"), pointer(e[1], hidden_, "o bias"),
                pointer(e[2], sizes[2], "gate_up bias"), pointer(e[3], hidden_, "down bias"),
                pointer(e[4], head_dim_, "q norm"), pointer(e[5], head_dim_, "k norm")});
            TORCH_CHECK((ptrs_[8 * l + 6] == nullptr) == (ptrs_[8 * l + 7] == nullptr),
                        "Decoder: q and k norms come together");
        }
    }

    // From now on a tensor-parallel shard: sum over the process group `group`; the
    // embedding holds rows [vocab_start, vocab_start + its rows) of a vocabulary of `vocab`.
    void shard(std::string group, int64_t vocab_start, int64_t vocab) {
        TORCH_CHECK(!group.empty() && vocab_start >= 0 && vocab_start + embed_matrix_.n <= vocab,
                    "Decoder: shard rows outside the vocabulary");
        group_ = std::move(group), vocab_start_ = vocab_start, vocab_ = vocab;
    }

    // input_ids, positions [tokens] int32; k_cache, v_cache: [layers, blocks, block_size,
    // kv_heads, head_dim] fp32, fp16 or bf16. Returns the final norm's output [tokens, hidden].
    at::Tensor forward(at::Tensor input_ids, at::Tensor positions, at::Tensor k_cache,
                       at::Tensor v_cache, at::Tensor slot_mapping, at::Tensor block_tables,
                       at::Tensor seq_lens, at::Tensor query_start_loc) {
        const int64_t tokens = input_ids.numel(), dim = head_dim_;
        const int64_t q_size = heads_ * dim, kv_size = kv_heads_ * dim;
        const int64_t width = q_size + 2 * kv_size, hidden = hidden_, inter = inter_;
        for (const at::Tensor* c : {&k_cache, &v_cache})
            TORCH_CHECK(c->dim() == 5 && c->size(0) == layers_ && c->size(3) == kv_heads_ &&
                        c->size(4) == dim && c->is_contiguous() &&
                        c->scalar_type() == k_cache.scalar_type() && c->sizes() == k_cache.sizes(),
                        "Decoder: caches [", layers_, ", blocks, block_size, ", kv_heads_,
                        ", ", dim, "] of one dtype, contiguous");
        const at::ScalarType cache = k_cache.scalar_type();
        with_float_type(cache, "Decoder: the caches", [](auto) {});
        for (const at::Tensor* m : {&input_ids, &positions, &slot_mapping, &block_tables,
                                    &seq_lens, &query_start_loc})
            TORCH_CHECK(m->scalar_type() == at::kInt && m->is_contiguous(),
                        "Decoder: step inputs must be contiguous int32");
        const int64_t num_seqs = seq_lens.size(0), block_size = k_cache.size(2);
        TORCH_CHECK(positions.numel() == tokens && slot_mapping.numel() == tokens &&
                    query_start_loc.numel() == num_seqs + 1 && block_tables.dim() == 2 &&
                    block_tables.size(0) == num_seqs, "Decoder: step input shapes");
        const int64_t slots = k_cache.size(1) * block_size;
        const int64_t layer_bytes = slots * kv_size * k_cache.element_size();

        const auto opts = final_norm_.options();
        at::Tensor out = at::empty({tokens, hidden}, opts);
        at::Tensor work = at::empty(
            {tokens * (4 * hidden + width + q_size + 3 * inter + 2 * dim)}, opts);
        float* res = work.data_ptr<float>();    // the residual stream
        float* x = res + tokens * hidden;       // a layer's output, the next one's input
        float* h = x + tokens * hidden;         // normed input of attention, then of the MLP
        float* o = h + tokens * hidden;         // attention output projected
        float* qkv = o + tokens * hidden;
        float* attn = qkv + tokens * width;
        float* gate_up = attn + tokens * q_size;
        float* act = gate_up + tokens * 2 * inter;
        float* c = act + tokens * inter;        // cos and sin rows of the tokens' positions
        float* s = c + tokens * dim;
        const int32_t* ids = input_ids.data_ptr<int32_t>();
        const int32_t* pos = positions.data_ptr<int32_t>();
        const int64_t vocab = vocab_ ? vocab_ : embed_matrix_.n, max_pos = cos_.size(0);
        for (int64_t t = 0; t < tokens; ++t) {
            TORCH_CHECK(ids[t] >= 0 && ids[t] < vocab, "Decoder: token id ", ids[t],
                        " outside the vocabulary of ", vocab);
            TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "Decoder: position ", pos[t],
                        " outside the rotary table of ", max_pos);
            std::memcpy(c + t * dim, cos_.data_ptr<float>() + pos[t] * dim, dim * sizeof(float));
            std::memcpy(s + t * dim, sin_.data_ptr<float>() + pos[t] * dim, dim * sizeof(float));
        }
        if (group_.empty()) {
            gather_rows(embed_matrix_, ids, tokens, res);
        } else {    // this shard's rows, zeros for the others, summed over the ranks
            for (int64_t t = 0; t < tokens; ++t) {
                const int32_t local = ids[t] - static_cast<int32_t>(vocab_start_);
                if (local >= 0 && local < embed_matrix_.n)
                    gather_rows(embed_matrix_, &local, 1, res + t * hidden);
                else
                    std::memset(res + t * hidden, 0, hidden * sizeof(float));
            }
            all_reduce(res, tokens * hidden, group_);
        }
        const int32_t* slot = slot_mapping.data_ptr<int32_t>();
        for (int64_t l = 0; l < layers_; ++l) {
            const float* const* p = &ptrs_[8 * l];     // norms, biases, q and k norms
            const Matrix* m = &mats_[4 * l];            // qkv, o, gate_up, down
            char* kc = static_cast<char*>(k_cache.data_ptr()) + l * layer_bytes;
            char* vc = static_cast<char*>(v_cache.data_ptr()) + l * layer_bytes;
            if (l == 0)     // the residual is the embeddings: nothing to add yet
                rms_norm_rows(res, hidden, nullptr, p[0], tokens, hidden, eps_, h, hidden);
            else
                rms_norm_rows(x, hidden, res, p[0], tokens, hidden, eps_, h, hidden);
            matrix_rows(h, tokens, m[0], p[2], qkv);
            float* q = qkv;
            float* k = qkv + q_size;
            if (p[6])
                for (int64_t t = 0; t < tokens; ++t) {
                    rms_norm_rows(q + t * width, dim, nullptr, p[6], heads_, dim, eps_,
                                  q + t * width, dim);
                    rms_norm_rows(k + t * width, dim, nullptr, p[7], kv_heads_, dim, eps_,
                                  k + t * width, dim);
                }
            rotary_rows(q, width, dim, q, width, tokens, heads_, dim, c, s);
            rotary_rows(k, width, dim, k, width, tokens, kv_heads_, dim, c, s);
            store_rows(k, k + kv_size, width, kc, vc, cache, slot, tokens, slots, kv_size);
            decode_rows(q, width, dim, kc, vc, cache, block_tables.data_ptr<int32_t>(),
                        block_tables.size(1), seq_lens.data_ptr<int32_t>(),
                        query_start_loc.data_ptr<int32_t>(), num_seqs, block_size, kv_heads_,
                        heads_, dim, scale_, attn, q_size, dim);
            if (tokens > num_seqs) {    // prefill chunks: tensors over the same memory
                const at::Tensor qv =
                    at::from_blob(q, {tokens, heads_, dim}, {width, dim, 1}, opts);
                at::Tensor av = at::from_blob(attn, {tokens, heads_, dim}, opts);
                paged_prefill(qv, k_cache[l], v_cache[l], block_tables, seq_lens,
                              query_start_loc, scale_, av);
            }
            matrix_rows(attn, tokens, m[1], p[3], o);
            if (!group_.empty()) all_reduce(o, tokens * hidden, group_);
            rms_norm_rows(o, hidden, res, p[1], tokens, hidden, eps_, h, hidden);
            matrix_rows(h, tokens, m[2], p[4], gate_up);
            silu_mul_rows(gate_up, tokens, inter, act);
            matrix_rows(act, tokens, m[3], p[5], x);
            if (!group_.empty()) all_reduce(x, tokens * hidden, group_);
        }
        rms_norm_rows(x, hidden, res, final_norm_.data_ptr<float>(), tokens, hidden, eps_,
                      out.data_ptr<float>(), hidden);
        return out;
    }

  private:
    std::vector<c10::optional<at::Tensor>> embed_;     // kept alive: the pointers below
    std::vector<at::Tensor> weights_;                   // point into these tensors
    std::vector<c10::optional<at::Tensor>> extras_, quant_;
    at::Tensor final_norm_, cos_, sin_;
    Matrix embed_matrix_;
    std::vector<Matrix> mats_;              // per layer: qkv, o, gate_up, down
    std::vector<const float*> ptrs_;        // per layer: 2 norms, 4 biases, q, k norms (or null)
    int64_t layers_, heads_, kv_heads_, head_dim_, hidden_, inter_;
    double eps_, scale_;
    std::string group_;                     // tensor parallel: the process group, else empty
    int64_t vocab_start_ = 0, vocab_ = 0;   // the embedding shard's first row, the vocabulary
};

}  // namespace tsllm

TORCH_LIBRARY_FRAGMENT(tsllm_cpu, m) {
    m.class_<tsllm::Decoder>("Decoder")
        .def(torch::init<std::vector<c10::optional<at::Tensor>>, int64_t,
                         std::vector<at::Tensor>, std::vector<c10::optional<at::Tensor>>,
                         std::vector<c10::optional<at::Tensor>>, at::Tensor, at::Tensor,
                         at::Tensor, std::vector<int64_t>, double, double,
                         std::vector<int64_t>>())
        .def("shard", &tsllm::Decoder::shard)
        .def("forward", &tsllm::Decoder::forward);
}
