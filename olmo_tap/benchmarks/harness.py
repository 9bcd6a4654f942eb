"""Measuring on one machine: device-aware timestamps, peak memory, interleaved repetitions within a time budget,
memory bandwidth, and a record of the machine and the software.

On a GPU every timestamp is a CUDA event (read after one synchronisation at the end), so it marks when the
device got there; on CPU it is ``time.perf_counter``.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from olmo_tap.benchmarks.stats import summarize

T = TypeVar("T")


class Stopwatch:
    """Timestamps in milliseconds since ``start()``: ``mark()`` any number of times, then ``stop()``."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._marks: list[Any] = []
        self._start: Any = None

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()  # nothing queued before the start is counted
        self._marks = []
        self._start = self._now()

    def mark(self) -> None:
        self._marks.append(self._now())

    def stop(self) -> tuple[list[float], float]:
        """(ms of every mark, ms of the whole span) since ``start()``."""
        end = self._now()
        if self.cuda:
            torch.cuda.synchronize()
            return [self._start.elapsed_time(m) for m in self._marks], self._start.elapsed_time(end)
        return [1e3 * (m - self._start) for m in self._marks], 1e3 * (end - self._start)


def time_calls(
    fn: Callable[[], Any], device: torch.device | str, budget_ms: float, min_repeats: int = 3
) -> list[float]:
    """Milliseconds of repeated calls of ``fn`` (one warm-up call first) until ``budget_ms`` is spent."""
    watch = Stopwatch(device)
    fn()
    times: list[float] = []
    while len(times) < min_repeats or sum(times) < budget_ms:
        watch.start()
        fn()
        times.append(watch.stop()[1])
    return times


# ----- peak memory -------------------------------------------------------------------------------------------------


def _proc_status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakMemory:
    """Peak memory while the ``with`` block runs.

    CUDA: ``torch.cuda.max_memory_allocated`` (bytes held by tensors), reset on entry. CPU: the process's peak
    resident set size (``VmHWM`` in /proc/self/status), reset on entry by writing 5 to /proc/self/clear_refs
    (Linux >= 4.0); where that is not allowed, or off Linux (``ru_maxrss``), the peak since the process started
    (``resettable`` False). RSS counts everything resident: loaded models, packed weights, the allocator's cache.
    ``increase_bytes`` is the peak minus the level on entry: the block's own working memory.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.kind = "cuda_max_memory_allocated" if self.cuda else "peak_rss"
        self.resettable = True
        self.before: int | None = None
        self.peak_bytes: int | None = None

    def _peak(self) -> int | None:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        hwm = _proc_status_bytes("VmHWM")
        if hwm is not None:
            return hwm
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.resettable = False
        self.before = _proc_status_bytes("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.peak_bytes = self._peak()

    @property
    def increase_bytes(self) -> int | None:
        if self.peak_bytes is None or self.before is None or not self.resettable:
            return None
        return max(0, self.peak_bytes - self.before)


# ----- repetitions ---------------------------------------------------------------------------------------------------


def run_interleaved(
    tasks: Mapping[str, Callable[[int], T]],
    *,
    warmup_ms: float,
    measure_ms: float,
    min_repeats: int,
    max_repeats: int,
    desc: str = "",
    progress: bool = True,
) -> dict[str, list[T]]:
    """Run every task once per round, round after round, and keep the measured rounds' results.

    Interleaving makes a slow drift of the machine (other processes, heat) hit every task alike. Warm-up rounds
    run until ``warmup_ms`` has passed (at least one when it is > 0) and are discarded; measured rounds run
    until each task has had ``measure_ms`` on average and at least ``min_repeats`` rounds, at most
    ``max_repeats``. A task gets the index of the measured round (its seed offset); warm-up rounds pass 0.
    """
    names = list(tasks)
    results: dict[str, list[T]] = {name: [] for name in names}
    with tqdm(desc=desc, unit="run", disable=not progress, leave=True, dynamic_ncols=True) as bar:

        def one_round(repeat: int, keep: bool) -> float:
            start = time.perf_counter()
            for name in names:
                bar.set_postfix_str(("warm-up " if not keep else "") + name, refresh=False)
                result = tasks[name](repeat)
                if keep:
                    results[name].append(result)
                bar.update(1)
            return 1e3 * (time.perf_counter() - start)

        warm_rounds, spent, round_ms = 0, 0.0, 0.0
        while spent < warmup_ms:
            round_ms = one_round(0, keep=False)
            spent += round_ms
            warm_rounds += 1
        spent = 0.0
        for repeat in range(max_repeats):
            if repeat >= min_repeats and spent >= measure_ms * len(names):
                break
            round_ms = one_round(repeat, keep=True)
            spent += round_ms
            if repeat == 0:  # now a round's length is known: show the expected total
                expected = min(max_repeats, max(min_repeats, math.ceil(measure_ms * len(names) / max(round_ms, 1e-3))))
                bar.total = (warm_rounds + expected) * len(names)
                bar.refresh()
        bar.total = bar.n
    return results


# ----- the machine ----------------------------------------------------------------------------------------------------


def measure_bandwidth(device: torch.device | str, mib: int, budget_ms: float) -> dict[str, Any]:
    """Memory bandwidth on ``device`` in GB/s (1e9 bytes): reading an fp32 buffer of ``mib`` MiB (a sum, which
    streams it once) and copying it into another (counted as read + write, 2x its size)."""
    n = mib * 2**20 // 4
    source = torch.ones(n, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    read_ms = time_calls(lambda: source.sum(), device, budget_ms / 2)
    copy_ms = time_calls(lambda: target.copy_(source), device, budget_ms / 2)
    size = n * 4
    read, copy = summarize(read_ms), summarize(copy_ms)
    return {
        "buffer_bytes": size,
        "read_gb_s": size / (read["median"] * 1e-3) / 1e9,
        "copy_gb_s": 2 * size / (copy["median"] * 1e-3) / 1e9,
        "read_ms": read,
        "copy_ms": copy,
        "method": f"median time to sum (read) and to copy an fp32 buffer of {mib} MiB on {torch.device(device)}, "
        f"{torch.get_num_threads()} torch threads",
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags(wanted: tuple[str, ...] = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")) -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in present]
    except OSError:
        pass
    return []


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    memory = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cuda = device.type == "cuda"
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": memory,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_model(),
        "cuda_version": torch.version.cuda if cuda else None,
        "load_average_start": load_average(),
        "load_average_end": None,
        "process_cpu_share": None,
    }


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed or no metadata
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).resolve().parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def software_versions() -> dict[str, Any]:
    import olmo_tap

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "numpy": _version("numpy"),
        "matplotlib": _version("matplotlib"),
        "olmo_tap": olmo_tap.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
    }
