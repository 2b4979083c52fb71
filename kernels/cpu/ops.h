// The compiled CPU kernels as C++ functions, so that decoder.cpp calls them directly (no
// dispatcher, no Python, no tensors between them): each works on raw pointers (strides in
// elements unless named bytes) and is defined in the file named beside it, next to the torch
// op (`torch.ops.tsllm_cpu.<name>`) that checks its tensors and calls it.
#pragma once

#include <ATen/ATen.h>

namespace tsllm {

// fn(T{}) with T the element type of a fp32, fp16 or bf16 tensor (`what` names it otherwise)
template <typename Fn>
void with_float_type(at::ScalarType type, const char* what, const Fn& fn) {
    switch (type) {
        case at::kFloat: return fn(float{});
        case at::kHalf: return fn(c10::Half{});
        case at::kBFloat16: return fn(c10::BFloat16{});
        default: TORCH_CHECK(false, what, " must be fp32, fp16 or bf16, got ", type);
    }
}

constexpr int64_t kPanel = 16;       // outputs per packed panel: two AVX2 vectors

// matrix.cpp: a weight [n, k] in one of several formats, packed in panels of kPanel outputs,
// input-major (values [ceil(n / kPanel), k, kPanel]; q4: [.., k / 2, kPanel] bytes whose low
// nibble is input 2i and high nibble input 2i + 1). Quantized formats carry fp32 scales (and
// optionally mins) [.., k / group, kPanel]: w = q * scale + min, rounded once (an FMA).
enum class Format : int64_t { kF32, kBF16, kF16, kQ8, kQ4 };
struct Matrix {
    Format format;
    int64_t n, k, group;         // group: k for the unquantized formats
    const void* values;
    const float* scales;         // null for the unquantized formats
    const float* mins;           // null where every min is zero
};
// The Matrix over a packed weight's tensors (checked; format from the values' dtype).
Matrix matrix_of(const at::Tensor& values, const c10::optional<at::Tensor>& scales,
                 const c10::optional<at::Tensor>& mins, int64_t n, const char* what);
// y [m, n] = x [m, k] W^T + bias
void matrix_rows(const float* x, int64_t m, const Matrix& w, const float* bias, float* y);
// out [count, k] = rows ids of W (an embedding lookup in the weight's own format)
void gather_rows(const Matrix& w, const int32_t* ids, int64_t count, float* out);

// linear.cpp: y [m, n] = x [m, k] W^T + bias, W packed [ceil(n / kPanel), k, kPanel]
void linear_rows(const float* x, int64_t m, int64_t k, const float* packed, int64_t n,
                 const float* bias, float* y);
// norm_rope.cpp: y may be x (no residual); rotary's out may be x (same strides)
void rms_norm_rows(const float* x, int64_t x_stride, float* residual, const float* weight,
                   int64_t rows, int64_t n, double eps, float* y, int64_t y_stride);
void rotary_rows(const float* x, int64_t x_token_stride, int64_t x_head_stride, float* out,
                 int64_t out_token_stride, int64_t tokens, int64_t heads, int64_t dim,
                 const float* cos, const float* sin);
// activation.cpp
void silu_mul_rows(const float* gate_up, int64_t rows, int64_t n, float* y);
// store_kv.cpp: token t's K and V rows (`row` elements each, `stride` apart) into slot[t] of
// caches of type `cache` (fp32, fp16, bf16: rounded to nearest even)
void store_rows(const float* k, const float* v, int64_t stride, void* k_cache, void* v_cache,
                at::ScalarType cache, const int32_t* slot, int64_t tokens, int64_t slots,
                int64_t row);
// paged_attention.cpp: the decode rows (query length 1) of each sequence, fp32 queries over
// caches of type `cache` (fp32, fp16, bf16; read as fp32), and the op's prefill chunks (SDPA
// per sequence; tensors, as the op takes them)
void decode_rows(const float* q, int64_t q_token_stride, int64_t q_head_stride,
                 const void* k_cache, const void* v_cache, at::ScalarType cache,
                 const int32_t* tables, int64_t max_blocks, const int32_t* seq_lens,
                 const int32_t* query_start_loc, int64_t num_seqs, int64_t block_size,
                 int64_t kv_heads, int64_t heads, int64_t dim, double scale, float* out,
                 int64_t out_token_stride, int64_t out_head_stride);
void paged_prefill(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& seq_lens,
                   const at::Tensor& query_start_loc, double scale, at::Tensor& out);

}  // namespace tsllm
