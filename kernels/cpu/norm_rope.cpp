// RMSNorm and rotary embedding on CPU, one op each instead of the six and ~twenty small torch
// ops a decode step would dispatch per layer for them.
//
// Owns `tsllm_cpu::rms_norm` (fp32 rows: w * (x * rsqrt(mean(x^2) + eps)), rounded as torch
// rounds it; only the sum's order differs; optionally after adding x into the residual
// stream) and `tsllm_cpu::rotary` (rotate-half convention on the queries and keys of a step,
// bit-identical to x * cos + rotate_half(x) * sin: this file is built without FMA contraction).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops.h"

#include <cmath>
#include <tuple>

#include "vec.h"

namespace tsllm {

void rms_norm_rows(const float* x, int64_t x_stride, float* residual, const float* weight,
                   int64_t rows, int64_t n, double eps, float* y, int64_t y_stride) {
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const float* h = x + r * x_stride;
            if (residual) {
                float* res = residual + r * n;
                for (int64_t i = 0; i < n; ++i) res[i] += h[i];
                h = res;
            }
            const float mean = vec::dot(h, h, n) / static_cast<float>(n);
            const float inv = 1.f / std::sqrt(mean + static_cast<float>(eps));
            float* out = y + r * y_stride;
            for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (h[i] * inv);
        }
    });
}

// y = w * (h * rsqrt(mean(h^2) + eps)) with h = x, or, given a residual, h = residual + x
// stored back into the residual (the decoder's residual add fused into its next norm).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                    const c10::optional<at::Tensor>& residual) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat &&
                weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
                weight.numel() == x.size(1), "rms_norm: contiguous fp32 [rows, n], weight [n]");
    float* rp = nullptr;
    if (residual.has_value() && residual->defined()) {
        TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous() &&
                    residual->scalar_type() == at::kFloat, "rms_norm: residual like x");
        rp = residual->data_ptr<float>();
    }
    const int64_t n = x.size(1);
    at::Tensor y = at::empty_like(x);
    rms_norm_rows(x.data_ptr<float>(), n, rp, weight.data_ptr<float>(), x.size(0), n, eps,
                  y.data_ptr<float>(), n);
    return y;
}

void rotary_rows(const float* x, int64_t x_token_stride, int64_t x_head_stride, float* out,
                 int64_t out_token_stride, int64_t tokens, int64_t heads, int64_t dim,
                 const float* cos, const float* sin) {
    const int64_t half = dim / 2;
    for (int64_t t = 0; t < tokens; ++t) {
        const float* c = cos + t * dim;
        const float* s = sin + t * dim;
        for (int64_t h = 0; h < heads; ++h) {
            const float* xi = x + t * x_token_stride + h * x_head_stride;
            float* o = out + t * out_token_stride + h * dim;
            for (int64_t i = 0; i < half; ++i) {
                const float a = xi[i], b = xi[i + half];    // read both first: o may be xi
                o[i] = a * c[i] + (-b) * s[i];
                o[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

// out[t, h] = x[t, h] * cos[t] + rotate_half(x[t, h]) * sin[t]; out is contiguous.
static at::Tensor rotate(const at::Tensor& x, const float* cos, const float* sin) {
    const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2);
    at::Tensor out = at::empty({tokens, heads, dim}, x.options());
    rotary_rows(x.data_ptr<float>(), x.stride(0), x.stride(1), out.data_ptr<float>(),
                heads * dim, tokens, heads, dim, cos, sin);
    return out;
}

std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& cos, const at::Tensor& sin) {
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1 &&
                q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat,
                "rotary: fp32 q/k [tokens, heads, dim], dim contiguous");
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat &&
                sin.scalar_type() == at::kFloat && cos.numel() == q.size(0) * q.size(2) &&
                sin.numel() == cos.numel() && q.size(2) % 2 == 0,
                "rotary: cos/sin fp32 [tokens, 1, dim] contiguous");
    const float* c = cos.data_ptr<float>();
    const float* s = sin.data_ptr<float>();
    return {rotate(q, c, s), rotate(k, c, s)};
}

}  // namespace tsllm

TORCH_LIBRARY_FRAGMENT(tsllm_cpu, m) {
    m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!)? residual=None) -> Tensor");
    m.impl("rms_norm", c10::DispatchKey::CPU, &tsllm::rms_norm);
    m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
    m.impl("rotary", c10::DispatchKey::CPU, &tsllm::rotary);
}
