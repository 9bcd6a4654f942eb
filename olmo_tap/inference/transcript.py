"""A transcript: everything needed to replay a response through the jury and audit it later.

Format (JSON object, ``format`` = "olmo-tap-transcript", ``version`` = 2). One copy of the truth:

- ``model``: the model source the response came from (preset, directory or hub id), or null;
- ``settings``: the decoder's ``DecodeSettings`` (mode, seed, temperature, gamma, beta, veto_threshold,
  draft_head, head, n_llm_heads, max_new_tokens, ignore_eos, compile, top_logprobs) and the run's facts
  (vocab_limit, stop_ids, n_heads, heads_depth, dtype, device, threads, batched, batch_invariant, attention, and for
  multiple choice ``mcq`` and the ``question`` the uncertainty head scored): ``settings.RECORDED_SETTINGS``;
- ``prompt_ids`` / ``token_ids``: the templated prompt and the emitted tokens, as ids;
- ``certainty`` (only when the answer's certainty is Kernel Language Entropy): its sampled answers (seed, draft
  head, token ids, text), their settings, the similarity's name, the matrix, the entropy and the value
  (``olmo_tap.certainty.sampled.kle_record``); the audit replays each sample and recomputes the rest;
- ``robustness`` (only when the robustness probe measured the answer): the conversation, the adversarial
  suffixes and each attacked answer (token ids, the jury's path, text), their settings, the flips and the value
  (``olmo_tap.robustness.probe.robustness_record`` without its ``worst_case``); the audit replays each attacked
  answer and recomputes the rest;
- ``digest``: ``sha256:`` + hex of the canonical JSON of the fields above (``content_digest``; ``certainty`` and
  ``robustness`` only when present, so older transcripts keep theirs), so an answer can be quoted with its digest
  and any later edit of them shows;
- ``output``: the whole PoEOutput. Every field of it is *derived* from the five above (text, per-token
  signals, decisions, counts) and ``olmo-tap audit`` recomputes and compares each one, except the timings
  (``elapsed_s``, ``tokens_per_second``), which no replay can know;
- ``signature`` (optional): an Ed25519 signature of the digest by the server that vouches for the answer
  (``olmo_tap.verify.signing``).

Version 1 transcripts (no digest, no ``compile``/``mcq`` settings) are still read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from olmo_tap.inference.jury import MAX_BETA, check_beta
from olmo_tap.inference.poe import PoEOutput
from olmo_tap.inference.sampling import MAX_TEMPERATURE, MIN_TEMPERATURE, check_temperature
from olmo_tap.inference.settings import MODES
from olmo_tap.jsonl import is_finite_number, is_int, read_json
from olmo_tap.model.native_attention import TAKEN
from olmo_tap.model.native_linear import RECORDED as LINEAR_ROUTES
from olmo_tap.model.native_norm import TAKEN as NORM_ROUTES
from olmo_tap.quant.linear import RECORDED_KERNELS

FORMAT = "olmo-tap-transcript"
VERSION = 2
READABLE_VERSIONS = (1, 2)
REQUIRED_SETTINGS = ("mode", "seed", "temperature", "beta", "veto_threshold", "draft_head", "n_llm_heads")
# The digest covers exactly these fields: the claim. Everything in ``output`` is derived from them.
DIGESTED_FIELDS = ("format", "version", "model", "settings", "prompt_ids", "token_ids")
OPTIONAL_DIGESTED_FIELDS = ("certainty", "robustness")  # in the claim when present
TOP_LEVEL_FIELDS = (*DIGESTED_FIELDS, *OPTIONAL_DIGESTED_FIELDS, "digest", "output", "signature")
MAX_CERTAINTY_SAMPLES = 16  # each is replayed by an audit: bound the work a transcript can ask for
MAX_ROBUSTNESS_ATTACKS = 16  # likewise each attacked answer
# Upper bounds of settings that size what an audit allocates (the original system ran 10 heads x 3 layers).
LIMITS = {"n_heads": 64, "heads_depth": 256, "gamma": 64, "first_gamma": 64, "threads": 4096}
# The types of the output's lists, so a malformed one is refused as bad input rather than met deep in the audit.
OUTPUT_LISTS = {
    "output_parts": str, "original_tokens": str, "resampled_idxs": int, "token_ids": int, "prompt_ids": int,
    "original_token_ids": int, "stability_radii": int, "validity_radii": int, "verifier_heads": int,
    "token_entropies": float, "stability_margins": float, "suppression_scores": float,
}  # fmt: skip


def _canonical(value: Any) -> Any:
    """JSON writers disagree on integral numbers (Python writes 1.0, a browser's JSON.stringify 1): the digest
    takes them as integers, so a transcript saved by any of them keeps its digest."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def content_digest(transcript: dict[str, Any]) -> str:
    """``sha256:<hex>`` of the canonical JSON (sorted keys, no spaces, ASCII, integral numbers as integers) of
    the transcript's claim."""
    claim = {name: transcript.get(name) for name in DIGESTED_FIELDS}
    claim.update({name: transcript[name] for name in OPTIONAL_DIGESTED_FIELDS if transcript.get(name) is not None})
    claim = _canonical(claim)
    canonical = json.dumps(claim, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return "sha256:" + hashlib.sha256(canonical.encode("ascii")).hexdigest()


def transcript_dict(
    output: PoEOutput,
    model: str | None = None,
    certainty: dict[str, Any] | None = None,
    robustness: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The transcript of ``output``; ``certainty``: its certainty object, recorded when it is a KLE value (the
    uncertainty head's p(correct) is in the output, re-scored by the audit; a certainty without a value claims
    nothing); ``robustness``: its robustness record, recorded when the probe measured it."""
    transcript = {
        "format": FORMAT,
        "version": VERSION,
        "model": None if model is None else str(model),
        "settings": output.settings,
        "prompt_ids": output.prompt_ids,
        "token_ids": output.token_ids,
    }
    if certainty is not None and certainty.get("method") == "kle" and certainty.get("value") is not None:
        transcript["certainty"] = {k: v for k, v in certainty.items() if k in KLE_RECORD_FIELDS}
    if robustness is not None and robustness.get("type") in ROBUSTNESS_TYPES:
        transcript["robustness"] = {k: v for k, v in robustness.items() if k in ROBUSTNESS_RECORD_FIELDS}
    transcript["digest"] = content_digest(transcript)
    transcript["output"] = output.to_dict()
    return transcript


def save_transcript(
    output: PoEOutput,
    path: str | Path,
    model: str | None = None,
    signing_key: Any = None,
    certainty: dict[str, Any] | None = None,
    robustness: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the transcript of ``output`` to ``path``, signed when ``signing_key`` (an Ed25519 private key) is
    given; returns it (its ``digest`` is worth printing)."""
    transcript = transcript_dict(output, model, certainty, robustness)
    if signing_key is not None:
        from olmo_tap.verify.signing import sign_transcript  # lazily: decoding never needs cryptography

        transcript = sign_transcript(transcript, signing_key)
    Path(path).write_text(json.dumps(transcript, indent=2))
    return transcript


# ----- validation: a transcript is untrusted input ------------------------------------------------------------


def _id_list(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(is_int(i) for i in value):
        raise ValueError(f"transcript field {name!r} must be a list of integer token ids")
    return value


def _passes(check: Callable[[Any], Any], value: Any) -> bool:
    """Whether the decoder's own rule (``check_temperature``, ``check_beta``) takes ``value``."""
    try:
        check(value)
    except ValueError:
        return False
    return True


def _check(ok: bool, name: str, expected: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"transcript setting {name!r} must be {expected}, got {value!r}")


def check_settings(settings: Any) -> dict[str, Any]:
    """The settings if every value has the type and range a decoder could have used; ValueError otherwise."""
    if not isinstance(settings, dict):
        raise ValueError("transcript field 'settings' must be an object")
    missing = [k for k in REQUIRED_SETTINGS if k not in settings]
    if missing:
        raise ValueError(f"transcript settings lack {', '.join(missing)}")
    s = settings
    _check(s["mode"] in MODES, "mode", f"one of {MODES}", s["mode"])
    _check(is_int(s["seed"]), "seed", "an integer", s["seed"])
    sampled = f"0 or a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]"
    _check(_passes(check_temperature, s["temperature"]), "temperature", sampled, s["temperature"])
    _check(_passes(check_beta, s["beta"]), "beta", f"a number in (0, {MAX_BETA:g}]", s["beta"])
    tau = s["veto_threshold"]
    _check(tau is None or (is_finite_number(tau) and 0 <= tau < 1), "veto_threshold", "null or a number in [0, 1)", tau)
    _check(is_int(s["n_llm_heads"]) and s["n_llm_heads"] >= 1, "n_llm_heads", "an integer >= 1", s["n_llm_heads"])
    if s["mode"] == "poe":
        _check(
            s["n_llm_heads"] >= 2, "n_llm_heads", "at least 2 for PoE (one drafts, the rest verify)", s["n_llm_heads"]
        )
    head = s["draft_head"]
    if s["mode"] == "naive":
        _check(head is None, "draft_head", "null for naive averaging (every head decides)", head)
    else:
        ok = is_int(head) and 0 <= head < s["n_llm_heads"]
        _check(ok, "draft_head", f"a head index in [0, {s['n_llm_heads']})", head)
    for name in ("gamma", "first_gamma", "max_new_tokens", "vocab_limit", "n_heads", "heads_depth", "threads"):
        if s.get(name) is not None:
            low, high = (0 if name == "heads_depth" else 1), LIMITS.get(name)
            ok = is_int(s[name]) and s[name] >= low and (high is None or s[name] <= high)
            _check(ok, name, f"an integer in [{low}, {high}]" if high else f"an integer >= {low}", s[name])
    # the audit builds a Hydra of this split before anything else: bound it before any memory is allocated
    _check(s["n_llm_heads"] <= LIMITS["n_heads"], "n_llm_heads", f"at most {LIMITS['n_heads']}", s["n_llm_heads"])
    if s.get("stop_ids") is not None:
        _id_list(s["stop_ids"], "settings.stop_ids")
    for name in ("dtype", "device"):
        if s.get(name) is not None:
            _check(isinstance(s[name], str), name, "a string", s[name])
    if s.get("quantization") is not None:  # the audit loads the model quantized so: only what --quantize takes
        _check(s["quantization"] in ("int8", "int4", "gguf"), "quantization", "int8, int4 or gguf", s["quantization"])
    if s.get("quant_kernel") is not None:
        _check(s.get("quantization") is not None, "quant_kernel", "absent for float weights", s["quant_kernel"])
        _check(s["quant_kernel"] in RECORDED_KERNELS, "quant_kernel", ", ".join(RECORDED_KERNELS), s["quant_kernel"])
    if s.get("linear") is not None:
        _check(s.get("quantization") is None, "linear", "absent for quantized weights", s["linear"])
        _check(s["linear"] in LINEAR_ROUTES, "linear", ", ".join(LINEAR_ROUTES), s["linear"])
    if s.get("attention") is not None:
        _check(s["attention"] in TAKEN, "attention", " or ".join(TAKEN), s["attention"])
    if s.get("norm") is not None:
        _check(s["norm"] in NORM_ROUTES, "norm", " or ".join(NORM_ROUTES), s["norm"])
    for name in ("compile", "mcq", "ignore_eos", "batched", "batch_invariant"):
        if s.get(name) is not None:
            _check(isinstance(s[name], bool), name, "true or false", s[name])
    if s.get("head") is not None:  # written with the DecodeSettings: the decider, as draft_head says
        _check(s["head"] == head, "head", f"the draft_head ({head!r})", s["head"])
    if s.get("ignore_eos") and s.get("stop_ids"):  # running on past end-of-text records no stop ids
        _check(False, "ignore_eos", f"false with stop_ids {s['stop_ids']!r}", s["ignore_eos"])
    top = s.get("top_logprobs")
    _check(top is None or (is_int(top) and 0 <= top <= 20), "top_logprobs", "null or an integer in [0, 20]", top)
    question = s.get("question")
    _check(question is None or isinstance(question, str), "question", "null or a string", question)
    if s.get("mcq") and question is None:
        raise ValueError("transcript setting 'mcq' is true but no 'question' says what the uncertainty head scored")
    return settings


# What a transcript's ``certainty`` holds (``olmo_tap.certainty.sampled.kle_record``; the claims are not recorded:
# they are shown to a reader, not certified).
KLE_RECORD_FIELDS = (
    "method", "value", "entropy", "similarity", "question", "kernel_t", "temperature", "n_samples", "matrix", "samples",
    "sample_settings",
)  # fmt: skip


def _requirement(field: str) -> Callable[[bool, str, str], None]:
    """``need(ok, name, expected)``: a ValueError naming ``field.name`` and what it must be, unless ``ok``."""

    def need(ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ValueError(f"transcript field '{field}.{name}' must be {expected}")

    return need


def _check_side_answer(need: Callable[[bool, str, str], None], answer: Any, where: str, field: str) -> None:
    """What every replayable extra answer (a KLE sample, an attacked answer) records: its draft head and its path."""
    need(isinstance(answer, dict), where, "an object")
    need(is_int(answer.get("draft_head")) or answer.get("draft_head") is None, f"{where}.draft_head",
         "an integer or null")  # fmt: skip
    for name in ("token_ids", "resampled_idxs", "original_token_ids"):
        _id_list(answer.get(name), f"{field}.{where}.{name}")


def check_certainty(record: Any) -> dict[str, Any]:
    """A transcript's KLE record if it is well formed (types and sizes; honesty is the audit's); else
    ValueError naming the field."""
    need = _requirement("certainty")

    need(isinstance(record, dict), "", "an object")
    need(record.get("method") == "kle", "method", "'kle' (the only certainty a transcript records)")
    samples = record.get("samples")
    need(
        isinstance(samples, list) and 2 <= len(samples) <= MAX_CERTAINTY_SAMPLES,
        "samples",
        f"a list of 2 to {MAX_CERTAINTY_SAMPLES} sampled answers",
    )
    for i, sample in enumerate(samples):
        _check_side_answer(need, sample, f"samples[{i}]", "certainty")
        need(is_int(sample.get("seed")) and sample["seed"] >= 0, f"samples[{i}].seed", "an integer >= 0")
        need(isinstance(sample.get("text", ""), str), f"samples[{i}].text", "a string")
    n = len(samples)
    need(record.get("n_samples") == n, "n_samples", f"the number of samples ({n})")
    matrix = record.get("matrix")
    need(
        isinstance(matrix, list)
        and len(matrix) == n
        and all(isinstance(row, list) and len(row) == n and all(is_finite_number(x) for x in row) for row in matrix),
        "matrix",
        f"a {n} x {n} matrix of finite numbers",
    )
    for name in ("value", "entropy", "kernel_t", "temperature"):
        need(is_finite_number(record.get(name)), name, "a finite number")
    need(isinstance(record.get("similarity"), str), "similarity", "a string")
    need(isinstance(record.get("question"), str), "question", "a string")
    need(isinstance(record.get("sample_settings"), dict), "sample_settings", "an object")
    return record


# What a transcript's ``robustness`` holds (``olmo_tap.robustness.probe.robustness_record``; the worst case is
# derived from the attacks, for a reader), and its types: multiple choice, free text.
ROBUSTNESS_TYPES = ("mcq", "free_text")
ROBUSTNESS_RECORD_FIELDS = (
    "type", "value", "attempts", "flips", "flipped", "attacks", "clean_choice", "similarity", "threshold", "seed",
    "bank", "messages", "attack_settings",
)  # fmt: skip
ROLE_CONTENT = ("role", "content")


def check_robustness(record: Any) -> dict[str, Any]:
    """A transcript's robustness record if it is well formed (types and sizes; honesty is the audit's); else
    ValueError naming the field."""
    need = _requirement("robustness")

    need(isinstance(record, dict), "", "an object")
    need(record.get("type") in ROBUSTNESS_TYPES, "type", f"one of {ROBUSTNESS_TYPES}")
    attacks = record.get("attacks")
    need(
        isinstance(attacks, list) and 1 <= len(attacks) <= MAX_ROBUSTNESS_ATTACKS,
        "attacks",
        f"a list of 1 to {MAX_ROBUSTNESS_ATTACKS} attacked answers",
    )
    for i, attack in enumerate(attacks):
        _check_side_answer(need, attack, f"attacks[{i}]", "robustness")
        need(isinstance(attack.get("suffix"), str), f"attacks[{i}].suffix", "a string")
        need(isinstance(attack.get("answer"), str), f"attacks[{i}].answer", "a string")
        need(isinstance(attack.get("flipped"), bool), f"attacks[{i}].flipped", "true or false")
        similarity = attack.get("similarity")
        need(similarity is None or is_finite_number(similarity), f"attacks[{i}].similarity", "a finite number or null")
        choice = attack.get("choice")
        need(choice is None or isinstance(choice, str), f"attacks[{i}].choice", "a string or null")
    need(record.get("attempts") == len(attacks), "attempts", f"the number of attacks ({len(attacks)})")
    for name in ("flips", "flipped"):
        need(is_int(record.get(name)) and 0 <= record[name] <= len(attacks), name, "an integer in [0, attempts]")
    for name in ("value", "threshold"):
        need(is_finite_number(record.get(name)), name, "a finite number")
    need(is_int(record.get("seed")) and record["seed"] >= 0, "seed", "an integer >= 0")
    need(isinstance(record.get("similarity"), str), "similarity", "a string")
    need(record.get("clean_choice") is None or isinstance(record["clean_choice"], str), "clean_choice",
         "a string or null")  # fmt: skip
    bank = record.get("bank")
    need(isinstance(bank, dict) and isinstance(bank.get("fingerprint"), str), "bank", "an object with a fingerprint")
    messages = record.get("messages")
    well_formed = isinstance(messages, list) and bool(messages)
    for m in messages if well_formed else []:
        well_formed = well_formed and isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ROLE_CONTENT)
    need(well_formed, "messages", "a non-empty list of {role, content} messages")
    try:
        check_settings(record.get("attack_settings"))
    except ValueError as e:
        raise ValueError(f"transcript field 'robustness.attack_settings': {e}") from None
    return record


def check_transcript(data: Any) -> dict[str, Any]:
    """``data`` if it is a well-formed transcript; otherwise ValueError naming what is wrong.

    Well-formed is not honest: ``olmo_tap.verify.poe_audit`` decides that."""
    if not isinstance(data, dict):
        raise ValueError(f"a transcript must be a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise ValueError(f"not an olmo-tap transcript: 'format' is {data.get('format')!r}, expected {FORMAT!r}")
    if data.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"unsupported transcript version {data.get('version')!r} (this olmo-tap reads {READABLE_VERSIONS})"
        )
    if data.get("model") is not None and not isinstance(data["model"], str):
        raise ValueError("transcript field 'model' must be a string or null")
    check_settings(data.get("settings"))
    if not _id_list(data.get("prompt_ids"), "prompt_ids"):
        raise ValueError("transcript field 'prompt_ids' must not be empty")
    _id_list(data.get("token_ids"), "token_ids")
    output = data.get("output", {})
    if not isinstance(output, dict):
        raise ValueError("transcript field 'output' must be an object")
    for name, kind in OUTPUT_LISTS.items():
        value = output.get(name, [])
        ok = is_int if kind is int else is_finite_number if kind is float else (lambda v: isinstance(v, str))
        if not isinstance(value, list) or not all(ok(v) for v in value):
            raise ValueError(f"transcript field 'output.{name}' must be a list of {kind.__name__} values")
    if data.get("certainty") is not None:
        check_certainty(data["certainty"])
    if data.get("robustness") is not None:
        check_robustness(data["robustness"])
    if data["version"] >= 2 and not isinstance(data.get("digest"), str):
        raise ValueError("transcript field 'digest' must be a string (sha256:<hex>)")
    if data.get("signature") is not None and not isinstance(data["signature"], dict):
        raise ValueError("transcript field 'signature' must be an object")
    try:
        content_digest(data)
    except ValueError:
        raise ValueError("transcript settings hold a value JSON cannot represent (NaN or infinity)") from None
    return data


def read_transcript(path: str | Path) -> dict[str, Any]:
    return check_transcript(read_json(path, "transcript file"))
