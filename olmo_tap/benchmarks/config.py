"""The benchmark's knobs: defaults in ``config.json`` next to this file, a ``quick`` section for a short run,
a user's JSON file and command-line flags on top, checked before anything is loaded.

Precedence, lowest first: ``config.json``; the user's ``--config`` file; with ``--quick`` the ``quick`` section
(the user file's own ``quick`` keys win over the default ones); command-line flags. Unknown keys, wrong types and
impossible values raise ``ValueError`` naming the key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from olmo_tap.inference.jury import check_beta
from olmo_tap.inference.sampling import check_temperature
from olmo_tap.jsonl import is_int, read_json

DEFAULT_CONFIG_PATH = Path(__file__).with_name("config.json")
SAMPLINGS = ("greedy", "sampled")


@dataclass(frozen=True)
class BenchConfig:
    model: str  # preset, HF directory, hub id, .gguf file or saved ensemble
    heads: int | None  # heads of the Hydra timed in full (None: the loader's default, 5, or the ensemble's)
    heads_depth: int | None  # layers per head (None: the loader's default, 3)
    extra_heads: list[int]  # more head counts at which naive and PoE are timed (the scaling targets)
    dtype: str | None  # None: float32 on CPU, bfloat16 on CUDA
    device: str | None  # None: cuda if available
    extra_baseline_dtypes: list[str]  # the baseline again in these dtypes (skipped when equal to dtype)
    threads: int | None  # torch CPU threads (None: torch's default)
    prompt_length: int  # prompt tokens (a real chat prompt, cut to this length)
    gen_length: int  # new tokens per generation (end-of-text ignored: fixed length)
    gammas: list[int]  # PoE draft lengths swept
    samplings: list[str]  # "greedy" and/or "sampled" PoE runs per gamma
    temperature: float  # of the sampled runs
    beta: float  # inverse temperature of the verifiers' product
    draft_head: int | None  # fixed draft head (None: derived from the seed)
    seed: int  # sampled run i uses seed + i
    hf_generate: bool  # time transformers' generate() on the same base model
    warmup_ms: float  # warm-up rounds (every configuration once per round) until this much time has passed
    measure_ms: float  # measurement budget per configuration
    min_repeats: int  # measured generations per configuration, at least ...
    max_repeats: int  # ... and at most
    ttft_ms: float  # time-to-first-token budget per configuration
    ttft_min_repeats: int
    micro_ms: float  # budget of each micro-benchmark (memory bandwidth, bare linear layers)
    bandwidth_mib: int  # size of the buffer whose read and copy time give the memory bandwidth
    profile_tokens: int  # decode steps of the baseline under torch.profiler (0: no profile)
    compiled_step: bool  # also time each baseline's step compiled (olmo_tap.model.compiled) against its linears
    # a trained jury timed in its own group beside ``model`` (acceptance and speed of heads that really differ);
    # None: skipped
    jury_model: str | None = None
    # quantized schemes (int8, int4, gguf) timed in a group of their own: each one's baseline eager and compiled
    # and PoE greedy at gamma 4, beside llama.cpp on the model's GGUF file (where llama-cpp-python is installed)
    quantize: list[str] = field(default_factory=list)
    llama_cpp: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


KEYS: tuple[str, ...] = tuple(f.name for f in fields(BenchConfig))


def _read_json(path: Path) -> dict[str, Any]:
    data = read_json(path, "benchmark config")
    if not isinstance(data, dict):
        raise ValueError(f"benchmark config {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _check_keys(data: dict[str, Any], where: str, allow_quick: bool) -> None:
    allowed = set(KEYS) | ({"quick"} if allow_quick else set())
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"unknown benchmark config key(s) {unknown} in {where}; valid keys: {', '.join(KEYS)}")
    if allow_quick and "quick" in data and not isinstance(data["quick"], dict):
        raise ValueError(f"'quick' in {where} must be an object of config keys")


def load_config(
    path: str | Path | None = None, quick: bool = False, overrides: dict[str, Any] | None = None
) -> BenchConfig:
    """The effective configuration (see the module docstring for the precedence). ``overrides`` with value
    None are ignored (an unset command-line flag)."""
    defaults = _read_json(DEFAULT_CONFIG_PATH)
    _check_keys(defaults, str(DEFAULT_CONFIG_PATH), allow_quick=True)
    quick_section = dict(defaults.pop("quick", {}))
    merged = dict(defaults)
    if path is not None:
        user = _read_json(Path(path))
        _check_keys(user, str(path), allow_quick=True)
        quick_section.update(user.pop("quick", {}))
        merged.update(user)
    _check_keys(quick_section, "the 'quick' section", allow_quick=False)
    if quick:
        merged.update(quick_section)
    if overrides:
        _check_keys(overrides, "the command-line overrides", allow_quick=False)
        merged.update({k: v for k, v in overrides.items() if v is not None})
    missing = sorted(set(KEYS) - set(merged))
    if missing:
        raise ValueError(f"benchmark config is missing key(s) {missing}")
    config = BenchConfig(**{k: merged[k] for k in KEYS})
    validate(config)
    return config


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int_at_least(name: str, value: Any, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not is_int(value) or value < low:
        raise ValueError(f"benchmark config: {name} must be an integer >= {low}, got {value!r}")


def _number_at_least(name: str, value: Any, low: float, strict: bool = False) -> None:
    if not _is_number(value) or value < low or (strict and value == low):
        relation = ">" if strict else ">="
        raise ValueError(f"benchmark config: {name} must be a number {relation} {low}, got {value!r}")


def _int_list(name: str, value: Any, low: int, allow_empty: bool) -> None:
    if not isinstance(value, list) or not all(is_int(v) for v in value):
        raise ValueError(f"benchmark config: {name} must be a list of integers, got {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"benchmark config: {name} is empty; give at least one value >= {low}")
    bad = [v for v in value if v < low]
    if bad:
        raise ValueError(f"benchmark config: every value of {name} must be >= {low}, got {bad}")
    if len(set(value)) != len(value):
        raise ValueError(f"benchmark config: {name} has duplicates: {value}")


def _decoder_rule(check: Callable[[Any], Any], value: Any) -> None:
    """The decoder's own rule for a setting (its bounds), reported as the config's."""
    try:
        check(value)
    except ValueError as e:
        raise ValueError(f"benchmark config: {e}") from None


def _dtype_name(name: str, value: Any) -> None:
    from olmo_tap.weights.loading import resolve_dtype

    if not isinstance(value, str):
        raise ValueError(f"benchmark config: {name} must be a dtype name such as 'bfloat16', got {value!r}")
    try:
        resolve_dtype(value, device=None)  # type: ignore[arg-type]  # the device matters only for None
    except ValueError as e:
        raise ValueError(f"benchmark config: {name}: {e}") from None


def validate(config: BenchConfig) -> None:
    if config.jury_model is not None and (not isinstance(config.jury_model, str) or not config.jury_model.strip()):
        raise ValueError(f"benchmark config: jury_model must be null or a model name, got {config.jury_model!r}")
    """Raise ValueError (or WeightsError for a model source that does not exist) naming the first bad key."""
    if not isinstance(config.model, str) or not config.model.strip():
        raise ValueError(f"benchmark config: model must be a non-empty string, got {config.model!r}")
    _int_at_least("heads", config.heads, 2, optional=True)  # PoE needs a drafter and at least one verifier
    _int_at_least("heads_depth", config.heads_depth, 1, optional=True)
    _int_list("extra_heads", config.extra_heads, 2, allow_empty=True)
    if config.dtype is not None:
        _dtype_name("dtype", config.dtype)
    if config.device is not None and (not isinstance(config.device, str) or not config.device.strip()):
        raise ValueError(f"benchmark config: device must be a string such as 'cpu' or 'cuda', got {config.device!r}")
    if not isinstance(config.extra_baseline_dtypes, list):
        raise ValueError(
            f"benchmark config: extra_baseline_dtypes must be a list, got {config.extra_baseline_dtypes!r}"
        )
    for value in config.extra_baseline_dtypes:
        _dtype_name("extra_baseline_dtypes", value)
    _int_at_least("threads", config.threads, 1, optional=True)
    _int_at_least("prompt_length", config.prompt_length, 2)
    _int_at_least("gen_length", config.gen_length, 2)  # decode latency needs tokens after the first
    _int_list("gammas", config.gammas, 1, allow_empty=False)
    if not isinstance(config.samplings, list) or not config.samplings:
        raise ValueError(
            f"benchmark config: samplings must be a non-empty list of {SAMPLINGS}, got {config.samplings!r}"
        )
    unknown = [s for s in config.samplings if s not in SAMPLINGS]
    if unknown or len(set(config.samplings)) != len(config.samplings):
        raise ValueError(f"benchmark config: samplings must be distinct values of {SAMPLINGS}, got {config.samplings}")
    if "sampled" in config.samplings:
        _number_at_least("temperature", config.temperature, 0.0, strict=True)
        _decoder_rule(check_temperature, config.temperature)
    _decoder_rule(check_beta, config.beta)
    _int_at_least("draft_head", config.draft_head, 0, optional=True)
    _int_at_least("seed", config.seed, 0)
    from olmo_tap.quant.model import QUANTIZE_CHOICES

    if not isinstance(config.quantize, list) or any(q not in QUANTIZE_CHOICES for q in config.quantize):
        raise ValueError(f"benchmark config: quantize must be a list of {QUANTIZE_CHOICES}, got {config.quantize!r}")
    for key in ("hf_generate", "compiled_step", "llama_cpp"):
        if not isinstance(getattr(config, key), bool):
            raise ValueError(f"benchmark config: {key} must be true or false, got {getattr(config, key)!r}")
    for name in ("warmup_ms", "measure_ms", "ttft_ms", "micro_ms"):
        _number_at_least(name, getattr(config, name), 0.0)
    _int_at_least("min_repeats", config.min_repeats, 1)
    _int_at_least("max_repeats", config.max_repeats, config.min_repeats)
    _int_at_least("ttft_min_repeats", config.ttft_min_repeats, 1)
    _int_at_least("bandwidth_mib", config.bandwidth_mib, 1)
    _int_at_least("profile_tokens", config.profile_tokens, 0)
    from olmo_tap.weights.sources import resolve

    resolve(config.model)  # an unknown model fails here, before anything is loaded
