"""The native RMSNorm (olmo_tap/model/norm.cpp): right against torch's and transformers' norms, each row's bits
independent of the rest of the call and of the CPU's vector width, its route forced, recorded and replayed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import letter_jury

from olmo_tap.inference.poe import PoE
from olmo_tap.inference.transcript import transcript_dict
from olmo_tap.model import layers, native_norm
from olmo_tap.verify.forgery import restamp
from olmo_tap.verify.poe_audit import audit_poe

DIM = 83  # not a multiple of 16: the lanes' tail runs too


@pytest.fixture(scope="module")
def op():
    why = native_norm._KERNEL.available()
    assert why is None, why  # a C++ compiler is part of the set-up: the build must work
    return torch.ops.olmo_tap.rms_norm_rows


def data(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize(
    ("x_shape", "w_shape"),
    [
        ((1, DIM), (DIM,)),  # a decode step, one weight
        ((3, 5, DIM), (3, 1, DIM)),  # a weight per tower, over each tower's tokens
        ((1, 7, DIM), (7, DIM)),  # a weight per token (rows each through their own head)
        ((2, 4, DIM), (DIM,)),
    ],
)
def test_the_op_matches_torch_and_transformers(op, x_shape, w_shape):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, w = data(*x_shape), data(*w_shape, seed=1)
    with torch.no_grad():
        assert native_norm.takes(x, w)
        ours = layers.rms_norm(x, w, 1e-5, False)
        theirs = F.rms_norm(x, (DIM,), None, 1e-5) * w
        torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=2e-6)
        hf = LlamaRMSNorm(DIM, eps=1e-5)
        hf.weight.copy_(w.reshape(-1, DIM)[0])
        torch.testing.assert_close(op(x.contiguous(), w.reshape(-1, DIM)[:1].contiguous(), 1e-5), hf(x))


def test_a_row_gets_the_same_bits_alone_among_others_and_at_any_thread_count(op):
    x, w = data(300, DIM), data(DIM, seed=1)  # enough rows for the call to split across threads
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        together = op(x, w, 1e-6)
        torch.set_num_threads(1)
        for r in (0, 1, 151, 299):
            assert torch.equal(op(x[r : r + 1], w, 1e-6)[0], together[r])
    finally:
        torch.set_num_threads(before)


def test_the_vector_build_gives_the_bits_of_a_build_without_vectors_or_fma(op):
    from native_builds import norm_plain

    why = norm_plain().available()
    assert why is None, why
    for dim in (DIM, 576, 16, 7):
        x, w = data(9, dim, seed=dim), data(3, dim, seed=dim + 1)
        assert torch.equal(op(x, w, 1e-5), torch.ops.olmo_tap_norm_plain.rms_norm_rows(x, w, 1e-5)), dim


@pytest.mark.parametrize(
    ("x", "w", "match"),
    [
        (torch.zeros(2, DIM, dtype=torch.float64), torch.ones(DIM), "fp32"),
        (torch.zeros(2, DIM), torch.ones(DIM + 1), "last dimension"),
        (torch.zeros(4, DIM), torch.ones(3, DIM), "split evenly"),
        (torch.zeros(2, DIM).t(), torch.ones(2), "contiguous"),
    ],
)
def test_bad_calls_are_refused_by_name(op, x, w, match):
    with pytest.raises(RuntimeError, match=match):
        op(x, w, 1e-5)


def test_only_inference_in_fp32_on_cpu_takes_the_op(op):
    x, w = data(2, 3, DIM), data(DIM, seed=1)
    assert native_norm.takes(x, w)
    assert not native_norm.takes(x.bfloat16(), w.bfloat16())
    assert not native_norm.takes(x.requires_grad_(), w)  # training: autograd needs torch's norm
    # a weight that varies along an inner dimension of x cannot be given per run of rows
    assert not native_norm.takes(data(2, 3, DIM), data(1, 3, DIM))
    y = layers.rms_norm(x, w, 1e-5, False)
    assert y.requires_grad and y.grad_fn is not None


def test_the_route_is_forced_by_the_environment_and_checked(monkeypatch):
    monkeypatch.setenv(native_norm.NORM_ENV, "torch")
    assert "forced" in native_norm.why_not_native()
    assert not native_norm.takes(data(1, DIM), data(DIM))
    with native_norm.route_as("native"):  # a replay takes the transcript's route
        assert native_norm.why_not_native() is None
    monkeypatch.setenv(native_norm.NORM_ENV, "fast")
    with pytest.raises(ValueError, match=native_norm.NORM_ENV):
        native_norm.why_not_native()


def test_a_transcript_from_before_the_route_was_recorded_replays_on_torch_norms(monkeypatch, one_thread):
    model, tokenizer = letter_jury()
    monkeypatch.setenv(native_norm.NORM_ENV, "torch")  # how such a transcript was decoded
    answer = PoE(model, tokenizer, max_new_tokens=10, seed=4, temperature=0.9).generate_with_cache("cab")
    monkeypatch.delenv(native_norm.NORM_ENV)
    old = transcript_dict(answer)
    del old["settings"]["norm"]
    report = audit_poe(restamp(old, tokenizer), model, tokenizer=tokenizer)
    assert report.honest and report.exact, report.reason
