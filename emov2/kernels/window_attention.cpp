// Fused spanning-window attention for CPU inference (emov2.kernels).
//
// Computes what emov2.layers.window_attention.windowed_attention computes for 2D maps, without
// materialising the window partitions: a thread takes an (image, head) and runs both partitions over
// all its windows (the image's maps stay in the core's L2). Each window reads its queries, keys and
// values straight from the channels-last maps into small per-thread buffers, runs
// softmax(Q K^T * scale) V there, and writes (first partition) or adds (second partition) its
// rows into the channels-last output. Sums and the softmax are float32; bfloat16 inputs multiply
// in bf16 pairs (vdpbf16ps) where the compiler targets AVX512-BF16, else they are widened first.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>

#include "bf16_math.h"
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "window_attention.h"

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// A whole score row held in NV vectors (columns >= tokens masked out) -> exp(scale * (row - max)) stored to
// `out`; returns 1 / sum. Saves a pass over the scores when a row fits in registers (49 tokens: 4 vectors).
// FOR_BF16: the row becomes bf16 probabilities, so the cheaper exp_for_bf16 is accurate enough.
template <int NV, bool FOR_BF16 = false>
inline float softmax_numerator(Vec* row, int64_t tokens, float scale, float* out) {
  const int64_t valid = tokens - (NV - 1) * kLanes;
  row[NV - 1] = Vec::set(Vec(-std::numeric_limits<float>::infinity()), row[NV - 1], valid);
  Vec mx = row[0];
  for (int j = 1; j < NV; ++j) mx = at::vec::maximum(mx, row[j]);
  const Vec shift(at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, mx));
  const Vec factor(scale);
  Vec sum(0.f);
  for (int j = 0; j < NV; ++j) {
#if defined(__AVX512BF16__)
    const Vec e = FOR_BF16 ? Vec(exp_for_bf16((row[j] - shift) * factor)) : ((row[j] - shift) * factor).exp_u20();
#else
    const Vec e = ((row[j] - shift) * factor).exp_u20();
#endif
    e.store(out + j * kLanes);
    sum = sum + e;
  }
  return 1.f / at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sum);
}

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {  // short rows: vector moves beat a memmove call
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) Vec::loadu(src + i).store(dst + i);
    if (i < n && n >= kLanes) {  // the tail as one full vector ending at n (partial ones go through memcpy)
      Vec::loadu(src + n - kLanes).store(dst + n - kLanes);
    } else if (i < n) {
      Vec::loadu(src + i, n - i).store(dst + i, n - i);
    }
  } else {
    at::vec::convert(src, dst, n);
  }
}

// dst (float, rows `ld` apart) <- n channels from channel0 of the given pixels of a channels-last map.
template <typename T>
void gather_rows(const T* base, const int64_t* pixel, int64_t tokens, int64_t pixel_stride, int64_t channel0,
                 int64_t n, int64_t ld, float* dst) {
  for (int64_t t = 0; t < tokens; ++t) {
    load_row(base + pixel[t] * pixel_stride + channel0, dst + t * ld, n);
  }
}

// Register blocking of the float32 products: MR rows x NV vectors of accumulators, plus NV B vectors and one
// broadcast. AVX2 has 16 vector registers: 6 x 2 (15 live); AVX512 has 32: 4 x 4.
constexpr int kRowBlock = kLanes == 8 ? 6 : 4;
constexpr int kVecBlock = kLanes == 8 ? 2 : 4;

// acc[m][j] = sum over k < depth of a[m][k] * b[k * ldb + j * kLanes ...]: MR rows of A (given as pointers) times a
// depth x NV-vector panel of B whose rows are ldb apart; each B vector loaded serves all MR rows and each
// broadcast of A all NV vectors.
template <int MR, int NV>
__attribute__((always_inline)) inline void rows_times_panel(const float* const* a, const float* b, int64_t depth,
                                                            int64_t ldb, Vec (&acc)[MR][NV]) {
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[m][j] = Vec(0.f);
  }
  for (int64_t k = 0; k < depth; ++k) {
    const float* row = b + k * ldb;
    Vec bv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) bv[j] = Vec::loadu(row + j * kLanes);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const Vec av(a[m][k]);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[m][j] = at::vec::fmadd(av, bv[j], acc[m][j]);
    }
  }
}

// S = Q K^T for Q (tokens x d) against Kt (d x padded), MR rows by NV vectors of columns at a time. With
// inv_sum (rows of exactly NV vectors), rows are turned into softmax numerators in registers.
template <int MR, int NV>
void scores(const float* q, const float* kt, int64_t tokens, int64_t padded, int64_t d, float* s,
            float scale = 1.f, float* inv_sum = nullptr) {
  for (int64_t i = 0; i < tokens; i += MR) {
    const float* qr[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) qr[m] = q + std::min(i + m, tokens - 1) * d;  // the last row repeats
    for (int64_t j0 = 0; j0 < padded; j0 += NV * kLanes) {
      Vec acc[MR][NV];
      rows_times_panel<MR, NV>(qr, kt + j0, d, padded, acc);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        if (i + m >= tokens) break;
        if (inv_sum != nullptr) {
          inv_sum[i + m] = softmax_numerator<NV>(acc[m], tokens, scale, s + (i + m) * padded);
          continue;
        }
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) acc[m][j].store(s + (i + m) * padded + j0 + j * kLanes);
      }
    }
  }
}

// Rows i .. i + MR - 1 of S = Q K^T, all `padded` columns: panels of kVecBlock vectors, then single vectors.
template <int MR>
inline void score_rows(const float* q, const float* kt, int64_t i, int64_t padded, int64_t d, float* s) {
  const float* qr[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) qr[m] = q + (i + m) * d;
  int64_t j0 = 0;
  for (; j0 + kVecBlock * kLanes <= padded; j0 += kVecBlock * kLanes) {
    Vec acc[MR][kVecBlock];
    rows_times_panel<MR, kVecBlock>(qr, kt + j0, d, padded, acc);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 8
      for (int j = 0; j < kVecBlock; ++j) acc[m][j].store(s + (i + m) * padded + j0 + j * kLanes);
    }
  }
  for (; j0 < padded; j0 += kLanes) {
    Vec acc[MR][1];
    rows_times_panel<MR, 1>(qr, kt + j0, d, padded, acc);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) acc[m][0].store(s + (i + m) * padded + j0);
  }
}

// Row i of S becomes exp(scale * (S - max)) over its first `tokens` columns (0 beyond); inv_sum[i] = 1 / row sum.
void exp_rows(float* s, int64_t tokens, int64_t padded, float scale, float* inv_sum) {
  const int64_t nvec = padded / kLanes;
  for (int64_t i = 0; i < tokens; ++i) {
    float* row = s + i * padded;
    const Vec last = Vec::set(Vec(-std::numeric_limits<float>::infinity()), Vec::loadu(row + (nvec - 1) * kLanes),
                              tokens - (nvec - 1) * kLanes);
    last.store(row + (nvec - 1) * kLanes);
    Vec mx = last;
    for (int64_t j = 0; j + 1 < nvec; ++j) mx = at::vec::maximum(mx, Vec::loadu(row + j * kLanes));
    const Vec shift(at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, mx));
    const Vec factor(scale);
    Vec sum(0.f);
    for (int64_t j = 0; j < nvec; ++j) {
      const Vec e = ((Vec::loadu(row + j * kLanes) - shift) * factor).exp_u20();
      e.store(row + j * kLanes);
      sum = sum + e;
    }
    inv_sum[i] = 1.f / at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sum);
  }
}

// rows[i] (= or +=) y, when accumulating (both partitions of a pixel land in the same row)
inline void put(float* dst, const Vec& y, bool accumulate) { (accumulate ? Vec::loadu(dst) + y : y).store(dst); }

// Rows i .. i + MR - 1 of diag(inv_sum) P V for P (tokens x padded) and V (tokens x dv_pad), put (= or +=) into
// rows[i ..]: panels of kVecBlock vectors of channels, then single vectors.
template <int MR>
inline void weighted_value_rows(const float* p, const float* v, const float* inv_sum, int64_t i, int64_t tokens,
                                int64_t padded, int64_t dv_pad, float* const* rows, bool accumulate) {
  const float* pr[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) pr[m] = p + (i + m) * padded;
  auto emit = [&](auto& acc, int64_t c0, auto nv) {
    constexpr int NV = decltype(nv)::value;
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const Vec f(inv_sum[i + m]);
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) put(rows[i + m] + c0 + c * kLanes, acc[m][c] * f, accumulate);
    }
  };
  int64_t c0 = 0;
  for (; c0 + kVecBlock * kLanes <= dv_pad; c0 += kVecBlock * kLanes) {
    Vec acc[MR][kVecBlock];
    rows_times_panel<MR, kVecBlock>(pr, v + c0, tokens, dv_pad, acc);
    emit(acc, c0, std::integral_constant<int, kVecBlock>());
  }
  for (; c0 < dv_pad; c0 += kLanes) {
    Vec acc[MR][1];
    rows_times_panel<MR, 1>(pr, v + c0, tokens, dv_pad, acc);
    emit(acc, c0, std::integral_constant<int, 1>());
  }
}

void weighted_values_all(const float* p, const float* v, const float* inv_sum, int64_t tokens, int64_t padded,
                         int64_t dv_pad, float* const* rows, bool accumulate) {
  int64_t i = 0;
  for (; i + kRowBlock <= tokens; i += kRowBlock) {
    weighted_value_rows<kRowBlock>(p, v, inv_sum, i, tokens, padded, dv_pad, rows, accumulate);
  }
  for (; i < tokens; ++i) weighted_value_rows<1>(p, v, inv_sum, i, tokens, padded, dv_pad, rows, accumulate);
}

// One head's channels of one image: `plane` float32 rows (dv_pad apart) times `factor` -> the channels-last map.
template <typename T>
void store_image(float* rows, int64_t plane, int64_t dv, int64_t dv_pad, float factor, T* dst, int64_t pixel_stride) {
  const Vec f(factor);
  for (int64_t p = 0; p < plane; ++p) {
    float* src = rows + p * dv_pad;
    if (factor != 1.f) {
      for (int64_t i = 0; i < dv_pad; i += kLanes) (Vec::loadu(src + i) * f).store(src + i);
    }
    T* out = dst + p * pixel_stride;
    if constexpr (std::is_same_v<T, float>) {
      int64_t i = 0;
      for (; i + kLanes <= dv; i += kLanes) Vec::loadu(src + i).store(out + i);
      if (i < dv) Vec::loadu(src + i, dv - i).store(out + i, dv - i);
    } else {
      at::vec::convert(src, out, dv);
    }
  }
}

#if defined(__AVX512BF16__)
// bfloat16 inputs on CPUs with AVX512-BF16: both products use vdpbf16ps (pairs of bf16 products summed
// into float32), so operands are laid out in pairs along the reduced axis ("VNNI" layout).
constexpr int64_t kPairLanes = 16;  // float32 accumulators per __m512

// S (tokens x padded, float32) = Q K^T from Q rows (tokens x d2 pairs) and K pairs kv[p][j] (d2 x padded);
// two rows by NV vectors of columns at a time (compile-time NV keeps the accumulators in registers).
template <int NV>
void scores_bf16(const uint32_t* q, const uint32_t* kv, int64_t tokens, int64_t padded, int64_t d2, int64_t j0,
                 float* s, float scale = 1.f, float* inv_sum = nullptr) {
  for (int64_t i = 0; i < tokens; i += 2) {
    const uint32_t* q1 = q + std::min(i + 1, tokens - 1) * d2;
    __m512 acc0[NV], acc1[NV];
    for (int j = 0; j < NV; ++j) acc0[j] = acc1[j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < d2; ++p) {
      const __m512bh a0 = (__m512bh)_mm512_set1_epi32(q[i * d2 + p]);
      const __m512bh a1 = (__m512bh)_mm512_set1_epi32(q1[p]);
      const uint32_t* row = kv + p * padded + j0;
      for (int j = 0; j < NV; ++j) {
        const __m512bh b = (__m512bh)_mm512_loadu_si512(row + j * kPairLanes);
        acc0[j] = _mm512_dpbf16_ps(acc0[j], a0, b);
        acc1[j] = _mm512_dpbf16_ps(acc1[j], a1, b);
      }
    }
    if (inv_sum != nullptr) {
      Vec r0[NV], r1[NV];
      for (int j = 0; j < NV; ++j) r0[j] = Vec(acc0[j]), r1[j] = Vec(acc1[j]);
      inv_sum[i] = softmax_numerator<NV, true>(r0, tokens, scale, s + i * padded);
      if (i + 1 < tokens) inv_sum[i + 1] = softmax_numerator<NV, true>(r1, tokens, scale, s + (i + 1) * padded);
      continue;
    }
    for (int j = 0; j < NV; ++j) {
      _mm512_storeu_ps(s + i * padded + j0 + j * kPairLanes, acc0[j]);
      if (i + 1 < tokens) _mm512_storeu_ps(s + (i + 1) * padded + j0 + j * kPairLanes, acc1[j]);
    }
  }
}

void scores_bf16_all(const uint32_t* q, const uint32_t* kv, int64_t tokens, int64_t padded, int64_t d2, float* s) {
  int64_t j0 = 0;
  for (; j0 + 4 * kPairLanes <= padded; j0 += 4 * kPairLanes) scores_bf16<4>(q, kv, tokens, padded, d2, j0, s);
  for (; j0 < padded; j0 += kPairLanes) scores_bf16<1>(q, kv, tokens, padded, d2, j0, s);
}

// rows[i] (= or +=) diag(inv_sum) P V from P rows in token pairs (tokens x padded/2) and V pairs vv[q][c]
// (tokens/2 x dv_pad), MR rows by NV vectors at a time.
template <int MR, int NV>
void weighted_values_bf16(const uint32_t* p, const uint32_t* vv, const float* inv_sum, int64_t tokens,
                          int64_t padded, int64_t token_pairs, int64_t dv_pad, int64_t c0, float* const* rows,
                          bool accumulate) {
  const int64_t p2 = padded / 2;
  for (int64_t i = 0; i < tokens; i += MR) {
    const uint32_t* pr[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) pr[m] = p + std::min(i + m, tokens - 1) * p2;
    __m512 acc[MR][NV];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) acc[m][c] = _mm512_setzero_ps();
    }
    for (int64_t q = 0; q < token_pairs; ++q) {
      const uint32_t* row = vv + q * dv_pad + c0;
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) {
        const __m512bh b = (__m512bh)_mm512_loadu_si512(row + c * kPairLanes);
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
          acc[m][c] = _mm512_dpbf16_ps(acc[m][c], (__m512bh)_mm512_set1_epi32(pr[m][q]), b);
        }
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      if (i + m >= tokens) break;
      const Vec scale(inv_sum[i + m]);
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) put(rows[i + m] + c0 + c * kPairLanes, Vec(acc[m][c]) * scale, accumulate);
    }
  }
}

void weighted_values_bf16_all(const uint32_t* p, const uint32_t* vv, const float* inv_sum, int64_t tokens,
                              int64_t padded, int64_t token_pairs, int64_t dv_pad, float* const* rows,
                              bool accumulate) {
  int64_t c0 = 0;
  for (; c0 + 4 * kPairLanes <= dv_pad; c0 += 4 * kPairLanes) {
    weighted_values_bf16<4, 4>(p, vv, inv_sum, tokens, padded, token_pairs, dv_pad, c0, rows, accumulate);
  }
  for (; c0 < dv_pad; c0 += kPairLanes) {
    weighted_values_bf16<4, 1>(p, vv, inv_sum, tokens, padded, token_pairs, dv_pad, c0, rows, accumulate);
  }
}

// vv[q][c] = (V[2q][c], V[2q+1][c]) for the given pixel rows (n channels from channel0; missing rows are 0).
void gather_value_pairs(const uint16_t* base, const int64_t* pixel, int64_t tokens, int64_t pixel_stride,
                        int64_t channel0, int64_t n, int64_t dv_pad, uint32_t* vv) {
  for (int64_t t = 0; t < tokens; t += 2) {
    const uint16_t* r0 = base + pixel[t] * pixel_stride + channel0;
    const uint16_t* r1 = t + 1 < tokens ? base + pixel[t + 1] * pixel_stride + channel0 : nullptr;
    for (int64_t c = 0; c < dv_pad; c += kPairLanes) {
      const __mmask16 mask = c + kPairLanes <= n ? (__mmask16)0xFFFF
                             : c < n ? (__mmask16)((1u << (n - c)) - 1) : (__mmask16)0;
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, r0 + c));
      const __m512i hi = r1 ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, r1 + c)) : _mm512_setzero_si512();
      _mm512_storeu_si512(vv + (t / 2) * dv_pad + c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}
#endif

template <typename T>
void run(const at::Tensor& qk, const at::Tensor& value, at::Tensor& out, int64_t wh, int64_t ww, int64_t heads,
         const std::vector<int64_t>& modes, double scale) {
  const int64_t batch = qk.size(0), c = qk.size(1) / 2, cv = value.size(1);
  const int64_t height = qk.size(2), width = qk.size(3);
  const int64_t gh = height / wh, gw = width / ww, tokens = wh * ww;
  const int64_t d = c / heads, dv = cv / heads, padded = round_up(tokens, kLanes), dv_pad = round_up(dv, kLanes);
  const int64_t units = batch * heads;  // (image, head): both partitions of an image stay in L2
  const T* qk_ptr = qk.const_data_ptr<T>();
  const T* v_ptr = value.const_data_ptr<T>();
  T* out_ptr = out.mutable_data_ptr<T>();
  const int64_t plane = height * width;
  // a map of one window makes both partitions the same one: compute it once, count it twice
  std::vector<int64_t> passes = modes;
  float factor = 1.f;
  if (gh == 1 && gw == 1 && passes.size() > 1) {
    factor = static_cast<float>(passes.size());
    passes.resize(1);
  }
#if defined(__AVX512BF16__)
  constexpr bool pairs = std::is_same_v<T, at::BFloat16>;
#else
  constexpr bool pairs = false;
#endif
  const int64_t d2 = (d + 1) / 2, token_pairs = (tokens + 1) / 2;
  const int64_t d_pad = round_up(d, kLanes);  // K is transposed in kLanes x kLanes blocks
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    // float32 buffers; the bf16-pair path reuses them as 32-bit words
    std::vector<float> buf(tokens * d + d_pad * padded + tokens * padded + tokens * dv_pad + tokens +
                           token_pairs * dv_pad + tokens * padded / 2);
    std::fill(buf.begin(), buf.end(), 0.f);  // padded rows and columns stay zero
    std::vector<int64_t> pixel(tokens);
    std::vector<float> k_rows(padded * d_pad, 0.f);  // rows and columns past tokens and d stay zero
    std::vector<float> image(plane * dv_pad);  // one head of one image, both partitions summed
    std::vector<float*> rows(tokens);          // the window's pixels' rows of `image`
    float* q = buf.data();
    float* kt = q + tokens * d;
    float* s = kt + d_pad * padded;
    float* v = s + tokens * padded;
    float* inv_sum = v + tokens * dv_pad;
    float* v_pairs = inv_sum + tokens;
    float* p_pairs = v_pairs + token_pairs * dv_pad;
    // pixels (b * H * W + y * W + x) of window (ay, ax) of image b under the given partition
    auto window_pixels = [&](int64_t b, int64_t win, bool distant, int64_t* out_pixels) {
      const int64_t ay = win / gw, ax = win % gw;
      for (int64_t ry = 0; ry < wh; ++ry) {
        for (int64_t rx = 0; rx < ww; ++rx) {
          const int64_t y = distant ? ry * gh + ay : ay * wh + ry;
          const int64_t x = distant ? rx * gw + ax : ax * ww + rx;
          out_pixels[ry * ww + rx] = b * plane + y * width + x;
        }
      }
    };
    // softmax(Q K^T) V of head h over the window's pixels, written (or added) into their rows of `image`
    auto attend = [&](int64_t h, bool accumulate) {
      if constexpr (pairs) {
#if defined(__AVX512BF16__)
        // Q rows and K pairs as 32-bit words: (x[2p], x[2p+1]); an odd d gets a zero partner
        auto* qw = reinterpret_cast<uint32_t*>(q);
        auto* kw = reinterpret_cast<uint32_t*>(kt);
        const auto* raw = reinterpret_cast<const uint16_t*>(qk_ptr);
        const int64_t full_pairs = d / 2;
        for (int64_t t = 0; t < tokens; ++t) {
          const uint16_t* qr = raw + pixel[t] * 2 * c + h * d;
          const uint16_t* kr = qr + c;
          for (int64_t p = 0; p < full_pairs; ++p) {  // a pair is one little-endian 32-bit word in memory
            uint32_t qp, kp;
            std::memcpy(&qp, qr + 2 * p, sizeof(qp));
            std::memcpy(&kp, kr + 2 * p, sizeof(kp));
            qw[t * d2 + p] = qp;
            kw[p * padded + t] = kp;
          }
          if (d % 2) {
            qw[t * d2 + full_pairs] = qr[d - 1];
            kw[full_pairs * padded + t] = kr[d - 1];
          }
        }
        auto* vw = reinterpret_cast<uint32_t*>(v_pairs);
        gather_value_pairs(reinterpret_cast<const uint16_t*>(v_ptr), pixel.data(), tokens, cv, h * dv, dv,
                           dv_pad, vw);
        if (padded == 4 * kPairLanes) {
          scores_bf16<4>(qw, kw, tokens, padded, d2, 0, s, static_cast<float>(scale), inv_sum);
        } else {
          scores_bf16_all(qw, kw, tokens, padded, d2, s);
          exp_rows(s, tokens, padded, static_cast<float>(scale), inv_sum);
        }
        auto* pw = reinterpret_cast<at::BFloat16*>(p_pairs);  // P in bf16, rows of `padded`
        at::vec::convert(s, pw, tokens * padded);
        weighted_values_bf16_all(reinterpret_cast<const uint32_t*>(pw), vw, inv_sum, tokens, padded, token_pairs,
                                 dv_pad, rows.data(), accumulate);
#endif
      } else {
        gather_rows(qk_ptr, pixel.data(), tokens, 2 * c, h * d, d, d, q);
        gather_rows(qk_ptr, pixel.data(), tokens, 2 * c, c + h * d, d, d_pad, k_rows.data());
        for (int64_t t = 0; t < padded; t += kLanes) {
          for (int64_t k = 0; k < d_pad; k += kLanes) {
            at::vec::transpose_mxn<float, kLanes, kLanes>(k_rows.data() + t * d_pad + k, d_pad, kt + k * padded + t,
                                                          padded);
          }
        }
        gather_rows(v_ptr, pixel.data(), tokens, cv, h * dv, dv, dv_pad, v);
        if (padded == 4 * kLanes) {
          scores<4, 4>(q, kt, tokens, padded, d, s, static_cast<float>(scale), inv_sum);
        } else {
          int64_t i = 0;
          for (; i + kRowBlock <= tokens; i += kRowBlock) score_rows<kRowBlock>(q, kt, i, padded, d, s);
          for (; i < tokens; ++i) score_rows<1>(q, kt, i, padded, d, s);
          exp_rows(s, tokens, padded, static_cast<float>(scale), inv_sum);
        }
        weighted_values_all(s, v, inv_sum, tokens, padded, dv_pad, rows.data(), accumulate);
      }
    };
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / heads, h = u % heads;
      for (size_t pass = 0; pass < passes.size(); ++pass) {
        for (int64_t win = 0; win < gh * gw; ++win) {
          window_pixels(b, win, passes[pass] == 1, pixel.data());
          for (int64_t t = 0; t < tokens; ++t) rows[t] = image.data() + (pixel[t] - b * plane) * dv_pad;
          attend(h, pass > 0);
        }
      }
      store_image(image.data(), plane, dv, dv_pad, factor, out_ptr + b * plane * cv + h * dv, cv);
    }
  });
}

at::Tensor window_attention(const at::Tensor& qk, const at::Tensor& value, at::IntArrayRef window, int64_t num_heads,
                            at::IntArrayRef modes, double scale) {
  TORCH_CHECK(qk.dim() == 4 && value.dim() == 4, "window_attention: expected (B, C, H, W) maps");
  TORCH_CHECK(window.size() == 2, "window_attention: expected a 2D window");
  TORCH_CHECK(qk.size(0) == value.size(0) && qk.size(2) == value.size(2) && qk.size(3) == value.size(3),
              "window_attention: qk and value maps differ in batch or size");
  TORCH_CHECK(qk.size(1) % (2 * num_heads) == 0 && value.size(1) % num_heads == 0,
              "window_attention: channels do not split into heads");
  TORCH_CHECK(qk.size(2) % window[0] == 0 && qk.size(3) % window[1] == 0,
              "window_attention: map size is not a multiple of the window");
  TORCH_CHECK(qk.scalar_type() == value.scalar_type(), "window_attention: qk and value dtypes differ");
  TORCH_CHECK(!modes.empty(), "window_attention: no partitions");
  const auto fmt = at::MemoryFormat::ChannelsLast;
  const at::Tensor qk_c = qk.contiguous(fmt);
  const at::Tensor v_c = value.contiguous(fmt);
  at::Tensor out = at::empty_like(v_c, v_c.options().memory_format(fmt));
  const std::vector<int64_t> mode_list(modes.begin(), modes.end());
  if (qk.scalar_type() == at::kFloat) {
    run<float>(qk_c, v_c, out, window[0], window[1], num_heads, mode_list, scale);
  } else if (qk.scalar_type() == at::kBFloat16) {
    run<at::BFloat16>(qk_c, v_c, out, window[0], window[1], num_heads, mode_list, scale);
  } else {
    TORCH_CHECK(false, "window_attention: float32 or bfloat16 inputs only, got ", qk.scalar_type());
  }
  return out;
}

}  // namespace

void emov2_kernels::window_attention_f32(const at::Tensor& qk, const at::Tensor& value, at::Tensor& out, int64_t wh,
                                         int64_t ww, int64_t heads, const std::vector<int64_t>& modes, double scale) {
  run<float>(qk, value, out, wh, ww, heads, modes, scale);
}

TORCH_LIBRARY(emov2_kernels, m) {
  m.def("window_attention(Tensor qk, Tensor value, int[] window, int num_heads, int[] modes, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(emov2_kernels, CPU, m) { m.impl("window_attention", &window_attention); }
