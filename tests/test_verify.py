"""Verification: token-difr's metrics on hand-checkable logits, exact replays, detection, the PoE audit."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import LetterTokenizer, tiny_hydra

from olmo_tap.inference.poe import PoE
from olmo_tap.verify import (
    DEFAULT_MARGIN_TOLERANCE,
    NotReproduced,
    SamplingMethod,
    TokenMetrics,
    TokenSequence,
    audit,
    calibrate,
    compute_metrics_summary,
    exact_verdict,
    judge,
    read_token_sequences,
    verdict_rule,
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


# ----- the exact rule: a replay in the generator's own sampler and dtype must reproduce every token -----------

EDITED = 2  # the sequence whose last token the tests below substitute (no later token sees the edit)


@pytest.fixture(scope="module")
def own(jury):
    """The jury's honest outputs (6 x 48 tokens), and every candidate's metrics at sequence EDITED's last token."""
    model, tokenizer = jury
    seqs = sequences(generate(model, tokenizer))
    last = seqs[EDITED]
    tries = [TokenSequence(last.prompt_token_ids, [*last.output_token_ids[:-1], t]) for t in range(VOCAB)]
    return seqs, {t: metrics[-1] for t, metrics in enumerate(verify(tries, model, tokenizer))}


def with_last(seqs, token):
    """``seqs`` with sequence EDITED's last output token replaced by ``token``."""
    edited = list(seqs)
    last = seqs[EDITED]
    edited[EDITED] = TokenSequence(last.prompt_token_ids, [*last.output_token_ids[:-1], token], last.seed)
    return edited


def misses_by_margin(candidates):
    """The candidates the replay does not sample, from the narrowest miss (the runner-up) to the widest."""
    return sorted((t for t, m in candidates.items() if not m.exact_match), key=lambda t: candidates[t].margin)


def test_exact_verdict_lists_every_token_not_reproduced():
    hit, tie = TokenMetrics(True, 1.0, 0.0, 0, 0), TokenMetrics(False, 0.4, 0.05, 1, 1)
    wide = TokenMetrics(False, 0.01, 4.3125, 3, 3)
    filtered = TokenMetrics(False, 0.0, math.inf, 9, math.inf)
    results = [[hit, wide, hit], [tie, filtered]]
    outputs = [TokenSequence([1], [4, 5, 6]), TokenSequence([1], [7, 8])]
    verdict = exact_verdict(results, outputs=outputs)
    assert (verdict.rule, verdict.honest, verdict.label) == ("exact", False, "NOT honest")
    assert verdict.not_reproduced == [
        NotReproduced(0, 1, 4.3125, 5),
        NotReproduced(1, 0, 0.05, 7),
        NotReproduced(1, 1, math.inf, 8),
    ]
    assert verdict.reason.startswith("3 of 5 tokens not reproduced (sequence 0 token 1: claimed 5, margin 4.31; ")
    # the near-tie is explained by a tolerance, the wide and the filtered misses are not
    tolerant = exact_verdict(results, margin_tolerance=0.1)
    assert [(m.sequence, m.index, m.claimed) for m in tolerant.not_reproduced] == [(0, 1, None), (1, 1, None)]
    assert (tolerant.n_near_ties, tolerant.n_agreeing, tolerant.agreement_rate) == (1, 3, 0.6)
    assert tolerant.reason.endswith("; 1 near-tie within the margin tolerance 0.1")
    data = json.loads(json.dumps(tolerant.to_dict(), allow_nan=False))  # JSON-safe: inf is written "inf"
    assert data["rule"] == "exact" and data["not_reproduced"][1] == {
        "sequence": 1,
        "index": 1,
        "margin": "inf",
        "claimed": None,
    }
    assert (data["ci_low"], data["confidence"], data["threshold"]) == (None, None, 1.0)
    # the reason names five, the verdict lists all
    many = exact_verdict([[wide] * 8])
    assert len(many.not_reproduced) == 8 and many.reason.endswith("sequence 0 token 4: margin 4.31; and 3 more)")
    assert exact_verdict([[hit, hit], []]).reason == "all 2 tokens reproduced exactly"
    assert (
        exact_verdict([[hit, tie]], 0.1).reason
        == "all 2 tokens reproduced: 1 exactly, 1 near-tie within the margin tolerance 0.1"
    )
    assert exact_verdict([[], []]).honest is None
    # the statistical verdict keeps its keys and meaning, and says which rule and tolerance it used
    statistical = audit(results).to_dict()
    assert statistical["rule"] == "statistical" and statistical["not_reproduced"] is None
    assert statistical["margin_tolerance"] == DEFAULT_MARGIN_TOLERANCE and statistical["confidence"] == 0.99
    with pytest.raises(ValueError, match="margin_tolerance"):
        exact_verdict(results, margin_tolerance=-1.0)
    with pytest.raises(ValueError, match="do not match"):
        exact_verdict(results, outputs=outputs[:1])


def test_the_rule_defaults_by_sampler_and_refuses_statistical_knobs_with_the_exact_rule():
    assert verdict_rule(None, "olmo_tap") == "exact"
    assert verdict_rule(None, SamplingMethod.VLLM_GUMBEL_MAX) == "statistical"
    assert verdict_rule("statistical", "olmo_tap", threshold=0.9) == "statistical"
    assert verdict_rule("exact", "vllm_gumbel_max") == "exact"
    with pytest.raises(ValueError, match="threshold applies to the statistical rule only"):
        verdict_rule(None, "olmo_tap", threshold=0.9)
    with pytest.raises(ValueError, match="threshold and confidence apply"):
        judge([[]], "exact", threshold=0.9, confidence=0.9)
    with pytest.raises(ValueError, match="unknown verdict rule"):
        verdict_rule("lenient", "olmo_tap")


def test_exact_rule_names_a_substituted_token_the_statistical_rule_lets_pass(jury, own):
    model, tokenizer = jury
    seqs, candidates = own
    honest = exact_verdict(verify(seqs, model, tokenizer), outputs=seqs)
    n = len(PROMPTS) * N_TOKENS
    assert (honest.honest, honest.not_reproduced, honest.n_near_ties) == (True, [], 0)
    assert honest.reason == f"all {n} tokens reproduced exactly"
    wrong = misses_by_margin(candidates)[-1]  # the candidate that loses by most
    assert candidates[wrong].margin > DEFAULT_MARGIN_TOLERANCE
    forged = with_last(seqs, wrong)
    results = verify(forged, model, tokenizer)
    # one token in 288 (agreement 99.7%): token-difr's pooled test calls the outputs honest ...
    statistical = audit(results)
    assert statistical.honest is True and statistical.n_agreeing == n - 1
    # ... the exact rule names it
    verdict = exact_verdict(results, outputs=forged)
    assert verdict.honest is False and verdict.n_agreeing == n - 1
    assert [(m.sequence, m.index, m.claimed) for m in verdict.not_reproduced] == [(EDITED, N_TOKENS - 1, wrong)]
    assert verdict.not_reproduced[0].margin == pytest.approx(candidates[wrong].margin)
    assert verdict.reason.startswith(
        f"1 of {n} tokens not reproduced (sequence {EDITED} token {N_TOKENS - 1}: claimed {wrong}, margin "
    )


def test_a_near_tie_is_explained_by_a_tolerance_above_its_margin(jury, own):
    model, tokenizer = jury
    seqs, candidates = own
    runner_up = misses_by_margin(candidates)[0]
    results = verify(with_last(seqs, runner_up), model, tokenizer)
    margin = results[EDITED][-1].margin
    assert not results[EDITED][-1].exact_match and margin == pytest.approx(candidates[runner_up].margin) and margin > 0
    above = exact_verdict(results, margin_tolerance=margin * 1.001)
    assert above.honest is True and above.not_reproduced == [] and above.n_near_ties == 1
    assert "1 near-tie within the margin tolerance" in above.reason
    below = exact_verdict(results, margin_tolerance=margin * 0.999)
    assert below.honest is False and below.n_near_ties == 0
    assert [(m.sequence, m.index) for m in below.not_reproduced] == [(EDITED, N_TOKENS - 1)]


def test_cli_verify_defaults_to_the_exact_rule_for_olmo_taps_sampler(jury, own, tmp_path, monkeypatch, capsys):
    from olmo_tap.cli import main
    from olmo_tap.verify import outputs as outputs_module

    model, tokenizer = jury
    seqs, candidates = own
    real = outputs_module.verify_outputs
    # the CLI loads --model by name; hand it the tiny jury instead (cmd_verify imports verify_outputs per call)
    monkeypatch.setattr(
        outputs_module, "verify_outputs", lambda outputs, _model, **kw: real(outputs, model, tokenizer=tokenizer, **kw)
    )
    path = tmp_path / "outputs.jsonl"
    args = ["verify", str(path), "--temperature", "1.0", "--seed", "1", "--sampling-method", "olmo_tap", "--head", "0"]

    def run(records, *extra):
        path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
        capsys.readouterr()
        code = main([*args, *extra])
        return code, capsys.readouterr().out

    code, out = run(seqs, "--json")
    verdict = json.loads(out)["verdict"]
    assert code == 0 and verdict["rule"] == "exact" and verdict["not_reproduced"] == []
    assert verdict["margin_tolerance"] == 0.0
    wrong = misses_by_margin(candidates)[-1]
    forged = with_last(seqs, wrong)
    code, out = run(forged, "--json")
    verdict = json.loads(out)["verdict"]
    assert code == 1 and verdict["honest"] is False
    assert [(m["sequence"], m["index"], m["claimed"]) for m in verdict["not_reproduced"]] == [
        (EDITED, N_TOKENS - 1, wrong)
    ]
    code, out = run(forged)
    assert code == 1 and f"sequence {EDITED} token {N_TOKENS - 1}: claimed {wrong}, margin " in out
    assert "verdict: NOT honest (exact rule)" in out
    # the statistical rule: the old behaviour, one token in 288 passes
    code, out = run(forged, "--json", "--rule", "statistical")
    verdict = json.loads(out)["verdict"]
    assert code == 0 and verdict["rule"] == "statistical" and verdict["not_reproduced"] is None
    assert verdict["threshold"] == 0.99 and verdict["margin_tolerance"] == DEFAULT_MARGIN_TOLERANCE
    # a statistical knob with the exact rule is bad input
    assert run(forged, "--threshold", "0.9")[0] == 2


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


# ----- the embedded default, through the CLI ------------------------------------------------------------------


@pytest.mark.slow
def test_cli_generate_and_verify_on_the_embedded_default(smollm, tmp_path, capsys):
    from olmo_tap.cli import main

    tokens = tmp_path / "outputs.jsonl"
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
    # olmo-tap's sampler replayed in its own dtype: the exact rule by default, with nothing to report
    assert report["verdict"]["rule"] == "exact" and report["verdict"]["not_reproduced"] == []
    # the same outputs claimed at another temperature fail, with exit code 1
    assert main([*verify_args[:3], "0.3", *verify_args[4:]]) == 1
