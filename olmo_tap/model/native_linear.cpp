// Few-row fp32 products whose every output is the same bits for any row count, thread count and vector width:
// y (M, out) = x (M, in) @ w.T, for the decode step, PoE's verification and the lm_head.
//
// Built at first use by olmo_tap/model/native_linear.py (olmo_tap.native) with -O3 -march=native. Why a kernel of
// our own: oneDNN's fp32 products of 8 rows read weights at 10-18 GB/s on a 2-core Xeon whose memory gives ~20-28
// (results/engine/fp32_products.md), and a lone row takes another kernel than two rows (other bits), so a batched
// decode paid a padded row to stay batch-invariant; MKL's packed sgemm is faster but rounds a row differently by
// the row count.
//
// The arithmetic: output (r, j) is one fused multiply-add chain over the inputs in order,
//   acc = 0; for k in 0..in-1: acc = fma(x[r, k], w[j, k], acc)
// with the outputs j in the vector lanes and the rows r in separate registers. Nothing in that chain depends on
// how many rows share the call, how the outputs are split over threads or how wide the vectors are, so the
// AVX-512, AVX2 and plain paths give the same bits (tested against a build without AVX-512 and one without
// AVX2). Rows go through in tiles (8 on AVX-512, 3 on AVX2; from 64 rows on, 6 rows of two blocks on AVX-512) that
// load each weight vector once per tile; a block of the packed weight stays in L2 between the tiles of a call.
//
// Packed layout (``pack_f32``): blocks of kCols outputs, each (in, kCols) input-major, the last block padded
// with zeros: (ceil(out / kCols), in, kCols) contiguous.

#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && !defined(OLMO_TAP_NO_AVX512)
#define OLMO_TAP_AVX512 1
#endif
#if defined(__AVX2__) && defined(__FMA__) && !defined(OLMO_TAP_NO_AVX2)
#define OLMO_TAP_AVX2 1
#endif
#ifndef OLMO_TAP_OPS
#define OLMO_TAP_OPS olmo_tap
#endif

namespace {

constexpr int64_t kCols = 32;     // outputs per packed block: two AVX-512 vectors, four AVX2 ones
constexpr int64_t kPrefetch = 24;  // inputs ahead (3 KB of the block) to prefetch: the chains alone do not keep
                                   // the memory busy at 8 rows (ad hoc on the Xeon: 12-14 GB/s without, 17-20 with)

at::Tensor pack_f32(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "pack_f32 takes an (out, in) fp32 weight");
  const int64_t out = w.size(0), in = w.size(1), blocks = (out + kCols - 1) / kCols;
  at::Tensor padded = at::zeros({blocks * kCols, in}, w.options());
  padded.narrow(0, 0, out).copy_(w);
  // (blocks, kCols, in) -> (blocks, in, kCols)
  return padded.view({blocks, kCols, in}).transpose(1, 2).contiguous();
}

#if OLMO_TAP_AVX512
constexpr int64_t kVecs = kCols / 16;
template <int R>
void tile(const float* x, int64_t x_stride, const float* w, int64_t in, float* y, int64_t y_stride, int64_t cols) {
  __m512 acc[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kVecs; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < in; ++k) {
    for (int c = 0; c < kVecs; ++c) _mm_prefetch(reinterpret_cast<const char*>(w + (k + kPrefetch) * kCols + 16 * c), _MM_HINT_T0);
    __m512 wv[kVecs];
    for (int c = 0; c < kVecs; ++c) wv[c] = _mm512_loadu_ps(w + k * kCols + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * x_stride + k]);
      for (int c = 0; c < kVecs; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(64) float buf[kCols];
    for (int c = 0; c < kVecs; ++c) _mm512_store_ps(buf + 16 * c, acc[r][c]);
    for (int64_t j = 0; j < cols; ++j) y[r * y_stride + j] = buf[j];
  }
}
constexpr int kTile = 8;  // 16 accumulators, 2 weight vectors, 1 broadcast: 19 of 32 registers

// Many rows (a prompt, a batch's verification and its lm_head): two blocks at once, kWideRows rows of 64 outputs,
// 24 accumulators for 4 weight loads and 6 broadcasts per input instead of 16 for 2 and 8. Measured on the Xeon
// (weights from memory, 2 threads, alternating builds): 15-20% faster from 64 rows on (the lm_head over 128 rows
// 44 -> 35 ms), no faster at 32 and slower below. The same chains in the same order: the same bits.
constexpr int kWideRows = 6;
constexpr int64_t kWideMin = 64;  // rows from which a call takes the wide tiles
template <int R>
void wide_tile(const float* x, int64_t x_stride, const float* w, int64_t in, float* y, int64_t y_stride) {
  const float* w1 = w + in * kCols;  // the next block
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < in; ++k) {
    const __m512 wv[4] = {_mm512_loadu_ps(w + k * kCols), _mm512_loadu_ps(w + k * kCols + 16),
                          _mm512_loadu_ps(w1 + k * kCols), _mm512_loadu_ps(w1 + k * kCols + 16)};
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * x_stride + k]);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(y + r * y_stride + 16 * c, acc[r][c]);
}
#elif OLMO_TAP_AVX2
template <int R>
void tile(const float* x, int64_t x_stride, const float* w, int64_t in, float* y, int64_t y_stride, int64_t cols) {
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < in; ++k) {
    for (int c = 0; c < 2; ++c) _mm_prefetch(reinterpret_cast<const char*>(w + (k + kPrefetch) * kCols + 16 * c), _MM_HINT_T0);
    __m256 wv[4];
    for (int c = 0; c < 4; ++c) wv[c] = _mm256_loadu_ps(w + k * kCols + 8 * c);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_set1_ps(x[r * x_stride + k]);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) float buf[kCols];
    for (int c = 0; c < 4; ++c) _mm256_store_ps(buf + 8 * c, acc[r][c]);
    for (int64_t j = 0; j < cols; ++j) y[r * y_stride + j] = buf[j];
  }
}
constexpr int kTile = 3;  // 12 accumulators and 4 weight vectors: all 16 registers
#else
template <int R>
void tile(const float* x, int64_t x_stride, const float* w, int64_t in, float* y, int64_t y_stride, int64_t cols) {
  float acc[R][kCols] = {};
  for (int64_t k = 0; k < in; ++k)
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < kCols; ++j) acc[r][j] = std::fma(x[r * x_stride + k], w[k * kCols + j], acc[r][j]);
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < cols; ++j) y[r * y_stride + j] = acc[r][j];
}
constexpr int kTile = 4;
#endif

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t);

template <int... R>
constexpr TileFn tile_for(int rows, std::integer_sequence<int, R...>) {
  TileFn fns[] = {&tile<R + 1>...};
  return fns[rows - 1];
}

#if OLMO_TAP_AVX512
using WideFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t);

template <int... R>
constexpr WideFn wide_for(int rows, std::integer_sequence<int, R...>) {
  WideFn fns[] = {&wide_tile<R + 1>...};
  return fns[rows - 1];
}
#endif

at::Tensor mm_f32(const at::Tensor& x, const at::Tensor& packed, int64_t out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be (M, in) fp32 contiguous");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kFloat && packed.is_contiguous() &&
                  packed.size(2) == kCols,
              "packed must come from pack_f32");
  const int64_t m = x.size(0), in = x.size(1), blocks = packed.size(0);
  TORCH_CHECK(packed.size(1) == in, "x has ", in, " inputs, the packed weight ", packed.size(1));
  TORCH_CHECK(out > (blocks - 1) * kCols && out <= blocks * kCols, "out does not match the packed weight");
  at::Tensor y = at::empty({m, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Whole blocks per thread: an output's chain never splits, so the split cannot change a bit. With many rows,
  // full blocks go in pairs (wide tiles) and the rest one by one.
#if OLMO_TAP_AVX512
  const int64_t pairs = m >= kWideMin ? (out / kCols) / 2 : 0;
#else
  const int64_t pairs = 0;
#endif
  at::parallel_for(0, pairs + blocks - 2 * pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
#if OLMO_TAP_AVX512
      if (u < pairs) {
        const float* w = wp + 2 * u * in * kCols;
        for (int64_t r0 = 0; r0 < m; r0 += kWideRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kWideRows, m - r0));
          wide_for(rows, std::make_integer_sequence<int, kWideRows>{})(xp + r0 * in, in, w, in,
                                                                       yp + r0 * out + 2 * u * kCols, out);
        }
        continue;
      }
#endif
      const int64_t b = u + pairs;  // the blocks after the pairs' 2 * pairs
      const float* w = wp + b * in * kCols;
      const int64_t cols = std::min(kCols, out - b * kCols);
      for (int64_t r0 = 0; r0 < m; r0 += kTile) {
        const int rows = static_cast<int>(std::min<int64_t>(kTile, m - r0));
        tile_for(rows, std::make_integer_sequence<int, kTile>{})(xp + r0 * in, in, w, in, yp + r0 * out + b * kCols,
                                                                  out, cols);
      }
    }
  });
  return y;
}

std::string vector_path() {
#if OLMO_TAP_AVX512
  return "avx512";
#elif OLMO_TAP_AVX2
  return "avx2";
#else
  return "plain";
#endif
}

}  // namespace

#define OLMO_TAP_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define OLMO_TAP_IMPL(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)
OLMO_TAP_FRAGMENT(OLMO_TAP_OPS, m) {
  m.def("pack_f32(Tensor w) -> Tensor");
  m.def("mm_f32(Tensor x, Tensor packed, int out) -> Tensor");
  m.def("mm_f32_path() -> str", &vector_path);
}
OLMO_TAP_IMPL(OLMO_TAP_OPS, m) {
  m.impl("pack_f32", &pack_f32);
  m.impl("mm_f32", &mm_f32);
}
