// Depthwise k x k convolution (stride 1, zero padding k / 2) + bias, then SiLU and a residual add if asked,
// for bfloat16 channels-last maps on CPUs with AVX512-BF16 (emov2.kernels).
//
// oneDNN's bfloat16 depthwise kernels run at the speed of its float32 ones here: they widen every input and
// multiply in float32. This kernel multiplies bf16 pairs with vdpbf16ps instead: each input row is
// interleaved once into words (x[i], x[i + 1]), so a k-tap row of the filter is (k + 1) / 2 pair products per
// 16 channels, and two output rows are computed together so that each interleaved word loaded serves both.
// Sums, bias, SiLU and the residual add are float32; the output is rounded to bfloat16 once.
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>

#include "bf16_math.h"
#endif

namespace {

#if defined(__AVX512BF16__)
constexpr int64_t kBlock = 16;  // channels per vector: 16 float32 sums, 16 bf16 pairs

inline __m512i widen(const uint16_t* p, __mmask16 m) {  // 16 bf16 -> 16 words (x, 0)
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
}

// One input row (or a padding row when `row` is null) as pair words over the padded columns
// xi = 0 .. width + 2 pad - 1: pairs[xi] = (x[xi], x[xi + 1]) (x = 0 outside the map).
void interleave_row(const uint16_t* row, int64_t width, int64_t pad, int64_t pixel_stride, __mmask16 m,
                    __m512i* pairs) {
  const int64_t columns = width + 2 * pad;
  auto column = [&](int64_t xi) {
    const int64_t x = xi - pad;
    return row != nullptr && x >= 0 && x < width ? widen(row + x * pixel_stride, m) : _mm512_setzero_si512();
  };
  __m512i cur = column(0);
  for (int64_t xi = 0; xi < columns; ++xi) {
    const __m512i next = column(xi + 1);
    pairs[xi] = _mm512_or_si512(cur, _mm512_slli_epi32(next, 16));
    cur = next;
  }
}

// Output rows y .. y + R - 1, columns x0 .. x0 + NX - 1 of one channel block. rows[r] holds input row y - K / 2 + r
// as pairs. Filter row ky is (K + 1) / 2 pair products: taps (0, 1), (2, 3), ... and last (K - 2, K - 1) with
// weights (0, w[K - 1]), so every product reads pixels of the window (no stray 0 * inf from outside it).
template <int K, int R, int NX>
__attribute__((always_inline)) inline void conv_block(const __m512i* const* rows, const __m512bh* w, __m512 bias,
                                                      int64_t x0, bool silu, const uint16_t* residual, uint16_t* out,
                                                      int64_t row_stride, int64_t pixel_stride, __mmask16 m) {
  constexpr int J = (K + 1) / 2;
  __m512 acc[R][NX];
#pragma GCC unroll 32
  for (int o = 0; o < R; ++o) {
#pragma GCC unroll 32
    for (int i = 0; i < NX; ++i) acc[o][i] = bias;
  }
#pragma GCC unroll 32
  for (int r = 0; r < K + R - 1; ++r) {  // each input row feeds the output rows it is a filter row of
#pragma GCC unroll 32
    for (int j = 0; j < J; ++j) {
      const int tap = j < J - 1 ? 2 * j : K - 2;
#pragma GCC unroll 32
      for (int i = 0; i < NX; ++i) {
        const __m512bh v = (__m512bh)rows[r][x0 + i + tap];
#pragma GCC unroll 32
        for (int o = 0; o < R; ++o) {
          const int ky = r - o;
          if (ky >= 0 && ky < K) acc[o][i] = _mm512_dpbf16_ps(acc[o][i], v, w[ky * J + j]);
        }
      }
    }
  }
#pragma GCC unroll 32
  for (int o = 0; o < R; ++o) {
#pragma GCC unroll 32
    for (int i = 0; i < NX; ++i) {
      __m512 y = acc[o][i];
      if (silu) y = silu_for_bf16(y);
      const int64_t at = o * row_stride + (x0 + i) * pixel_stride;
      if (residual != nullptr) {
        y = _mm512_add_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(widen(residual + at, m), 16)));
      }
      _mm256_mask_storeu_epi16(out + at, m, (__m256i)_mm512_cvtneps_pbh(y));
    }
  }
}

// One block of R output rows across the width: blocks of 4 columns (the last one overlapping its neighbour
// where the width is not a multiple of 4), single columns for maps narrower than 4.
template <int K, int R>
inline void conv_rows(const __m512i* const* rows, const __m512bh* w, __m512 bias, int64_t width, bool silu,
                      const uint16_t* residual, uint16_t* out, int64_t row_stride, int64_t pixel_stride, __mmask16 m) {
  if (width < 4) {
    for (int64_t x0 = 0; x0 < width; ++x0) {
      conv_block<K, R, 1>(rows, w, bias, x0, silu, residual, out, row_stride, pixel_stride, m);
    }
    return;
  }
  for (int64_t x0 = 0; x0 < width; x0 += 4) {
    conv_block<K, R, 4>(rows, w, bias, std::min(x0, width - 4), silu, residual, out, row_stride, pixel_stride, m);
  }
}

template <int K>
void depthwise(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias, bool silu,
               const at::Tensor* residual, at::Tensor& out) {
  constexpr int J = (K + 1) / 2, pad = K / 2, slots = K + 1;  // ring of the input rows two output rows read
  const int64_t batch = x.size(0), c = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t blocks = (c + kBlock - 1) / kBlock, columns = width + 2 * pad, row_stride = width * c;
  const int64_t plane = height * row_stride;
  const auto* x_ptr = reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>());
  const auto* r_ptr = residual ? reinterpret_cast<const uint16_t*>(residual->const_data_ptr<at::BFloat16>()) : nullptr;
  auto* o_ptr = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::BFloat16>());
  const auto* w_ptr = reinterpret_cast<const __m512bh*>(packed.const_data_ptr<int32_t>());
  const float* b_ptr = bias.const_data_ptr<float>();
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<__m512i> ring(slots * columns);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / blocks, c0 = (u % blocks) * kBlock;
      const __mmask16 m = c0 + kBlock <= c ? (__mmask16)0xFFFF : (__mmask16)((1u << (c - c0)) - 1);
      const __m512bh* w = w_ptr + (u % blocks) * K * J;
      const __m512 bias_v = _mm512_maskz_loadu_ps(m, b_ptr + c0);
      const uint16_t* image = x_ptr + b * plane + c0;
      auto slot = [&](int64_t input_row) { return ring.data() + ((input_row + pad) % slots) * columns; };
      auto build = [&](int64_t input_row) {
        const uint16_t* row = input_row >= 0 && input_row < height ? image + input_row * row_stride : nullptr;
        interleave_row(row, width, pad, c, m, slot(input_row));
      };
      for (int64_t r = -pad; r < pad; ++r) build(r);
      for (int64_t y = 0; y < height; y += 2) {
        const int R = y + 1 < height ? 2 : 1;
        for (int64_t r = y + pad; r < y + pad + R; ++r) build(r);
        const __m512i* rows[K + 1];
        for (int r = 0; r < K + R - 1; ++r) rows[r] = slot(y - pad + r);
        const int64_t offset = b * plane + y * row_stride + c0;
        const uint16_t* res = r_ptr ? r_ptr + offset : nullptr;
        if (R == 2) {
          conv_rows<K, 2>(rows, w, bias_v, width, silu, res, o_ptr + offset, row_stride, c, m);
        } else {
          conv_rows<K, 1>(rows, w, bias_v, width, silu, res, o_ptr + offset, row_stride, c, m);
        }
      }
    }
  });
}
#endif

bool depthwise_bf16_available() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// weight (C, 1, k, k) -> int32 words (ceil(C / 16), k, (k + 1) / 2, 16): word [cb][ky][j][i] holds the bf16
// pair (w[ky][2j], w[ky][2j + 1]) of channel 16 cb + i, the last pair being (0, w[ky][k - 1]).
at::Tensor pack_depthwise_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              "pack_depthwise_weight: expected a (C, 1, k, k) weight with odd k");
  const int64_t c = weight.size(0), k = weight.size(2), blocks = (c + 15) / 16;
  at::Tensor w = weight.to(at::kBFloat16).reshape({c, k, k});
  // taps 0 .. k - 2 in pairs, then (0, w[k - 1]); channels padded to whole blocks
  w = at::cat({w.narrow(2, 0, k - 1), at::zeros_like(w.narrow(2, 0, 1)), w.narrow(2, k - 1, 1)}, 2);
  w = at::constant_pad_nd(w, {0, 0, 0, 0, 0, 16 * blocks - c});
  return w.reshape({blocks, 16, k, (k + 1) / 2, 2}).permute({0, 2, 3, 1, 4}).contiguous().view(at::kInt)
      .reshape({blocks, k, (k + 1) / 2, 16});
}

at::Tensor depthwise_conv_bf16(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias,
                               int64_t kernel_size, bool silu, const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(depthwise_bf16_available(), "depthwise_conv_bf16: this build has no AVX512-BF16 kernel");
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kBFloat16,
              "depthwise_conv_bf16: expected a bfloat16 (B, C, H, W) map");
  TORCH_CHECK(kernel_size == 3 || kernel_size == 5 || kernel_size == 7,
              "depthwise_conv_bf16: kernel size 3, 5 or 7");
  const int64_t c = x.size(1), blocks = (c + 15) / 16, pairs = (kernel_size + 1) / 2;
  TORCH_CHECK(packed.scalar_type() == at::kInt && packed.numel() == blocks * kernel_size * pairs * 16,
              "depthwise_conv_bf16: weight not packed for ", c, " channels and kernel ", kernel_size);
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == c,
              "depthwise_conv_bf16: expected ", c, " float32 biases");
  const auto fmt = at::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(fmt);
  at::Tensor rc;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == at::kBFloat16,
                "depthwise_conv_bf16: residual differs from the input in shape or dtype");
    rc = residual->contiguous(fmt);
  }
  at::Tensor out = at::empty_like(xc, xc.options().memory_format(fmt));
#if defined(__AVX512BF16__)
  const at::Tensor pc = packed.contiguous(), bc = bias.contiguous();
  const at::Tensor* r = residual.has_value() ? &rc : nullptr;
  if (kernel_size == 3) depthwise<3>(xc, pc, bc, silu, r, out);
  else if (kernel_size == 5) depthwise<5>(xc, pc, bc, silu, r, out);
  else depthwise<7>(xc, pc, bc, silu, r, out);
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(emov2_kernels, m) {
  m.def("depthwise_bf16_available() -> bool", &depthwise_bf16_available);
  m.def("pack_depthwise_weight(Tensor weight) -> Tensor", &pack_depthwise_weight);
  m.def("depthwise_conv_bf16(Tensor x, Tensor packed, Tensor bias, int kernel_size, bool silu, "
        "Tensor? residual) -> Tensor");
}

TORCH_LIBRARY_IMPL(emov2_kernels, CPU, m) { m.impl("depthwise_conv_bf16", &depthwise_conv_bf16); }
