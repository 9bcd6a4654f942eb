"""What one worker does with a batch of records, for each command: no Ray here (``olmo_tap.batch.job`` runs it).

Records (one JSON object each; unknown fields are refused, naming them):

- ``generate``: ``prompt`` (text) or ``messages`` (chat turns), optional ``id``, ``seed`` and ``settings`` (any of
  ``GENERATE_SETTINGS``, over the job's). A record without a seed gets ``record_seed(job seed, id)``, so its
  answer does not depend on which worker takes it or with which others. Result: ``olmo-tap generate --json``'s
  object (the PoEOutput and its certainty), byte for byte what that command prints for the record (timings
  aside): each record decodes alone, as the CLI does. With the ``engine_batch`` option an actor's records decode
  together in the engine's batch instead: faster, the same tokens (batch-invariant kernels), but the float signals
  come from batch arithmetic (the transcript says ``batched``), so they match other batched runs, not the CLI.
- ``verify``: token-difr's ``prompt_token_ids``, ``output_token_ids``, optional ``seed`` and ``id`` (the job's
  sampler settings as ``olmo-tap verify``'s). Result: ``olmo-tap verify --json``'s ``summary``, ``verdict``,
  ``sequences`` for that record.
- ``audit``: a transcript, or ``{"id", "transcript"}``. Result: ``olmo-tap audit --json``'s report.

Every result also carries the record's ``id`` (its own, else its 1-based position in the input) and ``index``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from olmo_tap.jsonl import json_safe

COMMANDS = ("generate", "verify", "audit")
GENERATE_SETTINGS = (
    "mode",
    "temperature",
    "gamma",
    "beta",
    "veto_threshold",
    "max_new_tokens",
    "draft_head",
    "certainty",
)
ROLES = ("system", "developer", "user", "assistant")
MAX_SEED = 2**63 - 1


# `batch generate`'s options and their defaults: `olmo-tap generate`'s (certainty off: KLE costs 5 answers more).
GENERATE_DEFAULTS: dict[str, Any] = {
    "mode": "poe", "temperature": 0.0, "max_new_tokens": 200, "gamma": 4, "beta": 1.0, "veto_threshold": None,
    "draft_head": None, "certainty": "off", "similarity": "token-overlap", "engine_batch": False,
}  # fmt: skip


def generate_options(**given: Any) -> dict[str, Any]:
    """The job's generate options: ``GENERATE_DEFAULTS`` with ``given`` (checked as DecodeSettings: a bad value is
    refused before any work, not once per record)."""
    from olmo_tap.inference.settings import DecodeSettings

    unknown = sorted(set(given) - set(GENERATE_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown generate option(s): {', '.join(unknown)}")
    options = {**GENERATE_DEFAULTS, **given}
    DecodeSettings(**{k: v for k, v in options.items() if k in GENERATE_SETTINGS and k != "certainty"})
    return options


class RecordError(ValueError):
    """A record that cannot be processed: the message names the field."""


def record_seed(job_seed: int, record_id: str) -> int:
    """A record's seed when it has none: 32 bits of a hash of the job's seed and the record's id."""
    key = f"olmo-tap/batch/{int(job_seed)}/{record_id}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")


def _seed(value: Any, name: str = "seed") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
        raise RecordError(f"{name} must be an integer in [0, 2**63 - 1], got {value!r}")
    return value


def record_id(record: dict[str, Any], index: int) -> str | int:
    """The record's id: its own (a string or an integer), else its 1-based position in the input."""
    value = record.get("id", index + 1)
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise RecordError(f"id must be a non-empty string or an integer, got {value!r}")
    return value


def _only(record: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(record) - set(allowed))
    if unknown:
        raise RecordError(f"unknown field(s) {', '.join(unknown)} (a record may have {', '.join(allowed)})")


@dataclass(frozen=True)
class JobSpec:
    """A job: the command, the model (as ``olmo-tap`` loads it) and the command's options (as its CLI has them)."""

    command: str
    model: str
    options: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    device: str | None = None
    heads: int | None = None
    heads_depth: int | None = None
    threads: int = 1
    job_seed: int = 0

    def identity(self, input_path: str) -> dict[str, Any]:
        """What makes two runs the same job (``olmo_tap.batch.files``): not the threads, workers or cluster."""
        return {
            "command": self.command, "input": input_path, "model": self.model,
            "dtype": self.dtype, "device": self.device, "heads": self.heads, "heads_depth": self.heads_depth,
            "options": self.options, "job_seed": self.job_seed,
        }  # fmt: skip


def check_record(spec: JobSpec, value: Any, index: int) -> dict[str, Any]:
    """The record made ready for its worker (checked, its id and seed settled); RecordError otherwise."""
    if not isinstance(value, dict):
        raise RecordError(f"a record must be a JSON object, got {type(value).__name__}")
    rid = record_id(value, index)
    if spec.command == "generate":
        _only(value, ("id", "prompt", "messages", "seed", "settings"))
        if ("prompt" in value) == ("messages" in value):
            raise RecordError("give exactly one of prompt (text) and messages (chat turns)")
        if "prompt" in value:
            if not isinstance(value["prompt"], str) or not value["prompt"].strip():
                raise RecordError("prompt must be a non-empty string")
            messages = [{"role": "user", "content": value["prompt"]}]
        else:
            messages = value["messages"]
            ok = isinstance(messages, list) and messages and all(
                isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in ROLES
                and isinstance(m["content"], str) for m in messages
            )  # fmt: skip
            if not ok:
                raise RecordError(f"messages must be a non-empty list of {{role, content}} with a role in {ROLES}")
        settings = value.get("settings", {})
        if not isinstance(settings, dict):
            raise RecordError("settings must be an object")
        _only(settings, GENERATE_SETTINGS)
        seed = _seed(value["seed"]) if "seed" in value else record_seed(spec.job_seed, str(rid))
        decode = _decode_settings(spec, settings, seed)
        return {
            "id": rid,
            "messages": messages,
            "seed": seed,
            "settings": decode,
            "certainty": _certainty(spec, settings),
        }
    if spec.command == "verify":
        from olmo_tap.verify.records import TokenSequence

        _only(value, ("id", "prompt_token_ids", "output_token_ids", "seed"))
        try:
            sequence = TokenSequence.from_dict({k: v for k, v in value.items() if k != "id"})
        except (ValueError, TypeError, KeyError) as e:
            raise RecordError(str(e)) from None
        return {"id": rid, "sequence": sequence.to_dict()}
    from olmo_tap.inference.transcript import check_transcript

    if "transcript" in value:
        _only(value, ("id", "transcript"))
        transcript = value["transcript"]
    else:  # a bare transcript: named by its position (a transcript has no id field)
        transcript = value

    try:
        check_transcript(transcript)
    except ValueError as e:
        raise RecordError(str(e)) from None
    return {"id": rid, "transcript": transcript}


def _decode_settings(spec: JobSpec, overrides: dict[str, Any], seed: int) -> dict[str, Any]:
    from olmo_tap.inference.settings import DecodeSettings

    fields = {k: v for k, v in {**spec.options, **overrides}.items() if k in GENERATE_SETTINGS and k != "certainty"}
    fields["head"] = fields.get("draft_head")  # as olmo-tap generate sets it: single mode's head is the draft head
    try:
        return DecodeSettings(seed=seed, **fields).to_dict()
    except (ValueError, TypeError) as e:
        raise RecordError(f"settings: {e}") from None


def _certainty(spec: JobSpec, overrides: dict[str, Any]) -> str:
    from olmo_tap.certainty.method import CHOICES

    value = overrides.get("certainty", spec.options.get("certainty", "off"))
    if value not in CHOICES:
        raise RecordError(f"settings.certainty must be one of {', '.join(CHOICES)}, got {value!r}")
    return value


class Worker:
    """Holds one model (loaded once) and processes batches of checked records (``check_record``'s output)."""

    def __init__(self, spec: JobSpec) -> None:
        import torch

        from olmo_tap.hydra import HydraTransformer
        from olmo_tap.weights.tokenizer import load_tokenizer

        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.model = HydraTransformer.from_pretrained(
            spec.model, n_heads=spec.heads, heads_depth=spec.heads_depth, dtype=spec.dtype, device=spec.device,
            progress=False,
        )  # fmt: skip
        self.tokenizer = load_tokenizer(spec.model, progress=False)

    def process(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One result per task: ``{"id", "index", "result", "tokens"}`` or ``{"id", "index", "error"}``."""
        run = {"generate": self._generate, "verify": self._verify, "audit": self._audit}[self.spec.command]
        return run(tasks)

    def _generate(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from olmo_tap.certainty.answer import CertaintyRun
        from olmo_tap.certainty.names import DEFAULT_SIMILARITY
        from olmo_tap.inference.poe import PoE
        from olmo_tap.inference.settings import DecodeSettings

        # Records with the same settings share a decoder (and, with engine_batch, decode together in one batch).
        groups: dict[str, list[dict[str, Any]]] = {}
        for task in tasks:
            key = json.dumps({**task["settings"], "seed": None, "certainty": task["certainty"]}, sort_keys=True)
            groups.setdefault(key, []).append(task)
        results = []
        similarity = self.spec.options.get("similarity", DEFAULT_SIMILARITY)
        for group in groups.values():
            settings = DecodeSettings.from_dict({**group[0]["settings"], "seed": None})
            decoder = PoE.from_settings(self.model, self.tokenizer, settings)
            certainty = CertaintyRun(group[0]["certainty"], self.model, self.tokenizer, settings, similarity)
            plans = [certainty.plan(t["messages"], t["seed"])[0] for t in group]
            if self.spec.options.get("engine_batch"):
                outputs = self._many(decoder, group, plans)
            else:
                outputs = [self._alone(decoder, t, p) for t, p in zip(group, plans, strict=True)]
            for task, plan, output in zip(group, plans, outputs, strict=True):
                if isinstance(output, str):
                    results.append(failed(task, output))
                    continue
                value = certainty.result(plan, output, task["messages"])
                results.append(finished(task, {**output.to_dict(), "certainty": value}, len(output.token_ids)))
        return results

    @staticmethod
    def _alone(decoder: Any, task: dict[str, Any], plan: Any) -> Any:
        """One answer decoded as ``olmo-tap generate`` decodes it (the same arithmetic, so the same bytes); a
        record the decoder refuses (a prompt too long for the context) gives its error message instead."""
        try:
            stream = decoder.stream(messages=task["messages"], is_mcq=plan.mcq, seed=task["seed"])
            for _ in stream:
                pass
            return stream.output
        except ValueError as e:
            return str(e)

    @staticmethod
    def _many(decoder: Any, group: list[dict[str, Any]], plans: list[Any]) -> list[Any]:
        """The group's answers in one batch of the engine (batch arithmetic: tokens as alone, float signals to
        their last bits as in any other batch, not as an unbatched run); if the batch fails (a prompt too long
        for the context), each alone, so one bad record costs only itself (its error message in its place)."""
        mcq = {p.mcq for p in plans}
        if len(mcq) == 1:
            try:
                seeds = [t["seed"] for t in group]
                return decoder.generate_many([t["messages"] for t in group], max_batch=len(group), seeds=seeds,
                                             is_mcq=mcq.pop())  # fmt: skip
            except ValueError:
                pass
        outputs: list[Any] = []
        for task, plan in zip(group, plans, strict=True):
            try:
                outputs += decoder.generate_many([task["messages"]], seeds=[task["seed"]], is_mcq=plan.mcq)
            except ValueError as e:
                outputs.append(str(e))
        return outputs

    def _verify(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from olmo_tap.verify.outputs import verify_outputs
        from olmo_tap.verify.records import TokenSequence
        from olmo_tap.verify.scoring import compute_metrics_summary
        from olmo_tap.verify.verdict import judge

        o = self.spec.options
        results = []
        for task in tasks:
            sequence = TokenSequence.from_dict(task["sequence"])
            try:
                metrics = verify_outputs(
                    [sequence], self.model, tokenizer=self.tokenizer, temperature=o["temperature"],
                    top_k=o.get("top_k", 0), top_p=o.get("top_p", 1.0), seed=o.get("seed"),
                    max_model_len=o.get("max_model_len"), sampling_method=o.get("sampling_method", "vllm_gumbel_max"),
                    head=o.get("head"), verbose=False,
                )  # fmt: skip
            except ValueError as e:
                results.append(failed(task, str(e)))
                continue
            verdict = judge(metrics, o["rule"], threshold=o.get("threshold"), confidence=o.get("confidence"),
                            margin_tolerance=o.get("margin_tolerance"), outputs=[sequence])  # fmt: skip
            result = {"summary": compute_metrics_summary(metrics), "verdict": verdict.to_dict(), "sequences": 1}
            results.append(finished(task, result, len(sequence.output_token_ids)))
        return results

    def _audit(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from olmo_tap.verify.poe_audit import audit_poe

        o = self.spec.options
        results = []
        for task in tasks:
            try:
                report = audit_poe(
                    task["transcript"], self.model, tokenizer=self.tokenizer, tolerance=o.get("tolerance"),
                    threshold=o["threshold"], confidence=o["confidence"],
                )  # fmt: skip
            except ValueError as e:
                results.append(failed(task, str(e)))
                continue
            results.append(finished(task, report.to_dict(), len(task["transcript"]["token_ids"])))
        return results


def finished(task: dict[str, Any], result: dict[str, Any], tokens: int) -> dict[str, Any]:
    """A task's result as the worker returns it (JSON-safe: no NaN or infinity)."""
    return {"id": task["id"], "index": task["index"], "result": json_safe(result), "tokens": tokens}


def failed(task: dict[str, Any], problem: str) -> dict[str, Any]:
    return {"id": task["id"], "index": task["index"], "error": problem}
