// fp32 linear layer on CPU over a weight packed once at load: y = x W^T + b for any row count.
//
// Owns `linear_rows` (matrix.cpp's fp32 format; `tsllm_cpu::matrix_linear` calls it). The weight [n, k] is stored as column panels of
// kPanel outputs, k-major: packed[p][i][j] = W[p * kPanel + j][i] (zero past n; packing is
// `kernels.cpu_linear.pack`). A micro-kernel keeps an MR x kPanel tile of y in registers and,
// per input column i, loads the panel's kPanel weights once and broadcasts one x value per row:
// every weight load feeds MR * 2 FMAs and no horizontal sums are needed. With one row (a decode
// step at batch 1, bound by reading the weights) four adjacent panels are read at once, as
// four sequential streams; with more rows the same panel is reused from cache by every group
// of MR rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "ops.h"

#include <immintrin.h>

#include <algorithm>

namespace tsllm {

constexpr int64_t kMaxRows = 6;      // rows per micro-kernel tile: 12 accumulators
constexpr int64_t kRowBlock = 60;    // rows whose x stays in L2 while every panel passes
// Weights are prefetched this many floats (512 B) ahead of the loads: with one row in one
// stream the hardware prefetcher alone left ~10% of the read bandwidth unused (measured: 256 B
// to 4 KB ahead, 512 B best; more rows are compute-bound and indifferent). `row_streams` needs
// none: its four streams keep the hardware prefetchers busy enough (measured).
constexpr int64_t kAhead = 128;

// y[r][0..cols) = x[r] . panel[:, 0..cols) + bias for MR rows of x (leading dimension k).
template <int MR>
inline void tile(const float* x, int64_t k, const float* panel, const float* bias, int64_t cols,
                 float* y, int64_t ldy) {
#if defined(__AVX2__) && defined(__FMA__)
    __m256 lo[MR], hi[MR];
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
    int64_t i = 0;
    if constexpr (MR == 1) {     // one row: a second accumulator pair hides the FMA latency
        __m256 lo2 = _mm256_setzero_ps(), hi2 = _mm256_setzero_ps();
        for (; i + 2 <= k; i += 2) {
            const float* b = panel + i * kPanel;
            _mm_prefetch(reinterpret_cast<const char*>(b + kAhead), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(b + kAhead + kPanel), _MM_HINT_T0);
            const __m256 a0 = _mm256_broadcast_ss(x + i), a1 = _mm256_broadcast_ss(x + i + 1);
            lo[0] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(b), lo[0]);
            hi[0] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(b + 8), hi[0]);
            lo2 = _mm256_fmadd_ps(a1, _mm256_loadu_ps(b + 16), lo2);
            hi2 = _mm256_fmadd_ps(a1, _mm256_loadu_ps(b + 24), hi2);
        }
        lo[0] = _mm256_add_ps(lo[0], lo2);
        hi[0] = _mm256_add_ps(hi[0], hi2);
    }
    for (; i < k; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(panel + (i * kPanel + kAhead)), _MM_HINT_T0);
        const __m256 b0 = _mm256_loadu_ps(panel + i * kPanel);
        const __m256 b1 = _mm256_loadu_ps(panel + i * kPanel + 8);
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) {
            const __m256 a = _mm256_broadcast_ss(x + r * k + i);
            lo[r] = _mm256_fmadd_ps(a, b0, lo[r]);
            hi[r] = _mm256_fmadd_ps(a, b1, hi[r]);
        }
    }
    alignas(32) float out[kPanel];
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
        _mm256_store_ps(out, lo[r]);
        _mm256_store_ps(out + 8, hi[r]);
        for (int64_t j = 0; j < cols; ++j) y[r * ldy + j] = out[j] + (bias ? bias[j] : 0.f);
    }
#else
    for (int r = 0; r < MR; ++r)
        for (int64_t j = 0; j < cols; ++j) {
            float s = 0.f;
            for (int64_t i = 0; i < k; ++i) s += x[r * k + i] * panel[i * kPanel + j];
            y[r * ldy + j] = s + (bias ? bias[j] : 0.f);
        }
#endif
}

// One row over kStreams adjacent full panels at once: each panel is its own sequential stream
// and the hardware prefetchers run them in parallel. SmolLM2's 121 matrices at one row, one
// thread, huge pages: 33.0-34.3 ms (one stream, software prefetch) -> 28.3-29.5 ms (19 GB/s);
// two streams 30.0-31.6 ms, six 28.8-29.5 ms.
constexpr int kStreams = 4;

inline void row_streams(const float* x, int64_t k, const float* panel, const float* bias,
                        float* y) {
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[kStreams][2];
#pragma GCC unroll 4
    for (int s = 0; s < kStreams; ++s) acc[s][0] = acc[s][1] = _mm256_setzero_ps();
    const int64_t stride = k * kPanel;
    for (int64_t i = 0; i < k; ++i) {
        const __m256 a = _mm256_broadcast_ss(x + i);
        const float* b = panel + i * kPanel;
#pragma GCC unroll 4
        for (int s = 0; s < kStreams; ++s) {
            acc[s][0] = _mm256_fmadd_ps(a, _mm256_loadu_ps(b + s * stride), acc[s][0]);
            acc[s][1] = _mm256_fmadd_ps(a, _mm256_loadu_ps(b + s * stride + 8), acc[s][1]);
        }
    }
#pragma GCC unroll 4
    for (int s = 0; s < kStreams; ++s) {
        __m256 lo = acc[s][0], hi = acc[s][1];
        if (bias) {
            lo = _mm256_add_ps(lo, _mm256_loadu_ps(bias + s * kPanel));
            hi = _mm256_add_ps(hi, _mm256_loadu_ps(bias + s * kPanel + 8));
        }
        _mm256_storeu_ps(y + s * kPanel, lo);
        _mm256_storeu_ps(y + s * kPanel + 8, hi);
    }
#else
    for (int s = 0; s < kStreams; ++s)
        tile<1>(x, k, panel + s * k * kPanel, bias ? bias + s * kPanel : nullptr, kPanel,
                y + s * kPanel, 0);
#endif
}

static void tile_rows(int64_t rows, const float* x, int64_t k, const float* panel,
                      const float* bias, int64_t cols, float* y, int64_t ldy) {
    switch (rows) {
        case 1: return tile<1>(x, k, panel, bias, cols, y, ldy);
        case 2: return tile<2>(x, k, panel, bias, cols, y, ldy);
        case 3: return tile<3>(x, k, panel, bias, cols, y, ldy);
        case 4: return tile<4>(x, k, panel, bias, cols, y, ldy);
        case 5: return tile<5>(x, k, panel, bias, cols, y, ldy);
        default: return tile<6>(x, k, panel, bias, cols, y, ldy);
    }
}

void linear_rows(const float* x, int64_t m, int64_t k, const float* packed, int64_t n,
                 const float* bias, float* y) {
    const int64_t panels = (n + kPanel - 1) / kPanel;
    for (int64_t r0 = 0; r0 < m; r0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, m - r0);
        at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
            int64_t p = begin;
            if (rows == 1)
                for (; p + kStreams <= std::min(end, n / kPanel); p += kStreams)
                    row_streams(x + r0 * k, k, packed + p * k * kPanel,
                                bias ? bias + p * kPanel : nullptr, y + r0 * n + p * kPanel);
            for (; p < end; ++p) {
                const int64_t col = p * kPanel, cols = std::min(kPanel, n - col);
                const float* panel = packed + p * k * kPanel;
                for (int64_t r = 0; r < rows; r += kMaxRows)
                    tile_rows(std::min(kMaxRows, rows - r), x + (r0 + r) * k, k, panel,
                              bias ? bias + col : nullptr, cols, y + (r0 + r) * n + col, n);
            }
        });
    }
}

}  // namespace tsllm
