"""A batch job on Ray Data: records checked on the driver, processed by actors that each hold one model, results
written by the driver as they arrive.

The driver reads the input, checks every record (``check_record``; bad ones are reported with file and line,
then skipped or fail the job before any work, per ``on_error``), drops those the output already holds, and hands
the rest to Ray Data as a dataset of tasks. ``map_batches`` runs them through ``workers`` actors (each loads the
model once, in its constructor, with ``threads`` torch threads and ``gpus`` GPUs) in batches of ``batch_size``
records; the driver streams the results back (``iter_rows``) and appends each to the output at once. Ray starts
in-process (a local cluster sized to the workers) unless ``address`` (or ``RAY_ADDRESS``) names one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from olmo_tap.batch.files import Output, read_records, record_digest
from olmo_tap.batch.work import JobSpec, RecordError, Worker, check_record

ON_ERROR = ("skip", "fail")


@dataclass
class BadRecord:
    where: str
    id: Any
    problem: str

    def describe(self) -> str:
        return f"{self.where}: {self.problem}"


@dataclass
class JobReport:
    command: str
    output: str
    records: int  # in the input
    done_before: int  # already in the output when the job started (resumed)
    done_now: int
    bad: list[BadRecord] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    first_result_s: float | None = None  # from the start to the first result: Ray's start and the actors' loads
    summary: dict[str, Any] = field(default_factory=dict)  # verify/audit: the pooled verdict, the flagged records

    @property
    def honest(self) -> bool | None:
        return self.summary.get("honest")

    def to_dict(self) -> dict[str, Any]:
        rate = self.done_now / self.seconds if self.seconds > 0 else None
        return {
            "command": self.command, "output": self.output, "records": self.records, "done_before": self.done_before,
            "done_now": self.done_now, "bad": [b.__dict__ for b in self.bad], "tokens": self.tokens,
            "seconds": self.seconds, "first_result_s": self.first_result_s, "records_per_second": rate,
            "tokens_per_second": self.tokens / self.seconds if self.seconds > 0 else None, **self.summary,
        }  # fmt: skip


class RayWorker:
    """Ray's actor: one ``Worker`` (one model), fed batches of tasks as JSON text, answering results as JSON text
    (a dataset's columns stay plain strings whatever a record holds)."""

    def __init__(self, spec: JobSpec) -> None:
        self.worker = Worker(spec)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        tasks = [json.loads(t) for t in batch["task"]]
        return {"result": np.array([json.dumps(r) for r in self.worker.process(tasks)], dtype=object)}


def run_job(
    spec: JobSpec,
    input_path: str | Path,
    output_path: str | Path,
    *,
    workers: int = 1,
    gpus_per_worker: float = 0,
    batch_size: int = 8,
    address: str | None = None,
    on_error: str = "skip",
    progress: bool = True,
    report_bad: Callable[[BadRecord], None] | None = None,
) -> JobReport:
    """Run ``spec`` over the records of ``input_path`` into ``output_path`` (resuming it); the report."""
    for name, value, low in (("workers", workers, 1), ("batch_size", batch_size, 1), ("threads", spec.threads, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    input_path = Path(input_path)
    output = Output(output_path)
    if output.path.resolve() == input_path.resolve():
        raise ValueError("the output must not be the input file")
    tasks, bad, total = _tasks(spec, input_path, on_error, report_bad)
    done = output.open(spec.identity(str(input_path.resolve())))
    report = JobReport(spec.command, str(output.path), total, 0, 0, bad)
    changed = [t for t in tasks if done.get(str(t["id"]), t["record_sha256"]) != t["record_sha256"]]
    if changed:
        output.close(False)
        raise ValueError(
            f"{changed[0]['where']}: record {changed[0]['id']!r} changed since its result was written to "
            f"{output.path}: name a new output, or remove that one and its .job.json to start over"
        )
    pending = [t for t in tasks if str(t["id"]) not in done]
    report.done_before = len(tasks) - len(pending)
    started, finished = time.perf_counter(), False
    try:
        if pending:
            cluster = Cluster(workers, gpus_per_worker, batch_size, address)
            _run_ray(spec, pending, output, report, cluster, on_error, progress, started)
        finished = True
    finally:
        report.seconds = time.perf_counter() - started
        output.close(finished)
    report.summary = summarize(spec.command, list(output.rows()))
    return report


def _tasks(
    spec: JobSpec, path: Path, on_error: str, report_bad: Callable[[BadRecord], None] | None
) -> tuple[list[dict[str, Any]], list[BadRecord], int]:
    tasks, bad, seen, total = [], [], set(), 0
    for record in read_records(path):
        total += 1
        try:
            if record.error is not None:
                raise RecordError(record.error)
            task = check_record(spec, record.value, record.index)
            if str(task["id"]) in seen:
                raise RecordError(f"id {task['id']!r} is used by an earlier record")
        except RecordError as e:
            problem = BadRecord(record.where, None, str(e))
            if on_error == "fail":
                raise ValueError(
                    f"{problem.describe()} (--on-error fail; --on-error skip leaves such records out)"
                ) from None
            bad.append(problem)
            if report_bad is not None:
                report_bad(problem)
            continue
        seen.add(str(task["id"]))
        digest = record_digest(record.value)
        tasks.append({**task, "index": record.index, "where": record.where, "record_sha256": digest})
    return tasks, bad, total


@dataclass(frozen=True)
class Cluster:
    """Where and how wide a job runs."""

    workers: int
    gpus_per_worker: float
    batch_size: int
    address: str | None


def _run_ray(
    spec: JobSpec,
    pending: list[dict[str, Any]],
    output: Output,
    report: JobReport,
    cluster: Cluster,
    on_error: str,
    progress: bool,
    started: float,
) -> None:
    import ray
    from tqdm.auto import tqdm

    started_here = _start_ray(cluster.address, cluster.workers * spec.threads, spec.threads)
    try:
        import logging

        from ray.data import DataContext

        # Ray Data's notes on each execution would drown the progress bar (set after its import configures them).
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        context = DataContext.get_current()
        context.enable_progress_bars = False  # the driver's bar below counts records and tokens
        context.execution_options.preserve_order = False  # results are written as they come
        tasks = [{"task": json.dumps(t)} for t in pending]
        blocks = max(1, math.ceil(len(tasks) / cluster.batch_size))
        dataset = ray.data.from_items(tasks, override_num_blocks=blocks)
        results = dataset.map_batches(
            RayWorker,
            fn_constructor_kwargs={"spec": spec},
            batch_size=cluster.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cluster.workers),
            num_cpus=spec.threads,
            num_gpus=cluster.gpus_per_worker,
        )
        where = {str(t["id"]): t["where"] for t in pending}
        digests = {str(t["id"]): t["record_sha256"] for t in pending}
        bar = tqdm(total=len(pending), desc=f"batch {spec.command}", unit="record", disable=not progress)
        for row in results.iter_rows():
            if report.first_result_s is None:
                report.first_result_s = time.perf_counter() - started
            result = json.loads(row["result"])
            if "error" in result:
                problem = BadRecord(where[str(result["id"])], result["id"], result["error"])
                report.bad.append(problem)
                if on_error == "fail":
                    raise ValueError(f"{problem.describe()} (--on-error fail)")
                print(f"olmo-tap batch: skipped {problem.describe()}", file=sys.stderr)
            else:
                key = {"id": result["id"], "index": result["index"], "record_sha256": digests[str(result["id"])]}
                output.write({**key, **result["result"]})
                report.done_now += 1
                report.tokens += result["tokens"]
            bar.update(1)
            elapsed = bar.format_dict.get("elapsed") or 0
            if elapsed > 0:
                bar.set_postfix_str(f"{report.tokens / elapsed:.1f} tok/s", refresh=False)
        bar.close()
    finally:
        if started_here:
            ray.shutdown()


def _start_ray(address: str | None, cpus: int, threads: int) -> bool:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local Ray with ``cpus`` CPUs; True when this
    process started it (and so stops it)."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    # Each actor's torch uses its own threads (OMP_NUM_THREADS would otherwise be 1 in Ray's workers); the
    # embedded default's converted weights are cached where the driver caches them.
    env = {"OMP_NUM_THREADS": str(threads)}
    if os.environ.get("OLMO_TAP_CACHE"):
        env["OLMO_TAP_CACHE"] = os.environ["OLMO_TAP_CACHE"]
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False, logging_level=logging.WARNING)
    else:
        ray.init(
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": env},
            object_store_memory=256 * 1024**2,  # tasks and results are small JSON texts
            logging_level=logging.WARNING,
        )
    return True


def summarize(command: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The dataset's verdict: verify pools every token of every record (the statistical rule's interval), audit
    every position of every transcript; both list the records flagged. Nothing for generate."""
    from olmo_tap.verify.verdict import decide

    if command == "generate" or not rows:
        return {}
    if command == "verify":
        verdicts = [r["verdict"] for r in rows]
        flagged = [r["id"] for r, v in zip(rows, verdicts, strict=True) if v["honest"] is False]
        n = sum(v["n_tokens"] for v in verdicts)
        k = sum(v["n_agreeing"] for v in verdicts)
    else:
        flagged = [r["id"] for r in rows if not r["honest"]]
        n = sum(r["statistics"]["n_tokens"] for r in rows)
        k = sum(r["statistics"]["n_agreeing"] for r in rows)
    pooled = decide([True] * k + [False] * (n - k))
    return {
        "honest": not flagged,
        "flagged": flagged,
        "pooled": {
            "n_tokens": n,
            "n_agreeing": k,
            "rate": pooled.agreement_rate,
            "ci95": [pooled.ci_low, pooled.ci_high],
            "reason": pooled.reason,
        },
    }
