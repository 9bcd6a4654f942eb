"""What every native kernel with a torch twin owes a transcript (the cached attention, the norms): its route is
recorded, replayed exactly, validated, and where the kernel cannot be built decoding takes the torch route."""

from __future__ import annotations

import pytest
from tiny import letter_jury

from olmo_tap.inference.poe import PoE
from olmo_tap.inference.settings import DecodeSettings
from olmo_tap.inference.transcript import transcript_dict
from olmo_tap.model import native_attention, native_norm
from olmo_tap.verify.forgery import restamp
from olmo_tap.verify.poe_audit import audit_poe

# (the route's module, its environment variable, the transcript setting that records it)
ROUTES = [
    pytest.param(native_attention, native_attention.ATTENTION_ENV, "attention", id="attention"),
    pytest.param(native_norm, native_norm.NORM_ENV, "norm", id="norm"),
]


@pytest.mark.parametrize(("module", "env", "field"), ROUTES)
def test_transcripts_record_the_route_and_replay_exactly_on_it(monkeypatch, one_thread, module, env, field):
    model, tokenizer = letter_jury()
    settings = DecodeSettings(gamma=3, max_new_tokens=10, temperature=0.9)
    for route in ("torch", "native"):
        monkeypatch.setenv(env, route)
        answer = PoE(model, tokenizer, settings=settings, seed=5).generate_with_cache("bad cab")
        transcript = transcript_dict(answer)
        assert transcript["settings"][field] == route
        monkeypatch.delenv(env)  # the auditor's default route: native
        report = audit_poe(transcript, model, tokenizer=tokenizer)
        assert report.honest and report.exact, report.reason
    forged = transcript_dict(answer)
    forged["settings"][field] = "gpu"
    with pytest.raises(ValueError, match=field):
        audit_poe(restamp(forged, tokenizer), model, tokenizer=tokenizer)


@pytest.mark.parametrize(("module", "env", "field"), ROUTES)
def test_a_kernel_that_cannot_be_built_leaves_the_torch_route(monkeypatch, tmp_path, one_thread, module, env, field):
    from olmo_tap.native import NativeKernel

    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(module, "_KERNEL", NativeKernel(broken, f"broken_{field}_test", "test kernel"))
    assert module.why_not_native()  # the build error, said in one line
    model, tokenizer = letter_jury()
    assert module.route_for(model) == "torch"
    answer = PoE(model, tokenizer, max_new_tokens=6, seed=2).generate_with_cache("abc")
    assert answer.settings[field] == "torch" and len(answer.token_ids) > 0
