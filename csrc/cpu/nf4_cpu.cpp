// NF4 quantize / dequantize on the CPU, byte-exact with bitsandbytes (see nf4_math.h).
#include <math.h>

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
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * blocksize;
    const int64_t count = n - start < blocksize ? n - start : blocksize;
    float am = 0.0f;
    for (int64_t i = 0; i < count; ++i) {
      float v = load(start + i);
      vals[i] = v;
      float a = fabsf(v);
      am = a > am ? a : am;
    }
    const bool partial = count < blocksize;
    const BlockScale s = block_scale(am, partial, bnb_cuda, 1.0f / am);
    absmax[b] = s.stored_absmax;
    const int64_t padded = count + (count & 1);
    if (count & 1) vals[count] = 0.0f;
    uint8_t* out = packed + start / 2;
    for (int64_t i = 0; i < padded; i += 2) {
      uint8_t hi = nf4_code(apply_scale(s, vals[i]));
      // bitsandbytes' CPU path pads an odd count with code 7; its CUDA kernel quantizes a zero
      uint8_t lo = (i + 1 < count || bnb_cuda) ? nf4_code(apply_scale(s, vals[i + 1])) : (uint8_t)7;
      out[i / 2] = (uint8_t)((hi << 4) | lo);
    }
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

struct PairTable {
  float v[256][2];  // byte → (level of its high nibble, level of its low nibble)
  PairTable() {
    for (int c = 0; c < 256; ++c) {
      v[c][0] = nf4_level(c >> 4);
      v[c][1] = nf4_level(c & 15);
    }
  }
};

template <typename T, typename Store>
void dequantize_blocks(Store store, T* out, const uint8_t* packed, const float* absmax, int64_t n,
                       int64_t blocksize, int64_t b0, int64_t b1) {
  static const PairTable table;
  for (int64_t b = b0; b < b1; ++b) {
    const float am = absmax[b];
    const int64_t start = b * blocksize;
    const int64_t end = n - start < blocksize ? n : start + blocksize;
    const int64_t pairs = (end - start) / 2;
    const uint8_t* p = packed + start / 2;
    T* o = out + start;
    for (int64_t j = 0; j < pairs; ++j) {
      o[2 * j] = store(table.v[p[j]][0] * am);
      o[2 * j + 1] = store(table.v[p[j]][1] * am);
    }
    if ((end - start) & 1) o[2 * pairs] = store(table.v[p[pairs]][0] * am);
  }
}

}  // namespace

void nf4_dequantize_blocks(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                           int64_t block_begin, int64_t block_end, void* out, int dtype) {
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
