// NF4 quantize / pack / dequantize, the fused residual → NF4, and bitsandbytes' 8-bit blockwise
// quantization (for double quantization), byte-exact with bitsandbytes' CUDA kernels.
//
// Work split: each thread owns CHUNK = 8 consecutive elements (four output bytes, one or two
// 16-byte loads); a quantization block of ``blocksize`` elements is a group of blocksize/8
// consecutive threads, which reduce their absmax with warp shuffles (and shared memory when the
// group spans several warps). A program covers max(2048, blocksize) elements per step.
#include <stdint.h>

#include "corda/cuda_kernels.h"
#include "corda/nf4_math.h"

namespace corda {
namespace cuda {

namespace {

constexpr int CHUNK = 8;

__device__ __forceinline__ float reciprocal(float a, int mode) {
  float r;
  if (mode == kRecipApprox) {
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a));
  } else if (mode == kRecipDivFull) {
    asm("div.full.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(1.0f), "f"(a));
  } else if (mode == kRecipTowardZero) {
    r = __frcp_rz(a);
  } else {
    r = __frcp_rn(a);
  }
  return r;
}

// Max over the group of ``group`` consecutive threads (a power of two) holding ``v``.
__device__ __forceinline__ float group_max(float v, int group, float* smem) {
  const int lanes = group < 32 ? group : 32;
  for (int off = lanes / 2; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  if (group <= 32) return v;
  // the group spans group/32 warps: combine their maxima through shared memory
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int first = (warp / (group / 32)) * (group / 32);
  float m = smem[first];
  for (int w = 1; w < group / 32; ++w) m = fmaxf(m, smem[first + w]);
  return m;
}

template <int DT>
__device__ __forceinline__ void load_chunk(const void* x, int64_t e, int64_t n, bool vec, float* v) {
  if (vec && e + CHUNK <= n) {
    if (DT == kF32) {
      const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(x) + e);
      float4 a = p[0], b = p[1];
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
      uint4 q = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(x) + e);
      uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        uint16_t lo = (uint16_t)(w[i] & 0xffffu), hi = (uint16_t)(w[i] >> 16);
        v[2 * i] = DT == kF16 ? fp16_to_float(lo) : bf16_to_float(lo);
        v[2 * i + 1] = DT == kF16 ? fp16_to_float(hi) : bf16_to_float(hi);
      }
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < CHUNK; ++i) v[i] = e + i < n ? load_as_float(x, e + i, DT) : 0.0f;
}

// Residual values W − s·(B·A) of elements e .. e+7 (flat indices into the (M, N) weight), each
// product an fp32 FMA dot over R in order, then W.float() − s·dot rounded to the weight's dtype.
template <int DT>
__device__ __forceinline__ void residual_chunk(const void* W, const float* B, const float* A, int64_t N, int64_t R,
                                               float scaling, int64_t e, int64_t n, float* v) {
#pragma unroll
  for (int i = 0; i < CHUNK; ++i) {
    const int64_t f = e + i;
    if (f >= n) {
      v[i] = 0.0f;
      continue;
    }
    const int64_t row = f / N, col = f - row * N;
    const float* b = B + row * R;
    float acc = 0.0f;
    for (int64_t k = 0; k < R; ++k) acc = fmaf(b[k], A[k * N + col], acc);
    const float w = load_as_float(W, f, DT);
    v[i] = round_to_dtype(__fsub_rn(w, __fmul_rn(scaling, acc)), DT);
  }
}

// Quantize and store one chunk (elements e .. e+7, values v, elements past n holding 0) whose
// quantization block is reduced over ``group`` consecutive threads. Every thread of the program
// must call this (the reduction synchronizes).
__device__ __forceinline__ void quantize_chunk(const float* v, int64_t e, int64_t n, int blocksize, int group,
                                               bool bnb_cuda, int recip_mode, float* smem, uint8_t* packed,
                                               float* absmax) {
  float am = 0.0f;
#pragma unroll
  for (int i = 0; i < CHUNK; ++i) am = fmaxf(am, fabsf(v[i]));
  am = group_max(am, group, smem);
  const int64_t block = e / blocksize;
  const int64_t block_start = block * blocksize;
  if (block_start >= n) return;  // a group wholly past the end (its threads still joined the reduction)
  const bool partial = n - block_start < blocksize;
  const BlockScale s = block_scale(am, partial, bnb_cuda, reciprocal(am, recip_mode));
  if (e == block_start) absmax[block] = s.stored_absmax;
  const int64_t padded_n = n + (n & 1);
  if (e >= padded_n) return;
  uint8_t q[CHUNK];
#pragma unroll
  for (int i = 0; i < CHUNK; ++i) {
    // the pad element of an odd n: bitsandbytes' CUDA kernel quantizes a zero, its CPU path writes code 7
    q[i] = (e + i < n || bnb_cuda) ? nf4_code(apply_scale(s, v[i])) : (uint8_t)7;
  }
  if (e + CHUNK <= padded_n) {
    uint32_t word = 0;
#pragma unroll
    for (int i = 0; i < CHUNK / 2; ++i) word |= (uint32_t)((q[2 * i] << 4) | q[2 * i + 1]) << (8 * i);
    *reinterpret_cast<uint32_t*>(packed + e / 2) = word;
  } else {
#pragma unroll
    for (int i = 0; i < CHUNK; i += 2)
      if (e + i < padded_n) packed[(e + i) / 2] = (uint8_t)((q[i] << 4) | q[i + 1]);
  }
}

template <int DT, bool RESIDUAL>
__global__ void nf4_quantize_kernel(const void* x, const float* B, const float* A, int64_t N, int64_t R,
                                    float scaling, int64_t n, int blocksize, bool bnb_cuda, int recip_mode,
                                    bool vec, uint8_t* packed, float* absmax) {
  __shared__ float smem[32];
  const int group = blocksize / CHUNK;
  const int64_t per_step = (int64_t)blockDim.x * CHUNK;
  for (int64_t base = (int64_t)blockIdx.x * per_step; base < n; base += (int64_t)gridDim.x * per_step) {
    const int64_t e = base + (int64_t)threadIdx.x * CHUNK;
    float v[CHUNK];
    if (RESIDUAL) {
      residual_chunk<DT>(x, B, A, N, R, scaling, e, n, v);
    } else {
      load_chunk<DT>(x, e, n, vec, v);
    }
    quantize_chunk(v, e, n, blocksize, group, bnb_cuda, recip_mode, smem, packed, absmax);
  }
}

// The fused residual when N is a multiple of the blocksize (≤ 256): a program owns a tile of
// TM rows × TN columns (TN = max(128, blocksize), TM·TN = 4096), stages B's rows and A's columns
// through shared memory 16 ranks at a time, keeps its 16 residual values per thread in
// registers (two chunks of 8 consecutive columns), and quantizes them in place: every
// quantization block lies inside one tile row.
constexpr int RES_THREADS = 256;
constexpr int RES_ELEMS = 4096;
constexpr int RES_KC = 16;

template <int DT, int TN>
__global__ void __launch_bounds__(RES_THREADS)
    nf4_residual_tiled_kernel(const void* W, const float* B, const float* A, int64_t M, int64_t N, int64_t R,
                              float scaling, int blocksize, bool bnb_cuda, int recip_mode, uint8_t* packed,
                              float* absmax) {
  constexpr int TM = RES_ELEMS / TN;
  constexpr int CPR = TN / CHUNK;  // chunks per tile row
  __shared__ float bs[TM][RES_KC + 1];
  __shared__ __align__(16) float as[RES_KC][TN];
  __shared__ float smem[32];
  const int64_t tiles_n = N / TN + (N % TN ? 1 : 0);
  const int64_t row0 = (int64_t)(blockIdx.x / tiles_n) * TM, col0 = (int64_t)(blockIdx.x % tiles_n) * TN;
  static_assert(RES_THREADS % CPR == 0, "a thread's two chunks share their columns");
  float acc[2][CHUNK];
  // chunks t and t + RES_THREADS: rows rr[0] and rr[0] + RES_THREADS/CPR, the same 8 columns cc
  const int rr[2] = {(int)threadIdx.x / CPR, (int)threadIdx.x / CPR + RES_THREADS / CPR};
  const int cc = ((int)threadIdx.x % CPR) * CHUNK;
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int i = 0; i < CHUNK; ++i) acc[h][i] = 0.0f;
  for (int64_t k0 = 0; k0 < R; k0 += RES_KC) {
    for (int t = threadIdx.x; t < TM * RES_KC; t += RES_THREADS) {
      const int r = t / RES_KC, k = t % RES_KC;
      bs[r][k] = (row0 + r < M && k0 + k < R) ? B[(row0 + r) * R + k0 + k] : 0.0f;
    }
    for (int t = threadIdx.x; t < RES_KC * TN; t += RES_THREADS) {
      const int k = t / TN, c = t % TN;
      as[k][c] = (k0 + k < R && col0 + c < N) ? A[(k0 + k) * N + col0 + c] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < RES_KC; ++k) {
      const float4 a0 = *reinterpret_cast<const float4*>(&as[k][cc]);
      const float4 a1 = *reinterpret_cast<const float4*>(&as[k][cc + 4]);
      const float a[CHUNK] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float b = bs[rr[h]][k];
#pragma unroll
        for (int i = 0; i < CHUNK; ++i) acc[h][i] = fmaf(b, a[i], acc[h][i]);
      }
    }
    __syncthreads();
  }
  const int64_t n = M * N;
  const int group = blocksize / CHUNK;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = row0 + rr[h], col = col0 + cc;
    const bool inside = row < M && col < N;  // N % TN may leave a partial tile; N % 8 == 0 here
    // a chunk outside W (a partial tile) takes an index past n: it joins its group's reduction, writes nothing
    const int64_t e = inside ? row * N + col : n + (int64_t)CHUNK * (threadIdx.x + h * RES_THREADS);
    float v[CHUNK];
#pragma unroll
    for (int i = 0; i < CHUNK; ++i) {
      v[i] = inside ? round_to_dtype(__fsub_rn(load_as_float(W, e + i, DT), __fmul_rn(scaling, acc[h][i])), DT)
                    : 0.0f;
    }
    quantize_chunk(v, e, n, blocksize, group, bnb_cuda, recip_mode, smem, packed, absmax);
  }
}

template <int DT>
__global__ void nf4_dequantize_kernel(const uint8_t* packed, const float* absmax, int64_t n, int blocksize,
                                      bool vec, void* out) {
  // the 16 levels in shared memory: a per-element switch compiles to a slow chain of selects
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = nf4_level((int)threadIdx.x);
  __syncthreads();
  const int64_t stride = (int64_t)gridDim.x * blockDim.x * CHUNK;
  for (int64_t e = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * CHUNK; e < n; e += stride) {
    const float am = absmax[e / blocksize];  // CHUNK divides every blocksize: one block per chunk
    float v[CHUNK];
    if (vec && e + CHUNK <= n) {
      uint32_t word = *reinterpret_cast<const uint32_t*>(packed + e / 2);
#pragma unroll
      for (int i = 0; i < CHUNK / 2; ++i) {
        const uint32_t byte = (word >> (8 * i)) & 0xffu;
        v[2 * i] = lut[byte >> 4] * am;
        v[2 * i + 1] = lut[byte & 15u] * am;
      }
    } else {
      for (int i = 0; i < CHUNK; ++i) {
        const uint8_t byte = e + i < n ? packed[(e + i) / 2] : 0;
        v[i] = lut[(i & 1) ? (byte & 15) : (byte >> 4)] * am;
      }
    }
    if (vec && e + CHUNK <= n) {
      if (DT == kF32) {
        float4* p = reinterpret_cast<float4*>(static_cast<float*>(out) + e);
        p[0] = make_float4(v[0], v[1], v[2], v[3]);
        p[1] = make_float4(v[4], v[5], v[6], v[7]);
      } else {
        uint32_t w[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          uint16_t lo = DT == kF16 ? float_to_fp16(v[2 * i]) : float_to_bf16(v[2 * i]);
          uint16_t hi = DT == kF16 ? float_to_fp16(v[2 * i + 1]) : float_to_bf16(v[2 * i + 1]);
          w[i] = (uint32_t)lo | ((uint32_t)hi << 16);
        }
        *reinterpret_cast<uint4*>(static_cast<uint16_t*>(out) + e) = make_uint4(w[0], w[1], w[2], w[3]);
      }
    } else {
      for (int i = 0; i < CHUNK && e + i < n; ++i) {
        if (DT == kF32) {
          static_cast<float*>(out)[e + i] = v[i];
        } else {
          static_cast<uint16_t*>(out)[e + i] = DT == kF16 ? float_to_fp16(v[i]) : float_to_bf16(v[i]);
        }
      }
    }
  }
}

__global__ void blockwise8_quantize_kernel(const float* x, int64_t n, int blocksize, const float* code,
                                           int recip_mode, uint8_t* out, float* absmax) {
  __shared__ float table[256];
  __shared__ float red[32];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) table[i] = code[i];
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
    const int64_t start = b * blocksize;
    const int64_t end = n - start < blocksize ? n : start + blocksize;
    float am = 0.0f;
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) am = fmaxf(am, fabsf(x[i]));
    for (int off = 16; off > 0; off >>= 1) am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, off));
    __syncthreads();
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = am;
    __syncthreads();
    am = red[0];
    for (int w = 1; w < (int)blockDim.x / 32; ++w) am = fmaxf(am, red[w]);
    const float r = reciprocal(am, recip_mode);
    if (threadIdx.x == 0) absmax[b] = am;
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) out[i] = dynamic_code_search(table, x[i] * r);
  }
}

int grid_for(int64_t work, int per_program) {
  int64_t g = (work + per_program - 1) / per_program;
  return (int)(g < 1 ? 1 : (g > 65535 * 32 ? 65535 * 32 : g));
}

template <bool RESIDUAL>
cudaError_t launch_quantize(const void* x, int dtype, const float* B, const float* A, int64_t N, int64_t R,
                            float scaling, int64_t n, int blocksize, bool bnb_cuda, int recip_mode,
                            uint8_t* packed, float* absmax, cudaStream_t stream) {
  if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1))) return cudaErrorInvalidValue;
  const int threads = blocksize / CHUNK > 256 ? blocksize / CHUNK : 256;
  const int grid = grid_for(n, threads * CHUNK);
  const bool vec = !RESIDUAL && reinterpret_cast<uintptr_t>(x) % 16 == 0;
#define CORDA_LAUNCH(DTV)                                                                                   \
  nf4_quantize_kernel<DTV, RESIDUAL><<<grid, threads, 0, stream>>>(x, B, A, N, R, scaling, n, blocksize, \
                                                                   bnb_cuda, recip_mode, vec, packed, absmax)
  if (dtype == kF32) {
    CORDA_LAUNCH(kF32);
  } else if (dtype == kF16) {
    CORDA_LAUNCH(kF16);
  } else {
    CORDA_LAUNCH(kBF16);
  }
#undef CORDA_LAUNCH
  return cudaGetLastError();
}

}  // namespace

cudaError_t nf4_quantize(const void* x, int dtype, int64_t n, int blocksize, bool bnb_cuda, int recip_mode,
                         uint8_t* packed, float* absmax, cudaStream_t stream) {
  return launch_quantize<false>(x, dtype, nullptr, nullptr, 1, 0, 0.0f, n, blocksize, bnb_cuda, recip_mode, packed,
                                absmax, stream);
}

cudaError_t nf4_quantize_residual(const void* W, int dtype, const float* B, const float* A, int64_t M,
                                  int64_t N, int64_t R, float scaling, int blocksize, bool bnb_cuda,
                                  int recip_mode, uint8_t* packed, float* absmax, cudaStream_t stream) {
  if (blocksize >= 32 && blocksize <= 256 && N % blocksize == 0 && M > 0) {
    const int tn = blocksize > 128 ? blocksize : 128;
    const int64_t tm = RES_ELEMS / tn;
    const int64_t grid = ((M + tm - 1) / tm) * ((N + tn - 1) / tn);
    if (grid <= 0x7fffffff) {
#define CORDA_TILED(DTV, TNV)                                                                            \
  nf4_residual_tiled_kernel<DTV, TNV><<<(unsigned)grid, RES_THREADS, 0, stream>>>(                       \
      W, B, A, M, N, R, scaling, blocksize, bnb_cuda, recip_mode, packed, absmax)
      if (tn == 128) {
        if (dtype == kF32) CORDA_TILED(kF32, 128);
        else if (dtype == kF16) CORDA_TILED(kF16, 128);
        else CORDA_TILED(kBF16, 128);
      } else {
        if (dtype == kF32) CORDA_TILED(kF32, 256);
        else if (dtype == kF16) CORDA_TILED(kF16, 256);
        else CORDA_TILED(kBF16, 256);
      }
#undef CORDA_TILED
      return cudaGetLastError();
    }
  }
  return launch_quantize<true>(W, dtype, B, A, N, R, scaling, M * N, blocksize, bnb_cuda, recip_mode, packed,
                               absmax, stream);
}

cudaError_t nf4_dequantize(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, void* out,
                           int dtype, cudaStream_t stream) {
  const int threads = 256;
  const int grid = grid_for(n, threads * CHUNK);
  const bool vec = reinterpret_cast<uintptr_t>(out) % 16 == 0 && reinterpret_cast<uintptr_t>(packed) % 4 == 0;
  if (dtype == kF32) {
    nf4_dequantize_kernel<kF32><<<grid, threads, 0, stream>>>(packed, absmax, n, blocksize, vec, out);
  } else if (dtype == kF16) {
    nf4_dequantize_kernel<kF16><<<grid, threads, 0, stream>>>(packed, absmax, n, blocksize, vec, out);
  } else {
    nf4_dequantize_kernel<kBF16><<<grid, threads, 0, stream>>>(packed, absmax, n, blocksize, vec, out);
  }
  return cudaGetLastError();
}

cudaError_t blockwise8_quantize(const float* x, int64_t n, int blocksize, const float* code, int recip_mode,
                                uint8_t* out, float* absmax, cudaStream_t stream) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const int grid = (int)(nblocks < 65535 ? (nblocks < 1 ? 1 : nblocks) : 65535);
  blockwise8_quantize_kernel<<<grid, 256, 0, stream>>>(x, n, blocksize, code, recip_mode, out, absmax);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace corda
