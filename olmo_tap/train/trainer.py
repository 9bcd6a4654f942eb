"""The training loop shared by the text heads and the uncertainty head: one adapter, frozen model.

Determinism: every random choice is derived from ``(seed, head)``: the adapter's initialisation,
and the order of epoch ``e`` (a permutation seeded by ``(seed, head, e)``). There is no dropout.
A step is therefore a pure function of (adapter, optimizer state, step number), which is what the
checkpoint holds (with the losses so far and a fingerprint of the run); no random-number stream
has to be saved and restored, and a resumed run equals an uninterrupted one bit for bit on the
same machine and thread count.

Checkpoints are written atomically (temporary file, then rename) every ``checkpoint_every`` steps
and at the end, so an interruption loses at most that many steps.

A batch whose loss has no targets (``loss_fn`` returns a count of 0: e.g. robustness training when no pair of the
batch flips) makes no update; its step is counted with a loss of 0. ``early_stop`` (a function of the losses so
far, hence as resumable as they are) ends a run before its last epoch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from olmo_tap.hydra import HydraTransformer
from olmo_tap.train.adapter import DEFAULT_TARGET_MODULES, HeadAdapter, check_targets

Item = TypeVar("Item")
# loss_fn(adapter, items) -> (sum of per-target losses, number of targets)
LossFn = Callable[[HeadAdapter, Sequence[Any]], tuple[torch.Tensor, int]]


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 8
    alpha: float = 16.0  # alpha = 2r, as the original system
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    target_layers: tuple[int, ...] | None = None  # base-model layer indices; None: every head layer
    lr: float = 1e-3
    epochs: int = 2
    batch_size: int = 8
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 25

    def __post_init__(self) -> None:
        for name in ("rank", "epochs", "batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("alpha", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ValueError("weight_decay must be >= 0 and max_grad_norm > 0")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        data["target_layers"] = list(self.target_layers) if self.target_layers is not None else None
        return data


@dataclass
class TrainResult:
    adapter: HeadAdapter
    losses: list[float] = field(default_factory=list)  # per step, token-weighted batch mean
    steps: int = 0
    total_steps: int = 0
    resumed_from: int = 0
    stopped_early: bool = False

    @property
    def completed(self) -> bool:
        return self.steps >= self.total_steps or self.stopped_early


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and platforms."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def new_adapter(model: HydraTransformer, head: int, config: TrainConfig) -> HeadAdapter:
    modules, layers = check_targets(model, config.target_modules, config.target_layers)
    generator = torch.Generator().manual_seed(derived_seed(config.seed, head, -1))
    return HeadAdapter(model.base_config, layers, modules, config.rank, config.alpha, generator).to(model.device)


def epoch_order(n_items: int, seed: int, head: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(derived_seed(seed, head, epoch))
    return torch.randperm(n_items, generator=generator).tolist()


def evaluate(loss_fn: LossFn, adapter: HeadAdapter, items: Sequence[Any], batch_size: int) -> float:
    """Mean loss per target over ``items``, without gradients."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            loss, n = loss_fn(adapter, items[start : start + batch_size])
            total, count = total + float(loss), count + n
    return total / max(count, 1)


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """A checkpoint's payload. ``weights_only``: a checkpoint is a file on disk, and unpickling arbitrary objects
    from one would run whatever code it names."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch signals a torn or foreign file with many types (pickle, zip, EOF, runtime)
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"checkpoint {path} cannot be read (corrupt or truncated? {type(e).__name__}: {detail}); "
            "delete it to start this head afresh"
        ) from e
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} is not an olmo-tap training checkpoint; delete it to start afresh")
    return state


def train_adapter(
    model: HydraTransformer,
    head: int,
    items: Sequence[Any],
    loss_fn: LossFn,
    config: TrainConfig,
    *,
    checkpoint: str | Path | None = None,
    fingerprint: dict[str, Any] | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    desc: str | None = None,
    early_stop: Callable[[list[float]], bool] | None = None,
) -> TrainResult:
    """Train a fresh adapter for ``head`` on ``items`` (the model stays frozen and unchanged).

    With ``checkpoint``, a matching checkpoint there is resumed and progress is saved to it.
    ``max_steps`` stops early (the result is then incomplete; call again to resume). ``early_stop(losses)``
    true after a step ends the run there (the result is then complete, ``stopped_early``).
    """
    if not items:
        raise ValueError(f"head {head} has no training items")
    steps_per_epoch = math.ceil(len(items) / config.batch_size)
    total = steps_per_epoch * config.epochs
    adapter = new_adapter(model, head, config)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    run_id = {"head": head, "n_items": len(items), "config": config.to_dict(), **(fingerprint or {})}
    result = TrainResult(adapter, total_steps=total)
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.is_file():
        state = _load_checkpoint(path, model.device)
        if state.get("run") != run_id:
            raise ValueError(
                f"checkpoint {path} was written by a different run (other data or settings); "
                "delete it to start afresh, or use another output directory"
            )
        try:
            adapter.load_state_dict(state["adapter"])
            optimizer.load_state_dict(state["optimizer"])
            result.steps = result.resumed_from = int(state["step"])
            result.losses = [float(x) for x in state["losses"]]
        except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as e:
            raise ValueError(f"checkpoint {path} is damaged ({e}); delete it to start this head afresh") from e

    def save() -> None:
        if path is not None:
            _save_checkpoint(
                path,
                {
                    "run": run_id,
                    "step": result.steps,
                    "adapter": adapter.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "losses": result.losses,
                },
            )

    was_training = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # gradients flow to the adapter only
    stop = total if max_steps is None else min(total, max_steps)
    bar = tqdm(
        total=total, initial=result.steps, desc=desc or f"head {head}", disable=not progress, unit="step", leave=True
    )
    order: list[int] = []
    order_epoch = -1
    result.stopped_early = early_stop is not None and result.steps < total and early_stop(result.losses)
    try:
        while result.steps < stop and not result.stopped_early:
            epoch, index = divmod(result.steps, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(len(items), config.seed, head, epoch), epoch
            batch = [items[i] for i in order[index * config.batch_size : (index + 1) * config.batch_size]]
            loss_sum, count = loss_fn(adapter, batch)
            step_loss = 0.0
            # With no targets there is nothing to learn: even a zero gradient would move the weights through Adam's
            # momentum, so such a step makes no update at all.
            if count > 0:
                loss = loss_sum / count
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(adapter.parameters(), config.max_grad_norm)
                optimizer.step()
                step_loss = loss.item()
            result.steps += 1
            result.losses.append(step_loss)
            result.stopped_early = early_stop is not None and result.steps < total and early_stop(result.losses)
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}", epoch=epoch + 1)
            if result.steps % config.checkpoint_every == 0 or result.steps == stop or result.stopped_early:
                save()
    finally:
        bar.close()
        for p, flag in zip(model.parameters(), was_training, strict=True):
            p.requires_grad_(flag)
    return result
