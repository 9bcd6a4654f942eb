"""Giving freed memory back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable

import torch


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): its allocator returns memory its own way
        return None


def release_freed_memory() -> None:
    """Collect garbage and hand the allocator's free pages back (glibc's ``malloc_trim``; the CUDA cache on a GPU).

    Many small objects freed at once (a GGUF reader's tokenizer entries, a dropped model's Python side) leave
    pages the allocator keeps for reuse; the large tensors allocated next come from fresh mappings instead, so
    without this the freed pages stay in the process's resident memory on top of them.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
