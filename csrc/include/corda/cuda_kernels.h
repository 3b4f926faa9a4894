// CUDA kernel launchers: pointers, sizes and a stream (no torch headers). Each returns the launch's
// cudaError_t; the torch bindings (csrc/torch_bindings.cpp) check it and name the op that failed.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace corda {
namespace cuda {

// How 1/absmax is computed in bitsandbytes' CUDA arithmetic: its fast-math build's approximate
// reciprocal (the default), an IEEE reciprocal, the full-range approximate division, or the
// reciprocal rounded toward zero (the last three for the GPU suite's comparison with bitsandbytes).
enum RecipMode : int { kRecipApprox = 0, kRecipIEEE = 1, kRecipDivFull = 2, kRecipTowardZero = 3 };

// NF4 quantize + pack of ``n`` elements of ``dtype`` (nf4_math.h DType) in blocks of ``blocksize``
// (32..4096, a power of two): ``packed`` (n+1)/2 bytes, ``absmax`` one fp32 per block.
cudaError_t nf4_quantize(const void* x, int dtype, int64_t n, int blocksize, bool bnb_cuda, int recip_mode,
                         uint8_t* packed, float* absmax, cudaStream_t stream);

// The fused residual: NF4 of round_to_dtype(W − scaling·(B·A)) without W_res in global memory.
// ``W`` (M, N) row-major of ``dtype``; ``B`` (M, R) and ``A`` (R, N) row-major fp32.
cudaError_t nf4_quantize_residual(const void* W, int dtype, const float* B, const float* A, int64_t M,
                                  int64_t N, int64_t R, float scaling, int blocksize, bool bnb_cuda,
                                  int recip_mode, uint8_t* packed, float* absmax, cudaStream_t stream);

// ``out`` (n elements of ``dtype``) = level(code) · absmax[block], rounded to ``dtype``.
cudaError_t nf4_dequantize(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, void* out,
                           int dtype, cudaStream_t stream);

// bitsandbytes' CUDA 8-bit blockwise quantization of fp32 ``x`` over the 256-entry dynamic map
// ``code`` (device memory): ``out`` n codes, ``absmax`` one fp32 per block.
cudaError_t blockwise8_quantize(const float* x, int64_t n, int blocksize, const float* code, int recip_mode,
                                uint8_t* out, float* absmax, cudaStream_t stream);

// C[k] += Σ_b [bucket[b] == k] · scale[b] · Σ_t mask[b,t] · x[b,t]ᵀ x[b,t] for bf16 / fp16 ``x``
// (B, L, n) with element strides (sb, sl, sn), on tensor cores with fp32 accumulation. ``C`` is
// (K, n, n) contiguous fp32; ``mask`` (B, L) bytes, ``scale`` (B,) fp32 and ``bucket`` (B,) int64
// may be null. With ``upper_only`` only the upper triangle (diagonal included) is written and the
// strict lower triangle is left untouched. ``splits`` > 1 splits the tokens among programs that add
// their partial sums atomically (small n).
cudaError_t covariance_update(float* C, const void* x, int dtype, int64_t B, int64_t L, int64_t n, int64_t sb,
                              int64_t sl, int64_t sn, const uint8_t* mask, const float* scale,
                              const int64_t* bucket, int K, bool upper_only, int splits, cudaStream_t stream);

// out[b] = ‖A[b]·Binv[b] − I‖_F² in float64 for fp32 (batch, n, n) matrices with element strides,
// the product formed tile by tile in registers (exact fp32 FMA dots, no n × n temporary).
cudaError_t damping_residual_sq(const float* A, const float* Binv, int64_t batch, int64_t n, int64_t sab,
                                int64_t sam, int64_t sak, int64_t sbb, int64_t sbm, int64_t sbk, double* out,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace corda
