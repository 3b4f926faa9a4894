// CPU kernels: plain C++ over pointers and sizes (no torch headers). The torch bindings
// (csrc/torch_bindings.cpp) split the work into block ranges and run them on torch's thread pool.
#pragma once

#include <stdint.h>

namespace corda {
namespace cpu {

// NF4-quantize quantization blocks [block_begin, block_end) of the flat array ``x`` (``n``
// elements of ``dtype``, see DType) into ``packed`` ((n+1)/2 bytes, element 2j in the high nibble
// of byte j) and ``absmax`` (one fp32 per block). ``bnb_cuda`` selects bitsandbytes' CUDA
// arithmetic instead of its CPU arithmetic (nf4_math.h, block_scale).
void nf4_quantize_blocks(const void* x, int dtype, int64_t n, int64_t blocksize, bool bnb_cuda,
                         int64_t block_begin, int64_t block_end, uint8_t* packed, float* absmax);

// Dequantize quantization blocks [block_begin, block_end) of ``packed`` into ``out`` (``n``
// elements of ``dtype``): element e = level(code) · absmax[e / blocksize] in fp32, rounded to ``dtype``.
void nf4_dequantize_blocks(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                           int64_t block_begin, int64_t block_end, void* out, int dtype);

}  // namespace cpu
}  // namespace corda
