"""Which linear kernels run here: oneDNN-prepacked weights where this CPU and torch build take them, stock
matmuls everywhere else.

oneDNN's bf16 kernels need avx512bw/vl/dq or avx_ne_convert: on an AVX2-only CPU prepacking a bf16 weight
raises deep inside torch. The choice is therefore made per dtype, from what torch reports about the CPU, then
confirmed once by packing and running a small weight (so a CPU or build torch misjudges falls back too).
Stock kernels give the same results within floating-point rounding.

``OLMO_TAP_KERNELS=stock`` (or ``set_kernel_path("stock")``) forces the stock kernels, so the fallback can be
run and tested on any machine; ``auto`` (the default) decides as above.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

KERNELS_ENV = "OLMO_TAP_KERNELS"
KERNEL_PATHS = ("auto", "stock")
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
BF16_CPU_NEEDS = "CPU lacks avx512bw/vl/dq or avx_ne_convert"

_override: str | None = None
_epoch = 0  # bumped whenever the choice may have changed, so cached packing decisions are taken again
_probed: dict[torch.dtype, str | None] = {}  # dtype -> why the one-off probe failed (None: it worked)


def set_kernel_path(path: str | None) -> None:
    """Force ``"stock"`` or ``"auto"`` for this process; ``None`` goes back to ``$OLMO_TAP_KERNELS``.

    Models already built follow at their next forward pass (their packing decisions are taken again).
    """
    global _override, _epoch
    if path is not None and path not in KERNEL_PATHS:
        raise ValueError(f"kernel path must be one of {', '.join(KERNEL_PATHS)}, got {path!r}")
    _override = path
    _epoch += 1


# Within one model pass (``one_pass``): the variables ``env_choice`` has read, by name.
_PASS_ENV: ContextVar[dict[str, str] | None] = ContextVar("olmo_tap_pass_env", default=None)


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """``$name`` as one of ``choices`` (unset or empty: the first); anything else is refused by name."""
    memo = None if torch.compiler.is_compiling() else _PASS_ENV.get()  # Dynamo cannot trace a ContextVar
    if memo is not None and name in memo:
        return memo[name]
    value = os.environ.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    if memo is not None:
        memo[name] = value
    return value


@contextmanager
def one_pass() -> Iterator[None]:
    """Within the block (a model pass), each kernel-route variable is read from the environment once.

    A decode step asks for routes a few hundred times (every product, norm and attention), and reading
    ``os.environ`` costs ~2 us a time on the 2-core Xeon: ~0.5 ms of a 20 ms quantized step. The next pass reads
    the environment afresh, so a changed variable takes effect from it; a replay's forced routes still win."""
    if _PASS_ENV.get() is not None:
        yield
        return
    token = _PASS_ENV.set({})
    try:
        yield
    finally:
        _PASS_ENV.reset(token)


# oneDNN's products of 2 or more rows give every row the same bits whatever the row count (measured for
# SmolLM2's shapes, fp32 and bf16, 2-64 rows), but for some shapes a lone row takes a kernel that sums in another
# order (fp32 1536 -> 576 here). Decoding in a batch, such a lone row runs as two, so that a sequence's arithmetic
# does not depend on how many others share its step. Only there: the second row costs ~5% of a single stream's
# decode, which gains nothing from it. The native kernel needs none of it: a row's bits never depend on the others.
_BATCH_ARITHMETIC: ContextVar[bool] = ContextVar("batch_arithmetic", default=False)


@contextmanager
def batch_arithmetic(on: bool = True) -> Iterator[None]:
    """Within the block, products whose lone row would round differently run it as two (see above), and
    quantized products take the native kernel at every row count (``olmo_tap.quant.linear.product``)."""
    token = _BATCH_ARITHMETIC.set(on)
    try:
        yield
    finally:
        _BATCH_ARITHMETIC.reset(token)


def in_batch_arithmetic() -> bool:
    """Whether the products run in batch arithmetic (``batch_arithmetic``)."""
    return _BATCH_ARITHMETIC.get()


class Route:
    """A kernel route chosen by ``$env`` among ``choices`` (the first by default), which a transcript's replay can
    force within a block to one of ``taken`` (the routes decoding records). The forced route is a ``ContextVar``:
    a replay on one thread does not move the routes of answers decoded on others."""

    def __init__(self, what: str, env: str, choices: tuple[str, ...], taken: tuple[str, ...]) -> None:
        self.what, self.env, self.choices, self.taken = what, env, choices, taken
        self._forced: ContextVar[str | None] = ContextVar(env, default=None)

    @contextmanager
    def forced(self, route: str) -> Iterator[None]:
        """Within the block, take ``route`` whatever ``$env`` says."""
        if route not in self.taken:
            raise ValueError(f"{self.what} must be {', '.join(self.taken)}, got {route!r}")
        token = self._forced.set(route)
        try:
            yield
        finally:
            self._forced.reset(token)

    def requested(self) -> str:
        """The forced route, else ``$env``'s (a bad value refused by name)."""
        # Dynamo cannot trace a ContextVar, and replays never compile their steps (their rounding is the compiler's)
        forced = None if torch.compiler.is_compiling() else self._forced.get()
        return forced if forced is not None else env_choice(self.env, self.choices)


def kernel_path() -> str:
    """``"auto"`` or ``"stock"``: the forced value, else ``$OLMO_TAP_KERNELS``, else ``"auto"``."""
    return _override if _override is not None else env_choice(KERNELS_ENV, KERNEL_PATHS)


def epoch() -> int:
    """Changes whenever a packing decision taken earlier may no longer hold."""
    return _epoch


def _build_has_onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _cpu_takes_onednn_bf16() -> bool:
    """torch's own test of the CPU features oneDNN's bf16 kernels need (a torch without it: assume yes, the
    probe then decides)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return True if check is None else bool(check())


def reorder_weight(weight: torch.Tensor, batch_size_hint: int) -> torch.Tensor:
    """oneDNN's prepacked copy of an ``(out, in)`` weight."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, batch_size_hint)


def _probe(dtype: torch.dtype) -> str | None:
    """Pack and run one small weight of ``dtype``; why that failed, or None. Runs once per dtype and process."""
    if dtype not in _probed:
        try:
            weight = torch.ones(8, 16, dtype=dtype)
            out = torch.ops.mkldnn._linear_pointwise(
                torch.ones(1, 16, dtype=dtype), reorder_weight(weight, 4), None, "none", [], ""
            )
            _probed[dtype] = None if float(out[0, 0]) == 16.0 else f"oneDNN {dtype} probe gave {float(out[0, 0])}"
        except Exception as e:  # whatever oneDNN raises here, stock kernels are the answer
            _probed[dtype] = _failure(e)
    return _probed[dtype]


def note_failure(dtype: torch.dtype, error: BaseException) -> None:
    """Record that oneDNN failed on a real weight of ``dtype``: stock kernels from now on for that dtype."""
    global _epoch
    _probed[dtype] = _failure(error)
    _epoch += 1


def _failure(error: BaseException) -> str:
    return f"oneDNN failed: {(str(error).strip().splitlines() or [type(error).__name__])[0]}"


def onednn_refusal(dtype: torch.dtype) -> str | None:
    """Why weights of ``dtype`` on CPU run on stock kernels rather than oneDNN-prepacked ones; None if they don't."""
    if kernel_path() == "stock":
        return "forced: set_kernel_path('stock')" if _override == "stock" else f"forced: {KERNELS_ENV}=stock"
    if dtype not in ONEDNN_DTYPES:
        return f"no oneDNN path for {str(dtype).removeprefix('torch.')}"
    if not _build_has_onednn():
        return "this torch build has no oneDNN"
    if not torch.backends.mkldnn.enabled:
        return "oneDNN disabled (torch.backends.mkldnn.enabled is False)"
    if dtype == torch.bfloat16 and not _cpu_takes_onednn_bf16():
        return BF16_CPU_NEEDS
    return _probe(dtype)


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def describe(device: torch.device | str = "cpu", dtypes: Iterable[torch.dtype] = ONEDNN_DTYPES) -> str:
    """One line for ``olmo-tap info``: the kernel path of each dtype on ``device``."""
    if torch.device(device).type != "cpu":
        return f"stock torch matmul on {device} (oneDNN prepacking is for CPU only)"
    packed, stock = [], []
    for dtype in dtypes:
        reason = onednn_refusal(dtype)
        (packed if reason is None else stock).append((dtype, reason))
    parts = []
    if packed:
        parts.append(f"oneDNN prepacked ({', '.join(_short(d) for d, _ in packed)})")
    if stock:
        by_reason: dict[str, list[str]] = {}
        for dtype, reason in stock:
            by_reason.setdefault(str(reason), []).append(_short(dtype))
        reasons = "; ".join(f"{', '.join(names)}: {reason}" for reason, names in by_reason.items())
        parts.append(f"stock matmul ({reasons})")
    return ", ".join(parts)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (None: as is), restoring the count after. Matrix products of a few rows
    sum in another order with another thread count, so an exact replay runs with the generator's."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
