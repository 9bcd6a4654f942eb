"""The batched engine: many sequences in one cache, each answer what it is alone (batch invariance), and the
service's continuous batching."""

from __future__ import annotations

import threading

import pytest
import torch
from tiny import LetterTokenizer, tiny_hydra

from olmo_tap import HydraTransformerConfig, TransformerConfig
from olmo_tap.engine.batch import BatchRunner, Prefill, Step, Verify, batch_invariant, due
from olmo_tap.inference.poe import PoE
from olmo_tap.inference.settings import DecodeSettings
from olmo_tap.inference.transcript import transcript_dict
from olmo_tap.model import kernels, layers, native_linear
from olmo_tap.model.kv_cache import Rows
from olmo_tap.verify.poe_audit import audit_poe

PROMPTS = ["abc", "fed", "bad cab", "a", "ccc", "deaf", "ace", "bead be"]


@pytest.fixture(params=["native", "onednn"])
def packed(monkeypatch, request):
    """Every linear layer of a tiny model on packed weights (the batch-invariant kernels on CPU): olmo-tap's native
    fp32 kernel, then oneDNN's (whose lone rows batch arithmetic pads)."""
    monkeypatch.setattr(layers, "PACK_MIN_ELEMENTS", 0)
    monkeypatch.setenv(native_linear.LINEAR_ENV, request.param)
    kernels.set_kernel_path(None)
    if request.param == "native" and not native_linear.takes_native():
        pytest.skip(f"the native fp32 kernel does not build here: {native_linear.why_not_native()}")
    yield request.param
    kernels.set_kernel_path(None)


class GatedLetters(LetterTokenizer):
    """Holds every decode until ``gate`` opens (class-level, so the service's copy shares it)."""

    gate = threading.Event()

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        GatedLetters.gate.wait(60)
        return super().decode(ids, skip_special_tokens)


def jury(vocab: int = 6):
    return tiny_hydra(vocab=vocab, n_heads=4, heads_depth=1, seed=3), LetterTokenizer(vocab, eos_token_id=5)


def same_answer(a, b) -> None:
    """Every field but timings, bit for bit (floats compared exactly)."""
    left, right = a.to_dict(), b.to_dict()
    for timing in ("elapsed_s", "tokens_per_second"):
        left.pop(timing), right.pop(timing)
    assert left == right


def alone(decoder: PoE, *args, **kwargs):
    """The answer decoded as a batch of one (in batch arithmetic, as an audit replays a batched answer)."""
    stream = decoder.stream(*args, batched=True, **kwargs)
    for _ in stream:
        pass
    return stream.output


@pytest.mark.parametrize("mode", ["poe", "naive", "single"])
def test_batched_answers_equal_each_answer_alone(packed, one_thread, mode):
    model, tokenizer = jury()
    assert batch_invariant(model)
    decoder = PoE(model, tokenizer, settings=DecodeSettings(mode=mode, gamma=3, max_new_tokens=12, temperature=1.0))
    seeds = list(range(11, 11 + len(PROMPTS)))
    # 3 slots for 8 prompts: answers join as others finish, at different positions and rounds
    batched = decoder.generate_many(PROMPTS, max_batch=3, seeds=seeds)
    for prompt, seed, answer in zip(PROMPTS, seeds, batched, strict=True):
        assert answer.settings["batched"]
        same_answer(answer, alone(decoder, prompt, seed=seed))


def test_a_verification_waits_while_the_batch_drafts_up_to_its_patience():
    def verify(patience: int) -> Verify:
        return Verify(0, torch.zeros(2, 4), 5, [1, 2], patience)

    draft, plain = Step(1, 3, 7, range(0, 1), draft=True), Step(1, 3, 7, range(0, 2))
    v = verify(2)
    assert due([draft, v]) == [True, False] and v.waited == 1
    assert due([draft, v]) == [True, False] and v.waited == 2
    assert due([draft, v]) == [True, True]  # its patience is spent
    assert due([plain, verify(2)]) == [True, True]  # a plain step pays the trunk pass every call anyway
    assert due([draft, plain, verify(3)]) == [True, True, True]
    assert due([verify(2), verify(1), Prefill(2, [1, 2], range(0, 4))]) == [True, True, True]


def test_verifications_of_a_batch_come_together_and_change_no_token(packed, one_thread, monkeypatch):
    """Answers join mid-round (3 slots for 8 prompts) and rounds end early at drafted ends of text: with
    verifications waiting for the others' drafts, no call pays a verification pass beside a trunk pass of drafts,
    fewer calls verify, and every answer is the same as without waiting."""
    model, tokenizer = jury()
    decoder = PoE(model, tokenizer, settings=DecodeSettings(gamma=3, max_new_tokens=12, temperature=1.0))
    seeds = list(range(31, 31 + len(PROMPTS)))
    calls: list[tuple[bool, bool]] = []
    run = BatchRunner.run

    def spy(self, ops):
        calls.append((any(isinstance(op, Step) for op in ops), any(isinstance(op, Verify) for op in ops)))
        return run(self, ops)

    monkeypatch.setattr(BatchRunner, "run", spy)
    waiting = decoder.generate_many(PROMPTS, max_batch=3, seeds=seeds)
    mixed_waiting, verify_calls_waiting = calls.count((True, True)), sum(v for _, v in calls)
    calls.clear()
    monkeypatch.setattr("olmo_tap.inference.poe.due", lambda ops: [True] * len(ops))
    eager = decoder.generate_many(PROMPTS, max_batch=3, seeds=seeds)
    assert mixed_waiting == 0 < calls.count((True, True))  # with waiting no call pays both passes
    assert verify_calls_waiting < sum(v for _, v in calls)
    for a, b in zip(waiting, eager, strict=True):
        same_answer(a, b)


def test_a_batched_transcript_passes_the_exact_audit(packed, one_thread):
    model, tokenizer = jury()
    decoder = PoE(model, tokenizer, settings=DecodeSettings(gamma=4, max_new_tokens=10, temperature=0.9))
    answers = decoder.generate_many(PROMPTS[:4], max_batch=4, seeds=[1, 2, 3, 4])
    for answer in answers:
        transcript = transcript_dict(answer)
        assert transcript["settings"]["batch_invariant"] is True and transcript["settings"]["linear"] == packed
        report = audit_poe(transcript, model, tokenizer=tokenizer)
        assert report.honest and report.exact, report.reason
        forged = transcript_dict(answer)
        forged["token_ids"][0] = (forged["token_ids"][0] + 1) % 5  # another letter, never the end of text
        assert not audit_poe(forged, model, tokenizer=tokenizer).honest


def test_unpacked_kernels_are_reported_as_batch_dependent(one_thread, monkeypatch):
    monkeypatch.setattr(layers, "PACK_MIN_ELEMENTS", 1 << 30)
    model, tokenizer = jury()
    assert not batch_invariant(model)
    decoder = PoE(model, tokenizer, max_new_tokens=4, seed=1)
    answer = decoder.generate_many(["abc", "de"], max_batch=2)[0]
    assert answer.settings["batched"] and answer.settings["batch_invariant"] is False


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "olmo2"])
def test_one_pass_of_rows_each_through_its_own_head_gives_each_row_its_heads_bits(packed, one_thread, family):
    """A batch's draft steps: rows with heads 0, 0, 2, 3, 3 in one pass, each row the bits of a pass of its head
    alone, and the same keys and values in the cache (OLMo-2: with its per-head q and k norms)."""
    config = TransformerConfig(family, 6, 32, 2, 4, 2, 8, 48, 10000.0, 1e-5, False, 128)
    torch.manual_seed(3)
    model = HydraTransformerConfig.split(config, 4, 1).build().eval()
    for block in [*model.trunk, *model.heads]:
        block.reset_parameters(std=0.1)
    for norm in model.heads.modules():  # every head's norms its own (a fresh model's are all ones)
        if isinstance(norm, layers.RMSNorm):
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=torch.Generator().manual_seed(7)) + 0.5)
    towers = [0, 0, 2, 3, 3]
    together, apart = model.new_cache(5, 16), model.new_cache(5, 16)
    prompt = Rows.uniform(5, 0, 4)
    ids = torch.randint(0, 6, (20,), generator=torch.Generator().manual_seed(2))
    for cache in (together, apart):
        model.heads_rows(model.trunk_rows(ids, prompt, cache), range(0, 4), prompt, cache)
    step = Rows.of(range(5), [4] * 5, [1] * 5)
    states = torch.randn(5, model.base_config.d_model, generator=torch.Generator().manual_seed(3))
    one_pass = model.heads_rows_each(states, towers, step, together)
    for head, members in ((0, [0, 1]), (2, [2]), (3, [3, 4])):
        rows = Rows.of(members, [4] * len(members), [1] * len(members))
        alone = model.heads_rows(states[members], range(head, head + 1), rows, apart)[0]
        assert torch.equal(one_pass[members], alone)
        assert together.lengths(members[0])["heads"][head] == 5
        for a, b in zip(together.heads, apart.heads, strict=True):  # the keys and values it wrote at position 4
            for slot in members:
                assert torch.equal(a.k[slot, head, :, 4], b.k[slot, head, :, 4])
                assert torch.equal(a.v[slot, head, :, 4], b.v[slot, head, :, 4])
    with pytest.raises(ValueError, match="next to each other"):
        model.heads_rows_each(states, [0, 2, 0, 3, 3], step, together)


@torch.no_grad()
def test_a_verification_runs_its_own_verifiers_with_the_bits_of_every_head_run_together(packed, one_thread):
    """Three answers verified in one call, each by the heads other than its drafter (and one of 3 positions, one of
    2): each gets the states and logits a pass of every text head over all of them gives, its verifiers' caches
    hold the positions, and its drafter's cache is left as its draft steps left it."""
    model = HydraTransformerConfig.split(TransformerConfig("olmo2", 6, 32, 2, 4, 2, 8, 48, 1e4, 1e-5, False, 64), 4, 1)
    torch.manual_seed(5)
    model = model.build().eval()
    for block in [*model.trunk, *model.heads]:
        block.reset_parameters(std=0.1)
    runner_cache, reference = model.new_cache(3, 16), model.new_cache(3, 16)
    prompt = Rows.uniform(3, 0, 4)
    ids = torch.randint(0, 6, (12,), generator=torch.Generator().manual_seed(1))
    for cache in (runner_cache, reference):
        model.heads_rows(model.trunk_rows(ids, prompt, cache), range(0, 4), prompt, cache)
    g = [3, 2, 3]
    d = model.base_config.d_model
    states = [torch.randn(n, d, generator=torch.Generator().manual_seed(9 + i)) for i, n in enumerate(g)]
    verifiers = [[1, 2, 3], [0, 2, 3], [3, 0, 1]]  # drafters 0, 1 and 2 (an op's heads in any order)
    results = BatchRunner(model, runner_cache).run([Verify(i, states[i], 4, verifiers[i]) for i in range(3)])
    rows = Rows.of(range(3), [4] * 3, g)
    every = model.heads_rows(torch.cat(states), range(0, 4), rows, reference)  # (4 heads, tokens, d)
    first = 0
    for i, result in enumerate(results):
        expected = every[verifiers[i], first : first + g[i]]
        assert torch.equal(result.hidden, expected)
        assert torch.equal(result.logits, model.project(expected))
        first += g[i]
        lengths = runner_cache.lengths(i)["heads"]
        assert [lengths[h] for h in verifiers[i]] == [4 + g[i]] * 3 and lengths[i] == 4  # drafter i: untouched


def test_a_slot_is_released_and_reused(packed, one_thread):
    model, tokenizer = jury()
    cache = model.new_cache(2, 32)
    runner = BatchRunner(model, cache)
    decoder = PoE(model, tokenizer, max_new_tokens=5, seed=4, temperature=0.0)
    first = decoder.start("abc", cache=cache, slot=1)
    events, op = first.advance()
    while op is not None:
        for event in events:
            first.deliver(event)
        events, op = first.advance(runner.run([op])[0])
    assert cache.lengths(1)["trunk"] > 0
    cache.release(1)
    assert cache.lengths(1) == {"trunk": 0, "heads": [0, 0, 0, 0]}
    with pytest.raises(ValueError, match="gap"):
        model(torch.tensor([[1]]), start_pos=3, cache=cache)  # slot 0: nothing written yet


def test_decode_settings_are_validated_and_round_trip():
    settings = DecodeSettings(mode="naive", gamma=2, temperature=None, veto_threshold=0.01, seed=5)
    assert settings.temperature == 0.0
    assert DecodeSettings.from_dict({**settings.to_dict(), "dtype": "float32"}) == settings
    for bad, match in (
        ({"mode": "vote"}, "mode must be"),
        ({"gamma": 0}, "gamma"),
        ({"temperature": -1}, "temperature"),
        ({"veto_threshold": 1.5}, "veto_threshold"),
        ({"mode": "naive", "compile": True}, "compile"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"seed": -2}, "seed"),
    ):
        with pytest.raises(ValueError, match=match):
            DecodeSettings(**bad)


def test_the_service_decodes_concurrent_requests_together_and_each_as_alone(packed):
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from olmo_tap.serve.app import create_app
    from olmo_tap.serve.config import ServeConfig
    from olmo_tap.serve.live import LiveServer

    model, tokenizer = jury()
    GatedLetters.gate.clear()  # the worker holds the first request until all four have arrived
    app = create_app(model, GatedLetters(6, eos_token_id=5), "tiny", ServeConfig(queue_size=4, max_batch=4))
    prompts = ["abc", "dead", "cab", "bead"]
    with LiveServer(app) as server:

        def ask(i: int) -> dict:
            body = {"messages": [{"role": "user", "content": prompts[i]}], "max_tokens": 24, "seed": 40 + i,
                    "temperature": 1.0, "stream": i % 2 == 1}  # fmt: skip
            if i % 2 == 0:
                return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()["trust"]
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
                chunks = [line for line in response.iter_lines() if line.startswith("data: {")]
            return __import__("json").loads(chunks[-1].removeprefix("data: "))["trust"]

        with ThreadPoolExecutor(4) as pool:
            asked = pool.map(ask, range(4))
            while True:
                queue = httpx.get(server.url + "/health").json()["queue"]
                if queue["running"] + queue["waiting"] == 4:
                    break
            GatedLetters.gate.set()
            trusts = list(asked)
        health = httpx.get(server.url + "/health").json()["queue"]
    assert health["max_batch"] == 4 and health["completed"] == 4 and health["batch"] == 0
    assert health["mean_batch"] > 1  # the answers shared steps
    decoder = PoE(model, tokenizer, max_new_tokens=24)
    for i, trust in enumerate(trusts):
        transcript = trust["transcript"]
        one = alone(decoder, messages=[{"role": "user", "content": prompts[i]}], seed=40 + i, temperature=1.0)
        assert transcript["token_ids"] == one.token_ids
        assert transcript["settings"]["batched"] and transcript["settings"]["batch_invariant"]
        assert audit_poe(transcript, model, tokenizer=tokenizer).honest


def test_events_carry_their_rounds_and_the_output_is_their_fold(one_thread):
    model, tokenizer = jury()
    decoder = PoE(model, tokenizer, gamma=3, max_new_tokens=14, seed=2, temperature=1.0)
    stream = decoder.stream("abc")
    events = list(stream)
    output = stream.output
    rounds: dict[int, list] = {}
    for event in events:
        rounds.setdefault(event.round, []).append(event)
    assert sorted(rounds) == list(range(output.n_rounds)) and output.n_drafted == len(events)
    for members in rounds.values():
        # a round emits its drafts up to the first rejection, whose resampled token ends it
        assert len(members) <= members[0].drafted <= 3
        assert all(not e.resampled for e in members[:-1])
        assert len(members) == members[0].drafted or members[-1].resampled
    assert output.n_accepted == sum(not e.resampled for e in events)
    assert [e.token_id for e in events] == output.token_ids


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("batched", "yes", "batched"),
        ("batch_invariant", 0, "batch_invariant"),
        ("head", 2, "head"),
        ("ignore_eos", True, "ignore_eos"),
        ("top_logprobs", 99, "top_logprobs"),
    ],
)
def test_the_new_settings_of_a_transcript_are_checked(one_thread, name, value, match):
    from olmo_tap.verify.forgery import restamp

    model, tokenizer = jury()
    answer = PoE(model, tokenizer, max_new_tokens=5, seed=1, draft_head=0).generate_many(["abc"], max_batch=2)[0]
    forged = transcript_dict(answer)
    forged["settings"] = {**forged["settings"], name: value}
    with pytest.raises(ValueError, match=match):
        audit_poe(restamp(forged, tokenizer), model, tokenizer=tokenizer)
