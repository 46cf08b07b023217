// The deployed i2RMB as one op, for float32 channels-last CPU maps (emov2.kernels).
//
// mobile_block_f32, a block without attention, in one pass over the map: [LayerNorm over channels] -> 1x1
// expansion + bias + act -> depthwise k x k (stride 1 or 2) + bias + SiLU [+ its input] -> 1x1 projection + bias
// [+ the block input].
//
// The expanded map (C_mid channels: the block's largest tensor, 3.2 MB at 112 x 112 x 64) never goes to memory.
// Each thread takes a run of output rows, in groups of rows of at least 128 pixels, and keeps a band of the
// expanded input rows they read: a group expands the rows the band lacks (one GEMM, bias and activation on its
// accumulators: gemm_epilogue in gemm_f32.h), runs the depthwise conv over the band into C_mid-channel rows and
// projects those (one GEMM, bias and residual on the accumulators) straight into the output. A thread's first
// group expands all the rows it reads, each later one only those below the band. The 1x1 weights come
// input-major, (C_in, C_out): a vector of output channels of one input channel is contiguous.
//
// attention_block_f32, a block with spanning window attention: [LayerNorm] -> qk = 1x1 conv (C -> 2C) and
// v = act(1x1 conv (C -> Cv)) -> window attention (window_attention.cpp) -> depthwise k x k (stride 1) + bias + SiLU
// [+ its input] -> 1x1 projection + bias [+ the block input]. With at least as many images as threads, each thread
// runs whole images, so all of an image's maps (0.75 MB for EMOv2-1M at 14 x 14) stay in its core's caches and no
// step waits for the others; with fewer, each step runs over the batch on all threads in turn.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <vector>

#include "depthwise_tile.h"
#include "gemm_f32.h"
#include "window_attention.h"

namespace {

using emov2_kernels::depthwise_row;
using emov2_kernels::gemm_epilogue;
using emov2_kernels::kGELU;
using emov2_kernels::kNone;

constexpr int64_t kGroupPixels = 128;  // pixels per group of output rows (and per GEMM of the attention block)

struct Block {
  const float* x;        // (B, H, W, C_in)
  const float* w_exp;    // (C_in, C_mid): input-major
  const float* b_exp;    // (C_mid)
  const float* w_dw;     // (K * K, C_mid) packed
  const float* b_dw;     // (C_mid)
  const float* w_proj;   // (C_mid, C_out): input-major
  const float* b_proj;   // (C_out) or nullptr
  float* out;            // (B, H_out, W_out, C_out)
  int64_t height, width, c_in, c_mid, c_out, out_h, out_w;
  int64_t group;         // output rows per group: GEMMs of at least kGroupPixels pixels
  int64_t act_exp;
  bool layer_norm, dw_silu, dw_skip, residual;
  float eps;
};

// (x - mean) / sqrt(var + eps) over the channels of each of `pixels` pixels (the LayerNorm's affine is folded
// into the expansion by the caller). Two passes in float32 vectors: the mean, then the centred squares.
void normalize_pixels(const float* x, float* out, int64_t pixels, int64_t c, float eps) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t lanes = Vec::size();
  const int64_t full = c - c % lanes;
  for (int64_t p = 0; p < pixels; ++p) {
    const float* xi = x + p * c;
    float* o = out + p * c;
    Vec acc(0.f);
    for (int64_t i = 0; i < full; i += lanes) acc = acc + Vec::loadu(xi + i);
    float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
    for (int64_t i = full; i < c; ++i) sum += xi[i];
    const float mean = sum / static_cast<float>(c);
    const Vec m(mean);
    acc = Vec(0.f);
    for (int64_t i = 0; i < full; i += lanes) {
      const Vec d = Vec::loadu(xi + i) - m;
      acc = at::vec::fmadd(d, d, acc);
    }
    float sq = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
    for (int64_t i = full; i < c; ++i) sq += (xi[i] - mean) * (xi[i] - mean);
    const float inv = 1.f / std::sqrt(sq / static_cast<float>(c) + eps);
    const Vec iv(inv);
    for (int64_t i = 0; i < full; i += lanes) ((Vec::loadu(xi + i) - m) * iv).store(o + i);
    for (int64_t i = full; i < c; ++i) o[i] = (xi[i] - mean) * inv;
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
      gemm_epilogue(a.act_exp, src, a.w_exp, a.b_exp, nullptr, dst, n, a.c_in, a.c_mid);
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
    gemm_epilogue(kNone, dw_out.data(), a.w_proj, a.b_proj, a.residual ? a.x + u0 * a.width * a.c_in : nullptr, o,
                  g * a.out_w, a.c_mid, a.c_out);
    u0 += g;
  }
}

void check_matrix(const at::Tensor& t, int64_t rows, int64_t cols, const char* what,
                  const char* op = "mobile_block_f32") {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.is_contiguous() && t.device().is_cpu() &&
                  t.scalar_type() == at::kFloat,
              op, ": ", what, " must be a contiguous float32 CPU (", rows, ", ", cols, ") matrix, got ",
              t.sizes(), " ", t.scalar_type());
}

void check_vector(const at::Tensor& t, int64_t n, const char* what, const char* op = "mobile_block_f32") {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.is_contiguous() && t.device().is_cpu() &&
                  t.scalar_type() == at::kFloat,
              op, ": ", what, " must be a contiguous float32 CPU vector of ", n, " values, got ",
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
  const int64_t c_in = x_in.size(1), c_mid = w_exp.size(1), c_out = w_proj.size(1);
  check_matrix(w_exp, c_in, c_mid, "the expansion weight");
  check_vector(b_exp, c_mid, "the expansion bias");
  check_matrix(w_dw, kernel_size * kernel_size, c_mid, "the packed depthwise weight");
  check_vector(b_dw, c_mid, "the depthwise bias");
  check_matrix(w_proj, c_mid, c_out, "the projection weight");
  TORCH_CHECK(c_mid >= Vec::size(), "mobile_block_f32: needs at least ", Vec::size(), " expanded channels, got ",
              c_mid);
  TORCH_CHECK(!dw_skip || stride == 1, "mobile_block_f32: the depthwise skip needs stride 1");
  TORCH_CHECK(!residual || (stride == 1 && c_out == c_in), "mobile_block_f32: the residual needs stride 1 and ",
              "C_out == C_in, got stride ", stride, ", ", c_in, " -> ", c_out);
  if (b_proj_in.has_value()) check_vector(*b_proj_in, c_out, "the projection bias");
  const float* b_proj = b_proj_in.has_value() ? b_proj_in->const_data_ptr<float>() : nullptr;
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t batch = x.size(0), height = x.size(2), width = x.size(3), pad = kernel_size / 2;
  const int64_t out_h = (height + 2 * pad - kernel_size) / stride + 1;
  const int64_t out_w = (width + 2 * pad - kernel_size) / stride + 1;
  at::Tensor out = at::empty({batch, c_out, out_h, out_w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const Block a{x.const_data_ptr<float>(), w_exp.const_data_ptr<float>(), b_exp.const_data_ptr<float>(),
                w_dw.const_data_ptr<float>(), b_dw.const_data_ptr<float>(), w_proj.const_data_ptr<float>(),
                b_proj, out.mutable_data_ptr<float>(), height, width, c_in, c_mid, c_out,
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


// The attention block's weights and maps; the per-step functions below work on pixel or row ranges of them.
struct AttentionBlock {
  const float* x;       // (B, H, W, C)
  const float* w_qk;    // (C, 2C): input-major
  const float* b_qk;    // (2C)
  const float* w_v;     // (C, Cv)
  const float* b_v;     // (Cv)
  const float* w_dw;    // (K * K, Cv) packed
  const float* b_dw;    // (Cv)
  const float* w_proj;  // (Cv, C_out)
  const float* b_proj;  // (C_out) or nullptr
  float* qk;            // (B, H, W, 2C)
  float* v;             // (B, H, W, Cv)
  float* attended;      // (B, H, W, Cv)
  float* local;         // (B, H, W, Cv): after the depthwise conv
  float* out;           // (B, H, W, C_out)
  int64_t height, width, c, cv, c_out, act_v;
  bool layer_norm, dw_silu, dw_skip, residual;
  float eps;
};

// qk and v of pixels [p0, p1) (flat over the batch): [LayerNorm into `normed`], two GEMMs with bias and act.
void project_qk_v(const AttentionBlock& a, int64_t p0, int64_t p1, std::vector<float>& normed) {
  const int64_t n = p1 - p0;
  const float* src = a.x + p0 * a.c;
  if (a.layer_norm) {
    normed.resize(n * a.c);
    normalize_pixels(src, normed.data(), n, a.c, a.eps);
    src = normed.data();
  }
  float* qk = a.qk + p0 * 2 * a.c;
  float* v = a.v + p0 * a.cv;
  gemm_epilogue(kNone, src, a.w_qk, a.b_qk, nullptr, qk, n, a.c, 2 * a.c);
  gemm_epilogue(a.act_v, src, a.w_v, a.b_v, nullptr, v, n, a.c, a.cv);
}

// Depthwise conv of rows [r0, r1) (u = b * H + y) of the attended map into `local`.
template <int K>
void local_rows(const AttentionBlock& a, int64_t r0, int64_t r1) {
  constexpr int pad = K / 2;
  const int64_t row_floats = a.width * a.cv;
  for (int64_t u = r0; u < r1; ++u) {
    const int64_t b = u / a.height, y = u % a.height;
    const float* rows[K];
    for (int ky = 0; ky < K; ++ky) {
      const int64_t yi = y - pad + ky;
      rows[ky] = yi >= 0 && yi < a.height ? a.attended + (b * a.height + yi) * row_floats : nullptr;
    }
    depthwise_row<K, 1>(rows, a.w_dw, a.b_dw, a.cv, a.width, a.width, a.dw_silu, a.dw_skip ? rows[pad] : nullptr,
                        a.local + u * row_floats);
  }
}

void local_rows_k(const AttentionBlock& a, int64_t kernel_size, int64_t r0, int64_t r1) {
  if (kernel_size == 3) return local_rows<3>(a, r0, r1);
  if (kernel_size == 5) return local_rows<5>(a, r0, r1);
  local_rows<7>(a, r0, r1);
}

// Projection of pixels [p0, p1) into the output: one GEMM with bias and residual.
void project_out(const AttentionBlock& a, int64_t p0, int64_t p1) {
  float* o = a.out + p0 * a.c_out;
  gemm_epilogue(kNone, a.local + p0 * a.cv, a.w_proj, a.b_proj, a.residual ? a.x + p0 * a.c : nullptr, o, p1 - p0,
                a.cv, a.c_out);
}

at::Tensor attention_block_f32(const at::Tensor& x_in, const at::Tensor& w_qk, const at::Tensor& b_qk,
                               const at::Tensor& w_v, const at::Tensor& b_v, int64_t act_v,
                               std::optional<double> layer_norm_eps, at::IntArrayRef window, int64_t num_heads,
                               at::IntArrayRef modes, double scale, const at::Tensor& w_dw, const at::Tensor& b_dw,
                               int64_t kernel_size, bool dw_silu, bool dw_skip, const at::Tensor& w_proj,
                               const std::optional<at::Tensor>& b_proj_in, bool residual) {
  using Vec = at::vec::Vectorized<float>;
  constexpr const char* kOp = "attention_block_f32";
  TORCH_CHECK(x_in.dim() == 4 && x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat,
              "attention_block_f32: expects a float32 (B, C, H, W) CPU map, got ", x_in.sizes(), " ",
              x_in.scalar_type());
  TORCH_CHECK(kernel_size == 3 || kernel_size == 5 || kernel_size == 7, "attention_block_f32: kernel size 3, 5 or 7");
  TORCH_CHECK(act_v >= kNone && act_v <= kGELU, "attention_block_f32: act must be 0 (none), 1 (SiLU) or 2 (GELU)");
  TORCH_CHECK(window.size() == 2 && window[0] > 0 && window[1] > 0, "attention_block_f32: expected a 2D window");
  TORCH_CHECK(!modes.empty(), "attention_block_f32: no partitions");
  const int64_t c = x_in.size(1), cv = w_v.size(1), c_out = w_proj.size(1);
  TORCH_CHECK(num_heads > 0 && c % num_heads == 0 && cv % num_heads == 0,
              "attention_block_f32: ", c, " query and ", cv, " value channels do not split into ", num_heads, " heads");
  TORCH_CHECK(x_in.size(2) % window[0] == 0 && x_in.size(3) % window[1] == 0, "attention_block_f32: the map ",
              x_in.sizes().slice(2), " is not a multiple of the window ", window);
  check_matrix(w_qk, c, 2 * c, "the query/key weight", kOp);
  check_vector(b_qk, 2 * c, "the query/key bias", kOp);
  check_matrix(w_v, c, cv, "the value weight", kOp);
  check_vector(b_v, cv, "the value bias", kOp);
  check_matrix(w_dw, kernel_size * kernel_size, cv, "the packed depthwise weight", kOp);
  check_vector(b_dw, cv, "the depthwise bias", kOp);
  check_matrix(w_proj, cv, c_out, "the projection weight", kOp);
  TORCH_CHECK(cv >= Vec::size(), "attention_block_f32: needs at least ", Vec::size(), " value channels, got ", cv);
  TORCH_CHECK(!residual || c_out == c, "attention_block_f32: the residual needs C_out == C_in, got ", c, " -> ",
              c_out);
  if (b_proj_in.has_value()) check_vector(*b_proj_in, c_out, "the projection bias", kOp);
  const float* b_proj = b_proj_in.has_value() ? b_proj_in->const_data_ptr<float>() : nullptr;
  const auto fmt = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(fmt);
  const int64_t batch = x.size(0), height = x.size(2), width = x.size(3), plane = height * width;
  at::Tensor out = at::empty({batch, c_out, height, width}, x.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const std::vector<int64_t> mode_list(modes.begin(), modes.end());
  const auto opts = x.options();
  // a channels-last (n, ch, H, W) tensor over a buffer
  auto map = [&](float* p, int64_t n, int64_t ch) {
    return at::from_blob(p, {n, ch, height, width}, {plane * ch, 1, width * ch, ch}, opts);
  };
  AttentionBlock a{x.const_data_ptr<float>(), w_qk.const_data_ptr<float>(), b_qk.const_data_ptr<float>(),
                   w_v.const_data_ptr<float>(), b_v.const_data_ptr<float>(), w_dw.const_data_ptr<float>(),
                   b_dw.const_data_ptr<float>(), w_proj.const_data_ptr<float>(), b_proj,
                   nullptr, nullptr, nullptr, nullptr, out.mutable_data_ptr<float>(), height, width, c, cv, c_out,
                   act_v, layer_norm_eps.has_value(), dw_silu, dw_skip, residual,
                   static_cast<float>(layer_norm_eps.value_or(0.0))};
  if (batch >= at::get_num_threads()) {  // whole images per thread, in per-thread buffers
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> normed, qk(plane * 2 * c), v(plane * cv), attended(plane * cv), local(plane * cv);
      at::Tensor qk_map = map(qk.data(), 1, 2 * c), v_map = map(v.data(), 1, cv);
      at::Tensor attended_map = map(attended.data(), 1, cv);
      for (int64_t b = begin; b < end; ++b) {
        AttentionBlock image = a;  // this image's input and output, the thread's buffers
        image.x = a.x + b * plane * c, image.out = a.out + b * plane * c_out;
        image.qk = qk.data(), image.v = v.data(), image.attended = attended.data(), image.local = local.data();
        project_qk_v(image, 0, plane, normed);
        emov2_kernels::window_attention_f32(qk_map, v_map, attended_map, window[0], window[1], num_heads, mode_list,
                                            scale);
        local_rows_k(image, kernel_size, 0, height);
        project_out(image, 0, plane);
      }
    });
    return out;
  }
  // fewer images than threads: each step over the batch, split across the threads
  at::Tensor qk = at::empty({batch * plane * 2 * c}, opts), v = at::empty({batch * plane * cv}, opts);
  at::Tensor attended = at::empty({batch * plane * cv}, opts), local = at::empty({batch * plane * cv}, opts);
  a.qk = qk.mutable_data_ptr<float>(), a.v = v.mutable_data_ptr<float>();
  a.attended = attended.mutable_data_ptr<float>(), a.local = local.mutable_data_ptr<float>();
  const int64_t pixels = batch * plane, grain = std::max<int64_t>(kGroupPixels, width);
  at::parallel_for(0, pixels, grain, [&](int64_t p0, int64_t p1) {
    std::vector<float> normed;
    project_qk_v(a, p0, p1, normed);
  });
  at::Tensor attended_map = map(a.attended, batch, cv);
  emov2_kernels::window_attention_f32(map(a.qk, batch, 2 * c), map(a.v, batch, cv), attended_map, window[0],
                                      window[1], num_heads, mode_list, scale);
  at::parallel_for(0, batch * height, 1, [&](int64_t r0, int64_t r1) { local_rows_k(a, kernel_size, r0, r1); });
  at::parallel_for(0, pixels, grain, [&](int64_t p0, int64_t p1) { project_out(a, p0, p1); });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(emov2_kernels, m) {
  m.def("mobile_block_f32(Tensor x, Tensor w_exp, Tensor b_exp, int act, float? layer_norm_eps, Tensor w_dw, "
        "Tensor b_dw, int kernel_size, int stride, bool dw_silu, bool dw_skip, Tensor w_proj, Tensor? b_proj, "
        "bool residual) -> Tensor");
  m.def("attention_block_f32(Tensor x, Tensor w_qk, Tensor b_qk, Tensor w_v, Tensor b_v, int act, "
        "float? layer_norm_eps, int[] window, int num_heads, int[] modes, float scale, Tensor w_dw, Tensor b_dw, "
        "int kernel_size, bool dw_silu, bool dw_skip, Tensor w_proj, Tensor? b_proj, bool residual) -> Tensor");
}

TORCH_LIBRARY_IMPL(emov2_kernels, CPU, m) {
  m.impl("mobile_block_f32", &mobile_block_f32);
  m.impl("attention_block_f32", &attention_block_f32);
}
