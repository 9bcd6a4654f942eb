"""The Hydra against transformers' own models: logits, KV cache, rollback, batched heads."""

from __future__ import annotations

import pytest
import torch

from olmo_tap import HydraTransformer, HydraTransformerConfig
from olmo_tap.hydra import contiguous_runs
from olmo_tap.model.kv_cache import Rows

TOL = 1e-4


def reference_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(ids).logits


@pytest.mark.parametrize("n_heads", [1, 3])
def test_prefill_matches_transformers(tiny_checkpoint, n_heads):
    family, directory, hf_model = tiny_checkpoint
    model = HydraTransformer.from_pretrained(directory, n_heads=n_heads, heads_depth=2, progress=False)
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(hf_model, ids)
    with torch.no_grad():
        out = model(ids)
    assert out.shape == (n_heads, 2, 23, hf_model.config.vocab_size)
    for head in range(n_heads):
        torch.testing.assert_close(out[head], ref, atol=TOL, rtol=0, msg=f"{family} head {head}")


@pytest.mark.parametrize("n_heads", [1, 3])
def test_cached_decoding_and_rollback_match_transformers(tiny_checkpoint, n_heads):
    family, directory, hf_model = tiny_checkpoint
    model = HydraTransformer.from_pretrained(directory, n_heads=n_heads, heads_depth=1, progress=False)
    ids = torch.randint(0, hf_model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    ref = reference_logits(hf_model, ids)[0]
    with torch.no_grad():
        cache = model.new_cache(1, 40)
        prefix = model(ids[:, :10], cache=cache)  # a prefill chunk, then token by token
        steps = [model(ids[:, t : t + 1], start_pos=t, cache=cache)[:, 0, 0] for t in range(10, 30)]
        decoded = torch.cat([prefix[:, 0], torch.stack(steps, dim=1)], dim=1)
        for head in range(n_heads):
            torch.testing.assert_close(decoded[head], ref, atol=TOL, rtol=0, msg=f"{family} head {head}")
        assert cache.lengths(0) == {"trunk": 30, "heads": [30] * n_heads}
        # roll back 7 tokens (an integer: the next write starts there) and decode them again
        again = model(ids[:, 23:], start_pos=23, cache=cache)
        assert cache.lengths(0) == {"trunk": 30, "heads": [30] * n_heads}
        for head in range(n_heads):
            torch.testing.assert_close(again[head, 0], ref[23:], atol=TOL, rtol=0)
        with pytest.raises(ValueError, match="gap"):
            model(ids[:, :1], start_pos=31, cache=cache)  # would attend to a never-written position


def test_ragged_rows_in_their_own_slots_match_transformers(tiny_checkpoint):
    """Rows of a flattened batch at different positions and lengths, each in its own slot, as one pass."""
    _family, directory, hf_model = tiny_checkpoint
    model = HydraTransformer.from_pretrained(directory, n_heads=2, heads_depth=1, progress=False)
    gen = torch.Generator().manual_seed(12)
    seqs = [torch.randint(0, hf_model.config.vocab_size, (1, n), generator=gen) for n in (9, 14, 6)]
    refs = [reference_logits(hf_model, s)[0] for s in seqs]
    cuts = [5, 11, 6]  # prefill each sequence alone up to its cut, in slots 2, 0, 1
    slots = [2, 0, 1]
    with torch.no_grad():
        cache = model.new_cache(3, 16)
        for s, cut, slot in zip(seqs, cuts, slots, strict=False):
            if cut:
                rows = Rows.of([slot], [0], [cut])
                model.heads_rows(model.trunk_rows(s[0, :cut], rows, cache), range(2), rows, cache)
        # then one pass: the rest of the first two sequences (4 and 3 tokens) and one token more of the third
        tails = [s[0, cut:] for s, cut in zip(seqs[:2], cuts[:2], strict=False)] + [seqs[2][0, -1:]]
        starts = [cuts[0], cuts[1], 5]
        rows = Rows.of(slots, starts, [t.numel() for t in tails])
        hidden = model.heads_rows(model.trunk_rows(torch.cat(tails), rows, cache), range(2), rows, cache)
        logits = model.project(hidden)
    offset = 0
    for ref, start, tail in zip(refs, starts, tails, strict=False):
        n = tail.numel()
        for head in range(2):
            torch.testing.assert_close(logits[head, offset : offset + n], ref[start : start + n], atol=TOL, rtol=0)
        offset += n


def test_selected_heads_run_batched_and_in_requested_order(tiny_checkpoint):
    _, directory, _ = tiny_checkpoint
    model = HydraTransformer.from_pretrained(directory, n_heads=4, heads_depth=2, progress=False)
    with torch.no_grad():  # make the heads differ
        for block in model.heads:
            block.w13.add_(torch.randn_like(block.w13) * 0.05)
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        every = model(ids)
        chosen = model(ids, head_indices=[3, 0, 1])
        last = model(ids, head_indices=[2], last_token_only=True)
    torch.testing.assert_close(chosen, every[[3, 0, 1]])
    torch.testing.assert_close(last[0], every[2, :, -1:])
    assert not torch.allclose(every[0], every[1])
    assert contiguous_runs([3, 0, 1, 2, 5]) == [range(3, 4), range(0, 3), range(5, 6)]


def test_residual_forward_returns_pre_norm_hidden_states(tiny_checkpoint):
    _, directory, _ = tiny_checkpoint
    model = HydraTransformer.from_pretrained(directory, n_heads=3, heads_depth=2, progress=False)
    ids = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits, hidden = model.residual_forward(ids, hidden_head_indices=[2], head_indices=[0, 2])
        assert hidden.shape == (1, 1, 6, model.base_config.d_model)
        torch.testing.assert_close(model.project(hidden)[0], logits[1])
        # a residual injected at the last position changes only that position's logits
        residual = torch.zeros(1, 6, model.base_config.d_model)
        residual[0, -1] = 1.0
        shifted = model(ids, residual=residual, head_indices=[0])
    torch.testing.assert_close(shifted[0, :, :-1], logits[0, :, :-1])
    assert not torch.allclose(shifted[0, :, -1], logits[0, :, -1])


def test_draft_head_runs_ahead_and_sync_realigns(tiny_checkpoint):
    """The PoE pattern: one head decodes ahead of the others on saved trunk states, then all align."""
    _, directory, hf_model = tiny_checkpoint
    model = HydraTransformer.from_pretrained(directory, n_heads=3, heads_depth=2, progress=False)
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(5))
    ref = reference_logits(hf_model, ids)[0]
    with torch.no_grad():
        cache = model.new_cache(1, 16)
        model(ids[:, :8], cache=cache)
        trunk_states = [model.forward_trunk(ids[:, t : t + 1], t, cache) for t in range(8, 12)]
        for t, h in enumerate(trunk_states, start=8):
            model.forward_heads(h, head_indices=[0], start_pos=t, cache=cache)
        assert cache.lengths(0) == {"trunk": 12, "heads": [12, 8, 8]}
        verify = model.forward_heads(torch.cat(trunk_states, dim=1), head_indices=[1, 2], start_pos=8, cache=cache)
        torch.testing.assert_close(verify[:, 0], ref[8:].expand(2, -1, -1), atol=TOL, rtol=0)
        again = model(ids[:, 10:12], start_pos=10, cache=cache)  # back to 10 for all: an integer
    torch.testing.assert_close(again[:, 0], ref[10:].expand(3, -1, -1), atol=TOL, rtol=0)


def test_the_uncertainty_head_is_never_cached(tiny_checkpoint):
    _, directory, hf_model = tiny_checkpoint
    model = HydraTransformer.from_pretrained(directory, n_heads=3, heads_depth=2, progress=False)
    model.uncertainty_head = 2
    ids = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache = model.new_cache(1, 16)
        cached = model(ids, head_indices=[0, 1], cache=cache)
        with pytest.raises(ValueError, match="uncertainty head runs uncached"):
            model(ids, head_indices=[2], cache=cache)
        both = model(ids)
    torch.testing.assert_close(both[:2], cached)
    torch.testing.assert_close(both[2, 0], reference_logits(hf_model, ids)[0], atol=TOL, rtol=0)


def test_config_factories_have_the_olmo2_shapes():
    small = HydraTransformerConfig.from_olmo2_1B()
    big = HydraTransformerConfig.from_olmo2_7B(n_heads=9, heads_depth=3)
    assert (small.trunk_layers, small.head_layers, small.base_config.d_model) == (13, 3, 2048)
    assert (big.trunk_layers, big.n_heads, big.base_config.ffn_hidden) == (29, 9, 11008)
    # the analytic count equals the count of a built model (meta device: no memory)
    for config in (small, big):
        model = config.build(init_device="meta")
        assert model.num_params() == config.num_params
    # a plain OLMo-2-1B has 1.48B parameters; four extra heads add four copies of 3 layers
    plain = HydraTransformerConfig.from_olmo2_1B(n_heads=1).num_params
    assert 1.47e9 < plain < 1.49e9


def test_bf16_runs_on_cpu(tiny_checkpoint):
    _, directory, hf_model = tiny_checkpoint
    model = HydraTransformer.from_pretrained(directory, n_heads=2, heads_depth=2, dtype="bfloat16", progress=False)
    assert model.dtype == torch.bfloat16
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = model(ids, cache=model.new_cache(1, 16)).float()
    ref = reference_logits(hf_model, ids)
    assert (out[0] - ref).abs().max() < 0.1


def test_the_originals_stateful_calls_still_work_through_compat(tiny_checkpoint):
    """Code written for the original: init_kv_cache, calls that continue where the last ended, rollback, sync."""
    from olmo_tap.compat import StatefulHydra

    _, directory, hf_model = tiny_checkpoint
    model = StatefulHydra(HydraTransformer.from_pretrained(directory, n_heads=3, heads_depth=1, progress=False))
    ids = torch.randint(0, hf_model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(9))
    ref = reference_logits(hf_model, ids)[0]
    with torch.no_grad():
        model.init_kv_cache(1, 24, omit_last=True)
        prefix = model(ids[:, :12])
        steps = [model(ids[:, t : t + 1])[:, 0, 0] for t in range(12, 16)]
        assert model.kv_cache_lengths() == {"trunk": 16, "heads": [16, 16, 0]}
        model.rollback_kv_cache(3)
        again = model(ids[:, 13:20], head_indices=[0, 1])
        model.sync_kv_cache(19)
        last = model(ids[:, 19:], head_indices=[1])
    torch.testing.assert_close(prefix[:, 0], ref[:12].expand(3, -1, -1), atol=TOL, rtol=0)
    torch.testing.assert_close(torch.stack(steps, dim=1)[:2], ref[12:16].expand(2, -1, -1), atol=TOL, rtol=0)
    torch.testing.assert_close(again[:, 0], ref[13:20].expand(2, -1, -1), atol=TOL, rtol=0)
    torch.testing.assert_close(last[0, 0], ref[19:], atol=TOL, rtol=0)


def test_identical_heads_answers_any_subset_and_follows_weight_edits():
    """Which heads are clones is compared once per weight version and answered for any set of heads."""
    from tests.tiny import tiny_hydra

    model = tiny_hydra(n_heads=4)
    assert not model.identical_heads()
    with torch.no_grad():
        for copy, original in zip(model.tower_tensors(2), model.tower_tensors(0), strict=True):
            copy.copy_(original)
    assert model.identical_heads() and model.identical_heads([0, 2]) and model.identical_heads([3, 2, 0])
    assert not model.identical_heads([0, 1, 3]) and not model.identical_heads([1, 2])
    with torch.no_grad():
        model.tower_tensors(2)[0].add_(1.0)  # an in-place edit of the clone: a new weight version
    assert not model.identical_heads([0, 2])


def test_the_rotary_tables_grow_as_decoding_reaches_further(tiny_checkpoint, monkeypatch):
    """The tables cover what has been decoded (not the whole stated context: a file stating 2^32 - 1 positions
    asked for 34 GB of them and failed); growing them gives every position the bits of one full-length build, so
    decoding across each growth still matches transformers."""
    from dataclasses import replace

    from olmo_tap.model import layers

    monkeypatch.setattr(layers, "ROPE_TABLE_POSITIONS", 8)
    family, directory, hf_model = tiny_checkpoint
    model = HydraTransformer.from_pretrained(directory, n_heads=2, heads_depth=1, progress=False)
    assert model.rope_cos.size(0) == 8
    ids = torch.randint(0, hf_model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(4))
    ref = reference_logits(hf_model, ids)[0]
    with torch.no_grad():
        cache = model.new_cache(1, 40)
        prefix = model(ids[:, :5], cache=cache)[0, 0]
        steps = [model(ids[:, t : t + 1], start_pos=t, cache=cache)[0, 0, 0] for t in range(5, 30)]
    torch.testing.assert_close(torch.cat([prefix, torch.stack(steps)]), ref, atol=TOL, rtol=0, msg=family)
    assert model.rope_cos.size(0) == 32  # 8 -> 16 -> 32
    full = layers.rope_tables(model.base_config, positions=model.base_config.max_seq_len)
    assert torch.equal(model.rope_cos, full[0][:32]) and torch.equal(model.rope_signed_sin, full[1][:32])
    huge = HydraTransformerConfig.split(replace(model.base_config, max_seq_len=2**32 - 1), 2, 1).build()
    assert huge.rope_cos.shape == (8, model.base_config.head_dim)


def test_a_cache_the_machine_cannot_hold_is_a_clear_error(tiny_checkpoint, monkeypatch):
    """A long context's cache can ask for more memory than there is (a file stating 2^32 - 1 positions and a
    request for 10^9 new tokens asked for 3.8 TB): the allocator's failure becomes an error naming the size."""
    from olmo_tap.model import kv_cache

    _, directory, _ = tiny_checkpoint
    model = HydraTransformer.from_pretrained(directory, n_heads=2, heads_depth=1, progress=False)

    def refuse(self, *args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 512000002048 bytes.")

    monkeypatch.setattr(kv_cache.LayerCache, "__init__", refuse)
    need = 3 * kv_cache.HydraCache.bytes_per_slot(model, 100) / 2**30
    message = rf"3 sequence\(s\) of up to 100 positions needs {need:.1f} GiB on cpu.*fewer positions"
    with pytest.raises(kv_cache.CacheMemoryError, match=message):
        model.new_cache(3, 100)


def test_grown_rotary_tables_keep_a_cast_models_bits(tiny_checkpoint, monkeypatch):
    """A model cast after loading (``.to(torch.bfloat16)``) holds its tables in that dtype; growing them keeps
    every earlier position's row bit for bit, so a long answer and the audit's shorter replay rotate alike."""
    from olmo_tap.model import layers

    monkeypatch.setattr(layers, "ROPE_TABLE_POSITIONS", 8)
    _, directory, _ = tiny_checkpoint
    model = HydraTransformer.from_pretrained(directory, n_heads=2, heads_depth=1, progress=False).to(torch.bfloat16)
    before = model.rope_cos.clone(), model.rope_signed_sin.clone()
    cos, sin = model.rope_upto(20)
    assert cos.dtype == sin.dtype == torch.bfloat16 and cos.size(0) == 20
    assert torch.equal(cos[:8], before[0]) and torch.equal(sin[:8], before[1])
