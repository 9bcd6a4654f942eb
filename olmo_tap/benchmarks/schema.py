"""The schema of ``results.json``, written by ``olmo-tap bench`` into ``results/<date>_runNN/``.

These models are the documentation: every field says what it holds and in which unit. The benchmark builds its
results through them (so the file cannot drift from this description) and reads them back with
``Results.model_validate_json``. Conventions: times in milliseconds (``_ms``), rates in tokens per second,
sizes in bytes, bandwidth in GB/s (1e9 bytes per second). A ``Summary`` is taken after Tukey outlier filtering
(see ``olmo_tap.benchmarks.stats``).

Definitions used throughout:

- A *run* is one fixed-length generation (``gen_length`` new tokens, end-of-text ignored) from the same prompt.
- *Arrival* of a token: the moment the decoder hands it to the caller (``PoE.stream`` yields its TokenEvent;
  transformers' ``generate()`` calls its streamer).
- *Time to first token* (TTFT): from the call to the first arrival; prefill included. For PoE the first token
  arrives after the first round (gamma draft steps and one verification pass).
- *Round*: one decoding step of a plain decoder, or one draft-then-verify round of PoE. A token's *amortised
  latency* is its round's time (previous round's last arrival to this round's last arrival) divided by the
  tokens the round emitted; tokens of the first round have none (their time is the TTFT).
- *End-to-end tokens/s*: ``gen_length`` / median run time. *Decode tokens/s*: tokens after the first round /
  their time (median over runs). The targets compare end-to-end rates (what a user waits for).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


def group_suffix(group: int, main_heads: int) -> str:
    """What the names of a group's configurations end with: nothing for the main Hydra's, ``_<n>h`` for a
    Hydra of n heads timed for the scaling targets (e.g. ``hydra_naive_9h``)."""
    return "" if group == main_heads else f"_{group}h"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Summary(_Strict):
    """Statistics of repeated measurements after outlier filtering."""

    n: int = Field(description="values kept")
    n_outliers: int = Field(description="values dropped by Tukey's fences (1.5 IQR)")
    median: float
    mean: float
    stdev: float
    min: float
    max: float
    p10: float
    p90: float


class Machine(_Strict):
    platform: str
    cpu: str
    cpu_flags: list[str] = Field(description="vector extensions that matter for matmuls (avx512, bf16, amx)")
    cpu_count: int | None
    torch_threads: int
    memory_bytes: int | None
    device: str
    device_name: str
    cuda_version: str | None
    load_average_start: list[float] | None = Field(description="1, 5, 15-minute load when the run began")
    load_average_end: list[float] | None
    process_cpu_share: float | None = Field(
        description="CPU: this process's CPU time / (wall time x torch threads) over the run: ~0.9 on an idle "
        "machine (Python-only parts use one thread); well below that, other processes took the cores (torch's "
        "threads wait for each other, so every parallel op slows)"
    )


class Versions(_Strict):
    python: str
    torch: str
    transformers: str | None
    numpy: str | None
    matplotlib: str | None
    olmo_tap: str
    git_commit: str | None
    git_dirty: bool | None = Field(description="tracked files differed from the commit")


class Bandwidth(_Strict):
    """Memory bandwidth measured in the same process, just before the decoders."""

    buffer_bytes: int
    read_gb_s: float = Field(description="buffer bytes / median time to sum it: the rate weights can be streamed")
    copy_gb_s: float = Field(description="2 x buffer bytes / median time to copy it")
    read_ms: Summary
    copy_ms: Summary
    method: str


class ModelInfo(_Strict):
    source: str
    family: str
    n_layers: int
    d_model: int
    vocab_size: int
    n_heads: int
    heads_depth: int
    trunk_layers: int
    dtype: str
    device: str
    parameters: int = Field(description="parameters of the Hydra timed in full")
    tower_bytes_per_token: int = Field(description="weight bytes one token reads through trunk + one head + lm_head")
    head_bytes: int = Field(description="weight bytes of one head's layers")


class Memory(_Strict):
    kind: Literal["cuda_max_memory_allocated", "peak_rss"] = Field(
        description="CUDA: bytes held by tensors; CPU: peak resident set size of the process (prepacked weights and "
        "allocator caches included). Either way every model loaded at the time counts (see weight_bytes)"
    )
    peak_bytes: int | None = Field(description="largest peak over the configuration's runs")
    increase_bytes: int | None = Field(description="largest rise over the level at a run's start: its working memory")
    resettable: bool = Field(description="false: the CPU peak could not be reset, so it is the process's lifetime peak")
    weight_bytes: int = Field(
        description="weights held by the model this configuration runs on: parameters plus prepacked copies (CPU); "
        "the baseline shares the whole Hydra's"
    )


class PoEStats(_Strict):
    """The jury's bookkeeping over all measured runs of one PoE configuration."""

    gamma: int
    acceptance_rate: float = Field(description="accepted drafts / drafts put to the jury")
    resample_rate: float = Field(description="resampled tokens / emitted tokens")
    tokens_per_round: float = Field(description="emitted tokens / rounds")
    accepted_per_call: float
    resampled_per_call: float
    drafted_per_call: float = Field(description="drafts the jury decided on (PoEOutput.n_drafted)")
    draft_steps_per_call: float = Field(description="trunk + draft-head passes, including drafts after a rejection")
    rounds_per_call: float
    median_call_ms: float
    effective_tokens_per_s: float = Field(description="1000 x accepted_per_call / median_call_ms (draft throughput)")
    user_visible_tokens_per_s: float = Field(description="1000 x gen_length / median_call_ms")
    round_ms: float | None = Field(description="decode time per round after the first (median over runs)")
    verify_ms_per_round_estimate: float | None = Field(
        description="round_ms minus draft steps per round x the baseline's decode step: the verification pass and "
        "the jury's arithmetic, estimated by subtraction"
    )


class ConfigResult(_Strict):
    name: str = Field(description="e.g. baseline, baseline_bf16, hydra_naive, hydra_poe_g4_greedy, ..._9h")
    group: int = Field(
        description="heads of the Hydra whose group it was timed in: a group's configurations run interleaved, "
        "so ratios within a group are the fair ones (each group has its own baseline and naive rows)"
    )
    kind: Literal["baseline", "hydra_naive", "hydra_poe", "hf_generate", "llama_cpp"]
    n_heads: int | None = Field(description="heads of the Hydra it ran on (None for transformers)")
    dtype: str
    gamma: int | None
    sampling: Literal["greedy", "sampled"]
    temperature: float
    new_tokens: int
    n_runs: int
    call_ms: Summary = Field(description="wall time of a whole run")
    tokens_per_s: float = Field(description="end-to-end: new_tokens / median call_ms")
    decode_tokens_per_s: float | None = Field(description="median over runs; tokens of the first round excluded")
    decode_step_ms: Summary | None = Field(description="per run, 1000 / decode tokens/s: the mean amortised latency")
    ttft_ms: Summary
    ttft_samples_ms: list[float] = Field(description="every time-to-first-token measurement (the distribution)")
    per_position_latency_ms: list[float | None] = Field(
        description="median amortised latency of the token at each position (None inside the first round)"
    )
    per_position_tokens_per_s: list[float | None] = Field(description="1000 / per_position_latency_ms")
    memory: Memory
    weight_bytes_per_token: float = Field(description="weight bytes read per emitted token (from the runs' rounds)")
    weight_gb_s: float | None = Field(description="weight_bytes_per_token x decode tokens/s / 1e9")
    bandwidth_utilisation: float | None = Field(description="weight_gb_s / the measured read bandwidth")
    poe: PoEStats | None
    sample_text: str = Field(description="the text of the last measured run")
    quantization: str | None = Field(
        default=None, description="quantized weights: ours (e.g. 'gguf (Q4_1, Q8_0)', 'int8'), or llama.cpp's file"
    )


class LinearLayers(_Strict):
    """A baseline decode step against its bare linear layers (one token through trunk + one head + lm_head)."""

    dtype: str
    decoder: str = Field(
        default="eager",
        description="eager: the baseline decoder; compiled: its step compiled (olmo_tap.model.compiled)",
    )
    n_matmuls: int
    decode_step_ms: float = Field(description="the decode step in this dtype (median)")
    packed_ms: Summary = Field(
        description="the project's kernels: olmo_tap.model.layers.linear (oneDNN-prepacked weights on CPU)"
    )
    stock_ms: Summary = Field(description="stock torch.nn.functional.linear on (out, in) weights, same shapes/dtype")
    step_over_packed: float
    step_over_stock: float


class ProfileOp(_Strict):
    name: str
    calls_per_token: float
    self_ms_per_token: float


class Profile(_Strict):
    config: str
    dtype: str
    tokens: int
    clock: Literal["cpu", "device"]
    self_ms_per_token: float = Field(description="all operators' self time per decode step, profiler cost included")
    ops: list[ProfileOp]


class Target(_Strict):
    name: str
    value: float | None
    relation: Literal[">=", "<="]
    threshold: float
    met: bool | None = Field(description="None: not measured in this run")
    detail: str


class Results(_Strict):
    schema_version: int = SCHEMA_VERSION
    created: str = Field(description="ISO 8601, UTC")
    command: str
    machine: Machine
    versions: Versions
    config: dict[str, Any] = Field(description="the effective BenchConfig")
    model: ModelInfo
    prompt_ids: list[int]
    bandwidth: Bandwidth
    configs: list[ConfigResult]
    linear_layers: list[LinearLayers]
    profile: Profile | None
    targets: list[Target]
    notes: list[str] = Field(description="what was skipped and why, and caveats of this run")
    trained_jury: list[ConfigResult] = Field(
        default_factory=list,
        description="config.jury_model's baseline, naive and PoE rows (names prefixed jury_), timed interleaved "
        "in a group of their own: a jury whose heads differ, beside the main model's",
    )
    quantized: list[ConfigResult] = Field(
        default_factory=list,
        description="config.quantize's rows (names prefixed q<scheme>_: the baseline eager and compiled, PoE greedy) "
        "and llama.cpp on the same GGUF file (llama_cpp), timed interleaved in a group of their own",
    )
