"""The original system's trained adapters (msc-ai-mmmjo/tap): ``.pt`` head state dicts of a PEFT-wrapped head.

The original trained one head at a time: PEFT's ``get_peft_model`` wrapped that head (an OLMo-core
``Transformer`` whose ``blocks`` are numbered from 0 *inside the head*), with LoRA on the feed-forward
``w1`` / ``w2`` / ``w3`` (gate, down, up), and saved ``head.state_dict()`` with ``torch.save``. So a file
holds, under keys such as ``base_model.model.blocks.0.feed_forward.w1.lora_A.default.weight``:

- a *slim* export (the shipped weights): only the ``lora_A`` / ``lora_B`` tensors, as a plain dict;
- a *fat* training checkpoint: also the head's own weights (``...w1.base_layer.weight``, attention
  ``w_q`` ... ``w_out``, the norms), possibly wrapped as ``{"head_state_dict": ..., "optimizer_state_dict":
  ..., "global_step": ...}``; only ``head_state_dict`` is read.

Block ``b`` of a head is base layer ``trunk_layers + b``. Rank and alpha come from the ``manifest.json``
beside the file (``config.lora_r``, ``config.lora_alpha``; the original's loader uses ``2 * r``, which every
shipped manifest agrees with); where there is none (the original's ``robustness/`` directory) the rank is
read from the tensors and alpha is ``2 * r``, the original's convention (its loader hard-codes r=16,
alpha=32 there). Files are read with ``torch.load(weights_only=True)`` only: a file that needs arbitrary
unpickling is refused, never executed.

Fat files and the head's weights. The original merged a file with ``load_state_dict(state, strict=False)``
on the PEFT-wrapped head, which copies *every* matching key: a fat file's base weights would overwrite the
head's (attention, norms, and the adapted linears' ``base_layer``) before its LoRA is added. For the original's
own runs that is the same head up to bf16 rounding (robustness was trained on a head with the security LoRA
already merged, so its fat file carries base + security, exactly what the stacked loader holds at that point).
We never overwrite: a fat file's base weights are compared with the head's current ones and, if they differ
beyond rounding, the file is refused (it was trained on another base, or on top of an adapter that was not
stacked before it), since silently keeping or silently replacing them would both give a different model
than the one trained. (Also unlike the original's inference loader, whose ``strict=False`` load quietly
ignores a ``{"head_state_dict": ...}`` wrapper and merges nothing, the wrapper is unpacked, as the original's
evaluation scripts do.)
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from olmo_tap.hydra import HydraTransformer, HydraTransformerConfig
from olmo_tap.jsonl import read_json
from olmo_tap.model.config import TransformerConfig
from olmo_tap.weights.errors import WeightsError
from olmo_tap.weights.layout import LINEAR_NAMES, _norm_names, hf_linear_name, linear_weight
from olmo_tap.weights.lora import LoraAdapter, merge_lora, parse_lora_state
from olmo_tap.weights.olmo_core import olmo_core_to_hf

MANIFEST = "manifest.json"
ALPHA_RATIO = 2  # the original's convention: lora_alpha = 2 * lora_r
SECURITY_DIR, ROBUSTNESS_DIR, UNCERTAINTY_DIR = "prod", "robustness", "uncertainty"
UNCERTAINTY_FILE = "checkpoint_final.pt"
_SHARD = re.compile(r"shard_(\d+)_lora\.pt")

_KEY = re.compile(r"(?:base_model\.model\.)?blocks\.(\d+)\.(.+)")
_LORA = re.compile(r"(attention\.(?:w_q|w_k|w_v|w_out)|feed_forward\.(?:w1|w2|w3))\.lora_([AB])(?:\.([^.]+))?\.weight")
# Two roundings to bf16 (the file's and ours) move a weight by at most 2^-7 of itself; a base that differs by
# more than twice that (or, for weights near zero, by more than a small fraction of the tensor's RMS, which
# covers a base and an update that nearly cancel) is another base.
_REL_TOL, _ABS_TOL = 2.0**-6, 2.0**-8


@dataclass
class OriginalAdapter:
    """One adapter file of the original system: its LoRA (base-model layer numbers) and, for a fat
    checkpoint, the head weights it was trained on (HF names, base-model layer numbers)."""

    path: Path
    lora: LoraAdapter
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class OriginalWeights:
    """The original's adapters per head: ``heads[i]`` lists head i's adapters in merge order (security, then
    robustness); ``uncertainty`` the uncertainty head's, merged into the last head."""

    heads: list[list[Path]]
    uncertainty: Path | None = None
    heads_depth: int | None = None
    base_model: str | None = None


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The ``manifest.json`` in ``directory`` (checked to hold a ``config`` object), or None if there is none."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    manifest = read_json(path, "manifest", WeightsError)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise WeightsError(f"manifest {path} has no 'config' object")
    return manifest


def _manifest_int(config: dict[str, Any], key: str, path: Path) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise WeightsError(f"manifest {path}: config.{key} must be a positive integer, found {value!r}")
    return value


def _load_head_state(path: Path) -> dict[str, torch.Tensor]:
    """The head state dict of a ``.pt`` file, unwrapping ``{"head_state_dict": ...}``; tensors only."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"adapter file {path} does not exist") from None
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"{path} holds more than tensors (it needs arbitrary unpickling, which could run code); refusing to "
            f"load it. Re-save its state dict with tensors only. ({str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # torch reports a truncated or foreign file with several exception types
        raise WeightsError(f"cannot read {path} with torch.load (corrupt, or not a torch file?): {e}") from e
    if isinstance(obj, dict) and "head_state_dict" in obj:
        obj = obj["head_state_dict"]  # the optimizer state and step count beside it are for resuming only
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{path}: expected a (non-empty) head state dict, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entries that are not named tensors: {bad[:3]}")
    return obj


def read_original_adapter(path: str | Path, trunk_layers: int, heads_depth: int | None = None) -> OriginalAdapter:
    """Read one adapter file of the original (``shard_{i}_lora.pt``, ``checkpoint_final.pt``).

    ``trunk_layers`` maps the head's block ``b`` to base layer ``trunk_layers + b``; ``heads_depth``, when given,
    must match the manifest's and bounds the block numbers. The rank is the manifest's ``lora_r`` (checked against
    the tensors), else the tensors'; alpha the manifest's ``lora_alpha``, else ``2 * rank``.
    """
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path} is a directory; expected an adapter .pt file of the original system")
    manifest_path = path.parent / MANIFEST
    config = (read_manifest(path.parent) or {}).get("config", {})
    manifest_rank = _manifest_int(config, "lora_r", manifest_path)
    manifest_depth = _manifest_int(config, "heads_depth", manifest_path)
    if heads_depth is not None and manifest_depth is not None and heads_depth != manifest_depth:
        raise WeightsError(
            f"{path}: its manifest says heads are {manifest_depth} layers deep, the model's are {heads_depth}"
        )
    depth = heads_depth if heads_depth is not None else manifest_depth
    targets = config.get("target_modules")

    lora_state: dict[str, torch.Tensor] = {}
    base_state: dict[str, torch.Tensor] = {}
    ranks: set[int] = set()
    for key, tensor in _load_head_state(path).items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise WeightsError(f"{path}: unrecognised tensor {key!r} (expected base_model.model.blocks.N....)")
        block, rest = int(match.group(1)), match.group(2)
        if depth is not None and block >= depth:
            raise WeightsError(f"{path}: {key!r} is for block {block}, but heads are {depth} layers deep")
        layer = trunk_layers + block
        lora = _LORA.fullmatch(rest)
        if lora is not None:
            linear, half, adapter_name = lora.groups()
            if adapter_name not in (None, "default"):
                raise WeightsError(f"{path}: {key!r} belongs to PEFT adapter {adapter_name!r}, expected 'default'")
            if isinstance(targets, list) and linear.split(".")[-1] not in targets:
                raise WeightsError(
                    f"{path}: {key!r} adapts {linear}, but its manifest's target_modules are {targets} "
                    "(the original would have dropped it silently)"
                )
            if half == "A" and tensor.ndim == 2:
                ranks.add(tensor.size(0))
            lora_state[f"blocks.{layer}.{linear}.lora_{half}.weight"] = tensor
        elif "lora_" in rest:
            raise WeightsError(
                f"{path}: {key!r} is not a LoRA A/B tensor of a known linear "
                "(attention w_q/w_k/w_v/w_out, feed_forward w1/w2/w3)"
            )
        else:  # a fat checkpoint's own head weights
            base_state[f"blocks.{layer}.{rest.replace('.base_layer.', '.')}"] = tensor
    try:
        base_weights = olmo_core_to_hf(base_state)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from e
    if not lora_state:
        raise WeightsError(f"{path} holds no lora_A/lora_B tensors")
    if len(ranks) > 1:
        raise WeightsError(f"{path}: its lora_A tensors have different ranks {sorted(ranks)}")
    found = ranks.pop() if ranks else None
    if manifest_rank is not None and found is not None and found != manifest_rank:
        raise WeightsError(f"{path}: LoRA rank {found} does not match lora_r={manifest_rank} in {manifest_path}")
    r = manifest_rank or found
    if r is None:
        raise WeightsError(f"{path}: no 2-D lora_A tensor to read the rank from")
    try:
        alpha = float(config.get("lora_alpha", ALPHA_RATIO * r))
    except (TypeError, ValueError):
        raise WeightsError(f"manifest {manifest_path}: config.lora_alpha must be a number") from None
    try:
        adapter = parse_lora_state(lora_state, r, alpha)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from e
    return OriginalAdapter(path, adapter, base_weights)


def check_shapes(adapter: LoraAdapter, config: TransformerConfig, source: str | Path) -> None:
    """Refuse LoRA tensors whose shapes do not fit the linears of ``config``."""
    from olmo_tap.train.adapter import linear_shape

    for (layer, name), (a, b) in adapter.updates.items():
        fan_in, fan_out = linear_shape(config, name)
        if a.shape != (adapter.rank, fan_in) or b.shape != (fan_out, adapter.rank):
            raise WeightsError(
                f"{source}: LoRA for layer {layer} {name} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                f"this model's {name} needs A ({adapter.rank}, {fan_in}) and B ({fan_out}, {adapter.rank})"
            )


def _current_head_weights(model: HydraTransformer, head: int, layers: set[int]) -> dict[str, torch.Tensor]:
    """Views of head ``head``'s weights of base ``layers`` under HF names (out, in), without copying."""
    trunk_layers, norms = model.config.trunk_layers, _norm_names(model.base_config.family)
    current: dict[str, torch.Tensor] = {}
    for layer in layers:
        if not trunk_layers <= layer < model.base_config.n_layers:
            continue  # reported as an unexpected tensor by the caller
        block = model.heads[layer - trunk_layers]
        for name in LINEAR_NAMES:
            current[hf_linear_name(layer, name)] = linear_weight(block, head, name).t()  # type: ignore[arg-type]
        for attr, hf_name in norms.items():
            current[f"model.layers.{layer}.{hf_name}.weight"] = getattr(block, attr).weight[head]
    return current


@torch.no_grad()
def check_base_weights(model: HydraTransformer, head: int, adapter: OriginalAdapter) -> None:
    """Refuse a fat checkpoint whose head weights are not (up to rounding) those of head ``head`` now."""
    if not adapter.base_weights:
        return
    if model.base_config.family != "olmo2":
        # The original's blocks are OLMo-2's (norms after attention / the FFN); its norm names mean other
        # norms in another family, so a comparison would be wrong either way.
        raise WeightsError(
            f"{adapter.path} is a fat checkpoint of OLMo-2 blocks; this model is {model.base_config.family}"
        )
    layers = {int(name.split(".")[2]) for name in adapter.base_weights}
    current = _current_head_weights(model, head, layers)
    for name, saved in adapter.base_weights.items():
        now = current.get(name)
        if now is None or saved.shape != now.shape:
            raise WeightsError(f"{adapter.path}: head weight {name} does not fit this model's head")
        now = now.float()
        bound = _REL_TOL * now.abs() + _ABS_TOL * now.pow(2).mean().sqrt()
        if ((saved.to(now.device).float() - now).abs() > bound).any():
            raise WeightsError(
                f"{adapter.path} was trained on a head whose {name} differs from head {head}'s: it is a fat "
                "checkpoint, and the original would have replaced the head's weights with its own. Stack the "
                "adapters it was trained on top of before it (e.g. security before robustness); to merge its LoRA "
                "alone anyway, load its slim export (only the lora_ tensors)"
            )


def merge_original(model: HydraTransformer, head: int, path: str | Path) -> LoraAdapter:
    """Read an adapter file of the original and merge it into head ``head`` (after checking a fat file's base)."""
    adapter = read_original_adapter(path, model.config.trunk_layers, model.config.head_layers)
    check_shapes(adapter.lora, model.base_config, adapter.path)
    check_base_weights(model, head, adapter)
    merge_lora(model, head, adapter.lora)
    return adapter.lora


def _shards(directory: Path) -> list[Path]:
    """``shard_{i}_lora.pt`` of ``directory``, i = 0..n-1 without gaps, checked against the manifest."""
    if not directory.is_dir():
        raise WeightsError(f"adapter directory {directory} does not exist")
    found = {int(m.group(1)): p for p in directory.iterdir() if (m := _SHARD.fullmatch(p.name))}
    if not found:
        raise WeightsError(f"{directory} holds no shard_<i>_lora.pt files")
    n = max(found) + 1
    missing = [i for i in range(n) if i not in found]
    if missing:
        raise WeightsError(f"{directory}: shards {missing} are missing (found shards up to {n - 1})")
    manifest = read_manifest(directory)
    expected = _manifest_int(manifest["config"], "num_shards", directory / MANIFEST) if manifest else None
    if expected is not None and expected != n:
        raise WeightsError(f"{directory}: its manifest says num_shards={expected}, but {n} shard files are there")
    return [found[i] for i in range(n)]


def find_original_weights(
    root: str | Path | None = None,
    *,
    security: str | Path | None = None,
    robustness: str | Path | None = None,
    uncertainty: str | Path | None = None,
) -> OriginalWeights:
    """The per-head adapter files of the original system.

    With ``root`` (the original's ``olmo_tap/weights``), ``root/prod`` (security), ``root/robustness`` and
    ``root/uncertainty`` must all be there; ``security`` / ``robustness`` / ``uncertainty`` replace one of them.
    Without ``root`` only the directories given are used. ``uncertainty`` may be the directory (holding
    ``checkpoint_final.pt``) or the file itself.
    """
    if root is not None:
        root = Path(root)
        if not root.is_dir():
            raise WeightsError(f"weights directory {root} does not exist")
        security = security if security is not None else root / SECURITY_DIR
        robustness = robustness if robustness is not None else root / ROBUSTNESS_DIR
        uncertainty = uncertainty if uncertainty is not None else root / UNCERTAINTY_DIR
    if security is None and robustness is None:
        raise ValueError("give the original's weights root, or its security and/or robustness directory")
    # Merge order is the original's: the security LoRA first, then robustness (trained on top of it).
    directories = [Path(d) for d in (security, robustness) if d is not None]
    stacks = [_shards(d) for d in directories]
    if len({len(files) for files in stacks}) > 1:
        found = ", ".join(f"{len(files)} in {d}" for d, files in zip(directories, stacks, strict=True))
        raise WeightsError(f"head count mismatch: security and robustness need one shard per head; found {found}")
    heads = [list(files) for files in zip(*stacks, strict=True)]

    unc_file = None
    if uncertainty is not None:
        unc_file = Path(uncertainty)
        if unc_file.is_dir():
            unc_file = unc_file / UNCERTAINTY_FILE
        if not unc_file.is_file():
            raise WeightsError(f"uncertainty adapter {unc_file} does not exist")
        directories.append(unc_file.parent)
    depths: dict[Path, int] = {}
    base_model = None
    for directory in directories:
        manifest = read_manifest(directory)
        if manifest is None:
            continue
        depth = _manifest_int(manifest["config"], "heads_depth", directory / MANIFEST)
        if depth is not None:
            depths[directory] = depth
        base_model = base_model or manifest.get("base_model")
    if len(set(depths.values())) > 1:
        raise WeightsError(f"manifests disagree on heads_depth: {', '.join(f'{d}: {n}' for d, n in depths.items())}")
    depth = next(iter(depths.values()), None)
    return OriginalWeights(heads, unc_file, depth, base_model if isinstance(base_model, str) else None)


def original_to_peft(
    path: str | Path, directory: str | Path, config: HydraTransformerConfig, base_model: str | None = None
) -> Path:
    """Convert one adapter file of the original to PEFT's layout (``adapter_config.json`` +
    ``adapter_model.safetensors``, base-model layer numbers), readable by ``load_lora``, ``load_ensemble`` and
    peft itself. ``config`` is the Hydra split the file was trained for (e.g.
    ``HydraTransformerConfig.from_olmo2_7B(heads_depth=3)``), which fixes the layer numbers.

    A fat checkpoint's head weights are not carried over (with a warning): the converted adapter no longer
    records which base it was trained on.
    """
    from olmo_tap.train.adapter import HeadAdapter

    adapter = read_original_adapter(path, config.trunk_layers, config.head_layers)
    check_shapes(adapter.lora, config.base_config, adapter.path)
    if adapter.base_weights:
        warnings.warn(
            f"{adapter.path} is a fat checkpoint; its head weights are dropped, only the LoRA is converted",
            stacklevel=2,
        )
    try:
        head_adapter = HeadAdapter.from_lora(config.base_config, adapter.lora)
    except ValueError as e:
        raise WeightsError(f"{adapter.path}: cannot be written in PEFT's layout: {e}") from e
    return head_adapter.save(directory, base_model=base_model)


def export_original_weights(
    weights: OriginalWeights, directory: str | Path, config: HydraTransformerConfig
) -> OriginalWeights:
    """Convert every adapter of ``weights`` to PEFT's layout under ``directory`` (``head{i}/{j}_{kind}``,
    ``uncertainty``), one directory per adapter so that they stack again at load; returns the same structure
    pointing at the new directories, ready for ``load_ensemble(base, out.heads, out.uncertainty)``."""
    directory = Path(directory)
    heads = [
        [
            original_to_peft(path, directory / f"head{i}" / f"{j}_{path.parent.name}", config, weights.base_model)
            for j, path in enumerate(stack)
        ]
        for i, stack in enumerate(weights.heads)
    ]
    uncertainty = None
    if weights.uncertainty is not None:
        uncertainty = original_to_peft(weights.uncertainty, directory / "uncertainty", config, weights.base_model)
    return OriginalWeights(heads, uncertainty, config.head_layers, weights.base_model)
