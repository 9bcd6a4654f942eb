// Cached attention of a few query tokens per row for many rows in one call, each row in its own cache slot.
//
// Built at first use by olmo_tap/model/native_attention.py (olmo_tap.native) with -O3 -march=native. A decoding
// batch has rows at different positions: in torch each row needs its own handful of small ops per layer (the
// cache write, two products, a softmax), and at 8 rows that per-row work cost more than the layer's matrix
// products. Here one call writes every row's new keys and values into its slot and attends every query token of
// every row and tower.
//
// Batch-invariant by construction: each (tower, query token, head) is computed start to finish by one thread,
// in a fixed order that depends only on that query's own keys: dot products with 8 partial sums combined in a
// fixed tree, the softmax's maximum and sum over the keys in position order, the weighted sum of values in
// position order. What else is in the call (other rows, other towers, the thread count) changes which thread
// does the work, never the arithmetic.
//
// Layouts: qk (towers, heads + kv_heads, tokens, head_dim), the queries rotated and scaled, then the keys
// rotated; v (towers, kv_heads, tokens, head_dim); the caches (slots, cache towers, kv_heads, max_len, head_dim),
// contiguous, the call's towers starting at cache tower `tower0`. Row r is `lengths[r]` consecutive tokens of
// slot `slots[r]`, the first at position `starts[r]`; its query i sees the slot's keys 0 .. starts[r] + i.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kMinTaskWork = 1 << 16;  // keys x head dims per parallel task (~20 us of work)

// n floats' dot product: 8 lanes of partial sums (the compiler vectorises them), combined in a fixed tree.
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    for (int u = 0; u < 8; ++u) acc[u] += a[d + u] * b[d + u];
  }
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

// One call's tensors, checked: qk and v by data pointer and strides over (towers, heads, tokens), the head
// dimension contiguous; the caches contiguous (slots, cache towers, kv_heads, max_len, head_dim).
struct Call {
  const float *qk_p, *v_p;
  int64_t q0, q1, q2, v0, v1, v2;
  float *kc, *vc;
  int64_t n, tokens, hd, n_slots, cache_towers, kv, max_len, tower0, n_heads;
};

at::Tensor attend_rows(const Call& c, at::IntArrayRef slots, at::IntArrayRef starts, at::IntArrayRef lengths,
                       const at::TensorOptions& options);

at::Tensor attend_cached(const at::Tensor& qk, const at::Tensor& v, at::Tensor k_cache, at::Tensor v_cache,
                         int64_t tower0, at::IntArrayRef slots, at::IntArrayRef starts, at::IntArrayRef lengths,
                         int64_t n_heads) {
  TORCH_CHECK(qk.dim() == 4 && v.dim() == 4, "qk and v must be (towers, heads, tokens, head_dim)");
  TORCH_CHECK(k_cache.dim() == 5 && v_cache.sizes() == k_cache.sizes(), "caches must be equal 5-D tensors");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&qk, &v, &k_cache, &v_cache}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "fp32 CPU tensors only");
    TORCH_CHECK(t->stride(3 + (t->dim() == 5)) == 1, "the head dimension must be contiguous");
  }
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const int64_t n = qk.size(0), tokens = qk.size(2), hd = qk.size(3);
  const int64_t n_slots = k_cache.size(0), cache_towers = k_cache.size(1), kv = k_cache.size(2);
  const int64_t max_len = k_cache.size(3);
  TORCH_CHECK(n_heads > 0 && kv > 0 && n_heads % kv == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(qk.size(1) == n_heads + kv && v.size(0) == n && v.size(1) == kv && v.size(2) == tokens,
              "qk, v and the cache disagree in shape");
  TORCH_CHECK(v.size(3) == hd && k_cache.size(4) == hd, "head_dim differs between qk, v and the cache");
  TORCH_CHECK(tower0 >= 0 && tower0 + n <= cache_towers, "towers outside the cache");
  const Call call{qk.data_ptr<float>(), v.data_ptr<float>(), qk.stride(0), qk.stride(1), qk.stride(2),
                  v.stride(0), v.stride(1), v.stride(2), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                  n, tokens, hd, n_slots, cache_towers, kv, max_len, tower0, n_heads};
  return attend_rows(call, slots, starts, lengths, qk.options());
}

at::Tensor attend_rows(const Call& c, at::IntArrayRef slots, at::IntArrayRef starts, at::IntArrayRef lengths,
                       const at::TensorOptions& options) {
  const int64_t n = c.n, tokens = c.tokens, hd = c.hd, n_slots = c.n_slots, cache_towers = c.cache_towers;
  const int64_t kv = c.kv, max_len = c.max_len, tower0 = c.tower0, n_heads = c.n_heads;
  TORCH_CHECK(slots.size() == starts.size() && slots.size() == lengths.size(), "rows: slots, starts, lengths");

  const int64_t rows = static_cast<int64_t>(slots.size());
  std::vector<int64_t> first(rows), row_of(tokens);
  int64_t offset = 0, longest = 1;
  for (int64_t r = 0; r < rows; ++r) {
    longest = std::max(longest, starts[r] + lengths[r]);
    TORCH_CHECK(slots[r] >= 0 && slots[r] < n_slots, "slot outside the cache");
    TORCH_CHECK(starts[r] >= 0 && lengths[r] >= 0 && starts[r] + lengths[r] <= max_len, "positions outside the cache");
    first[r] = offset;
    for (int64_t i = 0; i < lengths[r]; ++i) {
      TORCH_CHECK(offset + i < tokens, "rows hold more tokens than qk");
      row_of[offset + i] = r;
    }
    offset += lengths[r];
  }
  TORCH_CHECK(offset == tokens, "rows hold fewer tokens than qk");

  const float* qk_p = c.qk_p;
  const float* v_p = c.v_p;
  float* kc = c.kc;
  float* vc = c.vc;
  const int64_t q0 = c.q0, q1 = c.q1, q2 = c.q2, v0 = c.v0, v1 = c.v1, v2 = c.v2;
  auto cache_at = [&](int64_t slot, int64_t t, int64_t g, int64_t pos) {
    return (((slot * cache_towers + tower0 + t) * kv + g) * max_len + pos) * hd;
  };

  for (int64_t t = 0; t < n; ++t) {  // the new keys and values, before any query reads them
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t g = 0; g < kv; ++g) {
        for (int64_t i = 0; i < lengths[r]; ++i) {
          const int64_t tok = first[r] + i, at = cache_at(slots[r], t, g, starts[r] + i);
          std::memcpy(kc + at, qk_p + t * q0 + (n_heads + g) * q1 + tok * q2, hd * sizeof(float));
          std::memcpy(vc + at, v_p + t * v0 + g * v1 + tok * v2, hd * sizeof(float));
        }
      }
    }
  }

  at::Tensor out = at::empty({n, tokens, n_heads * hd}, options.memory_format(at::MemoryFormat::Contiguous));
  float* out_p = out.data_ptr<float>();
  const int64_t group = n_heads / kv;
  // Items per task: enough keys x dims that a task outweighs waking a thread (a lone decode step's 9 heads run
  // on the calling thread; a batch's or a long context's split). Which thread computes an item never changes it.
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / (longest * hd));
  at::parallel_for(0, n * tokens * n_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> weights;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / (tokens * n_heads), tok = (item / n_heads) % tokens, h = item % n_heads;
      const int64_t r = row_of[tok], keys = starts[r] + (tok - first[r]) + 1;
      const float* q = qk_p + t * q0 + h * q1 + tok * q2;
      const float* k = kc + cache_at(slots[r], t, h / group, 0);
      const float* val = vc + cache_at(slots[r], t, h / group, 0);
      weights.resize(keys);
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < keys; ++j) {
        weights[j] = dot(q, k + j * hd, hd);
        top = std::max(top, weights[j]);
      }
      float sum = 0.f;
      for (int64_t j = 0; j < keys; ++j) {
        weights[j] = std::exp(weights[j] - top);
        sum += weights[j];
      }
      float* o = out_p + (t * tokens + tok) * n_heads * hd + h * hd;
      std::fill(o, o + hd, 0.f);
      for (int64_t j = 0; j < keys; ++j) {
        const float p = weights[j] / sum;
        const float* vj = val + j * hd;
        for (int64_t d = 0; d < hd; ++d) o[d] += p * vj[d];
      }
    }
  });
  return out;
}

// A compiled decode step's attention (olmo_tap/model/compiled.py): its tower's keys and values live in a window
// (kv_heads, window, head_dim), a cache of one slot and one tower, and its position is a tensor, the compiled
// graph's input, read here at run time. The same arithmetic as a decoding row of attend_cached, over the window's
// keys 0 .. position only: Inductor's loops over the whole window (masked) took ~100 us a layer on an AVX2 CPU.
at::Tensor attend_window(const at::Tensor& qk, const at::Tensor& v, at::Tensor k_window, at::Tensor v_window,
                         const at::Tensor& position, int64_t n_heads) {
  TORCH_CHECK(qk.dim() == 3 && v.dim() == 3 && qk.size(1) == 1 && v.size(1) == 1,
              "qk and v must be (heads, 1, head_dim)");
  TORCH_CHECK(k_window.dim() == 3 && v_window.sizes() == k_window.sizes() && k_window.is_contiguous() &&
                  v_window.is_contiguous(), "the windows must be equal contiguous (kv_heads, window, head_dim)");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&qk, &v, &k_window, &v_window}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "fp32 CPU tensors only");
    TORCH_CHECK(t->stride(2) == 1, "the head dimension must be contiguous");
  }
  TORCH_CHECK(position.numel() == 1 && position.scalar_type() == at::kLong && position.device().is_cpu(),
              "position must be one int64 on the CPU");
  const int64_t kv = k_window.size(0), hd = k_window.size(2);
  TORCH_CHECK(n_heads > 0 && n_heads % kv == 0 && qk.size(0) == n_heads + kv && v.size(0) == kv &&
                  qk.size(2) == hd && v.size(2) == hd, "qk, v and the windows disagree in shape");
  const int64_t p = *position.data_ptr<int64_t>();
  const int64_t slot[] = {0}, start[] = {p}, length[] = {1};
  // the windows as a cache of one slot and one tower; qk and v as one tower's
  const Call call{qk.data_ptr<float>(), v.data_ptr<float>(), 0, qk.stride(0), qk.stride(1), 0, v.stride(0),
                  v.stride(1), k_window.data_ptr<float>(), v_window.data_ptr<float>(), 1, 1, hd, 1, 1, kv,
                  k_window.size(1), 0, n_heads};
  return attend_rows(call, slot, start, length, qk.options()).view({1, n_heads * hd});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(olmo_tap, m) {
  m.def(
      "attend_cached(Tensor qk, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, int tower0, int[] slots, "
      "int[] starts, int[] lengths, int n_heads) -> Tensor");
  m.def("attend_window(Tensor qk, Tensor v, Tensor(a!) k_window, Tensor(b!) v_window, Tensor position, int n_heads) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(olmo_tap, CPU, m) {
  m.impl("attend_cached", &attend_cached);
  m.impl("attend_window", &attend_window);
}
