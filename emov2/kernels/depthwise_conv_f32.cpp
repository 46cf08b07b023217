// Depthwise k x k convolution (stride 1 or 2, zero padding k / 2) + bias, then SiLU and a residual add if asked,
// for float32 channels-last maps (emov2.kernels).
//
// On EMOv2-1M's depthwise convs this is 1.15-2.0x oneDNN's conv + SiLU + add at batch 1 on one AVX2 core and
// 1.02-1.7x at batch 16 on two (benchmarks/kernels_vs_onednn.py). Threads take output rows; each row runs
// depthwise_row (depthwise_tile.h, shared with the block kernel): for each vector of channels a tile keeps NX
// outputs in registers and loads each input vector of a filter row once for all of them, so a stride-1 5x5 filter
// row costs 8 loads per 20 FMAs.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "depthwise_tile.h"

namespace {

using Vec = at::vec::Vectorized<float>;
using emov2_kernels::depthwise_row;
constexpr int64_t kLanes = Vec::size();

template <int K, int S>
void depthwise(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias, bool silu_act,
               const at::Tensor* residual, at::Tensor& out) {
  constexpr int pad = K / 2;
  const int64_t batch = x.size(0), c = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t out_h = out.size(2), out_w = out.size(3);
  const float* x_ptr = x.const_data_ptr<float>();
  const float* w_ptr = packed.const_data_ptr<float>();
  const float* b_ptr = bias.const_data_ptr<float>();
  const float* r_ptr = residual ? residual->const_data_ptr<float>() : nullptr;
  float* o_ptr = out.mutable_data_ptr<float>();
  at::parallel_for(0, batch * out_h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / out_h, y = u % out_h;
      const float* rows[K];
      for (int ky = 0; ky < K; ++ky) {
        const int64_t yi = y * S - pad + ky;
        rows[ky] = yi >= 0 && yi < height ? x_ptr + ((b * height + yi) * width) * c : nullptr;
      }
      const int64_t offset = ((b * out_h + y) * out_w) * c;
      depthwise_row<K, S>(rows, w_ptr, b_ptr, c, width, out_w, silu_act, r_ptr ? r_ptr + offset : nullptr,
                          o_ptr + offset);
    }
  });
}

// weight (C, 1, k, k) -> float32 (k * k, C): tap-major, so a vector of channels of one tap is contiguous.
at::Tensor pack_depthwise_weight_f32(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.size(2) == weight.size(3),
              "pack_depthwise_weight_f32: expected a (C, 1, k, k) weight");
  const int64_t c = weight.size(0), k = weight.size(2);
  return weight.to(at::kFloat).reshape({c, k * k}).t().contiguous();
}

at::Tensor depthwise_conv_f32(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias,
                              int64_t kernel_size, int64_t stride, bool silu_act,
                              const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "depthwise_conv_f32: expected a float32 CPU (B, C, H, W) map");
  TORCH_CHECK(kernel_size == 3 || kernel_size == 5 || kernel_size == 7, "depthwise_conv_f32: kernel size 3, 5 or 7");
  TORCH_CHECK(stride == 1 || stride == 2, "depthwise_conv_f32: stride 1 or 2");
  const int64_t c = x.size(1);
  TORCH_CHECK(c >= kLanes, "depthwise_conv_f32: needs at least ", kLanes, " channels, got ", c);
  TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.is_contiguous() &&
              packed.sizes() == at::IntArrayRef({kernel_size * kernel_size, c}),
              "depthwise_conv_f32: weight not packed for ", c, " channels and kernel ", kernel_size);
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == c && bias.is_contiguous(),
              "depthwise_conv_f32: expected ", c, " float32 biases");
  const auto fmt = at::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(fmt);
  const int64_t pad = kernel_size / 2;
  const int64_t out_h = (x.size(2) + 2 * pad - kernel_size) / stride + 1;
  const int64_t out_w = (x.size(3) + 2 * pad - kernel_size) / stride + 1;
  at::Tensor out = at::empty({x.size(0), c, out_h, out_w}, x.options().memory_format(fmt));
  at::Tensor rc;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == out.sizes() && residual->scalar_type() == at::kFloat,
                "depthwise_conv_f32: residual differs from the output in shape or dtype");
    rc = residual->contiguous(fmt);
  }
  const at::Tensor* r = residual.has_value() ? &rc : nullptr;
#define EMOV2_DW(K, S) else if (kernel_size == K && stride == S) depthwise<K, S>(xc, packed, bias, silu_act, r, out)
  if (false) {}
  EMOV2_DW(3, 1); EMOV2_DW(5, 1); EMOV2_DW(7, 1); EMOV2_DW(3, 2); EMOV2_DW(5, 2); EMOV2_DW(7, 2);
#undef EMOV2_DW
  return out;
}

int64_t depthwise_f32_lanes() { return kLanes; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(emov2_kernels, m) {
  m.def("depthwise_f32_lanes() -> int", &depthwise_f32_lanes);
  m.def("pack_depthwise_weight_f32(Tensor weight) -> Tensor", &pack_depthwise_weight_f32);
  m.def("depthwise_conv_f32(Tensor x, Tensor packed, Tensor bias, int kernel_size, int stride, bool silu, "
        "Tensor? residual) -> Tensor");
}

TORCH_LIBRARY_IMPL(emov2_kernels, CPU, m) { m.impl("depthwise_conv_f32", &depthwise_conv_f32); }
