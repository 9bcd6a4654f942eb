"""A whole Hydra ensemble as one directory, and building a deployable ensemble from adapters.

Directory layout (what training writes and every command reads back):

- ``hydra_config.json``: format tag and version, the HydraTransformerConfig, the
  dtype, which head (if any) is the uncertainty head, free-form metadata;
- ``model.safetensors``: the model's own state dict (trunk, the stacked
  per-head weights, shared final norm and lm_head), bit for bit;
- the tokenizer's files, saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from olmo_tap.hydra import HydraTransformer, HydraTransformerConfig
from olmo_tap.jsonl import read_json
from olmo_tap.weights.errors import WeightsError
from olmo_tap.weights.lora import LoraAdapter, load_lora, merge_lora
from olmo_tap.weights.original import find_original_weights, merge_original

FORMAT = "olmo-tap-ensemble"
VERSION = 1
CONFIG_FILE = "hydra_config.json"
WEIGHTS_FILE = "model.safetensors"
SAVED_DTYPES = ("float32", "bfloat16", "float16")


def save_ensemble(
    model: HydraTransformer,
    directory: str | Path,
    tokenizer: Any | None = None,
    uncertainty_head: bool = False,
    metadata: dict[str, Any] | None = None,
    *,
    work_dir: str | None = None,
) -> Path:
    """Write ``model`` (and its tokenizer) to ``directory``, atomically: a crash leaves no half ensemble.

    An existing ``directory`` is replaced only if it is an olmo-tap ensemble, empty, or holds nothing but the
    caller's own ``work_dir`` (a training run's scratch directory, replaced with it); anything else is refused
    rather than deleted. The new ensemble is written aside in a sibling directory and renamed into place; the old
    one is moved aside first and removed last, so until the new one is complete the old one stays loadable.
    """
    model.require_float_weights("saving an ensemble")
    directory = Path(directory)
    _check_replaceable(directory, work_dir)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    old: Path | None = None
    try:
        state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        info = {
            "format": FORMAT,
            "version": VERSION,
            "config": model.config.to_dict(),
            "dtype": str(model.dtype).removeprefix("torch."),
            "uncertainty_head": model.n_heads - 1 if uncertainty_head else None,
            "metadata": metadata or {},
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(info, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if directory.exists():
            old = tmp.with_name(tmp.name + ".old")
            directory.rename(old)
        try:
            tmp.rename(directory)
        except OSError:
            if old is not None:
                old.rename(directory)  # the new one could not take its place: the old one goes back
                old = None
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # a leftover is a hidden sibling, never the ensemble itself
    return directory


def _check_replaceable(directory: Path, work_dir: str | None) -> None:
    """Refuse to replace anything but an olmo-tap ensemble (or an empty directory, or the caller's work dir)."""
    if not directory.exists() and not directory.is_symlink():
        return
    if directory.is_symlink():  # replacing the link would leave its target behind, half the user's intent
        raise WeightsError(f"cannot save an ensemble to {directory}: it is a symbolic link; give its target")
    if not directory.is_dir():
        raise WeightsError(f"cannot save an ensemble to {directory}: it exists and is not a directory")
    entries = {entry.name for entry in directory.iterdir()}
    if not entries or (work_dir is not None and entries == {work_dir}):
        return
    try:
        read_ensemble_info(directory)
    except WeightsError as e:
        raise WeightsError(
            f"refusing to replace {directory}: it is not an olmo-tap ensemble ({e}); "
            "choose another directory, or remove it yourself"
        ) from None


def read_ensemble_info(directory: str | Path) -> dict[str, Any]:
    """The parsed ``hydra_config.json`` of a saved ensemble, validated."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise WeightsError(f"{directory} is not a saved ensemble: no {CONFIG_FILE}")
    info = read_json(path, "Hydra config", WeightsError)
    if not isinstance(info, dict):
        raise WeightsError(f"{path}: expected a JSON object, found {type(info).__name__}")
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise WeightsError(
            f"{path}: expected format {FORMAT!r} version {VERSION}, "
            f"found {info.get('format')!r} {info.get('version')!r}"
        )
    if info.get("dtype", "float32") not in SAVED_DTYPES:
        raise WeightsError(f"{path}: unknown dtype {info.get('dtype')!r}; expected one of {', '.join(SAVED_DTYPES)}")
    return info


def load_saved_ensemble(
    directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> HydraTransformer:
    """Rebuild a saved ensemble exactly as it was saved (then optionally cast)."""
    directory = Path(directory)
    info = read_ensemble_info(directory)
    try:
        config = HydraTransformerConfig.from_dict(info["config"])
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # ConfigError is a ValueError
        raise WeightsError(f"{directory / CONFIG_FILE}: invalid Hydra config ({e})") from e
    try:
        state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    except FileNotFoundError:
        raise WeightsError(f"saved ensemble {directory} has no {WEIGHTS_FILE}") from None
    except Exception as e:  # safetensors signals corruption with several exception types
        raise WeightsError(f"cannot read {directory / WEIGHTS_FILE} (corrupt or truncated?): {e}") from e
    saved_dtype = getattr(torch, info.get("dtype", "float32"))
    model = config.build(init_device="meta")
    expected = model.state_dict()  # compared on the meta device: a config claiming huge shapes allocates nothing
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise WeightsError(
            f"{directory / WEIGHTS_FILE} does not match its config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}"
        )
    model = model.to_empty(device=device).to(saved_dtype)
    model.reset_rope()
    model.load_state_dict(state)
    uncertainty = info.get("uncertainty_head")
    if uncertainty is not None and (
        not isinstance(uncertainty, int) or isinstance(uncertainty, bool) or not 0 <= uncertainty < model.n_heads
    ):
        raise WeightsError(f"{directory / CONFIG_FILE}: uncertainty_head {uncertainty!r} is not one of the heads")
    model.uncertainty_head = uncertainty
    if dtype is not None and dtype != saved_dtype:
        model = model.to(dtype)
    return model.eval()


AdapterSource = str | Path | LoraAdapter
# One head's adapters: a single source, several merged in order, or None (the plain clone of the base).
HeadAdapters = AdapterSource | Sequence[AdapterSource] | None


def _stack(entry: HeadAdapters) -> list[AdapterSource]:
    if entry is None:
        return []
    if isinstance(entry, str | Path | LoraAdapter):
        return [entry]
    stack = list(entry)
    bad = [s for s in stack if not isinstance(s, str | Path | LoraAdapter)]
    if bad:
        raise TypeError(f"an adapter is a path or a LoraAdapter, got {type(bad[0]).__name__}")
    return stack


def merge_adapter(model: HydraTransformer, head: int, source: AdapterSource) -> None:
    """Merge one adapter into head ``head``: a ``LoraAdapter``, a PEFT-layout directory, or an adapter ``.pt``
    file of the original system (``olmo_tap.weights.original``)."""
    if isinstance(source, LoraAdapter):
        merge_lora(model, head, source)
        return
    path = Path(source)
    if path.is_file():
        merge_original(model, head, path)
    elif path.is_dir():
        merge_lora(model, head, load_lora(path))
    else:
        raise WeightsError(f"adapter {path} does not exist")


def load_ensemble(
    base: str | Path,
    adapters: Sequence[HeadAdapters],
    uncertainty_adapter: HeadAdapters = None,
    heads_depth: int | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> HydraTransformer:
    """A deployable ensemble: base checkpoint, adapters per text head, and an optional uncertainty head placed last.

    Each entry of ``adapters`` (and ``uncertainty_adapter``) is None (the plain clone of the base), one adapter,
    or a list of adapters merged into that head in order, e.g. ``[[security0, robustness0], [security1,
    robustness1]]``; an adapter is a PEFT-layout directory, an original ``.pt`` file or a ``LoraAdapter``
    (see ``merge_adapter``). Merges add up, so the order changes only rounding, except that a fat original
    checkpoint is checked against the head it lands on (see ``olmo_tap.weights.original``)."""
    from olmo_tap.weights.loading import load_hydra

    if not adapters:
        raise ValueError("load_ensemble needs at least one text head (adapters may be [None, ...])")
    heads = [_stack(entry) for entry in adapters]
    if uncertainty_adapter is not None:
        heads.append(_stack(uncertainty_adapter))
    model = load_hydra(base, n_heads=len(heads), heads_depth=heads_depth, dtype=dtype, device=device)
    for head, stack in enumerate(heads):
        for source in stack:
            merge_adapter(model, head, source)
    model.uncertainty_head = model.n_heads - 1 if uncertainty_adapter is not None else None
    return model


def load_original_ensemble(
    base: str | Path | None = None,
    weights_root: str | Path | None = None,
    *,
    security: str | Path | None = None,
    robustness: str | Path | None = None,
    uncertainty: str | Path | None = None,
    heads_depth: int | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> HydraTransformer:
    """The original system's ensemble, as its own loader builds it: one text head per shard with the security
    LoRA then the robustness LoRA merged, and the uncertainty LoRA on a last head.

    ``weights_root`` is the original's ``olmo_tap/weights`` (``prod/``, ``robustness/``, ``uncertainty/``); or give
    the directories one by one (see ``find_original_weights``). ``base`` defaults to the manifests' ``base_model``
    (``allenai/OLMo-2-1124-7B-Instruct``), ``heads_depth`` to theirs.
    """
    weights = find_original_weights(weights_root, security=security, robustness=robustness, uncertainty=uncertainty)
    if heads_depth is not None and weights.heads_depth is not None and heads_depth != weights.heads_depth:
        raise WeightsError(
            f"the adapters were trained on heads {weights.heads_depth} layers deep; heads_depth={heads_depth} "
            "would put them on other layers"
        )
    if base is None:
        if weights.base_model is None:
            raise WeightsError("no base checkpoint given and no manifest names one (base_model)")
        base = weights.base_model
    return load_ensemble(
        base,
        weights.heads,
        weights.uncertainty,
        heads_depth=heads_depth if heads_depth is not None else weights.heads_depth,
        dtype=dtype,
        device=device,
    )
