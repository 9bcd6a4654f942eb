"""The audit of quantized answers: each route's transcripts replayed by an auditor whose own default is the other.

    python -m olmo_tap.verify.experiment --part quantized [--n 24] [--out results/quant]

``--n`` jury answers (PoE, the audit experiment's prompts and configurations: greedy and T 0.8, veto off and
1e-3, 16/32/48 new tokens) are decoded with the embedded default's GGUF weights (``--quantize gguf``) on the
native kernel route and again on the dequantize route. Each transcript is audited with the other route as the
auditor's default, so that only the route the transcript records can make the replay exact; then two
single-token edits of each (a random token at a random position, and the jury's runner-up at its closest call)
are audited under both claims a forger could make there (``audit_experiment.substitution_caught``). Writes
``audit_quantized.{json,md}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from tqdm.auto import tqdm

from olmo_tap.hydra import HydraTransformer
from olmo_tap.quant import linear as qlinear
from olmo_tap.verify import forgery
from olmo_tap.verify.audit_experiment import (
    DEFAULT_MODEL,
    SEED,
    _row,
    _substitution_row,
    audit,
    generate,
    prompts,
    rows_table,
    runner_up,
    substitution_caught,
)
from olmo_tap.verify.experiment import machine, machine_line, write_results
from olmo_tap.verify.poe_audit import PoEAudit
from olmo_tap.weights.tokenizer import load_tokenizer

ROUTES = (("native", "dequantize"), ("dequantize", "native"))  # (the generator's route, the auditor's default)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--n", type=int, default=24, help="honest transcripts per route")
    parser.add_argument("--out", default="results/quant")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    texts = prompts(args.n)
    rng = random.Random(SEED)
    tokenizer = load_tokenizer(args.model)
    model = HydraTransformer.from_pretrained(args.model, quantize="gguf", progress=False)
    rows: list[dict[str, Any]] = []
    exact: dict[str, dict[str, int]] = {}
    for route, auditor in ROUTES:
        where = f"gguf {route} -> auditor defaulting to {auditor}"
        with qlinear.route_as(route):
            transcripts = generate(model, tokenizer, texts, f"honest, {route} route")
        recorded = {t["settings"]["quant_kernel"] for t in transcripts}
        if recorded != {qlinear.recorded_route(route)}:
            raise RuntimeError(f"transcripts decoded on the {route} route record {sorted(recorded)}")
        with qlinear.route_as(auditor):
            audits: list[PoEAudit] = [audit(t, model, tokenizer) for t in tqdm(transcripts, desc="audit honest")]
            rows.append(_row("honest", where, [not a.honest for a in audits], honest=True))
            exact[route] = {
                "transcripts": len(audits),
                "exact": sum(a.exact for a in audits),
                "regenerated": sum(a.regeneration is not None for a in audits),
            }

            def random_edit(t: dict, h: PoEAudit) -> tuple[int, int]:
                j = rng.randrange(len(t["token_ids"]))
                return j, forgery.random_other_token(rng, t["settings"]["vocab_limit"], t["token_ids"][j])

            def harmful_edit(t: dict, h: PoEAudit, route: str = route) -> tuple[int, int]:
                j = min(range(len(h.positions)), key=lambda i: h.positions[i].margin)  # the closest call
                with qlinear.route_as(route):  # the jury's runner-up as the generator computed it
                    return j, runner_up(model, t, j)

            for kind, pick in (("token substituted (random position, random token)", random_edit),
                               ("token substituted (closest call, jury's runner-up)", harmful_edit)):  # fmt: skip
                results = [
                    substitution_caught(t, h, *pick(t, h), model, tokenizer)
                    for t, h in tqdm(list(zip(transcripts, audits, strict=True)), desc=kind)
                    if t["token_ids"]
                ]
                rows.append(_substitution_row(kind, where, results))
    results = {
        "model": args.model,
        "quantize": "gguf",
        "n_honest_per_route": args.n,
        "rows": rows,
        "exact_replays": exact,
        "minutes": (time.perf_counter() - started) / 60,
        "machine": machine(),
    }
    write_results(args.out, "audit_quantized", results, markdown(results))


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"{results['n_honest_per_route']} honest jury transcripts per kernel route on {results['model']} loaded "
        "with `--quantize gguf` (its own Q4_1/Q8_0 blocks), greedy and T 0.8, veto off and 1e-3, 16/32/48 new "
        "tokens, each audited by an auditor whose own default is the other route (the audit replays on the "
        "route the transcript records). A forgery is caught when the verdict is not honest; substitutions count "
        "as caught by decisions only if both claims a forger could make at that position fail.",
        "",
        *rows_table(results["rows"]),
        "",
    ]
    for route, e in results["exact_replays"].items():
        lines.append(
            f"- {route} route: {e['exact']} of {e['transcripts']} honest audits exact (tolerance 0); "
            f"{e['regenerated']} settled by running the generator again."
        )
    lines += ["", f"Run time {results['minutes']:.0f} min on {machine_line(results['machine'])}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
