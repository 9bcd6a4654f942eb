"""Model work asked for by decoders, and one runner that does the work of many sequences in batched passes.

A decoder (``olmo_tap.inference.poe``) is a generator per sequence: it yields an op, receives its result,
and yields the next. ``BatchRunner.run`` takes one op from each of any number of sequences and does them
together: every ``Step`` of the batch shares one trunk pass (one token per row, each at its own position),
rows that each run one head (drafts, single-head decoding) share one head pass with each row through its own
(``RowTowers``), rows asking for the same heads share theirs, every ``Verify`` shares one pass with each
verification through its own verifiers, and all of it shares one lm_head product. The ``Prefill`` ops of a
call run first, all prompts in one pass (their products read each weight once for all of them), before the
call's steps: a prompt is already many rows, and
running prompts between steps rather than inside them keeps a decoding row's step time bounded by the step
plus the prompts that arrived with it. Which ops of a batch go into a call is ``due``'s choice: a verification
waits a few calls for the others' drafts, so that the batch's rounds end together.

Batch invariance: a row's result does not depend on the other rows. Attention runs per row over its own
slot; norms and elementwise operations are per row; the linear layers on CPU run on olmo-tap's native fp32
kernel, whose every output is one chain of multiply-adds in a fixed order (``olmo_tap.model.native_linear``), or
on oneDNN-prepacked weights, whose products give every row the same bits for any row count >= 2 (in batch
arithmetic a lone row runs as two where it would round otherwise, see ``olmo_tap.model.layers``); and which
towers run for a row depends only on its own op (a verification runs its own verifiers, whatever the others
verify with). ``batch_invariant`` says whether the
model's weights all take that path; where they do not (other devices, weights too small to pack, CPUs without
oneDNN support for the dtype), plain batched products may round a row differently with another row count, and
a transcript says so.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from olmo_tap.model.kernels import batch_arithmetic
from olmo_tap.model.kv_cache import HydraCache, Rows
from olmo_tap.quant import native
from olmo_tap.quant.linear import route_for as quant_route_for
from olmo_tap.quant.model import quantized_stacks

if TYPE_CHECKING:
    from olmo_tap.hydra import HydraTransformer


@dataclass
class Prefill:
    """Cache ``ids`` at positions [0, len(ids)) of ``slot`` in the trunk and ``heads``."""

    slot: int
    ids: list[int]
    heads: range


@dataclass
class Step:
    """One token at ``position`` of ``slot`` through the trunk and ``heads``; returns a ``StepResult``."""

    slot: int
    token: int
    position: int
    heads: range
    draft: bool = False  # a PoE draft: its sequence verifies within a few calls (see ``due``)


@dataclass
class StepResult:
    trunk_state: torch.Tensor  # (d_model,)
    hidden: torch.Tensor  # (len(heads), d_model), pre-norm
    logits: torch.Tensor  # (len(heads), vocab)


@dataclass
class Verify:
    """The text heads ``heads`` on saved trunk states (g, d_model) of positions [start, start + g) of ``slot``;
    returns a ``VerifyResult`` for them (in that order). Only those heads run, each as a pass of it alone would
    (the drafter wrote its own keys and values for these positions in its draft steps)."""

    slot: int
    trunk_states: torch.Tensor
    start: int
    heads: list[int]
    patience: int = 0  # how many calls it may wait for the batch's drafts (``due``)
    waited: int = 0  # how many it has waited


@dataclass
class VerifyResult:
    hidden: torch.Tensor  # (len(heads), g, d_model), pre-norm
    logits: torch.Tensor  # (len(heads), g, vocab)


@dataclass
class Local:
    """Work a sequence does alone, outside the batch (its compiled decode step): the runner calls ``work`` and
    hands back what it returns. An op of its own so that the events before it reach the consumer first."""

    work: Callable[[], Any]


Op = Prefill | Step | Verify | Local


def due(ops: list[Op]) -> list[bool]:
    """Which ops of a batch run in the next call: all but the verifications that wait for the others' drafts.

    Every call with a step pays a whole trunk pass, whose products read every trunk weight whether one row or
    eight share it, and every call with a verification a pass of all text heads. Sequences fall out of step (a
    round cut short by a drafted end of text, a sequence that joins mid-round): a batch of 8 whose rounds ended
    at different calls paid 5 trunk passes and 3 verification passes a round instead of 4 and 1 (measured on the
    embedded default). So a verification waits while the other ops of the batch are all draft steps, and runs
    with the next verifications: the batch's rounds then end together and begin together. Every round ends in a
    verification, so the wait is at most the longest round's drafts (plus one call per sequence that joins
    meanwhile); ``patience`` (the decoder gives twice its gamma) bounds it where the batch's gammas differ. A
    step that is not a draft (single-head or naive decoding) pays the trunk pass every call anyway: nothing waits
    beside it. What a sequence computes does not change, only when: waiting never changes a token.
    """
    steps = [op for op in ops if isinstance(op, Step)]
    drafting = bool(steps) and all(op.draft for op in steps)
    run = []
    for op in ops:
        wait = drafting and isinstance(op, Verify) and op.waited < op.patience
        if wait:
            op.waited += 1  # type: ignore[union-attr]
        run.append(not wait)
    return run


def batch_invariant(model: HydraTransformer) -> bool:
    """Whether a row's arithmetic does not depend on the rows decoded beside it: every float linear layer of
    ``model`` runs on packed weights (the native fp32 kernel, or oneDNN, whose lone rows batch arithmetic pads),
    or its quantized products take the native kernel (which batch arithmetic gives every row count)."""
    if model.device.type != "cpu":
        return False
    if model.quantization is not None:  # the other routes' float kernels block by the row count
        takes_native = all(native.supports(w.in_features) for stack in quantized_stacks(model) for w in stack.parts)
        return takes_native and quant_route_for(model) == "native"
    packs = [packed.get(getattr(block, name)) for block in model._blocks() for name, packed in block._packed.items()]
    packs.append(model._packed_lm_head.get(model.lm_head.unsqueeze(0)))
    return all(p is not None for p in packs)


class BatchRunner:
    """Does the ops of many sequences on ``model`` with ``cache`` (one slot per sequence).

    ``batched`` (default: the cache has more than one slot) runs in batch arithmetic (``kernels.batch_arithmetic``):
    a sequence's result is then the same whatever else shares its steps, a batch of one included. A runner that
    only ever serves one sequence (``PoE.stream``) leaves it off and gains ~5%.
    """

    def __init__(self, model: HydraTransformer, cache: HydraCache, batched: bool | None = None) -> None:
        self.model = model
        self.cache = cache
        self.batched = cache.slots > 1 if batched is None else batched

    @torch.no_grad()
    def run(self, ops: list[Op]) -> list[Any]:
        """The result of each op, in order."""
        with batch_arithmetic(self.batched):
            return self._run(ops)

    def _run(self, ops: list[Op]) -> list[Any]:
        results: list[Any] = [None] * len(ops)
        self._prefill([op for op in ops if isinstance(op, Prefill) and op.ids])
        for i, op in enumerate(ops):
            if isinstance(op, Local):
                results[i] = op.work()
        steps = [(i, op) for i, op in enumerate(ops) if isinstance(op, Step)]
        verifies = [(i, op) for i, op in enumerate(ops) if isinstance(op, Verify)]
        hidden_parts: list[torch.Tensor] = []  # every row's pre-norm states, projected together below
        step_hidden = self._steps([op for _, op in steps], hidden_parts)
        verify_hidden = self._verify([op for _, op in verifies], hidden_parts)
        if not hidden_parts:
            return results
        flat = torch.cat(hidden_parts) if len(hidden_parts) > 1 else hidden_parts[0]
        logits = self.model.project(flat)
        for (i, op), (trunk_state, hidden, offset) in zip(steps, step_hidden, strict=True):
            n = len(op.heads)
            results[i] = StepResult(trunk_state, hidden, logits[offset : offset + n])
        for (i, _), (hidden, offset) in zip(verifies, verify_hidden, strict=True):
            n, g = hidden.shape[:2]
            results[i] = VerifyResult(hidden, logits[offset : offset + n * g].view(n, g, -1))
        return results

    def _prefill(self, ops: list[Prefill]) -> None:
        """Every prompt in one trunk pass (its products read each weight once for all of them) and one head pass
        per head set; each row attends to its own slot only."""
        if not ops:
            return
        model = self.model
        rows = Rows.of([op.slot for op in ops], [0] * len(ops), [len(op.ids) for op in ops])
        trunk = model.trunk_rows(torch.tensor([t for op in ops for t in op.ids]), rows, self.cache)
        spans, first = [], 0
        for op in ops:
            spans.append(range(first, first + len(op.ids)))
            first += len(op.ids)
        groups: dict[range, list[int]] = defaultdict(list)
        for i, op in enumerate(ops):
            groups[op.heads].append(i)
        for heads, members in groups.items():
            if len(members) == len(ops):
                model.heads_rows(trunk, heads, rows, self.cache)
                continue
            sub = Rows.of([ops[i].slot for i in members], [0] * len(members), [len(ops[i].ids) for i in members])
            model.heads_rows(trunk[[t for i in members for t in spans[i]]], heads, sub, self.cache)

    def _steps(self, ops: list[Step], hidden_parts: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """One trunk pass for every step, then the heads: where each row runs one head (draft steps, single-head
        decoding) one pass of all of them with each row through its own (``heads_rows_each``), else one pass
        per head set. Per op: (trunk state, head states, offset of its rows in the projection)."""
        if not ops:
            return []
        model = self.model
        one_head = all(len(op.heads) == 1 for op in ops)
        # rows sharing a head next to each other (the trunk's rows do not depend on their order)
        order = sorted(range(len(ops)), key=lambda i: ops[i].heads.start) if one_head else list(range(len(ops)))
        ordered = [ops[i] for i in order]
        rows = Rows.of([op.slot for op in ordered], [op.position for op in ordered], [1] * len(ordered))
        trunk = model.trunk_rows(torch.tensor([op.token for op in ordered]), rows, self.cache)
        out: list[tuple[torch.Tensor, torch.Tensor, int] | None] = [None] * len(ops)
        offset = sum(p.size(0) for p in hidden_parts)
        if one_head:
            hidden = model.heads_rows_each(trunk, [op.heads.start for op in ordered], rows, self.cache)
            hidden_parts.append(hidden)
            for k, i in enumerate(order):
                out[i] = (trunk[k], hidden[k : k + 1], offset + k)
            return out  # type: ignore[return-value]
        groups: dict[range, list[int]] = defaultdict(list)
        for i, op in enumerate(ops):
            groups[op.heads].append(i)
        for heads, members in groups.items():
            sub = Rows.of([ops[i].slot for i in members], [ops[i].position for i in members], [1] * len(members))
            states = trunk if len(members) == len(ops) else trunk[members]
            hidden = model.heads_rows(states, heads, sub, self.cache)  # (n_heads, rows, d)
            for k, i in enumerate(members):
                row = hidden[:, k]
                hidden_parts.append(row)
                out[i] = (trunk[i], row, offset)
                offset += row.size(0)
        return out  # type: ignore[return-value]

    def _verify(self, ops: list[Verify], hidden_parts: list[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
        """One pass of the heads over all verifications, each verification through its own verifiers only (its
        drafter's keys and values for these positions are in the cache since its draft steps): the rows of each
        head one after the other, as ``heads_rows_each`` runs them, with the bits a pass of that head alone gives
        them. Per op: (its heads' pre-norm states (n, g, d), offset of its rows in the projection)."""
        if not ops:
            return []
        slots, starts, lengths, states, towers = [], [], [], [], []
        where: dict[tuple[int, int], int] = {}  # (head, op) -> the first of its rows in the pass
        tokens = 0
        for head in sorted({h for op in ops for h in op.heads}):
            for k, op in enumerate(ops):
                if head in op.heads:
                    where[head, k] = tokens
                    tokens += op.trunk_states.size(0)
                    slots.append(op.slot)
                    starts.append(op.start)
                    lengths.append(op.trunk_states.size(0))
                    states.append(op.trunk_states)
                    towers.append(head)
        flat = torch.cat(states) if len(states) > 1 else states[0]
        hidden = self.model.heads_rows_each(flat, towers, Rows.of(slots, starts, lengths), self.cache)
        out, offset = [], sum(p.size(0) for p in hidden_parts)
        for k, op in enumerate(ops):
            g = op.trunk_states.size(0)
            part = torch.stack([hidden[where[h, k] : where[h, k] + g] for h in op.heads])  # (n, g, d)
            hidden_parts.append(part.view(-1, part.size(-1)))
            out.append((part, offset))
            offset += part.size(0) * g
        return out
