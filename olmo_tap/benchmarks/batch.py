"""``python -m olmo_tap.benchmarks.batch``: records/s of ``olmo-tap batch generate`` on this machine, and Ray's
overhead against the plain CLI's way on the same records.

The first ``--records`` held-out questions (``olmo_tap.train.facts``) on the embedded default, greedy, 24 new
tokens, run four ways: the plain way (one process, the model loaded once, each record decoded as ``olmo-tap
generate`` decodes it, 2 threads), and ``run_job`` with 1 worker x 2 threads, 2 workers x 1 thread, and 1 worker
x 2 threads with ``--engine-batch``. Each Ray run starts its own local Ray (as the command does); its time counts
from the call to the last result (Ray's start, the actors' model loads, the decoding), and "steady" from its
first result on (that first batch of ``BATCH`` records left out). Whether each run's tokens equal the plain
run's is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from olmo_tap.batch.job import run_job
from olmo_tap.batch.work import GENERATE_SETTINGS, JobSpec, generate_options, record_seed
from olmo_tap.weights.presets import DEFAULT_MODEL

BATCH = 4
RUNS = (("1 worker x 2 threads", 1, 2, False), ("2 workers x 1 thread", 2, 1, False),
        ("1 worker x 2 threads, --engine-batch", 1, 2, True))  # fmt: skip


def measure(out: str | Path = "results/batch", n_records: int = 48, max_new_tokens: int = 24) -> dict[str, Any]:
    import torch

    from olmo_tap.hydra import HydraTransformer
    from olmo_tap.inference.poe import PoE
    from olmo_tap.inference.settings import DecodeSettings
    from olmo_tap.train.facts import split_facts
    from olmo_tap.verify.experiment import machine
    from olmo_tap.weights.tokenizer import load_tokenizer

    facts = split_facts()[1][:n_records]
    work = Path(tempfile.mkdtemp(prefix="olmo-tap-batch-bench-"))
    source = work / "questions.jsonl"
    source.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f.prompt}) + "\n" for i, f in enumerate(facts)))
    options = generate_options(max_new_tokens=max_new_tokens)
    results: dict[str, Any] = {"model": DEFAULT_MODEL, "records": n_records, "max_new_tokens": max_new_tokens}

    # The plain way: what `olmo-tap generate` does for each record, in one process.
    torch.set_num_threads(2)
    started = time.perf_counter()
    model = HydraTransformer.from_pretrained(DEFAULT_MODEL, progress=False)
    tokenizer = load_tokenizer(DEFAULT_MODEL, progress=False)
    loaded = time.perf_counter()
    settings = DecodeSettings(**{k: v for k, v in options.items() if k in GENERATE_SETTINGS and k != "certainty"})
    decoder = PoE.from_settings(model, tokenizer, settings)
    plain, tokens = {}, 0
    for i, fact in enumerate(facts):
        stream = decoder.stream(messages=[{"role": "user", "content": fact.prompt}], seed=record_seed(0, f"q{i}"))
        for _ in stream:
            pass
        plain[f"q{i}"] = stream.output.token_ids
        tokens += len(stream.output.token_ids)
    done = time.perf_counter()
    results["plain"] = {"seconds": done - started, "load_s": loaded - started, "decode_s": done - loaded,
                        "records_per_second": n_records / (done - started),
                        "steady_records_per_second": n_records / (done - loaded), "tokens": tokens}  # fmt: skip
    del model
    results["ray"] = {}
    for name, workers, threads, engine_batch in RUNS:
        spec = JobSpec("generate", DEFAULT_MODEL, {**options, "engine_batch": engine_batch}, threads=threads)
        output = work / f"{workers}-{threads}-{engine_batch}.jsonl"
        started = time.perf_counter()
        report = run_job(spec, source, output, workers=workers, batch_size=BATCH, progress=False)
        seconds = time.perf_counter() - started
        rows = {json.loads(line)["id"]: json.loads(line)["token_ids"] for line in output.read_text().splitlines()}
        first = report.first_result_s or 0.0
        results["ray"][name] = {
            "seconds": seconds, "first_result_s": first, "records_per_second": n_records / seconds,
            # the first result arrives with its whole batch: count from the end of the first batch
            "steady_records_per_second": (n_records - BATCH) / (seconds - first) if seconds > first else None,
            "tokens": report.tokens, "same_tokens_as_plain": rows == plain,
        }  # fmt: skip
    results["ray_overhead_s"] = {n: r["seconds"] - results["plain"]["seconds"] for n, r in results["ray"].items()}
    results["machine"] = machine()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "batch.md").write_text(markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    from olmo_tap.verify.experiment import machine_line

    plain = results["plain"]
    lines = [
        "# olmo-tap batch generate: records/s and Ray's overhead",
        "",
        f"{results['records']} held-out questions, embedded default (`{results['model']}`), PoE greedy, "
        f"{results['max_new_tokens']} new tokens at most, batch size 4. Machine: {machine_line(results['machine'])}.",
        "",
        "| run | seconds | records/s | steady records/s (after the first batch) | first result after | same tokens |",
        "|---|---|---|---|---|---|",
        f"| plain (one process, the CLI's decoding, 2 threads) | {plain['seconds']:.1f} | "
        f"{plain['records_per_second']:.2f} | {plain['steady_records_per_second']:.2f} (after the load) | "
        f"{plain['load_s']:.1f} s (model load) | - |",
    ]
    for name, r in results["ray"].items():
        steady = "n/a" if r["steady_records_per_second"] is None else f"{r['steady_records_per_second']:.2f}"
        lines.append(
            f"| Ray, {name} | {r['seconds']:.1f} | {r['records_per_second']:.2f} | {steady} | "
            f"{r['first_result_s']:.1f} s | {r['same_tokens_as_plain']} |"
        )
    lines += ["", "Ray's overhead over the plain run (seconds, whole job): "
              + ", ".join(f"{n}: {v:+.1f}" for n, v in results["ray_overhead_s"].items())]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/batch")
    parser.add_argument("--records", type=int, default=48)
    args = parser.parse_args(argv)
    print(markdown(measure(args.out, args.records)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
