"""Every native build the suite uses, so that the session builds them together at its start (``conftest``).

A build is one compiler process that spends ~17 s reading torch's headers, and a fresh machine (CI) builds each
kernel once: on 2 cores, two builds at a time take half the time of one after another. The variants are builds
of a kernel's source with some of its vector paths left out, their ops under another namespace, that a test
compares with this CPU's build. One instance per build, so that a test finds the one the session built.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

from olmo_tap.model import native_attention, native_linear, native_norm
from olmo_tap.native import NativeKernel, cpu_has
from olmo_tap.quant import native as quant_native


@functools.cache
def linear_variant(path: str) -> NativeKernel:
    """native_linear.cpp with only its ``avx2`` or its ``plain`` path, ops under ``torch.ops.olmo_tap_f32_<path>``."""
    flags = {"avx2": ("-DOLMO_TAP_NO_AVX512",), "plain": ("-DOLMO_TAP_NO_AVX512", "-DOLMO_TAP_NO_AVX2")}[path]
    name = f"olmo_tap_f32_{path}"
    return NativeKernel(native_linear._KERNEL.source, name, name, None, (*flags, f"-DOLMO_TAP_OPS={name}"))


@functools.cache
def norm_plain() -> NativeKernel:
    """norm.cpp without vector instructions or FMA hardware (std::fma then runs in software), ops under
    ``torch.ops.olmo_tap_norm_plain``."""
    flags = ("-mno-avx512f", "-mno-avx2", "-mno-avx", "-mno-fma", "-DOLMO_TAP_OPS=olmo_tap_norm_plain")
    return NativeKernel(native_norm._KERNEL.source, "olmo_tap_norm_plain", "norm kernel (plain)", None, flags)


def build_all() -> None:
    """Build (or load, where torch's extension cache has them) the kernels and the variants this CPU tests, two
    at a time; a build that fails is left to the test that needs it to report."""
    builds = [native_attention._KERNEL, native_norm._KERNEL, native_linear._KERNEL, quant_native._KERNEL]
    builds += [linear_variant("plain"), norm_plain()]
    if cpu_has("avx512f"):  # the test compares an AVX-512 build with one without
        builds.append(linear_variant("avx2"))
    if quant_native.VECTOR_PATH != "plain":  # the test compares the vector paths with the plain loops
        builds.append(quant_native.path_variant("plain"))
    if quant_native.VECTOR_PATH == "vnni":  # ... and with the AVX2 path without VNNI
        builds.append(quant_native.path_variant("avx2"))
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(NativeKernel.available, builds))
