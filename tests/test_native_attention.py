"""The native cached attention (olmo_tap/model/attention.cpp): right against torch's own attention, each row's
bits independent of the rest of the call, its route forced, recorded in transcripts and replayed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import letter_jury

from olmo_tap.model import native_attention
from olmo_tap.model.kv_cache import Rows

H, KV, HD = 6, 2, 24  # a head_dim that is not a multiple of 8 runs the dot product's tail too


@pytest.fixture(scope="module")
def kernel():
    why = native_attention._KERNEL.available()
    assert why is None, why  # a C++ compiler is part of the set-up: the build must work
    return native_attention.attend


def random_call(rows, towers=2, cache_towers=3, tower0=1, slots=4, max_len=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = sum(length for _, _, length in rows)
    qk = torch.randn(towers, H + KV, tokens, HD, generator=g)
    v = torch.randn(towers, KV, tokens, HD, generator=g)
    k_cache = torch.randn(slots, cache_towers, KV, max_len, HD, generator=g)
    v_cache = torch.randn(slots, cache_towers, KV, max_len, HD, generator=g)
    return qk, v, k_cache, v_cache, tower0


def reference(qk, v, k_cache, v_cache, tower0, rows):
    """torch's scaled_dot_product_attention per row and tower, over the cache with the new keys written in."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    towers = slice(tower0, tower0 + qk.size(0))
    outs, first = [], 0
    for slot, start, length in rows:
        span = slice(first, first + length)
        k_cache[slot, towers, :, start : start + length] = qk[:, H:, span]
        v_cache[slot, towers, :, start : start + length] = v[:, :, span]
        keys = start + length
        allowed = torch.ones(length, keys, dtype=torch.bool).tril(diagonal=start)
        out = F.scaled_dot_product_attention(
            qk[:, :H, span],
            k_cache[slot, towers, :, :keys],
            v_cache[slot, towers, :, :keys],
            attn_mask=allowed,
            scale=1.0,  # the queries come scaled
            enable_gqa=True,
        )
        outs.append(out.transpose(1, 2).reshape(qk.size(0), length, H * HD))
        first += length
    return torch.cat(outs, dim=1), k_cache, v_cache


ROWS = [(0, 0, 3), (2, 17, 1), (3, 5, 6), (1, 30, 1)]  # (slot, start, length): a prompt, steps, a verification


def test_the_kernel_matches_torch_attention_and_writes_the_cache(kernel):
    qk, v, k_cache, v_cache, tower0 = random_call(ROWS)
    want, want_k, want_v = reference(qk, v, k_cache, v_cache, tower0, ROWS)
    slots, starts, lengths = (tuple(r[i] for r in ROWS) for i in range(3))
    got = kernel(qk, v, k_cache, v_cache, tower0, slots, starts, lengths, H)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)  # new entries copied, nothing else touched


def test_a_compiled_steps_window_attends_as_a_decoding_row(kernel):
    """``attend_window`` (a compiled decode step's attention, its position a tensor) gives a one-token row of
    ``attend`` bit for bit, over the window's keys up to the position (later slots hold stale keys that must not
    count), writes the key and value there, and refuses bad input by name."""
    g = torch.Generator().manual_seed(3)
    window, position = 40, 17
    qk, v = torch.randn(H + KV, 1, HD, generator=g), torch.randn(KV, 1, HD, generator=g)
    k_window, v_window = torch.randn(KV, window, HD, generator=g), torch.randn(KV, window, HD, generator=g)
    k_cache, v_cache = k_window.clone()[None, None], v_window.clone()[None, None]
    want = kernel(qk[None], v[None], k_cache, v_cache, 0, (0,), (position,), (1,), H)
    got = native_attention.attend_window(qk, v, k_window, v_window, torch.tensor([position]), H)
    assert torch.equal(got, want.reshape(1, H * HD))
    assert torch.equal(k_window, k_cache[0, 0]) and torch.equal(v_window, v_cache[0, 0])
    torch_out, _, _ = reference(qk[None], v[None], k_window[None, None], v_window[None, None], 0, [(0, position, 1)])
    assert torch.allclose(got, torch_out.reshape(1, -1), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="positions outside the cache"):
        native_attention.attend_window(qk, v, k_window, v_window, torch.tensor([window]), H)
    with pytest.raises(RuntimeError, match="position must be one int64"):
        native_attention.attend_window(qk, v, k_window, v_window, torch.tensor([1.0]), H)
    with pytest.raises(RuntimeError, match="disagree in shape"):
        native_attention.attend_window(qk, v, k_window, v_window, torch.tensor([1]), H + KV)


# A row deep in its context: each (tower, token, head) then outweighs waking a thread, and the call splits across
# threads (short calls run on the calling thread).
LONG_ROWS = [(0, 0, 3), (2, 4200, 1), (3, 5, 6), (1, 30, 1)]


@pytest.mark.parametrize("rows", [ROWS, LONG_ROWS], ids=["short", "long"])
def test_a_row_gets_the_same_bits_alone_and_among_others_at_any_thread_count(kernel, rows):
    qk, v, k_cache, v_cache, tower0 = random_call(rows, seed=1, max_len=max(s + n for _, s, n in rows))
    slots, starts, lengths = (tuple(r[i] for r in rows) for i in range(3))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        together = kernel(qk, v, k_cache.clone(), v_cache.clone(), tower0, slots, starts, lengths, H)
        torch.set_num_threads(1)
        first = 0
        for slot, start, length in rows:
            span = slice(first, first + length)
            one = kernel(qk[:, :, span], v[:, :, span], k_cache.clone(), v_cache.clone(), tower0, (slot,), (start,),
                         (length,), H)  # fmt: skip
            assert torch.equal(one, together[:, span])
            first += length
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: {**a, "qk": a["qk"].double()}, "fp32"),
        (lambda a: {**a, "slots": (0, 2, 9, 1)}, "slot outside the cache"),
        (lambda a: {**a, "starts": (0, 17, 5, 40)}, "positions outside the cache"),
        (lambda a: {**a, "lengths": (3, 1, 6, 2)}, "more tokens"),
        (lambda a: {**a, "tower0": 2}, "towers outside the cache"),
        (lambda a: {**a, "n_heads": 5}, "multiple of kv heads"),
    ],
)
def test_bad_calls_are_refused_by_name(kernel, change, match):
    qk, v, k_cache, v_cache, tower0 = random_call(ROWS)
    args = dict(qk=qk, v=v, cache_k=k_cache, cache_v=v_cache, tower0=tower0, slots=(0, 2, 3, 1),
                starts=(0, 17, 5, 30), lengths=(3, 1, 6, 1), n_heads=H)  # fmt: skip
    with pytest.raises(RuntimeError, match=match):
        kernel(**change(args))


def test_the_route_is_forced_by_the_environment_and_checked(monkeypatch):
    monkeypatch.setenv(native_attention.ATTENTION_ENV, "torch")
    assert native_attention.attention_route() == "torch"
    assert "forced" in native_attention.why_not_native()
    with native_attention.route_as("native"):  # a replay takes the transcript's route
        assert native_attention.attention_route() == "native"
    monkeypatch.setenv(native_attention.ATTENTION_ENV, "fast")
    with pytest.raises(ValueError, match=native_attention.ATTENTION_ENV):
        native_attention.attention_route()


def test_both_routes_decode_within_rounding_of_each_other(monkeypatch, one_thread):
    model, _ = letter_jury()
    cache = model.new_cache(1, 16)
    ids = torch.tensor([1, 2, 3, 4, 0, 2, 1, 3])

    def logits(route: str) -> torch.Tensor:
        monkeypatch.setenv(native_attention.ATTENTION_ENV, route)
        cache.release(0)
        outs = []
        with torch.no_grad():
            for position, token in enumerate(ids):  # one token at a time: the cached decode-step path
                rows = Rows.of([0], [position], [1])
                trunk = model.trunk_rows(token.view(1), rows, cache)
                outs.append(model.project(model.heads_rows(trunk, range(4), rows, cache)[:, 0]))
        return torch.stack(outs)

    native, plain = logits("native"), logits("torch")
    assert torch.allclose(native, plain, atol=1e-5, rtol=1e-5)


def test_a_build_killed_half_way_does_not_leave_the_next_process_waiting():
    # torch marks a build in progress with a lock file that a killed build never removes; a later load used to wait
    # on it forever, silently. The kernel's own lock (released by the OS with its holder) makes such a file a leftover.
    why = native_attention._KERNEL.available()
    assert why is None, why
    build_dir = Path(native_attention._KERNEL.library).parent
    (build_dir / "lock").touch()
    loads = "from olmo_tap.model import native_attention as a; print(a.why_not_native())"
    done = subprocess.run([sys.executable, "-c", loads], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr[-2000:]
    assert not (build_dir / "lock").exists()
