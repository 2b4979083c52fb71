// q8 and q4 weights (GGUF Q8_0, Q5_x, Q5_K, Q6_K and int8 at load; Q4_0, Q4_1, Q4_K and int4
// at load) times fp32 activations: the activations quantized per block in two int8 passes,
// int32 dot products (VNNI where the CPU has it, else AVX2), an fp32 combine per block with
// the weight's scales and mins (matrix.cpp's header says why). Owns `int_rows`, called by
// matrix.cpp's dispatch, and `tsllm_cpu::quantize_rows` (the activation quantization, for the
// tests' reference).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "matrix_tiles.h"
#include "ops.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

namespace tsllm {

namespace {

using tiles::kChunk;
using tiles::over_tiles;
using tiles::panel_bytes;

// ---- q8 and q4: int8 activations, integer dot products ----------------------------------
//
// Panel layout (cpu_linear.pack): q8 chunks of 4 inputs, [k / 4][16 outputs][4] int8 values;
// q4 chunks of 8 inputs, [k / 8][16 outputs][4] bytes whose low nibbles are inputs 0-3 of the
// chunk and high nibbles inputs 4-7. A 32-bit lane then holds 4 inputs of one output, as
// vpdpbusd and maddubs want them, and a 64-byte chunk is two 8-output vectors.

// Activations of one matrix call quantized per block of `block` inputs, in two int8 passes:
// x = (254 q + r) * scale with q = round(x / (254 scale)) and r the rounded remainder, so the
// products come out as 254 * sum(w q) + sum(w r) with ~15 bits of each activation kept. One
// int8 pass (llama.cpp's) moved SmolLM2's logits by ~0.2 on the demo prompt, enough to swap
// its two leading first tokens (25.33 / 25.24 in fp32); the second costs one more integer
// product per four weights, which batch 1 (bound by reading the weights) does not notice.
struct QuantRows {
    std::vector<int8_t> q, r;       // [m, k] each
    std::vector<float> scale;       // [m, k / block]: max|x| / (127 * 254)
    std::vector<float> qsum;        // [m, k / block]: scale * sum of the block's 254 q + r
    std::vector<int32_t> isum;      // [m, k / block]: sum of the block's 254 q + r
    int64_t block = 32;
};

constexpr float kRest = 254.f;      // the remainder's steps per step of q

void quantize_rows(const float* x, int64_t m, int64_t k, int64_t block, QuantRows& out) {
    out.block = block;
    out.q.resize(m * k);
    out.r.resize(m * k);
    out.scale.resize(m * k / block);
    out.qsum.resize(m * k / block);
    out.isum.resize(m * k / block);
    for (int64_t row = 0; row < m; ++row)
        for (int64_t b = 0; b < k / block; ++b) {
            const float* xb = x + row * k + b * block;
            float top = 0.f;
            for (int64_t i = 0; i < block; ++i) top = std::max(top, std::fabs(xb[i]));
            const float inv = top > 0.f ? 127.f / top : 0.f;
            int8_t* qb = out.q.data() + row * k + b * block;
            int8_t* rb = out.r.data() + row * k + b * block;
            int32_t sum = 0;
            for (int64_t i = 0; i < block; ++i) {
                const float t = xb[i] * inv, q = std::nearbyint(t);
                qb[i] = static_cast<int8_t>(q);
                rb[i] = static_cast<int8_t>(std::nearbyint((t - q) * kRest));
                sum += static_cast<int32_t>(kRest) * qb[i] + rb[i];
            }
            const float scale = top / 127.f / kRest;
            const int64_t at = row * (k / block) + b;
            out.scale[at] = scale;
            out.qsum[at] = scale * static_cast<float>(sum);
            out.isum[at] = sum;
        }
}

#if defined(__AVX2__) && defined(__FMA__)
#define TSLLM_INT_DOT 1
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define TSLLM_VNNI 1
#endif
// acc (8 int32 lanes) += per lane: sum of 4 products w (4 unsigned bytes) * x (4 signed).
inline __m256i dot_u8(__m256i acc, __m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, w, x);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, w, x);
#else
    const __m256i pairs = _mm256_maddubs_epi16(w, x);     // <= 2 * 255 * 127: q4 and |q8|
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

// Weights of one 64-byte chunk as unsigned bytes for dot_u8, with how much each activation
// sum must be taken off again: q4 nibbles as they are; q8 values + 128 (vpdpbusd: the sum
// comes back exactly, in int32) or, with maddubs, |q| with the activation's sign moved to it
// (|q| <= 128 keeps maddubs's 16-bit pairs from saturating).
template <Format F, int Half>
inline __m256i chunk_half(const uint8_t* c, __m256i& lo_hi) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * Half));
    if constexpr (F == Format::kQ4) {
        const __m256i mask = _mm256_set1_epi8(15);
        lo_hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        return _mm256_and_si256(v, mask);
    } else {
        return v;
    }
}

// One chunk's products for one row's int8 activations at x (4 of them, or 8 for q4): w_* as
// chunk_half gave them (up_*: a q4 chunk's high nibbles; sign_*: q8's signed values).
template <Format F>
inline void dot_chunk(const int8_t* x, __m256i w_lo, __m256i w_hi, __m256i up_lo, __m256i up_hi,
                      __m256i sign_lo, __m256i sign_hi, __m256i& lo, __m256i& hi) {
    int32_t word;
    std::memcpy(&word, x, 4);
    const __m256i x4 = _mm256_set1_epi32(word);
#if !defined(TSLLM_VNNI)
    if constexpr (F == Format::kQ8) {
        lo = dot_u8(lo, w_lo, _mm256_sign_epi8(x4, sign_lo));
        hi = dot_u8(hi, w_hi, _mm256_sign_epi8(x4, sign_hi));
        return;
    }
#endif
    lo = dot_u8(lo, w_lo, x4);
    hi = dot_u8(hi, w_hi, x4);
    if constexpr (F == Format::kQ4) {
        std::memcpy(&word, x + 4, 4);
        const __m256i up = _mm256_set1_epi32(word);
        lo = dot_u8(lo, up_lo, up);
        hi = dot_u8(hi, up_hi, up);
    }
}
#endif

// y[r][0..cols) for MR rows over panel p. Per block: int32 sums of the products, then the
// fp32 combine with the block's weight scales (and mins) and the row's activation scale.
template <Format F, bool kMin, int MR>
void int_tile(const QuantRows& xq, int64_t r0, int64_t k, const Matrix& w, int64_t p,
              const float* bias, int64_t cols, float* y, int64_t ldy) {
    const int64_t block = xq.block, blocks = k / block, per_group = w.group / block;
    const int64_t groups = k / w.group;
    const uint8_t* base = static_cast<const uint8_t*>(w.values) + p * panel_bytes(F, k);
    const float* sc = w.scales + p * groups * kPanel;
    const float* mn = kMin ? w.mins + p * groups * kPanel : nullptr;
    alignas(64) float out[MR][kPanel] = {};
#if defined(TSLLM_INT_DOT)
    __m256 acc_lo[MR], acc_hi[MR];
    for (int r = 0; r < MR; ++r) acc_lo[r] = acc_hi[r] = _mm256_setzero_ps();
    constexpr int64_t per_chunk = F == Format::kQ4 ? 8 : 4;
    for (int64_t b = 0; b < blocks; ++b) {
        __m256i sum_lo[MR], sum_hi[MR], rest_lo[MR], rest_hi[MR];   // over q and over r
        for (int r = 0; r < MR; ++r)
            sum_lo[r] = sum_hi[r] = rest_lo[r] = rest_hi[r] = _mm256_setzero_si256();
        const uint8_t* c = base + b * block / per_chunk * kChunk;
        for (int64_t i = b * block, end = i + block; i < end; i += per_chunk, c += kChunk) {
            __m256i up_lo, up_hi;
            __m256i w_lo = chunk_half<F, 0>(c, up_lo), w_hi = chunk_half<F, 1>(c, up_hi);
            const __m256i s_lo = w_lo, s_hi = w_hi;   // q8 with maddubs: signs move to x
#if !defined(TSLLM_VNNI)
            if constexpr (F == Format::kQ8) w_lo = _mm256_abs_epi8(w_lo), w_hi = _mm256_abs_epi8(w_hi);
#else
            if constexpr (F == Format::kQ8) {
                const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
                w_lo = _mm256_xor_si256(w_lo, flip), w_hi = _mm256_xor_si256(w_hi, flip);
            }
#endif
#pragma GCC unroll 8
            for (int r = 0; r < MR; ++r) {
                const int64_t at = (r0 + r) * k + i;
                dot_chunk<F>(xq.q.data() + at, w_lo, w_hi, up_lo, up_hi, s_lo, s_hi,
                             sum_lo[r], sum_hi[r]);
                dot_chunk<F>(xq.r.data() + at, w_lo, w_hi, up_lo, up_hi, s_lo, s_hi,
                             rest_lo[r], rest_hi[r]);
            }
        }
        const int64_t g = b / per_group;
        const __m256 s_lo = _mm256_loadu_ps(sc + g * kPanel), s_hi = _mm256_loadu_ps(sc + g * kPanel + 8);
        __m256 m_lo = _mm256_setzero_ps(), m_hi = _mm256_setzero_ps();
        if constexpr (kMin) m_lo = _mm256_loadu_ps(mn + g * kPanel), m_hi = _mm256_loadu_ps(mn + g * kPanel + 8);
        for (int r = 0; r < MR; ++r) {
            const int64_t at = (r0 + r) * blocks + b;
            const __m256i rest = _mm256_set1_epi32(static_cast<int32_t>(kRest));
            __m256i lo = _mm256_add_epi32(_mm256_mullo_epi32(sum_lo[r], rest), rest_lo[r]);
            __m256i hi = _mm256_add_epi32(_mm256_mullo_epi32(sum_hi[r], rest), rest_hi[r]);
#if defined(TSLLM_VNNI)
            if constexpr (F == Format::kQ8) {      // take the +128 of the weights off again
                const __m256i off = _mm256_set1_epi32(128 * xq.isum[at]);
                lo = _mm256_sub_epi32(lo, off), hi = _mm256_sub_epi32(hi, off);
            }
#endif
            const __m256 d = _mm256_set1_ps(xq.scale[at]);
            acc_lo[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_mul_ps(s_lo, d), acc_lo[r]);
            acc_hi[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_mul_ps(s_hi, d), acc_hi[r]);
            if constexpr (kMin) {
                const __m256 qs = _mm256_set1_ps(xq.qsum[at]);
                acc_lo[r] = _mm256_fmadd_ps(m_lo, qs, acc_lo[r]);
                acc_hi[r] = _mm256_fmadd_ps(m_hi, qs, acc_hi[r]);
            }
        }
    }
    for (int r = 0; r < MR; ++r) {
        _mm256_store_ps(out[r], acc_lo[r]);
        _mm256_store_ps(out[r] + 8, acc_hi[r]);
    }
#else
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t g = b / per_group;
        for (int r = 0; r < MR; ++r) {
            const int64_t at = (r0 + r) * blocks + b;
            for (int j = 0; j < kPanel; ++j) {
                int32_t sum = 0;
                for (int64_t i = b * block; i < (b + 1) * block; ++i) {
                    int32_t q;
                    if constexpr (F == Format::kQ4) {
                        const uint8_t byte = base[i / 8 * kChunk + j * 4 + i % 4];
                        q = (byte >> (4 * ((i / 4) % 2))) & 15;
                    } else {
                        q = static_cast<int8_t>(base[i / 4 * kChunk + j * 4 + i % 4]);
                    }
                    const int64_t at_x = (r0 + r) * k + i;
                    sum += q * (static_cast<int32_t>(kRest) * xq.q[at_x] + xq.r[at_x]);
                }
                out[r][j] += static_cast<float>(sum) * (sc[g * kPanel + j] * xq.scale[at]);
                if constexpr (kMin) out[r][j] += mn[g * kPanel + j] * xq.qsum[at];
            }
        }
    }
#endif
    for (int r = 0; r < MR; ++r)
        for (int64_t j = 0; j < cols; ++j) y[r * ldy + j] = out[r][j] + (bias ? bias[j] : 0.f);
}

#if defined(__AVX512VL__)
constexpr int kIntRows = 4;     // rows a tile: 16 int32 and 8 fp32 accumulators of 32
#else
constexpr int kIntRows = 2;     // of 16 vector registers
#endif

using IntTile = void (*)(const QuantRows&, int64_t, int64_t, const Matrix&, int64_t,
                         const float*, int64_t, float*, int64_t);

template <Format F, bool kMin, int... R>
constexpr std::array<IntTile, sizeof...(R)> int_tiles(std::integer_sequence<int, R...>) {
    return {&int_tile<F, kMin, R + 1>...};
}

const IntTile* int_tiles_for(const Matrix& w) {
    using Rows = std::make_integer_sequence<int, kIntRows>;
    static constexpr auto q8 = int_tiles<Format::kQ8, false>(Rows{});
    static constexpr auto q8m = int_tiles<Format::kQ8, true>(Rows{});
    static constexpr auto q4 = int_tiles<Format::kQ4, false>(Rows{});
    static constexpr auto q4m = int_tiles<Format::kQ4, true>(Rows{});
    if (w.format == Format::kQ8) return w.mins ? q8m.data() : q8.data();
    return w.mins ? q4m.data() : q4.data();
}

}  // namespace

void int_rows(const float* x, int64_t m, const Matrix& w, const float* bias, float* y) {
    QuantRows xq;
    quantize_rows(x, m, w.k, std::min<int64_t>(w.group, 32), xq);
    const IntTile* fns = int_tiles_for(w);
    over_tiles(m, w.n, kIntRows, [&](int64_t row, int64_t mr, int64_t p, int64_t col,
                                     int64_t cols) {
        fns[mr - 1](xq, row, w.k, w, p, bias ? bias + col : nullptr, cols, y + row * w.n + col,
                    w.n);
    });
}

namespace {

// (q, r int8 [m, k], scale [m, k / block]) as the q8 and q4 kernels quantize activations:
// x ~ (254 q + r) * scale.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rows_op(const at::Tensor& x,
                                                                int64_t block) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() &&
                block > 0 && x.size(1) % block == 0,
                "quantize_rows: x contiguous fp32 [m, k], k a multiple of block");
    const int64_t m = x.size(0), k = x.size(1);
    QuantRows q;
    quantize_rows(x.data_ptr<float>(), m, k, block, q);
    auto f = x.options();
    at::Tensor qt = at::empty({m, k}, f.dtype(at::kChar)), rt = at::empty({m, k}, f.dtype(at::kChar));
    std::memcpy(qt.data_ptr(), q.q.data(), q.q.size());
    std::memcpy(rt.data_ptr(), q.r.data(), q.r.size());
    at::Tensor st = at::empty({m, k / block}, f);
    std::memcpy(st.data_ptr(), q.scale.data(), q.scale.size() * 4);
    return {qt, rt, st};
}

}  // namespace

}  // namespace tsllm

TORCH_LIBRARY_FRAGMENT(tsllm_cpu, m) {
    m.def("quantize_rows(Tensor x, int block) -> (Tensor, Tensor, Tensor)");
    m.impl("quantize_rows", c10::DispatchKey::CPU, &tsllm::quantize_rows_op);
}
