"""Request and response bodies: OpenAI's chat-completions format, plus olmo-tap's decoding settings and ``trust``.

Fields OpenAI defines and the jury cannot honour are refused with a 400 naming them rather than silently
ignored (``n`` > 1, ``stop``, ``logit_bias``, tools and functions, JSON ``response_format``, penalties,
``top_p`` < 1: the jury samples from its whole distribution, which is what makes a response exactly
replayable); fields that do not change the answer (``user``, ``presence_penalty`` = 0, ``response_format``
text, ...) are accepted. Every request model refuses unknown fields and non-finite numbers (NaN, Infinity,
which Python's JSON parser reads), naming the field, rather than dropping or computing with them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from olmo_tap.inference.jury import MAX_BETA
from olmo_tap.inference.prompts import not_unicode
from olmo_tap.inference.sampling import check_temperature
from olmo_tap.serve.config import MAX_API_TEMPERATURE

MAX_SEED = 2**63 - 1
MAX_VERIFY_SEQUENCES = 64  # per /v1/verify request: one long request must not hold the worker for long


MAX_TOP_LOGPROBS = 20  # OpenAI's limit


class RequestModel(BaseModel):
    """A request body or part of one: an unknown field or a non-finite number is a 400 naming the field."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def first_bad_path(value: Any, bad: Callable[[Any], bool], path: str = "") -> str | None:
    """Where in a free-form JSON value (a transcript) the first item ``bad`` flags sits (a key or a value), e.g.
    "output.token_entropies[3]"."""
    if bad(value):
        return path or "(the value)"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key!s}" if path else str(key)
        if isinstance(key, str) and bad(key):
            return where
        found = first_bad_path(item, bad, where)
        if found is not None:
            return found
    return None


def _non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def non_text(value: Any) -> bool:
    """Whether ``value`` is a string no tokenizer, hash or UTF-8 answer takes (``prompts.not_unicode``)."""
    return isinstance(value, str) and not_unicode(value) is not None


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None
    # What OpenAI's clients send back when an assistant message is echoed into the next turn; empty, they are
    # accepted (the refusal and annotations only describe the earlier answer); tool calls and audio are refused.
    refusal: str | None = None
    annotations: list[Any] | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None
    audio: Any = None

    @model_validator(mode="after")
    def _no_tool_calls(self) -> ChatMessage:
        for name in ("tool_calls", "function_call", "audio"):
            if getattr(self, name):
                raise ValueError(f"{name} in messages are not supported (this server has no tools and no audio)")
        return self

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, str]:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class StreamOptions(RequestModel):
    include_usage: bool = False


class ChatCompletionRequest(RequestModel):
    """POST /v1/chat/completions. The last block of fields is olmo-tap's (send them as ``extra_body``)."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=MAX_API_TEMPERATURE)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # The jury's distribution after the veto, the one each token was decided from (see responses.logprobs_entry).
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # olmo-tap's decoding settings.
    mode: Literal["poe", "naive", "single"] = "poe"
    gamma: int = Field(default=4, ge=1, le=64)
    beta: float = Field(default=1.0, gt=0, le=MAX_BETA)
    veto_threshold: float | None = Field(default=None, ge=0, lt=1)
    draft_head: int | None = Field(default=None, ge=0)
    mcq: bool = False  # a multiple-choice question: report the uncertainty head's p(correct) (= certainty "mcq")
    # The answer's certainty (olmo_tap.certainty.method): "auto" routes multiple choice to the uncertainty head and
    # free text to Kernel Language Entropy (5 more answers, decoded in the same batch); "mcq", "kle" force one;
    # "off". Unset: multiple choice gets p(correct), free text none (a plain completion stays fast).
    certainty: Literal["auto", "mcq", "kle", "off"] | None = None
    # The robustness probe (olmo_tap.robustness.probe): the answer again with each of 3 adversarial suffixes appended
    # to the question (3 more answers, decoded in the same batch: about 3 times a plain completion's work), and how
    # many of them flip it. Strictly true or false: a probe that costs that much is asked for in so many words.
    robustness: bool = Field(default=False, strict=True)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, temperature: float | None) -> float | None:
        return None if temperature is None else check_temperature(temperature)

    @field_validator("messages")
    @classmethod
    def _some_text(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.text().strip() for m in messages):
            raise ValueError("every message is empty")
        return messages

    def refused_field(self) -> tuple[str, str] | None:
        """(field, why) for the first field set to something the jury cannot honour, else None."""
        refused = {
            "n": self.n != 1 and "only n = 1 is supported (the jury writes one answer per request)",
            "stop": bool(self.stop) and "stop sequences are not supported (the answer ends at end-of-text)",
            "logit_bias": bool(self.logit_bias) and "logit_bias is not supported (it would bypass the jury)",
            "tools": bool(self.tools) and "tools are not supported",
            "tool_choice": self.tool_choice not in (None, "none") and "tools are not supported",
            "functions": bool(self.functions) and "functions are not supported",
            "function_call": self.function_call not in (None, "none") and "functions are not supported",
            "response_format": self.response_format not in (None, {"type": "text"})
            and "only response_format {'type': 'text'} is supported (no JSON mode or schema: the jury's tokens "
            "are not constrained)",
            "top_logprobs": self.top_logprobs is not None and not self.logprobs and "top_logprobs needs logprobs: true",
            "mcq": self.mcq
            and self.certainty not in (None, "mcq")
            and f"true asks for the uncertainty head, but certainty {self.certainty!r} asks for another",
            "top_p": self.top_p not in (None, 1.0)
            and "only top_p = 1 is supported: the jury samples from its whole distribution (exact and replayable)",
            "presence_penalty": self.presence_penalty != 0 and "presence_penalty is not supported",
            "frequency_penalty": self.frequency_penalty != 0 and "frequency_penalty is not supported",
        }
        for name, problem in refused.items():
            if problem:
                return name, problem
        return None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def token_limit_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def conversation(self) -> list[dict[str, str]]:
        return [m.for_template() for m in self.messages]

    @property
    def certainty_choice(self) -> str:
        """What the request asks for (``olmo_tap.certainty.method``); "cheap" when it says nothing."""
        return self.certainty or ("mcq" if self.mcq else "cheap")


class TokenSequenceBody(RequestModel):
    """token-difr's TokenSequence: a prompt and the output claimed for it, as token ids."""

    prompt_token_ids: list[int] = Field(min_length=1)
    output_token_ids: list[int]
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)


class VerdictOptions(RequestModel):
    """The decision rule's knobs (None: olmo_tap.verify's defaults)."""

    threshold: float | None = Field(default=None, gt=0, le=1)
    confidence: float | None = Field(default=None, gt=0, lt=1)


class VerifyRequest(VerdictOptions):
    """POST /v1/verify: token-difr's ``verify_outputs`` against the served model, with a verdict."""

    outputs: list[TokenSequenceBody] = Field(min_length=1, max_length=MAX_VERIFY_SEQUENCES)
    temperature: float = Field(ge=0, le=MAX_API_TEMPERATURE)
    top_k: int = 0
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    sampling_method: Literal["vllm_gumbel_max", "olmo_tap"] = "vllm_gumbel_max"
    head: int | None = Field(default=None, ge=0)
    margin_tolerance: float | None = Field(default=None, ge=0)
    # The verdict's rule; None: exact for sampling_method olmo_tap (the server shares the generator's sampler:
    # every token not reproduced is listed, and threshold/confidence are refused), statistical for vLLM's.
    rule: Literal["exact", "statistical"] | None = None

    @property
    def n_tokens(self) -> int:
        """Prompt + output tokens over all sequences: the work the request asks for (the server caps it)."""
        return sum(len(s.prompt_token_ids) + len(s.output_token_ids) for s in self.outputs)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, temperature: float) -> float:
        return check_temperature(temperature)


class AuditRequest(VerdictOptions):
    """POST /v1/audit: replay a transcript (as an answer's ``trust.transcript``) through the served jury."""

    transcript: dict[str, Any]

    @field_validator("transcript")
    @classmethod
    def _finite(cls, transcript: dict[str, Any]) -> dict[str, Any]:
        found = first_bad_path(transcript, _non_finite)
        if found is not None:
            raise ValueError(f"{found} is not a finite number (NaN and Infinity are not JSON)")
        return transcript


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
