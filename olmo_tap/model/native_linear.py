"""olmo-tap's own fp32 products of a few rows (``native_linear.cpp``), built on first use for this CPU.

Every output is one fused multiply-add chain over the inputs in order, so a row gets the same bits whatever
else shares the call, however many threads run it and whichever vector width the CPU has (AVX-512, AVX2 or
plain loops: tested against builds without them). That makes batched decoding batch-invariant without padding
a lone row, and an fp32 replay exact on another CPU as far as the products go. Measured on the 2-core Xeon
(``python -m olmo_tap.benchmarks.fp32_products``, weights from memory, SmolLM2's shapes): 0.66-0.96x oneDNN's
time for 1 to 8 rows, 0.74-0.95x for 16; the lm_head over 32 rows 1.04x (slower).

The route of an fp32 model's products on CPU (``route_for``), recorded in every float transcript as ``linear``:
``native`` where the kernel builds, else ``onednn`` (prepacked oneDNN weights, the only route before this one;
their rows round by the CPU's instruction set and, alone, differently from among others), or ``stock`` (torch's
matmul: ``OLMO_TAP_KERNELS=stock``, or weights too small to pack). ``OLMO_TAP_LINEAR=onednn`` keeps fp32
products on oneDNN; a replay forces the route its transcript records (``route_as``). bf16 weights always take
oneDNN or stock kernels.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from olmo_tap.model import kernels
from olmo_tap.model.kernels import Route
from olmo_tap.native import NativeKernel

LINEAR_ENV = "OLMO_TAP_LINEAR"
ROUTES = ("auto", "native", "onednn")
TAKEN = ("native", "onednn")  # the routes a replay can force
RECORDED = ("native", "onednn", "stock")  # what a transcript's ``linear`` may say

_KERNEL = NativeKernel(Path(__file__).with_name("native_linear.cpp"), "linear", "fp32 product kernel")
_ROUTE = Route("fp32 product route", LINEAR_ENV, ROUTES, TAKEN)


def route_as(route: str) -> contextlib.AbstractContextManager[None]:
    """Within the block, fp32 products take ``route`` (``native`` or ``onednn``), as a transcript's replay must;
    ``native`` still needs the kernel to build here."""
    return _ROUTE.forced(route)


def requested_route() -> str:
    """``native`` or ``onednn``: the route fp32 products ask for (a replay's forced one, else ``$OLMO_TAP_LINEAR``'s,
    ``auto`` meaning native)."""
    return "onednn" if _ROUTE.requested() == "onednn" else "native"


def takes_native() -> bool:
    """Whether fp32 weights big enough to pack take the native kernel here (building it on the first call)."""
    return why_not_native() is None


def why_not_native() -> str | None:
    """Why fp32 products do not take the native kernel here, or None where they do."""
    if kernels.kernel_path() == "stock":
        return kernels.onednn_refusal(torch.float32)
    if _ROUTE.requested() == "onednn":
        return f"forced: {LINEAR_ENV}=onednn"
    return _KERNEL.available()


def route_for(model: torch.nn.Module) -> str:
    """``native``, ``onednn`` or ``stock``: the route the products of ``model`` (fp32 on CPU) take here, read off
    its packed weights (the lm_head's: every weight big enough to pack takes the same route)."""
    packed = model._packed_lm_head.get(model.lm_head.unsqueeze(0))  # type: ignore[union-attr, operator]
    return packed.route if packed is not None else "stock"


def pack(w: torch.Tensor) -> torch.Tensor:
    """The kernel's copy of an (out, in) fp32 weight: blocks of 32 outputs, input-major."""
    return torch.ops.olmo_tap.pack_f32(w.contiguous())


def product(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x (..., in) @ the packed weight -> (..., out) fp32."""
    flat = x.reshape(-1, x.size(-1))
    y = torch.ops.olmo_tap.mm_f32(flat if flat.is_contiguous() else flat.contiguous(), packed, out_features)
    return y.view(*x.shape[:-1], out_features)


def vector_path() -> str:
    """``avx512``, ``avx2`` or ``plain``: the kernel's widest path as built here (after ``takes_native``)."""
    return str(torch.ops.olmo_tap.mm_f32_path())


def status(model: torch.nn.Module) -> str:
    """One line for ``olmo-tap info``: the kernels ``model``'s float products take here."""
    if route_for(model) == "native":
        return f"olmo-tap's native fp32 kernel ({vector_path()}; a row's bits never depend on its batch)"
    line = kernels.describe(model.device)  # type: ignore[arg-type]
    fp32_cpu = model.dtype == torch.float32 and model.device.type == "cpu"  # type: ignore[attr-defined]
    why = why_not_native() if fp32_cpu and kernels.kernel_path() != "stock" else None
    return f"{line}; native fp32 kernel not taken: {why}" if why else line
