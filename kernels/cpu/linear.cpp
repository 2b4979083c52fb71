// Skinny fp32 linear layer on CPU: y = x W^T + b for the few rows of a small decode step.
//
// Owns the `tsllm_cpu::linear` op. With a few rows of x the layer is bound by reading W once
// from memory; this streams W in its stored order, a tile of four weight rows at a time against
// two rows of x (each loaded chunk feeds several FMAs), which reaches the machine's read
// bandwidth where a general GEMM does not. Larger batches stay with torch's GEMM (the Python
// side decides).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>

#include "vec.h"

namespace {

constexpr int64_t kRows = 4;     // weight rows per tile: each x chunk feeds four FMAs

// y[j * kRows + r] = W[r] . x[j] for a full tile of kRows weight rows and XR rows of x: the
// weight chunk is loaded once for XR rows (XR = 2 keeps the FMA units, not loads, the limit).
template <int XR>
inline void tile(const float* w, int64_t k, const float* x, float* y) {
    int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[XR][kRows];
    for (int j = 0; j < XR; ++j)
        for (int r = 0; r < kRows; ++r) acc[j][r] = _mm256_setzero_ps();
    for (; i + 8 <= k; i += 8) {
        __m256 wv[kRows];
        for (int r = 0; r < kRows; ++r) wv[r] = _mm256_loadu_ps(w + r * k + i);
        for (int j = 0; j < XR; ++j) {
            const __m256 xv = _mm256_loadu_ps(x + j * k + i);
            for (int r = 0; r < kRows; ++r) acc[j][r] = _mm256_fmadd_ps(wv[r], xv, acc[j][r]);
        }
    }
    for (int j = 0; j < XR; ++j)
        for (int r = 0; r < kRows; ++r) y[j * kRows + r] = vec::hsum(acc[j][r]);
#else
    for (int j = 0; j < XR; ++j)
        for (int r = 0; r < kRows; ++r) y[j * kRows + r] = 0.f;
#endif
    for (; i < k; ++i)
        for (int j = 0; j < XR; ++j)
            for (int r = 0; r < kRows; ++r) y[j * kRows + r] += w[r * k + i] * x[j * k + i];
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias) {
    TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
                "linear: x [m, k] and weight [n, k]");
    TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                x.is_contiguous() && weight.is_contiguous(), "linear: contiguous fp32 only");
    const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
    at::Tensor y = at::empty({m, n}, x.options());
    const float* xp = x.data_ptr<float>();
    const float* wp = weight.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    const float* bp = nullptr;
    if (bias.has_value() && bias->defined()) {
        TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n,
                    "linear: bias [n] fp32");
        bp = bias->data_ptr<float>();
    }
    const int64_t groups = (n + kRows - 1) / kRows;
    at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
        float out[2 * kRows];
        for (int64_t g = begin; g < end; ++g) {
            const int64_t row = g * kRows, rows = std::min(kRows, n - row);
            const float* w = wp + row * k;
            for (int64_t i = 0; i < m;) {
                const int64_t xr = rows < kRows ? 1 : std::min<int64_t>(2, m - i);
                if (rows < kRows)           // the last, partial tile of weight rows
                    for (int64_t r = 0; r < rows; ++r) out[r] = vec::dot(xp + i * k, w + r * k, k);
                else if (xr == 2)
                    tile<2>(w, k, xp + i * k, out);
                else
                    tile<1>(w, k, xp + i * k, out);
                for (int64_t j = 0; j < xr; ++j)
                    for (int64_t r = 0; r < rows; ++r)
                        yp[(i + j) * n + row + r] = out[j * kRows + r] + (bp ? bp[row + r] : 0.f);
                i += xr;
            }
        }
    });
    return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tsllm_cpu, m) {
    m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
    m.impl("linear", c10::DispatchKey::CPU, &linear);
}
