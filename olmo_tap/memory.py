"""Giving freed memory back to the operating system."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable, Iterator

import torch


@functools.cache
def _glibc(function: str) -> Callable[..., int] | None:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), function) if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): its allocator returns memory its own way
        return None


# glibc's mallopt parameters and the ceilings its dynamic thresholds grow to on 64-bit (malloc/malloc.c)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MIN, _MMAP_THRESHOLD_MAX = 128 * 1024, 32 * 1024 * 1024


@contextlib.contextmanager
def separate_large_allocations() -> Iterator[None]:
    """Inside: every allocation of 128 KiB or more gets its own mapping, so freeing it returns it at once.

    A loader that keeps small quantized tensors while it frees large float temporaries (a decoded layer, a merged
    head) otherwise fragments the heap: glibc raises its mmap threshold to the size of the largest block freed so
    far (up to 32 MiB), after which the temporaries come from the heap between the kept tensors, and the holes stay
    resident. Measured on the embedded default's quantized load: peak RSS 515 -> 460 MB. On leaving, the freed
    memory is handed back and the thresholds are set where glibc's own dynamic rule would have taken them (32 MiB,
    twice that for trimming), so decoding's temporaries keep coming from the heap without a mapping and page
    faults per call.
    """
    mallopt = _glibc("mallopt")
    if mallopt is None:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MIN)
    try:
        yield
    finally:
        release_freed_memory()
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_MAX)


def release_freed_memory(collect: bool = True) -> None:
    """Collect garbage and hand the allocator's free pages back (glibc's ``malloc_trim``; the CUDA cache on a GPU).

    Many small objects freed at once (a dropped model's Python side, a tokenizer's entries) leave pages the
    allocator keeps for reuse; the large tensors allocated next come from fresh mappings instead, so without this
    the freed pages stay in the process's resident memory on top of them. ``collect=False`` skips the garbage
    collection (~0.1 s with torch imported) where what was freed holds no reference cycles (a loop's tensors).
    """
    if collect:
        gc.collect()
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
