"""A pass's layers as one native op (``layer.cpp``), where every kernel of the pass is olmo-tap's own.

A cached pass of one tower over a few tokens per row (a decode step, a draft step, a verification pass) spent
~40% of an eager quantized step outside its kernels: per layer, route checks, weight picking, ~15 small
operators and ~100 us of Python, slowed further because each layer's weights stream ~2 MB through the caches
between them. Where every route is native (fp32 activations on CPU; products on the native fp32 or quantized
kernel; native norms and attention; rows of up to 16 tokens), a pass runs all its layers of a tower in one op
call: the arguments are gathered once per weight version (``NativeTower`` per layer, ``NativeStack`` per run of
layers) and the op runs the layers from C++. Measured on the 2-core Xeon, the embedded default's GGUF file, one
process alternating: an eager step 18.7 ms against 20.8 for the per-layer op and llama.cpp's 19.0.

The op calls the same kernels in the same order on the same values as the layers run one by one
(``layers.Block``) and does the rest in loops whose every element is one IEEE operation, so every output has the
bits of that path (tested for both families, fp32, int8 and int4, one tower and rows through their own). Everything
else (prompts, training, other dtypes or devices, several towers at once, forced torch routes) runs the layers
one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from olmo_tap.model import kernels, native_attention, native_linear, native_norm
from olmo_tap.model.kv_cache import LayerCache, Rows
from olmo_tap.native import NativeKernel
from olmo_tap.quant import linear as quant_linear

if TYPE_CHECKING:
    from olmo_tap.model.layers import Block, RowTowers

_KERNEL = NativeKernel(
    Path(__file__).with_name("layer.cpp"), "layer", "decode layer op", extra_cflags=("-ffp-contract=off",)
)


def pass_routes(x: torch.Tensor, sel: object, rows: Rows, cache: LayerCache | None) -> tuple | None:
    """Whether a pass of ``x`` (n_sel, tokens, d_model) can run on native towers: one tower (a slice) or each
    group of rows through its own (``layers.RowTowers``: a batch's draft steps, a verification pass), cached,
    fp32 on CPU without autograd or compiling, short rows, and the norm and attention routes native here. Then
    the routes its products ask for (a key of ``Block.native_tower``, which checks the products per block), else
    None. Decided once per pass, not per layer."""
    if cache is None or x.size(0) != 1 or (isinstance(sel, slice) and sel.stop - sel.start != 1):
        return None  # one tower, or rows each through its own (``layers.RowTowers``)
    if x.dtype is not torch.float32 or cache.k.dtype is not torch.float32 or not x.is_cpu:
        return None
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or max(rows.lengths) > native_attention.SMALL_QUERY:
        return None
    if not kernels.in_batch_arithmetic() and x.size(1) > min(quant_linear.NATIVE_MAX_ROWS.values()):
        return None  # a quantized product of this many rows dequantizes instead
    if native_attention.attention_route() != "native" or native_norm.why_not_native() is not None:
        return None
    return kernels.epoch(), native_linear.requested_route(), quant_linear.quant_kernel()


# The kinds of a product's parts, as ``layer.cpp`` reads them.
F32, INT4, INT8 = 0, 1, 2


def _quantized_parts(stack: object) -> list[tuple[int, int, list[torch.Tensor]]] | None:
    """A quantized projection's parts (kind, out rows, tensors) for the native kernel, as ``stack_product`` runs
    it; None off that route."""
    parts = stack.parts  # type: ignore[attr-defined]
    if not quant_linear.native_takes(parts[0].in_features):
        return None
    if not all(p.tiled for p in parts):
        return None  # tiled at load where the native kernel is the route; a tower never holds a tiled copy of its own
    return [
        (INT8, p.tiled_rows, [p.codes, p.scale])
        if p.scheme == "int8"
        else (INT4, p.tiled_rows, [p.codes, p.scale, p.minimum])
        for p in parts
    ]


def _float_parts(block: Block, name: str, tower: int) -> list[tuple[int, int, list[torch.Tensor]]] | None:
    """An fp32 projection's one part on the native fp32 kernel; None where its packs take another route."""
    packs = block._packed[name].get(getattr(block, name))
    if packs is None or packs.route != "native":
        return None
    return [(F32, packs.out_features, [packs.tensors[tower]])]


@dataclass(frozen=True, eq=False)  # compared by identity: a tower rebuilt is another one
class NativeTower:
    """Tower ``tower`` of a block, every product native, as ``layer.cpp``'s op takes it: the four projections'
    parts (``parts``: per projection its part count, then kind and out rows per part; ``weights``: their tensors in
    order), the norms' weights (attention, feed-forward, then OLMo-2's q and k) and the shapes."""

    tower: int
    weights: list[torch.Tensor]
    parts: list[int]
    norms: list[torch.Tensor]
    dims: list[int]  # n_heads, n_kv_heads, head_dim, q_dim, kv_dim
    eps: float
    post_norm: bool  # OLMo-2: norms after each sublayer, and QK-norm

    @classmethod
    def of(cls, block: Block, tower: int) -> NativeTower | None:
        """The native tower of ``block``, or None where one of its products takes another route or the op does not
        build here."""
        if _KERNEL.available() is not None:
            return None
        names = ("wqkv", "wo", "w13", "w2")
        weights, layout = [], []
        for name in names:
            quantized = block._packed[name].quantized
            parts = _quantized_parts(quantized[tower]) if quantized is not None else _float_parts(block, name, tower)
            if parts is None:
                return None
            layout.append(len(parts))
            for kind, out, tensors in parts:
                layout += [kind, out]
                weights += tensors
        norms = [block.attn_norm, block.ffn_norm, *((block.q_norm, block.k_norm) if block.olmo2 else ())]
        c = block.config
        return cls(
            tower,
            weights,
            layout,
            [norm.weight[tower].contiguous() for norm in norms],
            [c.n_heads, c.n_kv_heads, c.head_dim, c.q_dim, c.kv_dim],
            c.norm_eps,
            block.olmo2,
        )


@dataclass(frozen=True, eq=False)
class NativeStack:
    """The towers of consecutive layers, their arguments laid end to end as ``layer.cpp``'s op reads them."""

    towers: tuple[NativeTower, ...]
    weights: list[torch.Tensor]
    parts: list[int]
    norms: list[torch.Tensor]

    @classmethod
    def of(cls, towers: tuple[NativeTower, ...]) -> NativeStack:
        return cls(
            towers,
            [w for t in towers for w in t.weights],
            [p for t in towers for p in t.parts],
            [n for t in towers for n in t.norms],
        )

    def forward(
        self, x: torch.Tensor, rows: Rows, rope: tuple[torch.Tensor, torch.Tensor], caches: list[LayerCache]
    ) -> torch.Tensor:
        """x (tokens, d_model) through every layer -> (tokens, d_model), as their ``Block.forward`` computes it."""
        first = self.towers[0]
        return torch.ops.olmo_tap.layers(
            x, self.weights, self.parts, self.norms, *rope, [c.k for c in caches], [c.v for c in caches],
            first.tower, rows.slots, rows.starts, rows.lengths, first.dims, first.eps, first.post_norm,
        )  # fmt: skip


def forward(
    blocks: list[Block],
    sel: slice | RowTowers,
    x: torch.Tensor,
    rows: Rows,
    rope: tuple[torch.Tensor, torch.Tensor],
    caches: list[LayerCache],
    routes: tuple,
    stacks: dict[int, NativeStack],
) -> torch.Tensor | None:
    """A pass of ``blocks`` (x (1, tokens, d_model) -> (1, tokens, d_model)) as one op per tower: one tower, or
    each group of rows through its own (``RowTowers``; every op works row by row, so a group alone gets the bits
    of the whole pass), or None where a layer does not take every native route. ``stacks`` keeps each tower's
    arguments between passes (rebuilt when a layer's tower is)."""
    if isinstance(sel, slice):
        groups = [(sel.start, slice(None), rows)]
    else:
        groups = list(zip(sel.towers, sel.spans, sel.rows, strict=True))
    outs = []
    for tower, span, group in groups:
        towers = tuple(block.native_tower(tower, routes) for block in blocks)
        if any(t is None for t in towers):
            return None
        stack = stacks.get(tower)
        if stack is None or stack.towers != towers:
            stack = stacks[tower] = NativeStack.of(towers)  # type: ignore[arg-type]
        rows_in = x[0, span].contiguous()  # itself, unless a caller handed in a strided view
        outs.append(stack.forward(rows_in, group, (rope[0][:, span], rope[1][:, span]), caches))
    return (outs[0] if len(outs) == 1 else torch.cat(outs)).unsqueeze(0)


def status(model: torch.nn.Module) -> str:
    """One line for ``olmo-tap info``: whether ``model``'s cached decode passes run a layer as one native op."""
    if model.dtype != torch.float32 or model.device.type != "cpu":  # type: ignore[attr-defined]
        return "per operator (the native layer op is for fp32 on CPU)"
    if model.quantization is not None:  # type: ignore[attr-defined]
        products = None if quant_linear.native_ready() else "quantized products off the native kernel"
    else:
        products = None if native_linear.route_for(model) == "native" else "fp32 products off the native kernel"
    why = (
        products
        or (None if native_attention.attention_route() == "native" else "attention on torch's route")
        or native_norm.why_not_native()
        or _KERNEL.available()
    )
    if why is not None:
        return f"per operator ({why})"
    return "one native op a pass of a tower (decode steps, drafts, verification; prompts layer by layer)"
