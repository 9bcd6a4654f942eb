"""Products with quantized weights.

Three routes, chosen by measurement on the 2-core development machine (results/quant/kernels.md,
``olmo-tap experiment quant-kernels``):

- **native** (the default): olmo-tap's own kernel (``native.cpp``, built on first use for this CPU) for up to
  ``NATIVE_MAX_ROWS`` rows (a decode step, a head's verification rows): like llama.cpp, it rounds the activations
  to int8 per block of 32 and multiplies them with the codes as integers (AVX2), reading the weights in a tiled
  layout (8 output rows side by side, one per register lane; ``QuantizedWeight.tile_``) and never writing them
  out as floats;
- **fused**: the same reduction written in torch ops and compiled by TorchInductor (the route before the native
  kernel, 2-10x slower than it; kept as the fallback where the native build fails);
- **dequantize**: many rows (a prompt, a wide verification pass) dequantize the weight chunk by chunk into a
  buffer that stays in the CPU's cache and multiply each chunk at once (``dequantized_product``), which then costs
  about what the float weight's own product costs.

torch's own ``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` ran 5-10x slower than fp32 here, torchao's
int8 weight-only layer 2-30x. ``OLMO_TAP_QUANT_KERNEL=native|fused|dequantize`` forces a route (``dequantize``
needs no compiler); a route that cannot be built falls back to the next, with one warning.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable

import torch

from olmo_tap.model.kernels import Route
from olmo_tap.quant import native
from olmo_tap.quant.weights import QuantizedStack, QuantizedWeight, weight_rows

QUANT_KERNEL_ENV = "OLMO_TAP_QUANT_KERNEL"
QUANT_KERNELS = ("native", "fused", "dequantize")
# What a transcript records for the native route: the revision of its arithmetic, since a replay is exact only on
# the same one. "native" (before 2026-12-02): an int4 weight's minimum term summed in one FMA chain per row;
# "native-2": in 16 partial sums (native.cpp's int4_shifts), the same bits on every CPU path and 20-30% faster;
# "native-3" (2026-12-02): the minimum times the rounded activations' block sum (llama.cpp's Q8_1 s), not the
# exact one: the product is then the dequantized weight times the rounded activations, ~2.5x closer to the float one;
# "native-4" (2026-12-02): the tiled layout, each block's exact integer dot scaled and added in one FMA (native.cpp).
NATIVE_REVISION = "native-4"
EARLIER_NATIVE_REVISIONS = ("native", "native-2", "native-3")
RECORDED_KERNELS = (*EARLIER_NATIVE_REVISIONS, NATIVE_REVISION, "fused", "dequantize")
# Rows up to which a product takes the native kernel rather than the chunked dequantize-and-multiply, per scheme.
# The same on every CPU, so that a transcript's products take the same routes wherever it is replayed (the native
# kernel's AVX2 path and plain loops give the same bits; its int8-rounded activations do not give the float routes'
# bits, and bounds by CPU once made an AVX-512 machine's verification native where an AVX2 machine's replay was float).
# Measured in results/quant/kernels.md (2026-12-02, the tiled kernel on an AMD EPYC VM with AVX2 only, 2 threads):
# native wins at every row count up to 64, against the chunked product and fp32's own.
NATIVE_MAX_ROWS = {"int8": 64, "int4": 64}
# Rows up to which the fused reduction beats the chunked product over a whole pass, per scheme (measured in
# results/quant/kernels.md): the reduction widens every code once per row, so its cost grows with the rows, and
# int4's unpacking costs more. 5 rows: a verification pass at gamma 4.
FUSED_MAX_ROWS = {"int8": 24, "int4": 5}

_compiled: dict[str, Callable[..., torch.Tensor]] = {}
_compile_failed: str | None = None
_native_warned = False
_ROUTE = Route("quantized kernel route", QUANT_KERNEL_ENV, QUANT_KERNELS, QUANT_KERNELS)


def route_as(route: str) -> contextlib.AbstractContextManager[None]:
    """Within the block, products take ``route`` (one of ``QUANT_KERNELS``), as a transcript's replay must: the
    native kernel rounds activations to int8, the other routes multiply them in float, so their logits differ."""
    return _ROUTE.forced(route)


def quant_kernel() -> str:
    """The route asked for: a replay's forced one, else ``$OLMO_TAP_QUANT_KERNEL`` (default native)."""
    return _ROUTE.requested()


def quant_route() -> str:
    """The route this process's quantized products of a few rows take, as a transcript records it: ``native``,
    ``fused`` (the native kernel asked for but not built here, or fused forced, and Inductor compiles) or
    ``dequantize``. Builds the native kernel, or compiles the fused reduction once, to know."""
    if native_ready():
        return "native"
    if quant_kernel() != "dequantize" and _compile_failed is None:
        probe = QuantizedWeight("int8", torch.zeros(1, 32, dtype=torch.int8), torch.ones(1, 1), None, 32, "int8")
        _fused(torch.zeros(2, 32), probe)  # a failure to compile is known from here on
    return "fused" if quant_kernel() != "dequantize" and _compile_failed is None else "dequantize"


def route_for(model: torch.nn.Module) -> str:
    """The route ``model``'s quantized products of a few rows take here (``quant_route``; on other devices than
    the CPU every product dequantizes). Recorded in a quantized answer's transcript."""
    return quant_route() if model.device.type == "cpu" else "dequantize"  # type: ignore[attr-defined]


def recorded_route(route: str) -> str:
    """What a transcript records for products on ``route``: the native route's current revision, else the route."""
    return NATIVE_REVISION if route == "native" else route


def replay_route(recorded: str) -> str:
    """The route that replays a transcript recording ``recorded`` (an earlier native revision: the native route,
    which the audit then knows is not the generator's arithmetic)."""
    return "native" if recorded in (*EARLIER_NATIVE_REVISIONS, NATIVE_REVISION) else recorded


def fused_int8(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(M, in) x int8 codes (out, in) with scales (out, in // g) -> (M, out), summed in fp32."""
    m, n_in = x.shape
    out, groups = scale.shape
    xg = x.float().view(m, 1, groups, n_in // groups)
    w = codes.view(out, groups, n_in // groups).float() * scale.unsqueeze(-1)
    return (xg * w).sum(dim=(-2, -1))


def fused_int4(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """(M, in) x int4 codes (out, in // 2; per group of 32, byte j = input j | input j + 16 << 4) -> (M, out)."""
    m, n_in = x.shape
    out, groups = scale.shape
    half = n_in // groups // 2
    xg = x.float().view(m, 1, groups, 2, half)
    packed = codes.view(out, groups, half)
    s, mn = scale.unsqueeze(-1), minimum.unsqueeze(-1)
    low = (packed & 15).float() * s + mn
    high = (packed >> 4).float() * s + mn
    return (xg[:, :, :, 0] * low + xg[:, :, :, 1] * high).sum(dim=(-2, -1))


def step_product(
    x: torch.Tensor, scheme: str, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, out: int
) -> torch.Tensor:
    """What the compiled decode step traces for one quantized product of ``out`` output rows (codes in either
    layout): the native op where it is the route, else the fused formulation (which Inductor then compiles into the
    step's own loops)."""
    if native_takes(x.size(-1)):
        return native.product(x, scheme, codes, scale, minimum, out)
    if codes.dim() > 2:  # tiled, and the native route forced off: the fused formulation reads rows
        rows = torch.arange(out)
        codes, scale = weight_rows(codes, rows), weight_rows(scale, rows)
        minimum = None if minimum is None else weight_rows(minimum, rows)
    if scheme == "int8":
        return fused_int8(x, codes, scale)
    return fused_int4(x, codes, scale, minimum)  # type: ignore[arg-type]


def native_product(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """x (M, in) @ w.T by the native kernel (which must be built), on a tiled copy of ``w`` if it is by rows."""
    t = w.as_tiled()
    return native.product(x, t.scheme, t.codes, t.scale, t.minimum, t.tiled_rows)  # type: ignore[arg-type]


def native_takes(in_features: int) -> bool:
    """Whether products of a weight with ``in_features`` inputs take the native kernel here (it is the route, it
    builds, and it takes the width)."""
    return native_ready() and native.supports(in_features)


def native_ready() -> bool:
    """Whether the native kernel is the route and is built (building it on first use; one warning if it cannot)."""
    global _native_warned
    if quant_kernel() != "native":
        return False
    why_not = native.available()
    if why_not is not None and not _native_warned:
        _native_warned = True
        warnings.warn(
            f"olmo-tap: the native quantized kernel could not be built ({why_not}); quantized products use the "
            "Inductor-compiled reduction instead (correct, slower)",
            stacklevel=3,
        )
    return why_not is None


def _kernel(scheme: str) -> Callable[..., torch.Tensor]:
    """The compiled reduction for ``scheme`` (one compile serves every shape: dynamic)."""
    if scheme not in _compiled:
        _compiled[scheme] = torch.compile(fused_int8 if scheme == "int8" else fused_int4, dynamic=True)
    return _compiled[scheme]


def _fused(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor | None:
    """The compiled reduction on ``x``, or None where Inductor cannot compile here (then never again)."""
    global _compile_failed
    if _compile_failed is not None or quant_kernel() == "dequantize":
        return None
    w = w.untiled()
    args = (w.codes, w.scale) if w.scheme == "int8" else (w.codes, w.scale, w.minimum)
    try:
        return _kernel(w.scheme)(x, *args)
    except Exception as e:  # no C++ compiler, or Inductor refuses: the dequantizing path is as correct
        _compile_failed = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        warnings.warn(
            f"olmo-tap: the fused quantized kernel could not be compiled ({_compile_failed}); quantized products "
            "dequantize their weights chunk by chunk instead (correct, slower for a decode step)",
            stacklevel=3,
        )
        return None


# Dequantized chunks of about this many bytes stay in the CPU's cache between being written and multiplied. A
# whole float weight freshly allocated costs more in page faults than the product itself (measured: 39 ms to
# allocate and fill the lm_head's 113 MB, against 10 ms for its 16-row product chunk by chunk).
CHUNK_BYTES = 1 << 21
_scratch = threading.local()  # one buffer per thread: the service may run products on several threads


def _chunk_buffer(elements: int) -> torch.Tensor:
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < elements:
        buffer = _scratch.buffer = torch.empty(elements)
    return buffer[:elements]


def dequantize_into(w: QuantizedWeight, rows: slice, out: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of ``w`` as fp32 values, written into ``out`` (rows x in, contiguous); returns it. Each value
    is q * scale (+ minimum), rounded once: the same bits as ``QuantizedWeight.dequantize``."""
    part = w.select_rows(rows)  # a view by rows, or a tiled weight's rows read back
    n, groups = out.size(0), part.scale.size(1)
    grouped = out.view(n, groups, -1)
    scale = part.scale.unsqueeze(-1)
    if part.scheme == "int8":
        return torch.mul(part.codes.view(n, groups, -1), scale, out=grouped).view(n, -1)
    packed = part.codes.view(n, groups, -1)
    half = packed.size(-1)
    minimum = part.minimum.unsqueeze(-1)  # type: ignore[union-attr]
    for nibbles, target in ((packed & 15, grouped[..., :half]), (packed >> 4, grouped[..., half:])):
        torch.mul(nibbles, scale, out=target)
        target.add_(minimum)
    return out


def dequantized_product(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """x (M, in) @ w.T in fp32, the weight dequantized chunk by chunk into a cache-sized buffer."""
    out_features, in_features = w.shape
    rows = max(16, CHUNK_BYTES // (4 * in_features))
    xt = x.float().t()
    result = torch.empty(out_features, x.size(0))
    buffer = _chunk_buffer(min(rows, out_features) * in_features)
    for start in range(0, out_features, rows):
        stop = min(out_features, start + rows)
        chunk = dequantize_into(w, slice(start, stop), buffer[: (stop - start) * in_features].view(stop - start, -1))
        torch.mm(chunk, xt, out=result[start:stop])
    return result.t()


def product(x: torch.Tensor, w: QuantizedWeight, row_invariant: bool = False) -> torch.Tensor:
    """x (M, in) @ w.T -> (M, out) in x's dtype, by the route for this many rows (see the module doc).

    ``row_invariant`` (decoding in a batch): every row count takes the native kernel where it is the route, so
    that a row's bits do not depend on the rows beside it (each output row is one thread's sum in a fixed order);
    the chunked product's float kernels block by the row count. Costs up to 2x on prompts of over 64 tokens."""
    return stack_product(x, QuantizedStack([w]), row_invariant)


def stack_product(x: torch.Tensor, stack: QuantizedStack, row_invariant: bool = False) -> torch.Tensor:
    """x (..., in) @ a fused projection -> (..., out) in x's dtype (``row_invariant``: see ``product``).

    The route is decided once for the stack's parts: a decode step runs ~120 of these, and on the native route
    the checks once cost more than the kernel call itself (~27 us against ~24 for a 576 x 576 int4 product)."""
    flat = x.reshape(-1, x.size(-1))
    rows = flat.size(0)
    if x.is_cpu and native_takes(flat.size(1)):
        x32 = flat.float().contiguous()  # itself when it is already
        outs = [
            native_product(x32, part)
            if row_invariant or rows <= NATIVE_MAX_ROWS[part.scheme]
            else dequantized_product(flat, part)
            for part in stack.parts
        ]
    else:
        outs = [_float_route_product(flat, part) for part in stack.parts]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    return out.to(x.dtype).reshape(*x.shape[:-1], out.size(-1))


def _float_route_product(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """x (M, in) @ w.T off the native route: the fused reduction for a few rows on CPU (where it compiles), else
    the chunked dequantize-and-multiply."""
    out = _fused(x, w) if x.is_cpu and x.size(0) <= FUSED_MAX_ROWS[w.scheme] else None
    return dequantized_product(x, w) if out is None else out


def fused_kernel_status() -> str:
    """One line for ``olmo-tap info``."""
    kernel = quant_kernel()
    if kernel == "dequantize":
        return f"chunked dequantize-and-multiply (forced: {QUANT_KERNEL_ENV}=dequantize)"
    if kernel == "native":
        why_not = native.available()
        if why_not is None:
            rows = ", ".join(f"{scheme} <= {n} rows" for scheme, n in NATIVE_MAX_ROWS.items())
            path = native.vector_path()
            return f"native kernel ({path} path, built for this CPU; {rows}), chunked dequantize-and-multiply above"
        fallback = f"the native kernel could not be built ({why_not}); "
    else:
        fallback = f"forced: {QUANT_KERNEL_ENV}=fused; "
    if _compile_failed is not None:
        return f"chunked dequantize-and-multiply ({fallback}the fused kernel failed to compile: {_compile_failed})"
    rows = ", ".join(f"{scheme} <= {n} rows" for scheme, n in FUSED_MAX_ROWS.items())
    return f"fused dequantizing reduction ({fallback}Inductor; {rows}), chunked dequantize-and-multiply above"
