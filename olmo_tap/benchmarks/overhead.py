"""Where a decode step's time goes: its bare linear layers timed alone, and an operator profile.

Both decoders are measured against the linear layers: the baseline's eager step (its time taken from the
timed generations) and the same tower's step compiled by ``olmo_tap.model.compiled``.

The bare linear layers of one token through one tower (trunk, one head, lm_head) are timed twice on the same
shapes and dtype: with the project's own kernels (``olmo_tap.model.layers.linear`` over the prepacked weights,
exactly what a decode step runs) and with stock ``torch.nn.functional.linear`` on ``(out, in)`` copies of the
weights (what a plain PyTorch model runs). Everything else in a step (norms, rotary, cache writes, attention,
sampling, Python) is the difference between the step and the first.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from olmo_tap.benchmarks.harness import time_calls
from olmo_tap.benchmarks.stats import summarize
from olmo_tap.hydra import HydraTransformer
from olmo_tap.model.layers import linear

LINEAR_NAMES = ("wqkv", "wo", "w13", "w2")


def _tower_weights(model: HydraTransformer, head: int) -> list[tuple[torch.Tensor, slice, Any]]:
    """(weight stack (n, in, out), tower, its packs) of every linear layer one token goes through."""
    calls = [
        (getattr(b, name), slice(t, t + 1), b._packed[name])
        for b, t in model.tower_blocks(head)
        for name in LINEAR_NAMES
    ]
    calls.append((model.lm_head.unsqueeze(0), slice(0, 1), model._packed_lm_head))
    return calls


def _linear_calls(model: HydraTransformer, head: int) -> tuple[Callable[[], None], Callable[[], None], int]:
    """(the project's kernels, stock F.linear, number of matmuls): each call runs one tower's linear layers once
    for one token (inputs are random: speed does not depend on values)."""
    calls = _tower_weights(model, head)
    device, dtype = model.device, model.dtype
    inputs = {w.size(1): torch.randn(1, 1, w.size(1), dtype=dtype, device=device) for w, _, _ in calls}

    def ours() -> None:
        for w, sel, packed in calls:
            linear(inputs[w.size(1)], w, sel, packed)

    # Stock PyTorch: (out, in) weights, F.linear; a temporary copy of one tower's weights.
    stock = [(inputs[w.size(1)][0], w[sel.start].t().contiguous()) for w, sel, _ in calls]

    def stock_linear() -> None:
        for x, w in stock:
            F.linear(x, w)

    return ours, stock_linear, len(calls)


def _layers_result(
    model: HydraTransformer, decoder: str, n_matmuls: int, step_ms: float, packed_ms: list[float], stock_ms: list[float]
) -> dict[str, Any]:
    packed, stock = summarize(packed_ms), summarize(stock_ms)
    return {
        "dtype": str(model.dtype).removeprefix("torch."),
        "decoder": decoder,
        "n_matmuls": n_matmuls,
        "decode_step_ms": step_ms,
        "packed_ms": packed,
        "stock_ms": stock,
        "step_over_packed": step_ms / packed["median"],
        "step_over_stock": step_ms / stock["median"],
    }


@torch.no_grad()
def bare_linear_layers(model: HydraTransformer, head: int, step_ms: float, budget_ms: float) -> dict[str, Any]:
    """A baseline decode step of ``step_ms`` against one tower's linear layers alone, with the project's kernels
    and with stock F.linear."""
    ours, stock_linear, n_matmuls = _linear_calls(model, head)
    packed_ms = time_calls(ours, model.device, budget_ms)
    stock_ms = time_calls(stock_linear, model.device, budget_ms)
    return _layers_result(model, "eager", n_matmuls, step_ms, packed_ms, stock_ms)


COMPILED_STEPS = 16  # positions the compiled step cycles through while timed
ALTERNATIONS = 6


@torch.no_grad()
def compiled_step_layers(model: HydraTransformer, head: int, prompt_ids: list[int], budget_ms: float) -> dict[str, Any]:
    """The compiled decode step (``olmo_tap.model.compiled``) of tower ``head`` against its bare linear layers.

    Compiles first (about a minute on 2 CPU cores). Steps and bare linear layers are then timed in alternating
    blocks, ``budget_ms`` each in all, so that drift in the machine's speed reaches both alike.
    """
    n = len(prompt_ids)
    cache = model.new_cache(1, n)
    model(torch.tensor([prompt_ids]), head_indices=[head], cache=cache)
    tower = model.compiled_tower(head, n + COMPILED_STEPS)
    tower.load_cache(cache, 0, n)
    tower.step(prompt_ids[-1], n)  # compiles
    positions = itertools.cycle(range(n, n + COMPILED_STEPS))

    def step() -> None:
        tower.step(prompt_ids[-1], next(positions))

    ours, stock_linear, n_matmuls = _linear_calls(model, head)
    step_ms, packed_ms, stock_ms = [], [], []
    for _ in range(ALTERNATIONS):
        step_ms += time_calls(step, model.device, budget_ms / ALTERNATIONS)
        packed_ms += time_calls(ours, model.device, budget_ms / ALTERNATIONS)
        stock_ms += time_calls(stock_linear, model.device, budget_ms / ALTERNATIONS)
    return _layers_result(model, "compiled", n_matmuls, summarize(step_ms)["median"], packed_ms, stock_ms)


def _is_cuda_profile(device: torch.device) -> bool:
    return device.type == "cuda"


def profile_decode(decoder: Any, prompt_ids: list[int], n_tokens: int, top: int = 12) -> dict[str, Any]:
    """Operator self-time per token of ``n_tokens`` decode steps of a plain decoder (a ``PoE`` in mode "single"
    whose max_new_tokens is n_tokens + 1), under torch.profiler; the prefill and first token run before the
    profiler starts. The profiler adds its own cost to every operator, so totals exceed an unprofiled step."""
    from torch.profiler import ProfilerActivity, profile

    device = decoder.model.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if _is_cuda_profile(device) else [])
    events = iter(decoder.stream(prompt_ids=prompt_ids, temperature=0.0, seed=0))
    next(events)  # prefill + first token, outside the profile
    with profile(activities=activities) as prof:
        steps = sum(1 for _ in events)
    if steps != n_tokens:
        raise RuntimeError(f"profiled {steps} decode steps, expected {n_tokens}")
    averages = prof.key_averages()
    cuda = _is_cuda_profile(device)

    def self_us(e: Any) -> float:
        return float(e.self_device_time_total if cuda else e.self_cpu_time_total)

    rows = sorted(averages, key=self_us, reverse=True)
    total_us = sum(self_us(e) for e in averages)
    return {
        "tokens": n_tokens,
        "clock": "device" if cuda else "cpu",
        "self_ms_per_token": total_us / 1e3 / n_tokens,
        "ops": [
            {"name": e.key, "calls_per_token": e.count / n_tokens, "self_ms_per_token": self_us(e) / 1e3 / n_tokens}
            for e in rows[:top]
        ],
    }
