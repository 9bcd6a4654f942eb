"""PoE speculative verification: exact sampling, greedy equality, gamma-independence, the veto guarantee.

Statistical tests use fixed seeds and reject at alpha = 1e-4; each is paired with a deliberately
broken rule that the same test must reject, so the test is known to have power.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from olmo_tap.inference import jury, poe
from olmo_tap.inference.jury import Decision, jury_distribution, speculative_decision
from olmo_tap.inference.poe import PoE, PoEOutput
from olmo_tap.inference.sampling import Purpose, sample_from_probs, uniform
from tests.tiny import LetterTokenizer, plant_malicious, tiny_hydra

ALPHA = 1e-4


def reference_target(model, ids, verifiers, temperature=1.0, beta=1.0, tau=None) -> torch.Tensor:
    """P computed independently of olmo_tap's jury code: a product of probabilities, in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), head_indices=verifiers)[:, 0, -1].double()
    t = temperature if temperature > 0 else 1.0
    target = torch.prod(torch.softmax(logits / t, dim=-1) ** beta, dim=0)
    if tau is not None:
        target = target * (torch.softmax(logits, dim=-1) >= tau).all(dim=0)
    return target / target.sum()


def chi2_pvalue(counts: Counter, probs: dict, n: int) -> float:
    keys = sorted(probs)
    observed = np.array([counts.get(k, 0) for k in keys], dtype=float)
    expected = np.array([probs[k] for k in keys], dtype=float)
    expected = expected / expected.sum() * n
    assert sum(counts.values()) == n and set(counts) <= set(keys), "a token outside the support was emitted"
    return float(chisquare(observed, expected).pvalue)


def broken_resample_from_p(target, draft_probs, draft_token, temperature, seed, position) -> Decision:
    """A classic mistake: after a rejection, draw from P instead of norm(max(0, P - q))."""
    p, q = float(target[draft_token]), float(draft_probs[draft_token])
    if float(uniform(seed, position, Purpose.ACCEPT)[0]) * q < p:
        return Decision(draft_token, True)
    return Decision(sample_from_probs(target, seed, position, Purpose.RESAMPLE), False)


# ----- the decision rule ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", range(3))
def test_speculative_decision_is_distributed_as_p(case):
    generator = torch.Generator().manual_seed(100 + case)
    vocab, draws, temperature = 8, 30_000, 0.8
    draft_logits = torch.randn(vocab, generator=generator) * 1.5
    target = torch.softmax(torch.randn(vocab, generator=generator) * 1.5, dim=-1)
    q = torch.softmax(draft_logits / temperature, dim=-1)
    expected = {i: float(target[i]) for i in range(vocab)}

    def emitted(rule, q_used):
        counts = Counter()
        for seed in range(draws):
            # the draft is drawn exactly as the decoder draws it: Gumbel-max on logits / T
            draft = poe.sample_from_logits(draft_logits, temperature, seed, 7, Purpose.SAMPLE)
            counts[rule(target, q_used, draft, temperature, seed, 7).token] += 1
        return counts

    assert chi2_pvalue(emitted(speculative_decision, q), expected, draws) > ALPHA
    # power: the same test rejects a wrong residual, and acceptance against the wrong q
    assert chi2_pvalue(emitted(broken_resample_from_p, q), expected, draws) < ALPHA
    q_untempered = torch.softmax(draft_logits, dim=-1)
    assert chi2_pvalue(emitted(speculative_decision, q_untempered), expected, draws) < ALPHA


def test_residual_fallback_samples_from_p_never_the_draft():
    target = torch.tensor([0.0, 0.5, 0.5, 0.0])
    same = target.clone()  # q == P: the residual is empty
    tokens = {speculative_decision(target, same, 3, 1.0, s, 0).token for s in range(300)}
    assert tokens <= {1, 2}


# ----- the decoder end to end -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return tiny_hydra(vocab=5, n_heads=4, heads_depth=2, seed=4, lm_std=0.1), LetterTokenizer(5)


def test_decoder_uses_the_right_p_and_q(tiny, monkeypatch):
    """Deterministic half of exactness: every decision gets P of the verifiers on the emitted prefix
    and the q the draft was sampled from (checked against an independent reference)."""
    model, tok = tiny
    seen = []

    def spy(target, draft_probs, draft_token, temperature, seed, position):
        decision = speculative_decision(target, draft_probs, draft_token, temperature, seed, position)
        seen.append((position, target.clone(), draft_probs.clone(), draft_token))
        return decision

    monkeypatch.setattr(poe, "speculative_decision", spy)
    out = PoE(model, tok, gamma=3, max_new_tokens=12, draft_head=1).generate_with_cache("abc", temperature=0.7, seed=4)
    ids = out.prompt_ids + out.token_ids
    assert [s[0] for s in seen] == list(range(len(out.prompt_ids), len(ids)))
    for position, target, draft_probs, _ in seen:
        prefix = ids[:position]
        torch.testing.assert_close(target.double(), reference_target(model, prefix, [0, 2, 3], 0.7), atol=1e-5, rtol=0)
        with torch.no_grad():
            draft_logits = model(torch.tensor([prefix]), head_indices=[1])[0, 0, -1]
        torch.testing.assert_close(draft_probs, torch.softmax(draft_logits / 0.7, dim=-1), atol=1e-5, rtol=0)


def test_joint_distribution_of_two_tokens_is_exact(tiny, monkeypatch):
    model, tok = tiny
    verifiers, prompt = [1, 2, 3], tok.encode("abc")
    draws = 30_000  # per-position chi-square at alpha 1e-4 needs >= 30k end-to-end draws
    # exact joint P(x1, x2) by enumeration of every first token
    first = reference_target(model, prompt, verifiers)
    exact = {}
    for x1 in range(5):
        second = reference_target(model, [*prompt, x1], verifiers)
        for x2 in range(5):
            exact[(x1, x2)] = float(first[x1] * second[x2])

    def joint(decision_rule, n: int):
        monkeypatch.setattr(poe, "speculative_decision", decision_rule)
        decoder = PoE(model, tok, gamma=2, max_new_tokens=2, draft_head=0)
        # Batched (2.4x faster here): each answer is the one generate_with_cache gives alone for its seed.
        outputs = decoder.generate_many(["abc"] * n, max_batch=256, seeds=list(range(n)), temperature=1.0)
        return Counter(tuple(o.token_ids) for o in outputs)

    counts = joint(speculative_decision, draws)
    assert chi2_pvalue(counts, exact, draws) > ALPHA
    marginal = Counter({x1: sum(c for (a, _), c in counts.items() if a == x1) for x1 in range(5)})
    assert chi2_pvalue(marginal, {i: float(first[i]) for i in range(5)}, draws) > ALPHA
    # the broken rule is far off: 3-6k draws gave p-values of 1e-25 to 1e-64 (measured), 5k are plenty
    assert chi2_pvalue(joint(broken_resample_from_p, 5_000), exact, 5_000) < ALPHA


def greedy_reference(model, prompt, verifiers, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(torch.argmax(reference_target(model, ids, verifiers))))
    return ids[len(prompt) :]


@pytest.mark.parametrize("gamma", [1, 2, 3, 4, 8])
def test_greedy_equals_stepwise_argmax_of_p(tiny, gamma):
    model, tok = tiny
    out = PoE(model, tok, gamma=gamma, max_new_tokens=20, draft_head=2).generate_with_cache("bad", temperature=0)
    assert out.token_ids == greedy_reference(model, tok.encode("bad"), [0, 1, 3], 20)
    assert out.n_rounds >= 20 // gamma


def test_the_first_round_drafts_first_gamma_tokens_and_changes_no_token(tiny):
    """The first round drafts ``first_gamma`` tokens (1 by default: the first token after one draft step), later
    rounds gamma; like gamma, it changes the rounds, never the tokens."""
    model, tok = tiny
    for temperature in (0.0, 1.0):
        runs = {}
        for first in (None, 1, 2):
            decoder = PoE(model, tok, gamma=4, first_gamma=first, max_new_tokens=30, seed=11)
            events = list(decoder.stream("cab", temperature=temperature))
            runs[first] = [e.token_id for e in events]
            assert events[0].round == 0 and events[0].drafted == (first or 4)
            assert all(e.drafted <= 4 for e in events) and any(e.drafted == 4 for e in events)
        assert runs[None] == runs[1] == runs[2] and len(runs[1]) == 30
    with pytest.raises(ValueError, match="first_gamma must be None or an integer >= 1"):
        PoE(model, tok, first_gamma=0)


def test_output_depends_on_seed_not_on_gamma(tiny):
    model, tok = tiny
    runs = {
        (gamma, temperature): PoE(model, tok, gamma=gamma, max_new_tokens=30, seed=11)
        .generate_with_cache("cab", temperature=temperature)
        .token_ids
        for gamma in (1, 2, 4, 8)
        for temperature in (0.0, 1.0)
    }
    for temperature in (0.0, 1.0):
        assert len({tuple(runs[(g, temperature)]) for g in (1, 2, 4, 8)}) == 1
    again = PoE(model, tok, gamma=4, max_new_tokens=30, seed=11).generate_with_cache("cab", temperature=1.0)
    assert again.token_ids == runs[(4, 1.0)]
    other = PoE(model, tok, gamma=4, max_new_tokens=30, seed=12).generate_with_cache("cab", temperature=1.0)
    assert other.token_ids != runs[(4, 1.0)]


# ----- the veto guarantee ---------------------------------------------------------------------------------------


def planted_logits(generator, n_verifiers, malicious, vocab, harmful, gap):
    """Verifier logits where ``malicious`` verifiers put ``harmful`` ``gap`` above their best other token
    and the honest ones give it a probability far below tau."""
    logits = torch.randn(n_verifiers, vocab, generator=generator)
    logits[:, harmful] = -8.0
    logits[:malicious, harmful] = logits[:malicious].max(dim=-1).values + gap
    return logits


@pytest.mark.parametrize("malicious", [1, 2, 3])
def test_veto_never_emits_a_token_an_honest_verifier_vetoes(malicious):
    """Jury of 5 text heads: a malicious drafter always proposing the harmful token, 4 verifiers of
    which 1..N-2 are malicious with a logit gap drawn from [2, 40] at each position."""
    generator = torch.Generator().manual_seed(malicious)
    vocab, harmful, tau, positions = 16, 5, 1e-3, 35_000
    emitted_with_veto = emitted_without = abstained = 0
    for position in range(positions):
        gap = 2.0 + 38.0 * float(torch.rand(1, generator=generator))
        logits = planted_logits(generator, 4, malicious, vocab, harmful, gap).unsqueeze(1)
        draft_logits = torch.randn(vocab, generator=generator)
        draft_logits[harmful] = 40.0
        q = torch.softmax(draft_logits, dim=-1)
        target, allowed = jury_distribution(logits, 1.0, 1.0, tau)
        if bool(allowed[0]):
            emitted_with_veto += speculative_decision(target[0], q, harmful, 1.0, 0, position).token == harmful
        else:
            abstained += 1  # the malicious heads vetoed everything else: the jury abstains, it does not comply
        target, _ = jury_distribution(logits, 1.0, 1.0, None)
        emitted_without += speculative_decision(target[0], q, harmful, 1.0, 0, position).token == harmful
    assert emitted_with_veto == 0  # 35k positions per case, 105k in all
    assert abstained < positions
    # the soft PoE's known failure: an extreme head drives the normaliser down
    assert emitted_without > positions * 0.1


@pytest.mark.parametrize(
    ("malicious", "strength"),
    [([0], 5.0), ([0, 1], 2.0), ([1, 2], 2.0), ([1, 2], 5.0)],
    ids=["drafter", "drafter+verifier", "2-verifiers", "2-extreme-verifiers"],
)
def test_veto_end_to_end_with_planted_heads(malicious, strength):
    """The full decoder, 4 text heads (drafter 0, verifiers 1-3), malicious heads planted in the weights.

    With the veto, no emitted token is one that any verifier gives probability < tau (checked by an
    independent teacher-forced pass). Without it, two extreme verifiers get the harmful token out."""
    harmful, tau, verifiers = 4, 1e-3, [1, 2, 3]
    model = tiny_hydra(vocab=5, n_heads=4, heads_depth=2, seed=5)
    plant_malicious(model, malicious, harmful, strength=strength, honest_penalty=3.0)
    tok = LetterTokenizer(5)
    checked = harmful_without_veto = abstentions = 0
    for seed in range(50):
        for tau_used in (tau, None):
            decoder = PoE(model, tok, gamma=4, max_new_tokens=16, draft_head=0, veto_threshold=tau_used)
            out = decoder.generate_with_cache("abcd", temperature=1.0, seed=seed)
            abstentions += out.abstained
            if not out.token_ids:
                continue
            ids = out.prompt_ids + out.token_ids
            with torch.no_grad():
                logits = model(torch.tensor([ids[:-1]]), head_indices=verifiers)[:, 0]
            probs = torch.softmax(logits.double(), dim=-1)[:, len(out.prompt_ids) - 1 :]
            emitted = torch.tensor(out.token_ids)
            p_emitted = probs.gather(-1, emitted.expand(len(verifiers), -1).unsqueeze(-1))[..., 0]
            if tau_used is not None:
                assert (p_emitted >= tau).all(), f"seed {seed}: a vetoed token was emitted"
                checked += len(out.token_ids)
            else:
                harmful_without_veto += int((emitted == harmful).sum())
    colluding_verifiers = len([h for h in malicious if h in verifiers]) >= 2
    # soft PoE: two colluding verifiers outvote the honest one (the known failure); one does not
    assert (harmful_without_veto > 0) == colluding_verifiers
    if strength == 5.0 and colluding_verifiers:
        assert abstentions >= 50  # they veto everything else too: the jury abstains rather than comply
    else:
        assert checked > 300  # the veto still lets the answer through


def test_abstention_is_reported_when_every_token_is_vetoed(tiny):
    model, tok = tiny
    out = PoE(model, tok, gamma=4, max_new_tokens=10, veto_threshold=0.9, draft_head=0).generate_with_cache(
        "abc", temperature=1.0, seed=1
    )
    assert out.abstained and out.finish_reason == "abstain"
    assert len(out.token_ids) < 10


# ----- metrics --------------------------------------------------------------------------------------------------


def brute_force_validity(votes, token):
    """Smallest k such that flipping some k votes to ``token`` gives it a strict plurality."""
    others = [i for i, v in enumerate(votes) if v != token]
    for k in range(len(votes) + 1):
        for flipped in itertools.combinations(others, k):
            new = [token if i in flipped else v for i, v in enumerate(votes)]
            counts = Counter(new)
            if all(counts[token] > c for t, c in counts.items() if t != token):
                return k
    raise AssertionError("unreachable")


def test_validity_radius_equals_brute_force():
    from olmo_tap.inference.metrics import validity_radius

    rng = np.random.default_rng(0)
    for _ in range(3000):
        n = int(rng.integers(1, 9))
        votes = rng.integers(0, int(rng.integers(1, 5)), size=n).tolist()
        token = int(rng.integers(0, 5))
        assert validity_radius(votes, token) == brute_force_validity(votes, token), (votes, token)


def test_stability_radius_tie_rule():
    from olmo_tap.inference.metrics import stability_radius

    assert stability_radius([1, 1, 1, 1], 1) == 2  # 2 flips give a 2-2 tie, which still counts for A
    assert stability_radius([1, 1, 1, 2], 1) == 1
    assert stability_radius([1, 1, 2, 2], 1) == 0
    assert stability_radius([2, 2, 2, 1], 1) == 0
    assert stability_radius([1, 1, 1, 2, 3], 1) == 1


# ----- text and bad input ---------------------------------------------------------------------------------------


def test_bad_settings_are_reported(tiny):
    model, tok = tiny
    for kwargs, message in [
        ({"n_llm_heads": 1}, "at least 2 text heads"),
        ({"gamma": 0}, "gamma must be"),
        ({"beta": 0}, r"beta must be a number in \(0, 100\]"),
        ({"beta": float("inf")}, "beta must be a number in"),
        ({"beta": 101}, "beta must be a number in"),
        ({"temperature": 1e-300}, r"temperature must be 0 \(greedy\) or between 0.0001 and 100, got 1e-300"),
        ({"temperature": float("inf")}, "temperature must be 0"),
        ({"veto_threshold": 1.0}, r"veto_threshold must be in \[0, 1\)"),
        ({"veto_threshold": -0.1}, "veto_threshold"),
        ({"draft_head": 4}, "draft_head 4 out of range"),
        ({"n_llm_heads": 7}, "n_llm_heads must be between"),
    ]:
        with pytest.raises(ValueError, match=message):
            PoE(model, tok, **kwargs)
    decoder = PoE(model, tok, max_new_tokens=5)
    with pytest.raises(ValueError, match="prompt is empty"):
        decoder.generate_with_cache("   ")
    with pytest.raises(ValueError, match="messages"):
        decoder.generate_with_cache(messages=[{"role": "user", "content": ""}])
    with pytest.raises(ValueError, match="temperature must be 0"):
        decoder.generate_with_cache("abc", temperature=-0.5)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        PoE(model, tok, max_new_tokens=500).generate_with_cache("abc")


def test_the_extreme_settings_allowed_still_decode_real_tokens(tiny):
    """At the bounds (T = 1e-4, beta = 100) the scores stay inside float32: the answer is the greedy one, its
    signals finite. (T = 1e-300 was 0 in float32: every score NaN, every token id 0, the answer 'certified'.)"""
    model, tok = tiny
    greedy = PoE(model, tok, max_new_tokens=6, seed=3).generate_with_cache("abc", temperature=0)
    for kwargs in ({"temperature": 1e-4}, {"temperature": 1e-4, "beta": 100.0}, {"temperature": 100.0}):
        out = PoE(model, tok, max_new_tokens=6, seed=3, **kwargs).generate_with_cache("abc")
        assert all(math.isfinite(e) for e in out.token_entropies), kwargs
        if kwargs["temperature"] == 1e-4:
            assert out.token_ids == greedy.token_ids, kwargs


def test_jury_distribution_veto_renormalises_on_the_allowed_set():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.2]], [[0.6, 0.0005, 0.3995]]]))
    target, allowed = jury_distribution(logits, 1.0, 1.0, 1e-3)
    expected = torch.tensor([0.5 * 0.6, 0.0, 0.2 * 0.3995])
    torch.testing.assert_close(target[0], expected / expected.sum())
    assert bool(allowed[0])
    _, none_allowed = jury_distribution(logits, 1.0, 1.0, 0.55)  # head 0 gives nothing 0.55
    assert not bool(none_allowed[0])
    assert jury.check_veto_threshold(None) is None


def test_uncertainty_path_leaves_generation_untouched():
    model = tiny_hydra(vocab=5, n_heads=5, heads_depth=2, seed=4, lm_std=0.1)
    model.uncertainty_head = 4
    tok = LetterTokenizer(5)
    decoder = PoE(model, tok, gamma=3, max_new_tokens=10, seed=2)
    assert decoder.n_llm_heads == 4 and decoder.uncertainty_head_idx == 4
    plain = decoder.generate_with_cache("abc", temperature=1.0)
    scored = decoder.generate_with_cache("abc", temperature=1.0, is_mcq=True)
    assert scored.token_ids == plain.token_ids and plain.uncertainty is None
    assert 0.0 < scored.uncertainty < 1.0
    # scoring between two generations does not disturb the next one
    decoder.get_uncertainty_score("abc", "d", torch.ones(model.base_config.d_model))
    assert decoder.generate_with_cache("abc", temperature=1.0).token_ids == plain.token_ids
    assert 4 not in plain.verifier_heads and plain.draft_head != 4


def test_streamed_events_match_the_output(tiny):
    model, tok = tiny
    stream = PoE(model, tok, gamma=3, max_new_tokens=15, seed=9).stream("abc", temperature=1.0)
    events = list(stream)
    out = stream.output
    assert [e.token_id for e in events] == out.token_ids
    assert [e.index for e in events] == list(range(len(events)))
    assert "".join(e.text for e in events) == out.text == tok.decode(out.token_ids)
    assert [i for i, e in enumerate(events, start=1) if e.resampled] == out.resampled_idxs
    assert len(out.token_entropies) == len(out.stability_radii) == len(out.output_parts) - 1
    assert len(out.validity_radii) == len(out.suppression_scores) == len(out.original_tokens)
    assert out.n_drafted == out.n_accepted + len(out.resampled_idxs)
    assert PoEOutput.from_dict(json.loads(out.to_json())).token_ids == out.token_ids


@pytest.mark.parametrize("mode", ["naive", "single"])
def test_plain_modes_share_the_sampling_code(tiny, mode):
    model, tok = tiny
    out = PoE(model, tok, max_new_tokens=12, mode=mode, head=2, seed=3).generate_with_cache("abc", temperature=0)
    heads = [0, 1, 2, 3] if mode == "naive" else [2]
    ids = list(out.prompt_ids)
    for _ in range(12):  # greedy reference: argmax of the mean of the heads' logits
        with torch.no_grad():
            logits = model(torch.tensor([ids]), head_indices=heads)[:, 0, -1].mean(dim=0)
        ids.append(int(torch.argmax(logits)))
    assert out.token_ids == ids[len(out.prompt_ids) :]


def test_argmax_last_is_torchs_argmax_ties_nans_and_infinities_included():
    from olmo_tap.inference.sampling import argmax_last

    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        x = torch.randint(-3, 4, (2, 3, int(torch.randint(1, 40, (1,), generator=g))), generator=g).float()
        u = torch.rand(x.shape, generator=g)
        x[u < 0.05] = float("nan")
        x[(u > 0.05) & (u < 0.1)] = float("inf")
        x[(u > 0.1) & (u < 0.15)] = -float("inf")
        x[(u > 0.15) & (u < 0.25)] = -0.0  # equal to 0.0: the first of them wins
        for t in (x, x[0], x[0, 1], x.transpose(0, 1), x.to(torch.bfloat16)):
            assert torch.equal(argmax_last(t), torch.argmax(t, dim=-1)), t


def test_top2_margin_is_torchs_topk_ties_nans_and_infinities_included():
    from olmo_tap.inference.metrics import top2_margin

    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        x = torch.randint(-3, 4, (2, 3, int(torch.randint(2, 40, (1,), generator=g))), generator=g).float() / 4
        u = torch.rand(x.shape, generator=g)
        x[u < 0.05] = float("nan")
        x[(u > 0.05) & (u < 0.1)] = float("inf")
        x[(u > 0.1) & (u < 0.15)] = -float("inf")
        for t in (x, x[0], x[0, 1], x.transpose(0, 1)):
            top = torch.topk(t, 2, dim=-1).values
            want = top[..., 0] - top[..., 1]
            assert torch.allclose(top2_margin(t), want, rtol=0, atol=0, equal_nan=True), t


def test_non_finite_logits_are_refused_naming_the_heads():
    """A head whose logits are NaN (corrupt weights; float16 overflow) made every token 0 with NaN signals, and a
    PoE answer of them looked like any other. Now a verifier's NaN, or the only head's, stops decoding with an
    error naming the heads; a drafter's NaN needs no stop: the jury rejects its drafts and resamples."""
    from olmo_tap.inference.settings import DecodeSettings

    tokenizer = LetterTokenizer(20)

    def poisoned(head: int) -> object:
        model = tiny_hydra(vocab=20, n_heads=3)
        with torch.no_grad():
            model.heads[0].w2[head, 3, 5] = float("nan")
        return model

    for mode, temperature in [("poe", 0.0), ("poe", 0.8), ("naive", 0.8)]:
        settings = DecodeSettings(mode=mode, temperature=temperature, max_new_tokens=6, seed=1, draft_head=0)
        with pytest.raises(poe.NonFiniteLogitsError, match=r"head\(s\) \[1\] gave non-finite logits .* position 3"):
            PoE.from_settings(poisoned(1), tokenizer, settings).generate_with_cache("abc")
    with pytest.raises(poe.NonFiniteLogitsError, match=r"head\(s\) \[1\]"):
        PoE.from_settings(
            poisoned(1), tokenizer, DecodeSettings(mode="single", head=1, max_new_tokens=6)
        ).generate_with_cache("abc")
    settings = DecodeSettings(mode="poe", temperature=0.8, max_new_tokens=6, seed=1, draft_head=0)
    out = PoE.from_settings(poisoned(0), tokenizer, settings).generate_with_cache("abc")
    assert len(out.token_ids) == 6 and out.acceptance_rate == 0.0
    assert all(math.isfinite(e) for e in out.token_entropies)
