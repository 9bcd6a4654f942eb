"""The FastAPI application: OpenAI-compatible chat completions decoded by the jury, with trust signals.

``create_app(model, tokenizer, model_id)`` serves an already loaded Hydra. Every model call runs on the
engine's one worker thread, which decodes up to ``max_batch`` answers together (continuous batching) and runs
verification between their steps; the event loop only validates, queues and relays.
With a signing key (``ServeConfig.signing_key``) every transcript the service returns is signed, and
``GET /v1/signing-key`` gives its public key.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.cors import CORSMiddleware

from olmo_tap.certainty.method import CertaintyPlan, plan_certainty
from olmo_tap.certainty.similarity import make_similarity
from olmo_tap.engine.batch import BatchRunner
from olmo_tap.inference.poe import PoEOutput
from olmo_tap.inference.prompts import ChatTemplateError, encode_chat
from olmo_tap.inference.settings import DecodeSettings
from olmo_tap.robustness.bank import AttackBank, model_fingerprint
from olmo_tap.robustness.probe import (
    NO_BANK,
    attack_settings,
    attack_suffixes,
    attacked_messages,
    bank_summary,
    last_user_index,
    resolve_bank,
)
from olmo_tap.serve.analyse import AnalyseRequest, analyse_body
from olmo_tap.serve.config import ServeConfig, public_model_id
from olmo_tap.serve.engine import DeadlinePassed, Engine, EngineStopped, Job, JobFailed, QueueFull
from olmo_tap.serve.errors import APIError, error_payload, install_error_handlers, quote_input
from olmo_tap.serve.generation import Generated, GenerationPlan, GenerationWork
from olmo_tap.serve.middleware import (
    BodySizeLimit,
    CheckedBodiesRoute,
    HostCheck,
    JSONBodiesOnly,
    RequestContext,
    trusted_hosts,
)
from olmo_tap.serve.responses import JSONResponse, chunk_body, completion_body, sse, usage
from olmo_tap.serve.schemas import AuditRequest, ChatCompletionRequest, VerifyRequest
from olmo_tap.serve.signals import AnswerSignals
from olmo_tap.serve.trust import OPENAI_FINISH, response_trust
from olmo_tap.serve.verification import audit_tokens, check_audit_request, run_audit, run_verify

log = logging.getLogger("olmo_tap.serve")

STATIC_DIR = Path(__file__).parent / "static"
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there
# After its deadline a running job stops at its next check (a chat then answers with what was decided); this
# long is left for that before the request gives up on it with a 503. A waiting job gets no grace.
RUNNING_GRACE_S = 2.0
# A prompt is refused before tokenising when it has more characters than this per token of context: no
# tokenizer of these models averages anywhere near 32 characters a token, so such a prompt cannot fit, and
# tokenising a megabyte of text would hold a thread for seconds.
PROMPT_CHARS_PER_CONTEXT_TOKEN = 32


class ClientGone(Exception):
    """The client closed the connection while its request waited or ran."""


class Service:
    """What the routes share: the model, its worker, the settings and a tokenizer for request checks."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        model_id: str,
        config: ServeConfig,
        signing_key: Any = None,
        attack_bank: AttackBank | None = None,
    ) -> None:
        self.model = model
        self.signing_key = signing_key  # an Ed25519PrivateKey, or None: transcripts go out unsigned
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.config = config
        # One cache for the batch: max_batch slots, each room for the longest request the context allows (its
        # pages are committed only as far as answers reach, see olmo_tap.model.kv_cache).
        runner = BatchRunner(model, model.new_cache(config.max_batch, model.base_config.max_seq_len))
        self.engine = Engine(config.queue_size, runner)
        model.identical_heads()  # compared now, once: each request's decoder asks, on the event loop
        self.created = int(time.time())
        # Requests are measured on the event loop's side with a copy of the tokenizer, so the worker's
        # tokenizer is never used from two threads at once.
        self._check_tokenizer = copy.deepcopy(tokenizer)
        self._check_lock = threading.Lock()
        # KLE's similarity, built once (an NLI checkpoint loads here, so a missing one fails at start-up).
        self.similarity = make_similarity(config.similarity, model, tokenizer)
        # The robustness probe's bank, and whether it was made for these weights: the fingerprint hashes every
        # weight (a second for 135M parameters), so it is taken once, here.
        self.attack_bank = attack_bank
        self.bank_info = None if attack_bank is None else bank_summary(attack_bank, model_fingerprint(model))

    @property
    def n_text_heads(self) -> int:
        return self.model.n_text_heads

    @property
    def context(self) -> int:
        return self.model.base_config.max_seq_len

    @property
    def max_verify_tokens(self) -> int:
        return self.config.max_verify_tokens or self.context

    @property
    def max_prompt_chars(self) -> int:
        return PROMPT_CHARS_PER_CONTEXT_TOKEN * self.context

    def check_verify_tokens(self, n_tokens: int, param: str) -> None:
        """400 when a verify or audit request asks to replay more tokens than the server's cap."""
        if n_tokens > self.max_verify_tokens:
            raise APIError(
                400,
                f"{param}: the request holds {n_tokens} tokens (prompt + output, over all sequences); this server "
                f"replays at most {self.max_verify_tokens} per request (max_verify_tokens)",
                param=param,
                code="too_many_tokens",
            )

    def model_card(self) -> dict[str, Any]:
        config = self.model.config
        return {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "olmo-tap",
            "olmo_tap": {
                "n_heads": self.model.n_heads,
                "n_text_heads": self.n_text_heads,
                "heads_depth": config.head_layers,
                "trunk_layers": config.trunk_layers,
                "uncertainty_head": self.model.uncertainty_head is not None,
                "context": self.context,
                "dtype": str(self.model.dtype).removeprefix("torch."),
                "device": str(self.model.device),
                "robustness": self.robustness_card(),
            },
        }

    def robustness_card(self) -> dict[str, Any]:
        """Whether the robustness probe can run here, and with which bank."""
        if self.attack_bank is None:
            return {"attack_bank": False, "reason": NO_BANK}
        return {"attack_bank": True, "attacks": len(attack_suffixes(self.attack_bank)), **(self.bank_info or {})}

    def count_prompt_tokens(self, conversation: list[dict[str, str]]) -> int:
        with self._check_lock:
            return len(encode_chat(self._check_tokenizer, messages=conversation))

    async def plan(self, body: ChatCompletionRequest) -> GenerationPlan:
        """Check a request against the model and the server's limits; 4xx naming the field otherwise."""
        refused = body.refused_field()
        if refused is not None:
            raise APIError(400, f"{refused[0]}: {refused[1]}", param=refused[0])
        if body.model not in (None, "", self.model_id):
            raise APIError(
                404,
                f"model {quote_input(body.model)} is not served here; this server serves {self.model_id!r}",
                param="model",
                code="model_not_found",
            )
        if body.mode == "poe" and self.n_text_heads < 2:
            raise APIError(400, f"mode 'poe' needs 2 text heads; the model has {self.n_text_heads}", param="mode")
        if body.draft_head is not None and body.draft_head >= self.n_text_heads:
            raise APIError(
                400,
                f"draft_head {body.draft_head} is not one of the {self.n_text_heads} text heads",
                param="draft_head",
            )
        # Refuse before the expensive part (the chat template and tokenising), so a flood against a full queue
        # costs each request only its parsing.
        self.check_capacity()
        conversation = body.conversation()
        chars = sum(len(message["content"]) for message in conversation)
        if chars > self.max_prompt_chars:
            raise APIError(
                400,
                f"messages: the conversation is {chars} characters; this server tokenises at most "
                f"{self.max_prompt_chars} ({PROMPT_CHARS_PER_CONTEXT_TOKEN} per token of the model's context of "
                f"{self.context} tokens)",
                param="messages",
                code="context_length_exceeded",
            )
        try:
            prompt_tokens = await anyio.to_thread.run_sync(self.count_prompt_tokens, conversation)
        except ChatTemplateError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        room = self.context - prompt_tokens
        if room < 1:
            raise APIError(
                400,
                f"messages: the conversation is {prompt_tokens} tokens; the model's context is {self.context} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        limit, field = body.token_limit, body.token_limit_field
        if limit is not None and limit > room:
            raise APIError(
                400,
                f"{field}: {limit} new tokens + the prompt's {prompt_tokens} exceed the model's context of "
                f"{self.context} tokens (at most {room} fit)",
                param=field,
                code="context_length_exceeded",
            )
        last_user = next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")
        certainty = plan_certainty(body.certainty_choice, last_user, self.model.uncertainty_head is not None)
        seed = body.seed
        # KLE's samples derive their seeds from the answer's, and the attacked answers take it: fixed before decoding
        if seed is None and (certainty.kle or body.robustness):
            seed = int.from_bytes(os.urandom(4), "little")
        settings = DecodeSettings(
            mode=body.mode,
            gamma=body.gamma,
            beta=body.beta,
            temperature=self.config.default_temperature if body.temperature is None else body.temperature,
            seed=seed,
            veto_threshold=body.veto_threshold,
            draft_head=body.draft_head,
            head=body.draft_head,
            max_new_tokens=limit if limit is not None else min(self.config.default_max_tokens, room),
            top_logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        )
        attacks = await self.attack_plans(conversation, settings, certainty) if body.robustness else None
        return GenerationPlan(conversation, prompt_tokens, settings, certainty, body.stream, body.logprobs, attacks)

    async def attack_plans(
        self, conversation: list[dict[str, str]], settings: DecodeSettings, certainty: CertaintyPlan
    ) -> tuple[GenerationPlan, ...]:
        """The robustness probe's attacked answers (none without a bank): the conversation with each suffix
        appended to its last user message, decoded with the answer's settings and seed, not scored."""
        try:
            last_user_index(conversation)
        except ValueError as e:
            raise APIError(400, f"robustness: {e}", param="robustness") from None
        if self.attack_bank is None:
            return ()
        unscored = CertaintyPlan(None, "off", certainty.detected_mcq, "an attacked answer is not scored")
        plans = []
        for suffix in attack_suffixes(self.attack_bank):
            messages = attacked_messages(conversation, suffix)
            tokens = await anyio.to_thread.run_sync(self.count_prompt_tokens, messages)
            plans.append(GenerationPlan(messages, tokens, attack_settings(settings), unscored))
        return tuple(plans)

    def submit(self, request_id: str, work: Callable[[Job], Any]) -> Job:
        return self._queue(lambda: self.engine.submit(request_id, work, self.config.request_timeout_s))

    def submit_decode(self, request_id: str, work: GenerationWork) -> Job:
        return self._queue(lambda: self.engine.submit_decode(request_id, work, self.config.request_timeout_s))

    def _queue(self, submit: Callable[[], Job]) -> Job:
        try:
            return submit()
        except QueueFull as e:
            raise self.queue_full(e) from None
        except EngineStopped as e:
            raise APIError(503, str(e), headers={"Retry-After": "5"}) from None

    def check_capacity(self) -> None:
        """429 now if the queue has no room, before a request's expensive checks."""
        try:
            self.engine.check_capacity()
        except QueueFull as e:
            raise self.queue_full(e) from None

    def queue_full(self, e: QueueFull) -> APIError:
        return APIError(
            429,
            f"{e}: the queue holds {self.engine.queue_size} waiting requests",
            code="queue_full",
            headers={"Retry-After": str(e.retry_after_s)},
        )

    async def result(self, job: Job, request: Request) -> Any:
        """The job's result once it is done (its token events skipped); its error as an APIError."""
        try:
            while (event := await next_event(job, request, self.engine))[0] in ("started", "token"):
                pass
        except DeadlinePassed as e:
            raise self.job_error(e) from None
        kind, payload = event
        if kind == "error":
            raise self.job_error(payload)
        return payload

    def job_error(self, exc: BaseException) -> APIError:
        """The answer for an error a job reported."""
        retry = {"Retry-After": str(self.engine.retry_after_s())}
        if isinstance(exc, DeadlinePassed):
            return APIError(503, str(exc), code="timeout", headers=retry)
        if isinstance(exc, EngineStopped):
            return APIError(503, str(exc), headers=retry)
        if isinstance(exc, ValueError):
            return APIError(400, str(exc))
        kind = exc.kind if isinstance(exc, JobFailed) else type(exc).__name__
        return APIError(500, f"the model failed on this request ({kind})")


async def next_event(job: Job, request: Request | None, engine: Engine) -> tuple[str, Any]:
    """The job's next event; while waiting, a client that disconnected cancels the job (ClientGone), and so
    does the deadline (DeadlinePassed): at once for a job still in the queue, after ``RUNNING_GRACE_S`` for a
    running one. The deadline is enforced here, not only by the worker, so a request queued behind a long job
    is answered at its own deadline."""
    getter = asyncio.ensure_future(job.events.get())
    try:
        while True:
            limit = job.deadline + (0.0 if job.state == "queued" else RUNNING_GRACE_S)
            timeout = min(DISCONNECT_POLL_S, max(0.0, limit - time.monotonic()))
            done, _ = await asyncio.wait({getter}, timeout=timeout)
            if done:
                return getter.result()
            if request is not None and await request.is_disconnected():
                engine.cancel(job)
                raise ClientGone
            if time.monotonic() >= limit:
                waited = job.state == "queued"
                engine.cancel(job, "time_limit")
                elapsed = time.monotonic() - job.submitted
                raise DeadlinePassed(
                    f"the request waited longer than its time limit ({elapsed:.1f} s)"
                    if waited
                    else f"the request ran past its time limit ({elapsed:.1f} s) and was stopped"
                )
    finally:
        if not getter.done():
            getter.cancel()


def create_app(
    model: Any,
    tokenizer: Any,
    model_id: str,
    config: ServeConfig | None = None,
    signing_key: Any = None,
    attack_bank: AttackBank | None = None,
) -> FastAPI:
    """The application serving ``model`` (a loaded HydraTransformer) under the name ``model_id``.

    ``signing_key``: an Ed25519PrivateKey already loaded; otherwise the key file ``config.signing_key``, if
    any, is loaded here (ValueError when it is not a usable key). ``attack_bank``: the robustness probe's bank
    already loaded; otherwise ``config.attack_bank``, or the one shipped for ``model_id``'s preset, if any, is
    loaded here (a BankError, a ValueError, when it is missing or malformed)."""
    config = config or ServeConfig()
    if signing_key is None and config.signing_key:
        from olmo_tap.verify.signing import load_private_key

        signing_key = load_private_key(config.signing_key)
    if attack_bank is None:
        attack_bank = resolve_bank(config.attack_bank, model_id)
    model_id = public_model_id(model_id)  # a model given as a path is shown by its base name only
    service = Service(model, tokenizer, model_id, config, signing_key, attack_bank)
    signing_info: dict[str, str] | None = None
    if signing_key is not None:
        from olmo_tap.verify.signing import public_key_info

        signing_info = public_key_info(signing_key.public_key())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.engine.start()
        log.info(
            "serving %s (queue %d, time limit %g s, transcripts %s)",
            model_id,
            service.config.queue_size,
            service.config.request_timeout_s,
            signing_info["fingerprint"] if signing_info else "unsigned",
        )
        try:
            yield
        finally:
            service.engine.stop()

    app = FastAPI(
        title="olmo-tap",
        summary="Chat completions decoded by a jury of heads, with trust signals",
        lifespan=lifespan,
        default_response_class=JSONResponse,
        # Swagger UI and ReDoc load their scripts from a CDN: off unless asked for (--docs); the schema stays.
        docs_url="/docs" if config.docs else None,
        redoc_url="/redoc" if config.docs else None,
    )
    app.router.route_class = CheckedBodiesRoute  # every route below: a body must be unambiguous Unicode JSON
    install_error_handlers(app)
    # Each add_middleware wraps what came before: requests pass RequestContext, HostCheck, CORS, JSONBodiesOnly
    # and BodySizeLimit in that order.
    app.add_middleware(BodySizeLimit, max_bytes=service.config.max_body_bytes)
    app.add_middleware(JSONBodiesOnly)
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],  # the openai clients send their own x-stainless-* headers
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(
        HostCheck,
        allowed_hosts=trusted_hosts(config.host, config.allowed_hosts),
        bind_host=config.host,
    )
    app.add_middleware(RequestContext)  # outermost: every answer, 413 included, gets an id and a log line
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/health")
    async def health() -> JSONResponse:
        queue = service.engine.snapshot()
        ok = queue["worker_alive"]
        body = {"status": "ok" if ok else "unavailable", "model": model_id, "queue": queue}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str) -> dict[str, Any]:
        if name != model_id:
            raise APIError(
                404,
                f"model {quote_input(name)} is not served here; this server serves {model_id!r}",
                code="model_not_found",
            )
        return service.model_card()

    @app.get("/v1/signing-key")
    async def signing_key_info() -> dict[str, Any]:
        """The public key that signs this server's transcripts (for ``olmo-tap audit --public-key``)."""
        if signing_info is None:
            raise APIError(404, "this server does not sign its transcripts (start it with --signing-key)")
        return signing_info

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        request_id = request.state.request_id
        plan = await service.plan(body)
        job = service.submit_decode(request_id, GenerationWork(model, tokenizer, plan))
        signals = AnswerSignals(service, request_id, plan)  # KLE's samples, attacked answers: in the batch beside it
        completion_id = "chatcmpl-" + request_id.removeprefix("req-")
        created = int(time.time())
        streaming = False
        try:
            kind, payload = await next_event(job, request, service.engine)  # "started", or an error before it
            if kind == "error":
                raise service.job_error(payload)
            if plan.stream:
                streaming = True
                return StreamingResponse(
                    stream_answer(job, plan, signals, completion_id, created, body.stream_options),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            generated: Generated = await service.result(job, request)
            output = generated.output
            log_answer(request_id, output, job)
            trust = await answer_trust(output, job, signals)
            return JSONResponse(completion_body(completion_id, created, model_id, output, trust, generated.logprobs))
        except DeadlinePassed as e:
            raise service.job_error(e) from None
        except ClientGone:
            log.info("%s client disconnected; its request was cancelled", request_id)
            return Response(status_code=499)
        finally:
            if not streaming:
                signals.cancel()

    async def answer_trust(output: PoEOutput, job: Job, signals: AnswerSignals) -> dict[str, Any]:
        """The whole answer's trust object, once its certainty and robustness are known (KLE waits for its
        samples, the probe for its attacked answers)."""
        certainty, robustness = await signals.results(output)
        return response_trust(
            output,
            model_id,
            certainty=certainty,
            queue_s=job.queue_s,
            signing_key=service.signing_key,
            robustness=robustness,
        )

    @app.get("/api/health", include_in_schema=False)
    async def api_health() -> dict[str, str]:
        """The original system's liveness probe (its front end's deployments poll it)."""
        return {"status": "ok"}

    @app.post("/api/analyse", response_model=None)
    async def analyse(body: AnalyseRequest, request: Request, hf: bool = False) -> Response:
        """The original system's endpoint (``olmo_tap.serve.analyse``): the jury's answer with its certainty
        (``auto``), claim ledger, security and robustness, in the original's schema."""
        if hf:
            raise APIError(400, "hf: olmo-tap has no Hugging Face Inference API fallback; the jury answers", param="hf")
        chat = ChatCompletionRequest(messages=body.messages, certainty="auto", robustness=body.robustness)
        plan = await service.plan(chat)
        request_id = request.state.request_id
        job = service.submit_decode(request_id, GenerationWork(model, tokenizer, plan))
        signals = AnswerSignals(service, request_id, plan)
        try:
            generated: Generated = await service.result(job, request)
            log_answer(request_id, generated.output, job)
            trust = await answer_trust(generated.output, job, signals)
            return JSONResponse(analyse_body(generated.output, trust, model_id))
        except ClientGone:
            return Response(status_code=499)
        finally:
            signals.cancel()

    @app.post("/v1/verify", response_model=None)
    async def verify(body: VerifyRequest, request: Request) -> Response:
        """token-difr's verify_outputs against the served model: per-token metrics, summary and verdict."""
        if body.head is not None and body.head >= service.n_text_heads:
            raise APIError(400, f"head {body.head} is not one of the {service.n_text_heads} text heads", param="head")
        service.check_verify_tokens(body.n_tokens, "outputs")
        job = service.submit(request.state.request_id, lambda job: run_verify(job, model, tokenizer, body))
        try:
            return JSONResponse({"model": model_id, **await service.result(job, request)})
        except ClientGone:
            return Response(status_code=499)

    @app.post("/v1/audit", response_model=None)
    async def audit(body: AuditRequest, request: Request) -> Response:
        """Replay a transcript through the served jury and re-take each decision: honest or not."""
        try:
            transcript = check_audit_request(model, model_id, body)
        except ValueError as e:
            raise APIError(400, f"transcript: {e}", param="transcript") from None
        service.check_verify_tokens(audit_tokens(transcript), "transcript")
        job = service.submit(
            request.state.request_id,
            lambda job: run_audit(job, model, tokenizer, model_id, transcript, body, service.attack_bank),
        )
        try:
            return JSONResponse(await service.result(job, request))
        except ClientGone:
            return Response(status_code=499)

    async def stream_answer(
        job: Job, plan: GenerationPlan, signals: AnswerSignals, completion_id: str, created: int, options: Any
    ) -> AsyncIterator[str]:
        """SSE chunks: the role, one chunk per token with its trust fields, the finish with the whole
        answer's trust (transcript included), optionally usage, then [DONE]. The ``finally`` runs when the
        client disconnects too (Starlette cancels this generator), freeing the worker at its next token."""

        def chunk(delta: dict[str, Any] | None, **kwargs: Any) -> str:
            return sse(chunk_body(completion_id, created, model_id, delta, **kwargs))

        sent, finished = "", False
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                try:
                    kind, payload = await next_event(job, None, service.engine)
                except DeadlinePassed as e:  # a decoding step that never returned: the stream ends with a 503
                    kind, payload = "error", e
                if kind == "token":
                    token = payload["trust"]
                    sent += token["text"]
                    entry = payload["logprobs"]
                    yield chunk({"content": token["text"]}, trust=token, logprobs=None if entry is None else [entry])
                elif kind == "done":
                    output: PoEOutput = payload.output
                    log_answer(job.request_id, output, job)
                    trust = await answer_trust(output, job, signals)
                    # Text the incremental detokeniser held back until the end (an unfinished character).
                    tail = output.text[len(sent) :] if output.text.startswith(sent) else ""
                    finish = OPENAI_FINISH.get(output.finish_reason, "stop")
                    yield chunk({"content": tail} if tail else {}, finish_reason=finish, trust=trust)
                    if options is not None and options.include_usage:
                        yield chunk(None, usage_counts=usage(output))
                    break
                else:
                    error = service.job_error(payload)
                    yield sse(error_payload(error.status, error.message, error.param, error.code))
                    break
            yield sse("[DONE]")
            finished = True
        finally:
            if not finished:
                log.info("%s client disconnected mid-stream; decoding stops", job.request_id)
            service.engine.cancel(job)
            signals.cancel()

    return app


def log_answer(request_id: str, output: PoEOutput, job: Job) -> None:
    rate = output.acceptance_rate
    log.info(
        "%s answered: %d prompt + %d tokens in %.2f s (queued %.2f s), finish %s, acceptance %s, seed %s",
        request_id,
        len(output.prompt_ids),
        len(output.token_ids),
        output.elapsed_s,
        job.queue_s,
        output.finish_reason,
        "n/a" if rate is None else f"{rate:.2f}",
        output.settings.get("seed"),
    )
