// NF4 quantize / dequantize on the CPU, byte-exact with bitsandbytes (see nf4_math.h).
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CORDA_X86 1
#endif

#include "corda/cpu_kernels.h"
#include "corda/nf4_math.h"

namespace corda {
namespace cpu {

namespace {

template <typename Load>
void quantize_blocks(Load load, int64_t n, int64_t blocksize, bool bnb_cuda, int64_t b0, int64_t b1,
                     uint8_t* packed, float* absmax) {
  // Blocksizes are even, so every block starts on a byte boundary; only the last block of an odd
  // ``n`` ends mid-byte (its pad element: 0 scaled by the block's factor).
  float vals[4096];
  uint8_t codes[4096 + 1];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * blocksize;
    const int64_t count = n - start < blocksize ? n - start : blocksize;
    float am = 0.0f;
    for (int64_t i = 0; i < count; ++i) {
      vals[i] = load(start + i);
      const float a = fabsf(vals[i]);
      am = a > am ? a : am;
    }
    const BlockScale s = block_scale(am, count < blocksize, bnb_cuda, 1.0f / am);
    absmax[b] = s.stored_absmax;
    // separate loops for the two scalings, so that each vectorizes
    if (s.divide) {
      for (int64_t i = 0; i < count; ++i) codes[i] = nf4_code(vals[i] / s.factor);
    } else {
      for (int64_t i = 0; i < count; ++i) codes[i] = nf4_code(vals[i] * s.factor);
    }
    // bitsandbytes' CPU path pads an odd count with code 7; its CUDA kernel quantizes a zero
    if (count & 1) codes[count] = bnb_cuda ? nf4_code(apply_scale(s, 0.0f)) : (uint8_t)7;
    uint8_t* out = packed + start / 2;
    const int64_t bytes = (count + 1) / 2;
    for (int64_t j = 0; j < bytes; ++j) out[j] = (uint8_t)((codes[2 * j] << 4) | codes[2 * j + 1]);
  }
}

}  // namespace

void nf4_quantize_blocks(const void* x, int dtype, int64_t n, int64_t blocksize, bool bnb_cuda,
                         int64_t block_begin, int64_t block_end, uint8_t* packed, float* absmax) {
  switch (dtype) {
    case kF32: {
      const float* p = (const float*)x;
      quantize_blocks([p](int64_t i) { return p[i]; }, n, blocksize, bnb_cuda, block_begin, block_end,
                      packed, absmax);
      break;
    }
    case kF16: {
      const uint16_t* p = (const uint16_t*)x;
      quantize_blocks([p](int64_t i) { return fp16_to_float(p[i]); }, n, blocksize, bnb_cuda, block_begin,
                      block_end, packed, absmax);
      break;
    }
    default: {
      const uint16_t* p = (const uint16_t*)x;
      quantize_blocks([p](int64_t i) { return bf16_to_float(p[i]); }, n, blocksize, bnb_cuda, block_begin,
                      block_end, packed, absmax);
      break;
    }
  }
}

namespace {

#ifdef CORDA_X86
// One full block through byte shuffles: each of the output's bytes is a 16-entry table lookup
// (pshufb) indexed by the nibbles, 32 elements per step. ``table`` holds the block's 16 output
// values; ``pairs`` (a multiple of 16) is the block's byte count.
template <typename T>
__attribute__((target("ssse3"))) void dequantize_block_ssse3(const T* table, const uint8_t* p, int64_t pairs, T* o) {
  constexpr int W = sizeof(T);  // 2 or 4 output bytes per element
  uint8_t planes[W][16];
  for (int c = 0; c < 16; ++c) {
    uint8_t bytes[W];
    memcpy(bytes, &table[c], W);
    for (int k = 0; k < W; ++k) planes[k][c] = bytes[k];
  }
  __m128i lut[W];
  for (int k = 0; k < W; ++k) lut[k] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(planes[k]));
  const __m128i low4 = _mm_set1_epi8(0x0f);
  for (int64_t j = 0; j < pairs; j += 16) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low4);
    const __m128i lo = _mm_and_si128(packed, low4);
    // element 2j is the high nibble of byte j, element 2j+1 its low nibble
    const __m128i idx[2] = {_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo)};
    uint8_t* out = reinterpret_cast<uint8_t*>(o + 2 * j);
    for (int h = 0; h < 2; ++h) {
      __m128i v[W];
      for (int k = 0; k < W; ++k) v[k] = _mm_shuffle_epi8(lut[k], idx[h]);
      if (W == 2) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 * h), _mm_unpacklo_epi8(v[0], v[1]));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 * h + 16), _mm_unpackhi_epi8(v[0], v[1]));
      } else {
        const __m128i a_lo = _mm_unpacklo_epi8(v[0], v[1]), a_hi = _mm_unpackhi_epi8(v[0], v[1]);
        const __m128i b_lo = _mm_unpacklo_epi8(v[W > 2 ? 2 : 0], v[W > 3 ? 3 : 0]);
        const __m128i b_hi = _mm_unpackhi_epi8(v[W > 2 ? 2 : 0], v[W > 3 ? 3 : 0]);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 64 * h), _mm_unpacklo_epi16(a_lo, b_lo));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 64 * h + 16), _mm_unpackhi_epi16(a_lo, b_lo));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 64 * h + 32), _mm_unpacklo_epi16(a_hi, b_hi));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 64 * h + 48), _mm_unpackhi_epi16(a_hi, b_hi));
      }
    }
  }
}

// One full block through 512-bit permutes: the 16 fp32 values sit in one register and every
// output is vpermps of it by its nibble, 32 elements per step.
__attribute__((target("avx512f"))) void dequantize_block_avx512(const float* table, const uint8_t* p,
                                                                  int64_t pairs, float* o) {
  const __m512 lut = _mm512_loadu_ps(table);
  const __m128i low4 = _mm_set1_epi8(0x0f);
  for (int64_t j = 0; j < pairs; j += 16) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low4);
    const __m128i lo = _mm_and_si128(packed, low4);
    _mm512_storeu_ps(o + 2 * j, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)), lut));
    _mm512_storeu_ps(o + 2 * j + 16, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo)), lut));
  }
}

// The 16-bit outputs (fp16 / bf16): vpermw of the 16 values by the nibbles, 32 elements per step.
__attribute__((target("avx512f,avx512bw"))) void dequantize_block_avx512(const uint16_t* table, const uint8_t* p,
                                                                           int64_t pairs, uint16_t* o) {
  const __m512i lut = _mm512_inserti64x4(_mm512_setzero_si512(),
                                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table)), 0);
  const __m128i low4 = _mm_set1_epi8(0x0f);
  for (int64_t j = 0; j < pairs; j += 16) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low4);
    const __m128i lo = _mm_and_si128(packed, low4);
    const __m256i idx = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi8(hi, lo)),
                                                _mm_unpackhi_epi8(hi, lo), 1);
    _mm512_storeu_si512(o + 2 * j, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(idx), lut));
  }
}

// fp32 outputs on AVX2: two 8-entry vpermps (levels 0–7 and 8–15) and a blend on the nibble's bit 3.
__attribute__((target("avx2"))) void dequantize_block_avx2(const float* table, const uint8_t* p, int64_t pairs,
                                                             float* o) {
  const __m256 lut_lo = _mm256_loadu_ps(table), lut_hi = _mm256_loadu_ps(table + 8);
  const __m128i low4 = _mm_set1_epi8(0x0f);
  for (int64_t j = 0; j < pairs; j += 16) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low4);
    const __m128i lo = _mm_and_si128(packed, low4);
    const __m128i nib[2] = {_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo)};
    for (int h = 0; h < 2; ++h) {
      for (int q = 0; q < 2; ++q) {
        const __m256i idx = _mm256_cvtepu8_epi32(q ? _mm_srli_si128(nib[h], 8) : nib[h]);
        const __m256 a = _mm256_permutevar8x32_ps(lut_lo, idx);
        const __m256 b = _mm256_permutevar8x32_ps(lut_hi, idx);
        const __m256 use_hi = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // bit 3 → sign bit
        _mm256_storeu_ps(o + 2 * j + 16 * h + 8 * q, _mm256_blendv_ps(a, b, use_hi));
      }
    }
  }
}

// Whole blocks on AVX-512, the 16 output values built in a register too (at blocksize 64 a
// block's table costs as much as its lookups): level · absmax as one vmulps (the same IEEE
// products as nf4_level(c) · am), rounded to bf16 (nearest even, as float_to_bf16) or fp16
// (vcvtps2ph, nearest even) where absmax is finite, by the scalar conversions where it is not.
__attribute__((target("avx512f,avx512bw"))) void dequantize_full_blocks_avx512(
    int dtype, const uint8_t* packed, const float* absmax, int64_t blocksize, int64_t b0, int64_t b1, void* out) {
  float lv[16];
  for (int c = 0; c < 16; ++c) lv[c] = nf4_level(c);
  const __m512 levels = _mm512_loadu_ps(lv);
  const int64_t pairs = blocksize / 2;
  for (int64_t b = b0; b < b1; ++b) {
    const float am = absmax[b];
    const uint8_t* p = packed + b * pairs;
    const __m512 t32 = _mm512_mul_ps(levels, _mm512_set1_ps(am));
    if (dtype == kF32) {
      float table[16];
      _mm512_storeu_ps(table, t32);
      dequantize_block_avx512(table, p, pairs, (float*)out + b * blocksize);
      continue;
    }
    alignas(32) uint16_t table[16];
    if (!isfinite(am)) {
      for (int c = 0; c < 16; ++c) table[c] = dtype == kF16 ? float_to_fp16(lv[c] * am) : float_to_bf16(lv[c] * am);
    } else if (dtype == kBF16) {
      __m512i u = _mm512_castps_si512(t32);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
      _mm256_store_si256(reinterpret_cast<__m256i*>(table), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
    } else {
      _mm256_store_si256(reinterpret_cast<__m256i*>(table),
                         _mm512_cvtps_ph(t32, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    dequantize_block_avx512(table, p, pairs, (uint16_t*)out + b * blocksize);
  }
}

// The widest lookup this CPU runs, capped by ATEN_CPU_CAPABILITY (``avx2``, ``default``) so that the
// narrower paths are exercised on any machine, as ATen's own kernels are: 3 AVX-512, 2 AVX2, 1 SSSE3.
int simd_level() {
  static const int level = [] {
    int cap = 3;
    if (const char* env = getenv("ATEN_CPU_CAPABILITY")) {
      if (strcmp(env, "avx2") == 0) cap = 2;
      if (strcmp(env, "default") == 0) cap = 1;
    }
    int have = 0;
    if (__builtin_cpu_supports("ssse3")) have = 1;
    if (have && __builtin_cpu_supports("avx2")) have = 2;
    if (have == 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) have = 3;
    return have < cap ? have : cap;
  }();
  return level;
}

template <typename T>
void dequantize_block_simd(const T* table, const uint8_t* p, int64_t pairs, T* o) {
  const int level = simd_level();
  if (level >= 3) {
    dequantize_block_avx512(table, p, pairs, o);
  } else if (level == 2 && sizeof(T) == 4) {
    dequantize_block_avx2(reinterpret_cast<const float*>(table), p, pairs, reinterpret_cast<float*>(o));
  } else if (level >= 1) {
    dequantize_block_ssse3<T>(table, p, pairs, o);
  }
}
#endif

template <typename T, typename Store>
void dequantize_blocks(Store store, T* out, const uint8_t* packed, const float* absmax, int64_t n,
                       int64_t blocksize, int64_t b0, int64_t b1) {
#ifdef CORDA_X86
  const bool simd = simd_level() >= 1;
#endif
  for (int64_t b = b0; b < b1; ++b) {
    // the block's 16 output values, each level · absmax in fp32 rounded once to T
    T table[16];
    const float am = absmax[b];
    for (int c = 0; c < 16; ++c) table[c] = store(nf4_level(c) * am);
    const int64_t start = b * blocksize;
    const int64_t end = n - start < blocksize ? n : start + blocksize;
    const int64_t pairs = (end - start) / 2;
    const uint8_t* p = packed + start / 2;
    T* o = out + start;
    int64_t j = 0;
#ifdef CORDA_X86
    if (simd) {
      j = pairs - pairs % 16;
      dequantize_block_simd<T>(table, p, j, o);
    }
#endif
    for (; j < pairs; ++j) {
      o[2 * j] = table[p[j] >> 4];
      o[2 * j + 1] = table[p[j] & 15];
    }
    if ((end - start) & 1) o[2 * pairs] = table[p[pairs] >> 4];
  }
}

}  // namespace

void nf4_dequantize_blocks(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                           int64_t block_begin, int64_t block_end, void* out, int dtype) {
#ifdef CORDA_X86
  if (simd_level() >= 3) {  // whole blocks here, a partial last one below
    const int64_t full = n / blocksize < block_end ? n / blocksize : block_end;
    if (full > block_begin) {
      dequantize_full_blocks_avx512(dtype, packed, absmax, blocksize, block_begin, full, out);
      block_begin = full;
    }
    if (block_begin >= block_end) return;
  }
#endif
  switch (dtype) {
    case kF32:
      dequantize_blocks([](float v) { return v; }, (float*)out, packed, absmax, n, blocksize, block_begin,
                        block_end);
      break;
    case kF16:
      dequantize_blocks([](float v) { return float_to_fp16(v); }, (uint16_t*)out, packed, absmax, n, blocksize,
                        block_begin, block_end);
      break;
    default:
      dequantize_blocks([](float v) { return float_to_bf16(v); }, (uint16_t*)out, packed, absmax, n, blocksize,
                        block_begin, block_end);
      break;
  }
}

}  // namespace cpu
}  // namespace corda
