// The float vector the attention kernels compute with: 16 lanes of AVX-512 or 8 of AVX2 + FMA.
// The kernels are written once against these few operations and `kLanes`, so an AVX2-only CPU
// (AMD Zen 2/3, older Intel) gets the same register-blocked code as an AVX-512 one, not a scalar loop.
#pragma once
#include <c10/util/BFloat16.h>
#include <cstdint>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define ORCA_SIMD 1
#include <immintrin.h>

namespace simd {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
using vfloat = __m512;
using vint = __m512i;
inline vfloat load(const float* p) { return _mm512_loadu_ps(p); }
inline vfloat load(const c10::BFloat16* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
inline void store(float* p, vfloat x) { _mm512_storeu_ps(p, x); }
inline vfloat set1(float x) { return _mm512_set1_ps(x); }
inline vfloat zero() { return _mm512_setzero_ps(); }
inline vfloat add(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
inline vfloat sub(vfloat a, vfloat b) { return _mm512_sub_ps(a, b); }
inline vfloat mul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
inline vfloat max(vfloat a, vfloat b) { return _mm512_max_ps(a, b); }
inline vfloat min(vfloat a, vfloat b) { return _mm512_min_ps(a, b); }
inline vfloat fmadd(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
inline float reduce_add(vfloat x) { return _mm512_reduce_add_ps(x); }
inline __m256 fold_to_8(vfloat x) {
  return _mm256_add_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
}
inline vint load_int(const int32_t* p) { return _mm512_loadu_si512(p); }
// x where n <= limit (lane-wise), else `otherwise`.
inline vfloat keep_if_at_most(int32_t n, vint limit, vfloat x, vfloat otherwise) {
  return _mm512_mask_mov_ps(otherwise, _mm512_cmple_epi32_mask(_mm512_set1_epi32(n), limit), x);
}
inline vfloat round(vfloat x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline bool any_nan(vfloat x) { return _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q) != 0; }
// 1 / x to float precision: the 14-bit estimate and one Newton step (a division is 16x slower here).
inline vfloat reciprocal(vfloat x) {
  const vfloat r = _mm512_rcp14_ps(x);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(2.f)));
}
// x rounded to the nearest bf16, ties to even (as torch rounds), still as float.
inline vfloat round_to_bf16(vfloat x) {
  const vint bits = _mm512_castps_si512(x);
  const vint lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const vint rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
inline void store(c10::BFloat16* p, vfloat x) {
  const vint high = _mm512_srli_epi32(_mm512_castps_si512(round_to_bf16(x)), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(high));
}
// The first lane equal to `value`, or -1.
inline int first_equal(vfloat x, float value) {
  const unsigned mask = _mm512_cmp_ps_mask(x, _mm512_set1_ps(value), _CMP_EQ_OQ);
  return mask ? __builtin_ctz(mask) : -1;
}
inline vfloat times_two_to(vfloat p, vfloat n) { return _mm512_scalef_ps(p, n); }
constexpr float kExpLow = -100.f;
#else
constexpr int kLanes = 8;
using vfloat = __m256;
using vint = __m256i;
inline vfloat load(const float* p) { return _mm256_loadu_ps(p); }
inline vfloat load(const c10::BFloat16* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
inline void store(float* p, vfloat x) { _mm256_storeu_ps(p, x); }
inline vfloat set1(float x) { return _mm256_set1_ps(x); }
inline vfloat zero() { return _mm256_setzero_ps(); }
inline vfloat add(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
inline vfloat sub(vfloat a, vfloat b) { return _mm256_sub_ps(a, b); }
inline vfloat mul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
inline vfloat max(vfloat a, vfloat b) { return _mm256_max_ps(a, b); }
inline vfloat min(vfloat a, vfloat b) { return _mm256_min_ps(a, b); }
inline vfloat fmadd(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
inline float reduce_add(vfloat x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline __m256 fold_to_8(vfloat x) { return x; }
inline vint load_int(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline vfloat keep_if_at_most(int32_t n, vint limit, vfloat x, vfloat otherwise) {
  const __m256 past = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), limit));
  return _mm256_blendv_ps(x, otherwise, past);
}
inline vfloat round(vfloat x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline bool any_nan(vfloat x) { return _mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)) != 0; }
inline vfloat reciprocal(vfloat x) {
  const vfloat r = _mm256_rcp_ps(x);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(x, r, _mm256_set1_ps(2.f)));
}
inline vfloat round_to_bf16(vfloat x) {
  const vint bits = _mm256_castps_si256(x);
  const vint lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const vint rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  return _mm256_castsi256_ps(_mm256_and_si256(rounded, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
inline void store(c10::BFloat16* p, vfloat x) {
  const vint high = _mm256_srli_epi32(_mm256_castps_si256(round_to_bf16(x)), 16);
  const vint packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(high, high), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline int first_equal(vfloat x, float value) {
  const unsigned mask = _mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_set1_ps(value), _CMP_EQ_OQ));
  return mask ? __builtin_ctz(mask) : -1;
}
// 2^n built in the exponent bits; n stays in the normal range because exp's argument is clamped.
inline vfloat times_two_to(vfloat p, vfloat n) {
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
constexpr float kExpLow = -87.f;  // 2^-126 is the smallest normal power the exponent bits can hold
#endif

inline void store_as(c10::BFloat16* p, vfloat x) { store(p, x); }
inline void store_as(float* p, vfloat x) { store(p, x); }
// x as T would round it: bf16's rounding, or nothing for float.
inline vfloat round_to(const c10::BFloat16*, vfloat x) { return round_to_bf16(x); }
inline vfloat round_to(const float*, vfloat x) { return x; }

// out[j] = the sum of x[j]'s lanes, for eight vectors at once: a tree of pairwise horizontal adds
// costs about one reduce_add for all eight.
inline void reduce_add_8(const vfloat x[8], float* out) {
  __m256 y[8];
  for (int j = 0; j < 8; ++j) y[j] = fold_to_8(x[j]);
  const __m256 low = _mm256_hadd_ps(_mm256_hadd_ps(y[0], y[1]), _mm256_hadd_ps(y[2], y[3]));
  const __m256 high = _mm256_hadd_ps(_mm256_hadd_ps(y[4], y[5]), _mm256_hadd_ps(y[6], y[7]));
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31)));
}

// exp for the softmax: Cephes' polynomial on the reduced argument, scaled by 2^n.
inline vfloat exp(vfloat x) {
  x = max(min(x, set1(88.f)), set1(kExpLow));
  const vfloat n = round(mul(x, set1(1.44269504088896341f)));
  vfloat r = fmadd(n, set1(-0.693359375f), x);
  r = fmadd(n, set1(2.12194440e-4f), r);
  vfloat p = set1(1.9875691500e-4f);
  p = fmadd(p, r, set1(1.3981999507e-3f));
  p = fmadd(p, r, set1(8.3334519073e-3f));
  p = fmadd(p, r, set1(4.1665795894e-2f));
  p = fmadd(p, r, set1(1.6666665459e-1f));
  p = fmadd(p, r, set1(5.0000001201e-1f));
  p = fmadd(p, mul(r, r), add(r, set1(1.f)));
  return times_two_to(p, n);
}

}  // namespace simd
#endif
