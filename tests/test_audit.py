"""The PoE audit: honest transcripts pass exactly; every edit a forger would try is caught and named."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
from tiny import LetterTokenizer, tiny_hydra

from olmo_tap.inference.poe import PoE
from olmo_tap.inference.transcript import content_digest, transcript_dict
from olmo_tap.verify import audit_poe, forgery
from olmo_tap.verify.poe_audit import DEFAULT_DECISION_TOLERANCE, _Replay
from olmo_tap.verify.replay import teacher_forced_logits

VOCAB = 20
PROMPTS = ["abc", "hello", "bad", "fig"]
N_TOKENS = 40


@pytest.fixture(scope="module")
def jury(one_thread):
    """A tiny Hydra whose 4 heads really differ, and its letter tokenizer."""
    return tiny_hydra(vocab=VOCAB, n_heads=4, scale=1.0), LetterTokenizer(VOCAB)


def answers(jury, *, mode="poe", temperature=1.0, seed=1, prompts=PROMPTS, **kwargs):
    model, tokenizer = jury
    kwargs.setdefault("draft_head", None if mode == "naive" else 0)
    decoder = PoE(model, tokenizer, max_new_tokens=N_TOKENS, seed=seed, mode=mode, **kwargs)
    return [transcript_dict(decoder.generate_with_cache(p, temperature=temperature)) for p in prompts]


def check(jury, transcript, **kwargs):
    model, tokenizer = jury
    return audit_poe(transcript, model, tokenizer=tokenizer, **kwargs)


@pytest.fixture(scope="module")
def sampled(jury):
    return answers(jury, temperature=1.0)


@pytest.fixture(scope="module")
def greedy(jury):
    return answers(jury, temperature=0)


# ----- honest transcripts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, beta=0.5, gamma=3),
        dict(temperature=1.0, gamma=3, first_gamma=2),
        dict(temperature=1.0, first_gamma=None),
        dict(temperature=0),
        dict(temperature=1.0, veto_threshold=0.005),
        dict(temperature=1.0, mode="single", draft_head=2),
        dict(temperature=0.8, mode="naive"),
        dict(temperature=0, mode="naive"),
    ],
)
def test_honest_transcripts_are_reproduced_exactly(jury, settings):
    for transcript in answers(jury, **settings):
        report = check(jury, transcript)
        assert report.honest, report.reason
        assert report.exact and report.tolerance == 0  # the generator's own dtype and device class
        assert not report.field_mismatches and report.statistics.agreement_rate == 1.0
        assert report.digest == transcript["digest"] == content_digest(transcript)
        assert report.text == jury[1].decode(transcript["token_ids"], skip_special_tokens=True)
        assert report.jury is (settings.get("mode", "poe") == "poe")


def test_plain_decoders_are_honest_but_not_the_jury(jury):
    report = check(jury, answers(jury, mode="single", prompts=["abc"])[0])
    assert report.honest and not report.jury and not report.certified
    assert "not the jury" in report.label and any("not decided by the jury" in n for n in report.notes)
    poe = check(jury, answers(jury, prompts=["abc"])[0])
    assert poe.certified and poe.label == "honest" and poe.independent_heads


def test_a_jury_of_clones_certifies_nothing(jury):
    model, tokenizer = jury
    clones = copy.deepcopy(model)
    with torch.no_grad():
        for p in clones.heads.parameters():
            p.copy_(p[0].expand_as(p))
    assert clones.identical_heads() and not model.identical_heads()
    transcript = answers((clones, tokenizer), prompts=["abc"])[0]
    report = audit_poe(transcript, clones, tokenizer=tokenizer)
    assert report.honest and not report.independent_heads and not report.certified
    assert "identical heads" in report.label


def test_abstentions_and_fake_abstentions(jury):
    transcripts = answers(jury, veto_threshold=0.2)
    abstained = [t for t in transcripts if t["output"]["abstained"]]
    assert abstained, "a high veto threshold should make the jury abstain on some prompts"
    for transcript in abstained:
        assert check(jury, transcript).honest
    fake = forgery.truncate(answers(jury, prompts=["abc"])[0], jury[1], 10)
    fake["output"].update(abstained=True, finish_reason="abstain")
    report = check(jury, fake)
    assert not report.honest and not report.ending_consistent


def test_blocks_of_positions_give_the_same_audit(jury, sampled, monkeypatch):
    """The replay projects logits a block of positions at a time (bounded memory): any block size, same report."""
    from olmo_tap.verify import poe_audit

    forged = forgery.substitute(sampled[1], jury[1], 9, (sampled[1]["token_ids"][9] + 3) % VOCAB)
    whole = [check(jury, t).to_dict() for t in (sampled[1], forged)]
    monkeypatch.setattr(poe_audit, "LOGIT_BLOCK", 3)
    stops: dict[int, list[int]] = {0: [], 1: []}
    blocked = []
    for i, t in enumerate((sampled[1], forged)):
        blocked.append(check(jury, t, check_stop=lambda i=i: stops[i].append(1)).to_dict())
    assert blocked == whole
    blocks = math.ceil((N_TOKENS + 1) / 3)
    assert len(stops[0]) == blocks  # one call per block
    assert len(stops[1]) > blocks  # and one per token of the generator run again on the forged claim


def _replay_rounding_tie(monkeypatch, index, token):
    """Make the audit's block replay see ``token`` 1e-5 above the best logit of every head at emitted ``index``:
    the rounding tie by which a block of rows and the generator's own shapes can part on a CPU."""
    from olmo_tap.verify import poe_audit

    project = poe_audit.project_block

    def tied(hydra, hidden, start, stop):
        logits = project(hydra, hidden, start, stop).clone()
        if start <= index < stop:
            row = logits[:, index - start]
            row[:, token] = row.max(dim=-1).values + 1e-5
        return logits

    monkeypatch.setattr(poe_audit, "project_block", tied)


@pytest.mark.parametrize("mode", ["poe", "single"])
def test_a_rounding_tie_of_the_block_replay_is_settled_by_the_generator(jury, monkeypatch, mode):
    """Greedy, so the tie decides the token. The generator, run again with the claim's settings, reproduces the
    claim: honest; the same tie under a forged token is not, and the forged position is named."""
    _model, tokenizer = jury
    transcript = answers(jury, mode=mode, temperature=0, prompts=["hello"])[0]
    j = 11
    emitted = transcript["token_ids"][j]
    other = (emitted + 1) % VOCAB
    _replay_rounding_tie(monkeypatch, j, other)
    report = check(jury, transcript)
    assert report.honest, report.reason
    assert report.regeneration is not None and report.regeneration.reproduced
    assert "rounding tie" in report.positions[j].decision and report.exact
    assert any("rounding tie" in n for n in report.notes)
    assert report.to_dict()["regeneration"]["reproduced"] is True

    forged = forgery.substitute(transcript, tokenizer, j, other)  # the token the tied replay prefers
    report = check(jury, forged)
    assert not report.honest
    assert report.regeneration is not None and report.regeneration.diverged_at == j
    assert j in report.inconsistent_positions and "generator" in report.positions[j].decision


def test_the_generator_is_run_again_only_when_the_block_replay_disagrees(jury, sampled, monkeypatch):
    from olmo_tap.verify import poe_audit

    calls = []
    real = poe_audit.regenerate
    monkeypatch.setattr(poe_audit, "regenerate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert check(jury, sampled[0]).honest and not calls  # agreement: no second decode
    forged = forgery.change_output(sampled[0], "token_entropies", 3, 0.5)
    assert not check(jury, forged).honest and len(calls) == 1  # a signal off: only the generator can say
    assert not check(jury, forgery.change_output(sampled[0], "n_accepted", None, 0)).honest
    assert len(calls) == 1  # counts follow from the claimed path: no rounding can move them


def test_regenerate_compares_every_token_and_the_ending(jury):
    from olmo_tap.verify.poe_audit import _claimed_path
    from olmo_tap.verify.regenerate import regenerate

    model, tokenizer = jury
    transcript = answers(jury, temperature=1.0, prompts=["fig"])[0]
    settings, prompt = transcript["settings"], transcript["prompt_ids"]
    assert settings["threads"] == torch.get_num_threads()
    claims = _claimed_path(transcript["output"], transcript["token_ids"], "poe", [])
    reason = transcript["output"]["finish_reason"]
    assert regenerate(model, tokenizer, settings, prompt, claims, reason).reproduced
    cut = regenerate(model, tokenizer, settings, prompt, claims[:9], "time_limit")
    assert cut.reproduced and len(cut.events) == 9
    short = regenerate(model, tokenizer, settings, prompt, claims[:9], reason)
    assert not short.reproduced and short.diverged_at == 9 and "past" in short.detail
    token, draft, resampled = claims[4]
    bad = [*claims[:4], ((token + 1) % VOCAB, draft, resampled), *claims[5:]]
    wrong = regenerate(model, tokenizer, settings, prompt, bad, reason)
    assert not wrong.reproduced and wrong.diverged_at == 4 and len(wrong.events) == 4
    threads = torch.get_num_threads()
    other = regenerate(model, tokenizer, {**settings, "threads": threads + 1}, prompt, claims, reason)
    assert other.reproduced and torch.get_num_threads() == threads  # run with the claim's count, then restored


# ----- the decision rule, against numbers computed here --------------------------------------------------------


def test_slack_is_the_nats_a_greedy_argmax_misses_by(jury, greedy):
    """A plain greedy decoder emits argmax(logits): the slack of another token is its logit gap to the max."""
    model, tokenizer = jury
    transcript = answers(jury, mode="single", temperature=0, prompts=["hello"])[0]
    j = 7
    logits = teacher_forced_logits(model, transcript["prompt_ids"], transcript["token_ids"], [0])[0, j]
    token = int(torch.argsort(logits, descending=True)[3])
    forged = forgery.substitute(transcript, tokenizer, j, token)
    report = check(jury, forged)
    assert report.positions[j].slack == pytest.approx(float(logits.max() - logits[token]), abs=1e-5)
    assert j in report.inconsistent_positions and not report.honest
    # a tolerance just above that slack explains it as a near-tie (the cross-dtype rule); just below does not
    slack = report.positions[j].slack
    assert check(jury, forged, tolerance=slack * 1.001).positions[j].consistent
    assert not check(jury, forged, tolerance=slack * 0.999).positions[j].consistent


def test_slack_of_the_acceptance_test_is_log_uq_against_log_p():
    """Verifiers 1 and 2, draft head 0, T = 1, hand-built logits. Claiming the other outcome of the acceptance
    test (accept iff u q(x) < P(x)) at the replay's own draft is off by |log(u q(x)) - log P(x)| nats, and by
    nothing else when the claimed token is the one that outcome gives."""
    from olmo_tap.inference.sampling import Purpose, prob_scores, uniform

    torch.manual_seed(0)
    logits = torch.randn(3, 1, 6)
    branches = set()
    for seed in range(12):
        settings = dict(mode="poe", seed=seed, draft_head=0, beta=1.0, veto_threshold=None, n_llm_heads=3)
        replay = _Replay.from_logits(logits, settings, 1.0, 10)
        draft = replay.position(0, 0, 0, False)[0].draft_token_id
        p = torch.softmax(logits[1:, 0].sum(0), -1)
        q = torch.softmax(logits[0, 0], -1)
        u = float(uniform(seed, 10, Purpose.ACCEPT)[0])
        expected = abs(math.log(u * float(q[draft])) - math.log(float(p[draft])))
        if u * q[draft] < p[draft]:  # the jury accepts: claim a rejection and the resample it would give
            residual = (p - q).clamp(min=0)
            resampled = int(torch.argmax(prob_scores(residual / residual.sum(), seed, 10, Purpose.RESAMPLE)))
            claim = replay.position(0, resampled, draft, True)[0]
            branches.add("accepted")
        else:  # the jury rejects: claim it accepted the draft
            claim = replay.position(0, draft, draft, False)[0]
            branches.add("rejected")
        assert claim.slack == pytest.approx(expected, rel=1e-4), seed
        assert claim.decision == "accept"
    assert branches == {"accepted", "rejected"}


def _resample_winner(p: torch.Tensor, q: torch.Tensor, noise: torch.Tensor) -> int:
    return int(torch.argmax(torch.log((p - q).clamp(min=0).double()) + noise.double()))


def test_resample_slack_and_margin_are_the_smallest_moves_of_p_and_q_that_flip_it():
    """Brute force on small vocabularies: moving the claimed token's P up and q down by e^slack (a hair more)
    makes it win the resample, a hair less does not; moving the nearest other token's by e^margin makes it win.
    Where P(x) = q(x) exactly the residual is 0 and its log -inf, yet the slack stays finite and small: the
    decision is a near-tie of P against q, not an impossibility."""
    from olmo_tap.verify.poe_audit import _resample_slack_and_margin

    gen = torch.Generator().manual_seed(0)
    checked = {"slack": 0, "margin": 0}
    for _ in range(40):
        p = torch.softmax(torch.randn(12, generator=gen, dtype=torch.float64) * 2, -1)
        q = torch.softmax(torch.randn(12, generator=gen, dtype=torch.float64) * 2, -1)
        noise = -torch.log(-torch.log(torch.rand(12, generator=gen, dtype=torch.float64)))
        winner = _resample_winner(p, q, noise)
        for x in range(12):
            slack, margin = _resample_slack_and_margin(p, q, noise, x)
            if x == winner:
                assert slack == 0 and margin > 0
                flips = []
                for y in range(12):  # no other token wins with a move of less than the margin; one does with it
                    for scale in (1 - 1e-6, 1 + 1e-6):
                        moved_p, moved_q = p.clone(), q.clone()
                        moved_p[y] *= math.exp(margin * scale)
                        moved_q[y] *= math.exp(-margin * scale)
                        flips.append((scale, _resample_winner(moved_p, moved_q, noise) != x))
                assert not any(flip for scale, flip in flips if scale < 1)
                assert any(flip for scale, flip in flips if scale > 1)
                checked["margin"] += 1
                continue
            assert 0 < slack < math.inf
            for scale, wins in ((1 + 1e-6, True), (1 - 1e-6, False)):
                moved_p, moved_q = p.clone(), q.clone()
                moved_p[x] *= math.exp(slack * scale)
                moved_q[x] *= math.exp(-slack * scale)
                assert (_resample_winner(moved_p, moved_q, noise) == x) is wins
            checked["slack"] += 1
    assert checked["slack"] > 300 and checked["margin"] == 40
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)  # residual 0 at token 1: log -inf
    slack, _ = _resample_slack_and_margin(p, q, torch.zeros(3, dtype=torch.float64), 1)
    assert 0 < slack < 1.5


# ----- tampering: each kind a forger would try -----------------------------------------------------------------


def caught(jury, transcript, **kwargs):
    try:
        report = check(jury, transcript, **kwargs)
    except ValueError:
        return True  # refused as a claim no decoder could make
    return not report.honest


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_every_single_token_edit_is_caught_at_its_position(jury, temperature, sampled, greedy):
    transcripts = sampled if temperature else greedy
    rng = random.Random(0)
    tokenizer = jury[1]
    for transcript in transcripts:
        for j in range(0, len(transcript["token_ids"]), 3):
            token = forgery.random_other_token(rng, VOCAB, transcript["token_ids"][j])
            forged = forgery.substitute(transcript, tokenizer, j, token)
            report = check(jury, forged)
            assert not report.honest and j in report.inconsistent_positions, (j, report.reason)
            assert f"token {j} " in report.reason


def test_an_edit_caught_under_either_claim_of_the_forger(jury, sampled):
    """At an edited position the forger may claim the draft was accepted, or that the replay's own draft was
    rejected and the new token resampled: both fail."""
    tokenizer = jury[1]
    transcript = sampled[0]
    honest = check(jury, transcript)
    for j in (2, 11, 23):
        token = (transcript["token_ids"][j] + 5) % VOCAB
        forged = forgery.substitute(transcript, tokenizer, j, token)
        output = forged["output"]
        pairs = dict(zip(output["resampled_idxs"], output["original_token_ids"], strict=True))
        pairs[j + 1] = honest.positions[j].draft_token_id
        output["resampled_idxs"] = sorted(pairs)
        output["original_token_ids"] = [pairs[p] for p in output["resampled_idxs"]]
        assert j in check(jury, forged).inconsistent_positions


@pytest.mark.parametrize(
    "edit",
    ["insert", "delete", "truncate", "extend", "prompt", "prompt text"],
)
def test_inserted_deleted_truncated_extended_and_prompt_edits_are_caught(jury, sampled, edit):
    tokenizer = jury[1]
    for transcript in sampled:
        if edit == "insert":
            forged = forgery.insert(transcript, tokenizer, 5, [3])
        elif edit == "delete":
            forged = forgery.delete(transcript, tokenizer, 5)
        elif edit == "truncate":
            forged = forgery.truncate(transcript, tokenizer, 20)
        elif edit == "extend":  # past max_new_tokens
            forged = forgery.insert(transcript, tokenizer, len(transcript["token_ids"]), [1, 2])
        elif edit == "prompt":
            forged = forgery.change_prompt(transcript, tokenizer, 1, (transcript["prompt_ids"][1] + 1) % VOCAB)
        else:  # the ids changed but the prompt text a reader sees left as it was
            forged = copy.deepcopy(transcript)
            forged["prompt_ids"][1] = (forged["prompt_ids"][1] + 1) % VOCAB
            forged["digest"] = content_digest(forged)
        assert caught(jury, forged), edit


@pytest.mark.parametrize(
    "name, value",
    [
        ("seed", lambda s: s["seed"] + 1),
        ("temperature", lambda s: 0.5),
        ("beta", lambda s: 3.0),
        ("veto_threshold", lambda s: 0.05),
        ("draft_head", lambda s: 1),
        ("n_llm_heads", lambda s: 3),
        ("mode", lambda s: "naive"),
        ("max_new_tokens", lambda s: 60),
        ("stop_ids", lambda s: [5]),
        ("vocab_limit", lambda s: 15),
        ("n_heads", lambda s: 5),
    ],
)
def test_changed_settings_are_caught(jury, sampled, name, value):
    tokenizer = jury[1]
    for transcript in sampled:
        forged = forgery.change_setting(transcript, tokenizer, name, value(transcript["settings"]))
        assert caught(jury, forged), name
        stale = copy.deepcopy(transcript)  # the naive forger: the digest still covers the old settings
        stale["settings"][name] = value(transcript["settings"])
        assert caught(jury, stale), name


@pytest.mark.parametrize(
    "name, index, value",
    [
        ("output_parts", 3, " PWNED"),
        ("output_parts", 0, "a different question"),
        ("text", None, "something else"),
        ("token_ids", 2, 7),
        ("token_entropies", 4, 0.0),
        ("stability_radii", 4, 9),
        ("stability_margins", 4, 0.99),
        ("n_accepted", None, 999),
        ("n_rounds", None, 1),
        ("acceptance_rate", None, 1.0),
        ("abstained", None, True),
        ("finish_reason", None, "eos"),
        ("uncertainty", None, 0.99),
        ("verifier_heads", None, [0, 1, 2, 3]),
        ("mode", None, "naive"),
        ("settings", None, {}),
        ("certified_by", None, "a jury of nine"),
    ],
)
def test_changed_derived_fields_are_named(jury, sampled, name, index, value):
    transcript = sampled[1]
    forged = forgery.change_output(transcript, name, index, value)
    report = check(jury, forged)
    assert not report.honest
    where = f"output.{name}" + ("" if index is None else f"[{index}]")
    assert any(m.field == where for m in report.field_mismatches), [str(m) for m in report.field_mismatches]


def test_a_float_signal_moved_within_the_tolerance_is_reported_not_called_a_match(jury, sampled):
    """Float signals are held to a tolerance (the generator's cached steps and the replay's one pass round
    differently): a claim inside it stays honest, but the reason says how far it is from the replay's values."""
    transcript = sampled[1]
    report = check(jury, transcript)
    assert report.honest and report.signal_drift <= report.signal_tolerance
    entropy = transcript["output"]["token_entropies"][2]
    nudged = forgery.change_output(transcript, "token_entropies", 2, entropy + 0.5 * report.signal_tolerance)
    nudged_report = check(jury, nudged)
    assert nudged_report.honest and nudged_report.signal_drift >= 0.4 * report.signal_tolerance
    assert f"float signals within {nudged_report.signal_drift:.2g} of the replay's" in nudged_report.reason
    assert nudged_report.to_dict()["signal_drift"] == nudged_report.signal_drift
    beyond = forgery.change_output(transcript, "token_entropies", 2, entropy + 2 * report.signal_tolerance)
    assert not check(jury, beyond).honest


def test_resampled_signals_are_checked(jury, sampled):
    transcript = next(t for t in sampled if t["output"]["resampled_idxs"])
    for name, value in (("suppression_scores", 0.5), ("validity_radii", 7), ("original_tokens", "zz")):
        forged = forgery.change_output(transcript, name, 0, value)
        assert any(m.field == f"output.{name}[0]" for m in check(jury, forged).field_mismatches), name
    draft = transcript["output"]["original_token_ids"][0]
    forged = forgery.change_output(transcript, "original_token_ids", 0, (draft + 1) % VOCAB)
    assert not check(jury, forged).honest


def test_stale_digest_and_unknown_fields_are_named(jury, sampled):
    forged = copy.deepcopy(sampled[0])
    forged["token_ids"][3] = (forged["token_ids"][3] + 1) % VOCAB
    report = check(jury, forged)
    assert any(m.field == "digest" for m in report.field_mismatches)
    assert any(m.field.startswith("output.token_ids[") for m in report.field_mismatches)
    extra = dict(sampled[0], certified=True)
    assert any(m.field == "certified" for m in check(jury, extra).field_mismatches)
    unknown = forgery.change_setting(sampled[0], jury[1], "trusted", True)
    assert any(m.field == "settings.trusted" for m in check(jury, unknown).field_mismatches)


@pytest.mark.parametrize("made_by", ["single", "naive", "other weights", "other seed"])
def test_other_decoders_presented_as_the_jury_are_caught(jury, sampled, made_by):
    tokenizer = jury[1]
    if made_by == "other weights":
        other = tiny_hydra(vocab=VOCAB, n_heads=4, scale=1.0, seed=5)
        made = answers((other, tokenizer))
    elif made_by == "other seed":
        made = answers(jury, seed=2)
    else:
        made = answers(jury, mode=made_by)
    for transcript, honest in zip(made, sampled, strict=True):
        forged = copy.deepcopy(transcript)
        forged["settings"] = copy.deepcopy(honest["settings"])
        for name in ("mode", "draft_head", "verifier_heads"):
            forged["output"][name] = honest["output"][name]
        if made_by in ("single", "naive"):
            forged["output"].update(resampled_idxs=[], original_tokens=[], original_token_ids=[])
        forged = forgery.restamp(forged, tokenizer)
        report = check(jury, forged)
        assert not report.honest and report.inconsistent_positions, made_by


def test_a_time_limit_cut_needs_the_servers_signature(jury, sampled, tmp_path):
    from olmo_tap.verify.signing import generate_keypair, load_private_key, load_public_key, sign_transcript

    model, tokenizer = jury
    decoder = PoE(model, tokenizer, max_new_tokens=N_TOKENS, seed=1, draft_head=0)
    stream = decoder.stream("abc", temperature=1.0)
    events = iter(stream)
    for _ in range(12):  # as the service does when its deadline passes: stop asking, close the decoder
        next(events)
    events.close()
    stream.output.finish_reason = "time_limit"
    cut = transcript_dict(stream.output)
    report = check(jury, cut)
    assert not report.honest and "truncated" in report.reason
    private, public = generate_keypair(tmp_path / "server.key")
    signed = sign_transcript(cut, load_private_key(private))
    assert check(jury, signed, public_key=load_public_key(public)).honest
    assert not check(jury, signed).honest  # signed, but by whom? no trusted key given
    _, other_public = generate_keypair(tmp_path / "other.key")
    assert not check(jury, signed, public_key=load_public_key(other_public)).honest


def test_signatures_are_checked_when_present_or_asked_for(jury, sampled, tmp_path):
    from olmo_tap.verify.signing import generate_keypair, load_private_key, load_public_key, sign_transcript

    private, public = generate_keypair(tmp_path / "k")
    signed = sign_transcript(sampled[2], load_private_key(private))
    report = check(jury, signed, public_key=load_public_key(public))
    assert report.honest and report.signature["valid"] and report.signature["trusted"]
    # a forger who re-derives everything still cannot re-sign
    forged = forgery.substitute(signed, jury[1], 4, (signed["token_ids"][4] + 1) % VOCAB)
    report = check(jury, forged)
    assert not report.honest and not report.signature["valid"]
    assert not check(jury, sampled[2], public_key=load_public_key(public)).honest  # unsigned, key required


# ----- across dtypes: a calibrated tolerance for near-ties only ------------------------------------------------


def test_a_bf16_transcript_audited_in_fp32_uses_the_cross_dtype_tolerance(jury):
    model, tokenizer = jury
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    transcripts = answers((bf16, tokenizer), temperature=0.8)
    for transcript in transcripts:
        report = check(jury, transcript)
        assert not report.exact and report.tolerance == DEFAULT_DECISION_TOLERANCE
        assert report.honest, report.reason
        assert report.regeneration is None  # another dtype's generator cannot be re-run here
    flagged = 0
    for transcript in transcripts:  # an edit off by more than the tolerance is flagged, one within it is not
        for j in range(0, len(transcript["token_ids"]), 5):
            forged = forgery.substitute(transcript, tokenizer, j, (transcript["token_ids"][j] + 7) % VOCAB)
            slack = check(jury, forged, tolerance=0).positions[j].slack
            consistent = check(jury, forged).positions[j].consistent
            assert consistent == (slack <= DEFAULT_DECISION_TOLERANCE), (j, slack)
            flagged += not consistent
    assert flagged > 0


# ----- bad input -----------------------------------------------------------------------------------------------


def test_bad_transcripts_are_refused_with_the_field_named(jury, sampled):
    model, tokenizer = jury
    transcript = sampled[0]

    def refused(data, match):
        with pytest.raises(ValueError, match=match):
            audit_poe(data, model, tokenizer=tokenizer)

    refused({"format": "something else"}, "not an olmo-tap transcript")
    refused(dict(transcript, version=7), "unsupported transcript version")
    refused(dict(transcript, settings=dict(transcript["settings"], vocab_limit=VOCAB + 50)), "vocabulary mismatch")
    refused(dict(transcript, token_ids=[*transcript["token_ids"][:3], VOCAB + 1]), "outside the model's vocabulary")
    refused(dict(transcript, settings=dict(transcript["settings"], n_llm_heads=9)), "text heads")
    for name, value in (
        ("max_new_tokens", "5"),
        ("seed", None),
        ("seed", 1.5),
        ("temperature", -1),
        ("temperature", "hot"),
        ("beta", 0),
        ("veto_threshold", 1.5),
        ("draft_head", 7),
        ("mode", "jury"),
        ("gamma", True),
        ("first_gamma", 0),
        ("first_gamma", "x"),
    ):
        refused(dict(transcript, settings=dict(transcript["settings"], **{name: value})), f"'{name}'")
    refused(dict(transcript, digest=None), "digest")
    for name, value in (("resampled_idxs", [[1]]), ("token_entropies", ["x"]), ("output_parts", [1])):
        refused(dict(transcript, output=dict(transcript["output"], **{name: value})), f"output.{name}")
    # sizes an audit would allocate: bounded first
    for name in ("n_heads", "n_llm_heads", "heads_depth", "gamma", "first_gamma"):
        refused(dict(transcript, settings=dict(transcript["settings"], **{name: 10**9})), f"'{name}'")
    refused(dict(transcript, settings=dict(transcript["settings"], stop_ids=5)), "stop_ids")
    refused(dict(transcript, output=[]), "output")
    refused(dict(transcript, prompt_ids=[]), "prompt_ids")
    with pytest.raises(ValueError, match="tokenizer"):
        audit_poe(transcript, model)  # no tokenizer, and the transcript names no model to load one from


def test_unreadable_transcript_files_are_named(tmp_path):
    from olmo_tap.cli import main

    for name, text in (("broken.json", "{broken"), ("deep.json", "[" * 100_000 + "]" * 100_000)):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match=name):
            audit_poe(path)
        assert main(["audit", str(path)]) == 2


def test_the_digest_survives_another_json_writer(jury, sampled):
    """A browser's JSON.stringify writes 1.0 as 1 and 0.0 as 0: the transcript it saves keeps its digest."""
    transcript = copy.deepcopy(sampled[0])
    as_a_browser_writes = json.loads(json.dumps(transcript).replace(": 1.0,", ": 1,").replace(": 0.0,", ": 0,"))
    assert as_a_browser_writes["settings"]["beta"] == 1 and isinstance(as_a_browser_writes["settings"]["beta"], int)
    assert content_digest(as_a_browser_writes) == transcript["digest"]
    assert check(jury, as_a_browser_writes).honest


def test_transcripts_from_before_first_gamma_count_gamma_in_every_round(jury):
    """A transcript decoded before ``first_gamma`` existed has every round gamma long and no such setting: its
    rounds are counted so, and it is honest; read as a first round of one draft, its counts would be wrong."""
    before, now = answers(jury, first_gamma=None), answers(jury)
    # an answer whose first round accepted drafts, so that the two readings count other rounds
    transcript = next(b for b, n in zip(before, now, strict=True) if b["output"]["n_rounds"] != n["output"]["n_rounds"])
    old = copy.deepcopy(transcript)
    del old["settings"]["first_gamma"]
    del old["output"]["settings"]["first_gamma"]
    old["digest"] = content_digest(old)
    report = check(jury, old)
    assert report.honest, report.reason
    misread = copy.deepcopy(old)
    misread["settings"]["first_gamma"] = misread["output"]["settings"]["first_gamma"] = 1
    misread["digest"] = content_digest(misread)
    assert not check(jury, misread).honest


def test_version_1_transcripts_are_still_read(jury, sampled):
    old = copy.deepcopy(sampled[0])
    old["version"] = 1
    del old["digest"]
    for name in ("compile", "mcq", "question"):
        del old["settings"][name]
        del old["output"]["settings"][name]
    for name in ("whole_jury", "independent_heads", "certified"):
        del old["output"][name]
    report = check(jury, old)
    assert report.honest, report.reason
    assert any("version 1" in note for note in report.notes)


# ----- the CLI and the embedded default --------------------------------------------------------------------------


@pytest.mark.slow
def test_the_issues_forgeries_on_the_embedded_default(smollm, tmp_path, capsys):
    """The forger's table from the issue: each edit of a saved transcript fails `olmo-tap audit`, which names
    the position or the field; a signed transcript checks against the server's key."""
    from olmo_tap.cli import main
    from olmo_tap.verify.signing import generate_keypair

    key, public = generate_keypair(tmp_path / "server.key")
    path = tmp_path / "t.json"
    # certainty off: each audit would replay the five KLE samples too (tests/test_certainty_cli.py audits those)
    common = ["--max-new-tokens", "40", "--no-color", "--seed", "5", "--certainty", "off"]
    assert main(["generate", "Name three colours.", "--save", str(path), "--signing-key", str(key), *common]) == 0
    assert "digest sha256:" in capsys.readouterr().err
    saved = json.loads(path.read_text())
    assert main(["audit", str(path), "--public-key", str(public)]) == 0
    out = capsys.readouterr().out
    assert saved["digest"] in out and "verdict: honest" in out

    def audit_of(edit) -> str:
        forged = copy.deepcopy(saved)
        edit(forged)
        path.write_text(json.dumps(forged))
        assert main(["audit", str(path)]) == 1
        return capsys.readouterr().out

    other = (saved["token_ids"][2] + 1) % 49152
    out = audit_of(lambda t: t["token_ids"].__setitem__(2, other))
    assert "BAD token 2 (position" in out and "BAD digest" in out
    out = audit_of(lambda t: t["output"]["token_ids"].__setitem__(2, other))
    assert "output.token_ids" in out
    out = audit_of(lambda t: t["output"]["output_parts"].__setitem__(3, " PWNED"))
    assert "output.output_parts[3]" in out
    # the weights are the auditor's choice: a transcript naming another model does not make audit load it
    elsewhere = copy.deepcopy(saved)
    elsewhere["model"] = "/nonexistent/evil-model"
    elsewhere["digest"] = content_digest(elsewhere)
    del elsewhere["signature"]
    path.write_text(json.dumps(elsewhere))
    assert main(["audit", str(path)]) == 0
    out = capsys.readouterr().out
    assert "replayed through smollm2-135m-instruct" in out and "/nonexistent/evil-model" in out
    assert main(["audit", str(path), "--model-from-transcript"]) == 2
    # a sampled transcript: five single-token edits at random positions, each caught by the decision rule
    assert main(["generate", "Name three colours.", "--save", str(path), "--temperature", "0.8", *common]) == 0
    sampled = json.loads(path.read_text())
    tokenizer = smollm[1]
    rng = random.Random(5)
    for j in rng.sample(range(len(sampled["token_ids"])), 5):
        forged = forgery.substitute(sampled, tokenizer, j, rng.randrange(49152))
        report = audit_poe(forged, smollm[0], tokenizer=tokenizer)
        assert j in report.inconsistent_positions


def test_the_audit_loads_the_weights_in_the_generators_dtype(monkeypatch):
    """Replaying in the dtype the transcript records keeps the audit exact; an explicit dtype still wins."""
    from olmo_tap.verify import poe_audit

    seen = []
    monkeypatch.setattr(poe_audit.HydraTransformer, "from_pretrained", lambda *a, **k: seen.append(k["dtype"]))
    monkeypatch.setattr("olmo_tap.weights.tokenizer.load_tokenizer", lambda *a, **k: None)
    transcript = {"model": "smollm2-135m-instruct", "settings": {"dtype": "bfloat16", "n_heads": 6}}
    poe_audit.load_audit_model(transcript)
    poe_audit.load_audit_model(transcript, dtype="float32")
    assert seen == ["bfloat16", "float32"]


def test_a_replay_through_weights_giving_nan_is_refused(jury, greedy):
    """Replayed through weights whose logits are NaN, every position's argmax is token 0: a forgery claiming
    zeros would have been reproduced. The audit, like the decoder, refuses a distribution that is not finite and
    names the heads; token-difr's scoring refuses NaN logits the same way."""
    from olmo_tap.inference.sampling import NonFiniteLogitsError
    from olmo_tap.verify.records import SamplingMethod
    from olmo_tap.verify.scoring import score_tokens

    model, tokenizer = jury
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.heads[0].w2[2, 3, 5] = float("nan")
    forged = copy.deepcopy(greedy[0])
    forged["token_ids"] = [0] * len(forged["token_ids"])
    with pytest.raises(NonFiniteLogitsError, match=r"head\(s\) \[2\] gave non-finite logits"):
        audit_poe(forged, broken, tokenizer=tokenizer)
    logits = torch.randn(4, VOCAB)
    logits[2, 7] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match=r"not finite \(NaN or infinity\) at 1 of 4 positions"):
        score_tokens(logits, torch.zeros(4, dtype=torch.long), temperature=0, top_k=0, top_p=1.0,
                     method=SamplingMethod.VLLM_GUMBEL_MAX, noise=None)  # fmt: skip
