"""olmo-tap's own few-row quantized product (``native.cpp``), built on first use for this CPU.

Built with torch's C++ extension loader (ninja and the system C++ compiler) with ``-march=native``, and cached
under torch's extension directory by a name that hashes the source, torch's version and this CPU's instruction-set
flags, so a build made on an AVX-512 machine is never loaded on an AVX2 one. It registers the dispatcher ops
``torch.ops.olmo_tap.mm_int8`` and ``mm_int4``, which eager code and the compiled decode step both call. Where it
cannot be built (no compiler, no ninja), ``available()`` says why and products take the other routes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("native.cpp")
_lock = threading.Lock()
_state: dict[str, str | None] = {}  # "error": None once loaded, else why it could not be


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _build_and_load() -> None:
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the pip wheel's binary, where the system has none
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    tag = hashlib.sha256((_SOURCE.read_text() + _cpu_flags() + torch.__version__).encode()).hexdigest()[:12]
    name = f"olmo_tap_quant_{tag}"
    built = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"
    if not built.exists():  # the one slow moment: say what it is
        print("olmo-tap: building the native quantized kernel for this CPU (once, about a minute)", file=sys.stderr)
    cpp_extension.load(
        name=name,
        sources=[str(_SOURCE)],
        extra_cflags=["-O3", "-march=native"],
        is_python_module=False,
        verbose=False,
    )

    @torch.library.register_fake("olmo_tap::mm_int8")
    def _(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.size(0), codes.size(0))

    @torch.library.register_fake("olmo_tap::mm_int4")
    def _(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.size(0), codes.size(0))


def available() -> str | None:
    """None once the native kernel is built and loaded (building it on the first call), else why it is not."""
    if "error" not in _state:
        with _lock:
            if "error" not in _state:
                try:
                    _build_and_load()
                    _state["error"] = None
                except Exception as e:  # no compiler, no ninja, or a build error: the other routes remain
                    lines = str(e).strip().splitlines()
                    _state["error"] = f"{type(e).__name__}: {lines[-1] if lines else ''}"
    return _state["error"]


def supports(in_features: int) -> bool:
    """Whether the kernel takes a weight with this many inputs: it quantizes activations in blocks of 32."""
    return in_features % 32 == 0


def product(x: torch.Tensor, scheme: str, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None):
    """x (M, in) @ the quantized weight -> (M, out) fp32; the native kernel must be ``available()``."""
    x = x.float().contiguous()
    if scheme == "int8":
        return torch.ops.olmo_tap.mm_int8(x, codes, scale)
    return torch.ops.olmo_tap.mm_int4(x, codes, scale, minimum)
