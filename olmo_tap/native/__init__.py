"""olmo-tap's own C++ kernels, built on first use for this CPU.

Each kernel is one source file next to the module that uses it, compiled with torch's C++ extension loader
(ninja and the system C++ compiler) with ``-O3 -march=native -fopenmp`` (ATen's ``parallel_for`` is inline
OpenMP: built without it, a kernel's loop runs on one thread whatever ``torch.set_num_threads`` says), and
cached under torch's extension directory by a name that hashes the source (its text and its path: two checkouts
never rebuild each other's kernels), its flags, torch's version and this CPU's instruction-set flags (a build made on
an AVX-512 machine is never loaded on an AVX2 one). Concurrent processes build one at a time under a lock the OS
releases when its holder dies, so a build killed half-way never leaves the next process waiting forever. A kernel
registers dispatcher ops (``torch.ops.olmo_tap.*``). Where it cannot be built (no compiler, no ninja, a build
error), ``NativeKernel.available()`` says why and its callers take their torch route.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_has(*flags: str) -> bool:
    """Whether this CPU lists every one of ``flags`` (as /proc/cpuinfo names them; False where it cannot tell)."""
    return set(flags) <= set(_cpu_flags().split())


@contextlib.contextmanager
def _exclusive(path: Path, what: str) -> Iterator[None]:
    """Holds an advisory lock on ``path`` (flock: the OS drops it when the holder dies, however it dies); says so when
    it has to wait for another process. Where flock does not exist (Windows) it holds nothing."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"olmo-tap: waiting for another process that is building {what}", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class NativeKernel:
    """One C++ source built once per process on first ``available()``; ``register`` (if given) runs after the
    load (fake kernels for the compiled step); ``extra_cflags`` follow ``-O3 -march=native`` (a test builds a
    variant of a kernel that way, its ops under another namespace)."""

    def __init__(
        self,
        source: Path,
        name: str,
        what: str,
        register: Callable[[], None] | None = None,
        extra_cflags: tuple[str, ...] = (),
    ) -> None:
        self.source = source
        self.name = name
        self.what = what
        self.register = register
        self.extra_cflags = extra_cflags
        self._lock = threading.Lock()
        self._error: str | None = None
        self.library: str | None = None  # the built shared library, once loaded
        self._tried = False

    def _build_and_load(self) -> None:
        try:
            self._build_and_load_with(openmp=True)
        except Exception as e:  # a compiler without OpenMP (clang without libomp): the same kernel, one thread
            lines = str(e).strip().splitlines()
            print(
                f"olmo-tap: the native {self.what} did not build with OpenMP ({lines[-1] if lines else e!r}); "
                "trying without it (its loops then run on one thread)",
                file=sys.stderr,
            )
            self._build_and_load_with(openmp=False)

    def _build_and_load_with(self, openmp: bool) -> None:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:  # the pip wheel's binary, where the system has none
            try:
                import ninja

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            except ImportError:
                pass
        # -fopenmp: ATen's parallel_for is inline OpenMP; without it a kernel's loop runs on one thread
        openmp_flags = ["-fopenmp"] if openmp else []
        cflags = ["-O3", "-march=native", *openmp_flags, *self.extra_cflags]
        built_from = (
            str(self.source.resolve()) + self.source.read_text() + _cpu_flags() + torch.__version__ + " ".join(cflags)
        )
        tag = hashlib.sha256(built_from.encode()).hexdigest()[:12]
        name = f"olmo_tap_{self.name}_{tag}"
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        with _exclusive(build_dir / "olmo_tap.lock", f"the native {self.what}"):
            # torch's own lock file outlives a build that was killed, and then every later load waits on it forever;
            # under our lock no other process is building here, so one still present is such a leftover
            (build_dir / "lock").unlink(missing_ok=True)
            if not (build_dir / f"{name}.so").exists():  # the one slow moment: say what it is
                print(f"olmo-tap: building the native {self.what} for this CPU (once, about a minute)", file=sys.stderr)
            self.library = cpp_extension.load(
                name=name,
                sources=[str(self.source)],
                extra_cflags=cflags,
                extra_ldflags=openmp_flags,
                is_python_module=False,
                verbose=False,
            )
        if self.register is not None:
            self.register()

    def available(self) -> str | None:
        """None once the kernel is built and loaded (building it on the first call), else why it is not."""
        if not self._tried:
            with self._lock:
                if not self._tried:
                    try:
                        self._build_and_load()
                    except Exception as e:  # no compiler, no ninja, or a build error: the torch routes remain
                        lines = str(e).strip().splitlines()
                        self._error = f"{type(e).__name__}: {lines[-1] if lines else ''}"
                    self._tried = True
        return self._error
