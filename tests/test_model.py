"""The Hydra against transformers' own models: logits, KV cache, rollback, batched heads."""

from __future__ import annotations

import pytest
import torch

from olmo_tap import HydraTransformer, HydraTransformerConfig
from olmo_tap.hydra import contiguous_runs

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
        out = model(ids, use_cache=False)
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
        model.init_kv_cache(1, 40)
        prefix = model(ids[:, :10])  # a prefill chunk, then token by token
        steps = [model(ids[:, t : t + 1])[:, 0, 0] for t in range(10, 30)]
        decoded = torch.cat([prefix[:, 0], torch.stack(steps, dim=1)], dim=1)
        for head in range(n_heads):
            torch.testing.assert_close(decoded[head], ref, atol=TOL, rtol=0, msg=f"{family} head {head}")
        # roll back 7 tokens and decode them again: equal to the fresh run
        model.rollback_kv_cache(7)
        assert model.kv_cache_lengths() == {"trunk": 23, "heads": [23] * n_heads}
        again = model(ids[:, 23:])
        for head in range(n_heads):
            torch.testing.assert_close(again[head, 0], ref[23:], atol=TOL, rtol=0)


def test_selected_heads_run_batched_and_in_requested_order(tiny_checkpoint):
    _, directory, _ = tiny_checkpoint
    model = HydraTransformer.from_pretrained(directory, n_heads=4, heads_depth=2, progress=False)
    with torch.no_grad():  # make the heads differ
        for block in model.heads:
            block.w13.add_(torch.randn_like(block.w13) * 0.05)
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        every = model(ids, use_cache=False)
        chosen = model(ids, head_indices=[3, 0, 1], use_cache=False)
        last = model(ids, head_indices=[2], use_cache=False, last_token_only=True)
    torch.testing.assert_close(chosen, every[[3, 0, 1]])
    torch.testing.assert_close(last[0], every[2, :, -1:])
    assert not torch.allclose(every[0], every[1])
    assert contiguous_runs([3, 0, 1, 2, 5]) == [range(3, 4), range(0, 3), range(5, 6)]


def test_residual_forward_returns_pre_norm_hidden_states(tiny_checkpoint):
    _, directory, _ = tiny_checkpoint
    model = HydraTransformer.from_pretrained(directory, n_heads=3, heads_depth=2, progress=False)
    ids = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits, hidden = model.residual_forward(ids, hidden_head_indices=[2], head_indices=[0, 2], use_cache=False)
        assert hidden.shape == (1, 1, 6, model.base_config.d_model)
        torch.testing.assert_close(model.project(hidden)[0], logits[1])
        # a residual injected at the last position changes only that position's logits
        residual = torch.zeros(1, 6, model.base_config.d_model)
        residual[0, -1] = 1.0
        shifted = model(ids, residual=residual, head_indices=[0], use_cache=False)
    torch.testing.assert_close(shifted[0, :, :-1], logits[0, :, :-1])
    assert not torch.allclose(shifted[0, :, -1], logits[0, :, -1])


def test_draft_head_runs_ahead_and_sync_realigns(tiny_checkpoint):
    """The PoE pattern: one head decodes ahead of the others on saved trunk states, then all align."""
    _, directory, hf_model = tiny_checkpoint
    model = HydraTransformer.from_pretrained(directory, n_heads=3, heads_depth=2, progress=False)
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(5))
    ref = reference_logits(hf_model, ids)[0]
    with torch.no_grad():
        model.init_kv_cache(1, 16)
        model(ids[:, :8])
        trunk_states = [model.forward_trunk(ids[:, t : t + 1]) for t in range(8, 12)]
        for h in trunk_states:
            model.forward_heads(h, head_indices=[0])
        assert model.kv_cache_lengths() == {"trunk": 12, "heads": [12, 8, 8]}
        verify = model.forward_heads(torch.cat(trunk_states, dim=1), head_indices=[1, 2])
        torch.testing.assert_close(verify[:, 0], ref[8:].expand(2, -1, -1), atol=TOL, rtol=0)
        model.sync_kv_cache(10)
        assert model.kv_cache_lengths() == {"trunk": 10, "heads": [10, 10, 10]}
        again = model(ids[:, 10:12])
    torch.testing.assert_close(again[:, 0], ref[10:].expand(3, -1, -1), atol=TOL, rtol=0)


def test_omit_last_keeps_the_uncertainty_head_uncached(tiny_checkpoint):
    _, directory, hf_model = tiny_checkpoint
    model = HydraTransformer.from_pretrained(directory, n_heads=3, heads_depth=2, progress=False)
    ids = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        model.init_kv_cache(1, 16, omit_last=True)
        cached = model(ids, head_indices=[0, 1])
        assert model.kv_cache_lengths() == {"trunk": 7, "heads": [7, 7, 0]}
        model.sync_kv_cache(0)
        # the uncached head attends over the chunk it is given, from position 0
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
        model.init_kv_cache(1, 16)
        out = model(ids).float()
    ref = reference_logits(hf_model, ids)
    assert (out[0] - ref).abs().max() < 0.1
