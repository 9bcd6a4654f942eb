"""GCG and the attack bank: the cached candidate pass against the plain forward, the gradient against finite
differences, determinism, the bank file, resuming, and the shipped bank against a rerun of its first entry."""

from __future__ import annotations

import json

import pytest
import torch

from olmo_tap import HydraTransformerConfig, TransformerConfig
from olmo_tap.model.kv_cache import HydraCache, Rows
from olmo_tap.robustness.bank import AttackBank, BankError, load_bank, model_fingerprint, shipped_bank_path
from olmo_tap.robustness.build import build_bank, rerun_entry
from olmo_tap.robustness.gcg import Attack, split_prompt
from olmo_tap.robustness.settings import GCGSettings
from olmo_tap.train.mcq import generate_mcqs

SMALL = GCGSettings(suffix_tokens=4, steps=2, candidates=6, top_k=8, questions_per_suffix=2, kappa=1.0)


@pytest.fixture(scope="module")
def tokenizer(olmo_tap_cache):
    from olmo_tap import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tiny(tokenizer, one_thread):
    """A random 3-layer Hydra (3 heads of 1 layer) over the embedded default's vocabulary and chat template."""
    config = TransformerConfig("llama", len(tokenizer), 32, 3, 4, 2, 8, 48, 10000.0, 1e-5, False, 512)
    torch.manual_seed(0)
    model = HydraTransformerConfig.split(config, 3, 1).build()
    with torch.no_grad():
        for block in [*model.trunk, *model.heads]:
            block.reset_parameters(std=0.6 / 32**0.5)
        model.lm_head.normal_(std=0.5)
    return model.eval()


def _full_margins(attack: Attack, prompt, suffix: list[int], clean: int) -> float:
    """The margin from one plain, uncached forward over the whole prompt (the reference for the cached pass)."""
    ids = torch.tensor([prompt.prefix + suffix + prompt.tail])
    logits = attack.model(ids, head_indices=attack.heads, last_token_only=True)[:, :, -1]
    return float(attack.margins(attack.letter_scores(logits), torch.tensor([clean]))[0])


@pytest.mark.parametrize("target", ["jury", "head:1"])
def test_cached_candidate_pass_equals_the_plain_forward(tiny, tokenizer, target):
    attack = Attack(tiny, tokenizer, GCGSettings(**{**SMALL.to_dict(), "target": target}))
    prompts = [split_prompt(tokenizer, q) for q in generate_mcqs(2, seed=5)]
    clean = attack.clean_letters(prompts)
    cache = attack.prompt_cache(prompts)
    base = attack.initial_suffix()
    candidates = [base, [*base[:2], tokenizer.encode(" x", add_special_tokens=False)[0], *base[3:]]]
    losses, flips = attack.evaluate(cache, prompts, clean, candidates)
    for c, candidate in enumerate(candidates):
        margins = [_full_margins(attack, p, candidate, int(clean[i])) for i, p in enumerate(prompts)]
        assert float(losses[c]) == pytest.approx(sum(max(m, -attack.settings.kappa) for m in margins), abs=1e-4)
        assert int(flips[c]) == sum(m < 0 for m in margins)


def test_split_prompt_puts_the_suffix_where_the_user_text_ends(tokenizer):
    from olmo_tap.inference.prompts import encode_chat
    from olmo_tap.robustness.gcg import attacked_text
    from olmo_tap.train.mcq import format_mcq

    q = generate_mcqs(1, seed=3)[0]
    p = split_prompt(tokenizer, q)
    ids = tokenizer.encode(" hello world", add_special_tokens=False)
    assert encode_chat(tokenizer, attacked_text(format_mcq(q), "hello world")) == p.prefix + ids + p.tail


def test_gradient_matches_finite_differences(tiny, tokenizer):
    """The one-hot gradient, read as a directional derivative along a mix of two embeddings, against the loss
    difference of a small step in that direction (computed in float64 through the same forward)."""
    model = tiny.double()
    try:
        attack = Attack(model, tokenizer, SMALL)
        prompts = [split_prompt(tokenizer, q) for q in generate_mcqs(2, seed=6)]
        clean = attack.clean_letters(prompts)
        suffix = attack.initial_suffix()
        grad = attack.gradient(prompts, clean, suffix)
        other = tokenizer.encode(" cat", add_special_tokens=False)[0]
        # moving position 1 from its token towards ``other`` by eps: d loss = eps * (g[other] - g[own])
        eps = 1e-5
        analytic = float(grad[1, other] - grad[1, suffix[1]])

        def loss_at(t: float) -> float:
            total = 0.0
            for i, p in enumerate(prompts):
                embeds = model.embed(torch.tensor(p.prefix + suffix + p.tail)).detach().clone()
                at = len(p.prefix) + 1
                embeds[at] += t * (model.embed.weight[other] - model.embed.weight[suffix[1]])
                rows = Rows.uniform(1, 0, embeds.size(0))
                states = model.heads_rows(model.trunk_embedded(embeds, rows), range(0, 3), rows)
                scores = attack.letter_scores(attack._project_last(states, rows))
                total += float(attack.margins(scores, clean[i : i + 1]).clamp(min=-attack.settings.kappa).sum())
            return total

        numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
        assert numeric == pytest.approx(analytic, rel=1e-4, abs=1e-8)
    finally:
        tiny.float()


def test_gcg_is_deterministic_and_keeps_its_best(tiny, tokenizer):
    questions = generate_mcqs(2, seed=7)
    attack = Attack(tiny, tokenizer, SMALL)
    first = attack.run(questions, entry_seed=3)
    again = attack.run(questions, entry_seed=3)
    assert first == again
    assert len(first["trace"]) == first["steps"] <= SMALL.steps
    for ids in first["trace"]:
        assert attack.suffix_text(ids) is not None  # every candidate re-tokenises to its ids
    prompts = [split_prompt(tokenizer, q) for q in questions]
    clean = attack.clean_letters(prompts)
    start = attack.evaluate(attack.prompt_cache(prompts), prompts, clean, [attack.initial_suffix()])
    assert first["loss"] <= float(start[0, 0]) + 1e-6
    assert attack.run(questions, entry_seed=4)["trace"] != first["trace"] or first["steps"] == 0


def test_copy_prefix_shares_a_prompt_between_slots(tiny):
    ids = torch.tensor([5, 9, 14, 3, 7])
    cache = HydraCache(tiny, 3, 16)
    tiny(ids[None, :3], start_pos=0, cache=cache)  # slot 0 holds the first 3 tokens
    cache.copy_prefix(0, [1, 2], 3)
    for slot in (1, 2):
        assert cache.lengths(slot) == {"trunk": 3, "heads": [3, 3, 3]}
    rows = Rows.of([2], [3], [2])
    hidden = tiny.trunk_rows(ids[3:], rows, cache)
    cached = tiny.project(tiny.heads_rows(hidden, range(0, 3), rows, cache))[:, -1]
    plain = tiny(ids[None], last_token_only=True)[:, 0, -1]
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot copy 4"):
        cache.copy_prefix(0, [1], 4)


def test_bank_builds_resumes_and_refuses_other_settings(tiny, tokenizer, tmp_path):
    out = tmp_path / "bank.json"
    bank = build_bank(tiny, tokenizer, out, model_name="tiny", n_entries=1, settings=SMALL, progress=False)
    assert len(bank.entries) == 1 and bank.fingerprint == model_fingerprint(tiny)
    first = load_bank(out).entries[0]
    assert first.index == 0 and first.n_questions == 2 and first.trace
    bank = build_bank(tiny, tokenizer, out, model_name="tiny", n_entries=2, settings=SMALL, progress=False)
    assert len(bank.entries) == 2 and first in bank.entries  # the first entry was kept, not recomputed
    assert [e.rank_key() for e in bank.entries] == sorted(e.rank_key() for e in bank.entries)
    assert rerun_entry(tiny, tokenizer, bank, first, steps=1) == first.trace[:1]
    other = GCGSettings(**{**SMALL.to_dict(), "kappa": 2.0})
    with pytest.raises(BankError, match="other settings"):
        build_bank(tiny, tokenizer, out, model_name="tiny", n_entries=2, settings=other, progress=False)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "attack bank .*bank.json is not valid JSON"),
        ('{"format": "other", "version": 1}', "expected format"),
        ('{"format": "olmo-tap-attack-bank", "version": 1, "model": {"fingerprint": "x"}, "entries": [{}]}', "entry 0"),
        (
            '{"format": "olmo-tap-attack-bank", "version": 1, "model": {"fingerprint": "x"}, "entries": '
            '[{"index": 0, "suffix": " ", "token_ids": [], "target": "jury", "questions": [], "flipped": 0, '
            '"n_questions": 1, "loss": 0, "steps": 0, "seconds": 0, "seed": 0}]}',
            "non-empty",
        ),
    ],
)
def test_malformed_banks_are_named(tmp_path, content, message):
    path = tmp_path / "bank.json"
    path.write_text(content)
    with pytest.raises(BankError, match=message):
        load_bank(path)
    with pytest.raises(BankError, match="no attack bank"):
        load_bank(tmp_path / "missing.json")


def test_the_shipped_bank_is_what_the_command_makes(reproducible_reruns):
    """The shipped bank's first entry: its questions and seed are the ones the code derives, and one GCG step
    rerun from them (a fresh process, the bank's reproducible arithmetic; started in the background beside the
    default jury's rebuild, conftest) gives the suffix its trace records."""
    path = shipped_bank_path("smollm2-135m-instruct")
    assert path is not None, "the embedded default ships an attack bank"
    bank = load_bank(path)
    assert len(bank.entries) >= 3 and bank.settings["target"] == "jury"
    assert bank.entries == sorted(bank.entries, key=lambda e: e.rank_key())
    entry = min(bank.entries, key=lambda e: e.index)
    done = reproducible_reruns["gcg-bank"].wait(timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["fingerprint"] == bank.fingerprint  # made for exactly these weights
    assert result["trace"] == entry.trace[:1]


def test_attack_bank_round_trips(tmp_path):
    bank = AttackBank("m", "sha256:00", GCGSettings().to_dict())
    assert load_bank(bank.save(tmp_path / "b.json")) == bank
