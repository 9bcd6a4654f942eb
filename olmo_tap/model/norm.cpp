// RMSNorm of many rows in one call: y = (x * (1 / sqrt(mean(x^2) + eps))) * w, in fp32.
//
// Built at first use by olmo_tap/model/native_norm.py (olmo_tap.native) with -O3 -march=native. Why: torch's CPU
// rms_norm is a composite of about eight small ops (square, mean, add, rsqrt, two products, casts) whose dispatch
// costs ~27 us for one row of 576 values on a 2-core Xeon, and a decode step of a 30-layer model runs 61 norms.
// This op costs ~6 us a call, nearly all of it torch's dispatcher.
//
// The arithmetic, the same bits on every CPU path: the sum of squares in 16 lanes (element k into lane k % 16, one
// fused multiply-add chain per lane, std::fma: an instruction where the CPU has FMA, libm's exact routine where
// not), the lanes combined in a fixed tree; then the mean, eps, a square root and a division, each rounded once
// (IEEE), and the two products in torch's order (x times the inverse, then the weight). The compiler may put the
// 16 lanes in one AVX-512 vector, two AVX2 ones or none: each lane's chain is the same. A row's result depends
// on that row alone, never on the others in the call nor on the thread count.
//
// Layouts: x (..., dim) contiguous; weight (W, dim) contiguous, W dividing the rows: consecutive runs of rows / W
// rows share a weight row (W = 1: one weight; W = towers: a tower's tokens; W = rows: a weight per row).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#ifndef OLMO_TAP_OPS
#define OLMO_TAP_OPS olmo_tap
#endif

namespace {

constexpr int kLanes = 16;
constexpr int64_t kMinTaskWork = 1 << 14;  // values per parallel task: a few rows are not worth a thread

inline float inverse_rms(const float* x, int64_t dim, float eps) {
  float acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= dim; k += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] = std::fma(x[k + j], x[k + j], acc[j]);
  }
  for (int j = 0; k + j < dim; ++j) acc[j] = std::fma(x[k + j], x[k + j], acc[j]);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
  }
  return 1.0f / std::sqrt(acc[0] / static_cast<float>(dim) + eps);
}

at::Tensor rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous fp32 CPU tensor");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.device().is_cpu(),
              "weight must be a contiguous fp32 CPU tensor");
  const int64_t dim = x.size(-1);
  TORCH_CHECK(dim > 0 && weight.dim() >= 1 && weight.size(-1) == dim, "weight rows must have x's last dimension");
  const int64_t rows = x.numel() / dim, weight_rows = weight.numel() / dim;
  TORCH_CHECK(weight_rows >= 1 && rows % weight_rows == 0, "x's rows must split evenly over the weight's rows");
  const int64_t per_weight = rows / weight_rows;
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, std::max<int64_t>(1, kMinTaskWork / dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * dim;
      const float* w = wp + (r / per_weight) * dim;
      float* yr = yp + r * dim;
      const float inv = inverse_rms(xr, dim, e);
      for (int64_t i = 0; i < dim; ++i) yr[i] = (xr[i] * inv) * w[i];
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(OLMO_TAP_OPS, m) { m.def("rms_norm_rows(Tensor x, Tensor weight, float eps) -> Tensor"); }

TORCH_LIBRARY_IMPL(OLMO_TAP_OPS, CPU, m) { m.impl("rms_norm_rows", &rms_norm_rows); }
