"""``HydraTransformer.from_pretrained``: any supported source in, a ready Hydra out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from olmo_tap.hydra import HydraTransformer, HydraTransformerConfig
from olmo_tap.memory import separate_large_allocations
from olmo_tap.weights.errors import WeightsError
from olmo_tap.weights.layout import load_base_state
from olmo_tap.weights.presets import get_preset

if TYPE_CHECKING:
    from olmo_tap.weights.lora import LoraAdapter

# The embedded default (SmolLM2-135M, 30 layers) splits into 5 heads of 3 layers: the
# original system's depth, a trunk of 27 shared layers, and a 5-head jury whose
# verification pass stays cheap on a laptop CPU (see README, "Why 5 x 3").
DEFAULT_N_HEADS = 5
DEFAULT_HEADS_DEPTH = 3


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """The device to load onto (default: CUDA if available), refused up front if it is not there: torch would
    fail later, deep inside a copy, with "Torch not compiled with CUDA enabled"."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {device!r} asked for, but {build}; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")
    return resolved


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """fp32 on CPU and bf16 on CUDA unless asked otherwise; accepts 'bf16', 'float32', ..."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "float": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
    }
    try:
        return names[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of: float32, bfloat16, float16") from None


def load_hydra(
    source: str | Path | Any,
    n_heads: int | None = None,
    heads_depth: int | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    quantize: str | None = None,
) -> HydraTransformer:
    """Build a Hydra from a preset, HF directory, hub id, GGUF file or saved ensemble.

    A saved ensemble keeps its own heads: ``n_heads``/``heads_depth`` must then be None or match. ``quantize``
    (``int8``, ``int4``, or ``gguf`` for a GGUF source's own blocks) quantizes every weight after loading (after
    a trained preset's adapters are merged): see ``olmo_tap.quant.model``.
    """
    if quantize is not None:
        return _load_quantized(source, n_heads, heads_depth, dtype, device, progress, quantize)
    device = resolve_device(device)
    return _load_float(source, n_heads, heads_depth, resolve_dtype(dtype, device), device, progress).prepack()


def _load_float(
    source: Any, n_heads: int | None, heads_depth: int | None, dtype: torch.dtype, device: torch.device, progress: bool
) -> HydraTransformer:
    """``load_hydra``'s float model, its weights not yet packed: a caller that merges adapters or quantizes next
    would otherwise pack the float weights for nothing (1.4 s of the default's load; for a checkpoint quantized at
    load, a second copy of every weight in memory)."""
    from olmo_tap.weights.sources import resolve

    resolved = resolve(source)
    if resolved.kind == "ensemble_dir":
        from olmo_tap.weights.ensemble import load_saved_ensemble

        model = load_saved_ensemble(resolved.path, device=device, dtype=dtype)
        _check_matches_saved(model, n_heads, heads_depth)
        return model.eval()
    if resolved.kind == "preset" and get_preset(resolved.name).adapters:
        return _trained_preset(resolved.name, n_heads, heads_depth, dtype, device, progress)
    return _split_base(resolved, n_heads, heads_depth, dtype, device, progress)


def _split_base(
    source: Any, n_heads: int | None, heads_depth: int | None, dtype: torch.dtype, device: torch.device, progress: bool
) -> HydraTransformer:
    """A single-tower checkpoint split into a Hydra (weights not yet packed)."""
    from olmo_tap.weights.sources import read_base_checkpoint

    base_config, state, _ = read_base_checkpoint(source, progress=progress)
    config = HydraTransformerConfig.split(
        base_config,
        DEFAULT_N_HEADS if n_heads is None else n_heads,
        DEFAULT_HEADS_DEPTH if heads_depth is None else heads_depth,
    )
    # Build on the meta device, then materialise directly in the target dtype: no fp32 detour for 7B.
    model = config.build(init_device="meta").to_empty(device=device).to(dtype)
    model.reset_rope()
    load_base_state(model, state)
    return model.eval()


def gguf_source_path(resolved: Any) -> Path | None:
    """The GGUF file behind a resolved source (a .gguf path, or a preset embedding one, a trained preset's base
    included), or None."""
    from olmo_tap.weights.presets import PRESETS, embedded_gguf_path

    if resolved.kind == "gguf":
        return Path(resolved.path)
    if resolved.kind == "preset":
        preset = PRESETS[resolved.name]
        preset = PRESETS[preset.base] if preset.base else preset
        return embedded_gguf_path(preset) if preset.gguf_file else None
    return None


def _load_quantized(
    source: str | Path | Any,
    n_heads: int | None,
    heads_depth: int | None,
    dtype: torch.dtype | str | None,
    device: torch.device | str | None,
    progress: bool,
    quantize: str,
) -> HydraTransformer:
    from olmo_tap.quant.model import check_scheme, load_gguf_quantized, quantize_model
    from olmo_tap.weights.sources import resolve

    check_scheme(quantize)
    device = resolve_device(device)
    if device.type != "cpu":
        raise ValueError(f"--quantize runs on the CPU (its kernels are CPU kernels); got --device {device}")
    resolved = resolve(source)
    gguf_path = gguf_source_path(resolved)
    if quantize == "gguf" and gguf_path is None:
        raise ValueError(
            f"--quantize gguf keeps a GGUF file's own blocks, and {source} is not a GGUF source; "
            "use --quantize int8 or int4"
        )
    if gguf_path is None:  # a float checkpoint: load it, then quantize it
        model = _load_float(resolved, n_heads, heads_depth, torch.float32, device, progress)
        with separate_large_allocations():
            quantize_model(model, quantize)
    else:  # straight from the file's blocks, never the whole model in float
        plan = None
        if resolved.kind == "preset" and get_preset(resolved.name).adapters:
            plan = trained_jury_plan(resolved.name, n_heads, heads_depth)
            n_heads, heads_depth = plan.n_heads, plan.heads_depth
        with separate_large_allocations():
            model = load_gguf_quantized(
                gguf_path,
                DEFAULT_N_HEADS if n_heads is None else n_heads,
                DEFAULT_HEADS_DEPTH if heads_depth is None else heads_depth,
                quantize,
                plan.merges if plan is not None else (),
            )
        model.uncertainty_head = plan.uncertainty_head if plan is not None else None
    return model.to(resolve_dtype(dtype, device)).eval()


def _check_matches_saved(model: HydraTransformer, n_heads: int | None, heads_depth: int | None) -> None:
    if n_heads is not None and n_heads != model.n_heads:
        raise WeightsError(f"the saved ensemble has {model.n_heads} heads; n_heads={n_heads} cannot change that")
    if heads_depth is not None and heads_depth != model.config.head_layers:
        raise WeightsError(
            f"the saved ensemble's heads are {model.config.head_layers} layers deep; "
            f"heads_depth={heads_depth} cannot change that"
        )


@dataclass(frozen=True)
class JuryPlan:
    """A trained preset's heads: its untrained base, the split, and the adapters merged (in order) into each head."""

    base: str
    n_heads: int
    heads_depth: int
    merges: tuple[tuple[LoraAdapter, ...], ...]
    uncertainty_head: int


def trained_jury_plan(name: str, n_heads: int | None, heads_depth: int | None) -> JuryPlan:
    """The plan of a preset whose heads carry LoRA adapters shipped in the package (the trained default jury):
    text head h takes adapter h; the uncertainty head starts, as in training
    (``olmo_tap.train.uncertainty.with_uncertainty_head``), from the text head it was copied from, that head's
    adapter included, and then takes its own adapter."""
    import json
    from importlib import resources

    from olmo_tap.weights.lora import load_lora

    preset = get_preset(name)
    assert preset.adapters is not None and preset.base is not None
    directory = Path(str(resources.files("olmo_tap.weights").joinpath(preset.adapters)))
    rebuild = f"rebuild them with `olmo-tap train default-jury --out DIR` or reinstall olmo-tap; or use {preset.base}"
    try:
        meta = json.loads((directory / "jury.json").read_text())
        n_text, depth, init_from = meta["n_text_heads"], meta["heads_depth"], meta["uncertainty_init_from"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        problem = f"preset {name!r}: its adapters at {directory} are missing or unreadable ({e})"
        raise WeightsError(f"{problem}; {rebuild}") from e
    if n_heads not in (None, n_text + 1) or heads_depth not in (None, depth):
        raise WeightsError(
            f"preset {name!r} is a trained jury of {n_text} text heads + 1 uncertainty head, {depth} layers deep; "
            f"for another split use the untrained {preset.base!r}"
        )
    try:
        adapters = [load_lora(directory / f"head{h}") for h in range(n_text)]
        uncertainty = load_lora(directory / "uncertainty")
    except WeightsError as e:
        raise WeightsError(f"preset {name!r}: {e}; {rebuild}") from e
    merges = (*((a,) for a in adapters), (adapters[init_from], uncertainty))
    return JuryPlan(preset.base, n_text + 1, depth, merges, n_text)


def _trained_preset(
    name: str,
    n_heads: int | None,
    heads_depth: int | None,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool = True,
) -> HydraTransformer:
    """A trained preset (see ``trained_jury_plan``): the base split, each head's adapters merged in fp32, then cast
    (weights not yet packed)."""
    from olmo_tap.weights.lora import merge_lora
    from olmo_tap.weights.sources import resolve

    plan = trained_jury_plan(name, n_heads, heads_depth)
    model = _split_base(resolve(plan.base), plan.n_heads, plan.heads_depth, torch.float32, device, progress)
    for head, adapters in enumerate(plan.merges):
        for adapter in adapters:
            merge_lora(model, head, adapter)
    model.uncertainty_head = plan.uncertainty_head
    return model.to(dtype).eval()
