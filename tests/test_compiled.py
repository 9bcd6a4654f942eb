"""The compiled single-tower decode step (olmo_tap.model.compiled): transformers' logits, the eager decoder's
tokens, and its guards. Each compile takes ~10-30 s on a tiny model."""

from __future__ import annotations

import pytest
import torch

from olmo_tap import HydraTransformer
from olmo_tap.inference.poe import PoE
from olmo_tap.model.compiled import CompiledTower, window_for
from tests.tiny import LetterTokenizer, tiny_hydra


def test_compiled_steps_match_transformers(tiny_checkpoint):
    family, directory, reference = tiny_checkpoint
    model = HydraTransformer.from_pretrained(str(directory), n_heads=3, heads_depth=2)
    ids = torch.randint(3, 101, (1, 14), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = reference(ids).logits[0]  # (14, vocab)
        prompt = 6
        cache = model.new_cache(1, ids.size(1))
        model(ids[:, :prompt], head_indices=[2], cache=cache)  # eager prefill fills a cache
        tower = model.compiled_tower(2, ids.size(1))
        tower.load_cache(cache, 0, prompt)
        for position in range(prompt, ids.size(1)):
            logits = tower.step(int(ids[0, position]), position)
            torch.testing.assert_close(logits, expected[position], atol=1e-4, rtol=0, msg=f"{family} at {position}")


def test_compiled_single_decoder_emits_the_eager_tokens():
    model, tok = tiny_hydra(vocab=6, n_heads=3, heads_depth=1, seed=3), LetterTokenizer(6)
    runs = {
        compiled: PoE(model, tok, max_new_tokens=24, mode="single", head=1, compile=compiled).generate_with_cache(
            "abc", temperature=1.5, seed=8
        )
        for compiled in (False, True)
    }
    eager, compiled = runs[False], runs[True]
    assert len(compiled.token_ids) == 24 and len(set(eager.token_ids)) >= 3  # not one token repeated
    assert compiled.token_ids == eager.token_ids
    assert compiled.token_entropies == pytest.approx(eager.token_entropies, abs=1e-4)
    # a second generation reuses the compiled tower (no new compile) and its window
    tower = model.compiled_tower(1, 30)
    again = PoE(model, tok, max_new_tokens=24, mode="single", head=1, compile=True).generate_with_cache(
        "abc", temperature=1.5, seed=8
    )
    assert again.token_ids == eager.token_ids
    assert model.compiled_tower(1, 30) is tower


def test_compiled_tower_is_rebuilt_when_weights_change_and_guards_its_window():
    model = tiny_hydra(vocab=6, n_heads=2, heads_depth=1)
    tower = model.compiled_tower(0, 10)  # building does not compile: the first step does
    assert tower.window == 128 and model.compiled_tower(0, 100) is tower  # the context caps the window
    with torch.no_grad():
        model.heads[0].w2.add_(0.01)  # e.g. a LoRA merge
    assert not tower.is_current()
    assert model.compiled_tower(0, 10) is not tower
    with pytest.raises(ValueError, match="outside the compiled window"):
        tower.step(1, 128)
    cache = model.new_cache(1, 128)
    with pytest.raises(ValueError, match="no room"):
        tower.load_cache(cache, 0, 128)
    with pytest.raises(ValueError, match="holds 0 positions"):
        model.compiled_tower(0, 10).load_cache(cache, 0, 3)  # nothing prefilled yet
    with pytest.raises(ValueError, match=r"out of range|head"):
        model.compiled_tower(5, 10)
    with pytest.raises(ValueError, match="between 1 and 128"):
        model.compiled_tower(0, 129)
    assert window_for(1, 4096) == 256 and window_for(257, 4096) == 512 and window_for(3000, 2048 + 1024) == 3072


def test_towers_sharing_the_compiled_code_keep_their_own_weights():
    """Compiled steps run with Dynamo's guards skipped (``CompiledTower.draft_step``): towers of other heads and
    windows, built from the same code, called in turn, must each still run their own weights and window."""
    model = tiny_hydra(vocab=6, n_heads=3, heads_depth=1, seed=11)
    ids = torch.tensor([[1, 2, 3, 4, 5, 1, 2, 3, 0, 4, 4, 2]])
    with torch.no_grad():
        expected = {head: model(ids, head_indices=[head])[0, 0] for head in range(3)}  # (positions, vocab)
    towers = [(head, model.compiled_tower(head, ids.size(1))) for head in range(3)]
    towers.append((1, CompiledTower(model, 1, 64)))  # head 1 again, another window
    for position in range(ids.size(1)):
        for head, tower in towers:
            logits = tower.step(int(ids[0, position]), position)
            torch.testing.assert_close(logits, expected[head][position], atol=1e-4, rtol=0, msg=f"{head} {position}")


def test_compile_is_refused_for_naive_decoding_and_batches():
    model, tok = tiny_hydra(vocab=6, n_heads=3), LetterTokenizer(6)
    with pytest.raises(ValueError, match="compile applies to modes 'single' and 'poe'"):
        PoE(model, tok, mode="naive", compile=True)
    decoder = PoE(model, tok, mode="poe", compile=True, max_new_tokens=4)
    with pytest.raises(ValueError, match="compile decodes one sequence at a time"):
        decoder.generate_many(["abc", "bad"], max_batch=2)
    assert len(decoder.generate_many(["abc", "bad"], max_batch=1)) == 2


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_compiled_poe_drafts_give_the_eager_answer(temperature):
    """PoE with compiled draft steps (the draft tower's window; verification eager on the trunk states the
    compiled steps return): the eager answer's tokens, drafts, rejections and signals."""
    model, tok = tiny_hydra(vocab=6, n_heads=4, heads_depth=1, seed=5), LetterTokenizer(6)
    runs = {
        compiled: PoE(model, tok, max_new_tokens=30, gamma=3, draft_head=2, compile=compiled).generate_with_cache(
            "abc", temperature=temperature, seed=4
        )
        for compiled in (False, True)
    }
    eager, compiled = runs[False], runs[True]
    assert len(compiled.token_ids) == 30 and compiled.settings["compile"] is True
    assert compiled.token_ids == eager.token_ids
    assert (compiled.n_rounds, compiled.n_drafted, compiled.n_accepted) == (
        eager.n_rounds, eager.n_drafted, eager.n_accepted,
    )  # fmt: skip
    if temperature > 0:
        assert compiled.n_accepted < compiled.n_drafted  # rejections, so rollbacks over the window happened
    assert compiled.token_entropies == pytest.approx(eager.token_entropies, abs=1e-4)


def test_towers_past_dynamos_recompile_limit_still_compile(monkeypatch):
    """Dynamo counts compiles per code object, not per tower: a process that builds more towers than its limit
    (models, windows, PoE's draft heads) must still get them. Here the default limit is taken as already 1."""
    from olmo_tap.model import compiled

    model = tiny_hydra(vocab=6, n_heads=2, heads_depth=1, seed=7)
    limit = torch._dynamo.config.recompile_limit
    # torch's own patch: pytest's monkeypatch would delete (hide) the config entry on undo
    with torch._dynamo.config.patch(recompile_limit=1):
        first, second = compiled.CompiledTower(model, 0, 64), compiled.CompiledTower(model, 1, 128)
        assert first.step(1, 0).shape == second.step(1, 0).shape  # the second compile of _TowerStep.forward
        monkeypatch.setattr(compiled, "RECOMPILE_LIMIT", 1)
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):  # what the limit did before
            compiled.CompiledTower(model, 1, 32).step(1, 0)
    assert torch._dynamo.config.recompile_limit == limit
