"""Cached attention of many decoding rows in one call (``attention.cpp``), built on first use for this CPU.

A batch of decoding rows sits at different positions of different cache slots, so in torch every row needs its
own cache write, two small products and a softmax per layer: at 8 rows that per-row work cost more than the
layer's matrix products. ``attend`` does it for all rows in one op, and is batch-invariant by construction (one
thread computes each query head from start to finish in an order fixed by its own keys; see the source).

Used for the rows of a cached pass with at most ``SMALL_QUERY`` tokens (decode steps and verification passes) in
fp32 on CPU, without autograd; longer rows (prompts) and every other case take the torch route
(``olmo_tap.model.layers``). ``OLMO_TAP_ATTENTION=torch`` forces the torch route everywhere (a machine without a
C++ compiler takes it too). The two routes agree within fp32 rounding (~1e-6), not bit for bit: a transcript
records which one decoded it (``attention_route()``), and a replay is exact only on the same route.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from olmo_tap.model.kernels import Route
from olmo_tap.native import NativeKernel

ATTENTION_ENV = "OLMO_TAP_ATTENTION"
ROUTES = ("auto", "native", "torch")
TAKEN = ("native", "torch")  # the routes decoding can take, as a transcript records them


# Decode steps and verification passes have a handful of queries a row: up to this many, the native op takes every
# row of a pass at once, and the torch route's two small batched matmuls beat scaled_dot_product_attention's CPU
# kernels by far (``layers.Block``); longer rows (prompts) take scaled_dot_product_attention.
SMALL_QUERY = 16


def _register_fakes() -> None:
    @torch.library.register_fake("olmo_tap::attend_window")
    def _(
        qk: torch.Tensor, v: torch.Tensor, k: torch.Tensor, v_window: torch.Tensor, position: torch.Tensor, n: int
    ) -> torch.Tensor:
        return qk.new_empty(1, n * qk.size(-1))


_KERNEL = NativeKernel(Path(__file__).with_name("attention.cpp"), "attention", "attention kernel", _register_fakes)
_ROUTE = Route("attention route", ATTENTION_ENV, ROUTES, TAKEN)


def route_as(route: str) -> contextlib.AbstractContextManager[None]:
    """Within the block, take ``route`` (``native`` or ``torch``), as a transcript's replay must: ``native``
    still needs the kernel to build here (else the torch route, and the replay cannot be exact)."""
    return _ROUTE.forced(route)


def requested() -> str:
    """``auto`` (the default: native where it builds), ``native`` (the same, named) or ``torch``: a replay's
    forced route, else ``$OLMO_TAP_ATTENTION``."""
    return _ROUTE.requested()


def attention_route() -> str:
    """``native`` or ``torch``: the route fp32 CPU decoding takes in this process (building the kernel on the
    first call)."""
    if requested() == "torch":
        return "torch"
    return "native" if _KERNEL.available() is None else "torch"


def why_not_native() -> str | None:
    """Why decoding takes the torch route, or None where it takes the native one."""
    if requested() == "torch":
        return f"forced: {ATTENTION_ENV}=torch"
    return _KERNEL.available()


def route_for(model: torch.nn.Module) -> str:
    """The route ``model``'s cached decoding takes here: ``native`` for fp32 activations and cache on CPU where
    the kernel builds, else ``torch``. Recorded in every transcript."""
    fp32 = model.dtype == torch.float32 and model.cache_dtype == torch.float32  # type: ignore[attr-defined]
    on_cpu = model.device.type == "cpu"  # type: ignore[attr-defined]
    return attention_route() if fp32 and on_cpu else "torch"


def status(model: torch.nn.Module) -> str:
    """One line for ``olmo-tap info``: the route ``model``'s cached decoding takes, and why not native."""
    route = route_for(model)
    if route == "native":
        return "native (every decoding row of a pass in one op, built for this CPU)"
    why = why_not_native() if attention_route() == "torch" else "fp32 on CPU only"
    return f"torch, per row ({why})"


def takes(qk: torch.Tensor, cache_k: torch.Tensor) -> bool:
    """Whether a cached pass with these tensors can run natively (fp32 on CPU, no autograd)."""
    return (
        qk.dtype == torch.float32
        and cache_k.dtype == torch.float32
        and qk.device.type == "cpu"
        and not (torch.is_grad_enabled() and qk.requires_grad)
        and attention_route() == "native"
    )


def attend_window(
    qk: torch.Tensor,
    v: torch.Tensor,
    k_window: torch.Tensor,
    v_window: torch.Tensor,
    position: torch.Tensor,
    n_heads: int,
) -> torch.Tensor:
    """A compiled decode step's attention: write the token's key and value at ``position`` (a (1,) int64 tensor)
    of the windows (kv_heads, window, head_dim) and attend over the window's keys 0 .. position: qk (heads +
    kv_heads, 1, head_dim) rotated (queries scaled), v (kv_heads, 1, head_dim) -> (1, heads * head_dim). The
    arithmetic of a decoding row of ``attend``."""
    return torch.ops.olmo_tap.attend_window(qk.contiguous(), v.contiguous(), k_window, v_window, position, n_heads)


def attend(
    qk: torch.Tensor,
    v: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    tower0: int,
    slots: tuple[int, ...],
    starts: tuple[int, ...],
    lengths: tuple[int, ...],
    n_heads: int,
) -> torch.Tensor:
    """Write the rows' keys and values into their slots and attend: qk (towers, heads + kv_heads, tokens, hd)
    rotated (queries scaled), v (towers, kv_heads, tokens, hd) -> (towers, tokens, heads * hd)."""
    # the kernel reads each head's vector as one run of floats (some quantized routes hand out other layouts)
    qk = qk if qk.stride(-1) == 1 else qk.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    return torch.ops.olmo_tap.attend_cached(qk, v, cache_k, cache_v, tower0, slots, starts, lengths, n_heads)
