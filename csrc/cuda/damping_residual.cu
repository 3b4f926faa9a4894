// The damping search's check ‖A·Binv − I‖_F² (A = C_fix, Binv = C_inv), fused: each program forms a
// 64 × 64 tile of the product in registers with fp32 FMA dots (the rule's arithmetic, no tensor
// cores), subtracts the identity, and adds the tile's squared sum to out[b] in float64. Nothing of
// size n × n is written.
#include <stdint.h>

#include "corda/cuda_kernels.h"

namespace corda {
namespace cuda {

namespace {

constexpr int TILE = 64;
constexpr int KC = 16;
constexpr int THREADS = 256;  // 16 × 16 threads, 4 × 4 outputs each

__global__ void __launch_bounds__(THREADS) residual_kernel(const float* A, const float* Bm, int64_t n, int64_t sab,
                                                           int64_t sam, int64_t sak, int64_t sbb, int64_t sbm,
                                                           int64_t sbk, double* out) {
  __shared__ float as[KC][TILE + 4];  // as[k][m] = A[m][k]
  __shared__ float bs[KC][TILE + 4];  // bs[k][j] = Binv[k][j]
  __shared__ double red[THREADS / 32];
  const int64_t nt = (n + TILE - 1) / TILE;
  const int64_t I = blockIdx.x / nt, J = blockIdx.x % nt;
  const int64_t b = blockIdx.y;
  const float* a = A + b * sab;
  const float* bm = Bm + b * sbb;
  const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < n; k0 += KC) {
    for (int v = threadIdx.x; v < KC * TILE; v += THREADS) {
      // A: consecutive threads walk k (its fastest index in a row-major A)
      const int m = v / KC, kk = v % KC;
      const int64_t gm = I * TILE + m, gk = k0 + kk;
      as[kk][m] = (gm < n && gk < n) ? a[gm * sam + gk * sak] : 0.0f;
      const int kb = v / TILE, j = v % TILE;
      const int64_t gkb = k0 + kb, gj = J * TILE + j;
      bs[kb][j] = (gkb < n && gj < n) ? bm[gkb * sbm + gj * sbk] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < KC; ++kk) {
      float ra[4], rb[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) ra[i] = as[kk][tr + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) rb[j] = bs[kk][tc + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(ra[i], rb[j], acc[i][j]);
    }
    __syncthreads();
  }
  double sq = 0.0;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gi = I * TILE + tr + 16 * i, gj = J * TILE + tc + 16 * j;
      if (gi < n && gj < n) {
        const float d = gi == gj ? acc[i][j] - 1.0f : acc[i][j];
        sq += (double)d * (double)d;
      }
    }
  for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = sq;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0.0;
    for (int w = 0; w < THREADS / 32; ++w) s += red[w];
    atomicAdd(out + b, s);
  }
}

}  // namespace

cudaError_t damping_residual_sq(const float* A, const float* Binv, int64_t batch, int64_t n, int64_t sab,
                                int64_t sam, int64_t sak, int64_t sbb, int64_t sbm, int64_t sbk, double* out,
                                cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(out, 0, sizeof(double) * (size_t)batch, stream);
  if (err != cudaSuccess || batch == 0 || n == 0) return err;
  const int64_t nt = (n + TILE - 1) / TILE;
  if (nt * nt > 0x7fffffff || batch > 65535) return cudaErrorInvalidValue;
  residual_kernel<<<dim3((unsigned)(nt * nt), (unsigned)batch), THREADS, 0, stream>>>(A, Binv, n, sab, sam, sak, sbb,
                                                                                      sbm, sbk, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace corda
