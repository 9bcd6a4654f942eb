"""Does an answer depend on its batch? ``python -m olmo_tap.benchmarks.batch_invariance``

Decodes the same prompts, with the same seeds, all together in batches (``PoE.generate_many``, continuous
batching) and once each alone as a batch of one (``PoE.stream(batched=True)``, what an audit replays), in
every mode, and compares token for token and field for field (timings aside). Every batched transcript is
then audited under the audit's own rule (an exact replay in the generator's dtype). For information, the
tokens are also compared with the single-stream fast path (``PoE.stream``, not in batch arithmetic: one
product may round a lone row differently). Writes ``results/engine/batch_invariance.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from olmo_tap.benchmarks.concurrency import TOPICS

QUESTIONS = (
    "Tell me about {}.", "Write two sentences about {}.", "What would you ask {}?", "Describe {} in a few words.",
)  # fmt: skip


def prompts(n: int) -> list[str]:
    return [QUESTIONS[i % len(QUESTIONS)].format(TOPICS[i % len(TOPICS)]) for i in range(n)]


def compare(batched: Any, alone: Any) -> list[str]:
    """Names of the output fields (timings aside) where a batched answer differs from the same answer alone."""
    a, b = batched.to_dict(), alone.to_dict()
    skip = {"elapsed_s", "tokens_per_second"}
    diff = [k for k in a if k not in skip and k != "settings" and a[k] != b[k]]
    settings = {k for k in a["settings"] if a["settings"][k] != b["settings"].get(k)} - {"batched"}
    return diff + [f"settings.{k}" for k in sorted(settings)]


def run(model_name: str, n_prompts: int, max_tokens: int, max_batch: int, progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    from olmo_tap.benchmarks.harness import machine_info, software_versions
    from olmo_tap.engine.batch import batch_invariant
    from olmo_tap.inference.poe import PoE
    from olmo_tap.inference.settings import DecodeSettings
    from olmo_tap.inference.transcript import transcript_dict
    from olmo_tap.verify.poe_audit import audit_poe
    from olmo_tap.weights.loading import load_hydra
    from olmo_tap.weights.tokenizer import load_tokenizer

    model = load_hydra(model_name, progress=progress).prepack()
    tokenizer = load_tokenizer(model_name, progress=progress)
    runs = {
        "poe greedy": DecodeSettings(mode="poe", temperature=0.0),
        "poe T 0.8": DecodeSettings(mode="poe", temperature=0.8),
        "poe T 0.8 veto 1e-3": DecodeSettings(mode="poe", temperature=0.8, veto_threshold=1e-3),
        "naive T 0.8": DecodeSettings(mode="naive", temperature=0.8),
        "single T 0.8": DecodeSettings(mode="single", temperature=0.8),
    }
    texts = prompts(n_prompts)
    seeds = [1000 + i for i in range(n_prompts)]
    rows = []
    bar = tqdm(total=len(runs) * n_prompts * 2, desc="batch invariance", unit="answer", disable=not progress)
    for name, settings in runs.items():
        decoder = PoE.from_settings(model, tokenizer, settings.replace(max_new_tokens=max_tokens))
        started = time.perf_counter()
        together = decoder.generate_many(texts, max_batch=max_batch, seeds=seeds)
        batched_s = time.perf_counter() - started
        bar.update(n_prompts)
        alone, same_tokens, same_fields, differing, honest, fast_same = [], 0, 0, {}, 0, 0
        started = time.perf_counter()
        for text, seed, answer in zip(texts, seeds, together, strict=True):
            stream = decoder.stream(text, seed=seed, batched=True)
            for _ in stream:
                pass
            single = stream.output
            alone.append(single)
            fast_same += decoder.generate_with_cache(text, seed=seed).token_ids == answer.token_ids
            same_tokens += answer.token_ids == single.token_ids
            fields = compare(answer, single)
            same_fields += not fields
            for f in fields:
                differing[f] = differing.get(f, 0) + 1
            honest += audit_poe(transcript_dict(answer, model_name), model, tokenizer=tokenizer).honest
            bar.update()
        alone_s = time.perf_counter() - started
        tokens = sum(len(a.token_ids) for a in together)
        matching = sum(
            sum(x == y for x, y in zip(a.token_ids, b.token_ids, strict=False))
            for a, b in zip(together, alone, strict=True)
        )
        rows.append(
            {
                "run": name,
                "answers": n_prompts,
                "tokens": tokens,
                "tokens_matching": matching,
                "answers_same_tokens": same_tokens,
                "answers_same_fields": same_fields,
                "differing_fields": differing,
                "batched_transcripts_honest": honest,
                "answers_same_tokens_as_fast_path": fast_same,
                "batched_s": round(batched_s, 1),
                "alone_s": round(alone_s, 1),
            }
        )
    bar.close()
    return {
        "model": model_name,
        "max_tokens": max_tokens,
        "max_batch": max_batch,
        "batch_invariant": batch_invariant(model),
        "dtype": str(model.dtype).removeprefix("torch."),
        "machine": machine_info(model.device),
        "software": software_versions(),
        "runs": rows,
    }


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    total = sum(r["tokens"] for r in results["runs"])
    matching = sum(r["tokens_matching"] for r in results["runs"])
    lines = [
        f"Batch invariance: {results['model']} ({results['dtype']}), answers of up to {results['max_tokens']} "
        f"tokens decoded in batches of {results['max_batch']} (continuous batching) and alone as a batch of one, "
        "same seeds; "
        f"{m['cpu']} ({', '.join(m['cpu_flags'])}), {m['torch_threads']} threads. Kernels batch-invariant by "
        f"construction: {results['batch_invariant']}.",
        "",
        "| run | answers | tokens | tokens equal | answers equal (tokens / every field) | batched transcripts "
        "honest (exact rule) | answers equal to the fast path's (tokens) | batched s | alone s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['run']} | {r['answers']} | {r['tokens']} | {r['tokens_matching']} | {r['answers_same_tokens']} / "
            f"{r['answers_same_fields']} | {r['batched_transcripts_honest']} | "
            f"{r['answers_same_tokens_as_fast_path']} | {r['batched_s']} | {r['alone_s']} |"
        )
    lines += ["", f"Exact-match rate over {total} tokens: {matching / total:.4f} ({matching}/{total})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="results/engine")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args.model, args.prompts, args.max_tokens, args.max_batch, not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch_invariance.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "batch_invariance.md").write_text(markdown(results))
    print(markdown(results), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
