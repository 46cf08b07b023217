// 1x1 conv (+ bias, + SiLU or GELU, + residual) for float32 channels-last CPU maps (emov2.kernels).
//
// A channels-last 1x1 conv is one GEMM, (pixels, C_in) x (C_in, C_out). At batch 1, ATen's conv runs it
// through its generic path and the activation needs another pass (ATen's GELU: about 2 ns per element on an
// AVX2 core); oneDNN's post-op path costs 60-80 us per call in overhead. Here the pixels are cut into blocks
// of about 64 KiB of output; each block's GEMM (MKL's sgemm, which torch links) is followed by the bias, the
// activation and the residual while the block is still in cache, and blocks are spread over the threads.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "gemm_f32.h"

namespace {

using emov2_kernels::apply_epilogue;
using emov2_kernels::kGELU;
using emov2_kernels::kNone;

at::Tensor pointwise_conv_f32(const at::Tensor& x_in, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias_in, int64_t act,
                              const std::optional<at::Tensor>& residual_in) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat,
              "pointwise_conv_f32: expects a float32 (B, C, H, W) CPU map, got ", x_in.sizes(), " ",
              x_in.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.device().is_cpu() &&
                  weight.scalar_type() == at::kFloat && weight.size(1) == x_in.size(1),
              "pointwise_conv_f32: weight must be a contiguous float32 (C_out, ", x_in.size(1), ") matrix, got ",
              weight.sizes());
  const at::Tensor bias = bias_in.has_value() ? *bias_in : at::zeros({weight.size(0)}, weight.options());
  TORCH_CHECK(bias.dim() == 1 && bias.is_contiguous() && bias.scalar_type() == at::kFloat &&
                  bias.size(0) == weight.size(0),
              "pointwise_conv_f32: bias must be a contiguous float32 vector of ", weight.size(0), " values");
  TORCH_CHECK(act >= kNone && act <= kGELU, "pointwise_conv_f32: act must be 0 (none), 1 (SiLU) or 2 (GELU)");
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t batch = x.size(0), k = x.size(1), h = x.size(2), w = x.size(3), n = weight.size(0);
  at::Tensor out = at::empty({batch, n, h, w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor residual;
  if (residual_in.has_value()) {
    TORCH_CHECK(residual_in->sizes() == out.sizes(), "pointwise_conv_f32: residual ", residual_in->sizes(),
                " does not match the output ", out.sizes());
    residual = residual_in->to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast);
  }
  const int64_t m = batch * h * w;
  if (m == 0) return out;
  const float* xp = x.const_data_ptr<float>();
  const float* wp = weight.const_data_ptr<float>();
  const float* bp = bias.const_data_ptr<float>();
  const float* rp = residual.defined() ? residual.const_data_ptr<float>() : nullptr;
  float* op = out.mutable_data_ptr<float>();
  // blocks of about 64 KiB of output (at least 64 rows): the epilogue reads them back from L2
  const int64_t block = std::max<int64_t>(64, ((16384 / n) + 7) / 8 * 8);
  const int64_t blocks = (m + block - 1) / block;
  const bool blocked = blocks >= at::get_num_threads() && emov2_kernels::blas_gemm(block, k, n);
  if (!blocked) {  // one GEMM (threaded by the BLAS) and then the epilogue
    at::Tensor out_rows = out.permute({0, 2, 3, 1}).view({m, n});  // the NHWC memory as (pixels, C_out)
    at::mm_out(out_rows, x.permute({0, 2, 3, 1}).view({m, k}), weight.t());
  }
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = b * block, rows = std::min(block, m - r0);
      if (blocked) emov2_kernels::row_gemm(xp + r0 * k, wp, op + r0 * n, rows, k, n);
      apply_epilogue(act, rp != nullptr, op + r0 * n, bp, rp ? rp + r0 * n : nullptr, rows, n);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(emov2_kernels, m) {
  m.def("pointwise_conv_f32(Tensor x, Tensor weight, Tensor? bias, int act, Tensor? residual) -> Tensor");
}

TORCH_LIBRARY_IMPL(emov2_kernels, CPU, m) { m.impl("pointwise_conv_f32", &pointwise_conv_f32); }
