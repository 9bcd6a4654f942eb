"""Inference latency and throughput: what the jury costs against plain decoding and against transformers.

Configurations, timed back to back in one process on the same prompt (interleaved: every configuration once per
round, so a drifting machine hits them alike):

- ``baseline``: one tower of the Hydra (trunk, one head, lm_head) decoding alone with our KV cache
  (``PoE(mode="single")``); ``baseline_<dtype>`` the same on a one-tower model in another dtype (bf16 on CPU).
- ``hydra_naive``: every text head every step, logits averaged (``PoE(mode="naive")``).
- ``hydra_poe_g<gamma>_<greedy|sampled>``: PoE speculative verification, for each gamma of the sweep; with
  ``extra_heads`` the baseline, naive and PoE rows again on Hydras with more heads (suffix ``_<n>h``), each
  such group timed on its own.
- ``hf_generate``: transformers' ``generate()``, greedy, on the same base checkpoint (the outside reference).

Every run produces exactly ``gen_length`` tokens (end-of-text ignored). Per-token arrival times come from the
decoders' own streams (PoE's TokenEvents, transformers' streamer), timed with CUDA events on a GPU and
``perf_counter`` on CPU; peak memory, the memory bandwidth and the weight bytes read per token come from the same
process. Results: ``results.json`` (schema in ``olmo_tap.benchmarks.schema``) and ``graph.png``.

Run it with ``olmo-tap bench [--quick] [--config FILE] ...`` (or ``python -m olmo_tap.benchmarks.inference``).
Knobs and their defaults: ``config.json`` next to this file, documented in ``olmo_tap.benchmarks.config``.
"""

from __future__ import annotations

import datetime as dt
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from olmo_tap.benchmarks import targets as target_rules
from olmo_tap.benchmarks.config import BenchConfig
from olmo_tap.benchmarks.harness import (
    PeakMemory,
    Stopwatch,
    load_average,
    machine_info,
    measure_bandwidth,
    run_interleaved,
    software_versions,
)
from olmo_tap.benchmarks.overhead import bare_linear_layers, compiled_step_layers, profile_decode
from olmo_tap.benchmarks.schema import Results, group_suffix
from olmo_tap.benchmarks.stats import (
    amortised_latencies,
    decode_tokens_per_second,
    per_position_median,
    summarize,
)
from olmo_tap.hydra import HydraTransformer
from olmo_tap.inference.poe import PoE, PoEOutput
from olmo_tap.inference.prompts import encode_chat
from olmo_tap.inference.settings import DecodeSettings
from olmo_tap.memory import release_freed_memory
from olmo_tap.model.kernels import torch_threads

PROMPT_TEXT = "Explain, step by step, how a bicycle works and why it stays upright. "
TTFT_MAX_REPEATS = 200


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def build_prompt_ids(tokenizer: Any, length: int) -> list[int]:
    """A real chat prompt of exactly ``length`` tokens: a user message of repeated text in the chat template,
    keeping its last ``length`` tokens (so it still ends with the assistant's generation prompt)."""
    text = PROMPT_TEXT
    previous = -1
    while True:
        ids = encode_chat(tokenizer, text)
        if len(ids) >= length:
            return ids[-length:]
        if len(ids) <= previous:
            raise ValueError(f"the tokenizer does not make prompts longer than {len(ids)} tokens (asked {length})")
        previous = len(ids)
        text += text


# ----- timed generations -------------------------------------------------------------------------------------------


@dataclass
class Trace:
    """One timed generation."""

    arrivals_ms: list[float]  # each token's arrival, ms since the call began
    total_ms: float
    rounds: list[tuple[int, int]]  # (round, drafts it put to the jury) of each token, from the decoder's events
    memory: PeakMemory
    output: PoEOutput | None = None  # ours, full runs only
    text: str = ""


@dataclass(frozen=True)
class WeightBytes:
    """Weight bytes one pass reads: the trunk, one head's layers, the final norm and lm_head."""

    trunk: int
    head: int
    lm_head: int

    @classmethod
    def of(cls, model: HydraTransformer) -> WeightBytes:
        def size(params: Any) -> int:  # released (meta) float weights of a quantized model are not read
            return sum(p.numel() * p.element_size() for p in params if p.device.type != "meta")

        def quantized(blocks: Any, tower: int) -> int:
            return sum(p.quantized[tower].nbytes for b in blocks for p in b._packed.values() if p.quantized)

        lm_head = model._packed_lm_head.quantized
        return cls(
            trunk=size(model.trunk.parameters()) + quantized(model.trunk, 0),
            head=size(model.heads.parameters()) // model.n_heads + quantized(model.heads, 0),
            lm_head=size([model.lm_head, *model.norm.parameters()]) + (lm_head[0].nbytes if lm_head else 0),
        )

    @property
    def tower(self) -> int:
        return self.trunk + self.head + self.lm_head


def resident_weight_bytes(model: HydraTransformer) -> int:
    """Bytes of the model's parameters plus the packed copies of its linear weights (CPU); a quantized
    model's codes, scales and minimums instead of its released float weights."""
    holders = [packed for block in [*model.trunk, *model.heads] for packed in block._packed.values()]
    packs = [pack for packed in [*holders, model._packed_lm_head] for pack in packed.held()]
    tensors = [p for p in model.parameters() if p.device.type != "meta"] + packs
    total = sum(t.numel() * t.element_size() for t in tensors)
    if model.quantization is not None:
        from olmo_tap.quant.model import quantized_bytes

        total += quantized_bytes(model)
    return total


@dataclass
class Candidate:
    """A configuration to time: what it is, and how to run it once."""

    name: str
    kind: str  # baseline | hydra_naive | hydra_poe | hf_generate
    group: int  # heads of the Hydra whose group it is timed in
    n_heads: int | None
    dtype: torch.dtype
    gamma: int | None
    sampling: str
    temperature: float
    generate: Callable[[list[int], int, bool], Trace]  # (prompt ids, measured-round index, first token only)
    resident_bytes: int = 0  # weights held in memory by the model it runs on (prepacked copies included)
    weights: WeightBytes | None = None  # ours
    n_text_heads: int = 1
    fixed_bytes_per_token: int | None = None  # transformers, llama.cpp
    quantization: str | None = None  # the weights' quantization (ours: model.quantization; llama.cpp: the file's)
    full: list[Trace] = field(default_factory=list)
    ttft: list[Trace] = field(default_factory=list)


def baseline_head(config: BenchConfig, model: HydraTransformer) -> int:
    """The head a baseline runs: the configured draft head where the model has it, else head 0."""
    head = config.draft_head
    return head if head is not None and head < model.n_text_heads else 0


def ours(
    name: str,
    kind: str,
    group: int,
    model: HydraTransformer,
    tokenizer: Any,
    config: BenchConfig,
    mode: str,
    gamma: int | None = None,
    sampling: str = "greedy",
    compile: bool = False,
) -> Candidate:
    """A configuration decoded by ``PoE`` in ``mode`` (single, naive or poe); ``compile``: the compiled step
    (single: the head's; poe: the draft head's)."""
    temperature = config.temperature if sampling == "sampled" else 0.0
    settings = DecodeSettings(
        mode=mode,  # type: ignore[arg-type]
        gamma=gamma or 1,
        beta=config.beta,
        temperature=temperature,
        seed=config.seed,
        draft_head=config.draft_head if mode == "poe" else None,
        head=baseline_head(config, model) if mode == "single" else None,
        max_new_tokens=config.gen_length,
        ignore_eos=True,
        compile=compile,
    )
    decoder = PoE.from_settings(model, tokenizer, settings)

    def generate(prompt_ids: list[int], repeat: int, first_only: bool) -> Trace:
        watch, flags = Stopwatch(model.device), []
        with PeakMemory(model.device) as memory:
            watch.start()
            stream = decoder.stream(prompt_ids=prompt_ids, temperature=temperature, seed=config.seed + repeat)
            events = iter(stream)
            for event in events:
                watch.mark()
                flags.append((event.round, event.drafted))
                if first_only:
                    break
            arrivals, total = watch.stop()
        events.close()  # a stream left after its first token is closed now, not whenever it is collected
        output = None if first_only else stream.output
        return Trace(arrivals, total, flags, memory, output, output.text if output else "")

    return Candidate(
        name,
        kind,
        group,
        model.n_heads,
        model.dtype,
        gamma,
        sampling,
        temperature,
        generate,
        resident_bytes=resident_weight_bytes(model),
        weights=WeightBytes.of(model),
        n_text_heads=decoder.n_llm_heads,
        quantization=model.quantization,
    )


def transformers_reference(model: Any, tokenizer: Any, config: BenchConfig, group: int) -> Candidate:
    from olmo_tap.benchmarks.hf_reference import generate_timed, reference_weight_bytes_per_token

    def generate(prompt_ids: list[int], repeat: int, first_only: bool) -> Trace:
        watch = Stopwatch(model.device)
        with PeakMemory(model.device) as memory:
            watch.start()
            ids = generate_timed(model, prompt_ids, 1 if first_only else config.gen_length, watch)
            arrivals, total = watch.stop()
        return Trace(arrivals, total, [(i, 1) for i in range(len(ids))], memory, None, tokenizer.decode(ids))

    return Candidate(
        "hf_generate",
        "hf_generate",
        group,
        None,
        model.dtype,
        None,
        "greedy",
        0.0,
        generate,
        resident_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        fixed_bytes_per_token=reference_weight_bytes_per_token(model),
    )


def hydra_candidates(
    model: HydraTransformer, tokenizer: Any, config: BenchConfig, main_heads: int, prefix: str = ""
) -> list[Candidate]:
    """The baseline (one tower of this Hydra), naive averaging and the PoE sweep (gammas x samplings)."""
    group = model.n_heads
    suffix = "" if prefix else group_suffix(group, main_heads)
    found = [
        ours(f"{prefix}baseline{suffix}", "baseline", group, model, tokenizer, config, "single"),
        ours(f"{prefix}hydra_naive{suffix}", "hydra_naive", group, model, tokenizer, config, "naive"),
    ]
    for gamma in config.gammas:
        for sampling in config.samplings:
            name = f"{prefix}hydra_poe_g{gamma}_{sampling}{suffix}"
            found.append(ours(name, "hydra_poe", group, model, tokenizer, config, "poe", gamma, sampling))
    return found


def summarise_group(candidates: list[Candidate], baseline_name: str, gen_length: int, read_gb_s: float) -> list[dict]:
    """ConfigResults of one group, in order; PoE's verification estimate uses the group's own baseline step."""
    baseline = next(c for c in candidates if c.name == baseline_name)
    baseline_result = summarise(baseline, gen_length, read_gb_s, None)
    step = baseline_result["decode_step_ms"]
    step_ms = step["median"] if step else None
    return [baseline_result if c is baseline else summarise(c, gen_length, read_gb_s, step_ms) for c in candidates]


def time_candidates(
    candidates: list[Candidate], prompt_ids: list[int], config: BenchConfig, desc: str, progress: bool = True
) -> None:
    """Full-length runs, then time-to-first-token runs, each interleaved over ``candidates``."""
    full = run_interleaved(
        {c.name: (lambda r, c=c: c.generate(prompt_ids, r, False)) for c in candidates},
        warmup_ms=config.warmup_ms,
        measure_ms=config.measure_ms,
        min_repeats=config.min_repeats,
        max_repeats=config.max_repeats,
        desc=desc,
        progress=progress,
    )
    first = run_interleaved(
        {c.name: (lambda r, c=c: c.generate(prompt_ids, r, True)) for c in candidates},
        warmup_ms=0,
        measure_ms=config.ttft_ms,
        min_repeats=config.ttft_min_repeats,
        max_repeats=max(config.ttft_min_repeats, TTFT_MAX_REPEATS),
        desc=desc + " (time to first token)",
        progress=progress,
    )
    for c in candidates:
        c.full, c.ttft = full[c.name], first[c.name]


# ----- from traces to results ----------------------------------------------------------------------------------------


def _rounds(c: Candidate, trace: Trace, gen_length: int) -> list[tuple[int, int]]:
    """(tokens emitted, tokens drafted) per round, as the decoder's events say."""
    if c.kind != "hydra_poe":
        return [(1, 1)] * len(trace.arrivals_ms)
    sizes: dict[int, list[int]] = {}
    for index, drafted in trace.rounds:
        sizes.setdefault(index, [0, drafted])[0] += 1
    return [(emitted, drafted) for emitted, drafted in sizes.values()]


def weight_bytes_per_token(c: Candidate, rounds: list[list[tuple[int, int]]], gen_length: int) -> float:
    """Weight bytes read per emitted token, from what the runs actually did."""
    if c.fixed_bytes_per_token is not None:
        return float(c.fixed_bytes_per_token)
    w = c.weights
    assert w is not None
    if c.kind == "baseline":
        return float(w.tower)
    if c.kind == "hydra_naive":
        return float(w.trunk + c.n_text_heads * w.head + w.lm_head)
    # PoE: every draft step reads trunk + draft head + lm_head; every round's verification pass reads the
    # verifier heads and the lm_head once for all its positions.
    total = 0
    for run in rounds:
        draft_steps = sum(drafted for _, drafted in run)
        total += draft_steps * w.tower + len(run) * ((c.n_text_heads - 1) * w.head + w.lm_head)
    return total / (gen_length * len(rounds))


def summarise(c: Candidate, gen_length: int, read_gb_s: float, step_ms: float | None) -> dict[str, Any]:
    """One ConfigResult (as a dict) from a candidate's traces; ``step_ms`` is the baseline's decode step (for
    PoE's estimate of its verification cost)."""
    for trace in c.full:
        if len(trace.arrivals_ms) != gen_length:
            raise RuntimeError(f"{c.name}: a run produced {len(trace.arrivals_ms)} tokens, expected {gen_length}")
    rounds = [_rounds(c, t, gen_length) for t in c.full]
    sizes = [[emitted for emitted, _ in r] for r in rounds]
    latencies = [amortised_latencies(t.arrivals_ms, s) for t, s in zip(c.full, sizes, strict=True)]
    decode_rates = [decode_tokens_per_second(t.arrivals_ms, s[0]) for t, s in zip(c.full, sizes, strict=True)]
    decode_rates = [r for r in decode_rates if r is not None]
    call_ms = summarize([t.total_ms for t in c.full])
    decode_tps = statistics.median(decode_rates) if decode_rates else None
    per_position = per_position_median(latencies)
    bytes_per_token = weight_bytes_per_token(c, rounds, gen_length)
    weight_gb_s = bytes_per_token * decode_tps / 1e9 if decode_tps else None
    memories = [t.memory for t in c.full + c.ttft]
    peaks = [m.peak_bytes for m in memories if m.peak_bytes is not None]
    increases = [m.increase_bytes for m in memories if m.increase_bytes is not None]
    result: dict[str, Any] = {
        "name": c.name,
        "group": c.group,
        "kind": c.kind,
        "n_heads": c.n_heads,
        "dtype": dtype_name(c.dtype),
        "gamma": c.gamma,
        "sampling": c.sampling,
        "temperature": c.temperature,
        "new_tokens": gen_length,
        "n_runs": len(c.full),
        "call_ms": call_ms,
        "tokens_per_s": 1000.0 * gen_length / call_ms["median"],
        "decode_tokens_per_s": decode_tps,
        "decode_step_ms": summarize([1000.0 / r for r in decode_rates]) if decode_rates else None,
        "ttft_ms": summarize([t.arrivals_ms[0] for t in c.ttft]),
        "ttft_samples_ms": [t.arrivals_ms[0] for t in c.ttft],
        "per_position_latency_ms": per_position,
        "per_position_tokens_per_s": [1000.0 / x if x else None for x in per_position],
        "memory": {
            "kind": memories[0].kind,
            "peak_bytes": max(peaks) if peaks else None,
            "increase_bytes": max(increases) if increases else None,
            "resettable": all(m.resettable for m in memories),
            "weight_bytes": c.resident_bytes,
        },
        "weight_bytes_per_token": bytes_per_token,
        "weight_gb_s": weight_gb_s,
        "bandwidth_utilisation": weight_gb_s / read_gb_s if weight_gb_s else None,
        "poe": None if c.kind != "hydra_poe" else _poe_stats(c, rounds, call_ms["median"], gen_length, step_ms),
        "sample_text": c.full[-1].text,
        "quantization": c.quantization,
    }
    return result


def _poe_stats(
    c: Candidate, rounds: list[list[tuple[int, int]]], median_call_ms: float, gen_length: int, step_ms: float | None
) -> dict[str, Any]:
    outputs = [t.output for t in c.full]
    assert c.gamma is not None and all(o is not None for o in outputs)
    runs = len(outputs)
    accepted = sum(o.n_accepted for o in outputs)  # type: ignore[union-attr]
    drafted = sum(o.n_drafted for o in outputs)  # type: ignore[union-attr]
    resampled = sum(len(o.resampled_idxs) for o in outputs)  # type: ignore[union-attr]
    n_rounds = sum(len(r) for r in rounds)
    # Decode time per round after the first, and what is left of it once its draft steps are paid.
    round_ms, draft_steps_per_round = [], []
    for trace, run in zip(c.full, rounds, strict=True):
        if len(run) > 1:
            first = run[0][0]
            round_ms.append((trace.arrivals_ms[-1] - trace.arrivals_ms[first - 1]) / (len(run) - 1))
            draft_steps_per_round.append(sum(d for _, d in run[1:]) / (len(run) - 1))
    median_round = statistics.median(round_ms) if round_ms else None
    verify = None
    if median_round is not None and step_ms is not None:
        verify = median_round - statistics.mean(draft_steps_per_round) * step_ms
    return {
        "gamma": c.gamma,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "resample_rate": resampled / (gen_length * runs),
        "tokens_per_round": gen_length * runs / n_rounds,
        "accepted_per_call": accepted / runs,
        "resampled_per_call": resampled / runs,
        "drafted_per_call": drafted / runs,
        "draft_steps_per_call": sum(d for run in rounds for _, d in run) / runs,
        "rounds_per_call": n_rounds / runs,
        "median_call_ms": median_call_ms,
        "effective_tokens_per_s": 1000.0 * (accepted / runs) / median_call_ms,
        "user_visible_tokens_per_s": 1000.0 * gen_length / median_call_ms,
        "round_ms": median_round,
        "verify_ms_per_round_estimate": verify,
    }


# ----- the whole run -------------------------------------------------------------------------------------------------


def model_info(model: HydraTransformer, source: str) -> dict[str, Any]:
    c = model.base_config
    weights = WeightBytes.of(model)
    return {
        "source": source,
        "family": c.family,
        "n_layers": c.n_layers,
        "d_model": c.d_model,
        "vocab_size": c.vocab_size,
        "n_heads": model.n_heads,
        "heads_depth": model.config.head_layers,
        "trunk_layers": model.config.trunk_layers,
        "dtype": dtype_name(model.dtype),
        "device": str(model.device),
        "parameters": model.num_params(),
        "tower_bytes_per_token": weights.tower,
        "head_bytes": weights.head,
    }


def run_benchmark(config: BenchConfig, command: str = "olmo-tap bench", progress: bool = True) -> Results:
    """Time every configuration of ``config``; returns the validated results (nothing is written). The torch
    thread count is set for the run (``config.threads``) and restored afterwards."""
    with torch_threads(config.threads):
        return _run(config, command, progress)


def _run(config: BenchConfig, command: str, progress: bool) -> Results:
    from olmo_tap.weights.loading import default_device, resolve_dtype
    from olmo_tap.weights.sources import resolve
    from olmo_tap.weights.tokenizer import load_tokenizer

    torch.manual_seed(config.seed)
    device = torch.device(config.device) if config.device else default_device()
    dtype = resolve_dtype(config.dtype, device)
    source = resolve(config.model)
    ensemble = source.has_own_heads  # a saved ensemble or a trained preset: its heads are fixed
    notes: list[str] = []
    machine = machine_info(device)
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    versions = software_versions()
    bandwidth = measure_bandwidth(device, config.bandwidth_mib, config.micro_ms)
    read_gb_s = bandwidth["read_gb_s"]
    tokenizer = load_tokenizer(config.model, progress=False)
    prompt_ids = build_prompt_ids(tokenizer, config.prompt_length)

    def load(n_heads: int | None, load_dtype: torch.dtype) -> HydraTransformer:
        return HydraTransformer.from_pretrained(
            config.model, n_heads, config.heads_depth, dtype=load_dtype, device=device, progress=False
        )

    # Group 1: the Hydra timed in full, its baseline, baselines in other dtypes, and transformers.
    model = load(config.heads, dtype)
    if model.n_text_heads < 2:
        raise ValueError(f"PoE needs at least 2 text heads; {config.model} gives {model.n_text_heads}")
    main_heads = model.n_heads
    candidates = hydra_candidates(model, tokenizer, config, main_heads)
    towers = {"baseline": model}  # baseline configurations and the model each runs on
    for name in dict.fromkeys(config.extra_baseline_dtypes):
        extra_dtype = resolve_dtype(name, device)
        if extra_dtype != dtype:
            short = SHORT_DTYPE.get(dtype_name(extra_dtype), dtype_name(extra_dtype))
            label = f"baseline_{short}"
            towers[label] = load(None if ensemble else 1, extra_dtype)
            # after the baseline and the baselines before it
            candidates.insert(
                len(towers) - 1, ours(label, "baseline", main_heads, towers[label], tokenizer, config, "single")
            )
    hf_model = None
    if config.hf_generate and ensemble:
        notes.append("hf_generate skipped: a jury's trained heads are not a checkpoint transformers can load")
    elif config.hf_generate:
        from olmo_tap.benchmarks.hf_reference import load_reference_model

        hf_model = load_reference_model(config.model, dtype, device)
        candidates.insert(0, transformers_reference(hf_model, tokenizer, config, main_heads))
    time_candidates(candidates, prompt_ids, config, f"{main_heads} heads", progress)
    configs = summarise_group(candidates, "baseline", config.gen_length, read_gb_s)
    timed_towers = [r for r in configs if r["name"] in towers and r["decode_step_ms"] is not None]
    linear_layers = [
        bare_linear_layers(
            towers[r["name"]], baseline_head(config, towers[r["name"]]), r["decode_step_ms"]["median"], config.micro_ms
        )
        for r in timed_towers
    ]
    if config.compiled_step and device.type == "cpu":
        for r in timed_towers:
            tower = towers[r["name"]]
            linear_layers.append(
                compiled_step_layers(tower, baseline_head(config, tower), prompt_ids, 3 * config.micro_ms)
            )
    elif config.compiled_step:
        notes.append("compiled step not timed: measured on CPU only")
    profile = None
    if config.profile_tokens > 0:
        profiled = PoE(
            model,
            tokenizer,
            max_new_tokens=config.profile_tokens + 1,
            mode="single",
            head=baseline_head(config, model),
            ignore_eos=True,
            seed=config.seed,
        )
        profile = {"config": "baseline", "dtype": dtype_name(dtype)}
        profile.update(profile_decode(profiled, prompt_ids, config.profile_tokens))
        del profiled
    info = model_info(model, config.model)
    del candidates, towers, model, hf_model
    release_freed_memory()

    # Further groups: baseline, naive and PoE on Hydras with other numbers of heads.
    for n_heads in config.extra_heads:
        if ensemble:
            notes.append(f"extra_heads {n_heads} skipped: a trained jury has a fixed number of heads")
            continue
        if n_heads == main_heads:
            continue
        group = hydra_candidates(load(n_heads, dtype), tokenizer, config, main_heads)
        time_candidates(group, prompt_ids, config, f"{n_heads} heads", progress)
        configs += summarise_group(group, group[0].name, config.gen_length, read_gb_s)
        del group
        release_freed_memory()

    # The trained jury beside the main model: heads that differ reject drafts, which clones never do greedily.
    trained: list[dict] = []
    if config.jury_model is not None and config.jury_model != config.model:
        jury = HydraTransformer.from_pretrained(config.jury_model, dtype=dtype, device=device, progress=False)
        group = hydra_candidates(jury, load_tokenizer(config.jury_model, progress=False), config, main_heads, "jury_")
        time_candidates(group, prompt_ids, config, "trained jury", progress)
        trained = summarise_group(group, group[0].name, config.gen_length, read_gb_s)
        del group, jury
        release_freed_memory()

    quantized = _quantized_group(config, device, tokenizer, prompt_ids, read_gb_s, main_heads, notes, progress)

    machine["load_average_end"] = load_average()
    if device.type == "cpu":
        wall = time.perf_counter() - started_wall
        machine["process_cpu_share"] = (time.process_time() - started_cpu) / (wall * torch.get_num_threads())
    start_load = machine["load_average_start"]
    share = machine.get("process_cpu_share")
    # On CPU the process's share of its threads' time says whether others competed during the run; the load
    # average only stands in without it (GPU): it lags by minutes (counting jobs that just ended) and the load
    # at the end counts this run's own threads.
    busy_start = bool(start_load and start_load[0] > 0.5 * (machine["cpu_count"] or 1))
    if (share is None and busy_start) or (share is not None and share < 0.8):
        notes.append(
            f"other processes shared the cores (load average {start_load[0] if start_load else '?'} when the run "
            f"began on {machine['cpu_count']} CPUs"
            + (f"; this process got {share:.0%} of its threads' time" if share is not None else "")
            + "): absolute rates are pessimistic and noisy; ratios within a group less so (interleaved)"
        )
    if not ensemble:
        notes.append(
            f"{config.model}'s heads are clones of the base model's last layers: greedy PoE accepts every "
            "draft by construction; sampled PoE still rejects, because the product of the verifiers' "
            "distributions is sharper than the drafter's"
        )
    results = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine,
        "versions": versions,
        "config": config.to_dict(),
        "model": info,
        "prompt_ids": prompt_ids,
        "bandwidth": bandwidth,
        "configs": configs,
        "linear_layers": linear_layers,
        "profile": profile,
        "targets": target_rules.evaluate(configs, linear_layers, device.type),
        "notes": notes,
        "trained_jury": trained,
        "quantized": quantized,
    }
    results["targets"] += target_rules.evaluate_quantized(quantized)
    return Results.model_validate(results)


def _quantized_group(
    config: BenchConfig,
    device: torch.device,
    tokenizer: Any,
    prompt_ids: list[int],
    read_gb_s: float,
    main_heads: int,
    notes: list[str],
    progress: bool,
) -> list[dict]:
    """``config.quantize``'s models, each as its baseline and PoE greedy at gamma 4 (eager and compiled), and
    llama.cpp on the model's GGUF file: one group, timed interleaved (the fair comparison)."""
    from olmo_tap.benchmarks import llama_cpp_reference
    from olmo_tap.weights.loading import gguf_source_path
    from olmo_tap.weights.sources import resolve

    if not config.quantize and not config.llama_cpp:
        return []
    if device.type != "cpu":
        notes.append("quantized group skipped: the quantized kernels are CPU kernels")
        return []
    gguf_path = gguf_source_path(resolve(config.model))
    group: list[Candidate] = []
    models = []
    gamma = target_rules.TARGET_GAMMA
    for scheme in config.quantize:
        if scheme == "gguf" and gguf_path is None:
            notes.append(f"quantize gguf skipped: {config.model} is not a GGUF source")
            continue
        model = HydraTransformer.from_pretrained(
            config.model, config.heads, config.heads_depth, device=device, progress=False, quantize=scheme
        )
        models.append(model)
        prefix = f"q{scheme}_"
        group += [
            ours(f"{prefix}baseline", "baseline", main_heads, model, tokenizer, config, "single"),
            ours(
                f"{prefix}baseline_compiled", "baseline", main_heads, model, tokenizer, config, "single", compile=True
            ),
            ours(f"{prefix}hydra_poe_g{gamma}_greedy", "hydra_poe", main_heads, model, tokenizer, config, "poe", gamma),
            ours(
                f"{prefix}hydra_poe_g{gamma}_greedy_compiled", "hydra_poe", main_heads, model, tokenizer, config, "poe",
                gamma, compile=True,
            ),
        ]  # fmt: skip
    why_not = llama_cpp_reference.available(gguf_path, config.threads) if config.llama_cpp else None
    if config.llama_cpp and gguf_path is not None and why_not is None:
        group.insert(0, llama_cpp_reference.llama_cpp_candidate(gguf_path, tokenizer, config, main_heads))
    elif config.llama_cpp:
        notes.append(f"llama.cpp not timed: {why_not or f'{config.model} is not a GGUF source'}")
    if not group:
        return []
    time_candidates(group, prompt_ids, config, "quantized", progress)
    rows = [summarise(c, config.gen_length, read_gb_s, None) for c in group]
    del group, models
    release_freed_memory()
    return rows


# ----- output --------------------------------------------------------------------------------------------------------


def next_run_dir(root: Path, date: dt.date | None = None) -> Path:
    """``root/<YYYY-MM-DD>_runNN`` with the first NN (from 01) not taken yet."""
    day = (date or dt.date.today()).isoformat()
    n = 1
    while (root / f"{day}_run{n:02d}").exists():
        n += 1
    return root / f"{day}_run{n:02d}"


def write_results(results: Results, directory: Path) -> tuple[Path, Path]:
    """``results.json`` and ``graph.png`` into ``directory`` (created)."""
    from olmo_tap.benchmarks.plotting import plot_results

    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "results.json"
    json_path.write_text(results.model_dump_json(indent=2) + "\n", encoding="utf-8")
    graph_path = directory / "graph.png"
    plot_results(results, graph_path)
    return json_path, graph_path


def load_results(path: Path) -> Results:
    """Read a ``results.json`` (or the directory holding it) back, checked against the schema."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        return Results.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no results file at {path}") from None


if __name__ == "__main__":
    from olmo_tap.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
