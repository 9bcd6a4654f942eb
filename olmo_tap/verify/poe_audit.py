"""``audit_poe``: check that a response really went through the whole jury, position by position.

Every random draw of olmo-tap's decoders is keyed by (seed, absolute position, purpose) and every draft is
made from the emitted prefix, so each position's decision depends only on that prefix and the seed. One
teacher-forced pass of the trunk and every text head over prompt + response gives all the logits the jury
saw, and the audit re-takes each decision: the draft head's proposal, the veto, the acceptance test and the
resample (or a plain decoder's draw).

The rule is per position, not a percentage. For each emitted token the replay computes the *slack*: how far,
in nats, the replayed numbers would have to move for the transcript's claimed outcome to happen (0 when the
replay reproduces it). Each decision has its own deciding quantity:

- a draw (a draft, a plain decoder's token, greedy argmax): the gap between the best score and the claimed
  token's score, scores being ``logits / T + Gumbel`` (``logits`` when greedy);
- the veto: ``log tau - log min_i p_i(token)`` when the token is below a verifier's threshold;
- the acceptance test (accept iff ``u * q(x) < P(x)``): ``log(u q(x)) - log P(x)`` on the wrong side;
- the resample from ``norm(max(0, P - q))`` by Gumbel-max: how far the claimed token's P must rise and its q
  fall (by the same factor) for it to win. Not the gap on the residual's log: where P is close to q the
  residual is a difference of near-equal numbers, and a tiny relative change of either moves its log without
  bound (to -inf where it clamps to 0), which across dtypes made honest near-ties look like 3-nat misses or
  impossible claims.

A position is consistent when its slack is within the tolerance; every other position is listed and makes
the transcript NOT honest, however few there are. Replayed in the generator's own dtype and device class
(and without ``--compile``), the tolerance is zero: the replay must be exact. Across dtypes or devices a
calibrated tolerance explains near-ties only (``DEFAULT_DECISION_TOLERANCE``, README "Verification").

The replay computes logits in blocks of >= 16 rows, the generator in its own shapes (one-row draft steps,
verification passes of gamma + 1 rows), and on a CPU products of different row or thread counts round
differently: at a decision tied to ~1e-5 nats the two exact computations can part. So in the exact case any
disagreement of a decision, the ending or a per-token signal runs the generator once more on the claim, with
its settings and thread count (``olmo_tap.verify.regenerate``): the claim is honest iff that reproduces every
token, draft and decision and every field; else the first position where the generator parts is listed too.

The transcript's derived fields (text, per-token signals, drafts, counts, p(correct)) are rebuilt from the
replay with the decoder's own fold and compared; its digest is recomputed; a signature, if any, is checked.
The pooled agreement statistics are kept as information, not as the rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from olmo_tap.hydra import HydraTransformer
from olmo_tap.inference.jury import RESIDUAL_EPS, jury_distribution, jury_log_target, speculative_decision, veto_mask
from olmo_tap.inference.metrics import validity_radius
from olmo_tap.inference.poe import OutputFold, PoE, PoEOutput, check_finite, new_output, position_signals
from olmo_tap.inference.prompts import stop_token_ids
from olmo_tap.inference.sampling import (
    Purpose,
    argmax_last,
    check_temperature,
    gumbel,
    logit_scores,
    prob_scores,
    uniform,
)
from olmo_tap.inference.settings import RECORDED_SETTINGS, round_gamma
from olmo_tap.inference.transcript import TOP_LEVEL_FIELDS, check_transcript, content_digest, read_transcript
from olmo_tap.model import native_attention, native_linear, native_norm
from olmo_tap.quant import linear as qlinear
from olmo_tap.robustness.bank import AttackBank
from olmo_tap.verify.certainty_audit import CertaintyAudit, audit_certainty
from olmo_tap.verify.regenerate import Regeneration, generator_routes, regenerate
from olmo_tap.verify.replay import LOGIT_BLOCK, check_token_ids, project_block, teacher_forced_hidden
from olmo_tap.verify.robustness_audit import RobustnessAudit, audit_robustness
from olmo_tap.verify.verdict import DEFAULT_AUDIT_THRESHOLD, DEFAULT_CONFIDENCE, Verdict, decide, verdict_label
from olmo_tap.weights.tokenizer import vocab_limit

# Nats a replay in another dtype or device class may be off at a decision: twice the largest slack of 6188
# honest positions of 200 bf16 transcripts audited in fp32 on the embedded default's clones (1.85 nats;
# python -m olmo_tap.verify.experiment --part audit --cross-only --n 400, results/verification/audit_cross.md).
DEFAULT_DECISION_TOLERANCE = 3.7
# Float signals (entropies in nats; margins, suppression scores and p(correct) as probabilities): the
# generator's KV-cached steps and the replay's one pass differ in rounding, even in one dtype; across dtypes
# twice the largest honest drift of the same calibration (0.50).
SAME_DTYPE_SIGNAL_TOLERANCE = 1e-3
CROSS_DTYPE_SIGNAL_TOLERANCE = 1.1
UNAUDITED_OUTPUT_FIELDS = ("elapsed_s", "tokens_per_second")  # timings: no replay can know them
# per-token signals: a rounding tie may flip a discrete one (a head's vote, so a radius) between two exact paths
MISSING = "(missing)"  # what a FieldMismatch claims for a field the record leaves out
PER_TOKEN_FIELDS = ("token_entropies", "stability_radii", "stability_margins", "validity_radii", "suppression_scores")
V2_OUTPUT_FIELDS = ("whole_jury", "independent_heads", "certified")  # a version 1 transcript lacks them
SETTING_NAMES = RECORDED_SETTINGS


@dataclass
class PositionCheck:
    """The replayed decision at one emitted position, next to what the transcript claims."""

    index: int  # among the emitted tokens
    position: int  # absolute
    token_id: int  # emitted, as claimed
    expected_token_id: int | None  # what the replayed decoder emits here (None: it abstains)
    consistent: bool
    slack: float = 0.0  # nats the replay must move for the claimed outcome (0: reproduced)
    margin: float = math.inf  # nats from the nearest decision flip on the claimed path
    decision: str = ""  # the decision that is off (or the closest one), e.g. "draft", "accept", "veto"
    jury_prob: float | None = None  # the jury's probability of the emitted token (PoE)
    draft_token_id: int | None = None  # the replayed draft (PoE)
    claimed_draft_token_id: int | None = None
    expected_resampled: bool | None = None  # the replay rejects the draft (PoE)
    claimed_resampled: bool | None = None


@dataclass
class FieldMismatch:
    """A field of the transcript that is not what its claim (settings + ids) gives."""

    field: str  # e.g. "output.output_parts[3]", "digest", "settings.vocab_limit"
    claimed: Any
    expected: Any

    @property
    def missing(self) -> bool:
        """The record leaves the field out."""
        return self.claimed == MISSING

    def __str__(self) -> str:
        return f"{self.field}: transcript says {_short(self.claimed)}, the replay gives {_short(self.expected)}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class PoEAudit:
    honest: bool
    reason: str
    digest: str
    text: str  # the decoding of the audited ids: what a reader may be shown
    mode: str
    jury: bool  # the transcript claims the jury (PoE), not one head or naive averaging
    whole_jury: bool  # PoE over every text head of the replaying model, not a subset
    independent_heads: bool  # no two text heads of the replaying model have identical weights
    tolerance: float  # nats; 0 = exact replay
    ending_consistent: bool
    ending: str
    positions: list[PositionCheck]
    field_mismatches: list[FieldMismatch]
    near_ties: int  # consistent positions whose margin is within the tolerance
    settings: dict[str, Any]
    statistics: Verdict  # pooled agreement: information, not the rule
    signature: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    replayed_output: PoEOutput | None = field(default=None, repr=False)  # the derived fields the claim gives
    # only where the block replay disagreed in the generator's own dtype: the decoder re-run on the claim
    regeneration: Regeneration | None = None
    certainty: CertaintyAudit | None = None  # the KLE certainty's samples and value, when the transcript has one
    robustness: RobustnessAudit | None = None  # the robustness probe's attacked answers, when it has them
    # the largest difference between a float signal the transcript claims and the replay's, within the tolerance
    signal_drift: float = 0.0
    signal_tolerance: float = 0.0

    @property
    def exact(self) -> bool:
        return self.tolerance == 0

    @property
    def verdict(self) -> Verdict:
        return self.statistics

    @property
    def certified(self) -> bool:
        """Honest, and what it claims is the certificate: the whole jury of independent heads, ended on its
        own terms (PoEOutput.certified, rebuilt by the replay)."""
        return self.honest and self.replayed_output is not None and self.replayed_output.certified

    @property
    def label(self) -> str:
        if not self.honest:
            return verdict_label(False)
        if not self.jury:
            return f"honest {self.mode} response (not the jury)"
        if not self.whole_jury:
            return f"honest, but not the whole jury ({self.settings['n_llm_heads']} text heads took part)"
        return "honest" if self.independent_heads else "honest (identical heads: no independent jury)"

    @property
    def inconsistent_positions(self) -> list[int]:
        return [p.index for p in self.positions if not p.consistent]

    def to_dict(self) -> dict[str, Any]:
        return {
            "honest": self.honest,
            "label": self.label,
            "reason": self.reason,
            "certified": self.certified,
            "digest": self.digest,
            "text": self.text,
            "mode": self.mode,
            "jury": self.jury,
            "whole_jury": self.whole_jury,
            "independent_heads": self.independent_heads,
            "tolerance": self.tolerance,
            "exact": self.exact,
            "ending_consistent": self.ending_consistent,
            "ending": self.ending,
            "inconsistent_positions": self.inconsistent_positions,
            "field_mismatches": [
                {"field": m.field, "claimed": m.claimed, "expected": m.expected} for m in self.field_mismatches
            ],
            "near_ties": self.near_ties,
            "signal_drift": self.signal_drift,
            "signal_tolerance": self.signal_tolerance,
            "regeneration": None if self.regeneration is None else self.regeneration.to_dict(),
            "certainty": None if self.certainty is None else self.certainty.to_dict(),
            "robustness": None if self.robustness is None else self.robustness.to_dict(),
            "signature": self.signature,
            "statistics": self.statistics.to_dict(),
            "positions": [asdict(p) for p in self.positions],
            "settings": self.settings,
            "notes": self.notes,
        }


def load_audit_model(
    transcript: dict[str, Any],
    model: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> tuple[HydraTransformer, Any]:
    """The Hydra a transcript claims (its model source, or ``model``), split as the transcript says, in the
    generator's dtype unless ``dtype`` says otherwise (then the replay can be exact), and its tokenizer."""
    from olmo_tap.weights.sources import resolve
    from olmo_tap.weights.tokenizer import load_tokenizer

    source = model if model is not None else transcript.get("model")
    if source is None:
        raise ValueError("the transcript names no model: pass one (--model)")
    settings = transcript["settings"]
    if dtype is None:
        dtype = settings.get("dtype")
    quantize = settings.get("quantization")  # replayed in the generator's own quantization
    resolved = resolve(source)
    if resolved.kind == "ensemble_dir":
        hydra = HydraTransformer.from_pretrained(resolved, dtype=dtype, device=device, quantize=quantize)
    else:
        hydra = HydraTransformer.from_pretrained(
            resolved,
            n_heads=settings.get("n_heads"),
            heads_depth=settings.get("heads_depth"),
            dtype=dtype,
            device=device,
            quantize=quantize,
        )
    return hydra, load_tokenizer(resolved, progress=False)


def why_not_exact(settings: dict[str, Any], model: HydraTransformer) -> str | None:
    """None when the replay runs in the generator's own dtype, device class, weights and kernel routes (and it
    did not compile its steps, nor share passes with other answers on kernels that round a row by its batch):
    then olmo-tap's arithmetic reproduces every decision and no drift needs tolerating. Else why not. Called
    within ``generator_routes(settings)``."""
    dtype = str(model.dtype).removeprefix("torch.")
    device = str(settings.get("device") or "").split(":")[0]
    if settings.get("dtype") != dtype or device != model.device.type:
        generated = f"{settings.get('dtype')} on {device or 'an unnamed device'}"
        return f"generated in {generated}, replayed in {dtype} on {model.device.type}"
    if settings.get("compile", False):
        return "compiled steps (their rounding is the compiler's)"
    if settings.get("batched") and settings.get("batch_invariant") is False:
        return "decoded in a batch on kernels that round a row by its batch"
    # the two attention routes agree within rounding: exact only where this machine takes the generator's
    attention = settings.get("attention") or "torch"
    if native_attention.route_for(model) != attention:
        return f"the generator's {attention} attention route does not run here"
    norm = settings.get("norm") or "torch"
    if native_norm.route_for(model) != norm:
        return f"the generator's {norm} norm route does not run here"
    return _other_products(settings, model)


def _other_products(settings: dict[str, Any], model: HydraTransformer) -> str | None:
    """None where the replay's weights and products are the generator's: float on the same route (native,
    oneDNN or stock), or the same quantization on a route that takes it here; else why not. Not the fused route
    (its loops are Inductor's, generated for each CPU), nor a quantized transcript from before its route was
    recorded."""
    scheme = settings.get("quantization")
    if scheme != model.quantization_scheme:
        return f"weights {scheme or 'float'} in the transcript, {model.quantization_scheme or 'float'} here"
    if scheme is None:  # a transcript from before the route was recorded replays on the routes of its time
        recorded, here = settings.get("linear"), native_linear.route_for(model)
        return None if recorded in (None, here) else f"the generator's {recorded} products run {here} here"
    route = settings.get("quant_kernel")
    if route in (qlinear.NATIVE_REVISION, "dequantize") and qlinear.recorded_route(qlinear.route_for(model)) == route:
        return None
    if route is None:
        return "the transcript does not record its quantized products' route"
    if route in qlinear.EARLIER_NATIVE_REVISIONS:
        return f"the generator's native quantized products are an earlier revision's ({route}: other int4 arithmetic)"
    return f"the quantized products' {route} route is not replayed exactly here"


@torch.no_grad()
def audit_poe(
    transcript: dict[str, Any] | str | Path,
    model: HydraTransformer | str | Path | None = None,
    *,
    tokenizer: Any = None,
    tolerance: float | None = None,
    signal_tolerance: float | None = None,
    public_key: Any = None,
    check_stop: Callable[[], None] | None = None,
    threshold: float = DEFAULT_AUDIT_THRESHOLD,
    confidence: float = DEFAULT_CONFIDENCE,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    attack_bank: AttackBank | None = None,
) -> PoEAudit:
    """Replay a transcript (dict or file) through ``model`` (default: the model it names) and judge it.

    :param tokenizer: the model's tokenizer (needed to check the text; loaded with the model when ``model`` is
        a source, or from the transcript's model name when a loaded Hydra comes without one).
    :param tolerance: nats a decision may be off and still count as a near-tie. Default: 0 when the replay
        runs in the generator's dtype and device class, else ``DEFAULT_DECISION_TOLERANCE``.
    :param signal_tolerance: how far a float signal (entropy in nats; margins, scores, p(correct) as
        probabilities) may differ from the replay's. Default: ``SAME_DTYPE_SIGNAL_TOLERANCE`` for an exact
        replay, else ``CROSS_DTYPE_SIGNAL_TOLERANCE``.
    :param public_key: an Ed25519 public key the transcript's signature must come from (else its signature,
        if any, is checked for integrity only).
    :param check_stop: called between blocks of positions; may raise to stop the work (a service's deadline,
        a client that left).
    :param threshold, confidence: of the pooled agreement statistics (information only).
    :param attack_bank: the bank a robustness record's suffixes must come from (without one they are replayed
        but not checked against a bank).

    Works for every decoder mode the transcript may claim: "poe" (the jury), "naive" and "single".
    """
    data = read_transcript(transcript) if isinstance(transcript, str | Path) else check_transcript(transcript)
    asked_tolerance = tolerance
    if isinstance(model, HydraTransformer):
        hydra = model
        if tokenizer is None:
            tokenizer = _tokenizer_for(data)
    else:
        hydra, loaded_tokenizer = load_audit_model(data, model, dtype, device)
        tokenizer = tokenizer or loaded_tokenizer
    settings = dict(data["settings"])
    mode = settings["mode"]
    n_text = settings["n_llm_heads"]
    if not 1 <= n_text <= hydra.n_heads:
        raise ValueError(f"the transcript used {n_text} text heads; this model has {hydra.n_heads} heads")
    model_vocab = vocab_limit(tokenizer, hydra.base_config.vocab_size)
    vocab = settings.get("vocab_limit") or model_vocab
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
    # the block replay and any regeneration take the generator's kernel routes
    with generator_routes(settings):
        inexact = why_not_exact(settings, hydra)
        exact = inexact is None
        if tolerance is None:
            tolerance = 0.0 if exact else DEFAULT_DECISION_TOLERANCE
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0 nats, got {tolerance}")
        temperature = check_temperature(settings["temperature"])
        output = data.get("output") or {}
        mismatches = _check_claim(data, settings, hydra, tokenizer, model_vocab)
        claims = _claimed_path(output, emitted, mode, mismatches)

        hidden = teacher_forced_hidden(hydra, prompt, emitted, list(range(n_text)), include_next=True)
        witness_states = hidden[:, 0]

        def logits_for(start: int, stop: int) -> torch.Tensor:
            return project_block(hydra, hidden, start, stop)[..., :vocab]

        replay = _Replay(logits_for, len(emitted) + 1, settings, temperature, len(prompt), check_stop)
        positions, events = [], []
        for j, (token, draft, resampled) in enumerate(claims):
            check, event = replay.position(j, token, draft, resampled)
            check.consistent = check.slack <= tolerance
            positions.append(check)
            events.append(event)
        ending_ok, ending, finish_reason = _check_ending(output, emitted, settings, replay, tolerance)
        cut = finish_reason == "time_limit"  # the service closed the decoder mid-stream: no final flush, no p(correct)
        if signal_tolerance is None:
            signal_tolerance = SAME_DTYPE_SIGNAL_TOLERANCE if tolerance == 0 else CROSS_DTYPE_SIGNAL_TOLERANCE
        skip = V2_OUTPUT_FIELDS if data["version"] == 1 else ()
        independent = not hydra.identical_heads(range(n_text))
        p_correct: dict[str, float | None] = {}

        def derived(events: list[Any]) -> tuple[PoEOutput, list[FieldMismatch]]:
            """The output the claim gives when its positions decide ``events``; and how the transcript's differs."""
            expected = new_output(tokenizer, prompt, *replay.roles(), settings)
            expected.whole_jury = mode == "poe" and n_text == hydra.n_text_heads
            expected.independent_heads = independent
            fold = OutputFold(expected, tokenizer)
            for event in events:
                fold.add(event)
            if not cut:
                fold.close()
            replay.count(expected, claims, finish_reason)
            if settings.get("mcq") and not cut:
                if "p" not in p_correct:  # scored once, from the block replay's witness state
                    p_correct["p"] = _p_correct(
                        hydra, tokenizer, settings, expected, replay, witness_states, mismatches
                    )
                expected.uncertainty = p_correct["p"]
            if not output:
                return expected, [], 0.0
            return expected, *_compare_output(output, expected, signal_tolerance, replay.vote_margins, tolerance, skip)

        expected, output_mismatches, drift = derived(events)
        regenerated = None
        # A field the record leaves out (a side answer keeps only its path) is as missing after a regeneration.
        per_token = [
            m
            for m in output_mismatches
            if not m.missing and m.field.split("[")[0].removeprefix("output.") in PER_TOKEN_FIELDS
        ]
        if (
            exact
            and tolerance == 0
            and not mismatches
            and (not ending_ok or per_token or any(not p.consistent for p in positions))
        ):
            # A rounding tie between the block replay and the generator's own shapes: only the generator's arithmetic
            # settles it, so the decoder runs once more on the claim (honest iff it reproduces every decision).
            regenerated = regenerate(hydra, tokenizer, settings, prompt, claims, finish_reason, check_stop)
            if regenerated.reproduced:
                for p in positions:
                    if not p.consistent:
                        p.consistent, p.decision = True, f"{p.decision} (a rounding tie the generator's path decides)"
                ending_ok = True
                expected, output_mismatches, drift = derived(regenerated.events)
            elif regenerated.diverged_at is not None and regenerated.diverged_at < len(positions):
                p = positions[regenerated.diverged_at]
                p.consistent, p.decision = False, f"the generator's own path: {regenerated.detail}"
            else:
                ending_ok, ending = False, f"the generator's own path: {regenerated.detail}"
    mismatches += output_mismatches
    text = tokenizer.decode(emitted, skip_special_tokens=True)

    signature = None
    if data.get("signature") is not None or public_key is not None:
        from olmo_tap.verify.signing import check_signature

        signature = check_signature(data, public_key).to_dict()
    report = PoEAudit(
        honest=False,
        reason="",
        digest=content_digest(data),
        text=text,
        mode=mode,
        jury=mode == "poe",
        whole_jury=expected.whole_jury,
        independent_heads=independent,
        tolerance=tolerance,
        ending_consistent=ending_ok,
        ending=ending,
        positions=positions,
        field_mismatches=mismatches,
        near_ties=sum(p.consistent and p.margin <= tolerance and tolerance > 0 for p in positions),
        settings=settings,
        statistics=decide([p.consistent for p in positions], threshold, confidence),
        signature=signature,
        replayed_output=expected,
        regeneration=regenerated,
        signal_drift=drift,
        signal_tolerance=signal_tolerance,
    )
    report.honest, report.reason = _judge(report, finish_reason, public_key is not None)

    def audit_side(side: dict[str, Any]) -> PoEAudit:
        """A KLE sample or an attacked answer, audited as an answer of its own with this audit's model and rule."""
        return audit_poe(
            side, hydra, tokenizer=tokenizer, tolerance=asked_tolerance, check_stop=check_stop, dtype=dtype
        )

    if data.get("certainty") is not None:
        report.certainty = audit_certainty(data, hydra, tokenizer, audit_side)
        if report.honest and not report.certainty.honest:
            report.honest, report.reason = False, f"its certainty: {report.certainty.reason}"
    if data.get("robustness") is not None:
        report.robustness = audit_robustness(data, hydra, tokenizer, audit_side, expected.text, attack_bank)
        if report.honest and not report.robustness.honest:
            report.honest, report.reason = False, f"its robustness: {report.robustness.reason}"
    report.notes = _notes(report, data, temperature)
    if report.tolerance > 0:  # "honest" then means within the tolerance, not reproduced bit for bit: say why
        why = inexact or "a tolerance was asked for"
        report.notes.append(f"not an exact replay ({why}): decisions held to {report.tolerance:g} nats")
    return report


def _tokenizer_for(data: dict[str, Any]) -> Any:
    from olmo_tap.weights.tokenizer import load_tokenizer

    if data.get("model") is None:
        raise ValueError("auditing a transcript's text needs the model's tokenizer: pass tokenizer=...")
    return load_tokenizer(data["model"], progress=False)


# ----- the claim: settings and derived fields that need no replay -------------------------------------------


def _check_claim(
    data: dict[str, Any], settings: dict[str, Any], hydra: HydraTransformer, tokenizer: Any, model_vocab: int
) -> list[FieldMismatch]:
    mismatches = []
    for name in data:
        if name not in TOP_LEVEL_FIELDS:
            mismatches.append(FieldMismatch(name, data[name], "(no such field in a transcript)"))
    for name in settings:
        if name not in SETTING_NAMES:
            mismatches.append(FieldMismatch(f"settings.{name}", settings[name], "(not a setting olmo-tap records)"))
    digest = content_digest(data)
    if data.get("digest") is not None and data["digest"] != digest:
        mismatches.append(FieldMismatch("digest", data["digest"], digest))
    if settings.get("vocab_limit") is not None and settings["vocab_limit"] != model_vocab:
        mismatches.append(FieldMismatch("settings.vocab_limit", settings["vocab_limit"], model_vocab))
    stops = sorted(stop_token_ids(tokenizer, hydra.base_config.eos_token_id))
    if settings.get("stop_ids") is not None and sorted(settings["stop_ids"]) not in (stops, []):
        mismatches.append(FieldMismatch("settings.stop_ids", settings["stop_ids"], f"{stops} (or [] to run on)"))
    for name, actual in (("n_heads", hydra.n_heads), ("heads_depth", hydra.config.head_layers)):
        if settings.get(name) is not None and settings[name] != actual:
            mismatches.append(FieldMismatch(f"settings.{name}", settings[name], actual))
    question = settings.get("question")
    if settings.get("mcq") and question not in tokenizer.decode(data["prompt_ids"], skip_special_tokens=True):
        mismatches.append(FieldMismatch("settings.question", question, "(text of the prompt)"))
    return mismatches


def _claimed_path(
    output: dict[str, Any], emitted: list[int], mode: str, mismatches: list[FieldMismatch]
) -> list[tuple[int, int, bool]]:
    """(token, draft the jury judged, resampled) per position, as the transcript tells it."""
    parts = output.get("resampled_idxs", [])
    drafts = output.get("original_token_ids", [])
    resampled: dict[int, int] = {}
    well_formed = (
        isinstance(parts, list)
        and isinstance(drafts, list)
        and all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= len(emitted) for p in parts)
        and all(isinstance(d, int) and not isinstance(d, bool) for d in drafts)
        and (len(drafts) == len(parts) or (not drafts and mode != "poe"))
    )
    if not well_formed:
        mismatches.append(FieldMismatch("output.resampled_idxs", parts, "indices 1..n of output_parts, one per draft"))
    else:
        resampled = {p - 1: (drafts[i] if drafts else -1) for i, p in enumerate(parts)}
    return [(t, resampled.get(j, t), j in resampled) for j, t in enumerate(emitted)]


# ----- the replay ---------------------------------------------------------------------------------------------


def _gap(scores: torch.Tensor, token: int) -> float:
    """Nats by which ``token`` loses the argmax of ``scores`` (0 when it wins or ties; inf when impossible)."""
    if not 0 <= token < scores.size(-1):
        return math.inf
    value = float(scores[token])
    if value == -math.inf:
        return math.inf
    return max(0.0, float(scores.max()) - value)


def _top2_gap(scores: torch.Tensor) -> float:
    top = torch.topk(scores.float(), 2).values
    return float(top[0] - top[1]) if math.isfinite(float(top[1])) else math.inf


def _resample_moves(p: torch.Tensor, q: torch.Tensor, noise: torch.Tensor, needed: torch.Tensor) -> torch.Tensor:
    """Nats each token's jury probability must rise (and its draft probability fall by the same factor) for its
    Gumbel-max score over the residual ``max(0, p - q)`` to reach ``needed``: the smallest d >= 0 with
    ``p e^d - q e^-d >= exp(needed - noise)``, a quadratic in e^d, in float64."""
    p, q = p.double(), q.double()
    target = torch.exp((needed - noise).double().clamp(max=700.0))
    z = (target + torch.sqrt(target * target + 4 * p * q)) / (2 * p)
    return torch.log(z).clamp(min=0.0).nan_to_num(nan=math.inf, posinf=math.inf)


def _resample_slack_and_margin(
    p: torch.Tensor, q: torch.Tensor, noise: torch.Tensor, token: int
) -> tuple[float, float]:
    """(slack, margin) of a resample from the residual ``max(0, p - q)``, in nats of the inputs p and q rather
    than of the residual: where p is close to q the residual is a difference of near-equal numbers, so a tiny
    relative change of either (another dtype) moves its logarithm without bound, to -inf where it clamps to
    zero. Slack: how far ``token``'s p and q must move for it to win; margin: how far the nearest other token's
    must move to beat it. The residual's normalisation does not change the argmax and is left out."""
    scores = torch.log((p - q).clamp(min=0).double()) + noise.double()
    others = scores.clone()
    others[token] = -math.inf
    slack = float(_resample_moves(p[token : token + 1], q[token : token + 1], noise[token : token + 1], others.max()))
    if slack > 0 or not math.isfinite(float(scores[token])):
        return slack, 0.0
    moves = _resample_moves(p, q, noise, scores[token])
    moves[token] = math.inf
    return 0.0, float(moves.min())


class _Replay:
    """The replayed decoder, fed teacher-forced logits of every text head one block of positions at a time
    (``logits_for(start, stop)`` -> (n_text, stop - start, vocab)), so memory stays bounded on long sequences.
    Positions are visited in order; ``check_stop`` runs before each block (a service's deadline)."""

    def __init__(
        self,
        logits_for: Callable[[int, int], torch.Tensor],
        n_positions: int,
        settings: dict[str, Any],
        temperature: float,
        first: int,
        check_stop: Callable[[], None] | None = None,
        block: int | None = None,
    ) -> None:
        self.logits_for, self.n_positions, self.check_stop = logits_for, n_positions, check_stop
        self.block = block or LOGIT_BLOCK
        self.settings, self.temperature, self.first = settings, temperature, first
        self.seed = settings["seed"]
        self.mode = settings["mode"]
        self.tau = settings["veto_threshold"]
        n_text = settings["n_llm_heads"]
        if self.mode == "poe":
            self.decider = settings["draft_head"]
            self.voters = [h for h in range(n_text) if h != self.decider]
        else:
            self.decider = None if self.mode == "naive" else settings["draft_head"]
            self.voters = list(range(n_text)) if self.mode == "naive" else [self.decider]
        self.vote_margins: list[float] = []  # per position: a head's vote flips at a near-tie of its top two
        self.start = self.stop = 0
        self._load(0)
        self.first_voter_logits = self.voter_logits[:, 0].clone()  # who answered the first token (witness)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, settings: dict[str, Any], temperature: float, first: int) -> _Replay:
        return cls(lambda a, b: logits[:, a:b], logits.size(1), settings, temperature, first)

    def _load(self, j: int) -> int:
        """Make position j's block current; returns j's index in it."""
        if not self.start <= j < self.stop:
            if self.check_stop is not None:
                self.check_stop()
            self.start, self.stop = j, min(j + self.block, self.n_positions)
            logits = self.logits_for(self.start, self.stop)
            T, beta = self.temperature, float(self.settings.get("beta", 1.0))
            voter_logits = logits[self.voters]
            if self.mode == "poe":
                self.target, self.allowed = jury_distribution(voter_logits, T, beta, self.tau)
                self.log_target = jury_log_target(voter_logits, T, beta)
                self.draft_logits = logits[self.decider]
                self.q = torch.softmax(self.draft_logits / T, dim=-1) if T > 0 else None
                if self.tau is not None:
                    self.min_log_p = torch.log_softmax(voter_logits, dim=-1).min(dim=0).values
                    self.token_allowed = veto_mask(voter_logits, self.tau)
            else:
                self.combined = voter_logits.mean(dim=0)
                self.target = torch.softmax(self.combined / (T if T > 0 else 1.0), dim=-1)
                self.allowed = torch.ones(logits.size(1), dtype=torch.bool)
            self.signals = position_signals(voter_logits, self.target)
            # a replay through weights giving NaN would take every token 0 and agree with a forgery of zeros
            check_finite(self.signals, voter_logits, self.voters, self.first + self.start)
            self.voter_logits = voter_logits
            top2 = torch.topk(voter_logits, 2, dim=-1).values
            margins = (top2[..., 0] - top2[..., 1]).min(dim=0).values.tolist()
            self.vote_margins[self.start : self.start + len(margins)] = margins
        return j - self.start

    def roles(self) -> tuple[int | None, list[int]]:
        return self.decider, self.voters

    def position(self, j: int, token: int, draft: int, resampled: bool) -> tuple[PositionCheck, Any]:
        position = self.first + j
        check = PositionCheck(j, position, token, None, False, claimed_resampled=resampled)
        i = self._load(j)
        event = self.signals.event(j, position, i, token)
        if self.mode == "poe":
            self._poe(check, i, token, draft, resampled)
            check.claimed_draft_token_id = draft
            if resampled:
                event.resampled = True
                event.draft_token_id = draft
                event.validity_radius = validity_radius(self.signals.votes[i], draft) if draft >= 0 else 0
                event.suppression_score = float(self.target[i, draft]) if 0 <= draft < self.target.size(1) else 0.0
        else:
            scores = logit_scores(self.combined[i], self.temperature, self.seed, position, Purpose.SAMPLE)
            check.expected_token_id = int(argmax_last(scores))
            check.slack = math.inf if resampled else _gap(scores, token)  # a plain decoder never resamples
            check.margin, check.decision = _top2_gap(scores), "sample" if self.temperature > 0 else "argmax"
        return check, event

    def _veto_slack(self, j: int, token: int) -> float:
        if self.tau is None or self.tau == 0 or bool(self.token_allowed[j, token]):
            return 0.0
        return max(0.0, math.log(self.tau) - float(self.min_log_p[j, token]))

    def _veto_margin(self, j: int, token: int) -> float:
        if self.tau is None or self.tau == 0:
            return math.inf
        return abs(float(self.min_log_p[j, token]) - math.log(self.tau))

    def _log_p(self, j: int, forced: int) -> torch.Tensor:
        """log P at position j with ``forced`` counted as allowed (the claim needs it to be)."""
        log_target = self.log_target[j]
        if self.tau is not None:
            keep = self.token_allowed[j].clone()
            keep[forced] = True
            log_target = log_target.masked_fill(~keep, -math.inf)
        return torch.log_softmax(log_target, dim=-1)

    def _poe(self, check: PositionCheck, j: int, token: int, draft: int, resampled: bool) -> None:
        """The jury's decisions at index j of the current block (position ``check.position``)."""
        T, seed, position = self.temperature, self.seed, check.position
        draft_scores = logit_scores(self.draft_logits[j], T, seed, position, Purpose.SAMPLE)
        check.draft_token_id = int(argmax_last(draft_scores))
        check.jury_prob = float(self.target[j, token]) if bool(self.allowed[j]) else 0.0
        if not 0 <= draft < draft_scores.size(0) or (resampled and draft == token and T == 0):
            check.slack, check.decision = math.inf, "draft"  # no decoder makes this claim
            return
        if bool(self.allowed[j]):  # the replay's own decision, from its own draft
            q = self.q[j] if self.q is not None else None
            decision = speculative_decision(self.target[j], q, check.draft_token_id, T, seed, position)
            check.expected_token_id, check.expected_resampled = decision.token, not decision.accepted
        slacks = {"draft": _gap(draft_scores, draft), "veto": self._veto_slack(j, token)}
        margins = {"draft": _top2_gap(draft_scores), "veto": self._veto_margin(j, token)}
        log_p = self._log_p(j, token)
        if T == 0:
            slacks["argmax"] = _gap(log_p, token)
            margins["argmax"] = _top2_gap(log_p)
        else:
            log_uq = math.log(float(uniform(seed, position, Purpose.ACCEPT)[0]) or 1e-45) + math.log(
                max(float(self.q[j, draft]), 1e-45)
            )
            accept_by = float(log_p[draft]) - log_uq  # > 0: accepted
            slacks["accept"] = max(0.0, accept_by) if resampled else max(0.0, -accept_by)
            margins["accept"] = abs(accept_by)
            if resampled:
                p = log_p.exp()
                residual = (p - self.q[j]).clamp(min=0)
                mass = float(residual.sum())
                if mass > RESIDUAL_EPS and mass == mass:
                    noise = gumbel(seed, position, Purpose.RESAMPLE, p.size(-1)).to(p.device)
                    slacks["resample"], margins["resample"] = _resample_slack_and_margin(p, self.q[j], noise, token)
                else:  # the decoder samples from P itself when the residual vanishes
                    scores = prob_scores(p, seed, position, Purpose.RESAMPLE)
                    slacks["resample"], margins["resample"] = _gap(scores, token), _top2_gap(scores)
        # Reproduced: the same draft, the same outcome of the test, the same token. Otherwise the slack adds up
        # what each decision on the claimed path (the claimed draft, then its test) would need to flip.
        reproduced = (
            check.draft_token_id == draft and check.expected_token_id == token and check.expected_resampled == resampled
        )
        # (never 0 when not reproduced: a tie the slacks' float64 arithmetic calls even is still a different
        # decision in the decoder's own, which only the exact rule's regeneration may settle)
        check.slack = 0.0 if reproduced else max(sum(slacks.values()), math.ulp(0.0))
        off = [name for name, slack in slacks.items() if slack > 0]
        check.margin = min(margins.values())
        check.decision = ", ".join(off) if off and not reproduced else min(margins, key=margins.__getitem__)

    def abstain_slack(self, j: int) -> float:
        """Nats the most-allowed token at position j is above the veto (0: the jury abstains there)."""
        if self.mode != "poe" or self.tau is None:
            return math.inf
        j = self._load(j)
        return max(0.0, float(self.min_log_p[j].max()) - math.log(self.tau)) if bool(self.allowed[j]) else 0.0

    def count(self, output: PoEOutput, claims: list[tuple[int, int, bool]], finish_reason: str) -> None:
        """Rounds, drafts and acceptances as the decoder counts them, from the decided path."""
        abstained = finish_reason == "abstain"
        output.abstained, output.finish_reason = abstained, finish_reason
        if self.mode != "poe":
            output.n_rounds = len(claims)
            return
        gamma = self.settings.get("gamma") or 1
        max_new = self.settings.get("max_new_tokens") or len(claims) + 1
        decided = [resampled for _, _, resampled in claims] + ([False] if abstained else [])
        first_gamma = self.settings.get("first_gamma")  # absent from transcripts before it: gamma
        k = g = 0
        for emitted, resampled in enumerate(decided):
            if k == 0:
                output.n_rounds += 1
                g = min(round_gamma(gamma, first_gamma, output.n_rounds - 1), max_new - emitted)
            k = 0 if resampled or k + 1 >= g else k + 1
        output.n_drafted = len(decided)
        output.n_accepted = sum(not r for _, _, r in claims)


def _check_ending(
    output: dict[str, Any], emitted: list[int], settings: dict[str, Any], replay: _Replay, tolerance: float
) -> tuple[bool, str, str]:
    """(consistent, why, the finish reason the replay gives) for how and where the response ended."""
    stop_ids = set(settings.get("stop_ids") or [])
    max_new = settings.get("max_new_tokens")
    claimed = output.get("finish_reason")
    claims_abstention = claimed == "abstain" or output.get("abstained") is True
    if stop_ids & set(emitted[:-1]):
        return False, "the response continues past an end-of-text token", "eos"
    if emitted and emitted[-1] in stop_ids:
        return not claims_abstention, "ended with an end-of-text token", "eos"
    if max_new is not None and len(emitted) > max_new:
        return False, f"the response has {len(emitted)} tokens, more than max_new_tokens {max_new}", "length"
    if max_new is not None and len(emitted) == max_new:
        return not claims_abstention, "length limit reached", "length"
    if claims_abstention:
        slack = replay.abstain_slack(len(emitted))
        if slack <= tolerance:
            return True, "abstained: the jury allows no token at the next position", "abstain"
        return False, f"the response claims an abstention, but the jury allows a token there ({slack:.3g} nats)", ""
    if claimed == "time_limit":
        return True, "cut short by the service's time limit: the jury did not end this response", "time_limit"
    if max_new is None:
        return True, "no length limit recorded; ending not checked", claimed or "length"
    return False, f"the response stops after {len(emitted)} tokens without end-of-text, limit or abstention", ""


# ----- derived fields ----------------------------------------------------------------------------------------


def _p_correct(
    hydra: HydraTransformer,
    tokenizer: Any,
    settings: dict[str, Any],
    expected: PoEOutput,
    replay: _Replay,
    witness_states: torch.Tensor,
    mismatches: list[FieldMismatch],
) -> float | None:
    """The uncertainty head's p(correct), re-scored from the replay's witness state (None where PoE gives none)."""
    n_text = settings["n_llm_heads"]
    if hydra.n_heads <= n_text or not expected.token_ids:
        return None
    decoder = PoE(hydra, tokenizer, n_llm_heads=n_text, mode=settings["mode"])
    if settings["mode"] != "poe":
        witness = witness_states[replay.voters[0]]
    elif 1 not in expected.resampled_idxs:
        witness = witness_states[replay.decider]
    else:  # the verifier giving the emitted first token the highest logit answered it
        best = int(torch.argmax(replay.first_voter_logits[:, expected.token_ids[0]]))
        witness = witness_states[replay.voters[best]]
    return decoder.get_uncertainty_score(settings["question"], expected.text, witness)


def _close(claimed: Any, expected: Any, tolerance: float) -> bool:
    if isinstance(expected, float) and isinstance(claimed, int | float) and not isinstance(claimed, bool):
        return abs(claimed - expected) <= tolerance or claimed == expected
    return type(claimed) is type(expected) and claimed == expected


def _compare_output(
    claimed: dict[str, Any],
    expected: PoEOutput,
    signal_tolerance: float,
    vote_margins: list[float],
    tolerance: float,
    skip: tuple[str, ...] = (),
) -> tuple[list[FieldMismatch], float]:
    """Every derived field of the transcript's ``output`` against the replay's, by name and position; and the
    largest difference of a float signal held close (0 where every one is the replay's bits)."""
    mismatches = []
    drift = 0.0

    def close(claimed: Any, replayed: Any) -> bool:
        nonlocal drift
        if not _close(claimed, replayed, signal_tolerance):
            return False
        if isinstance(replayed, float) and claimed != replayed and math.isfinite(claimed) and math.isfinite(replayed):
            drift = max(drift, abs(claimed - replayed))
        return True

    wanted = {k: v for k, v in expected.to_dict().items() if k not in UNAUDITED_OUTPUT_FIELDS + skip}
    for name in claimed:
        if name not in wanted and name not in UNAUDITED_OUTPUT_FIELDS:
            mismatches.append(FieldMismatch(f"output.{name}", claimed[name], "(not a field olmo-tap writes)"))
    per_draft = [part - 1 for part in expected.resampled_idxs]  # lists parallel to resampled_idxs

    def near_tie(name: str, i: int) -> bool:
        """Across dtypes a head's vote may flip where its top two logits nearly tie: radii then differ honestly."""
        position = i if name == "stability_radii" else per_draft[i] if name == "validity_radii" else None
        return position is not None and tolerance > 0 and vote_margins[position] <= tolerance

    for name, value in wanted.items():
        if name not in claimed:
            mismatches.append(FieldMismatch(f"output.{name}", MISSING, value))
            continue
        got = claimed[name]
        if isinstance(value, list) and isinstance(got, list) and len(got) == len(value):
            for i, (g, v) in enumerate(zip(got, value, strict=True)):
                if not close(g, v) and not near_tie(name, i):
                    mismatches.append(FieldMismatch(f"output.{name}[{i}]", g, v))
                    break
        elif not close(got, value):
            mismatches.append(FieldMismatch(f"output.{name}", got, value))
    return mismatches, drift


# ----- the verdict -------------------------------------------------------------------------------------------


def _judge(report: PoEAudit, finish_reason: str, key_given: bool) -> tuple[bool, str]:
    bad = [p for p in report.positions if not p.consistent]
    reasons = []
    if bad:
        listed = "; ".join(
            f"token {p.index} (id {p.token_id}): {p.decision} off by {p.slack:.3g} nats" for p in bad[:5]
        )
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        reasons.append(f"{len(bad)} of {len(report.positions)} decisions not reproduced ({listed}{more})")
    if not report.ending_consistent:
        reasons.append(f"ending: {report.ending}")
    if report.field_mismatches:
        shown = "; ".join(str(m) for m in report.field_mismatches[:3])
        more = f" and {len(report.field_mismatches) - 3} more" if len(report.field_mismatches) > 3 else ""
        reasons.append(f"{len(report.field_mismatches)} field(s) differ from the replay ({shown}{more})")
    signature = report.signature
    # a broken signature is a failed claim; so is any signature but the trusted key's when one was given
    if signature is not None and (
        (signature["present"] and not signature["valid"]) or (key_given and not signature["trusted"])
    ):
        reasons.append(f"signature: {signature['reason']}")
    if finish_reason == "time_limit" and not (signature and signature.get("valid") and signature.get("trusted")):
        reasons.append(
            "truncated: it claims a cut by a service's time limit, which only that server's signature, checked "
            "against its public key, can vouch for"
        )
    if reasons:
        return False, "; ".join(reasons)
    exact = "exactly" if report.exact else f"within {report.tolerance:g} nats"
    what = "the jury" if report.jury else f"the {report.mode} decoder"
    fields = "every field matches"
    if report.signal_drift > 0:  # not the replay's bits, but within the tolerance: say how far off, not "matches"
        fields = (
            f"every field matches (float signals within {report.signal_drift:.2g} of the replay's; "
            f"tolerance {report.signal_tolerance:g})"
        )
    return True, f"all {len(report.positions)} decisions of {what} reproduced {exact}; {fields}"


def _notes(report: PoEAudit, data: dict[str, Any], temperature: float) -> list[str]:
    notes = []
    if not report.jury:
        notes.append(f"mode {report.mode}: this response was not decided by the jury; nothing here certifies it")
    elif not report.whole_jury:
        notes.append("PoE over a subset of the model's text heads: not the whole jury, nothing here certifies it")
    if not report.independent_heads:
        notes.append("the text heads have identical weights: a jury of clones is one head, it certifies nothing")
    if temperature == 0:
        notes.append("greedy: the seed does not change the response, and beta only scales the jury's scores")
    if report.regeneration is not None:
        regeneration = report.regeneration
        if regeneration.reproduced:
            notes.append(f"the block replay disagreed at a rounding tie; {regeneration.detail}")
        else:
            notes.append(f"the generator, run again on the claim: {regeneration.detail}")
    if report.near_ties:
        notes.append(f"{report.near_ties} consistent position(s) were near-ties (within the tolerance)")
    if data.get("version") == 1:
        notes.append("version 1 transcript: no stored digest to compare")
    return notes
