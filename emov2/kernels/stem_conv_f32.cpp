// Dense k x k convolution (stride 1 or 2, zero padding k / 2) + bias (+ SiLU) for float32 maps with few input
// channels, as an image stem's first conv (emov2.kernels).
//
// Through ATen / oneDNN, EMOv2's 3x3 / stride-2 stem conv on an RGB image ran at about 11 GMAC/s on one core
// (Zen 4) and needed the image made channels-last first; its SiLU was another pass. Here each thread takes output
// rows, copies the C_in x k input rows they read (NCHW, as images arrive) into a zero-padded buffer, and keeps a
// tile of output pixels x vectors of output channels in registers (6 x 2, 4 x 3 or 12 x 1): each tap loads the
// tile's weight vectors once and broadcasts one input value per pixel; the bias starts the sums and SiLU is
// applied before the channels-last store.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vec_math.h"

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kMaxInputChannels = 4;

// Outputs x0 .. x0 + NX - 1 (stored: the first n) of one output row, NV vectors of output channels starting at
// the given channel offsets. `in` holds C_in * K zero-padded input rows of `row_len` floats (row (ci, ky) at
// (ci * K + ky) * row_len; column 0 is input column -pad); `w` the (C_in * K * K, C_out) packed filters.
template <int K, int S, int NX, int NV>
__attribute__((always_inline)) inline void stem_tile(const float* in, int64_t row_len, int64_t c_in, const float* w,
                                                     const float* bias, int64_t c_out, const int64_t* c0,
                                                     int64_t x0, int64_t n, bool silu_act, float* out) {
  Vec acc[NX][NV];
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) {
    const Vec b = Vec::loadu(bias + c0[j]);
#pragma GCC unroll 16
    for (int i = 0; i < NX; ++i) acc[i][j] = b;
  }
  for (int64_t ci = 0; ci < c_in; ++ci) {
#pragma GCC unroll 7
    for (int ky = 0; ky < K; ++ky) {
      const float* row = in + (ci * K + ky) * row_len + x0 * S;
      const float* wr = w + ((ci * K + ky) * K) * c_out;
#pragma GCC unroll 7
      for (int kx = 0; kx < K; ++kx) {
        Vec wv[NV];
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) wv[j] = Vec::loadu(wr + kx * c_out + c0[j]);
#pragma GCC unroll 16
        for (int i = 0; i < NX; ++i) {
          const Vec xv(row[i * S + kx]);
#pragma GCC unroll 4
          for (int j = 0; j < NV; ++j) acc[i][j] = at::vec::fmadd(xv, wv[j], acc[i][j]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < NX; ++i) {
    if (i >= n) break;
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      const Vec y = silu_act ? emov2_kernels::silu(acc[i][j]) : acc[i][j];
      y.store(out + (x0 + i) * c_out + c0[j]);
    }
  }
}

// One output row, all output channels: vectors in pairs (6 pixels x 2 vectors), three together where three are
// left (4 x 3: 24 channels with AVX2), a last single vector alone (12 pixels); a channel count that is no
// multiple of the vector width ends with a vector overlapping the one before it.
template <int K, int S>
void stem_row(const float* in, int64_t row_len, int64_t c_in, const float* w, const float* bias, int64_t c_out,
              int64_t out_w, bool silu_act, float* out) {
  const int64_t vectors = (c_out + kLanes - 1) / kLanes;
  auto start = [&](int64_t v) { return std::min(v * kLanes, c_out - kLanes); };
  for (int64_t v = 0; v < vectors;) {
    const int64_t left = vectors - v;
    if (left == 3) {
      const int64_t c0[3] = {start(v), start(v + 1), start(v + 2)};
      for (int64_t x0 = 0; x0 < out_w; x0 += 4) {
        stem_tile<K, S, 4, 3>(in, row_len, c_in, w, bias, c_out, c0, x0, std::min<int64_t>(4, out_w - x0),
                              silu_act, out);
      }
      v += 3;
    } else if (left >= 2) {
      const int64_t c0[2] = {start(v), start(v + 1)};
      for (int64_t x0 = 0; x0 < out_w; x0 += 6) {
        stem_tile<K, S, 6, 2>(in, row_len, c_in, w, bias, c_out, c0, x0, std::min<int64_t>(6, out_w - x0),
                              silu_act, out);
      }
      v += 2;
    } else {
      const int64_t c0[1] = {start(v)};
      for (int64_t x0 = 0; x0 < out_w; x0 += 12) {
        stem_tile<K, S, 12, 1>(in, row_len, c_in, w, bias, c_out, c0, x0, std::min<int64_t>(12, out_w - x0),
                               silu_act, out);
      }
      v += 1;
    }
  }
}

template <int K, int S>
void stem_conv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias, bool silu_act, at::Tensor& out) {
  constexpr int pad = K / 2;
  const int64_t batch = x.size(0), c_in = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t c_out = out.size(1), out_h = out.size(2), out_w = out.size(3);
  // a padded row covers every column a tile of up to 12 outputs reads, the last tile included
  const int64_t row_len = (out_w + 12) * S + K;
  const float* x_ptr = x.const_data_ptr<float>();
  const float* w_ptr = packed.const_data_ptr<float>();
  const float* b_ptr = bias.const_data_ptr<float>();
  float* o_ptr = out.mutable_data_ptr<float>();
  at::parallel_for(0, batch * out_h, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> in(c_in * K * row_len, 0.f);  // columns outside the image stay zero
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / out_h, y = u % out_h;
      for (int64_t ci = 0; ci < c_in; ++ci) {
        for (int ky = 0; ky < K; ++ky) {
          float* dst = in.data() + (ci * K + ky) * row_len + pad;
          const int64_t yi = y * S - pad + ky;
          if (yi < 0 || yi >= height) {
            std::fill(dst, dst + width, 0.f);
          } else {
            std::copy_n(x_ptr + ((b * c_in + ci) * height + yi) * width, width, dst);
          }
        }
      }
      stem_row<K, S>(in.data(), row_len, c_in, w_ptr, b_ptr, c_out, out_w, silu_act,
                     o_ptr + (b * out_h + y) * out_w * c_out);
    }
  });
}

at::Tensor stem_conv_f32(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias, int64_t kernel_size,
                         int64_t stride, bool silu_act) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "stem_conv_f32: expected a float32 CPU (B, C, H, W) map, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(kernel_size == 3 || kernel_size == 5 || kernel_size == 7, "stem_conv_f32: kernel size 3, 5 or 7");
  TORCH_CHECK(stride == 1 || stride == 2, "stem_conv_f32: stride 1 or 2");
  const int64_t c_in = x.size(1), taps = c_in * kernel_size * kernel_size;
  TORCH_CHECK(c_in >= 1 && c_in <= kMaxInputChannels, "stem_conv_f32: 1 to ", kMaxInputChannels,
              " input channels, got ", c_in);
  TORCH_CHECK(packed.dim() == 2 && packed.size(0) == taps && packed.scalar_type() == at::kFloat &&
              packed.is_contiguous(), "stem_conv_f32: expected a contiguous float32 (", taps,
              ", C_out) packed weight, got ", packed.sizes());
  const int64_t c_out = packed.size(1);
  TORCH_CHECK(c_out >= kLanes, "stem_conv_f32: needs at least ", kLanes, " output channels, got ", c_out);
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == c_out && bias.is_contiguous(),
              "stem_conv_f32: expected ", c_out, " float32 biases");
  const at::Tensor xc = x.contiguous();  // NCHW: whole input rows per channel
  const int64_t pad = kernel_size / 2;
  const int64_t out_h = (x.size(2) + 2 * pad - kernel_size) / stride + 1;
  const int64_t out_w = (x.size(3) + 2 * pad - kernel_size) / stride + 1;
  const auto fmt = at::MemoryFormat::ChannelsLast;
  at::Tensor out = at::empty({x.size(0), c_out, out_h, out_w}, x.options().memory_format(fmt));
  if (out.numel() == 0) return out;
#define EMOV2_STEM(K, S) else if (kernel_size == K && stride == S) stem_conv<K, S>(xc, packed, bias, silu_act, out)
  if (false) {}
  EMOV2_STEM(3, 1); EMOV2_STEM(5, 1); EMOV2_STEM(7, 1); EMOV2_STEM(3, 2); EMOV2_STEM(5, 2); EMOV2_STEM(7, 2);
#undef EMOV2_STEM
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(emov2_kernels, m) {
  m.def("stem_conv_f32(Tensor x, Tensor packed, Tensor bias, int kernel_size, int stride, bool silu) -> Tensor");
}

TORCH_LIBRARY_IMPL(emov2_kernels, CPU, m) { m.impl("stem_conv_f32", &stem_conv_f32); }
