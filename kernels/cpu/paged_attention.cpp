// Paged decode attention on CPU: every decode row of a step in one call, K/V read in place.
//
// Owns the `tsllm_cpu::paged_decode` and `tsllm_cpu::paged_prefill` ops. For each sequence
// whose query length is 1, paged_decode walks the block table and reads each cached K/V block
// where it lies (no gather copy), keeping an online softmax per query head (paged_decode.h), so
// K and V are each read once per step. Rows of longer queries (prefill chunks) are attended by
// paged_prefill, as the reference does them. Shapes and conventions are kernels/reference.py's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops.h"

#include <vector>

#include "paged_decode.h"

namespace tsllm {

template <typename T, typename C>
void decode_typed(const T* q, int64_t q_token_stride, int64_t q_head_stride, const C* k_cache,
                  const C* v_cache, const int32_t* tables, int64_t max_blocks,
                  const int32_t* seq_lens, const int32_t* query_start_loc, int64_t num_seqs,
                  int64_t block_size, int64_t kv_heads, int64_t heads, int64_t dim,
                  double scale, T* out, int64_t out_token_stride, int64_t out_head_stride) {
    at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> work(decode::scratch_size(heads, dim, block_size));
        for (int64_t s = begin; s < end; ++s) {
            if (query_start_loc[s + 1] - query_start_loc[s] != 1) continue;
            const int64_t row = query_start_loc[s];
            decode::attend(q + row * q_token_stride, q_head_stride, k_cache, v_cache,
                           tables + s * max_blocks, seq_lens[s], block_size, kv_heads,
                           heads / kv_heads, dim, static_cast<float>(scale),
                           out + row * out_token_stride, out_head_stride, work.data());
        }
    });
}

void decode_rows(const float* q, int64_t q_token_stride, int64_t q_head_stride,
                 const void* k_cache, const void* v_cache, at::ScalarType cache,
                 const int32_t* tables, int64_t max_blocks, const int32_t* seq_lens,
                 const int32_t* query_start_loc, int64_t num_seqs, int64_t block_size,
                 int64_t kv_heads, int64_t heads, int64_t dim, double scale, float* out,
                 int64_t out_token_stride, int64_t out_head_stride) {
    with_float_type(cache, "paged_decode: the cache", [&](auto c) {
        using C = decltype(c);
        decode_typed(q, q_token_stride, q_head_stride, static_cast<const C*>(k_cache),
                     static_cast<const C*>(v_cache), tables, max_blocks, seq_lens,
                     query_start_loc, num_seqs, block_size, kv_heads, heads, dim, scale, out,
                     out_token_stride, out_head_stride);
    });
}

void paged_decode(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens,
                  const at::Tensor& query_start_loc, double scale, at::Tensor& out) {
    TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 4 && query.stride(2) == 1 &&
                out.stride(2) == 1, "paged_decode: query/out [tokens, heads, dim], dim contiguous");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
                "paged_decode: caches must be contiguous");
    TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                query_start_loc.scalar_type() == at::kInt && block_tables.is_contiguous(),
                "paged_decode: block_tables, seq_lens, query_start_loc must be int32");
    TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() &&
                out.scalar_type() == query.scalar_type() &&
                (query.scalar_type() == k_cache.scalar_type() ||
                 query.scalar_type() == at::kFloat),
                "paged_decode: the caches share a dtype, out the query's, and the query is fp32 "
                "or of the caches' dtype");
    const int64_t heads = query.size(1), dim = query.size(2);
    const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
    TORCH_CHECK(heads % kv_heads == 0 && k_cache.size(3) == dim, "paged_decode: head shapes");
    with_float_type(query.scalar_type(), "paged_decode: the query", [&](auto zero) {
        using T = decltype(zero);
        with_float_type(k_cache.scalar_type(), "paged_decode: the cache", [&](auto c) {
            using C = decltype(c);
            decode_typed(query.data_ptr<T>(), query.stride(0), query.stride(1),
                         static_cast<const C*>(k_cache.data_ptr()),
                         static_cast<const C*>(v_cache.data_ptr()),
                         block_tables.data_ptr<int32_t>(), block_tables.size(1),
                         seq_lens.data_ptr<int32_t>(), query_start_loc.data_ptr<int32_t>(),
                         seq_lens.size(0), block_size, kv_heads, heads, dim, scale,
                         out.data_ptr<T>(), out.stride(0), out.stride(1));
        });
    });
}

// Rows of query length > 1 (prefill chunks), one sequence at a time, as kernels/reference.py
// does them: its blocks gathered, then SDPA with a bottom-right causal mask. Decode rows are
// left untouched (paged_decode writes them).
void paged_prefill(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& seq_lens,
                   const at::Tensor& query_start_loc, double scale, at::Tensor& out) {
    const int64_t num_seqs = seq_lens.size(0), block_size = k_cache.size(1);
    const int32_t* lens = seq_lens.data_ptr<int32_t>();
    const int32_t* starts = query_start_loc.data_ptr<int32_t>();
    for (int64_t s = 0; s < num_seqs; ++s) {
        const int64_t start = starts[s], q_len = starts[s + 1] - start, ctx = lens[s];
        if (q_len <= 1) continue;
        const int64_t num = (ctx + block_size - 1) / block_size;
        const at::Tensor ids = block_tables[s].narrow(0, 0, num).to(at::kLong).clamp_min(0);
        auto gather = [&](const at::Tensor& cache) {
            at::Tensor rows = cache.index_select(0, ids).flatten(0, 1).narrow(0, 0, ctx);
            return rows.to(at::kFloat).transpose(0, 1).unsqueeze(0);
        };
        c10::optional<at::Tensor> mask;
        if (q_len < ctx) {
            const at::Tensor q_pos = at::arange(ctx - q_len, ctx, query.options().dtype(at::kLong));
            mask = q_pos.unsqueeze(1) >= at::arange(ctx, q_pos.options()).unsqueeze(0);
        }
        const at::Tensor q =
            query.narrow(0, start, q_len).to(at::kFloat).transpose(0, 1).unsqueeze(0);
        const at::Tensor o = at::scaled_dot_product_attention(
            q, gather(k_cache), gather(v_cache), mask, 0.0, !mask.has_value(), scale, true);
        out.narrow(0, start, q_len).copy_(o[0].transpose(0, 1));
    }
}

}  // namespace tsllm

TORCH_LIBRARY_FRAGMENT(tsllm_cpu, m) {
    m.def("paged_decode(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
          "Tensor seq_lens, Tensor query_start_loc, float scale, Tensor(a!) out) -> ()");
    m.impl("paged_decode", c10::DispatchKey::CPU, &tsllm::paged_decode);
    m.def("paged_prefill(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
          "Tensor seq_lens, Tensor query_start_loc, float scale, Tensor(a!) out) -> ()");
    m.impl("paged_prefill", c10::DispatchKey::CPU, &tsllm::paged_prefill);
}
