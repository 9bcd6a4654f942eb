// Few-row products with quantized weights, read once as codes: y (M, out) ~= x (M, in) @ dequantized(w).T.
//
// Built at first use by olmo_tap/quant/native.py (olmo_tap.native) with -O3 -march=native: AVX-512 VNNI where the CPU
// has it, AVX2 intrinsics where it has those, plain integer loops elsewhere (checked against the same reference with
// a -march=x86-64 build). The AVX-512 path gives the AVX2 path's bits: it does two blocks per instruction in the
// lanes the AVX2 path spreads over its two accumulators, with the same integer sums and the same float operations
// in the same order (tested against a build without it). As llama.cpp
// does, the activations are rounded to int8 per block of 32 (scale max |x| / 127) once per product; each block
// of weight codes is multiplied with them as integers (maddubs + madd), and the int32 sums are scaled once per
// block by weight scale x activation scale (int4 adds its minimum x the rounded block's sum). Each block of
// codes is loaded and unpacked once per tile of up to 4 activation rows (8 on AVX-512, whose 32 registers hold
// them); two accumulators per row alternate between blocks to keep several FMAs in flight. Output rows split over
// the intra-op threads.
//
// Storage (olmo_tap/quant/weights.py): int8 codes (out, in) with an fp32 scale per group of G inputs (G a multiple
// of 16: 16, 32, or the whole row); int4 codes two per byte, (out, in / 2), groups of 32 with byte j holding input j
// (low nibble) and input j + 16 (high nibble), an fp32 scale and minimum per group.

#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>
#ifdef __SSE__
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(OLMO_TAP_NO_AVX512)
#define OLMO_TAP_AVX512 1
#endif
// The ops' namespace: a test builds a second copy under another name (without AVX-512) to compare the paths.
#ifndef OLMO_TAP_OPS
#define OLMO_TAP_OPS olmo_tap
#endif

namespace {

constexpr int64_t kGrain = 64;  // output rows per parallel task
constexpr int64_t kBlock = 32;  // inputs per quantized block of the activations

void check_inputs(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be (M, in) fp32 contiguous");
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous(), "codes must be 2-D contiguous");
  TORCH_CHECK(scale.dim() == 2 && scale.scalar_type() == at::kFloat && scale.is_contiguous(),
              "scale must be (out, groups) fp32 contiguous");
  TORCH_CHECK(scale.size(0) == codes.size(0), "scale and codes differ in rows");
  TORCH_CHECK(x.size(1) % kBlock == 0, "the inputs must come in blocks of 32, got ", x.size(1));
}

// The activations, quantized once per product like llama.cpp's Q8 blocks: per row and block of 32 inputs, int8
// codes round(x / d) with d = max |x| / 127, the scale d, and the sum of the rounded block d * sum(codes) (for
// int4's minimum, as Q8_1's s). The rounded sum, not the exact one: then the product is exactly the dequantized
// weight times the rounded activations, whose rounding errors meet the weights w = scale * code + minimum, centred
// near zero; with the exact sum they met scale * code alone (0..15 steps, all of one sign), which made a Q4_1
// product's error ~2.5x the rounding's own and the embedded default's logits ~3x further from the float model's.
struct Activations {
  std::vector<int8_t> codes;
  std::vector<float> scale, sum;
  int64_t m, n_in, blocks;

  explicit Activations(const at::Tensor& x) : m(x.size(0)), n_in(x.size(1)), blocks(x.size(1) / kBlock) {
    codes.resize(m * n_in);
    scale.resize(m * blocks);
    sum.resize(m * blocks);
    const float* xp = x.data_ptr<float>();
    for (int64_t b = 0; b < m * blocks; ++b) {
      const float* v = xp + b * kBlock;
      float amax = 0.f;
      for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(v[j]));
      const float d = amax / 127.f;
      const float inv = d > 0.f ? 1.f / d : 0.f;
      int32_t total = 0;
      for (int64_t j = 0; j < kBlock; ++j) {
        const int8_t q = static_cast<int8_t>(std::nearbyint(v[j] * inv));
        codes[b * kBlock + j] = q;
        total += q;
      }
      scale[b] = d;
      sum[b] = d * static_cast<float>(total);
    }
  }
};

constexpr int64_t kWholeRow = 0;  // the group of a weight with one scale per row (per channel)

// The scale of int8 block b (of 32 inputs) in groups of ``group`` >= 32 inputs or kWholeRow, without dividing in
// the common cases (a division per block costs more than the block's products): groups of 32 (GGUF's Q8_0), rows.
inline int64_t scale_index(int64_t b, int64_t group) {
  return group == kBlock ? b : group == kWholeRow ? 0 : b * kBlock / group;
}

#ifdef __AVX2__
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 int32 sums of four products each: unsigned bytes ``u`` times signed bytes ``s`` (no overflow: |u| <= 127).
inline __m256 dot_u8_s8(__m256i u, __m256i s) {
  const __m256i pairs = _mm256_maddubs_epi16(u, s);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// The scales of int8 block b's 8 lanes times the activation scale d: lanes 0-3 hold the block's first 16 inputs,
// lanes 4-7 the next 16 (two groups when a group is 16 inputs).
inline __m256 int8_scale(const float* s, int64_t b, int64_t group, float d) {
  const bool halves = group == 16;
  const float s0 = halves ? s[2 * b] : s[scale_index(b, group)], s1 = halves ? s[2 * b + 1] : s0;
  return _mm256_set_m128(_mm_set1_ps(s1 * d), _mm_set1_ps(s0 * d));
}

// An int4 block's 32 codes in input order, from its 16 bytes (input j low nibble, input j + 16 high).
inline __m256i int4_codes(const uint8_t* bytes16) {
  const __m128i low_mask = _mm_set1_epi8(15);
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes16));
  const __m128i low = _mm_and_si128(bytes, low_mask), high = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask);
  return _mm256_set_m128i(high, low);
}
#endif

#ifdef OLMO_TAP_AVX512
// Blocks b and b + 1 side by side: lanes 0-7 hold what the AVX2 path adds into its accumulator of even blocks, lanes
// 8-15 its accumulator of odd blocks. dpbusd sums the same four byte products per int32 lane as maddubs + madd.
inline __m512 dot2_u8_s8(__m512i u, __m512i s) {
  return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s));
}

// a in lanes 0-7 (block b), b in lanes 8-15 (block b + 1).
inline __m512 pair(float a, float b) { return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(a), _mm512_set1_ps(b)); }

// The weight scales of int8 blocks b and b + 1 per lane, as the AVX2 path lays them out (see int8_scale).
inline __m512 int8_scales2(const float* s, int64_t b, int64_t group) {
  if (group != 16) return pair(s[scale_index(b, group)], s[scale_index(b + 1, group)]);
  const __m512i each_four = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(each_four, _mm512_castps128_ps512(_mm_loadu_ps(s + 2 * b)));
}

// The AVX2 path's final sum: its even accumulator plus its odd one, then across the 8 lanes.
inline float hsum_halves(__m512 acc) {
  const __m256 low = _mm512_castps512_ps256(acc);
  const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
  return hsum(_mm256_add_ps(low, high));
}
#endif

// One output row of an int8 weight (a scale per group of 16, of a multiple of 32, or per row) against R activation
// rows from ``r0``: per block of 32, the codes are loaded once and multiplied as integers into each row's sum,
// scaled by weight scale x activation scale. R is a constant so that each row's accumulators stay in registers.
template <int R>
void tile_int8(const Activations& a, int64_t r0, const int8_t* row, const float* s, int64_t group, float* y,
               int64_t y_stride) {
  const int64_t n_in = a.n_in, blocks = a.blocks;
  const int8_t* qx = a.codes.data() + r0 * n_in;
  const float* dx = a.scale.data() + r0 * blocks;
#if defined(OLMO_TAP_AVX512)
  __m512 acc[R];
  for (int t = 0; t < R; ++t) acc[t] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    const __m512i w = _mm512_loadu_si512(row + b * kBlock);
    const __m512i w_abs = _mm512_abs_epi8(w);
    const __mmask64 negative = _mm512_movepi8_mask(w);
    const __m512 w_scale = int8_scales2(s, b, group);
    for (int t = 0; t < R; ++t) {
      const __m512i x = _mm512_loadu_si512(qx + t * n_in + b * kBlock);
      const __m512i x_signed = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
      const float* d = dx + t * blocks + b;
      const __m512 scale = _mm512_mul_ps(w_scale, pair(d[0], d[1]));  // each lane's product as the AVX2 path's
      acc[t] = _mm512_fmadd_ps(scale, dot2_u8_s8(w_abs, x_signed), acc[t]);
    }
  }
  if (b < blocks) {  // an odd count: the last block is an even one, the low lanes
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock));
    const __m256i w_abs = _mm256_sign_epi8(w, w);
    for (int t = 0; t < R; ++t) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + t * n_in + b * kBlock));
      const __m256 dot = dot_u8_s8(w_abs, _mm256_sign_epi8(x, w));
      const __m256 scale = int8_scale(s, b, group, dx[t * blocks + b]);
      acc[t] = _mm512_mask3_fmadd_ps(_mm512_castps256_ps512(scale), _mm512_castps256_ps512(dot), acc[t], 0x00FF);
    }
  }
  for (int t = 0; t < R; ++t) y[(r0 + t) * y_stride] = hsum_halves(acc[t]);
#elif defined(__AVX2__)
  __m256 acc[R][2];
  for (int t = 0; t < R; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock));
    const __m256i w_abs = _mm256_sign_epi8(w, w);  // maddubs wants its first operand unsigned: |w| x (x with w's sign)
    for (int t = 0; t < R; ++t) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + t * n_in + b * kBlock));
      const __m256 scale = int8_scale(s, b, group, dx[t * blocks + b]);
      acc[t][b & 1] = _mm256_fmadd_ps(scale, dot_u8_s8(w_abs, _mm256_sign_epi8(x, w)), acc[t][b & 1]);
    }
  }
  for (int t = 0; t < R; ++t) y[(r0 + t) * y_stride] = hsum(_mm256_add_ps(acc[t][0], acc[t][1]));
#else
  for (int t = 0; t < R; ++t) {
    float total = 0.f;
    for (int64_t k = 0; k < n_in; k += 16) {
      int32_t dot = 0;
      for (int64_t j = 0; j < 16; ++j) dot += int32_t(row[k + j]) * int32_t(qx[t * n_in + k + j]);
      const int64_t g = group == 16 ? k / 16 : scale_index(k / kBlock, group);
      total += s[g] * dx[t * blocks + k / kBlock] * static_cast<float>(dot);
    }
    y[(r0 + t) * y_stride] = total;
  }
#endif
}

// shift[t] = the sum over blocks b of minimum[b] x activation row t's block sum: block b's product fused into
// partial sum b % 16 (in block order), then partial sums i and i + 8 added, then hsum's tree over the 8. Every path
// gives the same bits (the missing blocks of the last 16 add fma(0, 0, sum) = sum + 0). One FMA chain per row, in
// order, was the kernel's slowest part: each FMA waited on the last, ~30% of a decode step's int4 products.
float hsum8(const float* v) {  // hsum's tree: (v0 + v4 + v2 + v6) + (v1 + v5 + v3 + v7), paired as it pairs them
  const float s0 = v[0] + v[4], s1 = v[1] + v[5], s2 = v[2] + v[6], s3 = v[3] + v[7];
  return (s0 + s2) + (s1 + s3);
}

template <int R>
void int4_shifts(const float* mn, const float* xs, int64_t blocks, float* shift) {
#if defined(OLMO_TAP_AVX512)
  __m512 acc[R];
  for (int t = 0; t < R; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; b += 16) {
    const __mmask16 present = blocks - b >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (blocks - b)) - 1);
    const __m512 minimum = _mm512_maskz_loadu_ps(present, mn + b);
    for (int t = 0; t < R; ++t)
      acc[t] = _mm512_fmadd_ps(minimum, _mm512_maskz_loadu_ps(present, xs + t * blocks + b), acc[t]);
  }
  for (int t = 0; t < R; ++t) shift[t] = hsum_halves(acc[t]);
#elif defined(__AVX2__)
  __m256 low[R], high[R];
  for (int t = 0; t < R; ++t) low[t] = high[t] = _mm256_setzero_ps();
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t b = 0; b < blocks; b += 16) {
    const int64_t left = std::min<int64_t>(blocks - b, 16);
    const __m256i in_low = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left)), lane);
    const __m256i in_high = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left) - 8), lane);
    const __m256 min_low = _mm256_maskload_ps(mn + b, in_low), min_high = _mm256_maskload_ps(mn + b + 8, in_high);
    for (int t = 0; t < R; ++t) {
      low[t] = _mm256_fmadd_ps(min_low, _mm256_maskload_ps(xs + t * blocks + b, in_low), low[t]);
      high[t] = _mm256_fmadd_ps(min_high, _mm256_maskload_ps(xs + t * blocks + b + 8, in_high), high[t]);
    }
  }
  for (int t = 0; t < R; ++t) shift[t] = hsum(_mm256_add_ps(low[t], high[t]));
#else
  for (int t = 0; t < R; ++t) {
    float lanes[16] = {};
    for (int64_t b = 0; b < (blocks + 15) / 16 * 16; ++b) {
      const bool present = b < blocks;
      lanes[b % 16] = std::fma(present ? mn[b] : 0.f, present ? xs[t * blocks + b] : 0.f, lanes[b % 16]);
    }
    float halves[8];
    for (int i = 0; i < 8; ++i) halves[i] = lanes[i] + lanes[i + 8];
    shift[t] = hsum8(halves);
  }
#endif
}

// One output row of an int4 weight (groups of 32, byte j = input j | input j + 16 << 4, a scale and a minimum per
// group) against R activation rows from ``r0``: scale x activation scale x integer dot, plus minimum x the block's
// float sum; each block's codes unpacked once for the R rows.
template <int R>
void tile_int4(const Activations& a, int64_t r0, const uint8_t* row, const float* s, const float* mn, float* y,
               int64_t y_stride) {
  const int64_t n_in = a.n_in, blocks = a.blocks;
  const int8_t* qx = a.codes.data() + r0 * n_in;
  const float* dx = a.scale.data() + r0 * blocks;
  const float* xs = a.sum.data() + r0 * blocks;
  float shift[R];
  int4_shifts<R>(mn, xs, blocks, shift);
#if defined(OLMO_TAP_AVX512)
  __m512 acc[R];
  for (int t = 0; t < R; ++t) acc[t] = _mm512_setzero_ps();
  const __m256i low_mask = _mm256_set1_epi8(15);
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * 16));  // blocks b, b + 1
    const __m256i low = _mm256_and_si256(bytes, low_mask);
    const __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_mask);
    // 128-bit lanes [low b, low b+1, high b, high b+1] -> [low b, high b, low b+1, high b+1]: codes in input order
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
    const __m512i w = _mm512_shuffle_i64x2(both, both, _MM_SHUFFLE(3, 1, 2, 0));
    const __m512 w_scale = pair(s[b], s[b + 1]);
    for (int t = 0; t < R; ++t) {
      const __m512i x = _mm512_loadu_si512(qx + t * n_in + b * kBlock);
      const float* d = dx + t * blocks + b;
      const __m512 scale = _mm512_mul_ps(w_scale, pair(d[0], d[1]));
      acc[t] = _mm512_fmadd_ps(scale, dot2_u8_s8(w, x), acc[t]);
    }
  }
  if (b < blocks) {  // an odd count: the last block is an even one, the low lanes
    const __m256i w = int4_codes(row + b * 16);
    for (int t = 0; t < R; ++t) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + t * n_in + b * kBlock));
      const __m256 scale = _mm256_set1_ps(s[b] * dx[t * blocks + b]);
      acc[t] = _mm512_mask3_fmadd_ps(_mm512_castps256_ps512(scale), _mm512_castps256_ps512(dot_u8_s8(w, x)), acc[t],
                                     0x00FF);
    }
  }
  for (int t = 0; t < R; ++t) y[(r0 + t) * y_stride] = shift[t] + hsum_halves(acc[t]);
#elif defined(__AVX2__)
  __m256 acc[R][2];
  for (int t = 0; t < R; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const __m256i w = int4_codes(row + b * 16);
    for (int t = 0; t < R; ++t) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + t * n_in + b * kBlock));
      const __m256 scale = _mm256_set1_ps(s[b] * dx[t * blocks + b]);
      acc[t][b & 1] = _mm256_fmadd_ps(scale, dot_u8_s8(w, x), acc[t][b & 1]);
    }
  }
  for (int t = 0; t < R; ++t) y[(r0 + t) * y_stride] = shift[t] + hsum(_mm256_add_ps(acc[t][0], acc[t][1]));
#else
  for (int t = 0; t < R; ++t) {
    float total = shift[t];
    for (int64_t b = 0; b < blocks; ++b) {
      int32_t dot = 0;
      for (int64_t j = 0; j < 16; ++j) {
        const uint8_t v = row[b * 16 + j];
        const int8_t* xb = qx + t * n_in + b * kBlock;
        dot += int32_t(v & 15) * int32_t(xb[j]) + int32_t(v >> 4) * int32_t(xb[16 + j]);
      }
      total += s[b] * dx[t * blocks + b] * static_cast<float>(dot);
    }
    y[(r0 + t) * y_stride] = total;
  }
#endif
}

// Output rows ahead whose weights are prefetched: the embedded default's Q8_0 lm_head (49152 x 576) took 1.6-1.9
// instead of 2.1-2.3 ms for one row; its int4 layers in decode order gained less than the VM's noise.
constexpr int64_t kPrefetchRows = 16;

// Asks for ``bytes`` from ``p`` to be brought into the cache: a row's codes, scales or minima ahead of their use
// (the hardware prefetchers do not look ahead across rows of a few hundred bytes in three arrays).
inline void prefetch(const void* p, int64_t bytes) {
#ifdef __SSE__
  const char* c = static_cast<const char*>(p);
  for (int64_t k = 0; k < bytes; k += 64) _mm_prefetch(c + k, _MM_HINT_T0);
  _mm_prefetch(c + bytes - 1, _MM_HINT_T0);
#endif
}

// ``tile(o, r0, rows, y, y_stride)`` for every output row o (split over the intra-op threads) and every tile of
// up to 4 activation rows from r0 (``rows`` an integral_constant, so each tile's accumulators stay in registers),
// writing activation row r's result to y[r * y_stride]. The results go to a buffer of kGrain output rows first, then
// to y (M, out) a row at a time: written straight into y, the M results of one output row lie out * 4 bytes apart,
// for most layers a multiple of 4 KiB, so they all fall in one set of the L1 cache. Measured in one process,
// alternating builds, 1 and 2 threads: the int4 products of 4-20 rows (PoE's verification) 5-9% faster, the
// lm_head's and single rows' unchanged.
template <typename Tile>
void for_each_tile(int64_t out, int64_t m, float* y, Tile tile) {
  at::parallel_for(0, out, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(kGrain * m);
    for (int64_t start = begin; start < end; start += kGrain) {
      const int64_t n = std::min(kGrain, end - start);
      for (int64_t o = start; o < start + n; ++o) {
        float* yo = buffer.data() + (o - start);
        int64_t r = 0;
#if defined(OLMO_TAP_AVX512)
        // 32 vector registers hold 8 rows' accumulators: twice the independent FMA chains per block of codes
        for (; r + 8 <= m; r += 8) tile(o, r, std::integral_constant<int, 8>{}, yo, kGrain);
        switch (m - r) {  // 4-7 rows left: one tile; 1-3: the tiles below, as on AVX2
          case 7: tile(o, r, std::integral_constant<int, 7>{}, yo, kGrain); r = m; break;
          case 6: tile(o, r, std::integral_constant<int, 6>{}, yo, kGrain); r = m; break;
          case 5: tile(o, r, std::integral_constant<int, 5>{}, yo, kGrain); r = m; break;
          default: break;
        }
#endif
        for (; r + 4 <= m; r += 4) tile(o, r, std::integral_constant<int, 4>{}, yo, kGrain);
        switch (m - r) {
          case 3: tile(o, r, std::integral_constant<int, 3>{}, yo, kGrain); break;
          case 2: tile(o, r, std::integral_constant<int, 2>{}, yo, kGrain); break;
          case 1: tile(o, r, std::integral_constant<int, 1>{}, yo, kGrain); break;
          default: break;
        }
      }
      for (int64_t r = 0; r < m; ++r) std::copy_n(buffer.data() + r * kGrain, n, y + r * out + start);
    }
  });
}

}  // namespace

at::Tensor mm_int8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale) {
  check_inputs(x, codes, scale);
  TORCH_CHECK(codes.scalar_type() == at::kChar, "int8 codes must be int8");
  const int64_t m = x.size(0), n_in = x.size(1), out = codes.size(0), groups = scale.size(1);
  TORCH_CHECK(codes.size(1) == n_in, "codes have ", codes.size(1), " inputs, x has ", n_in);
  TORCH_CHECK(groups > 0 && n_in % groups == 0, "the groups must divide the inputs");
  const int64_t group = n_in / groups;
  TORCH_CHECK(group == 16 || group % kBlock == 0, "int8 groups must be 16 inputs or a multiple of 32, got ", group);
  const int64_t kernel_group = groups == 1 && group != 16 ? kWholeRow : group;
  const Activations a(x);
  at::Tensor y = at::empty({m, out}, x.options());
  const int8_t* cp = codes.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_each_tile(out, m, yp, [&](int64_t o, int64_t r0, auto rows, float* yo, int64_t y_stride) {
    if (r0 == 0 && o + kPrefetchRows < out) {
      prefetch(cp + (o + kPrefetchRows) * n_in, n_in);
      prefetch(sp + (o + kPrefetchRows) * groups, groups * 4);
    }
    tile_int8<decltype(rows)::value>(a, r0, cp + o * n_in, sp + o * groups, kernel_group, yo, y_stride);
  });
  return y;
}

at::Tensor mm_int4(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& minimum) {
  check_inputs(x, codes, scale);
  TORCH_CHECK(codes.scalar_type() == at::kByte, "int4 codes must be uint8 (two per byte)");
  TORCH_CHECK(minimum.sizes() == scale.sizes() && minimum.scalar_type() == at::kFloat && minimum.is_contiguous(),
              "minimum must match scale");
  const int64_t m = x.size(0), n_in = x.size(1), out = codes.size(0), groups = scale.size(1);
  TORCH_CHECK(n_in == groups * kBlock && codes.size(1) * 2 == n_in, "int4 weights come in groups of 32 inputs");
  const Activations a(x);
  at::Tensor y = at::empty({m, out}, x.options());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* mp = minimum.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_each_tile(out, m, yp, [&](int64_t o, int64_t r0, auto rows, float* yo, int64_t y_stride) {
    if (r0 == 0 && o + kPrefetchRows < out) {
      prefetch(cp + (o + kPrefetchRows) * (n_in / 2), n_in / 2);
      prefetch(sp + (o + kPrefetchRows) * groups, groups * 4);
      prefetch(mp + (o + kPrefetchRows) * groups, groups * 4);
    }
    tile_int4<decltype(rows)::value>(a, r0, cp + o * (n_in / 2), sp + o * groups, mp + o * groups, yo, y_stride);
  });
  return y;
}

// Dispatcher ops (not a Python module): callable from eager code and from a compiled step's C++ wrapper alike.
#define OLMO_TAP_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)  // expands OLMO_TAP_OPS before the macro pastes it
#define OLMO_TAP_IMPL(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)
OLMO_TAP_FRAGMENT(OLMO_TAP_OPS, m) {
  m.def("mm_int8(Tensor x, Tensor codes, Tensor scale) -> Tensor");
  m.def("mm_int4(Tensor x, Tensor codes, Tensor scale, Tensor minimum) -> Tensor");
}

OLMO_TAP_IMPL(OLMO_TAP_OPS, m) {
  m.impl("mm_int8", &mm_int8);
  m.impl("mm_int4", &mm_int4);
}
