"""``olmo-tap bench``: time the decoders, write results.json and graph.png, print Markdown tables."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any

from olmo_tap.cli import int_list, str_list

# Command-line flags that override config keys one to one (dest -> config key).
OVERRIDES = {
    "model": "model",
    "heads": "heads",
    "heads_depth": "heads_depth",
    "dtype": "dtype",
    "device": "device",
    "extra_heads": "extra_heads",
    "gammas": "gammas",
    "samplings": "samplings",
    "prompt_length": "prompt_length",
    "gen_length": "gen_length",
    "temperature": "temperature",
    "beta": "beta",
    "seed": "seed",
    "threads": "threads",
    "warmup_ms": "warmup_ms",
    "measure_ms": "measure_ms",
    "min_repeats": "min_repeats",
    "max_repeats": "max_repeats",
    "jury_model": "jury_model",
}


def register(sub: Any, add_model_args: Any) -> None:
    bench = sub.add_parser(
        "bench",
        help="time baseline, naive, PoE (per gamma) and transformers' generate(); write results.json + graph.png",
        description="Benchmark the decoders back to back in one process. Knobs: olmo_tap/benchmarks/config.json, "
        "overridden by --config FILE, --quick and the flags below.",
    )
    bench.add_argument("--config", default=None, help="JSON file of config keys (see olmo_tap/benchmarks/config.json)")
    bench.add_argument(
        "--quick", action="store_true", help="the config's short 'quick' run (~4 min on 2 CPU cores, half compiling)"
    )
    add_model_args(bench)
    bench.set_defaults(model=None)  # None: the config's model, so a --config file is not overridden silently
    knobs = bench.add_argument_group("benchmark knobs (override the config)")
    knobs.add_argument("--extra-heads", type=int_list, default=None, help="e.g. 9 or '' for none")
    knobs.add_argument("--gammas", type=int_list, default=None, help="PoE gamma sweep, e.g. 1,2,4,8")
    knobs.add_argument("--samplings", type=str_list, default=None, help="greedy,sampled")
    knobs.add_argument("--prompt-length", type=int, default=None)
    knobs.add_argument("--gen-length", type=int, default=None)
    knobs.add_argument("--temperature", type=float, default=None, help="of the sampled PoE runs")
    knobs.add_argument("--beta", type=float, default=None)
    knobs.add_argument("--seed", type=int, default=None)
    knobs.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    knobs.add_argument("--warmup-ms", type=float, default=None)
    knobs.add_argument("--measure-ms", type=float, default=None, help="measurement budget per configuration")
    knobs.add_argument("--min-repeats", type=int, default=None)
    knobs.add_argument("--max-repeats", type=int, default=None)
    knobs.add_argument("--no-hf", action="store_true", help="do not time transformers' generate()")
    knobs.add_argument(
        "--jury-model", default=None, help="a trained jury timed in its own group (default: the config's)"
    )
    knobs.add_argument("--no-jury", action="store_true", help="do not time a trained jury beside the model")
    sweep = bench.add_argument_group("concurrency sweep (instead of the decoder benchmark)")
    sweep.add_argument(
        "--concurrency",
        type=int_list,
        default=None,
        metavar="STREAMS",
        help="e.g. 1,2,4,8,16: that many streamed answers at once through the HTTP server and the Python API "
        "(greedy PoE on --model, default the embedded default)",
    )
    sweep.add_argument("--max-batch", type=int, default=8, help="the server's batch in the sweep (default 8)")
    sweep.add_argument("--max-tokens", type=int, default=64, help="tokens per answer in the sweep (default 64)")
    sweep.add_argument("--repeats", type=int, default=2, help="rounds over all levels in the sweep (default 2)")
    sweep.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests each level serves, the streams sending the next as theirs end (default: the largest level, "
        "at least 8: one wave at the top level; several times the largest level measures a steady state)",
    )
    out = bench.add_argument_group("output")
    out.add_argument("--results-dir", default="results", help="runs go to <this>/<date>_runNN/ (default: results)")
    out.add_argument(
        "--report",
        default=None,
        metavar="RUN_DIR",
        help="no run: re-print the tables and redraw the graph of an existing run directory (or results.json)",
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench.set_defaults(func=cmd_bench)


def _command_line(args: argparse.Namespace) -> str:
    """The command, rebuilt from what was given (for the record in results.json)."""
    words = ["olmo-tap", "bench"]
    if args.config:
        words += ["--config", args.config]
    if args.quick:
        words.append("--quick")
    for dest in OVERRIDES:
        value = getattr(args, dest)
        if value is not None:
            value = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            words += ["--" + dest.replace("_", "-"), value]
    words += [flag for flag, on in (("--no-hf", args.no_hf), ("--no-jury", args.no_jury)) if on]
    return shlex.join(words)


def cmd_bench(args: argparse.Namespace) -> int:
    from olmo_tap.benchmarks.inference import load_results, next_run_dir, run_benchmark, write_results
    from olmo_tap.benchmarks.plotting import plot_results
    from olmo_tap.benchmarks.report import markdown_report

    if args.report and _concurrency_results(Path(args.report)) is not None:
        from olmo_tap.benchmarks import concurrency

        path = Path(args.report)
        results = _concurrency_results(path)
        concurrency.plot(results, (path if path.is_dir() else path.parent) / "graph.png")  # type: ignore[arg-type]
        print(concurrency.markdown(results), end="")  # type: ignore[arg-type]
        return 0
    if args.concurrency is not None:
        return cmd_concurrency(args)
    if args.report:
        results = load_results(Path(args.report))
        directory = Path(args.report) if Path(args.report).is_dir() else Path(args.report).parent
        plot_results(results, directory / "graph.png")
        print(markdown_report(results), end="")
        return 0

    from olmo_tap.benchmarks.config import load_config

    overrides: dict[str, Any] = {key: getattr(args, dest) for dest, key in OVERRIDES.items()}
    if args.no_hf:
        overrides["hf_generate"] = False
    config = load_config(args.config, quick=args.quick, overrides=overrides)
    if args.no_jury:
        config = dataclasses.replace(config, jury_model=None)
    results = run_benchmark(config, command=_command_line(args), progress=not args.no_progress)
    directory = next_run_dir(Path(args.results_dir))
    json_path, graph_path = write_results(results, directory)
    print(markdown_report(results), end="")
    print(f"\nwrote {json_path} and {graph_path}", file=sys.stderr)
    return 0


def _concurrency_results(path: Path) -> dict[str, Any] | None:
    """A concurrency sweep's results.json (at ``path`` or in it), or None for anything else."""
    import json

    file = path / "results.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == "concurrency" else None


def cmd_concurrency(args: argparse.Namespace) -> int:
    from olmo_tap.benchmarks import concurrency
    from olmo_tap.benchmarks.inference import next_run_dir

    levels = args.concurrency
    if not levels or any(n < 1 for n in levels):
        raise ValueError(f"--concurrency needs stream counts >= 1, e.g. 1,2,4,8,16; got {levels}")
    for flag, value in (
        ("--max-batch", args.max_batch),
        ("--max-tokens", args.max_tokens),
        ("--repeats", args.repeats),
        ("--requests", 1 if args.requests is None else args.requests),
    ):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.requests is not None and args.requests < max(levels):
        raise ValueError(f"--requests {args.requests} cannot keep {max(levels)} streams busy: give at least as many")
    results = concurrency.run_sweep(
        args.model or "smollm2-135m-instruct",
        sorted(set(levels)),
        max_tokens=args.max_tokens,
        max_batch=args.max_batch,
        repeats=args.repeats,
        requests=args.requests,
        threads=args.threads,
        progress=not args.no_progress,
    )
    directory = next_run_dir(Path(args.results_dir))
    json_path, graph_path = concurrency.write(results, directory)
    print(concurrency.markdown(results), end="")
    print(f"\nwrote {json_path} and {graph_path}", file=sys.stderr)
    return 0
