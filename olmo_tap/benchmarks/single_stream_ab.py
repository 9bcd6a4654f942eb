"""Single-stream speed of this checkout against another (``python -m olmo_tap.benchmarks.single_stream_ab
--previous DIR``, DIR a ``git worktree`` of the commit to compare with): one fresh process per measurement,
alternating the two checkouts, each loading the clones preset, decoding one warm-up answer, then ``answers``
greedy answers of ``tokens`` tokens (end of text ignored) with ``mode=single`` and ``mode=poe`` through
``PoE.generate_with_cache``; the median tok/s of each. Writes a JSON and a Markdown table."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

CHILD = r"""
import json, statistics, sys, time, torch
from olmo_tap import HydraTransformer, load_tokenizer
from olmo_tap.inference.poe import PoE
torch.set_num_threads(int(sys.argv[1]))
answers, tokens = int(sys.argv[2]), int(sys.argv[3])
name = "smollm2-135m-instruct-clones"
model, tokenizer = HydraTransformer.from_pretrained(name), load_tokenizer(name)
prompt = "Tell me a long story about a lighthouse keeper."
out = {}
for mode in ("single", "poe"):
    kwargs = {"head": 0} if mode == "single" else {"draft_head": 0}
    decoder = PoE(model, tokenizer, mode=mode, gamma=4, max_new_tokens=tokens, ignore_eos=True, **kwargs)
    decoder.generate_with_cache(prompt, temperature=0)
    rates = []
    for _ in range(answers):
        start = time.perf_counter()
        answer = decoder.generate_with_cache(prompt, temperature=0)
        rates.append(len(answer.token_ids) / (time.perf_counter() - start))
    out[mode] = statistics.median(rates)
import olmo_tap
out["module"] = olmo_tap.__file__
print(json.dumps(out))
"""


def measure(checkout: Path, threads: int, answers: int, tokens: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(threads), str(answers), str(tokens)],
        cwd=checkout, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(checkout)},  # this checkout's olmo_tap before the installed one
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--previous", type=Path, required=True, help="a checkout (git worktree) to compare with")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--answers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/engine/single_stream_ab"))
    args = parser.parse_args()
    this = Path(__file__).resolve().parents[2]
    pairs = []
    for i in range(args.pairs):
        previous = measure(args.previous.resolve(), args.threads, args.answers, args.tokens)
        current = measure(this, args.threads, args.answers, args.tokens)
        pairs.append({"previous": previous, "this": current})
        print(f"pair {i + 1}: previous {previous}, this {current}", flush=True)
    mean = {
        who: {mode: statistics.mean(p[who][mode] for p in pairs) for mode in ("single", "poe")}
        for who in ("previous", "this")
    }
    ratio = {mode: mean["this"][mode] / mean["previous"][mode] for mode in ("single", "poe")}
    from olmo_tap.benchmarks.harness import machine_info

    machine = machine_info(torch.device("cpu"))
    result = {
        "machine": machine, "previous": str(args.previous), "pairs": pairs, "mean": mean, "ratio": ratio,
        "threads": args.threads, "answers": args.answers, "tokens": args.tokens,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        f"| {i + 1} | {p['previous']['single']:.2f} | {p['this']['single']:.2f} | {p['previous']['poe']:.2f} | "
        f"{p['this']['poe']:.2f} |"
        for i, p in enumerate(pairs)
    ]
    rows.append(
        f"| mean | {mean['previous']['single']:.2f} | {mean['this']['single']:.2f} ({ratio['single']:.2f}x) | "
        f"{mean['previous']['poe']:.2f} | {mean['this']['poe']:.2f} ({ratio['poe']:.2f}x) |"
    )
    table = "\n".join(
        [
            "| pair | previous single | this single | previous PoE g4 | this PoE g4 |",
            "|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    header = (
        f"Single stream, this checkout against {args.previous} (fresh processes, alternating): {args.answers} greedy "
        f"answers of {args.tokens} tokens per measurement, median tok/s, clones preset; {machine['cpu']} "
        f"({', '.join(machine['cpu_flags'])}), {args.threads} threads.\n\n"
    )
    args.out.with_suffix(".md").write_text(header + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
