"""``audit_poe``: check that a response really went through the whole jury.

Because every random draw of olmo-tap's decoders is keyed by (seed, absolute position, purpose) and every
draft is made from the emitted prefix, each position's decision depends only on that prefix and the seed. One
teacher-forced pass of the trunk and every text head over prompt + response therefore gives all the logits
the jury saw, and the audit re-takes each decision: the draft head's proposal, the veto, the acceptance test
and the resample. A response made by one head, by naive averaging, with another seed, temperature, beta or
veto, or by other weights, disagrees with the replay at the positions where the jury would have decided
otherwise. (Where every head agrees, e.g. untrained clones at temperature 0, the jury's output *is* the
single head's, and no audit can tell them apart.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from olmo_tap.hydra import HydraTransformer
from olmo_tap.inference.jury import jury_distribution, speculative_decision
from olmo_tap.inference.poe import MODES
from olmo_tap.inference.sampling import Purpose, check_temperature, sample_from_logits
from olmo_tap.inference.transcript import check_transcript, read_transcript
from olmo_tap.verify.replay import check_token_ids, teacher_forced_logits
from olmo_tap.verify.verdict import DEFAULT_AUDIT_THRESHOLD, DEFAULT_CONFIDENCE, Verdict, decide, verdict_label


@dataclass
class PositionCheck:
    """The replayed decision at one emitted position, next to what the transcript claims."""

    index: int  # among the emitted tokens
    position: int  # absolute
    token_id: int  # emitted, as claimed
    expected_token_id: int | None  # what the replayed decoder emits here (None: it abstains)
    consistent: bool
    jury_prob: float | None = None  # the jury's probability of the emitted token (PoE)
    draft_token_id: int | None = None  # the replayed draft (PoE)
    expected_resampled: bool | None = None  # the replay rejects the draft (PoE)
    claimed_resampled: bool | None = None


@dataclass
class PoEAudit:
    verdict: Verdict
    ending_consistent: bool  # the transcript's finish (eos / length / abstain) is what the replay gives
    ending: str
    positions: list[PositionCheck]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def honest(self) -> bool | None:
        if not self.ending_consistent:
            return False
        if self.verdict.n_tokens == 0:
            return True  # an immediate abstention: the ending, the only decision there was, checked out
        return self.verdict.honest

    @property
    def label(self) -> str:
        return verdict_label(self.honest)

    @property
    def inconsistent_positions(self) -> list[int]:
        return [p.index for p in self.positions if not p.consistent]

    def to_dict(self) -> dict[str, Any]:
        return {
            "honest": self.honest,
            "label": self.label,
            "verdict": self.verdict.to_dict(),
            "ending_consistent": self.ending_consistent,
            "ending": self.ending,
            "inconsistent_positions": self.inconsistent_positions,
            "positions": [asdict(p) for p in self.positions],
            "settings": self.settings,
            "notes": self.notes,
        }


def load_audit_model(
    transcript: dict[str, Any],
    model: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> HydraTransformer:
    """The Hydra a transcript claims: its model source (or ``model``), split as the transcript says."""
    from olmo_tap.weights.sources import resolve

    source = model if model is not None else transcript.get("model")
    if source is None:
        raise ValueError("the transcript names no model: pass one (--model)")
    settings = transcript["settings"]
    resolved = resolve(source)
    if resolved.kind == "ensemble_dir":
        return HydraTransformer.from_pretrained(resolved, dtype=dtype, device=device)
    return HydraTransformer.from_pretrained(
        resolved, n_heads=settings.get("n_heads"), heads_depth=settings.get("heads_depth"), dtype=dtype, device=device
    )


@torch.no_grad()
def audit_poe(
    transcript: dict[str, Any] | str | Path,
    model: HydraTransformer | str | Path | None = None,
    *,
    threshold: float = DEFAULT_AUDIT_THRESHOLD,
    confidence: float = DEFAULT_CONFIDENCE,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> PoEAudit:
    """Replay a transcript (dict or file) through ``model`` (default: the model it names) and judge it.

    Works for every decoder mode the transcript may claim: "poe" (the jury), "naive" and "single".
    """
    data = read_transcript(transcript) if isinstance(transcript, str | Path) else check_transcript(transcript)
    hydra = model if isinstance(model, HydraTransformer) else load_audit_model(data, model, dtype, device)
    settings = dict(data["settings"])
    mode = settings["mode"]
    if mode not in MODES:
        raise ValueError(f"transcript mode {mode!r} is not one of {MODES}")
    n_text = int(settings["n_llm_heads"])
    if not 1 <= n_text <= hydra.n_heads:
        raise ValueError(f"the transcript used {n_text} text heads; this model has {hydra.n_heads} heads")
    vocab = int(settings.get("vocab_limit") or hydra.base_config.vocab_size)
    if vocab > hydra.base_config.vocab_size:
        raise ValueError(
            f"vocabulary mismatch: the transcript sampled over {vocab} tokens, "
            f"the model has {hydra.base_config.vocab_size}"
        )
    prompt, emitted = list(data["prompt_ids"]), list(data["token_ids"])
    check_token_ids(prompt, vocab, "transcript prompt")
    check_token_ids(emitted, vocab, "transcript response")
    if len(prompt) + len(emitted) + 1 > hydra.base_config.max_seq_len:
        raise ValueError("the transcript is longer than the model's context")
    temperature = check_temperature(settings["temperature"])
    seed = int(settings["seed"])
    logits = teacher_forced_logits(hydra, prompt, emitted, list(range(n_text)), include_next=True)[..., :vocab]
    output = data.get("output", {})
    claimed_resampled = set(output.get("resampled_idxs", []))  # indices into output_parts: emitted index + 1
    replay = _replay_poe if mode == "poe" else _replay_plain
    positions, abstains_next = replay(logits, emitted, len(prompt), settings, temperature, seed, claimed_resampled)
    ending_ok, ending = _check_ending(output, emitted, settings, abstains_next)
    verdict = decide([p.consistent for p in positions], threshold, confidence)
    notes = []
    if temperature == 0 and mode == "poe":
        notes.append("greedy: the replay checks argmax decisions; heads that always agree cannot be told apart")
    return PoEAudit(verdict, ending_ok, ending, positions, settings, notes)


def _replay_poe(
    logits: torch.Tensor,
    emitted: list[int],
    first: int,
    settings: dict[str, Any],
    temperature: float,
    seed: int,
    claimed_resampled: set[int],
) -> tuple[list[PositionCheck], bool]:
    draft_head = settings["draft_head"]
    n_text = logits.size(0)
    if not isinstance(draft_head, int) or not 0 <= draft_head < n_text:
        raise ValueError(f"transcript draft_head {draft_head!r} is not one of the {n_text} text heads")
    verifiers = [h for h in range(n_text) if h != draft_head]
    target, allowed = jury_distribution(
        logits[verifiers], temperature, float(settings["beta"]), settings["veto_threshold"]
    )
    draft_logits = logits[draft_head]
    checks = []
    for j, token in enumerate(emitted):
        position = first + j
        draft = sample_from_logits(draft_logits[j], temperature, seed, position, Purpose.SAMPLE)
        check = PositionCheck(
            j, position, token, None, False, draft_token_id=draft, claimed_resampled=(j + 1) in claimed_resampled
        )
        if allowed[j]:
            q = torch.softmax(draft_logits[j] / temperature, dim=-1) if temperature > 0 else None
            decision = speculative_decision(target[j], q, draft, temperature, seed, position)
            check.expected_token_id = decision.token
            check.expected_resampled = not decision.accepted
            check.jury_prob = float(target[j, token])
            check.consistent = decision.token == token and check.expected_resampled == check.claimed_resampled
        checks.append(check)
    return checks, not bool(allowed[len(emitted)])


def _replay_plain(
    logits: torch.Tensor,
    emitted: list[int],
    first: int,
    settings: dict[str, Any],
    temperature: float,
    seed: int,
    claimed_resampled: set[int],
) -> tuple[list[PositionCheck], bool]:
    if settings["mode"] == "naive":
        combined = logits.mean(dim=0)
    else:
        head = settings["draft_head"]
        if not isinstance(head, int) or not 0 <= head < logits.size(0):
            raise ValueError(f"transcript head {head!r} is not one of the {logits.size(0)} text heads")
        combined = logits[head]
    checks = []
    for j, token in enumerate(emitted):
        expected = sample_from_logits(combined[j], temperature, seed, first + j, Purpose.SAMPLE)
        resampled = (j + 1) in claimed_resampled  # a plain decoder never resamples
        checks.append(
            PositionCheck(
                j, first + j, token, expected, expected == token and not resampled, claimed_resampled=resampled
            )
        )
    return checks, False  # plain decoders never abstain


def _check_ending(
    output: dict[str, Any], emitted: list[int], settings: dict[str, Any], abstains_next: bool
) -> tuple[bool, str]:
    """Did the response end where and how the replayed decoder would have ended it?"""
    stop_ids = set(settings.get("stop_ids") or [])
    max_new = settings.get("max_new_tokens")
    claims_abstention = output.get("finish_reason") == "abstain" or bool(output.get("abstained"))
    if stop_ids & set(emitted[:-1]):
        return False, "the response continues past an end-of-text token"
    if emitted and emitted[-1] in stop_ids:
        return not claims_abstention, "ended with an end-of-text token"
    if max_new is not None and len(emitted) >= max_new:
        return not claims_abstention, "length limit reached"
    if abstains_next:
        if claims_abstention:
            return True, "abstained: the jury allows no token at the next position"
        return False, "the jury allows no token at the next position, but the response claims it did not abstain"
    if claims_abstention:
        return False, "the response claims an abstention, but the jury allows tokens at that position"
    if output.get("finish_reason") == "time_limit":
        # a service cut the response short: not a jury decision, and every emitted token is still checked
        return True, "cut short by the service's time limit (the tokens before the cut are checked)"
    if max_new is None:
        return True, "no length limit recorded; ending not checked"
    return False, f"the response stops after {len(emitted)} tokens without end-of-text, limit or abstention"
