// The torch bindings of every compiled kernel, in one place: the schemas of the
// ``corda_kernels_C`` ops and their CPU and (when built with CUDA) CUDA implementations.
// corda_kernels/kernels/compiled.py registers them as the ``cpp`` and ``cuda`` backends of the
// library's ops; arguments are checked there and here, with the op's name in every message.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "corda/cpu_kernels.h"

#ifdef CORDA_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "corda/cuda_kernels.h"
#endif

namespace {

int dtype_code(at::ScalarType s, const char* op) {
  switch (s) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, op, ": expected float32, float16 or bfloat16, got ", s);
  }
  return -1;
}

int dtype_code(const at::Tensor& t, const char* op) { return dtype_code(t.scalar_type(), op); }

void check_blocksize(int64_t blocksize, const char* op) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, op,
              ": blocksize must be a power of two in [32, 4096], got ", blocksize);
}

std::tuple<at::Tensor, at::Tensor> quant_outputs(const at::Tensor& like, int64_t n, int64_t blocksize) {
  auto opts = like.options();
  return {at::empty({(n + 1) / 2, 1}, opts.dtype(at::kByte)),
          at::empty({(n + blocksize - 1) / blocksize}, opts.dtype(at::kFloat))};
}

// ---- CPU ------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cpu(const at::Tensor& A, int64_t blocksize, bool bnb_cuda,
                                                    int64_t /*recip_mode: CPU arithmetic is IEEE*/) {
  check_blocksize(blocksize, "nf4_quantize");
  const int dt = dtype_code(A, "nf4_quantize");
  at::Tensor x = A.reshape(-1).contiguous();
  const int64_t n = x.numel();
  TORCH_CHECK(n > 0, "nf4_quantize: cannot quantize an empty tensor");
  auto [packed, absmax] = quant_outputs(x, n, blocksize);
  const int64_t nblocks = absmax.numel();
  const void* xp = x.data_ptr();
  uint8_t* pp = packed.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  at::parallel_for(0, nblocks, std::max<int64_t>(1, 16384 / blocksize), [&](int64_t b0, int64_t b1) {
    corda::cpu::nf4_quantize_blocks(xp, dt, n, blocksize, bnb_cuda, b0, b1, pp, ap);
  });
  return {packed, absmax};
}

at::Tensor nf4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize, int64_t numel,
                              at::ScalarType dtype) {
  check_blocksize(blocksize, "nf4_dequantize");
  const int dt = dtype_code(dtype, "nf4_dequantize");
  at::Tensor p = packed.reshape(-1).contiguous();
  at::Tensor am = absmax.to(at::kFloat).contiguous();
  const int64_t nblocks = (numel + blocksize - 1) / blocksize;
  TORCH_CHECK(p.scalar_type() == at::kByte && p.numel() >= (numel + 1) / 2, "nf4_dequantize: need ",
              (numel + 1) / 2, " uint8 bytes for ", numel, " values, got ", p.numel(), " of ", p.scalar_type());
  TORCH_CHECK(am.numel() >= nblocks, "nf4_dequantize: need ", nblocks, " absmax values, got ", am.numel());
  at::Tensor out = at::empty({numel}, p.options().dtype(dtype));
  const uint8_t* pp = p.data_ptr<uint8_t>();
  const float* ap = am.data_ptr<float>();
  void* op = out.data_ptr();
  at::parallel_for(0, nblocks, std::max<int64_t>(1, 16384 / blocksize), [&](int64_t b0, int64_t b1) {
    corda::cpu::nf4_dequantize_blocks(pp, ap, numel, blocksize, b0, b1, op, dt);
  });
  return out;
}

#ifdef CORDA_WITH_CUDA
// ---- CUDA -----------------------------------------------------------------------------------

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cuda(const at::Tensor& A, int64_t blocksize, bool bnb_cuda,
                                                     int64_t recip_mode) {
  check_blocksize(blocksize, "nf4_quantize");
  const int dt = dtype_code(A, "nf4_quantize");
  c10::cuda::CUDAGuard guard(A.device());
  at::Tensor x = A.reshape(-1).contiguous();
  const int64_t n = x.numel();
  TORCH_CHECK(n > 0, "nf4_quantize: cannot quantize an empty tensor");
  auto [packed, absmax] = quant_outputs(x, n, blocksize);
  check_launch(corda::cuda::nf4_quantize(x.data_ptr(), dt, n, (int)blocksize, bnb_cuda, (int)recip_mode,
                                         packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                         c10::cuda::getCurrentCUDAStream()),
               "nf4_quantize");
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_residual_cuda(const at::Tensor& W, const at::Tensor& B,
                                                              const at::Tensor& A, double scaling, int64_t blocksize,
                                                              bool bnb_cuda, int64_t recip_mode) {
  check_blocksize(blocksize, "nf4_quantize_residual");
  const int dt = dtype_code(W, "nf4_quantize_residual");
  TORCH_CHECK(W.dim() == 2 && B.dim() == 2 && A.dim() == 2 && B.size(0) == W.size(0) && A.size(1) == W.size(1) &&
                  B.size(1) == A.size(0),
              "nf4_quantize_residual: need W (M, N), B (M, R), A (R, N); got ", W.sizes(), ", ", B.sizes(), ", ",
              A.sizes());
  c10::cuda::CUDAGuard guard(W.device());
  at::Tensor w = W.contiguous();
  at::Tensor b = B.to(at::kFloat).contiguous();
  at::Tensor a = A.to(at::kFloat).contiguous();
  auto [packed, absmax] = quant_outputs(w, w.numel(), blocksize);
  check_launch(corda::cuda::nf4_quantize_residual(w.data_ptr(), dt, b.data_ptr<float>(), a.data_ptr<float>(),
                                                  w.size(0), w.size(1), a.size(0), (float)scaling, (int)blocksize,
                                                  bnb_cuda, (int)recip_mode, packed.data_ptr<uint8_t>(),
                                                  absmax.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "nf4_quantize_residual");
  return {packed, absmax};
}

at::Tensor nf4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize, int64_t numel,
                               at::ScalarType dtype) {
  check_blocksize(blocksize, "nf4_dequantize");
  const int dt = dtype_code(dtype, "nf4_dequantize");
  c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor p = packed.reshape(-1).contiguous();
  at::Tensor am = absmax.to(at::kFloat).contiguous();
  TORCH_CHECK(p.scalar_type() == at::kByte && p.numel() >= (numel + 1) / 2, "nf4_dequantize: need ",
              (numel + 1) / 2, " uint8 bytes for ", numel, " values, got ", p.numel());
  TORCH_CHECK(am.numel() >= (numel + blocksize - 1) / blocksize, "nf4_dequantize: too few absmax values");
  at::Tensor out = at::empty({numel}, p.options().dtype(dtype));
  check_launch(corda::cuda::nf4_dequantize(p.data_ptr<uint8_t>(), am.data_ptr<float>(), numel, (int)blocksize,
                                           out.data_ptr(), dt, c10::cuda::getCurrentCUDAStream()),
               "nf4_dequantize");
  return out;
}

std::tuple<at::Tensor, at::Tensor> blockwise8_quantize_cuda(const at::Tensor& A, const at::Tensor& code,
                                                            int64_t blocksize, int64_t recip_mode) {
  TORCH_CHECK(blocksize >= 32, "blockwise8_quantize: blocksize must be at least 32, got ", blocksize);
  TORCH_CHECK(code.numel() == 256, "blockwise8_quantize: the dynamic map has 256 entries, got ", code.numel());
  c10::cuda::CUDAGuard guard(A.device());
  at::Tensor x = A.reshape(-1).to(at::kFloat).contiguous();
  at::Tensor c = code.to(x.device(), at::kFloat).contiguous();
  const int64_t n = x.numel();
  at::Tensor out = at::empty({n}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({(n + blocksize - 1) / blocksize}, x.options());
  check_launch(corda::cuda::blockwise8_quantize(x.data_ptr<float>(), n, (int)blocksize, c.data_ptr<float>(),
                                                (int)recip_mode, out.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                                c10::cuda::getCurrentCUDAStream()),
               "blockwise8_quantize");
  return {out, absmax};
}

void covariance_update_cuda(at::Tensor& C, const at::Tensor& x, const std::optional<at::Tensor>& mask,
                            const std::optional<at::Tensor>& seq_scale, const std::optional<at::Tensor>& seq_bucket,
                            bool upper_only, int64_t splits) {
  const int dt = dtype_code(x, "covariance_update");
  TORCH_CHECK(dt != 0, "covariance_update: the CUDA kernel takes bf16 / fp16 tokens (fp32 stays on torch)");
  TORCH_CHECK(x.dim() == 3, "covariance_update: x must be (B, L, n), got ", x.sizes());
  TORCH_CHECK(C.scalar_type() == at::kFloat && C.is_contiguous(), "covariance_update: C must be contiguous float32");
  const int64_t B = x.size(0), L = x.size(1), n = x.size(2);
  const int K = seq_bucket.has_value() ? (int)C.size(0) : 1;
  TORCH_CHECK(C.size(-1) == n && C.size(-2) == n && (seq_bucket.has_value() ? C.dim() == 3 : C.dim() == 2),
              "covariance_update: C ", C.sizes(), " does not fit x ", x.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor m, s, k;
  if (mask.has_value()) m = mask->to(at::kByte).contiguous();
  if (seq_scale.has_value()) s = seq_scale->to(at::kFloat).contiguous();
  if (seq_bucket.has_value()) k = seq_bucket->to(at::kLong).contiguous();
  check_launch(corda::cuda::covariance_update(C.data_ptr<float>(), x.data_ptr(), dt, B, L, n, x.stride(0),
                                              x.stride(1), x.stride(2), m.defined() ? m.data_ptr<uint8_t>() : nullptr,
                                              s.defined() ? s.data_ptr<float>() : nullptr,
                                              k.defined() ? k.data_ptr<int64_t>() : nullptr, K, upper_only,
                                              (int)splits, c10::cuda::getCurrentCUDAStream()),
               "covariance_update");
}

at::Tensor damping_residual_sq_cuda(const at::Tensor& A, const at::Tensor& Binv) {
  TORCH_CHECK(A.dim() == 3 && A.sizes() == Binv.sizes() && A.size(1) == A.size(2),
              "damping_residual_sq: need two (B, n, n) tensors, got ", A.sizes(), " and ", Binv.sizes());
  TORCH_CHECK(A.scalar_type() == at::kFloat && Binv.scalar_type() == at::kFloat,
              "damping_residual_sq: float32 matrices only");
  c10::cuda::CUDAGuard guard(A.device());
  at::Tensor out = at::empty({A.size(0)}, A.options().dtype(at::kDouble));
  check_launch(corda::cuda::damping_residual_sq(A.data_ptr<float>(), Binv.data_ptr<float>(), A.size(0), A.size(1),
                                                A.stride(0), A.stride(1), A.stride(2), Binv.stride(0), Binv.stride(1),
                                                Binv.stride(2), out.data_ptr<double>(),
                                                c10::cuda::getCurrentCUDAStream()),
               "damping_residual_sq");
  return out;
}
#endif

bool built_with_cuda() {
#ifdef CORDA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(corda_kernels_C, m) {
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  m.def("nf4_quantize(Tensor A, int blocksize, bool bnb_cuda, int recip_mode) -> (Tensor, Tensor)");
  m.def("nf4_dequantize(Tensor packed, Tensor absmax, int blocksize, int numel, ScalarType dtype) -> Tensor");
  m.def("blockwise8_quantize(Tensor A, Tensor code, int blocksize, int recip_mode) -> (Tensor, Tensor)");
  m.def(
      "nf4_quantize_residual(Tensor W, Tensor B, Tensor A, float scaling, int blocksize, bool bnb_cuda, "
      "int recip_mode) -> (Tensor, Tensor)");
  m.def(
      "covariance_update(Tensor(a!) C, Tensor x, Tensor? mask, Tensor? seq_scale, Tensor? seq_bucket, "
      "bool upper_only, int splits) -> ()");
  m.def("damping_residual_sq(Tensor A, Tensor Binv) -> Tensor");
}

TORCH_LIBRARY_IMPL(corda_kernels_C, CPU, m) {
  m.impl("nf4_quantize", &nf4_quantize_cpu);
  m.impl("nf4_dequantize", &nf4_dequantize_cpu);
}

#ifdef CORDA_WITH_CUDA
TORCH_LIBRARY_IMPL(corda_kernels_C, CUDA, m) {
  m.impl("nf4_quantize", &nf4_quantize_cuda);
  m.impl("nf4_dequantize", &nf4_dequantize_cuda);
  m.impl("blockwise8_quantize", &blockwise8_quantize_cuda);
  m.impl("nf4_quantize_residual", &nf4_quantize_residual_cuda);
  m.impl("covariance_update", &covariance_update_cuda);
  m.impl("damping_residual_sq", &damping_residual_sq_cuda);
}
#endif
