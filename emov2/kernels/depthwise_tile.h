// One output row of a depthwise k x k conv (zero padding k / 2) + bias (+ SiLU, + residual) on float32
// channels-last rows: shared by the depthwise kernel and the fused block kernel. 
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

#include "vec_math.h"

namespace emov2_kernels {

// NX outputs x0 .. x0 + NX - 1 of one output row, channels c0 .. c0 + kLanes - 1. rows[ky] points at channel c0
// of input pixel 0 of the filter row's input row (nullptr: a padding row). INTERIOR: every input column the
// tile reads lies inside the map.
template <int K, int S, int NX, bool INTERIOR>
__attribute__((always_inline)) inline void depthwise_tile(const float* const* rows, const float* w,
                                                          int64_t channels, const at::vec::Vectorized<float>& bias,
                                                          int64_t x0, int64_t width, bool silu_act, const float* res,
                                                          float* out) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int pad = K / 2, span = (NX - 1) * S + K;
  Vec acc[NX];
#pragma GCC unroll 16
  for (int i = 0; i < NX; ++i) acc[i] = bias;
  const int64_t first = x0 * S - pad;
#pragma GCC unroll 8
  for (int ky = 0; ky < K; ++ky) {
    const float* row = rows[ky];
    if (row == nullptr) continue;
    Vec in[span];
#pragma GCC unroll 32
    for (int t = 0; t < span; ++t) {
      const int64_t xi = first + t;
      in[t] = (INTERIOR || (xi >= 0 && xi < width)) ? Vec::loadu(row + xi * channels) : Vec(0.f);
    }
#pragma GCC unroll 8
    for (int kx = 0; kx < K; ++kx) {
      const Vec wv = Vec::loadu(w + (ky * K + kx) * channels);
#pragma GCC unroll 16
      for (int i = 0; i < NX; ++i) acc[i] = at::vec::fmadd(in[i * S + kx], wv, acc[i]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < NX; ++i) {
    Vec y = silu_act ? silu(acc[i]) : acc[i];
    const int64_t at = (x0 + i) * channels;
    if (res != nullptr) y = y + Vec::loadu(res + at);
    y.store(out + at);
  }
}

// The last `rest` (1 .. R) outputs of a row, from x0, as one tile of `rest` (its FMAs form `rest` independent
// chains; as `rest` single outputs, each would be one chain of K * K dependent FMAs).
template <int K, int S, int R>
__attribute__((always_inline)) inline void depthwise_tail(int64_t rest, const float* const* rows, const float* w,
                                                          int64_t channels, const at::vec::Vectorized<float>& bias,
                                                          int64_t x0, int64_t width, bool silu_act, const float* res,
                                                          float* out) {
  if constexpr (R > 0) {
    if (rest == R) {
      depthwise_tile<K, S, R, false>(rows, w, channels, bias, x0, width, silu_act, res, out);
    } else {
      depthwise_tail<K, S, R - 1>(rest, rows, w, channels, bias, x0, width, silu_act, res, out);
    }
  }
}

// One output row of `channels` (>= one vector) channels: rows[ky] is input row y * S - K / 2 + ky (nullptr: a
// padding row), each `width` pixels of `channels` floats; w the (K * K, channels) packed filters; res (or
// nullptr) and out `out_w` pixels. For each vector of channels a tile keeps NX outputs in registers and loads
// each input vector of a filter row once for all of them. A channel count that is no multiple of the vector
// width ends with a vector that overlaps the one before it (those channels are computed twice, to the same
// values).
template <int K, int S, int NX>
void depthwise_row_tiles(const float* const* rows, const float* w, const float* bias, int64_t channels, int64_t width,
                         int64_t out_w, bool silu_act, const float* res, float* out) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t lanes = Vec::size();
  constexpr int pad = K / 2;
  for (int64_t block = 0; block < channels; block += lanes) {
    const int64_t c0 = std::min(block, channels - lanes);
    const float* crow[K];
    for (int ky = 0; ky < K; ++ky) crow[ky] = rows[ky] ? rows[ky] + c0 : nullptr;
    const Vec bv = Vec::loadu(bias + c0);
    const float* r = res ? res + c0 : nullptr;
    float* o = out + c0;
    const float* wc = w + c0;
    int64_t x0 = 0;
    for (; x0 + NX <= out_w; x0 += NX) {
      if (x0 * S >= pad && (x0 + NX - 1) * S - pad + K <= width) {  // the tile reads inside the map
        depthwise_tile<K, S, NX, true>(crow, wc, channels, bv, x0, width, silu_act, r, o);
      } else {
        depthwise_tile<K, S, NX, false>(crow, wc, channels, bv, x0, width, silu_act, r, o);
      }
    }
    if (x0 < out_w) depthwise_tail<K, S, NX - 1>(out_w - x0, crow, wc, channels, bv, x0, width, silu_act, r, o);
  }
}

// Tiles of 4 outputs at stride 1 and 3 at stride 2 (their input vectors fit the registers), the rest of a row
// one shorter tile; a row of at most 7 outputs (EMOv2's last stage) is one tile of 7 (1.8x on a 7 x 7 x 630
// map against a tile of 4 and 3 lone outputs), one of 8 to 14 at stride 1 (the attention stage's 14 x 14 maps)
// tiles of 7: every tile's K * K FMAs make one chain per output, so fewer, wider tiles finish sooner.
template <int K, int S>
void depthwise_row(const float* const* rows, const float* w, const float* bias, int64_t channels, int64_t width,
                   int64_t out_w, bool silu_act, const float* res, float* out) {
  if (out_w <= 7 || (S == 1 && out_w <= 14)) {
    depthwise_row_tiles<K, S, 7>(rows, w, bias, channels, width, out_w, silu_act, res, out);
  } else {
    depthwise_row_tiles<K, S, S == 1 ? 4 : 3>(rows, w, bias, channels, width, out_w, silu_act, res, out);
  }
}

}  // namespace emov2_kernels
