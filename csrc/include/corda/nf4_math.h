// Per-element NF4 and 8-bit blockwise arithmetic shared by the CPU and CUDA kernels.
//
// Everything here is __host__ __device__ so that the CPU build compiles and tests the very code
// the CUDA kernels run. The arithmetic reproduces bitsandbytes' formats byte for byte
// (docs/design.md, "NF4"): fp32 midpoints between neighbouring NF4 levels, a value exactly on a
// midpoint going to the lower code; bitsandbytes' 7-step binary search over its signed dynamic
// map for the nested 8-bit statistics. No torch headers: plain pointers and sizes only.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define CORDA_HD __host__ __device__ __forceinline__
#else
#define CORDA_HD inline
#endif

namespace corda {

// The 16 NF4 levels, ascending, exactly representable in fp32. A switch rather than a table: no
// global memory, and the same code on host and device.
CORDA_HD float nf4_level(int code) {
  switch (code & 15) {
    case 0: return -1.0f;
    case 1: return -0.6961928009986877f;
    case 2: return -0.5250730514526367f;
    case 3: return -0.39491748809814453f;
    case 4: return -0.28444138169288635f;
    case 5: return -0.18477343022823334f;
    case 6: return -0.09105003625154495f;
    case 7: return 0.0f;
    case 8: return 0.07958029955625534f;
    case 9: return 0.16093020141124725f;
    case 10: return 0.24611230194568634f;
    case 11: return 0.33791524171829224f;
    case 12: return 0.44070982933044434f;
    case 13: return 0.5626170039176941f;
    case 14: return 0.7229568362236023f;
    default: return 1.0f;
  }
}

// NF4 code of a scaled value: the number of fp32 midpoints strictly below it (ties go to the lower
// code), the same decision as bitsandbytes' four-level tree. Branch-free, so that it vectorizes on
// the CPU and does not diverge on the GPU; NaN compares false everywhere and gets code 0, as in
// bitsandbytes' CUDA tree. The literals are (c[i] + c[i+1]) * 0.5f of the levels, exact in fp32.
CORDA_HD uint8_t nf4_code(float x) {
  return (uint8_t)((x > -0.8480964f) + (x > -0.6106329f) + (x > -0.45999527f) + (x > -0.33967942f) +
                   (x > -0.2346074f) + (x > -0.13791174f) + (x > -0.045525018f) + (x > 0.03979015f) +
                   (x > 0.12025525f) + (x > 0.20352125f) + (x > 0.29201376f) + (x > 0.38931254f) +
                   (x > 0.50166345f) + (x > 0.6427869f) + (x > 0.86147845f));
}

// bitsandbytes' CUDA dQuantize<0> (stochastic off): 7-step binary search over the ascending
// 256-entry signed dynamic map ``code``, then the nearer of the two neighbours with its tie rules.
CORDA_HD uint8_t dynamic_code_search(const float* code, float x) {
  int pivot = 127, upper_p = 255, lower_p = 0;
  float upper = 1.0f, lower = -1.0f;
  float val = code[pivot];
  for (int step = 64; step > 0; step >>= 1) {
    if (x > val) {
      lower_p = pivot;
      lower = val;
      pivot += step;
    } else {
      upper_p = pivot;
      upper = val;
      pivot -= step;
    }
    val = code[pivot];
  }
  if (upper_p == 255) upper = code[255];
  if (lower_p == 0) lower = code[0];
  if (x > val) {
    float mid = (upper + val) * 0.5f;
    return (uint8_t)(x > mid ? upper_p : pivot);
  }
  float mid = (lower + val) * 0.5f;
  return (uint8_t)(x < mid ? lower_p : pivot);
}

// ---- storage conversions (bit-exact, round to nearest even) ---------------------------------

CORDA_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  union {
    uint32_t u;
    float f;
  } v;
  v.u = u;
  return v.f;
#endif
}

CORDA_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  union {
    uint32_t u;
    float f;
  } v;
  v.f = f;
  return v.u;
#endif
}

CORDA_HD float bf16_to_float(uint16_t h) { return bits_to_float(((uint32_t)h) << 16); }

CORDA_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

CORDA_HD float fp16_to_float(uint16_t h) {
  uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // subnormal: man · 2^-24, exact in fp32
    float v = (float)man * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

CORDA_HD uint16_t float_to_fp16(float f) {
  uint32_t u = float_to_bits(f);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to inf (>= 65520)
  if (a < 0x38800000u) {
    // result is subnormal or zero in fp16: round a · 2^24 to an integer, nearest even
    if (a < 0x33000000u) return sign;  // below half the smallest subnormal: ±0
    uint32_t exp = a >> 23;
    uint32_t man = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - exp;  // 14 + (112 - exp) + ... : value = man · 2^(exp-150) → ·2^24
    uint32_t q = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) q += 1u;
    return (uint16_t)(sign | q);
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round the 13 dropped bits, nearest even
  return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

// Element types by tag: 0 fp32, 1 fp16, 2 bf16 (the order of corda_kernels' dtype codes).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

CORDA_HD float load_as_float(const void* p, int64_t i, int dtype) {
  if (dtype == kF32) return ((const float*)p)[i];
  uint16_t h = ((const uint16_t*)p)[i];
  return dtype == kF16 ? fp16_to_float(h) : bf16_to_float(h);
}

// Round an fp32 value to ``dtype`` and back (the residual's cast to the weight's dtype).
CORDA_HD float round_to_dtype(float x, int dtype) {
  if (dtype == kF16) return fp16_to_float(float_to_fp16(x));
  if (dtype == kBF16) return bf16_to_float(float_to_bf16(x));
  return x;
}

// ---- block scale ------------------------------------------------------------------------------

// How a block's values are scaled before the code lookup, following the device whose bytes are
// reproduced (docs/design.md, "NF4"):
//  * bitsandbytes' CPU path: full blocks multiply by 1/max(absmax, 1e-38); the partial last block
//    divides by max(absmax, 1e-38) and stores that clamped absmax;
//  * bitsandbytes' CUDA kernels: every block multiplies by 1/absmax and stores the raw absmax.
struct BlockScale {
  float stored_absmax;
  float factor;   // multiply by this ...
  bool divide;    // ... or divide by ``factor`` instead
};

// ``recip`` is the reciprocal to use in CUDA arithmetic (IEEE here, rcp.approx on the GPU).
CORDA_HD BlockScale block_scale(float absmax, bool partial, bool bnb_cuda, float recip) {
  BlockScale s;
  if (bnb_cuda) {
    s.stored_absmax = absmax;
    s.factor = recip;
    s.divide = false;
    return s;
  }
  float clamped = absmax > 1e-38f ? absmax : 1e-38f;
  if (partial) {
    s.stored_absmax = clamped;
    s.factor = clamped;
    s.divide = true;
  } else {
    s.stored_absmax = absmax;
    s.factor = 1.0f / clamped;
    s.divide = false;
  }
  return s;
}

CORDA_HD float apply_scale(const BlockScale& s, float v) { return s.divide ? v / s.factor : v * s.factor; }

}  // namespace corda
