// Small fp32-accumulating vector loops shared by the CPU kernels: AVX2/FMA when the compiler
// targets it (the build uses -march=native), plain loops otherwise. Inputs may be fp32, fp16 or
// bf16; arithmetic is always fp32. `convert` narrows rows to a 16-bit KV cache with
// round-to-nearest-even, bit for bit as torch's `.to()` (AVX-512 16 at a time, else AVX2 8).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

namespace vec {

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const c10::BFloat16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// exp(x) for 8 floats: range reduction by ln 2 (Cody-Waite) and a degree-6 polynomial,
// within ~2 ulp of std::exp on [-87, 88]; below that it is 0, as softmax wants.
inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.3f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                         _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

// sum_i a[i] * b[i]
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
    int64_t i = 0;
    float total = 0.f;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), s0);
    total = hsum(_mm256_add_ps(s0, s1));
#endif
    for (; i < n; ++i) total += a[i] * static_cast<float>(b[i]);
    return total;
}

// acc[i] += a * x[i]
template <typename T>
inline void axpy(float* acc, float a, const T* x, int64_t n) {
    int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    const __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(va, load8(x + i), _mm256_loadu_ps(acc + i)));
#endif
    for (; i < n; ++i) acc[i] += a * static_cast<float>(x[i]);
}

#if defined(__AVX2__) && defined(__F16C__)
// Eight fp32 -> bf16 with round-to-nearest-even and NaN -> 0x7fc0, as c10::BFloat16 does
// (not vcvtneps2bf16, which flushes denormals), in the low 128 bits.
inline __m128i bf16_of8(__m256 x) {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    // 32-bit lanes to 16: packus works per 128-bit half, then the halves are joined
    const __m256i packed = _mm256_packus_epi32(r, r);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
inline __m256i bf16_of16(__m512 x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0)));
}
#endif

// dst[i] = src[i] rounded to TC (fp32, fp16 or bf16; fp32 sources vectorized)
template <typename TI, typename TC>
inline void convert(const TI* src, TC* dst, int64_t n) {
    int64_t i = 0;
    if constexpr (std::is_same_v<TI, float> && std::is_same_v<TC, c10::BFloat16>) {
        auto* out = reinterpret_cast<uint16_t*>(dst);
#if defined(__AVX512F__) && defined(__AVX512BW__)
        for (; i + 16 <= n; i += 16)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                                bf16_of16(_mm512_loadu_ps(src + i)));
#endif
#if defined(__AVX2__) && defined(__F16C__)
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), bf16_of8(_mm256_loadu_ps(src + i)));
#endif
    } else if constexpr (std::is_same_v<TI, float> && std::is_same_v<TC, c10::Half>) {
        auto* out = reinterpret_cast<uint16_t*>(dst);
#if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                                _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
#if defined(__AVX2__) && defined(__F16C__)
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    }
    for (; i < n; ++i) dst[i] = static_cast<TC>(static_cast<float>(src[i]));
}

// x[i] *= a
inline void scale(float* x, float a, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

}  // namespace vec
