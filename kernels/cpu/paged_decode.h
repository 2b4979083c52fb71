// The decode-attention loop for one sequence, free of ATen so that it can be read (and timed)
// on its own; paged_attention.cpp wraps it in the torch op.
//
// Each cached block is visited once, whole (all KV heads: one contiguous read, the next block
// prefetched meanwhile, a share per query head): per query head, 8 keys at a time are scored
// (eight dot products reduced together), the online softmax is updated once per block with a
// vectorized exp, and the block's values are accumulated in registers.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "vec.h"

namespace decode {

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// The eight sums of v[0..8), one per lane.
inline __m256 reduce8(const __m256* v) {
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
#endif

// scores[t] = q . k[t] for n keys at stride `stride` (q is fp32, already scaled).
template <typename T>
inline void score(const float* q, const T* k, int64_t stride, int64_t n, int64_t dim,
                  float* scores) {
    int64_t t = 0;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    if (dim % 8 == 0) {
        for (; t + 8 <= n; t += 8) {
            __m256 acc[8];
            for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
            for (int64_t d = 0; d < dim; d += 8) {
                const __m256 qv = _mm256_loadu_ps(q + d);
                for (int j = 0; j < 8; ++j)
                    acc[j] = _mm256_fmadd_ps(qv, vec::load8(k + (t + j) * stride + d), acc[j]);
            }
            _mm256_storeu_ps(scores + t, reduce8(acc));
        }
    }
#endif
    for (; t < n; ++t) scores[t] = vec::dot(q, k + t * stride, dim);
}

// Turns scores[0..n) into exp(score - new max) in place, returns their sum; updates the max.
inline float softmax_block(float* s, int64_t n, float& run_max, float& rescale) {
    const float new_max = std::max(run_max, *std::max_element(s, s + n));
    rescale = std::exp(run_max - new_max);      // 0 on the first block
    run_max = new_max;
    int64_t t = 0;
    float sum = 0.f;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    const __m256 m = _mm256_set1_ps(new_max);
    __m256 acc = _mm256_setzero_ps();
    for (; t + 8 <= n; t += 8) {
        const __m256 p = vec::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), m));
        _mm256_storeu_ps(s + t, p);
        acc = _mm256_add_ps(acc, p);
    }
    sum = vec::hsum(acc);
#endif
    for (; t < n; ++t) {
        s[t] = std::exp(s[t] - new_max);
        sum += s[t];
    }
    return sum;
}

// acc = acc * rescale + sum_t p[t] * v[t] over n values at stride `stride`.
template <typename T>
inline void accumulate(float* acc, float rescale, const float* p, const T* v, int64_t stride,
                       int64_t n, int64_t dim) {
    int64_t d0 = 0;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    const __m256 r = _mm256_set1_ps(rescale);
    for (; d0 + 64 <= dim; d0 += 64) {      // 64 accumulators' worth stays in registers
        __m256 a[8];
        for (int j = 0; j < 8; ++j) a[j] = _mm256_mul_ps(_mm256_loadu_ps(acc + d0 + 8 * j), r);
        for (int64_t t = 0; t < n; ++t) {
            const __m256 pt = _mm256_set1_ps(p[t]);
            for (int j = 0; j < 8; ++j)
                a[j] = _mm256_fmadd_ps(pt, vec::load8(v + t * stride + d0 + 8 * j), a[j]);
        }
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(acc + d0 + 8 * j, a[j]);
    }
#endif
    if (d0 == dim) return;
    vec::scale(acc + d0, rescale, dim - d0);
    for (int64_t t = 0; t < n; ++t) vec::axpy(acc + d0, p[t], v + t * stride + d0, dim - d0);
}

// Scratch floats `attend` needs for `heads` query heads of `dim` with blocks of `block_size`.
inline int64_t scratch_size(int64_t heads, int64_t dim, int64_t block_size) {
    return heads * (2 * dim + block_size + 2);
}

// out[h] (h < heads, at out_stride) = softmax(q[h] . K^T * scale) V over the ctx cached tokens
// of one sequence; query head h reads KV head h / group. Blocks are visited once, whole. The
// cache's type C may differ from the query's T (fp32 queries over a 16-bit cache).
template <typename T, typename C>
void attend(const T* q, int64_t q_stride, const C* k_cache, const C* v_cache,
            const int32_t* table, int64_t ctx, int64_t block_size, int64_t kv_heads,
            int64_t group, int64_t dim, float scale, T* out, int64_t out_stride, float* work) {
    const int64_t heads = kv_heads * group, token_stride = kv_heads * dim;
    float* qf = work;                           // [heads][dim], scaled queries
    float* acc = qf + heads * dim;              // [heads][dim]
    float* p = acc + heads * dim;               // [heads][block_size]
    float* run_max = p + heads * block_size;    // [heads]
    float* run_sum = run_max + heads;           // [heads]
    for (int64_t h = 0; h < heads; ++h) {
        for (int64_t d = 0; d < dim; ++d) {
            qf[h * dim + d] = static_cast<float>(q[h * q_stride + d]) * scale;
            acc[h * dim + d] = 0.f;
        }
        run_max[h] = -std::numeric_limits<float>::infinity();
        run_sum[h] = 0.f;
    }
    const int64_t num_blocks = (ctx + block_size - 1) / block_size;
    const int64_t block_elems = block_size * token_stride;
    const int64_t lines = block_elems * int64_t(sizeof(C)) / 64;     // cache lines a block
    const int64_t share = (lines + heads - 1) / heads;
    for (int64_t b = 0; b < num_blocks; ++b) {
        const int64_t n = std::min(block_size, ctx - b * block_size);
        const C* kb = k_cache + static_cast<int64_t>(table[b]) * block_elems;
        const C* vb = v_cache + static_cast<int64_t>(table[b]) * block_elems;
        // The next block lies elsewhere: its lines are prefetched a share per head, spread
        // over this block's work (all at once stalled on the prefetches: batch 1, ctx 190,
        // cold cache, 98 -> 63-65 us a layer; batch 64, ctx 220: 4.4-4.65 -> 3.9-4.2 ms;
        // no prefetch at all: 66-69 us, 4.4-4.6 ms).
        const char* kn = b + 1 < num_blocks
            ? reinterpret_cast<const char*>(k_cache + table[b + 1] * block_elems) : nullptr;
        const char* vn = kn ? reinterpret_cast<const char*>(v_cache + table[b + 1] * block_elems)
                            : nullptr;
        for (int64_t h = 0; h < heads; ++h) {
            for (int64_t l = h * share; kn && l < std::min(lines, (h + 1) * share); ++l) {
                _mm_prefetch(kn + 64 * l, _MM_HINT_T1);
                _mm_prefetch(vn + 64 * l, _MM_HINT_T1);
            }
            const int64_t kv = (h / group) * dim;
            float* ph = p + h * block_size;
            score(qf + h * dim, kb + kv, token_stride, n, dim, ph);
            float rescale;
            const float sum = softmax_block(ph, n, run_max[h], rescale);
            run_sum[h] = run_sum[h] * rescale + sum;
            accumulate(acc + h * dim, rescale, ph, vb + kv, token_stride, n, dim);
        }
    }
    for (int64_t h = 0; h < heads; ++h) {
        const float inv = 1.f / run_sum[h];
        for (int64_t d = 0; d < dim; ++d)
            out[h * out_stride + d] = static_cast<T>(acc[h * dim + d] * inv);
    }
}

}  // namespace decode
