"""olmo-tap's native fp32 product: right against float64, the same bits for a row whatever shares its call, on any
thread count and vector width; decoding records it, and an audit replays on the route its transcript names."""

from __future__ import annotations

import pytest
import torch
from tiny import LetterTokenizer, tiny_hydra

from olmo_tap.inference.poe import PoE
from olmo_tap.inference.settings import DecodeSettings
from olmo_tap.inference.transcript import check_transcript, content_digest, transcript_dict
from olmo_tap.model import kernels, layers, native_linear
from olmo_tap.verify.poe_audit import audit_poe
from tests.native_builds import linear_variant


@pytest.fixture(autouse=True)
def kernel_builds():
    """Built at the first test (not at collection); a machine without a compiler skips with the reason."""
    if not native_linear.takes_native():
        pytest.skip(f"the native fp32 kernel does not build here: {native_linear.why_not_native()}")


SHAPES = [(1, 1), (5, 7), (64, 33), (576, 192), (576, 130), (1536, 576), (37, 3072)]  # (in, out)


def operands(n_in: int, out: int, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # activations spread over orders of magnitude, as a model's are
    x = torch.randn(rows, n_in, generator=g) * torch.rand(rows, n_in, generator=g).pow(4) * 10
    return x, torch.randn(out, n_in, generator=g)


@pytest.mark.parametrize(("n_in", "out"), SHAPES)
def test_products_are_within_the_bound_of_one_fp32_chain_of_a_float64_product(n_in, out):
    """A chain of K fused multiply-adds errs by at most ~K * 2^-24 times the sum of the terms' magnitudes."""
    x, w = operands(n_in, out, 11)
    y = native_linear.product(x, native_linear.pack(w), out)
    exact = x.double() @ w.double().T
    bound = (n_in + 1) * 2.0**-24 * (x.double().abs() @ w.double().abs().T) + 1e-30
    assert y.shape == (11, out) and y.dtype == torch.float32
    assert ((y.double() - exact).abs() <= bound).all()
    # F.linear (another summation order) lies within the same bound: the two agree to twice it
    assert ((y.double() - torch.nn.functional.linear(x, w).double()).abs() <= 2 * bound).all()


def test_a_row_gets_the_same_bits_whatever_shares_its_call_and_however_many_threads():
    for n_in, out in SHAPES:
        x, w = operands(n_in, out, 70, seed=1)
        packed = native_linear.pack(w)
        everything = native_linear.product(x, packed, out)
        for start, stop in [(0, 1), (3, 4), (0, 2), (5, 13), (0, 9), (17, 50), (69, 70)]:
            assert torch.equal(native_linear.product(x[start:stop], packed, out), everything[start:stop]), (
                f"{n_in}->{out}, rows {start}:{stop}"
            )
        with kernels.torch_threads(1):
            assert torch.equal(native_linear.product(x, packed, out), everything)


def test_every_vector_path_gives_the_same_bits():
    """Machines differ (AVX-512 one day, AVX2 the next, another architecture): builds without AVX-512, and
    without any vector path, must give this build's bits."""
    paths = ["plain"] + (["avx2"] if native_linear.vector_path() == "avx512" else [])
    for path in paths:
        build = linear_variant(path)
        assert build.available() is None, build.available()
        ops = getattr(torch.ops, f"olmo_tap_f32_{path}")
        assert ops.mm_f32_path() == path
        for n_in, out in SHAPES:
            for rows in (1, 2, 3, 4, 8, 9, 19, 64, 71):  # 64 and more: the wide tiles on AVX-512
                x, w = operands(n_in, out, rows, seed=rows)
                theirs = ops.mm_f32(x, ops.pack_f32(w), out)
                assert torch.equal(native_linear.product(x, native_linear.pack(w), out), theirs), (path, n_in, out)


def test_bad_operands_are_refused_by_name():
    packed = native_linear.pack(torch.randn(40, 64))
    with pytest.raises(RuntimeError, match="x has 32 inputs, the packed weight 64"):
        native_linear.product(torch.randn(2, 32), packed, 40)
    with pytest.raises(RuntimeError, match="out does not match"):
        native_linear.product(torch.randn(2, 64), packed, 80)
    with pytest.raises(RuntimeError, match="fp32"):
        native_linear.product(torch.randn(2, 64).double(), packed, 40)


@pytest.fixture
def tiny_packed(monkeypatch):
    """A tiny model's weights all packed (as a real model's are), the route left to the environment."""
    monkeypatch.setattr(layers, "PACK_MIN_ELEMENTS", 0)
    monkeypatch.delenv(native_linear.LINEAR_ENV, raising=False)
    kernels.set_kernel_path(None)
    model = tiny_hydra(vocab=6, n_heads=3, heads_depth=1, seed=4)
    decoder = PoE(model, LetterTokenizer(6, eos_token_id=5), settings=DecodeSettings(max_new_tokens=8, seed=3))
    yield model, decoder
    kernels.set_kernel_path(None)


def test_decoding_records_its_route_and_the_audit_replays_on_it(tiny_packed, monkeypatch):
    model, decoder = tiny_packed
    tokenizer = decoder.tokenizer
    answer = decoder.generate_with_cache("bad cab")
    assert answer.settings["linear"] == native_linear.route_for(model) == "native"
    assert model._packed_lm_head.current.route == "native"
    report = audit_poe(transcript_dict(answer), model, tokenizer=tokenizer)
    assert report.honest and report.exact, report.reason

    # decoded on oneDNN: recorded so; the audit, whose own default is native, replays on oneDNN and is exact
    monkeypatch.setenv(native_linear.LINEAR_ENV, "onednn")
    if kernels.onednn_refusal(torch.float32) is None:
        onednn = decoder.generate_with_cache("bad cab")
        assert onednn.settings["linear"] == "onednn" and model._packed_lm_head.current.route == "onednn"
        monkeypatch.delenv(native_linear.LINEAR_ENV)
        report = audit_poe(transcript_dict(onednn), model, tokenizer=tokenizer)
        assert report.honest and report.exact, report.reason
        assert native_linear.route_for(model) == "native"  # the replay's forced route ended with it
    monkeypatch.delenv(native_linear.LINEAR_ENV, raising=False)

    # a transcript from stock matmuls (tiny weights, or OLMO_TAP_KERNELS=stock) cannot be replayed exactly here
    stock = transcript_dict(answer)
    stock["settings"]["linear"] = stock["output"]["settings"]["linear"] = "stock"
    stock["digest"] = content_digest(stock)  # the claim a generator makes (a signature binds it)
    report = audit_poe(stock, model, tokenizer=tokenizer)
    assert report.honest and not report.exact
    assert any("stock products run native here" in note for note in report.notes)


def test_a_bad_route_is_refused(tiny_packed, monkeypatch):
    _, decoder = tiny_packed
    transcript = transcript_dict(decoder.generate_with_cache("ace"))
    transcript["settings"]["linear"] = "fastest; rm -rf /"
    with pytest.raises(ValueError, match=r"setting .linear. must be native, onednn, stock"):
        check_transcript(transcript)
    monkeypatch.setenv(native_linear.LINEAR_ENV, "mkl")
    with pytest.raises(ValueError, match="OLMO_TAP_LINEAR must be one of auto, native, onednn"):
        decoder.generate_with_cache("ace")
