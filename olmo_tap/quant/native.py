"""olmo-tap's own few-row quantized product (``native.cpp``), built on first use for this CPU.

Built with torch's C++ extension loader (ninja and the system C++ compiler) with ``-march=native``, and cached
under torch's extension directory by a name that hashes the source, torch's version and this CPU's instruction-set
flags, so a build made on an AVX-512 machine is never loaded on an AVX2 one. It registers the dispatcher ops
``torch.ops.olmo_tap.mm_int8`` and ``mm_int4`` on weights in the tiled layout (``QuantizedWeight.tile_``), which
eager code and the compiled decode step both call. Where it
cannot be built (no compiler, no ninja), ``available()`` says why and products take the other routes.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from olmo_tap.native import NativeKernel, cpu_has


def _register_fakes() -> None:
    @torch.library.register_fake("olmo_tap::mm_int8")
    def _(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, out: int) -> torch.Tensor:
        return x.new_empty(x.size(0), out)

    @torch.library.register_fake("olmo_tap::mm_int4")
    def _(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, out: int) -> torch.Tensor:
        return x.new_empty(x.size(0), out)


# The kernel's vector path on this CPU (what -march=native turns on in native.cpp): AVX2 with FMA and F16C (fp16
# scales), its integer dots by VNNI's dpbusd where the CPU has AVX-512 VNNI (with VL) or AVX-VNNI; else plain loops.
if not cpu_has("avx2", "fma", "f16c"):
    VECTOR_PATH = "plain"
elif cpu_has("avx512_vnni", "avx512vl") or cpu_has("avx_vnni"):
    VECTOR_PATH = "vnni"
else:
    VECTOR_PATH = "avx2"

_KERNEL = NativeKernel(Path(__file__).with_name("native.cpp"), "quant", "quantized kernel", _register_fakes)


# Flags that leave vector paths out of a build: to compare the paths on one CPU (tests, the kernel benchmark).
PATH_FLAGS = {"avx2": ("-DOLMO_TAP_NO_VNNI",), "plain": ("-DOLMO_TAP_NO_AVX2",)}


@functools.cache
def variant(name: str, *cflags: str) -> NativeKernel:
    """native.cpp built with ``cflags`` after -march=native (e.g. ``PATH_FLAGS["avx2"]``), its ops under
    ``torch.ops.<name>``; its ``available()`` builds it. One instance per build, so callers share it."""
    return NativeKernel(_KERNEL.source, name, f"quantized kernel ({name})", None, (*cflags, f"-DOLMO_TAP_OPS={name}"))


def path_variant(path: str) -> NativeKernel:
    """native.cpp without the paths above ``path`` (``avx2``: no VNNI; ``plain``: no vectors), its ops under
    ``torch.ops.olmo_tap_quant_<path>``."""
    return variant(f"olmo_tap_quant_{path}", *PATH_FLAGS[path])


def available() -> str | None:
    """None once the native kernel is built and loaded (building it on the first call), else why it is not."""
    return _KERNEL.available()


def vector_path() -> str:
    """``vnni``, ``avx2`` or ``plain``: the path the kernel was built with here (once ``available()``)."""
    return str(torch.ops.olmo_tap.mm_quant_path())


def supports(in_features: int) -> bool:
    """Whether the kernel takes a weight with this many inputs: it quantizes activations in blocks of 32."""
    return in_features % 32 == 0


def product(
    x: torch.Tensor,
    scheme: str,
    codes: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None,
    out: int,
    ops: str = "olmo_tap",
) -> torch.Tensor:
    """x (M, in) @ a quantized weight of ``out`` rows in the tiled layout -> (M, out) fp32; the native kernel (or
    the ``variant`` whose ops live under ``torch.ops.<ops>``) must be ``available()``."""
    x = x.float().contiguous()
    namespace = getattr(torch.ops, ops)
    if scheme == "int8":
        return namespace.mm_int8(x, codes, scale, out)
    return namespace.mm_int4(x, codes, scale, minimum, out)
