// Covariance update C[k] += Σ scale·mask·xᵀx on tensor cores (bf16 / fp16 in, fp32 accumulation).
//
// One program per 64 × 64 output tile (only tiles on or above the diagonal when upper_only), per
// bucket k, per token split. Four warps, each a 32 × 32 quarter of the tile as 2 × 2 WMMA 16×16×16
// fragments (mma.sync on sm_80 and sm_90a). Tokens stream through shared memory 32 at a time: the
// tile's two 64-column panels of x, masked rows zeroed. With a per-sequence scale, each sequence is
// accumulated into its own fragments and added scaled, as the torch backend scales each sequence.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

#include "corda/cuda_kernels.h"
#include "corda/nf4_math.h"

namespace corda {
namespace cuda {

namespace {

using namespace nvcuda;

constexpr int TILE = 64;
constexpr int KC = 32;             // tokens per shared-memory step
constexpr int LDX = TILE + 8;      // padded row of a panel (16-byte multiple, fewer bank conflicts)
constexpr int LDO = TILE + 4;      // padded row of the fp32 output tile
constexpr int THREADS = 128;

template <typename T>
struct Smem {
  union {
    struct {
      T xi[KC][LDX];
      T xj[KC][LDX];
    } in;
    float out[TILE][LDO];
  };
};

template <typename T>
__device__ __forceinline__ T zero_elem();
template <>
__device__ __forceinline__ __nv_bfloat16 zero_elem<__nv_bfloat16>() {
  return __float2bfloat16(0.0f);
}
template <>
__device__ __forceinline__ __half zero_elem<__half>() {
  return __float2half(0.0f);
}

// Load tokens t0 .. t0+KC-1 of sequence b, columns col0 .. col0+63, into panel[KC][LDX].
template <typename T, bool VEC>
__device__ __forceinline__ void load_panel(T (*panel)[LDX], const T* x, int64_t b, int64_t t0, int64_t col0,
                                           int64_t L, int64_t n, int64_t sb, int64_t sl, int64_t sn,
                                           const uint8_t* mask) {
  if (VEC) {
    // KC × 64 elements as 16-byte vectors of 8: 256 vectors, two per thread
    for (int v = threadIdx.x; v < KC * TILE / 8; v += THREADS) {
      const int r = v / (TILE / 8), c = (v % (TILE / 8)) * 8;
      const int64_t t = t0 + r, col = col0 + c;
      uint4 q = make_uint4(0, 0, 0, 0);
      const bool row_ok = t < L && (mask == nullptr || mask[b * L + t]);
      if (row_ok && col < n) q = *reinterpret_cast<const uint4*>(x + b * sb + t * sl + col);
      *reinterpret_cast<uint4*>(&panel[r][c]) = q;
    }
  } else {
    for (int v = threadIdx.x; v < KC * TILE; v += THREADS) {
      const int r = v / TILE, c = v % TILE;
      const int64_t t = t0 + r, col = col0 + c;
      const bool ok = t < L && col < n && (mask == nullptr || mask[b * L + t]);
      panel[r][c] = ok ? x[b * sb + t * sl + col * sn] : zero_elem<T>();
    }
  }
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(THREADS) covariance_kernel(float* C, const T* x, int64_t B, int64_t L, int64_t n,
                                                             int64_t sb, int64_t sl, int64_t sn,
                                                             const uint8_t* mask, const float* scale,
                                                             const int64_t* bucket, bool upper_only) {
  __shared__ __align__(128) Smem<T> sm;  // WMMA pointers must be 256-bit aligned
  const int nt = (int)((n + TILE - 1) / TILE);
  // tile index → (I, J): row-major over the upper triangle, or over the full grid
  int I = 0, J = 0, t = blockIdx.x;
  if (upper_only) {
    while (t >= nt - I) t -= nt - I++;
    J = I + t;
  } else {
    I = t / nt;
    J = t % nt;
  }
  const int k = blockIdx.y;
  const int split = blockIdx.z, splits = gridDim.z;
  const int64_t chunks = (L + KC - 1) / KC;
  const int64_t units = B * chunks;
  const int64_t u0 = units * split / splits, u1 = units * (split + 1) / splits;

  const int warp = threadIdx.x / 32;
  const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;  // the warp's quarter of the tile
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2], seq[2][2];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      wmma::fill_fragment(acc[a][c], 0.0f);
      wmma::fill_fragment(seq[a][c], 0.0f);
    }
  const bool scaled = scale != nullptr;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t b = u / chunks, t0 = (u % chunks) * KC;
    if (bucket != nullptr && bucket[b] != k) continue;
    load_panel<T, VEC>(sm.in.xi, x, b, t0, (int64_t)I * TILE, L, n, sb, sl, sn, mask);
    load_panel<T, VEC>(sm.in.xj, x, b, t0, (int64_t)J * TILE, L, n, sb, sl, sn, mask);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < KC; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int a = 0; a < 2; ++a) wmma::load_matrix_sync(fa[a], &sm.in.xi[kk][wr + 16 * a], LDX);
#pragma unroll
      for (int c = 0; c < 2; ++c) wmma::load_matrix_sync(fb[c], &sm.in.xj[kk][wc + 16 * c], LDX);
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          if (scaled) {
            wmma::mma_sync(seq[a][c], fa[a], fb[c], seq[a][c]);
          } else {
            wmma::mma_sync(acc[a][c], fa[a], fb[c], acc[a][c]);
          }
        }
    }
    __syncthreads();
    // end of this sequence within the split: add its sum, scaled
    const bool last_of_seq = (t0 + KC >= L) || (u + 1 == u1);
    if (scaled && last_of_seq) {
      const float s = scale[b];
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
#pragma unroll
          for (int i = 0; i < acc[a][c].num_elements; ++i) acc[a][c].x[i] += s * seq[a][c].x[i];
          wmma::fill_fragment(seq[a][c], 0.0f);
        }
    }
  }
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int c = 0; c < 2; ++c)
      wmma::store_matrix_sync(&sm.out[wr + 16 * a][wc + 16 * c], acc[a][c], LDO, wmma::mem_row_major);
  __syncthreads();
  float* Ck = C + (int64_t)k * n * n;
  for (int v = threadIdx.x; v < TILE * TILE; v += THREADS) {
    const int r = v / TILE, c = v % TILE;
    const int64_t gi = (int64_t)I * TILE + r, gj = (int64_t)J * TILE + c;
    if (gi >= n || gj >= n || (upper_only && gi > gj)) continue;
    if (splits > 1) {
      atomicAdd(&Ck[gi * n + gj], sm.out[r][c]);
    } else {
      Ck[gi * n + gj] += sm.out[r][c];
    }
  }
}

template <typename T>
cudaError_t launch(float* C, const void* x, int64_t B, int64_t L, int64_t n, int64_t sb, int64_t sl, int64_t sn,
                   const uint8_t* mask, const float* scale, const int64_t* bucket, int K, bool upper_only,
                   int splits, cudaStream_t stream) {
  const int64_t nt = (n + TILE - 1) / TILE;
  const int64_t tiles = upper_only ? nt * (nt + 1) / 2 : nt * nt;
  if (tiles > 0x7fffffff || K > 65535 || splits < 1 || splits > 65535) return cudaErrorInvalidValue;
  const dim3 grid((unsigned)tiles, (unsigned)K, (unsigned)splits);
  const T* xp = static_cast<const T*>(x);
  const bool vec = sn == 1 && n % 8 == 0 && sl % 8 == 0 && sb % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  if (vec) {
    covariance_kernel<T, true><<<grid, THREADS, 0, stream>>>(C, xp, B, L, n, sb, sl, sn, mask, scale, bucket,
                                                            upper_only);
  } else {
    covariance_kernel<T, false><<<grid, THREADS, 0, stream>>>(C, xp, B, L, n, sb, sl, sn, mask, scale, bucket,
                                                             upper_only);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t covariance_update(float* C, const void* x, int dtype, int64_t B, int64_t L, int64_t n, int64_t sb,
                              int64_t sl, int64_t sn, const uint8_t* mask, const float* scale,
                              const int64_t* bucket, int K, bool upper_only, int splits, cudaStream_t stream) {
  if (B == 0 || L == 0 || n == 0) return cudaSuccess;
  if (dtype == kBF16)
    return launch<__nv_bfloat16>(C, x, B, L, n, sb, sl, sn, mask, scale, bucket, K, upper_only, splits, stream);
  if (dtype == kF16)
    return launch<__half>(C, x, B, L, n, sb, sl, sn, mask, scale, bucket, K, upper_only, splits, stream);
  return cudaErrorInvalidValue;  // fp32 inputs stay on the torch path (no fp32 tensor-core mode here)
}

}  // namespace cuda
}  // namespace corda
