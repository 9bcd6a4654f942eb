"""One tower's decode step (trunk, one head, final norm, lm_head) compiled to native code: opt-in.

Why: an eager decode step of the embedded default issues ~1,500 small operator calls, whose dispatch costs
30-60% on top of the step's linear layers on a 2-core CPU. TorchInductor fuses everything between two linear
layers into a few native loops, and with freezing it prepacks the weights, so a compiled step costs little
more than its linear layers. The price: a one-off compile (about a minute on 2 cores; the native code is
cached on disk, the constant folding is not) and two copies of one tower's linear weights: (out, in) and
packed.

Shapes are static so one compile serves a whole generation: one token, batch 1, and a KV window of fixed
length (a power of two) in which attention masks the positions past the current one. The window holds its
own copy of the tower's keys and values: ``load_cache`` copies the prompt from the Hydra's caches, which the
compiled steps then no longer update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from olmo_tap.model import kernels, native_attention
from olmo_tap.model.layers import apply_rope, residual_layer, rms_norm, rope_for_positions
from olmo_tap.quant import native
from olmo_tap.quant.linear import quant_kernel, quant_route, step_product
from olmo_tap.quant.weights import QuantizedStack, dequantize_codes, weight_rows

if TYPE_CHECKING:
    from olmo_tap.hydra import HydraTransformer
    from olmo_tap.model.kv_cache import HydraCache

MIN_WINDOW = 256
# Dynamo counts compiles per code object (``_TowerStep.forward``), not per tower: a process that builds towers for
# several models, windows or draft heads (PoE's draft head follows the seed; the test suite) passes its default
# limit of 8, a hard failure under ``fullgraph``. Each tower compiles once, so its calls run with a higher limit.
RECOMPILE_LIMIT = 256


def window_for(length: int, context: int) -> int:
    """The KV window for ``length`` positions: a power of two (few distinct compiles), at most ``context``."""
    if not 1 <= length <= context:
        raise ValueError(f"a compiled step needs between 1 and {context} positions, got {length}")
    window = MIN_WINDOW
    while window < length:
        window *= 2
    return min(window, context)


@contextlib.contextmanager
def _inductor_packing(dtype: torch.dtype) -> Iterator[None]:
    """Make Inductor's weight-packing pass follow the eager kernel choice (``olmo_tap.model.kernels``) while it
    compiles a step of ``dtype`` weights.

    Where oneDNN takes ``dtype``: Inductor packs fp32 weights for MKL on x86 unless oneDNN is known to take them
    (its test: an Arm build with ACL); on SmolLM2's shapes, oneDNN's packed matrix-vector products ran 5-18%
    faster (4 runs, 2-core EPYC), so it is told oneDNN takes them. Where oneDNN does not take ``dtype`` (a CPU
    without its bf16 instructions, or the stock path forced): Inductor is told this CPU has no oneDNN bf16, which
    is what it finds by itself on such a CPU, so a forced run compiles what that CPU would; fp32 keeps Inductor's
    MKL packing (MKL runs on every x86 CPU). The answers are scoped to Inductor's packing pass; without that
    pass's hooks (another torch), its own choice stays, which is equally correct.
    """
    try:
        from torch._inductor.fx_passes import mkldnn_fusion
    except ImportError:
        yield
        return
    onednn = kernels.onednn_refusal(dtype) is None
    original = getattr(mkldnn_fusion, "mkldnn", None)
    original_bf16 = getattr(mkldnn_fusion, "is_mkldnn_bf16_supported", None)
    patch_fp32 = onednn and original is not None and hasattr(original, "_is_mkldnn_acl_supported")
    patch_bf16 = not onednn and original_bf16 is not None

    class _OneDNNTakesFp32:
        def __getattr__(self, name: str) -> object:
            if name == "_is_mkldnn_acl_supported":
                return lambda: True
            return getattr(original, name)

    def _no_cpu_bf16(device_type: str) -> bool:
        return False if device_type == "cpu" else bool(original_bf16(device_type))  # type: ignore[misc]

    if patch_fp32:
        mkldnn_fusion.mkldnn = _OneDNNTakesFp32()
    if patch_bf16:
        mkldnn_fusion.is_mkldnn_bf16_supported = _no_cpu_bf16
    try:
        yield
    finally:
        if patch_fp32:
            mkldnn_fusion.mkldnn = original
        if patch_bf16:
            mkldnn_fusion.is_mkldnn_bf16_supported = original_bf16


class _TowerStep(nn.Module):
    """The step as a module of the tower's weights (Inductor freezes module parameters into constants): the
    norms and embedding are views of the Hydra's; the linear weights are (out, in) copies, because
    ``F.linear`` on a contiguous (out, in) constant is the pattern Inductor prepacks."""

    def __init__(self, model: HydraTransformer, head: int, window: int) -> None:
        super().__init__()
        c = self.config = model.base_config
        self.olmo2 = c.family == "olmo2"
        self.window = window

        def frozen(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.detach(), requires_grad=False)

        # A quantized model's step reads the codes: its products are the native kernel's ops or the fused
        # dequantizing reductions traced into the step's graph (``olmo_tap.quant.linear.step_product``); the codes
        # stay codes (graph constants where every product is the native op, see ``_freezable``), never floats.
        self.quantized = model.quantization is not None
        self.trunk_layers = len(model.trunk)
        self.layers = nn.ModuleList()
        for block, t in model.tower_blocks(head):
            layer = nn.Module()
            for name in ("wqkv", "wo", "w13", "w2"):
                if self.quantized:
                    _register_quantized(layer, name, block._packed[name].quantized[t])
                else:
                    setattr(layer, name, frozen(getattr(block, name)[t].t().contiguous()))
            norms = ("attn_norm", "ffn_norm") + (("q_norm", "k_norm") if self.olmo2 else ())
            for name in norms:
                setattr(layer, name, frozen(getattr(block, name).weight[t]))
            # the Hydra's cache dtype, so attention rounds as in eager decoding
            layer.register_buffer("k", torch.zeros(c.n_kv_heads, window, c.head_dim, dtype=model.cache_dtype))
            layer.register_buffer("v", torch.zeros(c.n_kv_heads, window, c.head_dim, dtype=model.cache_dtype))
            self.layers.append(layer)
        self.norm = frozen(model.norm.weight)
        if self.quantized:
            _register_quantized(self, "embed", QuantizedStack([model.quantized_embed]))
            _register_quantized(self, "lm_head", model._packed_lm_head.quantized[0])
        else:
            self.embed = frozen(model.embed.weight)
            self.lm_head = frozen(model.lm_head.t().contiguous())
        cos, sin = rope_for_positions(*model.rope_upto(window), c, slice(0, window), model.dtype)
        self.register_buffer("cos", cos)  # (q_heads + kv_heads, window, head_dim), q rows pre-scaled
        self.register_buffer("sin", sin)
        self.register_buffer("slots", torch.arange(window, device=model.device))
        # The native attention op where eager decoding takes it (fp32 on CPU; chosen when the step is built):
        # Inductor's loops over the whole window, masked, took ~100 us a layer on an AVX2 CPU, ~30% of a quantized
        # step. Compiled steps are never replayed exactly (their rounding is the compiler's), so the route they
        # took is not recorded.
        self.native_attention = native_attention.route_for(model) == "native"

    def forward(self, token: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """token, position: (1,) int64 -> logits (1, vocab) and the trunk's output (1, d_model): the state PoE's
        verifiers take."""
        c = self.config
        if self.quantized:
            scheme, codes, scale, minimum, _ = _quantized_parts(self, "embed")[0]
            rows = [None if t is None else weight_rows(t, token) for t in (codes, scale, minimum)]
            x = dequantize_codes(scheme, *rows)
            x = x.to(self.norm.dtype)
        else:
            x = F.embedding(token, self.embed)
        cos, sin = self.cos[:, position], self.sin[:, position]  # (q_heads + kv_heads, 1, head_dim)
        hidden_mask = self.slots > position  # keys not yet written, or stale
        trunk_state = x
        for i, layer in enumerate(self.layers):
            if i == self.trunk_layers:
                trunk_state = x
            x = residual_layer(
                x,
                lambda h, layer=layer: self._attention(layer, h, position, cos, sin, hidden_mask),
                lambda h, layer=layer: _linear(layer, "w2", _swiglu(_linear(layer, "w13", h))),
                lambda h, layer=layer: rms_norm(h, layer.attn_norm, c.norm_eps, self.olmo2),
                lambda h, layer=layer: rms_norm(h, layer.ffn_norm, c.norm_eps, self.olmo2),
                post_norm=self.olmo2,
            )
        return _linear(self, "lm_head", rms_norm(x, self.norm, c.norm_eps, self.olmo2)), trunk_state

    def _attention(
        self,
        layer: nn.Module,
        x: torch.Tensor,
        position: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        hidden_mask: torch.Tensor,
    ) -> torch.Tensor:
        c = self.config
        qkv = _linear(layer, "wqkv", x)
        if self.olmo2:
            q, k, v = qkv.split((c.q_dim, c.kv_dim, c.kv_dim), dim=-1)
            qkv = torch.cat(
                (rms_norm(q, layer.q_norm, c.norm_eps, True), rms_norm(k, layer.k_norm, c.norm_eps, True), v), dim=-1
            )
        heads = qkv.view(c.n_heads + 2 * c.n_kv_heads, 1, c.head_dim)
        qk = apply_rope(heads[: c.n_heads + c.n_kv_heads], cos, sin)
        q, k, v = qk[: c.n_heads], qk[c.n_heads :], heads[c.n_heads + c.n_kv_heads :]
        if self.native_attention:  # eager decoding's attention, over the keys up to the position only
            out = native_attention.attend_window(qk, v, layer.k, layer.v, position, c.n_heads)
            return _linear(layer, "wo", out.to(x.dtype))
        layer.k.index_copy_(1, position, k.to(layer.k.dtype))
        layer.v.index_copy_(1, position, v.to(layer.v.dtype))
        # Attention as broadcast products and sums: Inductor fuses them into native loops (bmm calls would not be)
        group = c.n_heads // c.n_kv_heads
        q = q.to(layer.k.dtype).view(c.n_kv_heads, group, 1, c.head_dim)
        scores = (q * layer.k.unsqueeze(1)).sum(-1).masked_fill(hidden_mask, float("-inf"))  # (kv, group, window)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(layer.v.dtype)
        out = (probs.unsqueeze(-1) * layer.v.unsqueeze(1)).sum(-2)  # (kv, group, head_dim)
        return _linear(layer, "wo", out.reshape(1, c.q_dim).to(x.dtype))


def _register_quantized(module: nn.Module, name: str, stack: QuantizedStack) -> None:
    """Buffers ``{name}.{i}.codes|scale|minimum`` for each part of ``stack``, and the parts' schemes and rows."""
    schemes = []
    for i, part in enumerate(stack.parts):
        module.register_buffer(f"{name}_{i}_codes", part.codes)
        module.register_buffer(f"{name}_{i}_scale", part.scale)
        module.register_buffer(f"{name}_{i}_minimum", part.minimum)
        schemes.append((part.scheme, part.out_features))
    setattr(module, f"{name}_schemes", tuple(schemes))


QuantizedPart = tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None, int]  # scheme, tensors, output rows


def _quantized_parts(module: nn.Module, name: str) -> list[QuantizedPart]:
    return [
        (
            scheme,
            getattr(module, f"{name}_{i}_codes"),
            getattr(module, f"{name}_{i}_scale"),
            getattr(module, f"{name}_{i}_minimum"),
            out,
        )
        for i, (scheme, out) in enumerate(getattr(module, f"{name}_schemes"))
    ]


def _linear(module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """x (1, in) times weight ``name`` of ``module``: a float (out, in) constant, or a quantized one's parts."""
    if not hasattr(module, f"{name}_schemes"):
        return F.linear(x, getattr(module, name))
    outs = [
        step_product(x, scheme, codes, scale, minimum, out).to(x.dtype)
        for scheme, codes, scale, minimum, out in _quantized_parts(module, name)
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class CompiledTower:
    """A compiled decode step for tower ``head`` of ``model`` with a KV window of ``window`` positions.

    Build one with ``HydraTransformer.compiled_tower``, which keeps it for reuse while the weights are unchanged.
    The first ``step`` compiles (about a minute on 2 CPU cores).
    """

    def __init__(self, model: HydraTransformer, head: int, window: int) -> None:
        if model.base_config.max_seq_len < window:
            raise ValueError(f"window {window} exceeds the model's context of {model.base_config.max_seq_len}")
        self.model = model
        self.head = head
        self.window = window
        self.weight_versions = _weight_versions(model)
        self.kernel_epoch = kernels.epoch()
        self.module = _TowerStep(model, head, window)
        # The quantized products' route the graph is traced with (None: float weights): a forced route afterwards
        # makes the tower stale (``is_current``), and its calls check their guards again (``draft_step``).
        self.quant_kernel = _requested_route(self.module.quantized)
        self._run = torch.compile(self.module, fullgraph=True, dynamic=False)
        self.compiled = False
        self._position = torch.zeros(1, dtype=torch.long, device=model.device)
        self._token = torch.zeros(1, dtype=torch.long, device=model.device)

    def is_current(self) -> bool:
        """Whether the model's weights, and the kernel choice, are still the ones this step was built with."""
        return (
            self.weight_versions == _weight_versions(self.model)
            and self.kernel_epoch == kernels.epoch()
            and self._same_route()
        )

    def _same_route(self) -> bool:
        """Whether the quantized products' route is still the one the graph was traced with."""
        return self.quant_kernel == _requested_route(self.module.quantized)

    @torch.no_grad()
    def load_cache(self, cache: HydraCache, slot: int, length: int) -> None:
        """Copy this tower's keys and values of positions [0, length) of ``cache``'s ``slot`` into the window."""
        if not 0 <= length < self.window:
            raise ValueError(f"{length} cached positions leave no room in the compiled window of {self.window}")
        held = min(cache.trunk_lengths[slot], cache.head_lengths[slot][self.head])
        if held < length:
            raise ValueError(f"slot {slot} holds {held} positions of head {self.head}, fewer than {length}")
        sources = [(layer, 0) for layer in cache.trunk] + [(layer, self.head) for layer in cache.heads]
        for window_layer, (layer, tower) in zip(self.module.layers, sources, strict=True):
            window_layer.k[:, :length].copy_(layer.k[slot, tower, :, :length])
            window_layer.v[:, :length].copy_(layer.v[slot, tower, :, :length])

    def step(self, token: int, position: int) -> torch.Tensor:
        """Logits (vocab,) for ``token`` at ``position``; its keys and values are written into the window."""
        return self.draft_step(token, position)[0]

    @torch.no_grad()
    def draft_step(self, token: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``step``, with the trunk's output (d_model,) at ``position``: a PoE draft step's result."""
        if not 0 <= position < self.window:
            raise ValueError(f"position {position} is outside the compiled window of {self.window}")
        self._token.fill_(token)
        self._position.fill_(position)
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            if self.compiled:
                # Dynamo's guards check ~490 tensors (a quantized tower's codes and windows) before each step: 0.2-0.7
                # ms of a 10 ms quantized step. They are skipped while what they protect is known to hold: the inputs
                # are this tower's own two tensors, its module and weights do not change without ``is_current``
                # failing, and the one global the trace reads (the quantized route) is checked here; towers sharing
                # the compiled code are told apart by the guards that differ between them, which still run. The
                # stance is process-wide for the ~10 ms of the call: a torch.compile'd function another thread
                # enters meanwhile skips its guards too. olmo-tap compiles only in the decoding thread (the
                # service never compiles); a program that compiles its own functions on other threads should
                # not decode with compile=True at the same time.
                with torch.compiler.set_stance(skip_guard_eval_unsafe=self._same_route()):
                    logits, trunk_state = self._run(self._token, self._position)
                return logits[0], trunk_state[0]
            settings = _compile_settings(self.model.device, frozen=_freezable(self.model, self.module.quantized))
            with _inductor_packing(self.model.dtype), torch._inductor.config.patch(settings):
                logits, trunk_state = self._run(self._token, self._position)  # compiles
        self.compiled = True
        return logits[0], trunk_state[0]


def _compile_settings(device: torch.device, frozen: bool = True) -> dict[str, object]:
    """Inductor settings for the compile: freezing (weights become constants, so they can be prepacked) and, on
    CPU, a C++ wrapper (no Python between the kernels)."""
    return {"freezing": frozen, "cpp_wrapper": device.type == "cpu"}


def _freezable(model: HydraTransformer, quantized: bool) -> bool:
    """Whether the step compiles with its weights as constants: float weights, and quantized codes that every
    product hands to the native op (constants then need no marshalling into each call: ~5% of a quantized step,
    same bits). Not codes that a product dequantizes in the step's own loops (the fused route): freezing would
    fold them into float weights, four to eight times their size."""
    if not quantized:
        return True
    c = model.base_config
    return quant_route() == "native" and all(native.supports(n) for n in (c.d_model, c.q_dim, c.ffn_hidden))


def _requested_route(quantized: bool) -> str | None:
    return quant_kernel() if quantized else None


def _weight_versions(model: HydraTransformer) -> tuple[int, ...]:
    return tuple((p.data_ptr(), p._version) for p in model.parameters())
