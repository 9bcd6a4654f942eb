"""Verification: token-difr's metrics on hand-checkable logits, exact replays, detection, the PoE audit."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import LetterTokenizer, tiny_hydra

from olmo_tap.inference.poe import PoE
from olmo_tap.inference.transcript import transcript_dict
from olmo_tap.verify import (
    SamplingMethod,
    TokenMetrics,
    TokenSequence,
    audit,
    audit_poe,
    calibrate,
    compute_metrics_summary,
    read_token_sequences,
    verify_outputs,
    wilson_interval,
)
from olmo_tap.verify.scoring import score_tokens, vllm_exponentials

VOCAB = 20
PROMPTS = ["abc", "hello", "bad", "fig", "jade", "ice"]
N_TOKENS = 48


@pytest.fixture(scope="module")
def jury():
    """A tiny Hydra whose 4 heads really differ, and its letter tokenizer."""
    return tiny_hydra(vocab=VOCAB, n_heads=4, scale=1.0), LetterTokenizer(VOCAB)


def generate(model, tokenizer, *, mode="single", temperature=1.0, seed=1, **kwargs):
    decoder = PoE(model, tokenizer, max_new_tokens=N_TOKENS, seed=seed, mode=mode, draft_head=0, **kwargs)
    return [decoder.generate_with_cache(p, temperature=temperature) for p in PROMPTS]


def sequences(outputs, seed=None):
    return [TokenSequence(o.prompt_ids, o.token_ids, seed) for o in outputs]


def verify(seqs, model, tokenizer, **kwargs):
    options = dict(temperature=1.0, top_k=0, top_p=1.0, seed=1, sampling_method="olmo_tap", head=0, verbose=False)
    options.update(kwargs)
    return verify_outputs(seqs, model, tokenizer=tokenizer, **options)


# ----- token-difr's definitions on logits checked by hand ---------------------------------------------------


def test_vllm_metrics_match_hand_computed_values():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    noise = torch.tensor([[1.0, 0.25, 4.0, 1.0]])  # exponentials E; G = -log E = [0, log 4, -log 4, 0]
    probs = torch.softmax(logits[0], dim=0)
    # probs / E = [p0, 4 p1, p2 / 4, p3]; 4 p1 = 4 e / Z > p0 = e^2 / Z, so vLLM samples token 1.
    for claimed, exact in ((1, True), (0, False)):
        (m,) = score_tokens(
            logits, torch.tensor([claimed]), temperature=1.0, top_k=0, top_p=1.0,
            method=SamplingMethod.VLLM_GUMBEL_MAX, noise=noise,
        )  # fmt: skip
        assert m.exact_match is exact
        assert m.prob == pytest.approx(float(probs[claimed]), rel=1e-6)
        assert m.logit_rank == claimed  # logits are sorted descending
        perturbed = [2.0 + 0.0, 1.0 + math.log(4), 0.0 - math.log(4), -1.0]
        assert m.margin == pytest.approx(max(perturbed) - perturbed[claimed], abs=1e-6)
        assert m.gumbel_rank == (0 if exact else 1)  # only token 1's score beats token 0's


def test_filtered_claim_has_infinite_margin_and_rank():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    noise = torch.ones(1, 4)
    (m,) = score_tokens(
        logits, torch.tensor([3]), temperature=0.5, top_k=2, top_p=1.0,
        method=SamplingMethod.VLLM_GUMBEL_MAX, noise=noise,
    )  # fmt: skip
    assert not m.exact_match and m.prob == 0.0
    assert math.isinf(m.margin) and math.isinf(m.gumbel_rank)
    assert m.logit_rank == 3
    # top-p: the nucleus of 0.5 is token 0 alone (p0 = 0.64), so token 1 is filtered too.
    (m,) = score_tokens(
        logits, torch.tensor([1]), temperature=1.0, top_k=0, top_p=0.5,
        method=SamplingMethod.VLLM_GUMBEL_MAX, noise=noise,
    )  # fmt: skip
    assert math.isinf(m.margin) and m.prob == 0.0


def test_greedy_metrics():
    logits = torch.tensor([[0.5, 3.0, 1.0]])
    (hit,) = score_tokens(
        logits, torch.tensor([1]), temperature=0, top_k=0, top_p=1.0, method=SamplingMethod.OLMO_TAP, noise=None
    )
    (miss,) = score_tokens(
        logits, torch.tensor([2]), temperature=0, top_k=0, top_p=1.0, method=SamplingMethod.OLMO_TAP, noise=None
    )
    assert (hit.exact_match, hit.prob, hit.margin, hit.logit_rank) == (True, 1.0, 0.0, 0.0)
    assert (miss.exact_match, miss.prob, miss.margin, miss.logit_rank) == (False, 0.0, 2.0, 1.0)


def test_vllm_noise_is_one_generator_seeded_once_row_by_row():
    generator = torch.Generator().manual_seed(7)
    expected = [torch.empty(11).exponential_(generator=generator) for _ in range(3)]
    assert torch.equal(vllm_exponentials(3, 11, 7, "cpu"), torch.stack(expected))


def test_summary_averages_finite_margins_and_handles_no_tokens():
    results = [
        [TokenMetrics(True, 0.5, 0.0, 0, 0), TokenMetrics(False, 0.0, math.inf, 3, math.inf)],
        [TokenMetrics(False, 0.25, 2.0, 1, 2)],
    ]
    summary = compute_metrics_summary(results)
    assert summary["total_tokens"] == 3
    assert summary["exact_match_rate"] == pytest.approx(1 / 3)
    assert summary["avg_prob"] == pytest.approx(0.25)
    assert summary["avg_margin"] == pytest.approx(1.0)
    assert summary["avg_logit_rank"] == pytest.approx(4 / 3)
    assert summary["avg_gumbel_rank"] == pytest.approx(1.0)
    assert summary["infinite_margin_rate"] == pytest.approx(1 / 3)
    empty = compute_metrics_summary([[], []])
    assert empty["total_tokens"] == 0 and empty["exact_match_rate"] is None
    assert audit([[]]).honest is None


def test_wilson_interval_and_calibration():
    low, high = wilson_interval(95, 100, 0.95)
    # reference values of the Wilson score interval for 95/100 at 95%
    assert low == pytest.approx(0.8883, abs=1e-4) and high == pytest.approx(0.9785, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    near_tie = TokenMetrics(False, 0.3, 0.01, 1, 1)
    honest = [[TokenMetrics(True, 1.0, 0.0, 0, 0)] * 98 + [near_tie, TokenMetrics(False, 0.2, 0.04, 1, 1)]]
    calibration = calibrate(honest, confidence=0.95, slack=2.0)
    assert calibration.margin_tolerance == pytest.approx(0.08)
    assert calibration.threshold == pytest.approx(wilson_interval(100, 100, 0.95)[0])
    assert calibration.honest_exact_match_rate == pytest.approx(0.98)
    # a miss by a wide margin is evidence; a near-tie within the tolerance is not
    wide = [[TokenMetrics(True, 1.0, 0.0, 0, 0)] * 40 + [TokenMetrics(False, 0.1, 3.0, 2, 2)] * 10]
    assert audit(wide, threshold=0.95, margin_tolerance=0.1).honest is False
    ties = [[TokenMetrics(True, 1.0, 0.0, 0, 0)] * 40 + [near_tie] * 10]
    assert audit(ties, threshold=0.95, margin_tolerance=0.1).honest is True


# ----- exact replays and detection ----------------------------------------------------------------------------


def test_own_sampled_outputs_verify_exactly(jury):
    model, tokenizer = jury
    results = verify(sequences(generate(model, tokenizer)), model, tokenizer)
    summary = compute_metrics_summary(results)
    assert summary["total_tokens"] == len(PROMPTS) * N_TOKENS
    assert summary["exact_match_rate"] == 1.0 and summary["avg_margin"] == 0.0
    assert audit(results).honest is True


def test_own_greedy_and_filtered_outputs_verify_exactly(jury):
    model, tokenizer = jury
    greedy = sequences(generate(model, tokenizer, temperature=0))
    assert compute_metrics_summary(verify(greedy, model, tokenizer, temperature=0))["exact_match_rate"] == 1.0


def test_per_sequence_seed_wins(jury):
    model, tokenizer = jury
    outputs = generate(model, tokenizer, seed=5)
    results = verify(sequences(outputs, seed=5), model, tokenizer, seed=999)
    assert compute_metrics_summary(results)["exact_match_rate"] == 1.0


@pytest.mark.parametrize(
    "substitution",
    ["temperature 0.6", "temperature 1.6", "other seed", "other weights", "fewer layers"],
)
def test_substitutions_are_flagged(jury, substitution):
    model, tokenizer = jury
    # the workflow the verdict expects: calibrate on honest replays (here: other prompts' seeds), then test
    calibration = calibrate(verify(sequences(generate(model, tokenizer, seed=7)), model, tokenizer, seed=7))
    if substitution.startswith("temperature"):
        outputs = generate(model, tokenizer, temperature=float(substitution.split()[1]))
    elif substitution == "other seed":
        outputs = generate(model, tokenizer, seed=2)
    elif substitution == "other weights":
        outputs = generate(tiny_hydra(vocab=VOCAB, n_heads=4, scale=1.0, seed=11), tokenizer)
    else:  # same weights with the last layer dropped: a 1-layer model claiming to be the 2-layer one
        smaller = tiny_hydra(vocab=VOCAB, n_heads=4, scale=1.0)
        smaller.heads[0].reset_parameters(std=0.0)  # zero residual updates: the head layer does nothing
        outputs = generate(smaller, tokenizer)
    verdict = audit(
        verify(sequences(outputs), model, tokenizer), calibration.threshold, 0.99, calibration.margin_tolerance
    )
    assert verdict.honest is False, verdict.reason


# ----- the PoE audit -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, beta=0.5, gamma=3),
        dict(temperature=0),
        dict(temperature=1.0, veto_threshold=0.005),
    ],
)
def test_honest_poe_transcripts_pass(jury, settings):
    model, tokenizer = jury
    temperature = settings.pop("temperature")
    for output in generate(model, tokenizer, mode="poe", temperature=temperature, **settings):
        report = audit_poe(transcript_dict(output), model)
        assert report.honest is True, (report.verdict.reason, report.ending)
        assert report.verdict.agreement_rate == 1.0


def test_abstaining_transcript_passes_and_a_fake_abstention_fails(jury):
    model, tokenizer = jury
    outputs = generate(model, tokenizer, mode="poe", temperature=1.0, veto_threshold=0.2)
    abstained = [o for o in outputs if o.abstained]
    assert abstained, "a high veto threshold should make the jury abstain on some prompts"
    for output in abstained:
        assert audit_poe(transcript_dict(output), model).honest is True
    fake = transcript_dict(next(o for o in generate(model, tokenizer, mode="poe") if not o.abstained))
    fake["token_ids"] = fake["token_ids"][:10]
    fake["output"] = dict(fake["output"], abstained=True, finish_reason="abstain")
    report = audit_poe(fake, model)
    assert report.honest is False and not report.ending_consistent


@pytest.mark.parametrize("made_by", ["single", "naive", "poe other seed", "poe other beta", "poe without veto"])
def test_responses_not_made_by_the_claimed_jury_fail(jury, made_by):
    model, tokenizer = jury
    claimed = dict(mode="poe", seed=1, beta=1.0, veto_threshold=0.01, draft_head=0)
    kwargs = dict(mode="poe", veto_threshold=0.01, seed=1, beta=1.0)
    if made_by in ("single", "naive"):
        kwargs = dict(mode=made_by)
    elif made_by == "poe other seed":
        kwargs["seed"] = 2
    elif made_by == "poe other beta":
        kwargs["beta"] = 3.0
    else:
        kwargs["veto_threshold"] = None
    # An immediate abstention (no token) depends on the prompt and the veto only: nothing to forge there.
    outputs = [o for o in generate(model, tokenizer, temperature=1.0, **kwargs) if o.token_ids]
    assert len(outputs) >= len(PROMPTS) - 1
    for output in outputs:
        transcript = transcript_dict(output)
        transcript["settings"] = dict(transcript["settings"], **claimed)
        transcript["output"] = dict(transcript["output"], resampled_idxs=[])  # a forger need not tell
        assert audit_poe(transcript, model).honest is False


def test_a_changed_token_is_found(jury):
    model, tokenizer = jury
    transcript = transcript_dict(generate(model, tokenizer, mode="poe", temperature=0)[0])
    report = audit_poe(transcript, model)
    j = 5
    wrong = (transcript["token_ids"][j] + 1) % VOCAB
    transcript["token_ids"][j] = wrong
    report = audit_poe(transcript, model)
    assert j in report.inconsistent_positions


# ----- bad input ---------------------------------------------------------------------------------------------


def test_bad_input_is_reported(jury, tmp_path):
    model, tokenizer = jury
    good = TokenSequence([1, 2, 3], [4, 5])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        verify([TokenSequence([1, 2], [VOCAB + 7])], model, tokenizer)
    with pytest.raises(ValueError, match="temperature"):
        verify([good], model, tokenizer, temperature=-1.0)
    for top_p in (0.0, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            verify([good], model, tokenizer, top_p=top_p)
    with pytest.raises(ValueError, match="max_model_len"):
        verify([good], model, tokenizer, max_model_len=4)
    with pytest.raises(ValueError, match="seed"):
        verify([good], model, tokenizer, seed=None)
    with pytest.raises(ValueError, match="sampling method"):
        verify([good], model, tokenizer, sampling_method="beam")
    assert verify([TokenSequence([1, 2], [])], model, tokenizer) == [[]]
    path = tmp_path / "outputs.jsonl"
    path.write_text(json.dumps(good.to_dict()) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"outputs.jsonl:3: not valid JSON"):
        read_token_sequences(path)
    path.write_text(json.dumps({"prompt_token_ids": [1], "output_token_ids": ["a"]}) + "\n")
    with pytest.raises(ValueError, match=r":1: field 'output_token_ids' must be a list of integer"):
        read_token_sequences(path)


def test_bad_transcripts_are_reported(jury):
    model, tokenizer = jury
    transcript = transcript_dict(generate(model, tokenizer, mode="poe")[0])
    with pytest.raises(ValueError, match="not an olmo-tap transcript"):
        audit_poe({"format": "something else"}, model)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        audit_poe(dict(transcript, settings=dict(transcript["settings"], vocab_limit=VOCAB + 50)), model)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        audit_poe(dict(transcript, token_ids=[*transcript["token_ids"][:3], VOCAB + 1]), model)
    with pytest.raises(ValueError, match="text heads"):
        audit_poe(dict(transcript, settings=dict(transcript["settings"], n_llm_heads=9)), model)


# ----- the embedded default, through the CLI ------------------------------------------------------------------


@pytest.mark.slow
def test_cli_generate_verify_and_audit_on_the_embedded_default(smollm, tmp_path, capsys):
    from olmo_tap.cli import main

    tokens, transcript = tmp_path / "outputs.jsonl", tmp_path / "transcript.json"
    common = ["--max-new-tokens", "24", "--temperature", "0.8", "--no-color"]
    for prompt, seed in (("Name three colours.", 3), ("What is 2 + 2?", 4)):
        args = ["generate", prompt, "--mode", "single", "--seed", str(seed), "--save-tokens", str(tokens), *common]
        assert main(args) == 0
    assert len(read_token_sequences(tokens)) == 2
    verify_args = ["verify", str(tokens), "--temperature", "0.8", "--sampling-method", "olmo_tap", "--json"]
    capsys.readouterr()
    assert main(verify_args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["exact_match_rate"] == 1.0 and report["verdict"]["honest"] is True
    # the same outputs claimed at another temperature fail, with exit code 1
    assert main([*verify_args[:3], "0.3", *verify_args[4:]]) == 1

    assert main(["generate", "Name a fruit.", "--seed", "9", "--save", str(transcript), *common]) == 0
    assert main(["audit", str(transcript)]) == 0
    assert "verdict: honest" in capsys.readouterr().out
    forged = json.loads(transcript.read_text())
    forged["settings"]["seed"] = 10
    transcript.write_text(json.dumps(forged))
    assert main(["audit", str(transcript)]) == 1
    transcript.write_text("{broken")
    assert main(["audit", str(transcript)]) == 2
