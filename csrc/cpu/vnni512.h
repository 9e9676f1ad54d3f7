// Shared by the AVX-512 VNNI paths of int8.cpp and ternary.cpp: the target attribute of
// their functions and the horizontal sum of a zmm of int32 lanes kept modulo 2^32 (both
// paths rely on wrap-around: see the exactness notes beside each kernel).
#pragma once
#include <immintrin.h>

#include <cstdint>

#define ACCELOPS_TARGET_AVX512VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))

namespace accelops {

ACCELOPS_TARGET_AVX512VNNI static inline uint32_t hsum_u32_512(__m512i v) {
  __m256i s = _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(t));
}

}  // namespace accelops
