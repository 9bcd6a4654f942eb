"""RMSNorm of many rows in one native op (``norm.cpp``), built on first use for this CPU.

torch's CPU ``rms_norm`` is a composite of about eight small ops; a decode step of the embedded default runs 61
norms, and their dispatch cost ~3 ms of a quantized model's ~24 ms step on the 2-core Xeon (measured: 27 us a
call against the op's 6.5 us). The op computes each row alone, in an order fixed by its length, so a row gets the
same bits in any batch, at any thread count and on every vector path (tested against a build without vectors).

Used for fp32 activations on CPU without autograd (inference: decoding, verification, the uncertainty head), the
torch route elsewhere (training, other dtypes and devices, compiled steps). ``OLMO_TAP_NORM=torch`` forces the
torch route (a machine without a C++ compiler takes it too). The routes agree within fp32 rounding, not bit for
bit: a transcript records its route (``norm``; a transcript from before it was recorded was decoded on torch's),
and a replay is exact only on the same route.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from olmo_tap.model.kernels import Route
from olmo_tap.native import NativeKernel

NORM_ENV = "OLMO_TAP_NORM"
ROUTES = ("auto", "native", "torch")
TAKEN = ("native", "torch")  # the routes decoding can take, as a transcript records them

_KERNEL = NativeKernel(Path(__file__).with_name("norm.cpp"), "norm", "norm kernel")
_ROUTE = Route("norm route", NORM_ENV, ROUTES, TAKEN)


def route_as(route: str) -> contextlib.AbstractContextManager[None]:
    """Within the block, take ``route`` (``native`` or ``torch``), as a transcript's replay must."""
    return _ROUTE.forced(route)


def requested() -> str:
    """``auto`` (native where it builds), ``native`` or ``torch``: a replay's forced route, else ``$OLMO_TAP_NORM``."""
    return _ROUTE.requested()


def why_not_native() -> str | None:
    """Why norms take the torch route here, or None where they take the native one (building it on first call)."""
    if requested() == "torch":
        return f"forced: {NORM_ENV}=torch"
    return _KERNEL.available()


def route_for(model: torch.nn.Module) -> str:
    """``native`` or ``torch``: the route ``model``'s inference norms take here. Recorded in every transcript."""
    fp32_cpu = model.dtype == torch.float32 and model.device.type == "cpu"  # type: ignore[attr-defined]
    return "native" if fp32_cpu and why_not_native() is None else "torch"


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the op normalises ``x`` with ``weight`` (broadcast over x's leading dimensions) here: fp32 on CPU,
    no autograd, not while compiling, the weight's rows a run of x's leading dimensions (see ``norm.cpp``).
    Called for every norm of a pass: the cheap tests first."""
    if x.dtype is not torch.float32 or weight.dtype is not torch.float32 or not x.is_cpu:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if torch.compiler.is_compiling() or not (weight.dim() == 1 or _groups_rows(x.shape, weight.shape)):
        return False
    return why_not_native() is None


def _groups_rows(x_shape: torch.Size, w_shape: torch.Size) -> bool:
    """Whether a weight of ``w_shape`` broadcast against x gives each run of consecutive rows of x one weight row:
    its leading sizes (aligned to x's last ones, as broadcasting aligns them) equal x's, then are ones. A weight
    per tower (n, 1, dim) against (n, tokens, dim) does, and one per token (tokens, dim) against (1, tokens, dim);
    (1, tokens, dim) against (n, tokens, dim) does not."""
    if len(w_shape) > len(x_shape) or w_shape[-1] != x_shape[-1]:
        return False
    lead = [1] * (len(x_shape) - len(w_shape)) + list(w_shape[:-1])
    broadcast = False
    for w_size, x_size in zip(lead, x_shape[:-1], strict=True):
        if w_size == x_size and not (broadcast and w_size != 1):
            continue
        if w_size != 1:
            return False
        broadcast = True
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension by the op (``takes`` must hold): x * rsqrt(mean(x^2) + eps) * weight."""
    return torch.ops.olmo_tap.rms_norm_rows(x.contiguous(), weight.contiguous(), eps)


def status(model: torch.nn.Module) -> str:
    """One line for ``olmo-tap info``: the route ``model``'s norms take here, and why not native."""
    if route_for(model) == "native":
        return "native (one op a norm, built for this CPU)"
    why = why_not_native() or "fp32 on CPU only"
    return f"torch ({why})"
