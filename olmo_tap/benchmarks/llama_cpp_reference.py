"""llama.cpp on the same GGUF file, as a reference row of ``olmo-tap bench`` (only where ``llama-cpp-python`` is
installed: ``pip install llama-cpp-python``, which builds llama.cpp from source).

Decoded as a CPU user would run it for a jury's purposes: greedy, each step's logits read back into Python
(a view of llama.cpp's buffer, then numpy's argmax), the same prompt ids (the GGUF carries the same tokenizer),
the same thread count as torch, prefill in one ``eval`` call.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from olmo_tap.benchmarks.harness import PeakMemory, Stopwatch


def available(path: str | Path | None = None, threads: int | None = None) -> str | None:
    """Why llama.cpp cannot be timed here (on GGUF file ``path``, when given), or None.

    With a file, llama.cpp first decodes a few tokens of it in a child process: a build whose kernels this CPU
    (or its hypervisor) refuses dies by a signal, and would take the whole bench down with it. Seen on a KVM
    Sapphire Rapids guest: SIGILL in the AMX path that a native build of llama-cpp-python 0.3.36 turns on.
    """
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install llama-cpp-python)"
    if path is None:
        return None
    probe = (
        "import sys, llama_cpp; llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, n_threads=int(sys.argv[2]), "
        "verbose=False); llm.eval(llm.tokenize(b'Hello there, how are you?'))"
    )
    args = [sys.executable, "-c", probe, str(path), str(threads or torch.get_num_threads())]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        return f"llama.cpp did not decode {Path(path).name} within 10 minutes"
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        return (
            f"llama.cpp dies by {name} on this CPU (its build uses instructions the machine refuses; rebuild "
            "llama-cpp-python for this CPU without them, e.g. CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON ...')"
        )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return f"llama.cpp failed on {Path(path).name}: {lines[-1] if lines else f'exit status {done.returncode}'}"
    return None


def gguf_weight_bytes(path: str | Path) -> int:
    """Bytes of weights llama.cpp reads per decoded token: every tensor but the embedding table, of which it reads
    one row (the table counts in full where it doubles as the tied output matrix)."""
    from olmo_tap.weights.gguf_header import read_gguf_header

    tensors = {t.name: t.n_bytes for t in read_gguf_header(path).tensors}
    embedding = tensors.pop("token_embd.weight", 0)
    return sum(tensors.values()) + (0 if "output.weight" in tensors else embedding)


class LlamaCppDecoder:
    """A llama.cpp context on ``path`` that decodes greedily, one token per ``eval``."""

    def __init__(self, path: str | Path, context: int, threads: int | None = None) -> None:
        from llama_cpp import Llama

        threads = threads or torch.get_num_threads()
        self.llm = Llama(
            model_path=str(path), n_ctx=context, n_batch=min(512, context), n_threads=threads,
            n_threads_batch=threads, logits_all=False, verbose=False,
        )  # fmt: skip
        self.n_vocab = self.llm.n_vocab()

    def _next(self) -> int:
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))
        return int(np.argmax(logits))

    def generate(self, prompt_ids: list[int], n: int, watch: Stopwatch | None = None) -> list[int]:
        """``n`` greedy tokens after ``prompt_ids`` (``watch.mark()`` as each arrives)."""
        self.llm.reset()
        self.llm.eval(prompt_ids)
        ids: list[int] = []
        while True:
            ids.append(self._next())
            if watch is not None:
                watch.mark()
            if len(ids) == n:
                return ids
            self.llm.eval([ids[-1]])


def llama_cpp_candidate(path: str | Path, tokenizer: Any, config: Any, group: int) -> Any:
    """The ``llama_cpp`` row of the bench, on GGUF file ``path``."""
    from olmo_tap.benchmarks.inference import Candidate, Trace

    decoder = LlamaCppDecoder(path, config.prompt_length + config.gen_length + 16, config.threads)

    def generate(prompt_ids: list[int], repeat: int, first_only: bool) -> Trace:
        watch = Stopwatch(torch.device("cpu"))
        with PeakMemory(torch.device("cpu")) as memory:
            watch.start()
            ids = decoder.generate(prompt_ids, 1 if first_only else config.gen_length, watch)
            arrivals, total = watch.stop()
        return Trace(arrivals, total, [(i, 1) for i in range(len(ids))], memory, None, tokenizer.decode(ids))

    size = Path(path).stat().st_size
    return Candidate(
        "llama_cpp", "llama_cpp", group, None, torch.float32, None, "greedy", 0.0, generate,
        resident_bytes=size, fixed_bytes_per_token=gguf_weight_bytes(path),
    )  # fmt: skip
