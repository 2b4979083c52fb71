// Linear layers and embedding lookups over a packed weight in any of its formats (ops.h,
// `Matrix`). Nothing is dequantized to memory: each weight is read once per group of rows, in
// its stored size.
// - fp32 goes to linear.cpp's kernel; bf16 and fp16 are widened here, sixteen outputs of one
//   input at a time, and feed fp32 FMAs with the activations (fp32 arithmetic throughout).
// - q8 (int8 values: GGUF Q8_0, Q5_x, Q5_K, Q6_K, int8 at load) and q4 (nibbles: GGUF Q4_0,
//   Q4_1, Q4_K, int4 at load) take integer dot products (int_matrix.cpp): each activation
//   row is quantized per block of min(group, 32) inputs in two int8 passes (`QuantRows`), the
//   int8 x int8 (or x uint4) products of a block summed exactly in int32 (VNNI `vpdpbusd`
//   where the CPU has it, else AVX2 `maddubs` + `madd`), and every block adds sum * (weight
//   scale * activation scale) + weight min * (activation scale * sum of the block's
//   activations) to the fp32 output. Widening 4- and 8-bit weights to fp32 before the FMAs took ~2.4x the memory
//   floor at batch 1 (measured); the integer products cost a few instructions per 64 weights.
//
// Owns `tsllm_cpu::matrix_linear` and `tsllm_cpu::matrix_rows_of` (the embedding lookup).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "lanes.h"
#include "matrix_tiles.h"
#include "ops.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

namespace tsllm {

using lanes::V16;

#if defined(LANES_SCALAR)
lanes::V16 lanes::of_f16(const uint16_t* p) {
    V16 r;
    for (int j = 0; j < 16; ++j)
        r.f[j] = static_cast<float>(c10::Half(p[j], c10::Half::from_bits()));
    return r;
}
#endif

namespace {

using tiles::kChunk;
using tiles::over_tiles;
using tiles::panel_bytes;

// ---- bf16 and fp16: widened to fp32 lanes, fp32 FMAs ------------------------------------

#if defined(__AVX512F__)
constexpr int kMaxRows = 8;     // 32 vector registers
#else
constexpr int kMaxRows = 4;     // 16: accumulators and four widened inputs
#endif

template <Format F>
inline V16 widen(const uint16_t* p) {
    if constexpr (F == Format::kBF16) return lanes::of_bf16(p);
    else return lanes::of_f16(p);
}

// y[r][0..cols) for MR rows of x over panel p; four inputs a step, in C accumulator chains
// with few rows to hide the FMA latency.
template <Format F, int MR>
void half_tile(const float* x, int64_t ldx, const Matrix& w, int64_t p, const float* bias,
               int64_t cols, float* y, int64_t ldy) {
    constexpr int C = MR == 1 ? 4 : (MR == 2 ? 2 : 1);
    const uint16_t* base = static_cast<const uint16_t*>(w.values) + p * w.k * kPanel;
    V16 acc[MR][C];
    for (int r = 0; r < MR; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = lanes::zero();
    for (int64_t i = 0; i < w.k; i += 4) {
        V16 v[4];
        for (int j = 0; j < 4; ++j) v[j] = widen<F>(base + (i + j) * kPanel);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j)
                acc[r][j % C] = lanes::fma(lanes::bcast(x[r * ldx + i + j]), v[j], acc[r][j % C]);
    }
    alignas(64) float out[kPanel];
    for (int r = 0; r < MR; ++r) {
        V16 sum = acc[r][0];
        for (int c = 1; c < C; ++c) sum = lanes::add(sum, acc[r][c]);
        lanes::store(out, sum);
        for (int64_t j = 0; j < cols; ++j) y[r * ldy + j] = out[j] + (bias ? bias[j] : 0.f);
    }
}

using HalfTile = void (*)(const float*, int64_t, const Matrix&, int64_t, const float*, int64_t,
                          float*, int64_t);

template <Format F, int... R>
constexpr std::array<HalfTile, sizeof...(R)> half_tiles(std::integer_sequence<int, R...>) {
    return {&half_tile<F, R + 1>...};
}

void half_rows(const float* x, int64_t m, const Matrix& w, const float* bias, float* y) {
    static constexpr auto bf16 =
        half_tiles<Format::kBF16>(std::make_integer_sequence<int, kMaxRows>{});
    static constexpr auto f16 =
        half_tiles<Format::kF16>(std::make_integer_sequence<int, kMaxRows>{});
    const HalfTile* fns = w.format == Format::kBF16 ? bf16.data() : f16.data();
    over_tiles(m, w.n, kMaxRows, [&](int64_t row, int64_t mr, int64_t p, int64_t col,
                                     int64_t cols) {
        fns[mr - 1](x + row * w.k, w.k, w, p, bias ? bias + col : nullptr, cols,
                    y + row * w.n + col, w.n);
    });
}

// One weight of row `row`, input i, in fp32 (q * scale + min, rounded once).
inline float weight_at(const Matrix& w, int64_t row, int64_t i) {
    const int64_t p = row / kPanel, j = row % kPanel;
    const uint8_t* base = static_cast<const uint8_t*>(w.values) + p * panel_bytes(w.format, w.k);
    float q = 0.f;
    switch (w.format) {
        case Format::kF32: return reinterpret_cast<const float*>(base)[i * kPanel + j];
        case Format::kBF16: {
            const uint32_t bits = static_cast<uint32_t>(
                reinterpret_cast<const uint16_t*>(base)[i * kPanel + j]) << 16;
            float f;
            std::memcpy(&f, &bits, 4);
            return f;
        }
        case Format::kF16:
            return static_cast<float>(c10::Half(
                reinterpret_cast<const uint16_t*>(base)[i * kPanel + j], c10::Half::from_bits()));
        case Format::kQ8:
            q = static_cast<int8_t>(base[i / 4 * kChunk + j * 4 + i % 4]);
            break;
        case Format::kQ4:
            q = (base[i / 8 * kChunk + j * 4 + i % 4] >> (4 * ((i / 4) % 2))) & 15;
            break;
    }
    const int64_t at = (p * (w.k / w.group) + i / w.group) * kPanel + j;
    return std::fma(q, w.scales[at], w.mins ? w.mins[at] : 0.f);
}

}  // namespace

void matrix_rows(const float* x, int64_t m, const Matrix& w, const float* bias, float* y) {
    switch (w.format) {
        case Format::kF32:
            return linear_rows(x, m, w.k, static_cast<const float*>(w.values), w.n, bias, y);
        case Format::kBF16: case Format::kF16: return half_rows(x, m, w, bias, y);
        case Format::kQ8: case Format::kQ4: return int_rows(x, m, w, bias, y);
    }
}

void gather_rows(const Matrix& w, const int32_t* ids, int64_t count, float* out) {
    for (int64_t t = 0; t < count; ++t)
        TORCH_CHECK(ids[t] >= 0 && ids[t] < w.n, "token id ", ids[t],
                    " outside the vocabulary of ", w.n);
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t)
            for (int64_t i = 0; i < w.k; ++i) out[t * w.k + i] = weight_at(w, ids[t], i);
    });
}

Matrix matrix_of(const at::Tensor& values, const c10::optional<at::Tensor>& scales,
                 const c10::optional<at::Tensor>& mins, int64_t n, const char* what) {
    const auto type = values.scalar_type();
    Format f;
    if (type == at::kFloat) f = Format::kF32;
    else if (type == at::kBFloat16) f = Format::kBF16;
    else if (type == at::kHalf) f = Format::kF16;
    else if (type == at::kChar) f = Format::kQ8;
    else if (type == at::kByte) f = Format::kQ4;
    else TORCH_CHECK(false, what, ": packed values of dtype ", type, " are no weight format");
    const bool quantized = f == Format::kQ8 || f == Format::kQ4;
    const int64_t panels = (n + kPanel - 1) / kPanel, width = quantized ? kChunk : kPanel;
    TORCH_CHECK(values.dim() == 3 && values.is_contiguous() && values.size(0) == panels &&
                values.size(2) == width, what, ": packed values [ceil(", n, " / 16), ",
                quantized ? "chunks, 64" : "k, 16", "]");
    const int64_t k = values.size(1) * (f == Format::kQ4 ? 8 : f == Format::kQ8 ? 4 : 1);
    const bool has_scales = scales.has_value() && scales->defined();
    const bool has_mins = mins.has_value() && mins->defined();
    TORCH_CHECK(has_scales == quantized && (quantized || !has_mins), what,
                ": scales come with the q8 and q4 formats only, mins only with scales");
    TORCH_CHECK(f == Format::kF32 || k % 4 == 0, what, ": ", k,
                " inputs; the bf16, fp16 and quantized kernels take a multiple of 4");
    Matrix m{f, n, k, k, values.data_ptr(), nullptr, nullptr};
    if (quantized) {
        for (const at::Tensor* t : {&*scales, has_mins ? &*mins : &*scales})
            TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 &&
                        t->size(0) == panels && t->size(2) == kPanel && t->size(1) > 0 &&
                        k % t->size(1) == 0 && t->sizes() == scales->sizes(),
                        what, ": scales and mins fp32 [ceil(n / 16), k / group, 16]");
        m.group = k / scales->size(1);
        TORCH_CHECK(m.group % 16 == 0 && (m.group <= 32 || m.group % 32 == 0), what,
                    ": group of ", m.group, " inputs; 16, 32 or a multiple of 32");
        m.scales = scales->data_ptr<float>();
        m.mins = has_mins ? mins->data_ptr<float>() : nullptr;
    }
    return m;
}

namespace {

at::Tensor matrix_linear(const at::Tensor& x, const at::Tensor& values,
                         const c10::optional<at::Tensor>& scales,
                         const c10::optional<at::Tensor>& mins, int64_t n,
                         const c10::optional<at::Tensor>& bias) {
    const Matrix w = matrix_of(values, scales, mins, n, "matrix_linear");
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() &&
                x.size(1) == w.k, "matrix_linear: x contiguous fp32 [m, ", w.k, "]");
    const float* bp = nullptr;
    if (bias.has_value() && bias->defined()) {
        TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == n, "matrix_linear: bias [n] fp32");
        bp = bias->data_ptr<float>();
    }
    at::Tensor y = at::empty({x.size(0), n}, x.options());
    matrix_rows(x.data_ptr<float>(), x.size(0), w, bp, y.data_ptr<float>());
    return y;
}

at::Tensor matrix_rows_of(const at::Tensor& ids, const at::Tensor& values,
                          const c10::optional<at::Tensor>& scales,
                          const c10::optional<at::Tensor>& mins, int64_t n) {
    const Matrix w = matrix_of(values, scales, mins, n, "matrix_rows_of");
    TORCH_CHECK(ids.scalar_type() == at::kInt && ids.is_contiguous(),
                "matrix_rows_of: ids contiguous int32");
    at::Tensor out = at::empty({ids.numel(), w.k}, values.options().dtype(at::kFloat));
    gather_rows(w, ids.data_ptr<int32_t>(), ids.numel(), out.data_ptr<float>());
    return out;
}

}  // namespace

}  // namespace tsllm

TORCH_LIBRARY_FRAGMENT(tsllm_cpu, m) {
    m.def("matrix_linear(Tensor x, Tensor values, Tensor? scales, Tensor? mins, int n, "
          "Tensor? bias) -> Tensor");
    m.impl("matrix_linear", c10::DispatchKey::CPU, &tsllm::matrix_linear);
    m.def("matrix_rows_of(Tensor ids, Tensor values, Tensor? scales, Tensor? mins, int n) "
          "-> Tensor");
    m.impl("matrix_rows_of", c10::DispatchKey::CPU, &tsllm::matrix_rows_of);
}
