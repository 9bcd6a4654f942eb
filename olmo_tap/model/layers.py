"""The transformer block, written once for a stack of parallel towers.

Every parameter carries a leading "tower" dimension ``n``: a trunk layer has
``n == 1``, a head layer stacks the same layer of all ``n_heads`` heads. Running
a contiguous range of heads is then one batched matmul per weight over a view
of the stack, with no Python loop over heads and no weight copies.

Linear weights are stored as ``(n, in, out)`` and applied as ``x @ w``: on CPU
this layout runs matrix-vector products markedly faster than ``F.linear``'s
``(out, in)`` (measured ~30% on SmolLM2's shapes), which is what decoding is.
q/k/v and gate/up are fused so one decode step issues four matmuls per layer. For
inference on CPU the weights are additionally prepacked for oneDNN (``PackedWeights``) where the CPU takes
them (``olmo_tap.model.kernels``); elsewhere the same products run as stock matmuls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from olmo_tap.model import kernels, native_attention, native_linear, native_norm
from olmo_tap.model.config import TransformerConfig
from olmo_tap.model.kv_cache import LayerCache, Rows
from olmo_tap.model.native_attention import SMALL_QUERY
from olmo_tap.model.native_layer import NativeTower
from olmo_tap.quant.linear import stack_product
from olmo_tap.quant.weights import QuantizedStack


@dataclass(frozen=True)
class RowTowers:
    """Each row of a flattened batch through one tower of a stack, all in one pass (x is (1, tokens, d_model)):
    group i, the tokens ``spans[i]`` laid out in the cache as ``rows[i]``, through tower ``towers[i]``.

    A batch's draft steps run each row through its own draft head. One pass per head repeated the whole layer's
    work for every head present (3.7 of 5 on average in a batch of 8); here only what depends on the tower
    (products, attention over its cache) runs per group, and the norms (weights gathered per token), rope and
    activations run once. Every row's arithmetic is what a pass of its tower alone gives it, bit for bit."""

    towers: tuple[int, ...]
    spans: tuple[slice, ...]
    rows: tuple[Rows, ...]
    token_towers: torch.Tensor  # (tokens,) each token's tower, to gather the norms' weights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_in_fp32: bool) -> torch.Tensor:
    """RMSNorm over the last dimension; ``weight`` is (dim,) or broadcastable per tower.

    PyTorch's fused kernel normalises in fp32 whatever the input dtype. OLMo-2 multiplies the weight
    in fp32 before rounding back (exactly what the kernel does with a weight), Llama after rounding;
    the two differ only below fp32, and each matches its reference model bit for bit. fp32 inference on CPU takes
    olmo-tap's native op instead (``olmo_tap.model.native_norm``: the same formula, one op instead of ~8).
    """
    if native_norm.takes(x, weight):
        return native_norm.rms_norm(x, weight, eps)
    if weight.ndim == 1 and (weight_in_fp32 or x.dtype == torch.float32):
        return F.rms_norm(x, (x.size(-1),), weight, eps)
    if weight_in_fp32 and x.dtype != torch.float32:
        return (weight.float() * F.rms_norm(x.float(), (x.size(-1),), None, eps)).to(x.dtype)
    return F.rms_norm(x, (x.size(-1),), None, eps) * weight


class RMSNorm(nn.Module):
    def __init__(self, shape: tuple[int, ...], eps: float, weight_in_fp32: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.eps = eps
        self.weight_in_fp32 = weight_in_fp32

    def forward(self, x: torch.Tensor, towers: slice | RowTowers | None = None) -> torch.Tensor:
        """Normalise ``x``; with ``towers``, x is (n_sel, ..., dim) and tower i uses weight[i], or each token the
        weight of its row's tower (the same product of the normalised value and the weight, element by element)."""
        weight = self.weight
        if isinstance(towers, RowTowers):
            weight = weight[towers.token_towers]  # (tokens, dim) against x (1, tokens, dim)
        elif towers is not None:
            if weight.size(0) == 1:
                weight = weight[0]  # a single tower: the fused kernel takes the weight directly
            else:
                weight = weight[towers]
                weight = weight.view(weight.size(0), *([1] * (x.ndim - 2)), weight.size(-1))
        return rms_norm(x, weight, self.eps, self.weight_in_fp32)


# Positions the rotary tables cover when a model is built; they grow (``HydraTransformer.rope_upto``) as decoding
# reaches further, up to the context. A model stating a long context (131072 positions: 134 MB of
# tables at head_dim 128; or a file stating 2^32 - 1, which asked for 34 GB and failed) allocates what it uses.
ROPE_TABLE_POSITIONS = 4096


def rope_tables(
    config: TransformerConfig, device: torch.device | str | None = None, positions: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed-sin tables (positions, head_dim) for rotate-half RoPE, in fp32; ``positions`` defaults to
    ``ROPE_TABLE_POSITIONS`` (at most the context). A position's row is the same bits whatever the table's length
    (elementwise arithmetic only).

    The sin table's first half is negated so that rotate_half(x) * sin == roll(x, half) * signed_sin. On the meta
    device (a model built before its weights are loaded) the tables are empty placeholders: arithmetic there runs
    Python meta kernels whose first use imports torch._dynamo and sympy (~70 MB resident for the process's life).
    """
    n = min(config.max_seq_len, ROPE_TABLE_POSITIONS if positions is None else positions)
    if torch.empty(0, device=device).device.type == "meta":
        return tuple(torch.empty(n, config.head_dim, device=device) for _ in range(2))  # type: ignore[return-value]
    inv_freq = 1.0 / (
        config.rope_theta
        ** (torch.arange(0, config.head_dim, 2, dtype=torch.int64, device=device).float() / config.head_dim)
    )
    positions = torch.arange(n, dtype=torch.int64, device=device).float()
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    half = config.head_dim // 2
    sin = emb.sin()
    return emb.cos(), torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


def rope_for_positions(
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    config: TransformerConfig,
    positions: slice | torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables for ``positions`` (a span, or any positions as an index tensor) shaped (q_heads + kv_heads,
    positions, head_dim), with the attention scale 1/sqrt(head_dim) folded into the query rows: rotating q and
    k then scales q for free."""
    c = config
    scale = torch.ones(c.n_heads + c.n_kv_heads, 1, 1, dtype=torch.float32, device=cos.device)
    scale[: c.n_heads] = 1.0 / math.sqrt(c.head_dim)
    return (cos[positions] * scale).to(dtype), (signed_sin[positions] * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, in three ops."""
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, dims=-1), signed_sin)


# Below this many elements per tower a weight is cache-resident and call overhead dominates:
# plain (batched) matmuls are faster than one packed call per tower.
PACK_MIN_ELEMENTS = 1 << 16


@dataclass
class Packs:
    """A weight stack's packed copies, one per tower, for the products of one route (``native`` or ``onednn``)."""

    route: str
    tensors: list[torch.Tensor]
    out_features: int
    # oneDNN only: whether a lone row must run as two to get the bits it gets among other rows (see ``linear``)
    pad_lone_row: bool = False


class PackedWeights:
    """Packed copies of a weight stack (n, in, out), one per tower, for inference on CPU: fp32 weights for
    olmo-tap's native kernel (``olmo_tap.model.native_linear``) where it builds, others (and fp32 with
    ``OLMO_TAP_LINEAR=onednn``) for oneDNN where the CPU takes them.

    Measured on a 2-core EPYC: oneDNN-prepacked weights run SmolLM2's matrix-vector products ~10% (fp32)
    and ~1.8x (bf16) faster than ``x @ w``, and 4-32-row products (verification, the lm_head of
    several heads) 3-4x faster; on a 2-core Xeon the native kernel takes 0.66-0.96x oneDNN's time for fp32
    products of 1 to 8 rows with the weights from memory (``olmo_tap.benchmarks.fp32_products``). The packs
    are rebuilt whenever the weight changes: every in-place update of a parameter bumps its version counter
    (the loaders and LoRA merge write through the parameter under no_grad, never through ``.data``).
    A replay that forces the other route packs for it too.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.current: Packs | None = None
        self._weight_key: tuple | None = None
        self._by_route: dict[str, Packs | None] = {}
        # A quantized model's weight, one fused projection per tower (``olmo_tap.quant``): used instead of the
        # float parameter, which the quantization released.
        self.quantized: list[QuantizedStack] | None = None

    def release(self) -> None:
        """Drop the float weight's packed copies (its quantized form replaces them)."""
        self.key, self.current, self._weight_key, self._by_route = None, None, None, {}

    def held(self) -> list[torch.Tensor]:
        """Every packed copy in memory (of each route a call has asked for)."""
        return [t for packs in self._by_route.values() if packs is not None for t in packs.tensors]

    def get(self, w: torch.Tensor) -> Packs | None:
        """The packs of ``w`` for the route its products take now, or None for stock matmuls; decided once per
        version of ``w`` and requested route, not on every call (this runs 121 times per decoded token)."""
        weight_key = (w._version, w.data_ptr(), w.dtype, tuple(w.shape))
        key = (*weight_key, kernels.epoch(), native_linear.requested_route())
        if key != self.key:
            if weight_key != self._weight_key:
                self._weight_key, self._by_route = weight_key, {}
            self.current = self._decide(w)
            self.key = key
        return self.current

    def _decide(self, w: torch.Tensor) -> Packs | None:
        if w.device.type != "cpu" or w[0].numel() < PACK_MIN_ELEMENTS:
            return None
        if w.dtype == torch.float32 and native_linear.takes_native():
            route = "native"
        elif kernels.onednn_refusal(w.dtype) is None:
            route = "onednn"
        else:
            return None
        if route not in self._by_route:
            self._by_route[route] = _pack(w, route)
        return self._by_route[route]


def _pack(w: torch.Tensor, route: str) -> Packs | None:
    stack = w if w.ndim == 3 else w.unsqueeze(0)
    with torch.no_grad():
        if route == "native":
            return Packs(route, [native_linear.pack(t.t()) for t in stack], w.size(-1))
        try:
            # oneDNN wants (out, in); the batch-size hint 4 serves 1 to 32 rows within ~10%
            packs = [kernels.reorder_weight(t.t().contiguous(), 4) for t in stack]
            return Packs(route, packs, w.size(-1), _lone_row_differs(packs[0], w.size(-2), w.dtype))
        except Exception as e:
            # the one-off probe passed but this weight did not: stock kernels, never a crash mid-decode
            kernels.note_failure(w.dtype, e)
            return None


def _packed_product(x: torch.Tensor, pack: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, pack, None, "none", [], "")


def _lone_row_differs(pack: torch.Tensor, n_in: int, dtype: torch.dtype) -> bool:
    """Whether oneDNN gives a row alone other bits than the same row among others: a lone row may take a
    matrix-vector kernel that sums in another order than the products of 2 or more rows (which agree with each
    other for any row count). Measured once per weight on random rows: a different kernel shows in the bits."""
    rows = torch.randn(3, n_in, generator=torch.Generator().manual_seed(0)).to(dtype)
    together = _packed_product(rows, pack)
    return any(not torch.equal(_packed_product(rows[r : r + 1], pack)[0], together[r]) for r in range(3))


def linear(
    x: torch.Tensor, w: torch.Tensor, sel: slice | RowTowers, packed: PackedWeights | None = None
) -> torch.Tensor:
    """(n_sel, T, in) @ w[sel] -> (n_sel, T, out) for a weight stack w (n, in, out).

    Inference on CPU uses oneDNN-prepacked weights (one call per tower) where the CPU takes them; training,
    other devices, other dtypes and CPUs without oneDNN support for the dtype use plain (batched) matmuls.
    """
    if isinstance(sel, RowTowers):  # x (1, tokens, in): each group through its tower, as a pass of it alone would
        groups = zip(sel.towers, sel.spans, strict=True)
        return torch.cat([linear(x[:, span], w, slice(t, t + 1), packed) for t, span in groups], dim=1)
    if packed is not None and packed.quantized is not None:
        batch = kernels.in_batch_arithmetic()
        if x.size(0) == 1:
            return stack_product(x, packed.quantized[sel.start], batch)
        return torch.stack([stack_product(x[i], packed.quantized[sel.start + i], batch) for i in range(x.size(0))])
    packs = packed.get(w) if packed is not None and not torch.is_grad_enabled() else None
    if packs is not None:
        if packs.route == "native":
            towers = packs.tensors[sel.start : sel.start + x.size(0)]
            if x.size(0) == 1:
                return native_linear.product(x[0], towers[0], packs.out_features).unsqueeze(0)
            return torch.stack([native_linear.product(x[i], t, packs.out_features) for i, t in enumerate(towers)])
        if x.size(1) == 1 and packs.pad_lone_row and kernels.in_batch_arithmetic():
            return linear(x.expand(-1, 2, -1), w, sel, packed)[:, :1]
        if x.size(0) == 1:  # oneDNN keeps leading dimensions: no select / unsqueeze around the call
            return _packed_product(x, packs.tensors[sel.start])
        return torch.stack([_packed_product(x[i], packs.tensors[sel.start + i]) for i in range(x.size(0))])
    w = w[sel]
    if w.size(0) == 1:
        return (x[0] @ w[0]).unsqueeze(0)
    return torch.bmm(x, w)


def small_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention for the last ``s`` positions of a sequence of ``key_len``, GQA without repeating keys.

    q: (..., heads, s, head_dim), already scaled; k, v: (..., kv_heads, key_len, head_dim) with the same
    leading dimensions; returns (..., heads, s, head_dim) in fp32 or v's dtype.
    """
    *lead, n_heads, s, head_dim = q.shape
    n_kv, key_len = k.size(-3), k.size(-2)
    group = n_heads // n_kv
    # Queries sharing a kv head are stacked as rows of one matrix: (rest * kv, group * s, head_dim). Plain
    # bmm over 3-D views: matmul's broadcasting would add four view/expand calls per product.
    k3, v3 = k.reshape(-1, key_len, head_dim), v.reshape(-1, key_len, head_dim)
    scores = torch.bmm(q.reshape(k3.size(0), group * s, head_dim), k3.transpose(1, 2))
    if s > 1:
        allowed = torch.ones(s, key_len, dtype=torch.bool, device=q.device).tril(diagonal=key_len - s)
        scores = scores.masked_fill(~allowed.repeat(group, 1), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if v.dtype != torch.float32:
        probs = probs.to(v.dtype)
    return torch.bmm(probs, v3).view(*lead, n_heads, s, head_dim)


def residual_layer(
    x: torch.Tensor,
    attention: Callable[[torch.Tensor], torch.Tensor],
    ffn: Callable[[torch.Tensor], torch.Tensor],
    attn_norm: Callable[[torch.Tensor], torch.Tensor],
    ffn_norm: Callable[[torch.Tensor], torch.Tensor],
    post_norm: bool,
) -> torch.Tensor:
    """A layer's two residual sublayers: OLMo-2 normalises each sublayer's output ("reordered" norm), Llama
    each sublayer's input."""
    if post_norm:
        h = x + attn_norm(attention(x))
        return h + ffn_norm(ffn(h))
    h = x + attention(attn_norm(x))
    return h + ffn(ffn_norm(h))


class Block(nn.Module):
    """One transformer layer for ``n`` parallel towers (olmo2 or llama variant)."""

    def __init__(self, config: TransformerConfig, n: int) -> None:
        super().__init__()
        c = config
        self.config = c
        self.n = n
        self.olmo2 = c.family == "olmo2"
        self.wqkv = nn.Parameter(torch.empty(n, c.d_model, c.q_dim + 2 * c.kv_dim))
        self.wo = nn.Parameter(torch.empty(n, c.q_dim, c.d_model))
        self.w13 = nn.Parameter(torch.empty(n, c.d_model, 2 * c.ffn_hidden))
        self.w2 = nn.Parameter(torch.empty(n, c.ffn_hidden, c.d_model))
        # olmo2: norms after each sublayer; llama: before.
        self.attn_norm = RMSNorm((n, c.d_model), c.norm_eps, self.olmo2)
        self.ffn_norm = RMSNorm((n, c.d_model), c.norm_eps, self.olmo2)
        if self.olmo2:
            self.q_norm = RMSNorm((n, c.q_dim), c.norm_eps, True)
            self.k_norm = RMSNorm((n, c.kv_dim), c.norm_eps, True)
        self._packed = {name: PackedWeights() for name in ("wqkv", "wo", "w13", "w2")}
        self._native_towers: dict[int, tuple[tuple, NativeTower | None]] = {}
        if self.wqkv.device.type != "meta":  # a meta build is filled by a loader; random init would be wasted
            self.reset_parameters()

    def tower_tensors(self, tower: int) -> list[torch.Tensor]:
        """The tensors that define ``tower`` of this layer: its weights (quantized codes where quantized), norms."""
        tensors = [norm.weight[tower] for norm in self.modules() if isinstance(norm, RMSNorm)]
        for name, packed in self._packed.items():
            if packed.quantized is not None:
                tensors += packed.quantized[tower].tensors()
            else:
                tensors.append(getattr(self, name)[tower])
        return tensors

    def reset_parameters(self, std: float = 0.02) -> None:
        for w in (self.wqkv, self.wo, self.w13, self.w2):
            nn.init.normal_(w, std=std)

    def forward(
        self,
        x: torch.Tensor,
        sel: slice | RowTowers,
        rows: Rows,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache | None,
    ) -> torch.Tensor:
        """x: (n_sel, tokens, d_model) for the contiguous towers ``sel``, or (1, tokens, d_model) with each row
        through its own tower (``RowTowers``, cached only): the rows of ``rows`` one after the other; ``rope``
        holds their tables (see ``HydraTransformer._rope``). Without a cache the rows must be uniform (one
        (batch, seq) block); with one, each row attends to its own slot's positions. (Where every kernel is
        native, a model's passes run their layers as one op instead: ``olmo_tap.model.native_layer``.)"""
        return residual_layer(
            x,
            lambda t: self._attention(t, sel, rows, rope, cache),
            lambda t: self._ffn(t, sel),
            lambda t: self.attn_norm(t, sel),
            lambda t: self.ffn_norm(t, sel),
            post_norm=self.olmo2,
        )

    def native_tower(self, tower: int, routes: tuple) -> NativeTower | None:
        """``tower`` of this layer as the native layer op takes it (``olmo_tap.model.native_layer``) under the pass's
        product ``routes``, or None where one of its products takes another route; built again whenever a weight
        or a route may have changed."""
        weights = [*self._parameters.values(), *[norm._parameters["weight"] for norm in self._modules.values()]]
        # ~4 us a layer: the ids catch a replaced tensor, the versions an in-place update (a loader, a LoRA merge)
        key = (
            routes,
            [w._version for w in weights],
            [*map(id, weights), *[id(p.quantized) for p in self._packed.values()]],
        )
        held = self._native_towers.get(tower)
        if held is None or held[0] != key:
            held = self._native_towers[tower] = (key, NativeTower.of(self, tower))
        return held[1]

    def _ffn(self, x: torch.Tensor, sel: slice | RowTowers) -> torch.Tensor:
        gate, up = linear(x, self.w13, sel, self._packed["w13"]).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, self.w2, sel, self._packed["w2"])

    def _attention(
        self,
        x: torch.Tensor,
        sel: slice | RowTowers,
        rows: Rows,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache | None,
    ) -> torch.Tensor:
        """x: (n, tokens, d_model) -> (n, tokens, d_model)."""
        c = self.config
        n, tokens = x.size(0), x.size(1)
        qkv = linear(x, self.wqkv, sel, self._packed["wqkv"])
        if self.olmo2:  # QK-norm over the whole projection, before the head split
            q, k, v = qkv.split((c.q_dim, c.kv_dim, c.kv_dim), dim=-1)
            qkv = torch.cat((self.q_norm(q, sel), self.k_norm(k, sel), v), dim=-1)
        if cache is None:
            b, s = len(rows.lengths), rows.lengths[0]
            # -> (n, b, heads, s, head_dim); q and k are rotated in one go
            heads = qkv.view(n, b, s, c.n_heads + 2 * c.n_kv_heads, c.head_dim).transpose(2, 3)
            out = self._attend(heads, rope)
            out = out.transpose(2, 3).reshape(n, tokens, c.q_dim)
        else:
            # Each row attends to its own slot: the same computation alone or in a batch (batch-invariant).
            heads = qkv.view(n, tokens, c.n_heads + 2 * c.n_kv_heads, c.head_dim).transpose(1, 2)
            qk = apply_rope(heads[:, : c.n_heads + c.n_kv_heads], *rope)  # also scales q
            v_new = heads[:, c.n_heads + c.n_kv_heads :]
            if isinstance(sel, RowTowers):  # each group over its own tower's cache
                groups = zip(sel.towers, sel.spans, sel.rows, strict=True)
                out = torch.cat(
                    [
                        self._cached(qk[:, :, span], v_new[:, :, span], slice(t, t + 1), r, cache)
                        for t, span, r in groups
                    ],
                    dim=1,
                )
            else:
                out = self._cached(qk, v_new, sel, rows, cache)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return linear(out, self.wo, sel, self._packed["wo"])

    def _cached(self, qk: torch.Tensor, v_new: torch.Tensor, sel: slice, rows: Rows, cache: LayerCache) -> torch.Tensor:
        """Write the rows' keys and values of towers ``sel`` into the cache and attend, each row to its own slot:
        qk (n, heads + kv_heads, tokens, hd) rotated, v_new (n, kv_heads, tokens, hd) -> (n, tokens, q_dim)."""
        c = self.config
        n = qk.size(0)
        native = native_attention.takes(qk, cache.k)
        if native and max(rows.lengths) <= SMALL_QUERY:  # decode steps, verification: all rows in one op
            return native_attention.attend(
                qk, v_new, cache.k, cache.v, sel.start, rows.slots, rows.starts, rows.lengths, c.n_heads
            )
        parts, offset = [], 0
        for slot, start, length in zip(rows.slots, rows.starts, rows.lengths, strict=True):
            span = slice(offset, offset + length)
            if native and length <= SMALL_QUERY:  # a short row among long ones: the same op as in a batch
                one = (slot,), (start,), (length,)
                parts.append(native_attention.attend(qk[:, :, span], v_new[:, :, span], cache.k, cache.v,
                                                     sel.start, *one, c.n_heads))  # fmt: skip
                offset += length
                continue
            q = qk[:, : c.n_heads, span]
            k, v = cache.update(sel, slot, start, qk[:, c.n_heads :, span], v_new[:, :, span])
            if q.dtype != k.dtype:  # the cache may hold a wider dtype than the weights (see cache_dtype)
                q = q.to(k.dtype)
            parts.append(self._scores(q, k, v).transpose(1, 2).reshape(n, length, c.q_dim))
            offset += length
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _attend(self, heads: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Uncached attention of a (n, b, heads, s, head_dim) block over itself."""
        c = self.config
        qk = apply_rope(heads[:, :, : c.n_heads + c.n_kv_heads], *rope)  # also scales q
        q, k = qk.split((c.n_heads, c.n_kv_heads), dim=2)
        return self._scores(q, k, heads[:, :, c.n_heads + c.n_kv_heads :])

    def _scores(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of the last ``s`` positions: q (..., heads, s, hd), k/v (..., kv_heads, key_len, hd)."""
        c = self.config
        s, key_len = q.size(-2), k.size(-2)
        if s <= SMALL_QUERY:
            return small_query_attention(q, k, v)
        lead = q.shape[:-3]
        # query i sits at absolute position key_len - s + i and sees keys up to it
        mask = torch.ones(s, key_len, dtype=torch.bool, device=q.device).tril(diagonal=key_len - s)
        out = F.scaled_dot_product_attention(
            q.reshape(-1, c.n_heads, s, c.head_dim),
            k.reshape(-1, c.n_kv_heads, key_len, c.head_dim),
            v.reshape(-1, c.n_kv_heads, key_len, c.head_dim),
            attn_mask=mask,
            scale=1.0,
            enable_gqa=c.n_kv_heads != c.n_heads,
        )
        return out.view(*lead, c.n_heads, s, c.head_dim)
