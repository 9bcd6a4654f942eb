// The layers of one tower, every kernel native, as a single op (olmo_tap.model.native_layer).
//
// A cached decode step of SmolLM2 on its GGUF file spent ~40% of its time between kernels: Python and the
// dispatch of ~50 small operators a layer. This op runs the layer's arithmetic from C++, with the bits of the
// layer written in Python (layers.Block; tested bit for bit): the products, norms and attention through their own
// ops (olmo_tap::mm_int4 / mm_int8 / mm_f32, rms_norm_rows, attend_cached), SiLU through ATen's, and the rest in
// loops of its own where the result is one IEEE operation per element and so cannot differ: the residual adds,
// SwiGLU's product, and the rotary embedding (x * cos + roll(x) * sin), whose last step rounds once or twice as
// ATen's addcmul does here (probed once: its AVX2 and AVX-512 kernels fuse the multiply-add, plain loops may not).
// Built with -ffp-contract=off, so the compiler fuses nothing the code does not say.

#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <vector>

namespace {

using Tensor = at::Tensor;

// The ops of the other native kernels, each found on its first use (a quantized model never loads mm_f32's).
template <typename Signature>
c10::TypedOperatorHandle<Signature> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}
using Product = Tensor(const Tensor&, const Tensor&, int64_t);
using Int4Product = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t);
using Int8Product = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t);
using Norm = Tensor(const Tensor&, const Tensor&, double);
using Attend = Tensor(const Tensor&, const Tensor&, Tensor, Tensor, int64_t, at::IntArrayRef, at::IntArrayRef,
                      at::IntArrayRef, int64_t);

Tensor mm_f32(const Tensor& x, const Tensor& pack, int64_t out) {
  static const auto op = find<Product>("olmo_tap::mm_f32");
  return op.call(x, pack, out);
}
Tensor mm_int4(const Tensor& x, const Tensor& codes, const Tensor& scale, const Tensor& minimum, int64_t out) {
  static const auto op = find<Int4Product>("olmo_tap::mm_int4");
  return op.call(x, codes, scale, minimum, out);
}
Tensor mm_int8(const Tensor& x, const Tensor& codes, const Tensor& scale, int64_t out) {
  static const auto op = find<Int8Product>("olmo_tap::mm_int8");
  return op.call(x, codes, scale, out);
}
Tensor norm(const Tensor& x, const Tensor& weight, double eps) {
  static const auto op = find<Norm>("olmo_tap::rms_norm_rows");
  return op.call(x, weight, eps);
}
Tensor attend(const Tensor& qk, const Tensor& v, const Tensor& k_cache, const Tensor& v_cache, int64_t tower,
              at::IntArrayRef slots, at::IntArrayRef starts, at::IntArrayRef lengths, int64_t n_heads) {
  static const auto op = find<Attend>("olmo_tap::attend_cached");
  return op.call(qk, v, k_cache, v_cache, tower, slots, starts, lengths, n_heads);
}

// Whether ATen's addcmul rounds self + t1 * t2 once (a fused multiply-add) or twice, in its vectorised body and its
// scalar tail alike (65 elements: both); neither (they disagree) keeps ATen's op for the rotary embedding.
enum class AddcmulRounding { kOnce, kTwice, kMixed };

AddcmulRounding addcmul_rounding() {
  static const AddcmulRounding rounding = [] {
    const float t1 = 1.0f + std::ldexp(1.0f, -12), t2 = 1.0f + std::ldexp(1.0f, -13);
    at::Tensor got = at::addcmul(at::full({65}, -1.0f), at::full({65}, t1), at::full({65}, t2));
    const float once = std::fma(t1, t2, -1.0f);
    const float product = t1 * t2;
    const float twice = product + -1.0f;
    const float* g = got.data_ptr<float>();
    bool all_once = true, all_twice = true;
    for (int i = 0; i < 65; ++i) {
      all_once = all_once && g[i] == once;
      all_twice = all_twice && g[i] == twice;
    }
    return all_once ? AddcmulRounding::kOnce : all_twice ? AddcmulRounding::kTwice : AddcmulRounding::kMixed;
  }();
  return rounding;
}

// a + b, element by element, into a new tensor (a, b contiguous and of one shape).
Tensor sum_of(const Tensor& a, const Tensor& b) {
  Tensor out = at::empty_like(a);
  const float *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0, n = a.numel(); i < n; ++i) op[i] = ap[i] + bp[i];
  return out;
}

// The rotary embedding of the query and key heads of ``qkv`` (tokens, heads x head_dim, contiguous): (1, q and
// kv heads, tokens, head_dim), each element x * cos + roll(x, head_dim / 2) * sin as layers.apply_rope computes it;
// cos and sin (q and kv heads, tokens, head_dim), any strides.
Tensor rope(const Tensor& qkv, int64_t heads, int64_t head_dim, const Tensor& cos, const Tensor& sin) {
  const int64_t tokens = qkv.size(0), width = qkv.size(1), half = head_dim / 2;
  Tensor out = at::empty({1, heads, tokens, head_dim}, qkv.options());
  const float *x = qkv.data_ptr<float>(), *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
  const int64_t c0 = cos.stride(0), c1 = cos.stride(1), c2 = cos.stride(2);
  const int64_t s0 = sin.stride(0), s1 = sin.stride(1), s2 = sin.stride(2);
  const bool once = addcmul_rounding() == AddcmulRounding::kOnce;
  float* o = out.data_ptr<float>();
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t t = 0; t < tokens; ++t) {
      const float* xh = x + t * width + h * head_dim;
      const float *ch = c + h * c0 + t * c1, *sh = s + h * s0 + t * s1;
      float* oh = o + (h * tokens + t) * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) {
        const float a = xh[d] * ch[d * c2], r = xh[(d + half) % head_dim], sd = sh[d * s2];
        if (once) {
          oh[d] = std::fma(r, sd, a);
        } else {
          const float b = r * sd;
          oh[d] = a + b;
        }
      }
    }
  }
  return out;
}

// Part kinds in ``parts`` (native_layer.py writes them): an fp32 pack, an int4 weight, an int8 weight.
enum Kind : int64_t { kF32 = 0, kInt4 = 1, kInt8 = 2 };

// Reads the projections one after the other: ``parts`` holds, per projection, its number of parts and then
// (kind, out) per part; ``weights`` the parts' tensors in order (a pack; codes, scale, minimum; codes, scale).
struct Projections {
  at::TensorList weights;
  at::IntArrayRef parts;
  size_t w = 0, p = 0;

  Tensor next(const Tensor& x) {
    const int64_t n = parts[p++];
    std::vector<Tensor> outs;
    outs.reserve(n);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t kind = parts[p++], out = parts[p++];
      if (kind == kF32) {
        outs.push_back(mm_f32(x, weights[w], out));
        w += 1;
      } else if (kind == kInt4) {
        outs.push_back(mm_int4(x, weights[w], weights[w + 1], weights[w + 2], out));
        w += 3;
      } else {
        TORCH_CHECK(kind == kInt8, "olmo_tap::layer: unknown part kind ", kind);
        outs.push_back(mm_int8(x, weights[w], weights[w + 1], out));
        w += 2;
      }
    }
    return n == 1 ? outs[0] : at::cat(outs, -1);
  }
};

// One layer: x (tokens, d_model) -> (tokens, d_model), reading its projections from ``proj`` and its norms from
// ``norms`` (attention, feed-forward, then OLMo-2's q and k norms where ``post_norm``).
// dims: n_heads, n_kv_heads, head_dim, q_dim, kv_dim.
Tensor layer(const Tensor& x, Projections& proj, const Tensor* norms, const Tensor& cos, const Tensor& sin,
             const Tensor& k_cache, const Tensor& v_cache, int64_t tower, at::IntArrayRef slots,
             at::IntArrayRef starts, at::IntArrayRef lengths, at::IntArrayRef dims, double eps, bool post_norm) {
  const int64_t n_heads = dims[0], n_kv = dims[1], head_dim = dims[2], q_dim = dims[3], kv_dim = dims[4];
  const int64_t tokens = x.size(0);

  auto attention = [&](const Tensor& h) {
    Tensor qkv = proj.next(h);
    if (post_norm) {  // OLMo-2's QK-norm over the whole projection, before the head split
      Tensor q = norm(qkv.narrow(-1, 0, q_dim).contiguous(), norms[2], eps);
      Tensor k = norm(qkv.narrow(-1, q_dim, kv_dim).contiguous(), norms[3], eps);
      qkv = at::cat({q, k, qkv.narrow(-1, q_dim + kv_dim, kv_dim)}, -1);
    }
    Tensor heads = qkv.view({1, tokens, n_heads + 2 * n_kv, head_dim}).transpose(1, 2);
    Tensor qk;  // rotated (layers.apply_rope), which also scales q
    if (addcmul_rounding() == AddcmulRounding::kMixed) {
      qk = heads.narrow(1, 0, n_heads + n_kv);
      qk = at::addcmul(qk * cos, qk.roll({head_dim / 2}, {-1}), sin);
    } else {
      qk = rope(qkv, n_heads + n_kv, head_dim, cos, sin);
    }
    Tensor v = heads.narrow(1, n_heads + n_kv, n_kv);
    Tensor out = attend(qk, v, k_cache, v_cache, tower, slots, starts, lengths, n_heads);
    return proj.next(out.select(0, 0));
  };
  auto ffn = [&](const Tensor& h) {
    std::vector<Tensor> gate_up = proj.next(h).chunk(2, -1);
    Tensor hidden = at::silu(gate_up[0]);  // contiguous, as the product's output rows are
    float* hp = hidden.data_ptr<float>();
    const float* up = gate_up[1].data_ptr<float>();
    const int64_t rows = hidden.size(0), width = hidden.size(1), up_stride = gate_up[1].stride(0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < width; ++i) hp[r * width + i] *= up[r * up_stride + i];
    }
    return proj.next(hidden);
  };

  if (post_norm) {  // OLMo-2 normalises each sublayer's output
    Tensor mid = sum_of(x, norm(attention(x), norms[0], eps));
    return sum_of(mid, norm(ffn(mid), norms[1], eps));
  }
  Tensor mid = sum_of(x, attention(norm(x, norms[0], eps)));  // Llama each sublayer's input
  return sum_of(mid, ffn(norm(mid, norms[1], eps)));
}


// The layers of one tower in a row, each with its own cache (k_caches[i], v_caches[i]); their projections' parts
// and tensors one layer after the other in ``parts`` and ``weights``, their norms in ``norms`` (2 or 4 a layer).
Tensor layers(const Tensor& x, at::TensorList weights, at::IntArrayRef parts, at::TensorList norms, const Tensor& cos,
              const Tensor& sin, at::TensorList k_caches, at::TensorList v_caches, int64_t tower, at::IntArrayRef slots,
              at::IntArrayRef starts, at::IntArrayRef lengths, at::IntArrayRef dims, double eps, bool post_norm) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "olmo_tap::layers takes contiguous fp32 rows");
  const size_t n = k_caches.size(), per_layer = post_norm ? 4 : 2;
  TORCH_CHECK(dims.size() == 5 && v_caches.size() == n && norms.size() == n * per_layer,
              "olmo_tap::layers: bad dims, caches or norms");
  Projections proj{weights, parts};
  Tensor h = x;
  for (size_t i = 0; i < n; ++i) {
    h = layer(h, proj, norms.data() + i * per_layer, cos, sin, k_caches[i], v_caches[i], tower, slots, starts,
              lengths, dims, eps, post_norm);
  }
  TORCH_CHECK(proj.w == weights.size() && proj.p == parts.size(), "olmo_tap::layers: parts left unread");
  return h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(olmo_tap, m) {
  m.def(
      "layers(Tensor x, Tensor[] weights, int[] parts, Tensor[] norms, Tensor cos, Tensor sin, Tensor(a!)[] k_caches, "
      "Tensor(b!)[] v_caches, int tower, int[] slots, int[] starts, int[] lengths, int[] dims, float eps, "
      "bool post_norm) -> Tensor");
}

TORCH_LIBRARY_IMPL(olmo_tap, CPU, m) { m.impl("layers", &layers); }
