// Row-block GEMM and its epilogue (bias, SiLU / GELU, residual), shared by the float32 1x1-conv kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>

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

inline void apply_epilogue(int64_t act, bool residual, float* out, const float* bias, const float* res,
                           int64_t rows, int64_t n) {
  switch (act * 2 + (residual ? 1 : 0)) {
    case 0: return epilogue<kNone, false>(out, bias, res, rows, n);
    case 1: return epilogue<kNone, true>(out, bias, res, rows, n);
    case 2: return epilogue<kSiLU, false>(out, bias, res, rows, n);
    case 3: return epilogue<kSiLU, true>(out, bias, res, rows, n);
    case 4: return epilogue<kGELU, false>(out, bias, res, rows, n);
    default: return epilogue<kGELU, true>(out, bias, res, rows, n);
  }
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

}  // namespace emov2_kernels
