// Sixteen fp32 lanes (one packed panel's outputs) and the decoders of every weight format's
// panel rows into them: one __m512 under AVX-512, two __m256 under AVX2, plain arrays
// otherwise. The build is -march=native per machine (kernels/cpu_build.py keys its cache by
// the CPU's flags), so the path taken is the widest this CPU runs; nothing here is AMX.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace lanes {

#if defined(__AVX512F__) && defined(__AVX512BW__)
struct V16 { __m512 v; };
inline V16 zero() { return {_mm512_setzero_ps()}; }
inline V16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline V16 bcast(float a) { return {_mm512_set1_ps(a)}; }
inline V16 fma(V16 a, V16 b, V16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline V16 mul(V16 a, V16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V16 add(V16 a, V16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline void store(float* p, V16 a) { _mm512_storeu_ps(p, a.v); }
inline __m128i bytes16(const uint8_t* p) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}
inline V16 of_i8(__m128i b) { return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b))}; }
inline V16 of_u8(__m128i b) { return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b))}; }
inline V16 of_bf16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}
inline V16 of_f16(const uint16_t* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
struct V16 { __m256 lo, hi; };
inline V16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline V16 bcast(float a) { const __m256 v = _mm256_set1_ps(a); return {v, v}; }
inline V16 fma(V16 a, V16 b, V16 c) {
    return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline V16 mul(V16 a, V16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V16 add(V16 a, V16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline void store(float* p, V16 a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
inline __m128i bytes16(const uint8_t* p) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}
inline V16 of_i8(__m128i b) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))};
}
inline V16 of_u8(__m128i b) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)))};
}
inline V16 of_bf16(const uint16_t* p) {
    const __m128i* q = reinterpret_cast<const __m128i*>(p);
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(q)), 16)),
            _mm256_castsi256_ps(
                _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(q + 1)), 16))};
}
inline V16 of_f16(const uint16_t* p) {
    const __m128i* q = reinterpret_cast<const __m128i*>(p);
    return {_mm256_cvtph_ps(_mm_loadu_si128(q)), _mm256_cvtph_ps(_mm_loadu_si128(q + 1))};
}
#else
#define LANES_SCALAR 1
struct V16 { float f[16]; };
inline V16 zero() { return V16{}; }
inline V16 load(const float* p) { V16 r; std::memcpy(r.f, p, sizeof r.f); return r; }
inline V16 bcast(float a) { V16 r; for (float& x : r.f) x = a; return r; }
inline V16 fma(V16 a, V16 b, V16 c) {
    for (int j = 0; j < 16; ++j) c.f[j] = __builtin_fmaf(a.f[j], b.f[j], c.f[j]);
    return c;
}
inline V16 mul(V16 a, V16 b) { for (int j = 0; j < 16; ++j) a.f[j] *= b.f[j]; return a; }
inline V16 add(V16 a, V16 b) { for (int j = 0; j < 16; ++j) a.f[j] += b.f[j]; return a; }
inline void store(float* p, V16 a) { std::memcpy(p, a.f, sizeof a.f); }
struct Bytes { uint8_t b[16]; };
inline Bytes bytes16(const uint8_t* p) { Bytes r; std::memcpy(r.b, p, 16); return r; }
inline V16 of_i8(Bytes b) {
    V16 r; for (int j = 0; j < 16; ++j) r.f[j] = static_cast<int8_t>(b.b[j]); return r;
}
inline V16 of_u8(Bytes b) { V16 r; for (int j = 0; j < 16; ++j) r.f[j] = b.b[j]; return r; }
inline V16 of_bf16(const uint16_t* p) {
    V16 r;
    for (int j = 0; j < 16; ++j) {
        const uint32_t bits = static_cast<uint32_t>(p[j]) << 16;
        std::memcpy(&r.f[j], &bits, 4);
    }
    return r;
}
V16 of_f16(const uint16_t* p);      // defined in qlinear.cpp (c10::Half) for this path only
#endif

// Nibbles of 16 bytes: the low ones (even inputs of a q4 row pair) and the high ones (odd).
#if defined(LANES_SCALAR)
inline void nibbles(Bytes b, Bytes& lo, Bytes& hi) {
    for (int j = 0; j < 16; ++j) lo.b[j] = b.b[j] & 15, hi.b[j] = b.b[j] >> 4;
}
#else
inline void nibbles(__m128i b, __m128i& lo, __m128i& hi) {
    const __m128i mask = _mm_set1_epi8(15);
    lo = _mm_and_si128(b, mask);
    hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
}
#endif

}  // namespace lanes
