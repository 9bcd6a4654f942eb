"""The model's one worker thread and its bounded queue.

PoE is not thread-safe (one model, one KV cache), and decoding would block the event loop, so every piece of
work that touches the model runs on a single worker thread, one job at a time. Requests wait in a bounded
queue: when it is full, ``submit`` refuses at once (the app answers 429) instead of letting work pile up.

A job talks to its request through an asyncio queue on the request's event loop: the worker posts
``("started", None)``, any number of ``("token", ...)``, then ``("done", result)`` or ``("error", exc)``.
Between tokens the job's code calls ``job.stop_reason()`` (verification and audits call ``job.check_stop``
between blocks): a client that went away (``cancel``) or a passed deadline stops the decoding there. A job
cancelled while still waiting leaves the queue at once, so a disconnected client never holds a slot. The
request side enforces the deadline too (``cancel(job, "time_limit")``), so a request waiting behind a long
job gets its answer at its own deadline, not when the worker gets to it.

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
from typing import Any

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
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _cancel_reason: str = "cancelled"  # what stop_reason says once cancelled: "cancelled" or "time_limit"

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
        partial result (verification, audits), called between its blocks."""
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
    """One worker thread consuming a queue of at most ``queue_size`` waiting jobs."""

    def __init__(self, queue_size: int, name: str = "olmo-tap-worker") -> None:
        self.queue_size = queue_size
        self.name = name
        self.stats = EngineStats()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

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
            if self._running is not None:
                self._running._cancelled.set()
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
        """Queue ``work``; raises QueueFull when ``queue_size`` jobs already wait, EngineStopped on shutdown.

        Must be called from the event loop that will read the job's events.
        """
        job = Job(request_id, work, time.monotonic() + timeout_s, asyncio.get_running_loop())
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
        # In flight: the waiting jobs and the running one (or, if the worker has not yet woken up, the job it
        # is about to take): at most queue_size + 1.
        if len(self._waiting) + (self._running is not None) > self.queue_size:
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
                if reason == "time_limit":
                    self.stats.timed_out += 1
                else:
                    self.stats.cancelled += 1

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely free: the mean job time times the line ahead, at least 1."""
        return max(1, round(self.stats.mean_job_s * (len(self._waiting) + 1) / max(1, self.queue_size)))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "worker_alive": self.alive,
                "running": 0 if self._running is None else 1,
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

    def _next_job(self) -> Job | None:
        with self._lock:
            while not self._waiting and not self._stopping:
                self._lock.wait()
            if self._stopping:
                return None
            job = self._waiting.popleft()
            job.state, job.started = "running", time.monotonic()
            self._running = job
            return job

    def _loop(self) -> None:
        while (job := self._next_job()) is not None:
            try:
                self._run(job)
            except BaseException as e:  # never let one job end the worker, nor leave its request waiting
                log.exception("%s worker error outside the job", job.request_id)
                self.stats.failed += 1
                job.post("error", JobFailed(type(e).__name__))
            finally:
                with self._lock:
                    job.state = "done"
                    self._running = None

    def _run(self, job: Job) -> None:
        if job.cancelled:  # cancelled between dequeuing and now: its request has had its answer
            if job._cancel_reason == "time_limit":
                self.stats.timed_out += 1
            else:
                self.stats.cancelled += 1
            return
        if time.monotonic() > job.deadline:
            self.stats.timed_out += 1
            job.post("error", DeadlinePassed(f"the request waited longer than its time limit ({job.queue_s:.1f} s)"))
            return
        job.post("started")
        try:
            result = job.work(job)
        except DeadlinePassed as e:  # the work stopped itself between steps: the client left or time ran out
            if job.stopped == "cancelled":
                self.stats.cancelled += 1
            else:
                self.stats.timed_out += 1
            job.post("error", DeadlinePassed(str(e)))
            return
        except BaseException as e:  # MemoryError, a stray SystemExit: the request hears of it, the worker goes on
            self.stats.failed += 1
            log.exception("%s failed", job.request_id)
            # A fresh exception: the original's traceback would keep the job's frames (and tensors) alive.
            job.post("error", ValueError(str(e)) if isinstance(e, ValueError) else JobFailed(type(e).__name__))
            return
        duration = time.monotonic() - (job.started or job.submitted)
        self.stats.mean_job_s = 0.8 * self.stats.mean_job_s + 0.2 * duration
        # A job cancelled while running that finished without looking: its request was answered without it.
        stopped = job.stopped or (job._cancel_reason if job.cancelled else None)
        if stopped == "cancelled":
            self.stats.cancelled += 1
        elif stopped == "time_limit":
            self.stats.timed_out += 1
        else:
            self.stats.completed += 1
        job.post("done", result)
