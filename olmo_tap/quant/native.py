"""olmo-tap's own few-row quantized product (``native.cpp``), built on first use for this CPU.

Built with torch's C++ extension loader (ninja and the system C++ compiler) with ``-march=native``, and cached
under torch's extension directory by a name that hashes the source, torch's version and this CPU's instruction-set
flags, so a build made on an AVX-512 machine is never loaded on an AVX2 one. It registers the dispatcher ops
``torch.ops.olmo_tap.mm_int8`` and ``mm_int4`` on weights in the tiled layout (``QuantizedWeight.tile_``), which
eager code and the compiled decode step both call. Where it
cannot be built (no compiler, no ninja), ``available()`` says why and products take the other routes.
"""

from __future__ import annotations

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
# scales), else plain loops.
VECTOR_PATH = "avx2" if cpu_has("avx2", "fma", "f16c") else "plain"

_KERNEL = NativeKernel(Path(__file__).with_name("native.cpp"), "quant", "quantized kernel", _register_fakes)


def available() -> str | None:
    """None once the native kernel is built and loaded (building it on the first call), else why it is not."""
    return _KERNEL.available()


def supports(in_features: int) -> bool:
    """Whether the kernel takes a weight with this many inputs: it quantizes activations in blocks of 32."""
    return in_features % 32 == 0


def product(
    x: torch.Tensor, scheme: str, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, out: int
) -> torch.Tensor:
    """x (M, in) @ a quantized weight of ``out`` rows in the tiled layout -> (M, out) fp32; the native kernel must
    be ``available()``."""
    x = x.float().contiguous()
    if scheme == "int8":
        return torch.ops.olmo_tap.mm_int8(x, codes, scale, out)
    return torch.ops.olmo_tap.mm_int4(x, codes, scale, minimum, out)
