// An inverted-residual block without attention in one pass over the map, for float32 channels-last CPU maps
// (emov2.kernels): [LayerNorm over channels] -> 1x1 expansion + bias + act -> depthwise k x k (stride 1 or 2)
// + bias + SiLU [+ its input] -> 1x1 projection + bias [+ the block input].
//
// The expanded map (C_mid channels: the block's largest tensor, 3.2 MB at 112 x 112 x 64) never goes to memory.
// Each thread takes a run of output rows, in groups of rows of at least 128 pixels, and keeps a band of the
// expanded input rows they read: a group expands the rows the band lacks (one GEMM, then bias and activation in
// cache), runs the depthwise conv over the band into C_mid-channel rows and projects those (one GEMM, then bias
// and residual) straight into the output. Groups of fewer pixels would make MKL pack the weights once per small
// GEMM; a thread's first group expands all the rows it reads, each later one only those below the band.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <vector>

#include "depthwise_tile.h"
#include "gemm_f32.h"

namespace {

using emov2_kernels::apply_epilogue;
using emov2_kernels::depthwise_row;
using emov2_kernels::kGELU;
using emov2_kernels::kNone;
using emov2_kernels::row_gemm;

constexpr int64_t kGroupPixels = 128;  // a row GEMM of fewer pixels spends its time packing the weights

struct Block {
  const float* x;        // (B, H, W, C_in)
  const float* w_exp;    // (C_mid, C_in)
  const float* b_exp;    // (C_mid)
  const float* w_dw;     // (K * K, C_mid) packed
  const float* b_dw;     // (C_mid)
  const float* w_proj;   // (C_out, C_mid)
  const float* b_proj;   // (C_out)
  float* out;            // (B, H_out, W_out, C_out)
  int64_t height, width, c_in, c_mid, c_out, out_h, out_w;
  int64_t group;         // output rows per group: GEMMs of at least kGroupPixels pixels
  int64_t act_exp;
  bool layer_norm, dw_silu, dw_skip, residual;
  float eps;
};

// (x - mean) / sqrt(var + eps) over the channels of each of `pixels` pixels (the LayerNorm's affine is folded
// into the expansion by the caller).
void normalize_pixels(const float* x, float* out, int64_t pixels, int64_t c, float eps) {
  for (int64_t p = 0; p < pixels; ++p) {
    const float* xi = x + p * c;
    float* o = out + p * c;
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < c; ++i) mean += xi[i];
    mean /= static_cast<double>(c);
    for (int64_t i = 0; i < c; ++i) var += (xi[i] - mean) * (xi[i] - mean);
    const float m = static_cast<float>(mean);
    const float inv = 1.f / std::sqrt(static_cast<float>(var / static_cast<double>(c)) + eps);
    for (int64_t i = 0; i < c; ++i) o[i] = (xi[i] - m) * inv;
  }
}

// Output rows [begin, end) (u = b * out_h + y), in groups of up to `group` rows of one image. The band holds the
// expanded input rows [lo, hi) of image `band_b` contiguously; a group keeps the rows it shares with the band
// (moved to the front), expands the rest in one GEMM, runs the depthwise conv row by row into `dw_out` and
// projects the group's rows in one GEMM (consecutive rows of one image are contiguous in the output).
template <int K, int S>
void block_rows(const Block& a, int64_t begin, int64_t end) {
  constexpr int pad = K / 2;
  const int64_t row_floats = a.width * a.c_mid;
  const int64_t capacity = (a.group - 1) * S + K;  // input rows a group reads
  std::vector<float> band(capacity * row_floats), dw_out(a.group * a.out_w * a.c_mid);
  std::vector<float> normed(a.layer_norm ? capacity * a.width * a.c_in : 0);
  int64_t band_b = -1, lo = 0, hi = 0;
  for (int64_t u0 = begin; u0 < end;) {
    const int64_t b = u0 / a.out_h, y0 = u0 % a.out_h;
    const int64_t g = std::min({a.group, end - u0, a.out_h - y0});
    const int64_t need_lo = std::max<int64_t>(0, y0 * S - pad);
    const int64_t need_hi = std::min(a.height, (y0 + g - 1) * S - pad + K);
    if (band_b == b && need_lo >= lo && need_lo < hi) {  // keep the shared rows, moved to the front
      std::memmove(band.data(), band.data() + (need_lo - lo) * row_floats,
                   (hi - need_lo) * row_floats * sizeof(float));
      lo = need_lo;
    } else {
      band_b = b, lo = hi = need_lo;
    }
    if (need_hi > hi) {  // expand rows [hi, need_hi): contiguous in x and in the band
      const int64_t n = (need_hi - hi) * a.width;
      const float* src = a.x + (b * a.height + hi) * a.width * a.c_in;
      if (a.layer_norm) {
        normalize_pixels(src, normed.data(), n, a.c_in, a.eps);
        src = normed.data();
      }
      float* dst = band.data() + (hi - lo) * row_floats;
      row_gemm(src, a.w_exp, dst, n, a.c_in, a.c_mid);
      apply_epilogue(a.act_exp, false, dst, a.b_exp, nullptr, n, a.c_mid);
      hi = need_hi;
    }
    for (int64_t i = 0; i < g; ++i) {
      const int64_t y = y0 + i;
      const float* rows[K];
      for (int ky = 0; ky < K; ++ky) {
        const int64_t yi = y * S - pad + ky;
        rows[ky] = yi >= 0 && yi < a.height ? band.data() + (yi - lo) * row_floats : nullptr;
      }
      // stride 1: output pixel (y, x) adds expanded pixel (y, x), which is rows[pad]
      depthwise_row<K, S>(rows, a.w_dw, a.b_dw, a.c_mid, a.width, a.out_w, a.dw_silu,
                          a.dw_skip ? rows[pad] : nullptr, dw_out.data() + i * a.out_w * a.c_mid);
    }
    float* o = a.out + u0 * a.out_w * a.c_out;
    row_gemm(dw_out.data(), a.w_proj, o, g * a.out_w, a.c_mid, a.c_out);
    apply_epilogue(kNone, a.residual, o, a.b_proj, a.residual ? a.x + u0 * a.width * a.c_in : nullptr,
                   g * a.out_w, a.c_out);
    u0 += g;
  }
}

void check_matrix(const at::Tensor& t, int64_t rows, int64_t cols, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.is_contiguous() && t.device().is_cpu() &&
                  t.scalar_type() == at::kFloat,
              "mobile_block_f32: ", what, " must be a contiguous float32 CPU (", rows, ", ", cols, ") matrix, got ",
              t.sizes(), " ", t.scalar_type());
}

void check_vector(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.is_contiguous() && t.device().is_cpu() &&
                  t.scalar_type() == at::kFloat,
              "mobile_block_f32: ", what, " must be a contiguous float32 CPU vector of ", n, " values, got ",
              t.sizes(), " ", t.scalar_type());
}

at::Tensor mobile_block_f32(const at::Tensor& x_in, const at::Tensor& w_exp, const at::Tensor& b_exp,
                            int64_t act_exp, std::optional<double> layer_norm_eps, const at::Tensor& w_dw,
                            const at::Tensor& b_dw, int64_t kernel_size, int64_t stride, bool dw_silu,
                            bool dw_skip, const at::Tensor& w_proj, const std::optional<at::Tensor>& b_proj_in,
                            bool residual) {
  using Vec = at::vec::Vectorized<float>;
  TORCH_CHECK(x_in.dim() == 4 && x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat,
              "mobile_block_f32: expects a float32 (B, C, H, W) CPU map, got ", x_in.sizes(), " ", x_in.scalar_type());
  TORCH_CHECK(kernel_size == 3 || kernel_size == 5 || kernel_size == 7, "mobile_block_f32: kernel size 3, 5 or 7");
  TORCH_CHECK(stride == 1 || stride == 2, "mobile_block_f32: stride 1 or 2");
  TORCH_CHECK(act_exp >= kNone && act_exp <= kGELU, "mobile_block_f32: act must be 0 (none), 1 (SiLU) or 2 (GELU)");
  const int64_t c_in = x_in.size(1), c_mid = w_exp.size(0), c_out = w_proj.size(0);
  check_matrix(w_exp, c_mid, c_in, "the expansion weight");
  check_vector(b_exp, c_mid, "the expansion bias");
  check_matrix(w_dw, kernel_size * kernel_size, c_mid, "the packed depthwise weight");
  check_vector(b_dw, c_mid, "the depthwise bias");
  check_matrix(w_proj, c_out, c_mid, "the projection weight");
  TORCH_CHECK(c_mid >= Vec::size(), "mobile_block_f32: needs at least ", Vec::size(), " expanded channels, got ",
              c_mid);
  TORCH_CHECK(!dw_skip || stride == 1, "mobile_block_f32: the depthwise skip needs stride 1");
  TORCH_CHECK(!residual || (stride == 1 && c_out == c_in), "mobile_block_f32: the residual needs stride 1 and ",
              "C_out == C_in, got stride ", stride, ", ", c_in, " -> ", c_out);
  const at::Tensor b_proj = b_proj_in.has_value() ? *b_proj_in : at::zeros({c_out}, w_proj.options());
  check_vector(b_proj, c_out, "the projection bias");
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t batch = x.size(0), height = x.size(2), width = x.size(3), pad = kernel_size / 2;
  const int64_t out_h = (height + 2 * pad - kernel_size) / stride + 1;
  const int64_t out_w = (width + 2 * pad - kernel_size) / stride + 1;
  at::Tensor out = at::empty({batch, c_out, out_h, out_w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const Block a{x.const_data_ptr<float>(), w_exp.const_data_ptr<float>(), b_exp.const_data_ptr<float>(),
                w_dw.const_data_ptr<float>(), b_dw.const_data_ptr<float>(), w_proj.const_data_ptr<float>(),
                b_proj.const_data_ptr<float>(), out.mutable_data_ptr<float>(), height, width, c_in, c_mid, c_out,
                out_h, out_w, std::min(out_h, (kGroupPixels + out_w - 1) / out_w), act_exp,
                layer_norm_eps.has_value(), dw_silu, dw_skip, residual,
                static_cast<float>(layer_norm_eps.value_or(0.0))};
  at::parallel_for(0, batch * out_h, 1, [&](int64_t begin, int64_t end) {
#define EMOV2_BLOCK(K, S) else if (kernel_size == K && stride == S) block_rows<K, S>(a, begin, end)
    if (false) {}
    EMOV2_BLOCK(3, 1); EMOV2_BLOCK(5, 1); EMOV2_BLOCK(7, 1);
    EMOV2_BLOCK(3, 2); EMOV2_BLOCK(5, 2); EMOV2_BLOCK(7, 2);
#undef EMOV2_BLOCK
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(emov2_kernels, m) {
  m.def("mobile_block_f32(Tensor x, Tensor w_exp, Tensor b_exp, int act, float? layer_norm_eps, Tensor w_dw, "
        "Tensor b_dw, int kernel_size, int stride, bool dw_silu, bool dw_skip, Tensor w_proj, Tensor? b_proj, "
        "bool residual) -> Tensor");
}

TORCH_LIBRARY_IMPL(emov2_kernels, CPU, m) { m.impl("mobile_block_f32", &mobile_block_f32); }
