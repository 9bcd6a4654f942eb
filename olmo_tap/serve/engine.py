"""The model's one worker thread: a batch of decoding answers, other model work between its steps, and a
bounded queue.

One thread does every piece of work that touches the model (decoding would block the event loop, and one
thread keeps the kernels' thread pool to itself). Answers are decoded together: a decode job (``DecodeWork``)
takes a slot of the batch's cache when one is free and joins the batch at the next step; every step advances
each answer in the batch by one op (a draft step, a verification, a plain step) in batched passes
(``olmo_tap.engine.batch``), except a verification that waits a few steps for the others' drafts so that the
batch's rounds end together (``due``); an answer leaves when it is done, its client went away or its time ran out, and
its slot goes to the next job in line. Other work (verification, audits) runs on the same thread between
steps, and at each of its blocks (``job.check_stop``) the batch takes one step: answers being decoded never
wait longer than one block of that work. Requests wait in a bounded queue: when it is full, ``submit``
refuses at once (the app answers 429) instead of letting work pile up.

A job talks to its request through an asyncio queue on the request's event loop: the worker posts
``("started", None)``, any number of ``("token", ...)``, then ``("done", result)`` or ``("error", exc)``.
A client that went away (``cancel``) or a passed deadline stops a decoding answer before its next step (its
answer so far is the result, with ``job.stopped`` set), and other work at its next block. A job cancelled
while still waiting leaves the queue at once, so a disconnected client never holds a slot. The request side
enforces the deadline too (``cancel(job, "time_limit")``), so a request waiting behind long work gets its
answer at its own deadline, not when the worker gets to it.

Whatever a job raises, BaseException included (MemoryError, a stray SystemExit), becomes an error event for
its request and a ``failed`` count; the worker goes on with the next job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from olmo_tap.engine.batch import BatchRunner, Op, due

log = logging.getLogger("olmo_tap.serve")


class QueueFull(Exception):
    """The waiting line is full; retry after ``retry_after_s``."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the server is busy; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class DeadlinePassed(Exception):
    """The job's time ran out (or its client left) before its work could start or finish."""


class EngineStopped(Exception):
    """The server is shutting down."""


class JobFailed(Exception):
    """A job raised something unexpected; carries only the exception's type name, so neither internals nor
    the traceback (whose frames may hold the job's tensors) reach the request."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class DecodeWork(Protocol):
    """A decode job's side of the batch (see ``olmo_tap.serve.generation.GenerationWork``)."""

    def begin(self, job: Job, runner: BatchRunner, slot: int) -> Op | None:
        """Start in ``slot`` of the runner's cache; the first op (None: nothing to decode)."""
        ...

    def advance(self, job: Job, result: Any) -> Op | None:
        """Take the last op's result (post its tokens); the next op, or None when the answer is complete."""
        ...

    def finish(self, job: Job) -> Any:
        """The answer (``job.stopped`` set when it was stopped early): what "done" carries."""
        ...


@dataclass(eq=False)
class Job:
    """One piece of model work and the channel back to the request that asked for it."""

    request_id: str
    work: Callable[[Job], Any]  # runs on the worker thread; returns the result
    deadline: float  # time.monotonic() after which the job must stop
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    state: str = "queued"  # queued | running | done
    stopped: str | None = None  # set by the work when it stopped early: "cancelled" or "time_limit"
    decode: DecodeWork | None = None  # a decode job: decoded in the batch, not run by ``work``
    slot: int | None = None  # its slot of the batch's cache, while decoding
    op: Op | None = None  # the op it waits for, while decoding
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _cancel_reason: str = "cancelled"  # what stop_reason says once cancelled: "cancelled" or "time_limit"
    _between_blocks: Callable[[], None] | None = None  # the batch's step, run at each check_stop

    def post(self, kind: str, payload: Any = None) -> None:
        """Hand an event to the request's event loop (called from the worker thread)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def stop_reason(self) -> str | None:
        """Why the job should stop now: "cancelled" (the client left), "time_limit", or None to go on."""
        if self._cancelled.is_set():
            return self._cancel_reason
        if time.monotonic() > self.deadline:
            return "time_limit"
        return None

    def check_stop(self) -> None:
        """Raise DeadlinePassed (with ``stopped`` set) when the job should stop: for work that cannot return a
        partial result (verification, audits), called between its blocks. Also where the batch of decoding
        answers takes its next step."""
        if self._between_blocks is not None:
            self._between_blocks()
        if reason := self.stop_reason():
            self.stopped = reason
            why = "its client went away" if reason == "cancelled" else "its time limit passed"
            raise DeadlinePassed(f"the request was stopped: {why} ({time.monotonic() - self.submitted:.1f} s)")

    @property
    def queue_s(self) -> float:
        return (self.started or time.monotonic()) - self.submitted


@dataclass
class EngineStats:
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    rejected: int = 0
    mean_job_s: float = 1.0  # moving average of job durations, for Retry-After


class Engine:
    """One worker thread: a batch of at most ``runner.cache.slots`` decoding answers, other work between its
    steps, and at most ``queue_size`` jobs waiting beyond a full batch. Without a runner it runs plain work only
    (one job at a time)."""

    def __init__(self, queue_size: int, runner: BatchRunner | None = None, name: str = "olmo-tap-worker") -> None:
        self.queue_size = queue_size
        self.runner = runner
        self.max_batch = runner.cache.slots if runner is not None else 0
        self.name = name
        self.stats = EngineStats()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None  # plain work now running
        self._active: list[Job] = []  # decode jobs in the batch
        self._free_slots = list(range(self.max_batch))
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.rows_stepped = 0  # rows over all steps: the mean batch is rows_stepped / steps

    # ----- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new work, cancel everything waiting or running, and join the worker."""
        with self._lock:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            for job in [self._running, *self._active]:
                if job is not None:
                    job._cancelled.set()
            self._lock.notify_all()
        for job in waiting:
            job.post("error", EngineStopped("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ----- the request side -----------------------------------------------------------------------------------

    def submit(self, request_id: str, work: Callable[[Job], Any], timeout_s: float) -> Job:
        """Queue plain ``work``; raises QueueFull when the queue is full, EngineStopped on shutdown.

        Must be called from the event loop that will read the job's events.
        """
        return self._enqueue(Job(request_id, work, time.monotonic() + timeout_s, asyncio.get_running_loop()))

    def submit_decode(self, request_id: str, decode: DecodeWork, timeout_s: float) -> Job:
        """Queue an answer to decode in the batch; refused like ``submit``."""
        if self.runner is None:
            raise EngineStopped("this engine decodes nothing (it has no batch runner)")
        job = Job(request_id, _no_work, time.monotonic() + timeout_s, asyncio.get_running_loop(), decode=decode)
        return self._enqueue(job)

    def _enqueue(self, job: Job) -> Job:
        with self._lock:
            if self._stopping or not self.alive:
                raise EngineStopped("the server is shutting down")
            self._refuse_if_full()
            self._waiting.append(job)
            self._lock.notify()
        return job

    def check_capacity(self) -> None:
        """Raise QueueFull now if a job submitted now would be refused: lets a request be refused before its
        expensive checks (tokenising a long prompt), not after."""
        with self._lock:
            self._refuse_if_full()

    def _refuse_if_full(self) -> None:
        # In flight: the waiting jobs and the running ones (or those the worker is about to take): at most a full
        # batch (at least one job) plus queue_size.
        running = len(self._active) + (self._running is not None)
        if len(self._waiting) + running > self.queue_size + max(1, self.max_batch) - 1:
            self.stats.rejected += 1
            raise QueueFull(self.retry_after_s())

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """Stop a job: drop it if it still waits, else make its next ``stop_reason`` return ``reason``
        ("cancelled": the client went away; "time_limit": the request side saw its deadline pass)."""
        with self._lock:
            if job.state == "done" or job.cancelled:
                return
            job._cancel_reason = reason
            job._cancelled.set()
            if job.state == "queued":
                with contextlib.suppress(ValueError):
                    self._waiting.remove(job)
                job.state = "done"
                self._count_stopped(reason)

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely free: the mean job time times the line ahead, at least 1."""
        return max(1, round(self.stats.mean_job_s * (len(self._waiting) + 1) / max(1, self.queue_size)))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "worker_alive": self.alive,
                "running": len(self._active) + (self._running is not None),
                "batch": len(self._active),
                "max_batch": self.max_batch,
                "mean_batch": round(self.rows_stepped / self.steps, 2) if self.steps else 0.0,
                "waiting": len(self._waiting),
                "queue_size": self.queue_size,
                "completed": self.stats.completed,
                "failed": self.stats.failed,
                "cancelled": self.stats.cancelled,
                "timed_out": self.stats.timed_out,
                "rejected": self.stats.rejected,
                "mean_job_s": round(self.stats.mean_job_s, 3),
            }

    # ----- the worker -----------------------------------------------------------------------------------------

    def _next_job(self) -> tuple[bool, Job | None]:
        """(go on, the next job to start or None): waits while there is nothing to do at all."""
        with self._lock:
            while not self._waiting and not self._active and not self._stopping:
                self._lock.wait()
            if self._stopping:
                return False, None
            if not self._waiting or (self._waiting[0].decode is not None and not self._free_slots):
                return True, None  # the batch steps on; the next in line waits for a slot
            job = self._waiting.popleft()
            job.state, job.started = "running", time.monotonic()
            if job.decode is not None:
                job.slot = self._free_slots.pop(0)
                self._active.append(job)
            else:
                self._running = job
            return True, job

    def _loop(self) -> None:
        while True:
            go_on, job = self._next_job()
            if not go_on:
                break
            if job is None:
                self._step()
                continue
            try:
                if job.decode is not None:
                    self._begin(job)
                else:
                    self._run(job)
            except BaseException as e:  # never let one job end the worker, nor leave its request waiting
                log.exception("%s worker error outside the job", job.request_id)
                self.stats.failed += 1
                job.post("error", JobFailed(type(e).__name__))
                self._leave(job)
            finally:
                if job.decode is None:
                    with self._lock:
                        job.state = "done"
                        self._running = None
        for job in list(self._active):  # shutting down: answers in the batch end here
            job.post("error", EngineStopped("the server is shutting down"))
            self._leave(job)

    def _too_late(self, job: Job) -> bool:
        """Handle a job cancelled or past its deadline before it started; True when it must not start."""
        if job.cancelled:  # cancelled between dequeuing and now: its request has had its answer
            self._count_stopped(job._cancel_reason)
            return True
        if time.monotonic() > job.deadline:
            self.stats.timed_out += 1
            job.post("error", DeadlinePassed(f"the request waited longer than its time limit ({job.queue_s:.1f} s)"))
            return True
        return False

    def _begin(self, job: Job) -> None:
        """Start a decode job in its slot; it takes its first step with the batch's next."""
        assert job.decode is not None and job.slot is not None and self.runner is not None
        if self._too_late(job):
            self._leave(job)
            return
        job.post("started")
        try:
            job.op = job.decode.begin(job, self.runner, job.slot)
        except BaseException as e:
            self._fail(job, e)
            return
        if job.op is None:
            self._end(job)

    def _step(self) -> None:
        """One step of every answer in the batch: stopped ones leave first, the rest advance by one op."""
        if self.runner is None:
            return
        for job in list(self._active):
            if reason := job.stop_reason():
                job.stopped = reason
                self._end(job)
        waiting = [job for job in self._active if job.op is not None]
        now = due([job.op for job in waiting])  # type: ignore[misc]
        batch = [job for job, go in zip(waiting, now, strict=True) if go]
        if not batch:
            return
        try:
            results = self.runner.run([job.op for job in batch])  # type: ignore[misc]
        except BaseException as e:  # a batched pass failed: no row's result can be trusted
            for job in batch:
                self._fail(job, e)
            return
        self.steps += 1
        self.rows_stepped += len(batch)
        for job, result in zip(batch, results, strict=True):
            try:
                job.op = job.decode.advance(job, result)  # type: ignore[union-attr]
            except BaseException as e:
                self._fail(job, e)
                continue
            if job.op is None:
                self._end(job)

    def _end(self, job: Job) -> None:
        """A decode job is complete or stopped: post its answer and free its slot."""
        try:
            result = job.decode.finish(job)  # type: ignore[union-attr]
        except BaseException as e:
            self._fail(job, e)
            return
        self._account(job)
        job.post("done", result)
        self._leave(job)

    def _fail(self, job: Job, e: BaseException) -> None:
        self.stats.failed += 1
        log.error("%s failed: %s", job.request_id, type(e).__name__, exc_info=e)
        # A fresh exception: the original's traceback would keep the job's frames (and tensors) alive.
        job.post("error", ValueError(str(e)) if isinstance(e, ValueError) else JobFailed(type(e).__name__))
        self._leave(job)

    def _leave(self, job: Job) -> None:
        """Take a decode job out of the batch and free its slot (no-op for other jobs)."""
        with self._lock:
            job.state = "done"
            if job in self._active:
                self._active.remove(job)
            if job.slot is not None:
                if self.runner is not None:
                    self.runner.cache.release(job.slot)
                self._free_slots.append(job.slot)
                self._free_slots.sort()
                job.slot = None
            job.op = None

    def _account(self, job: Job) -> None:
        """Count a finished job by how it ended, and its time in the moving average."""
        duration = time.monotonic() - (job.started or job.submitted)
        self.stats.mean_job_s = 0.8 * self.stats.mean_job_s + 0.2 * duration
        # A job cancelled while running that finished without looking: its request was answered without it.
        stopped = job.stopped or (job._cancel_reason if job.cancelled else None)
        if stopped:
            self._count_stopped(stopped)
        else:
            self.stats.completed += 1

    def _count_stopped(self, reason: str) -> None:
        if reason == "time_limit":
            self.stats.timed_out += 1
        else:
            self.stats.cancelled += 1

    def _run(self, job: Job) -> None:
        """Plain work, with the batch stepping at each of its blocks."""
        if self._too_late(job):
            return
        job.post("started")
        job._between_blocks = self._step
        try:
            result = job.work(job)
        except DeadlinePassed as e:  # the work stopped itself between steps: the client left or time ran out
            self._count_stopped(job.stopped or "time_limit")
            job.post("error", DeadlinePassed(str(e)))
            return
        except BaseException as e:  # MemoryError, a stray SystemExit: the request hears of it, the worker goes on
            self.stats.failed += 1
            log.exception("%s failed", job.request_id)
            job.post("error", ValueError(str(e)) if isinstance(e, ValueError) else JobFailed(type(e).__name__))
            return
        finally:
            job._between_blocks = None
        self._account(job)
        job.post("done", result)


def _no_work(job: Job) -> None:
    raise RuntimeError("a decode job is decoded in the batch, never run as plain work")
