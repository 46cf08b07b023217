// Spanning-window attention on float32 channels-last maps, for kernels that compute it inside a larger block
// (defined in window_attention.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace emov2_kernels {

// out = sum over the partitions `modes` (0 neighbour, 1 distant) of softmax(Q K^T * scale) V within windows of
// wh x ww pixels, per head, for float32 channels-last contiguous maps qk (B, 2C, H, W), value and out (B, Cv, H, W);
// H and W multiples of the window. Parallel over (image, head); runs inline inside another parallel region.
void window_attention_f32(const at::Tensor& qk, const at::Tensor& value, at::Tensor& out, int64_t wh, int64_t ww,
                          int64_t heads, const std::vector<int64_t>& modes, double scale);

}  // namespace emov2_kernels
