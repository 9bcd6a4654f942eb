"""HydraTransformer: a shared trunk that fans out into N heads.

The embedding and the first ``trunk_layers`` blocks form the trunk; each of the
``n_heads`` heads owns its own copy of the last ``head_layers`` blocks; the
final RMSNorm and the lm_head are shared by every head. Head layers are stored
stacked (see ``olmo_tap.model.layers``), so any contiguous range of heads runs
as one batched computation.

The model holds weights only. Caches are the decoder's: a ``HydraCache`` (``olmo_tap.model.kv_cache``) is
passed in with explicit positions, as gpt-fast passes ``input_pos`` and nanochat ``kv_cache=``, so one model
serves many sequences (each in its own cache slot, at its own position) and any number of decoders.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from olmo_tap.model import kernels, native_layer
from olmo_tap.model.compiled import CompiledTower, window_for
from olmo_tap.model.config import ConfigError, TransformerConfig
from olmo_tap.model.kv_cache import CacheOverflowError, HydraCache, Rows
from olmo_tap.model.layers import (
    Block,
    PackedWeights,
    RMSNorm,
    RowTowers,
    linear,
    rope_for_positions,
    rope_tables,
)

if TYPE_CHECKING:
    from olmo_tap.quant.weights import QuantizedWeight


@dataclass(frozen=True)
class HydraTransformerConfig:
    """How a base transformer is split: ``trunk_layers`` shared, ``head_layers`` per head."""

    base_config: TransformerConfig
    n_heads: int
    trunk_layers: int
    head_layers: int

    def __post_init__(self) -> None:
        n_layers = self.base_config.n_layers
        if not isinstance(self.n_heads, int) or self.n_heads < 1:
            raise ConfigError(f"n_heads must be >= 1, got {self.n_heads!r}")
        if not isinstance(self.head_layers, int) or not 1 <= self.head_layers <= n_layers:
            raise ConfigError(
                f"heads_depth must be between 1 and the model's {n_layers} layers, got {self.head_layers!r}"
            )
        if self.trunk_layers + self.head_layers != n_layers:
            raise ConfigError(
                f"trunk_layers ({self.trunk_layers}) + head_layers ({self.head_layers}) "
                f"must equal the base model's {n_layers} layers"
            )

    @classmethod
    def split(cls, base_config: TransformerConfig, n_heads: int, heads_depth: int) -> HydraTransformerConfig:
        """Give each head the last ``heads_depth`` layers of ``base_config``."""
        if not isinstance(heads_depth, int) or not 1 <= heads_depth <= base_config.n_layers:
            raise ConfigError(
                f"heads_depth must be between 1 and the model's {base_config.n_layers} layers, got {heads_depth!r}"
            )
        return cls(base_config, n_heads, base_config.n_layers - heads_depth, heads_depth)

    @classmethod
    def from_olmo2_1B(cls, n_heads: int = 5, heads_depth: int = 3, vocab_size: int = 100352) -> HydraTransformerConfig:
        return cls.split(TransformerConfig.olmo2_1b(vocab_size), n_heads, heads_depth)

    @classmethod
    def from_olmo2_7B(cls, n_heads: int = 5, heads_depth: int = 3, vocab_size: int = 100352) -> HydraTransformerConfig:
        return cls.split(TransformerConfig.olmo2_7b(vocab_size), n_heads, heads_depth)

    @property
    def num_params(self) -> int:
        """Parameters of the built Hydra (a tied lm_head counted once)."""
        c = self.base_config
        per_layer = c.d_model * (c.q_dim + 2 * c.kv_dim) + c.q_dim * c.d_model + 3 * c.d_model * c.ffn_hidden
        per_layer += 2 * c.d_model + (c.q_dim + c.kv_dim if c.family == "olmo2" else 0)
        embeddings = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
        return embeddings + c.d_model + per_layer * (self.trunk_layers + self.n_heads * self.head_layers)

    def build(self, *, init_device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> HydraTransformer:
        with torch.device(init_device):
            model = HydraTransformer(self)
        return model.to(dtype) if dtype is not None else model

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_config": self.base_config.to_dict(),
            "n_heads": self.n_heads,
            "trunk_layers": self.trunk_layers,
            "head_layers": self.head_layers,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HydraTransformerConfig:
        return cls(
            TransformerConfig.from_dict(data["base_config"]), data["n_heads"], data["trunk_layers"], data["head_layers"]
        )


def contiguous_runs(indices: Sequence[int]) -> list[range]:
    """Split indices into maximal runs of consecutive ascending integers, in order."""
    runs: list[range] = []
    for i in indices:
        if runs and i == runs[-1].stop:
            runs[-1] = range(runs[-1].start, i + 1)
        else:
            runs.append(range(i, i + 1))
    return runs


class HydraTransformer(nn.Module):
    def __init__(self, config: HydraTransformerConfig) -> None:
        super().__init__()
        self.config = config
        c = config.base_config
        self.base_config = c
        self.n_heads = config.n_heads
        # nn.Embedding's own init (normal, std 1), skipped on the meta device: normal_ there is a Python meta kernel
        # whose first call imports torch._dynamo and sympy (~70 MB resident for the whole process).
        embed_weight = torch.empty(c.vocab_size, c.d_model)
        if embed_weight.device.type != "meta":
            nn.init.normal_(embed_weight)
        self.embed = nn.Embedding(c.vocab_size, c.d_model, _weight=embed_weight)
        self.trunk = nn.ModuleList(Block(c, 1) for _ in range(config.trunk_layers))
        self.heads = nn.ModuleList(Block(c, config.n_heads) for _ in range(config.head_layers))
        self.norm = RMSNorm((c.d_model,), c.norm_eps, c.family == "olmo2")
        # Stored (d_model, vocab) and applied as x @ w, like the block weights.
        self.lm_head = nn.Parameter(torch.empty(c.d_model, c.vocab_size))
        if self.lm_head.device.type != "meta":
            nn.init.normal_(self.lm_head, std=0.02)
        self._packed_lm_head = PackedWeights()
        self._compiled_towers: dict[int, CompiledTower] = {}
        # per part of the model (trunk, heads) and tower: the native layer op's arguments (``native_layer.NativeStack``)
        self._native_stacks: dict[str, dict[int, native_layer.NativeStack]] = {}
        cos, sin = rope_tables(c)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_signed_sin", sin, persistent=False)
        # Index of the head trained to score answers (by convention the last), if any.
        self.uncertainty_head: int | None = None
        # Set by ``olmo_tap.quant.model.quantize_model``: what the weights are ("int8", "gguf (Q4_1, Q8_0)", ...),
        # the scheme asked for, and the quantized embedding table (the float one is then released).
        self.quantization: str | None = None
        self.quantization_scheme: str | None = None
        self.quantized_embed: QuantizedWeight | None = None

    # ----- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        source: str | Any,
        n_heads: int | None = None,
        heads_depth: int | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        progress: bool = True,
        quantize: str | None = None,
    ) -> HydraTransformer:
        """Load a preset name, HF checkpoint directory, hub id, GGUF file or saved ensemble; ``quantize``:
        ``int8``, ``int4`` or ``gguf`` (a GGUF source's own blocks), see ``olmo_tap.quant.model``."""
        from olmo_tap.weights.loading import load_hydra

        return load_hydra(
            source,
            n_heads=n_heads,
            heads_depth=heads_depth,
            dtype=dtype,
            device=device,
            progress=progress,
            quantize=quantize,
        )

    @staticmethod
    def load_olmo_state(
        model: HydraTransformer, olmo_state: dict[str, torch.Tensor], trunk_layers: int, vocab_size: int
    ) -> None:
        """Load a flat OLMo-core state dict, cloning the head layers into every head."""
        from olmo_tap.weights.layout import load_base_state
        from olmo_tap.weights.olmo_core import olmo_core_to_hf

        if trunk_layers != model.config.trunk_layers or vocab_size != model.base_config.vocab_size:
            raise ConfigError(
                f"model has trunk_layers={model.config.trunk_layers}, vocab={model.base_config.vocab_size}; "
                f"got trunk_layers={trunk_layers}, vocab_size={vocab_size}"
            )
        load_base_state(model, olmo_core_to_hf(olmo_state))

    def reset_rope(self) -> None:
        """Recompute the rotary tables (after materialising a model built on the meta device)."""
        cos, sin = rope_tables(self.base_config, self.device)
        self.rope_cos, self.rope_signed_sin = cos, sin

    def rope_upto(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables (cos, signed sin), covering at least positions [0, end): grown where they do not yet
        (to twice their length, or ``end``, at most the context), each position's row the same bits as before."""
        held = self.rope_cos.size(0)
        if end > held:
            self._check_context(end)
            cos, sin = rope_tables(self.base_config, self.device, max(end, 2 * held))
            # in the tables' dtype: a module cast (``model.to(torch.bfloat16)``) casts them too, and a position's
            # row must keep its bits whether or not the tables grew (an audit replays a shorter run)
            self.rope_cos, self.rope_signed_sin = cos.to(self.rope_cos.dtype), sin.to(self.rope_cos.dtype)
        return self.rope_cos, self.rope_signed_sin

    @torch.no_grad()
    def prepack(self) -> HydraTransformer:
        """Build the oneDNN-prepacked copies of every linear weight now (on CPU), rather than inside
        the first forward pass; a no-op where packing does not apply. Returns the model."""
        weights = [(getattr(block, name), packed) for block in self._blocks() for name, packed in block._packed.items()]
        weights.append((self.lm_head.unsqueeze(0), self._packed_lm_head))
        for weight, packed in weights:
            packed.get(weight)
        return self

    def compiled_tower(self, head: int, positions: int) -> CompiledTower:
        """A compiled decode step for ``head``'s tower with room for ``positions`` positions (see
        ``olmo_tap.model.compiled``); kept and reused until the weights change or more room is needed."""
        self._check_heads([head])
        window = window_for(positions, self.base_config.max_seq_len)
        tower = self._compiled_towers.get(head)
        if tower is None or tower.window < window or not tower.is_current():
            self._compiled_towers.pop(head, None)  # release the old packs before building new ones
            tower = self._compiled_towers[head] = CompiledTower(self, head, window)
        return tower

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device  # never quantized away, unlike the lm_head

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the weights', unless quantized)."""
        return self.norm.weight.dtype

    def require_float_weights(self, what: str) -> None:
        """Refuse ``what`` on a quantized model, whose float weights were released."""
        if self.quantization is not None:
            raise ValueError(
                f"{what} needs the float weights; this model is quantized ({self.quantization}): load it "
                "without --quantize"
            )

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings of ``ids`` (any shape) -> (*ids.shape, d_model)."""
        if self.quantized_embed is None:
            return self.embed(ids)
        rows = self.quantized_embed.dequantize(self.dtype, rows=ids.reshape(-1))
        return rows.view(*ids.shape, rows.size(-1))

    def tower_tensors(self, head: int) -> list[torch.Tensor]:
        """Every tensor that defines head ``head``'s layers (the quantized codes where the model is quantized)."""
        return [t for block in self.heads for t in block.tower_tensors(head)]  # type: ignore[attr-defined]

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the model computes with, by name: its state dict without released (meta) entries, plus the
        quantized codes, scales and minimums of a quantized model."""
        named = {name: t for name, t in self.state_dict().items() if t.device.type != "meta"}
        if self.quantization is not None:
            for prefix, module in self.named_modules():
                for key, packed in getattr(module, "_packed", {}).items():
                    for tower, stack in enumerate(packed.quantized or []):
                        for i, t in enumerate(stack.tensors()):
                            named[f"{prefix}.{key}.quantized.{tower}.{i}"] = t
            for i, t in enumerate(self._packed_lm_head.quantized[0].tensors()):  # type: ignore[index]
                named[f"lm_head.quantized.{i}"] = t
            for i, t in enumerate(self.quantized_embed.tensors()):  # type: ignore[union-attr]
                named[f"embed.quantized.{i}"] = t
        return named

    @property
    def cache_dtype(self) -> torch.dtype:
        """Dtype of cached keys and values: fp32 on CPU (CPU matmuls on small bf16 attention tensors are ~5x
        slower than fp32 ones), the weights' dtype elsewhere."""
        return torch.float32 if self.device.type == "cpu" else self.dtype

    def tower_blocks(self, head: int) -> list[tuple[Block, int]]:
        """(block, tower index within it) of every layer one token of ``head`` goes through: trunk, then head."""
        return [(block, 0) for block in self.trunk] + [(block, head) for block in self.heads]

    @property
    def n_text_heads(self) -> int:
        """Heads that write text: all but the uncertainty head (which, when present, is the last)."""
        return self.n_heads - (1 if self.uncertainty_head is not None else 0)

    def identical_heads(self, heads: Iterable[int] | None = None) -> bool:
        """True when two of ``heads`` (default: all) have bit-identical weights: clones judge nothing apart."""
        heads = sorted(range(self.n_heads) if heads is None else heads)
        same = self._identical_pairs()
        return any((a, b) in same for i, a in enumerate(heads) for b in heads[i + 1 :])

    def _identical_pairs(self) -> frozenset[tuple[int, int]]:
        """Every pair (a < b) of heads with bit-identical weights, compared once per weight version: the service
        builds a decoder per request, and its event loop must not compare weights (nor run torch's parallel
        loops, see ``olmo_tap.serve.cli.on_passing_thread``) while the worker decodes."""
        stacks = [p for block in self.heads for p in block.parameters()]
        key = (tuple((p.data_ptr(), p._version) for p in stacks), self.quantization)
        cached = getattr(self, "_identical_pairs_cache", None)
        if cached is None or cached[0] != key:
            tensors = [self.tower_tensors(h) for h in range(self.n_heads)]
            pairs = frozenset(
                (a, b)
                for a in range(self.n_heads)
                for b in range(a + 1, self.n_heads)
                if all(torch.equal(x, y) for x, y in zip(tensors[a], tensors[b], strict=True))
            )
            self._identical_pairs_cache = cached = (key, pairs)
        return cached[1]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, slots: int, max_len: int) -> HydraCache:
        """An empty cache for ``slots`` sequences of up to ``max_len`` positions, owned by the caller."""
        return HydraCache(self, slots, max_len)

    def _blocks(self) -> Iterator[Block]:
        yield from self.trunk  # type: ignore[misc]
        yield from self.heads  # type: ignore[misc]

    # ----- forward passes -------------------------------------------------------------------------------------

    def forward_trunk(
        self, input_ids: torch.Tensor, start_pos: int = 0, cache: HydraCache | None = None
    ) -> torch.Tensor:
        """Embed ``input_ids`` (batch, seq) at positions [start_pos, start_pos + seq) and run the trunk: hidden
        states (batch, seq, d_model). With ``cache``, row i is slot i's and its keys and values are kept there."""
        self._check_ids(input_ids)
        batch, seq = input_ids.shape
        rows = Rows.uniform(batch, start_pos, seq)
        return self.trunk_rows(input_ids.reshape(-1), rows, cache).view(batch, seq, -1)

    def trunk_rows(self, ids: torch.Tensor, rows: Rows, cache: HydraCache | None = None) -> torch.Tensor:
        """The trunk on a flattened batch: ``ids`` (tokens,) laid out as ``rows`` says -> (tokens, d_model).

        ``ids`` may live on any device: ids on the CPU are range-checked on the host and then moved, so a
        decoder feeding one token per step to a GPU model waits for no device round trip in the check.
        """
        self._check_ids(ids.view(1, -1))
        return self.trunk_embedded(self.embed_ids(ids.to(self.device)), rows, cache)

    def trunk_embedded(self, x: torch.Tensor, rows: Rows, cache: HydraCache | None = None) -> torch.Tensor:
        """The trunk on input embeddings ``x`` (tokens, d_model) laid out as ``rows`` -> (tokens, d_model).
        Differentiable in ``x`` when grad is enabled (an attack's gradient reaches the input tokens this way)."""
        self._check_rows(rows, x.size(0), cache)
        if cache is not None:
            cache.claim_trunk(rows)
        x = x.unsqueeze(0)
        rope = self._rope(rows, cache is not None)
        with kernels.one_pass():
            out = self._native_pass(self.trunk, slice(0, 1), x, rows, rope, cache, "trunk")
            if out is not None:
                return out[0]
            for i, block in enumerate(self.trunk):
                layer = None if cache is None else cache.trunk[i]
                x = block.forward(x, slice(0, 1), rows, rope, layer)  # .forward: skip nn.Module hook dispatch
        return x[0]

    def heads_rows(
        self,
        hidden: torch.Tensor,
        heads: range,
        rows: Rows,
        cache: HydraCache | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The contiguous ``heads`` on flattened trunk states ``hidden`` (tokens, d_model) laid out as ``rows``:
        pre-norm hidden states (len(heads), tokens, d_model). With ``cache``, heads must be text heads."""
        if cache is not None:
            self._check_rows(rows, hidden.size(0), cache)
            cache.claim_heads(rows, heads)
        if residual is not None:
            # The uncertainty path injects a witness hidden state into every head's input stream.
            hidden = hidden + residual.to(hidden.dtype)
        x = hidden.unsqueeze(0).expand(len(heads), *hidden.shape)
        sel = slice(heads.start, heads.stop)
        rope = self._rope(rows, cache is not None)
        with kernels.one_pass():
            out = self._native_pass(self.heads, sel, x, rows, rope, cache, "heads")
            if out is not None:
                return out
            for i, block in enumerate(self.heads):
                x = block.forward(x, sel, rows, rope, None if cache is None else cache.heads[i])
        return x

    def heads_rows_each(
        self, hidden: torch.Tensor, towers: Sequence[int], rows: Rows, cache: HydraCache
    ) -> torch.Tensor:
        """Each row of ``hidden`` (tokens, d_model), laid out as ``rows``, through its own text head ``towers[i]``,
        rows sharing a head next to each other: pre-norm hidden states (tokens, d_model). One pass for all the
        heads (``RowTowers``); each row gets the bits a pass of its head alone gives it."""
        if len(towers) != len(rows.slots):
            raise ValueError(f"{len(towers)} heads for {len(rows.slots)} rows")
        firsts = [i for i in range(len(towers)) if i == 0 or towers[i] != towers[i - 1]]
        if len({towers[i] for i in firsts}) != len(firsts):
            raise ValueError(f"rows sharing a head must be next to each other, got heads {list(towers)}")
        if len(firsts) == 1:
            return self.heads_rows(hidden, range(towers[0], towers[0] + 1), rows, cache)[0]
        self._check_rows(rows, hidden.size(0), cache)
        bounds = [*firsts, len(towers)]
        token_bounds = [sum(rows.lengths[:i]) for i in bounds]
        groups = [Rows(rows.slots[a:b], rows.starts[a:b], rows.lengths[a:b]) for a, b in pairwise(bounds)]
        for i, group in zip(firsts, groups, strict=True):
            cache.claim_heads(group, range(towers[i], towers[i] + 1))
        token_towers = torch.tensor(
            [towers[i] for i in range(len(towers)) for _ in range(rows.lengths[i])], device=hidden.device
        )
        sel = RowTowers(
            tuple(towers[i] for i in firsts),
            tuple(slice(a, b) for a, b in pairwise(token_bounds)),
            tuple(groups),
            token_towers,
        )
        rope = self._rope(rows, True)
        x = hidden.unsqueeze(0)
        with kernels.one_pass():
            out = self._native_pass(self.heads, sel, x, rows, rope, cache, "heads")
            if out is not None:
                return out[0]
            for i, block in enumerate(self.heads):
                x = block.forward(x, sel, rows, rope, cache.heads[i])
        return x[0]

    def forward_heads(
        self,
        hidden_states: torch.Tensor,
        head_indices: Sequence[int] | None = None,
        residual: torch.Tensor | None = None,
        last_token_only: bool = False,
        start_pos: int = 0,
        cache: HydraCache | None = None,
    ) -> torch.Tensor:
        """Run the selected heads on trunk hidden states: logits (n_selected, batch, seq_out, vocab)."""
        hidden = self.head_hidden_states(hidden_states, head_indices, residual, start_pos, cache)
        return self.project(hidden, last_token_only)

    def head_hidden_states(
        self,
        hidden_states: torch.Tensor,
        head_indices: Sequence[int] | None = None,
        residual: torch.Tensor | None = None,
        start_pos: int = 0,
        cache: HydraCache | None = None,
    ) -> torch.Tensor:
        """Hidden states of the selected heads just before the shared final norm: (n_selected, batch, seq, d)."""
        indices = self._check_heads(head_indices)
        if hidden_states.ndim != 3 or hidden_states.size(-1) != self.base_config.d_model:
            raise ValueError(
                f"hidden_states must be (batch, seq, {self.base_config.d_model}), got {tuple(hidden_states.shape)}"
            )
        batch, seq, d = hidden_states.shape
        rows = Rows.uniform(batch, start_pos, seq)
        flat = hidden_states.reshape(batch * seq, d)
        flat_residual = None if residual is None else residual.reshape(batch * seq, d)
        outputs = [self.heads_rows(flat, run, rows, cache, flat_residual) for run in contiguous_runs(indices)]
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
        return out.view(len(indices), batch, seq, d)

    def project(self, hidden: torch.Tensor, last_token_only: bool = False) -> torch.Tensor:
        """Shared final norm and lm_head: (..., seq, d_model) -> (..., seq_out, vocab) logits."""
        if last_token_only:
            hidden = hidden[..., -1:, :]
        normed = self.norm(hidden)
        flat = normed.reshape(1, -1, normed.size(-1))
        logits = linear(flat, self.lm_head.unsqueeze(0), slice(0, 1), self._packed_lm_head)
        return logits.view(*normed.shape[:-1], logits.size(-1))

    def forward(
        self,
        input_ids: torch.Tensor,
        residual: torch.Tensor | None = None,
        head_indices: Sequence[int] | None = None,
        last_token_only: bool = False,
        start_pos: int = 0,
        cache: HydraCache | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Trunk then heads: logits (n_selected, batch, seq_out, vocab); seq_out is 1 with ``last_token_only``.
        Without ``cache`` the whole input is computed afresh; with it, row i is cache slot i."""
        self._reject_unknown(kwargs)
        hidden = self.forward_trunk(input_ids, start_pos, cache)
        return self.forward_heads(hidden, head_indices, residual, last_token_only, start_pos, cache)

    def residual_forward(
        self,
        input_ids: torch.Tensor,
        hidden_head_indices: Sequence[int],
        head_indices: Sequence[int] | None = None,
        last_token_only: bool = False,
        start_pos: int = 0,
        cache: HydraCache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like ``forward`` and also return the pre-norm hidden states (n_hidden, batch, seq, d_model)
        of ``hidden_head_indices``, which must all be among ``head_indices``."""
        self._reject_unknown(kwargs)
        indices = self._check_heads(head_indices)
        wanted = list(hidden_head_indices)
        missing = [h for h in wanted if h not in indices]
        if not wanted or missing:
            raise ValueError(f"hidden_head_indices {wanted} must be a non-empty subset of head_indices {indices}")
        hidden = self.forward_trunk(input_ids, start_pos, cache)
        head_hidden = self.head_hidden_states(hidden, indices, None, start_pos, cache)
        logits = self.project(head_hidden, last_token_only)
        return logits, head_hidden[[indices.index(h) for h in wanted]]

    # ----- validation and helpers -----------------------------------------------------------------------------

    def _native_pass(
        self,
        blocks: nn.ModuleList,
        sel: slice | RowTowers,
        x: torch.Tensor,
        rows: Rows,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: HydraCache | None,
        part: str,
    ) -> torch.Tensor | None:
        """The pass of ``blocks`` (the trunk's or the heads') as one native op per tower where every kernel is
        native (``olmo_tap.model.native_layer``), else None: then the layers run one by one."""
        if cache is None or not blocks:
            return None
        caches = cache.trunk if part == "trunk" else cache.heads
        routes = native_layer.pass_routes(x, sel, rows, caches[0])
        if routes is None:
            return None
        stacks = self._native_stacks.setdefault(part, {})
        return native_layer.forward(list(blocks), sel, x, rows, rope, caches, routes, stacks)  # type: ignore[arg-type]

    def _rope(self, rows: Rows, cached: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables of the rows' positions, built once per forward rather than per layer: (heads, seq,
        head_dim) for an uncached uniform block (broadcast over its rows), else (heads, tokens, head_dim)."""
        c = self.base_config
        end = max(start + n for start, n in zip(rows.starts, rows.lengths, strict=True))
        cos, sin = self.rope_upto(end)
        if rows.is_uniform and (not cached or len(rows.starts) == 1):
            start = rows.starts[0]
            return rope_for_positions(cos, sin, c, slice(start, start + rows.lengths[0]), self.dtype)
        index = torch.tensor(rows.positions(), device=cos.device)
        return rope_for_positions(cos, sin, c, index, self.dtype)

    def _check_rows(self, rows: Rows, tokens: int, cache: HydraCache | None) -> None:
        if rows.tokens != tokens or min(rows.lengths) < 1:
            raise ValueError(f"rows {rows} do not describe {tokens} tokens")
        if cache is None:
            if not rows.is_uniform:
                raise ValueError("without a cache the rows must be one (batch, seq) block")
            if rows.starts[0] < 0:
                raise ValueError(f"start_pos must be >= 0, got {rows.starts[0]}")
        self._check_context(max(start + n for start, n in zip(rows.starts, rows.lengths, strict=True)))

    def _check_context(self, end: int) -> None:
        if end > self.base_config.max_seq_len:
            raise CacheOverflowError(f"{end} positions exceed the model's context of {self.base_config.max_seq_len}")

    def _check_heads(self, head_indices: Sequence[int] | None) -> list[int]:
        if head_indices is None:
            return list(range(self.n_heads))
        indices = [int(h) for h in head_indices]
        if not indices:
            raise ValueError("head_indices is empty; pass None for all heads")
        bad = [h for h in indices if not 0 <= h < self.n_heads]
        if bad:
            raise ValueError(f"head indices {bad} out of range for {self.n_heads} heads")
        if len(set(indices)) != len(indices):
            raise ValueError(f"head_indices contains duplicates: {indices}")
        return indices

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.ndim != 2
            or input_ids.dtype not in (torch.int64, torch.int32)
        ):
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor of shape (batch, seq), got {shape}")
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty")
        vocab = self.base_config.vocab_size
        outside = (input_ids < 0) | (input_ids >= vocab)
        if outside.any():  # one host sync per call; the offending id is looked up only on error
            bad = int(input_ids[outside][0])
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")

    @staticmethod
    def _reject_unknown(kwargs: dict[str, Any]) -> None:
        if kwargs:
            raise TypeError(f"unexpected keyword arguments: {sorted(kwargs)}")
