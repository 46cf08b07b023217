// Float32 vector math shared by the kernels (ATen's Vectorized<float>, AVX2 or AVX512 by CPU_CAPABILITY).
#pragma once

#include <ATen/cpu/vec/vec.h>

namespace emov2_kernels {

// x * sigmoid(x) = x / (1 + exp(-x)) with ATen's exp_u20: relative error below 4e-7, over twice as fast per
// element as an accurate exp.
inline at::vec::Vectorized<float> silu(const at::vec::Vectorized<float>& v) {
  using Vec = at::vec::Vectorized<float>;
  return v / (Vec(1.f) + (Vec(0.f) - v).exp_u20());
}

}  // namespace emov2_kernels
