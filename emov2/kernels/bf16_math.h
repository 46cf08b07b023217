// Float32 vector math for results that are rounded to bfloat16 (2^-9 relative steps) right after: cheaper
// than ATen's exp (a cubic for 2^f instead of a quintic, scalef instead of exponent arithmetic), accurate to
// about 1e-4 relative. AVX512F only; included by the kernels' AVX512-BF16 paths.
#pragma once

#include <immintrin.h>

// exp(x) with relative error < 1.1e-4 (|x| < 88; saturates to 0 and +inf beyond).
inline __m512 exp_for_bf16(__m512 x) {
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));  // x log2(e) = n + f
  t = _mm512_max_ps(_mm512_min_ps(t, _mm512_set1_ps(128.f)), _mm512_set1_ps(-150.f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);  // [-0.5, 0.5]
  __m512 p = _mm512_fmadd_ps(f, _mm512_set1_ps(0.05592204f), _mm512_set1_ps(0.24264008f));  // 2^f, cubic fit
  p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(0.69312102f));
  p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(0.99992448f));
  return _mm512_scalef_ps(p, n);  // p * 2^n
}

// x * sigmoid(x) = x / (1 + exp(-x)), with a 14-bit reciprocal.
inline __m512 silu_for_bf16(__m512 x) {
  const __m512 e = exp_for_bf16(_mm512_sub_ps(_mm512_setzero_ps(), x));
  return _mm512_mul_ps(x, _mm512_rcp14_ps(_mm512_add_ps(_mm512_set1_ps(1.f), e)));
}
