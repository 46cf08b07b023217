// Row-block GEMMs with their epilogue (bias, SiLU / GELU, residual), shared by the float32 1x1-conv kernels: MKL's
// sgemm then a pass over the block (row_gemm + apply_epilogue), or register tiles with the epilogue on the
// accumulators (gemm_epilogue).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "vec_math.h"

// Fortran BLAS sgemm: resolved from libtorch_cpu where torch links MKL (or another BLAS that exports it);
// null otherwise, and at::mm does the product.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace emov2_kernels {

enum Activation : int64_t { kNone = 0, kSiLU = 1, kGELU = 2 };

// out[r, :] = act(out[r, :] + bias) + residual[r, :] for rows [0, rows) of a (rows, n) block.
template <int64_t ACT, bool RESIDUAL>
void epilogue(float* out, const float* bias, const float* residual, int64_t rows, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out + r * n;
    const float* res = RESIDUAL ? residual + r * n : nullptr;
    for (int64_t c = 0; c < n; c += Vec::size()) {  // a last partial vector: masked loads and store
      const int64_t count = std::min<int64_t>(Vec::size(), n - c);
      Vec y = Vec::loadu(o + c, count) + Vec::loadu(bias + c, count);
      if constexpr (ACT == kSiLU) y = silu(y);
      if constexpr (ACT == kGELU) y = gelu(y);
      if constexpr (RESIDUAL) y = y + Vec::loadu(res + c, count);
      y.store(o + c, count);
    }
  }
}

// f(std::integral_constant<int64_t, ACT>, std::bool_constant<RESIDUAL>) for the runtime activation code and
// residual flag: one instantiation per epilogue, chosen once per call.
template <typename F>
inline void dispatch_epilogue(int64_t act, bool residual, F&& f) {
  using None = std::integral_constant<int64_t, kNone>;
  using SiLU = std::integral_constant<int64_t, kSiLU>;
  using GELU = std::integral_constant<int64_t, kGELU>;
  switch (act * 2 + (residual ? 1 : 0)) {
    case 0: return f(None{}, std::false_type{});
    case 1: return f(None{}, std::true_type{});
    case 2: return f(SiLU{}, std::false_type{});
    case 3: return f(SiLU{}, std::true_type{});
    case 4: return f(GELU{}, std::false_type{});
    default: return f(GELU{}, std::true_type{});
  }
}

inline void apply_epilogue(int64_t act, bool residual, float* out, const float* bias, const float* res,
                           int64_t rows, int64_t n) {
  dispatch_epilogue(act, residual, [&](auto a, auto r) {
    epilogue<decltype(a)::value, decltype(r)::value>(out, bias, res, rows, n);
  });
}

// Whether row_gemm calls the BLAS directly (sgemm_ linked, sizes within its int arguments).
inline bool blas_gemm(int64_t rows, int64_t k, int64_t n) {
  return sgemm_ != nullptr && std::max({rows, k, n}) <= std::numeric_limits<int>::max();
}

// (rows, k) x (k, n)^T for a row-major (n, k) weight, into a row-major (rows, n) block. In column-major BLAS
// terms: C^T (n x rows) = W^T' (n x k) * X^T (k x rows). Without sgemm_, at::mm over the same memory.
inline void row_gemm(const float* x, const float* weight, float* out, int64_t rows, int64_t k, int64_t n) {
  if (blas_gemm(rows, k, n)) {
    const int m_ = static_cast<int>(n), n_ = static_cast<int>(rows), k_ = static_cast<int>(k);
    const float one = 1.f, zero = 0.f;
    sgemm_("T", "N", &m_, &n_, &k_, &one, weight, &k_, x, &k_, &zero, out, &m_);
    return;
  }
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor o = at::from_blob(out, {rows, n}, opts);
  at::mm_out(o, at::from_blob(const_cast<float*>(x), {rows, k}, opts),
             at::from_blob(const_cast<float*>(weight), {n, k}, opts).t());
}


// Lanes [0, count) of a vector (0 < count <= lanes) for masked loads and stores that touch no memory beyond them.
struct Lanes {
  int64_t count;
#if defined(CPU_CAPABILITY_AVX512)
  __mmask16 mask;
#elif defined(CPU_CAPABILITY_AVX2)
  __m256i mask;
#endif
};

inline Lanes first_lanes(int64_t count) {
#if defined(CPU_CAPABILITY_AVX512)
  return {count, static_cast<__mmask16>((1u << count) - 1u)};
#elif defined(CPU_CAPABILITY_AVX2)
  return {count, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)),
                                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))};
#else
  return {count};
#endif
}

inline at::vec::Vectorized<float> load_lanes(const float* p, const Lanes& lanes) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_maskz_loadu_ps(lanes.mask, p);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_maskload_ps(p, lanes.mask);
#else
  return at::vec::Vectorized<float>::loadu(p, lanes.count);
#endif
}

inline void store_lanes(float* p, const at::vec::Vectorized<float>& v, const Lanes& lanes) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_mask_storeu_ps(p, lanes.mask, v);
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_maskstore_ps(p, lanes.mask, v);
#else
  v.store(p, lanes.count);
#endif
}

// MR rows x NV vectors of out = act(x . wt + bias) (+ res): x's rows are k apart; wt is the (k, n) input-major
// weight; bias (nullptr: none), res and out start at the tile's first column; the last vector has `last` lanes
// when MASKED. Each weight vector loaded serves MR rows and each broadcast input NV vectors; bias, activation and
// residual are applied in registers before the one store.
template <int MR, int NV, int64_t ACT, bool RESIDUAL, bool MASKED>
__attribute__((always_inline)) inline void gemm_tile(const float* x, int64_t k, const float* wt, int64_t n,
                                                     const float* bias, const float* res, float* out,
                                                     const Lanes& last) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t L = Vec::size();
  auto load = [&](const float* p, int j) { return MASKED && j == NV - 1 ? load_lanes(p, last) : Vec::loadu(p); };
  Vec acc[MR][NV];
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) {
    const Vec b = bias != nullptr ? load(bias + j * L, j) : Vec(0.f);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) acc[m][j] = b;
  }
  for (int64_t kk = 0; kk < k; ++kk) {
    Vec w[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) w[j] = load(wt + kk * n + j * L, j);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const Vec a(x[m * k + kk]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[m][j] = at::vec::fmadd(a, w[j], acc[m][j]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      Vec y = acc[m][j];
      if constexpr (ACT == kSiLU) y = silu(y);
      if constexpr (ACT == kGELU) y = gelu(y);
      if constexpr (RESIDUAL) y = y + load(res + m * n + j * L, j);
      if (MASKED && j == NV - 1) {
        store_lanes(out + m * n + j * L, y, last);
      } else {
        y.store(out + m * n + j * L);
      }
    }
  }
}

// One column panel (NV vectors from column j0) for all rows: tiles of 6 rows (AVX2's 16 registers: 12
// accumulators, 2 weight vectors, 1 broadcast), then one tile of the remaining 1-5.
template <int NV, int64_t ACT, bool RESIDUAL, bool MASKED>
void gemm_panel(const float* x, const float* wt, const float* bias, const float* res, float* out, int64_t rows,
                int64_t k, int64_t n, int64_t j0, const Lanes& last) {
  constexpr int MR = 6;
  const float* r = RESIDUAL ? res + j0 : nullptr;
  const float* b = bias != nullptr ? bias + j0 : nullptr;
  int64_t i = 0;
  for (; i + MR <= rows; i += MR) {
    gemm_tile<MR, NV, ACT, RESIDUAL, MASKED>(x + i * k, k, wt + j0, n, b, r ? r + i * n : nullptr, out + i * n + j0,
                                             last);
  }
  const int64_t rest = rows - i;
  const float* xi = x + i * k;
  const float* ri = r ? r + i * n : nullptr;
  float* oi = out + i * n + j0;
  switch (rest) {
    case 1: return gemm_tile<1, NV, ACT, RESIDUAL, MASKED>(xi, k, wt + j0, n, b, ri, oi, last);
    case 2: return gemm_tile<2, NV, ACT, RESIDUAL, MASKED>(xi, k, wt + j0, n, b, ri, oi, last);
    case 3: return gemm_tile<3, NV, ACT, RESIDUAL, MASKED>(xi, k, wt + j0, n, b, ri, oi, last);
    case 4: return gemm_tile<4, NV, ACT, RESIDUAL, MASKED>(xi, k, wt + j0, n, b, ri, oi, last);
    case 5: return gemm_tile<5, NV, ACT, RESIDUAL, MASKED>(xi, k, wt + j0, n, b, ri, oi, last);
    default: return;
  }
}

template <int64_t ACT, bool RESIDUAL>
void gemm_bias_act(const float* x, const float* wt, const float* bias, const float* res, float* out, int64_t rows,
                   int64_t k, int64_t n) {
  constexpr int64_t L = at::vec::Vectorized<float>::size();
  const Lanes full = first_lanes(L);
  int64_t j0 = 0;
  for (; j0 + 2 * L <= n; j0 += 2 * L) gemm_panel<2, ACT, RESIDUAL, false>(x, wt, bias, res, out, rows, k, n, j0, full);
  const int64_t rest = n - j0;
  if (rest > L) {
    gemm_panel<2, ACT, RESIDUAL, true>(x, wt, bias, res, out, rows, k, n, j0, first_lanes(rest - L));
  } else if (rest == L) {
    gemm_panel<1, ACT, RESIDUAL, false>(x, wt, bias, res, out, rows, k, n, j0, full);
  } else if (rest > 0) {
    gemm_panel<1, ACT, RESIDUAL, true>(x, wt, bias, res, out, rows, k, n, j0, first_lanes(rest));
  }
}

// out (rows, n) = act(x (rows, k) . wt + bias) (+ res (rows, n)) for a row-major x and the (k, n) input-major
// weight wt (the transposed (n, k) conv weight); bias and res may be nullptr. One column panel of 2 vectors at a
// time (its k x 2 vectors of weights stay in L1 while the rows stream). Against MKL's sgemm plus a separate
// epilogue pass on one AVX2 core: 1.2-1.7x on EMOv2-1M's block shapes (k 16-240), 0.92-1.26x on larger ones (k up
// to 1152): no packing, and the epilogue runs on the accumulators.
inline void gemm_epilogue(int64_t act, const float* x, const float* wt, const float* bias, const float* res,
                          float* out, int64_t rows, int64_t k, int64_t n) {
  dispatch_epilogue(act, res != nullptr, [&](auto a, auto r) {
    gemm_bias_act<decltype(a)::value, decltype(r)::value>(x, wt, bias, res, out, rows, k, n);
  });
}

}  // namespace emov2_kernels
