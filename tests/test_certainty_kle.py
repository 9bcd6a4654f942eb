"""Kernel Language Entropy: the maths against hand-computed cases and scipy's matrix exponential; the samples'
seeds; a transcript's KLE certainty audited, and every edit a forger would make to it caught."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import scipy.linalg
from tiny import LetterTokenizer, tiny_hydra

from olmo_tap.certainty.kle import kernel_language_entropy, kle_certainty
from olmo_tap.certainty.sampled import SAMPLE_TEMPERATURE, kle_record, sample_answers, sample_seeds
from olmo_tap.certainty.similarity import TokenOverlap, checked_support, similarity_matrix
from olmo_tap.inference.poe import PoE
from olmo_tap.inference.settings import DecodeSettings
from olmo_tap.inference.transcript import check_transcript, content_digest, transcript_dict
from olmo_tap.verify import audit_poe

# ----- the maths -------------------------------------------------------------------------------------------------


def entropy_of(eigenvalues: list[float]) -> float:
    return -sum(x * math.log(x) for x in eigenvalues if x > 0)


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_identical_answers_hand_computed(n):
    """W = 2 off the diagonal: L = 2(nI - J) has eigenvalues 0 and 2n (n - 1 times), so K = J/n + e^{-2n}(I - J/n),
    K's diagonal d = 1/n + e^{-2n}(1 - 1/n), and rho = K / (n d) has eigenvalues 1/(n d) and e^{-2n}/(n d)."""
    w = 2.0 * (np.ones((n, n)) - np.eye(n))
    d = 1 / n + math.exp(-2 * n) * (1 - 1 / n)
    expected = entropy_of([1 / (n * d)] + [math.exp(-2 * n) / (n * d)] * (n - 1))
    assert kernel_language_entropy(w) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # with t = 1 the kernel keeps e^{-2n} of the off-cluster directions: N = 2 gives 0.87, the default N = 5 0.9988
    assert kle_certainty(kernel_language_entropy(w), n) > (0.99 if n >= 5 else 0.85)


@pytest.mark.parametrize("n", [2, 5, 8])
def test_mutually_contradicting_answers_have_no_certainty(n):
    w = np.zeros((n, n))
    assert kernel_language_entropy(w) == pytest.approx(math.log(n), abs=1e-12)
    assert kle_certainty(kernel_language_entropy(w), n) == pytest.approx(0.0, abs=1e-12)


def test_two_clusters_hand_computed():
    """Two pairs of identical answers, the pairs unrelated: each 2x2 block has L = [[2, -2], [-2, 2]] (eigenvalues
    0 and 4), K = [[c, s], [s, c]] with c = (1 + e^-4)/2, s = (1 - e^-4)/2; rho's eigenvalues: (c + s)/(4c) twice
    and (c - s)/(4c) twice."""
    w = np.zeros((4, 4))
    w[0, 1] = w[1, 0] = w[2, 3] = w[3, 2] = 2.0
    c, s = (1 + math.exp(-4)) / 2, (1 - math.exp(-4)) / 2
    expected = entropy_of([(c + s) / (4 * c)] * 2 + [(c - s) / (4 * c)] * 2)
    assert kernel_language_entropy(w) == pytest.approx(expected, rel=1e-12)
    # a little more than one bit among 4 answers (the e^-4 leak): certainty a little under 1 - log 2 / log 4 = 0.5
    assert 0.4 < kle_certainty(expected, 4) < 0.5


def reference_entropy(w: np.ndarray, t: float) -> float:
    """The same definition through scipy's matrix exponential (Pade approximation, not an eigendecomposition)."""
    w = (w + w.T) / 2
    np.fill_diagonal(w, 0)
    k = scipy.linalg.expm(-t * (np.diag(w.sum(1)) - w))
    rho = k / np.sqrt(np.outer(np.diag(k), np.diag(k))) / len(w)
    return entropy_of([x for x in np.linalg.eigvalsh(rho) if x > 1e-10])


@pytest.mark.parametrize("seed", range(6))
def test_against_scipy_expm(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    w = rng.uniform(0, 2, (n, n))  # asymmetric on purpose: KLE symmetrises it
    t = float(rng.choice([0.3, 1.0, 2.5]))
    assert kernel_language_entropy(w, t) == pytest.approx(reference_entropy(w, t), rel=1e-9, abs=1e-12)
    assert 0 <= kernel_language_entropy(w, t) <= math.log(n) + 1e-12


def test_more_agreement_is_more_certainty():
    n = 5
    values = [kle_certainty(kernel_language_entropy(x * (np.ones((n, n)) - np.eye(n))), n) for x in (0, 0.5, 1, 2)]
    assert values == sorted(values) and values[0] == 0 and values[-1] > 0.99


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        ([[0.0]], "at least 2"),
        ([[0, 1, 2], [1, 0, 1]], "square"),
        ([[0, float("nan")], [0, 0]], "non-finite"),
        ([[0, 3], [3, 0]], r"\[0, 2\]"),
        ([[0, -1], [-1, 0]], r"\[0, 2\]"),
    ],
)
def test_bad_matrices_are_refused(matrix, message):
    with pytest.raises(ValueError, match=message):
        kernel_language_entropy(matrix)


def test_certainty_needs_two_answers():
    with pytest.raises(ValueError, match="at least 2"):
        kle_certainty(0.0, 1)


# ----- similarities -------------------------------------------------------------------------------------------


def test_token_overlap_and_the_matrix():
    overlap = TokenOverlap()
    answers = ["The capital of France is Paris.", "Paris is the capital of France", "It is Lyon.", "Paris."]
    w = similarity_matrix(overlap, answers)
    assert np.allclose(w, w.T) and np.all(np.diag(w) == 0)
    assert w[0, 1] == 2.0  # the same content words
    assert w[0, 2] == 0.0  # nothing in common but function words
    # "Paris." is entailed by the full answer (1) and covers 1 of its 3 content words (1/3)
    assert w[0, 3] == pytest.approx(1 + 1 / 3)
    assert similarity_matrix(overlap, ["x y", " x y "])[0, 1] == 2.0  # the same text: not scored
    # the question's own words say nothing: two answers that restate it agree only on what they answer
    question = "What is the capital of France?"
    w = similarity_matrix(overlap, ["The capital of France is Paris.", "The capital of France is Lyon."], question)
    assert w[0, 1] == 0.0
    assert similarity_matrix(overlap, ["The capital of France is Paris.", "Paris."], question)[0, 1] == 2.0
    # a numbered list's markers are layout: an answer of bare numbering shares nothing with a numbered answer,
    # while numbers inside a line stay content
    numbered = "1. Sleep eight hours.\n2. Drink 2 litres of water."
    # (no content at all: it supports nothing in the numbered answer, which half-supports it, 0.5 by the rule)
    assert similarity_matrix(overlap, [numbered, "1.\n2.\n3."])[0, 1] == 0.5
    assert overlap.support([(numbered, "Drink 2 litres")])[0] == 1.0


class Broken:
    name = "broken"

    def __init__(self, scores):
        self.scores = scores

    def support(self, pairs, question=""):
        return self.scores


@pytest.mark.parametrize(("scores", "message"), [([0.5], "returned 1 scores for 2"), ([0.5, 1.5], "outside")])
def test_a_similarity_breaking_its_promise_is_named(scores, message):
    with pytest.raises(ValueError, match=message):
        checked_support(Broken(scores), [("a", "b"), ("b", "a")])


# ----- samples, transcript and audit ------------------------------------------------------------------------------


def test_sample_seeds_are_derived_and_distinct():
    seeds = sample_seeds(7)
    assert seeds == sample_seeds(7) and len(set(seeds)) == 5 and seeds != sample_seeds(8)
    assert all(0 <= s < 2**32 for s in seeds)
    with pytest.raises(ValueError, match="at least 2"):
        sample_seeds(7, 1)


VOCAB = 12


@pytest.fixture(scope="module")
def answered(one_thread):
    """A tiny jury's answer and its KLE certainty, in a transcript."""
    model, tokenizer = tiny_hydra(vocab=VOCAB, n_heads=4, scale=1.0), LetterTokenizer(VOCAB)
    settings = DecodeSettings(max_new_tokens=3, seed=11, temperature=0.0)
    messages = [{"role": "user", "content": "abc"}]
    output = PoE.from_settings(model, tokenizer, settings).generate_with_cache(messages=messages)
    samples = sample_answers(model, tokenizer, settings, messages, output.settings["seed"])
    record = kle_record(samples, TokenOverlap(), "abc")
    return model, tokenizer, output, samples, record


def test_samples_are_the_jurys_at_their_seeds(answered):
    model, tokenizer, _, samples, record = answered
    assert [s.settings["seed"] for s in samples] == sample_seeds(11)
    assert all(s.settings["temperature"] == SAMPLE_TEMPERATURE and s.mode == "poe" for s in samples)
    # each sample is what the jury gives alone for its seed
    alone = PoE(model, tokenizer, max_new_tokens=3, temperature=SAMPLE_TEMPERATURE)
    assert [alone.generate_with_cache("abc", seed=s).token_ids for s in sample_seeds(11)] == [
        s.token_ids for s in samples
    ]
    assert record["n_samples"] == 5 and len(record["matrix"]) == 5
    assert record["value"] == pytest.approx(kle_certainty(kernel_language_entropy(record["matrix"]), 5))


def audit(answered, transcript):
    model, tokenizer, *_ = answered
    return audit_poe(transcript, model, tokenizer=tokenizer)


def test_an_honest_kle_transcript_passes(answered):
    _, _, output, _, record = answered
    transcript = transcript_dict(output, certainty=record)
    assert transcript["certainty"]["samples"][0]["seed"] == sample_seeds(11)[0]
    report = audit(answered, transcript)
    assert report.honest, report.reason
    assert report.certainty is not None and report.certainty.honest and report.certainty.matrix_checked
    assert len(report.certainty.samples) == 5 and all(s["honest"] for s in report.certainty.samples)
    assert report.to_dict()["certainty"]["honest"]


def restamped(transcript):
    transcript["digest"] = content_digest(transcript)
    return transcript


def forge(answered, edit):
    _, _, output, _, record = answered
    transcript = transcript_dict(output, certainty=copy.deepcopy(record))
    edit(transcript["certainty"])
    return restamped(transcript)


def flip_path(sample):
    """Claim the opposite of the jury's first decision: a resampled token accepted, or an accepted one resampled."""
    if sample["resampled_idxs"][:1] == [1]:
        sample["resampled_idxs"], sample["original_token_ids"] = (
            sample["resampled_idxs"][1:],
            sample["original_token_ids"][1:],
        )
    else:
        sample["resampled_idxs"] = [1, *sample["resampled_idxs"]]
        sample["original_token_ids"] = [(sample["token_ids"][0] + 1) % VOCAB, *sample["original_token_ids"]]


def other_token(ids, i):
    ids[i] = (ids[i] + 1) % VOCAB


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda c: other_token(c["samples"][2]["token_ids"], 0), "sample 2"),
        (lambda c: c["samples"][1].update(seed=c["samples"][1]["seed"] + 1), "seeds"),
        (lambda c: flip_path(c["samples"][3]), "sample 3"),
        (lambda c: c.update(value=min(1.0, c["value"] + 0.2) if c["value"] < 0.9 else 0.1), "certainty is"),
        (lambda c: c["matrix"][0].__setitem__(1, 2.0 if c["matrix"][0][1] < 1 else 0.0), "similarity matrix"),
        (lambda c: c["sample_settings"].update(temperature=0.2), "temperature"),
        (lambda c: c.update(temperature=0.2), "temperature"),
        (lambda c: c["sample_settings"].update(veto_threshold=0.5), "veto_threshold"),
        (lambda c: c.update(kernel_t=5.0), "heat kernel"),
        (lambda c: c.update(question="xyz"), "question"),
        (lambda c: c["samples"][0].update(text="zzz"), "recorded text"),
    ],
)
def test_a_forged_certainty_is_caught(answered, edit, reason):
    report = audit(answered, forge(answered, edit))
    assert not report.honest
    assert reason in report.reason, report.reason


def test_a_certainty_edited_without_restamping_breaks_the_digest(answered):
    _, _, output, _, record = answered
    transcript = transcript_dict(output, certainty=copy.deepcopy(record))
    transcript["certainty"]["value"] = 1.0
    report = audit(answered, transcript)
    assert not report.honest and any(m.field == "digest" for m in report.field_mismatches)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(samples=c["samples"][:1], n_samples=1), "2 to 16"),
        (lambda c: c.update(n_samples=4), "n_samples"),
        (lambda c: c.update(matrix=[[0.0]]), "matrix"),
        (lambda c: c["samples"][0].update(token_ids=["a"]), "token ids"),
        (lambda c: c.update(method="head"), "method"),
        (lambda c: c.update(value="high"), "value"),
    ],
)
def test_a_malformed_certainty_is_bad_input(answered, edit, message):
    with pytest.raises(ValueError, match=message):
        check_transcript(forge(answered, edit))


# ----- an NLI checkpoint (a tiny random one: the mechanics, not the judgement) -------------------------------------


@pytest.fixture(scope="module")
def tiny_nli(tmp_path_factory):
    """A random BERT sequence classifier saved with its labels in an unusual order, and a word-level tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path = tmp_path_factory.mktemp("nli")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "paris", "lyon", "is", "the", "capital", "it"]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    labels = {0: "CONTRADICTION", 1: "Entailment", 2: "neutral"}
    config = BertConfig(
        vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()},
    )  # fmt: skip
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    return path


def test_nli_support_reads_the_checkpoints_label_order(tiny_nli):
    import torch

    from olmo_tap.certainty.similarity import NLIModel, make_similarity

    nli = make_similarity(f"nli:{tiny_nli}")
    assert isinstance(nli, NLIModel) and nli.name == f"nli:{tiny_nli}"
    pairs = [("paris is the capital", "it is paris"), ("lyon", "paris is the capital"), ("it", "it")]
    with torch.no_grad():
        encoded = nli.tokenizer([p for p, _ in pairs], [h for _, h in pairs], padding=True, return_tensors="pt")
        probs = torch.softmax(nli.model(**encoded).logits, dim=-1)
    expected = (probs[:, 1] + 0.5 * probs[:, 2]).tolist()  # Entailment is label 1, neutral label 2 here
    assert nli.support(pairs) == pytest.approx(expected, abs=1e-6)
    w = similarity_matrix(nli, ["paris is the capital", "lyon", "it is paris"])
    assert np.allclose(w, w.T) and ((w >= 0) & (w <= 2)).all()


def test_a_checkpoint_without_nli_labels_or_a_missing_one_is_refused(tiny_nli, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from olmo_tap.certainty.similarity import NLIModel, make_similarity

    model = AutoModelForSequenceClassification.from_pretrained(tiny_nli)
    model.config.id2label = {0: "positive", 1: "negative", 2: "neutral"}
    with pytest.raises(ValueError, match="not an NLI model"):
        NLIModel("sentiment", model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_nli))
    with pytest.raises(ValueError, match="no such directory"):
        make_similarity(f"nli:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="unknown similarity"):
        make_similarity("cosine")


def test_the_jurys_similarities_score_pairs_in_range(answered):
    from olmo_tap.certainty.similarity import JuryEmbedding, JuryJudge

    model, tokenizer, *_ = answered
    pairs = [("abc", "abd"), ("abd", "abc"), ("abc", "abc")]
    embedding = JuryEmbedding(model, tokenizer).support(pairs, "ab")
    assert embedding[0] == pytest.approx(embedding[1]) and embedding[2] == pytest.approx(1.0)
    assert all(0 <= s <= 1 for s in JuryJudge(model, tokenizer).support(pairs, "ab"))
