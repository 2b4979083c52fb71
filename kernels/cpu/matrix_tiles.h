// The panel tiling shared by matrix.cpp (fp32, bf16, fp16, the dispatch and the embedding
// lookup) and int_matrix.cpp (q8 and q4: integer dot products): bytes per packed panel, and
// the walk over a call's tiles. Internal to those two files.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>

#include "ops.h"

namespace tsllm::tiles {

constexpr int64_t kRowBlock = 60;   // rows whose activations stay in L2 while panels pass
constexpr int64_t kChunk = 64;      // bytes of a q8 (4 inputs) or q4 (8 inputs) panel chunk

// Bytes of one panel of a k-input weight.
inline int64_t panel_bytes(Format f, int64_t k) {
    switch (f) {
        case Format::kF32: return k * kPanel * 4;
        case Format::kBF16: case Format::kF16: return k * kPanel * 2;
        case Format::kQ8: return k * kPanel;
        case Format::kQ4: return k * kPanel / 2;
    }
    return 0;
}

// fn(first row, rows, panel, first column, columns) once per tile of y [m, n]: blocks of
// kRowBlock rows whose inputs stay in L2 while every panel passes (panels in parallel), and
// inside a block tiles of at most `tile_rows` rows.
template <typename Fn>
void over_tiles(int64_t m, int64_t n, int64_t tile_rows, const Fn& fn) {
    const int64_t panels = (n + kPanel - 1) / kPanel;
    for (int64_t r0 = 0; r0 < m; r0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, m - r0);
        at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
            for (int64_t p = begin; p < end; ++p)
                for (int64_t r = 0; r < rows; r += tile_rows)
                    fn(r0 + r, std::min(tile_rows, rows - r), p, p * kPanel,
                       std::min(kPanel, n - p * kPanel));
        });
    }
}


}  // namespace tsllm::tiles

namespace tsllm {
// int_matrix.cpp: y [m, n] = x [m, k] W^T + bias for a q8 or q4 weight
void int_rows(const float* x, int64_t m, const Matrix& w, const float* bias, float* y);
}  // namespace tsllm
