// Few-row products with quantized weights, read once as codes: y (M, out) ~= x (M, in) @ dequantized(w).T.
//
// Built at first use by olmo_tap/quant/native.py (olmo_tap.native) with -O3 -march=native: AVX2 intrinsics where
// the CPU has them (an AVX-512 CPU runs the same instructions in their EVEX form), with VNNI's dpbusd for the
// integer dots where it has AVX-512 VNNI or AVX-VNNI, plain loops elsewhere (checked against the same reference
// with a -march=x86-64 build; all three paths give the same bits, tested).
//
// As llama.cpp does, the activations are rounded to int8 per block of 32 (scale max |x| / 127) once per product,
// and each block of weight codes is multiplied with them as integers. The weights come in olmo-tap's tiled layout
// (olmo_tap/quant/weights.py, ``tile``), the idea of llama.cpp's repacked CPU layouts: output rows in tiles of 8,
// and within a tile each run of 4 code bytes of the 8 rows side by side (32 bytes: one AVX2 register). A register
// of codes times one activation row's 4 codes broadcast gives the 8 output rows' partial sums in its 8 lanes, so
// the sums never need adding across lanes, and one scale multiply and one FMA per block serve 8 output rows.
//
// The arithmetic (revision "native-4"), the same bits on every path and for any number of rows (each output is
// one lane's sum in a fixed order): for activation row r and output o, over the blocks b in order,
//   int8:  acc = fma(scale[o, b] * d[r, b], float(dot[o, r, b]), acc)   (groups of 16: the block's two halves,
//          each with its scale, in order; a scale per row: that one scale)
//   int4:  acc = fma(scale[o, b] * d[r, b], float(dot[o, r, b]), acc); shift = fma(minimum[o, b], s[r, b], shift)
//          y = acc + shift
// where dot is the block's exact integer dot product of codes and rounded activations, d the activations' block
// scale and s = d * (the sum of the block's rounded activations), llama.cpp's Q8_1 s.
//
// Layout: codes (tiles, bytes per row / 4, 8, 4): tile t holds output rows 8t..8t+7 (the last padded with zero
// rows), run c of 4 bytes of its row i at [t, c, i]; scale and minimum (tiles, groups, 8), fp32 or fp16 (read as
// the same fp32 values). Bytes per row: int8 one code per input; int4 two per byte, groups of 32 with byte j = input j | input j + 16 << 4 (ggml's order).

#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>
#ifdef __SSE__
#include <immintrin.h>
#endif
// The ops' namespace: a test builds a second copy under another name (without AVX2) to compare the paths.
#ifndef OLMO_TAP_OPS
#define OLMO_TAP_OPS olmo_tap
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(OLMO_TAP_NO_AVX2)
#define OLMO_TAP_QUANT_AVX2 1
// VNNI's dpbusd (AVX-512 VNNI on 256-bit registers, or AVX-VNNI) sums 4 byte products into an int32 lane in one
// instruction: the same exact block dots, in fewer instructions than maddubs + madd.
#if !defined(OLMO_TAP_NO_VNNI) && ((defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__))
#define OLMO_TAP_QUANT_VNNI 1
#endif
#endif

namespace {

constexpr int64_t kTile = 8;    // output rows per tile: one register's 8 float lanes
constexpr int64_t kBlock = 32;  // inputs per quantized block of the activations
constexpr int64_t kGrain = 8;   // tiles per parallel task (64 output rows)
// Activation rows sharing one pass over a tile's codes, their accumulators in registers. Measured on a Xeon with
// AVX-512 VNNI (alternating builds, 4-20 rows): int4 with VNNI 5-8% faster at 8 rows than at 4 (AVX-512's 32
// registers hold them); int8 (two integer accumulators a row) 10-20% slower at 6 or 8.
constexpr int kInt8Rows = 4;
#if defined(OLMO_TAP_QUANT_VNNI) && defined(__AVX512VL__)
constexpr int kInt4Rows = 8;
#else
constexpr int kInt4Rows = 4;
#endif

// The activations, quantized once per product like llama.cpp's Q8 blocks: per row and block of 32 inputs, int8
// codes round(x / d) with d = max |x| / 127 (so |code| <= 127), the scale d, and the sum of the rounded block
// d * sum(codes) (for int4's minimum, as Q8_1's s). The rounded sum, not the exact one: then the product is
// exactly the dequantized weight times the rounded activations, whose rounding errors meet the weights
// w = scale * code + minimum, centred near zero (with the exact sum a Q4_1 product's error was ~2.5x larger).
struct Activations {
  std::vector<int8_t> codes;
  std::vector<uint8_t> offset;  // VNNI, int8 weights only: codes + 128 (1..255), the unsigned operand dpbusd needs
  std::vector<float> scale, sum;
  int64_t m, n_in, blocks;

  Activations(const at::Tensor& x, bool with_offset) : m(x.size(0)), n_in(x.size(1)), blocks(x.size(1) / kBlock) {
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
#ifdef OLMO_TAP_QUANT_VNNI
    if (with_offset) {
      offset.resize(m * n_in);
      for (int64_t i = 0; i < m * n_in; ++i) offset[i] = static_cast<uint8_t>(codes[i] ^ 0x80);
    }
#else
    (void)with_offset;
#endif
  }
};

// Where int8 block b's scale lies among a row's groups: groups of 32 (GGUF's Q8_0), one per row, or larger
// groups (groups of 16 take two per block, handled apart). No division in the common cases.
inline int64_t scale_index(int64_t b, int64_t group, int64_t groups) {
  return group == kBlock ? b : groups == 1 ? 0 : b * kBlock / group;
}

// A tile's result for R activation rows: lane i of acc[r] is output row 8t + i; the last tile writes only its
// real rows.
template <int R>
void store(const float (&acc)[R][kTile], int64_t r0, int64_t o0, int64_t out, float* y) {
  const int64_t n = std::min(kTile, out - o0);
  for (int r = 0; r < R; ++r) std::memcpy(y + (r0 + r) * out + o0, acc[r], n * sizeof(float));
}

#ifdef OLMO_TAP_QUANT_AVX2
inline __m256i broadcast4(const void* p) {  // 4 activation codes in every 32-bit lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

#ifdef OLMO_TAP_QUANT_VNNI
// acc + the sums of each lane's 4 products of unsigned u and signed s bytes (exact: no saturation)
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#endif
}
#endif

// A tile's 8 scales (or minima) of one group as fp32: stored in fp32, or in fp16 where every value is exact in it
// (GGUF's own scales: fewer bytes to stream, the same values).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// Tile of int8 codes (8 output rows) times R activation rows from r0. Per block, each 32-byte run of codes is
// loaded once for the R rows: with VNNI, (x + 128) . w in dpbusd less 128 x the codes' sum; else |w| x (x with
// w's sign) in maddubs (its first operand must be unsigned; no overflow, |w| <= 128, |x| <= 127), pairs summed
// by madd into each lane's int32. Both exact.
template <int R, typename S>
void tile_int8(const Activations& a, int64_t r0, const int8_t* w, const S* s, int64_t group, int64_t groups,
               float (&out)[R][kTile]) {
  const int64_t n_in = a.n_in, blocks = a.blocks;
  [[maybe_unused]] const int8_t* qx = a.codes.data() + r0 * n_in;
  const float* dx = a.scale.data() + r0 * blocks;
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i low[R], high[R];  // the block's first 16 inputs, its last 16
    for (int r = 0; r < R; ++r) low[r] = high[r] = _mm256_setzero_si256();
    const int8_t* wb = w + b * kBlock * kTile;
#ifdef OLMO_TAP_QUANT_VNNI
    // (x + 128) . w by dpbusd, then minus 128 * sum(w) (the codes' sums once for all rows): the same integers
    const uint8_t* ux = a.offset.data() + r0 * n_in;
    const __m256i unit = _mm256_set1_epi8(1);
    __m256i wsum[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int j = 0; j < 8; ++j) {
      const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + j * 32));
      wsum[j / 4] = dpbusd(wsum[j / 4], unit, codes);
      for (int r = 0; r < R; ++r) {
        const __m256i x = broadcast4(ux + r * n_in + b * kBlock + 4 * j);
        if (j < 4) low[r] = dpbusd(low[r], x, codes);
        else high[r] = dpbusd(high[r], x, codes);
      }
    }
    const __m256i bias_low = _mm256_slli_epi32(wsum[0], 7), bias_high = _mm256_slli_epi32(wsum[1], 7);
    for (int r = 0; r < R; ++r) {
      low[r] = _mm256_sub_epi32(low[r], bias_low);
      high[r] = _mm256_sub_epi32(high[r], bias_high);
    }
#else
    for (int j = 0; j < 8; ++j) {
      const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + j * 32));
      const __m256i magnitude = _mm256_sign_epi8(codes, codes);
      for (int r = 0; r < R; ++r) {
        const __m256i x = _mm256_sign_epi8(broadcast4(qx + r * n_in + b * kBlock + 4 * j), codes);
        const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, x), ones);
        if (j < 4) low[r] = _mm256_add_epi32(low[r], sums);
        else high[r] = _mm256_add_epi32(high[r], sums);
      }
    }
#endif
    if (group == 16) {
      const __m256 s0 = load8(s + 2 * b * kTile), s1 = load8(s + (2 * b + 1) * kTile);
      for (int r = 0; r < R; ++r) {
        const __m256 d = _mm256_set1_ps(dx[r * blocks + b]);
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(s0, d), _mm256_cvtepi32_ps(low[r]), acc[r]);
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(s1, d), _mm256_cvtepi32_ps(high[r]), acc[r]);
      }
    } else {
      const __m256 sb = load8(s + scale_index(b, group, groups) * kTile);
      for (int r = 0; r < R; ++r) {
        const __m256 d = _mm256_set1_ps(dx[r * blocks + b]);
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_add_epi32(low[r], high[r]));
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(sb, d), dot, acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out[r], acc[r]);
}

// Tile of int4 codes times R activation rows: the nibbles are unsigned, so maddubs takes them directly; a block's
// eight maddubs results add in int16 without overflow (8 x 2 x 15 x 127 = 30480), then madd sums the pairs.
template <int R, typename S>
void tile_int4(const Activations& a, int64_t r0, const uint8_t* w, const S* s, const S* mn,
               float (&out)[R][kTile]) {
  const int64_t n_in = a.n_in, blocks = a.blocks;
  const int8_t* qx = a.codes.data() + r0 * n_in;
  const float* dx = a.scale.data() + r0 * blocks;
  const float* xs = a.sum.data() + r0 * blocks;
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
  const __m256i nibble = _mm256_set1_epi8(15);
  __m256 acc[R], shift[R];
  for (int r = 0; r < R; ++r) acc[r] = shift[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i dots[R];  // VNNI: each lane's block dot in int32; else pairs of products summed in int16
    for (int r = 0; r < R; ++r) dots[r] = _mm256_setzero_si256();
    const uint8_t* wb = w + b * (kBlock / 2) * kTile;
    for (int j = 0; j < 4; ++j) {
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + j * 32));
      const __m256i low = _mm256_and_si256(bytes, nibble);  // inputs 4j..4j+3 of the block
      const __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);  // inputs 16 + 4j..
      for (int r = 0; r < R; ++r) {
        const int8_t* xb = qx + r * n_in + b * kBlock + 4 * j;
#ifdef OLMO_TAP_QUANT_VNNI
        dots[r] = dpbusd(dpbusd(dots[r], low, broadcast4(xb)), high, broadcast4(xb + 16));
#else
        const __m256i both = _mm256_add_epi16(_mm256_maddubs_epi16(low, broadcast4(xb)),
                                              _mm256_maddubs_epi16(high, broadcast4(xb + 16)));
        dots[r] = _mm256_add_epi16(dots[r], both);
#endif
      }
    }
    const __m256 sb = load8(s + b * kTile), mb = load8(mn + b * kTile);
    for (int r = 0; r < R; ++r) {
#ifdef OLMO_TAP_QUANT_VNNI
      const __m256 dot = _mm256_cvtepi32_ps(dots[r]);
#else
      const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(dots[r], ones));
#endif
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(sb, _mm256_set1_ps(dx[r * blocks + b])), dot, acc[r]);
      shift[r] = _mm256_fmadd_ps(mb, _mm256_set1_ps(xs[r * blocks + b]), shift[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out[r], _mm256_add_ps(acc[r], shift[r]));
}
#else
// The same arithmetic in plain loops: exact integer dots, then the same float operations in the same order.
template <int R, typename S>
void tile_int8(const Activations& a, int64_t r0, const int8_t* w, const S* s, int64_t group, int64_t groups,
               float (&out)[R][kTile]) {
  const int64_t n_in = a.n_in, blocks = a.blocks;
  for (int r = 0; r < R; ++r) {
    const int8_t* qx = a.codes.data() + (r0 + r) * n_in;
    const float* dx = a.scale.data() + (r0 + r) * blocks;
    for (int64_t i = 0; i < kTile; ++i) {
      float acc = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        int32_t half[2] = {0, 0};
        for (int64_t j = 0; j < kBlock; ++j) {
          const int8_t code = w[(b * 8 + j / 4) * 32 + i * 4 + j % 4];
          half[j / 16] += int32_t(code) * int32_t(qx[b * kBlock + j]);
        }
        if (group == 16) {
          acc = std::fma(float(s[2 * b * kTile + i]) * dx[b], static_cast<float>(half[0]), acc);
          acc = std::fma(float(s[(2 * b + 1) * kTile + i]) * dx[b], static_cast<float>(half[1]), acc);
        } else {
          const float scale = float(s[scale_index(b, group, groups) * kTile + i]) * dx[b];
          acc = std::fma(scale, static_cast<float>(half[0] + half[1]), acc);
        }
      }
      out[r][i] = acc;
    }
  }
}

template <int R, typename S>
void tile_int4(const Activations& a, int64_t r0, const uint8_t* w, const S* s, const S* mn,
               float (&out)[R][kTile]) {
  const int64_t n_in = a.n_in, blocks = a.blocks;
  for (int r = 0; r < R; ++r) {
    const int8_t* qx = a.codes.data() + (r0 + r) * n_in;
    const float* dx = a.scale.data() + (r0 + r) * blocks;
    const float* xs = a.sum.data() + (r0 + r) * blocks;
    for (int64_t i = 0; i < kTile; ++i) {
      float acc = 0.f, shift = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        int32_t dot = 0;
        for (int64_t j = 0; j < kBlock / 2; ++j) {
          const uint8_t byte = w[(b * 4 + j / 4) * 32 + i * 4 + j % 4];
          dot += int32_t(byte & 15) * int32_t(qx[b * kBlock + j]) + int32_t(byte >> 4) * int32_t(qx[b * kBlock + 16 + j]);
        }
        acc = std::fma(float(s[b * kTile + i]) * dx[b], static_cast<float>(dot), acc);
        shift = std::fma(float(mn[b * kTile + i]), xs[b], shift);
      }
      out[r][i] = acc + shift;
    }
  }
}
#endif

// Tiles ahead whose codes and scales are prefetched (the hardware prefetchers stop at page boundaries).
constexpr int64_t kPrefetchTiles = 2;

inline void prefetch(const void* p, int64_t bytes) {
#ifdef __SSE__
  const char* c = static_cast<const char*>(p);
  for (int64_t k = 0; k < bytes; k += 64) _mm_prefetch(c + k, _MM_HINT_T0);
#endif
}

// tile(t, r0, rows) for the last run of ``rows`` < the rows per pass (rows a compile-time constant)
template <typename Tile, int... N>
void rest(Tile& tile, int64_t t, int64_t r0, int rows, std::integer_sequence<int, N...>) {
  ((rows == N + 1 ? tile(t, r0, std::integral_constant<int, N + 1>{}) : void()), ...);
}

// ``tile(t, r0, rows)`` for every tile t of output rows (split over the intra-op threads) and every run of up
// to Rows activation rows from r0 (``rows`` an integral_constant, so its accumulators stay in registers).
template <int Rows, typename Tile>
void for_each_tile(int64_t out, int64_t m, Tile tile) {
  const int64_t tiles = (out + kTile - 1) / kTile;
  at::parallel_for(0, tiles, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t r = 0;
      for (; r + Rows <= m; r += Rows) tile(t, r, std::integral_constant<int, Rows>{});
      if (r < m) rest(tile, t, r, static_cast<int>(m - r), std::make_integer_sequence<int, Rows - 1>{});
    }
  });
}

// The tiled weight's shapes: codes (tiles, bytes per row / 4, 8, 4) of ``dtype``, scale (tiles, groups, 8).
void check_inputs(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, int64_t out,
                  at::ScalarType dtype, int64_t bytes_per_row) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be (M, in) fp32 contiguous");
  TORCH_CHECK(x.size(1) % kBlock == 0, "the inputs must come in blocks of 32, got ", x.size(1));
  TORCH_CHECK(codes.dim() == 4 && codes.size(2) == kTile && codes.size(3) == 4 && codes.is_contiguous(),
              "codes must be tiled: (tiles, bytes per row / 4, 8, 4) contiguous");
  TORCH_CHECK(codes.scalar_type() == dtype, "codes must be ", dtype == at::kChar ? "int8" : "uint8 (two per byte)");
  TORCH_CHECK(codes.size(1) * 4 == bytes_per_row, "codes have ", codes.size(1) * 4, " bytes per row, x needs ",
              bytes_per_row);
  TORCH_CHECK(out > 0 && (out + kTile - 1) / kTile == codes.size(0), "codes hold ", codes.size(0),
              " tiles of 8 rows, not ", out, " output rows");
  TORCH_CHECK(scale.dim() == 3 && scale.size(0) == codes.size(0) && scale.size(2) == kTile &&
                  (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf) && scale.is_contiguous(),
              "scale must be tiled: (tiles, groups, 8) fp32 or fp16 contiguous");
}

}  // namespace

namespace {

template <typename S>
void int8_product(const Activations& a, const at::Tensor& codes, const at::Tensor& scale, int64_t out, float* y) {
  const int64_t m = a.m, n_in = a.n_in, groups = scale.size(1), group = n_in / groups;
  const int8_t* cp = codes.data_ptr<int8_t>();
  const S* sp = scale.data_ptr<S>();
  for_each_tile<kInt8Rows>(out, m, [&](int64_t t, int64_t r0, auto rows) {
    constexpr int R = decltype(rows)::value;
    float result[R][kTile];
    if (r0 == 0 && t + kPrefetchTiles < (out + kTile - 1) / kTile) {
      prefetch(cp + (t + kPrefetchTiles) * kTile * n_in, kTile * n_in);
      prefetch(sp + (t + kPrefetchTiles) * kTile * groups, kTile * groups * sizeof(S));
    }
    tile_int8<R>(a, r0, cp + t * kTile * n_in, sp + t * kTile * groups, group, groups, result);
    store<R>(result, r0, t * kTile, out, y);
  });
}

template <typename S>
void int4_product(const Activations& a, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& minimum,
                  int64_t out, float* y) {
  const int64_t m = a.m, row_bytes = a.n_in / 2, groups = scale.size(1);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const S* sp = scale.data_ptr<S>();
  const S* mp = minimum.data_ptr<S>();
  for_each_tile<kInt4Rows>(out, m, [&](int64_t t, int64_t r0, auto rows) {
    constexpr int R = decltype(rows)::value;
    float result[R][kTile];
    const int64_t offset = t * kTile * groups;
    if (r0 == 0 && t + kPrefetchTiles < (out + kTile - 1) / kTile) {
      prefetch(cp + (t + kPrefetchTiles) * kTile * row_bytes, kTile * row_bytes);
      prefetch(sp + offset + kPrefetchTiles * kTile * groups, kTile * groups * sizeof(S));
      prefetch(mp + offset + kPrefetchTiles * kTile * groups, kTile * groups * sizeof(S));
    }
    tile_int4<R>(a, r0, cp + t * kTile * row_bytes, sp + offset, mp + offset, result);
    store<R>(result, r0, t * kTile, out, y);
  });
}

}  // namespace

at::Tensor mm_int8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, int64_t out) {
  check_inputs(x, codes, scale, out, at::kChar, x.size(1));
  const int64_t n_in = x.size(1), groups = scale.size(1);
  TORCH_CHECK(groups > 0 && n_in % groups == 0, "the groups must divide the inputs");
  const int64_t group = n_in / groups;
  TORCH_CHECK(group == 16 || group % kBlock == 0, "int8 groups must be 16 inputs or a multiple of 32, got ", group);
  const Activations a(x, /*with_offset=*/true);
  at::Tensor y = at::empty({x.size(0), out}, x.options());
  if (scale.scalar_type() == at::kHalf) {
    int8_product<at::Half>(a, codes, scale, out, y.data_ptr<float>());
  } else {
    int8_product<float>(a, codes, scale, out, y.data_ptr<float>());
  }
  return y;
}

at::Tensor mm_int4(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& minimum,
                   int64_t out) {
  check_inputs(x, codes, scale, out, at::kByte, x.size(1) / 2);
  TORCH_CHECK(minimum.sizes() == scale.sizes() && minimum.scalar_type() == scale.scalar_type() &&
                  minimum.is_contiguous(), "minimum must match scale");
  TORCH_CHECK(x.size(1) == scale.size(1) * kBlock, "int4 weights come in groups of 32 inputs");
  const Activations a(x, /*with_offset=*/false);
  at::Tensor y = at::empty({x.size(0), out}, x.options());
  if (scale.scalar_type() == at::kHalf) {
    int4_product<at::Half>(a, codes, scale, minimum, out, y.data_ptr<float>());
  } else {
    int4_product<float>(a, codes, scale, minimum, out, y.data_ptr<float>());
  }
  return y;
}

std::string vector_path() {
#if defined(OLMO_TAP_QUANT_VNNI)
  return "vnni";
#elif defined(OLMO_TAP_QUANT_AVX2)
  return "avx2";
#else
  return "plain";
#endif
}

// Dispatcher ops (not a Python module): callable from eager code and from a compiled step's C++ wrapper alike.
#define OLMO_TAP_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)  // expands OLMO_TAP_OPS before the macro pastes it
#define OLMO_TAP_IMPL(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)
OLMO_TAP_FRAGMENT(OLMO_TAP_OPS, m) {
  m.def("mm_int8(Tensor x, Tensor codes, Tensor scale, int out) -> Tensor");
  m.def("mm_int4(Tensor x, Tensor codes, Tensor scale, Tensor minimum, int out) -> Tensor");
  m.def("mm_quant_path() -> str", &vector_path);
}

OLMO_TAP_IMPL(OLMO_TAP_OPS, m) {
  m.impl("mm_int8", &mm_int8);
  m.impl("mm_int4", &mm_int4);
}
