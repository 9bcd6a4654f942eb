"""What one long /v1/verify or /v1/audit costs in memory: peak RSS growth of a context-length replay.

Run it on an otherwise idle machine (it loads the model, then replays a whole context once per check):

    python -m olmo_tap.serve.memcheck --out results/memcheck.json              # the embedded default
    python -m olmo_tap.serve.memcheck --model PATH --tokens 4096 --out mem.json

Each check replays one sequence of ``--tokens`` tokens (default: the model's context) through the library
calls the service runs for those endpoints: ``verify_outputs`` with each sampler, and ``audit_poe`` on a
transcript of that length. The transcript is forged (a short real one, its ids replaced by random ones and
its derived fields restamped), because generating a whole context would take far longer than the check, and
the audit replays every position whatever they hold. For each check it records the process's peak resident
memory above what it held just before (Linux: VmHWM, reset through /proc/self/clear_refs; elsewhere a
sampling thread) and, for scale, what full-vocabulary fp32 logits of every position at once would take (the
design before logits went block by block). It prints a table and writes the rows as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

PROC_STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
SAMPLE_S = 0.002


def _status_kib(field: str) -> int | None:
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """The process's resident memory now (0 where /proc is not available and psutil is not installed)."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return 0


class PeakRSS:
    """Peak resident memory while the block runs, as growth over the RSS at its start (``growth``).

    Uses the kernel's high-water mark (exact, every page counted) when it can be reset; otherwise samples the
    RSS every 2 ms from a thread (a spike shorter than that can be missed)."""

    def __init__(self) -> None:
        self.method = "sampled"
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.start = self.peak = rss_bytes()
        try:
            CLEAR_REFS.write_text("5")  # 5: reset the peak RSS to the current RSS
            self.method = "VmHWM" if _status_kib("VmHWM") is not None else "sampled"
        except OSError:
            self.method = "sampled"
        if self.method == "sampled":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self.method == "VmHWM":
            self.peak = max(self.peak, (_status_kib("VmHWM") or 0) * 1024)
        else:
            self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.start)


def forged_transcript(model: Any, tokenizer: Any, model_id: str, n_tokens: int, seed: int = 0) -> dict[str, Any]:
    """A transcript of ``n_tokens`` prompt + output tokens (+1 for the audit's last position, within the
    context): a two-token answer from the model, its output replaced by random ids, derived fields restamped."""
    from olmo_tap.inference.poe import PoE
    from olmo_tap.inference.transcript import transcript_dict
    from olmo_tap.verify.forgery import restamp
    from olmo_tap.weights.tokenizer import vocab_limit

    mode = "poe" if model.n_text_heads >= 2 else "single"
    decoder = PoE(model, tokenizer, max_new_tokens=2, seed=seed, mode=mode, draft_head=0)  # type: ignore[arg-type]
    output = decoder.generate_with_cache("Say something.", temperature=0.8)
    transcript = transcript_dict(output, model_id)
    n_out = min(n_tokens, model.base_config.max_seq_len - 1) - len(transcript["prompt_ids"])
    if n_out < 1:
        raise ValueError(f"{n_tokens} tokens leave no room for an output after the prompt")
    rng = random.Random(seed)
    vocab = vocab_limit(tokenizer, model.base_config.vocab_size)
    transcript["token_ids"] = [rng.randrange(vocab) for _ in range(n_out)]
    transcript["settings"]["max_new_tokens"] = n_out
    return restamp(transcript, tokenizer)


def measure(model: Any, tokenizer: Any, model_id: str = "model", n_tokens: int | None = None) -> dict[str, Any]:
    """Peak RSS growth of a verify with each sampler and of an audit, each over ``n_tokens`` tokens (default:
    the model's context). Returns the report ``main`` writes as JSON."""
    from olmo_tap.verify import TokenSequence, audit_poe, verify_outputs
    from olmo_tap.verify import replay as replay_module
    from olmo_tap.weights.tokenizer import vocab_limit

    rss_at_start = rss_bytes()  # the loaded model and the runtime: what the checks grow from
    context = model.base_config.max_seq_len
    n_tokens = min(n_tokens or context, context)
    vocab = vocab_limit(tokenizer, model.base_config.vocab_size)
    rng = random.Random(0)
    prompt = [rng.randrange(vocab) for _ in range(min(8, n_tokens - 1))]
    output = [rng.randrange(vocab) for _ in range(n_tokens - len(prompt))]
    transcript = forged_transcript(model, tokenizer, model_id, n_tokens)
    n_audited = len(transcript["prompt_ids"]) + len(transcript["token_ids"])
    bytes_per_position = 4 * model.base_config.vocab_size

    def verify(method: str, sequence: TokenSequence) -> None:
        options = dict(temperature=0.8, top_k=0, top_p=1.0, seed=0, head=0, tokenizer=tokenizer, verbose=False)
        verify_outputs([sequence], model, sampling_method=method, **options)

    def audit() -> None:
        audit_poe(transcript, model, tokenizer=tokenizer)

    # Warm up (thread pools, one-time buffers), so that the first check does not pay for them.
    verify("olmo_tap", TokenSequence(prompt, output[:4]))
    checks = [
        ("verify (olmo_tap sampler)", n_tokens, 1, lambda: verify("olmo_tap", TokenSequence(prompt, output))),
        ("verify (vllm_gumbel_max)", n_tokens, 1, lambda: verify("vllm_gumbel_max", TokenSequence(prompt, output))),
        ("audit (PoE transcript)", n_audited, model.n_text_heads, audit),
    ]
    rows = []
    for name, tokens, heads, run in checks:
        started = time.perf_counter()
        with PeakRSS() as peak:
            run()
        rows.append(
            {
                "check": name,
                "tokens": tokens,
                "peak_rss_growth_bytes": peak.growth,
                "all_positions_logits_bytes": heads * tokens * bytes_per_position,
                "seconds": round(time.perf_counter() - started, 2),
                "rss_method": peak.method,
            }
        )
    return {
        "model": model_id,
        "context": context,
        "tokens": n_tokens,
        "logit_block": replay_module.LOGIT_BLOCK,
        "dtype": str(model.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "rss_at_start_bytes": rss_at_start,
        "rows": rows,
    }


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']}: context {report['context']}, logit block {report['logit_block']}, {report['dtype']}",
        "| check | tokens | peak RSS growth | all positions' logits at once | seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['check']} | {row['tokens']} | {mib(row['peak_rss_growth_bytes'])} "
            f"| {mib(row['all_positions_logits_bytes'])} | {row['seconds']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from olmo_tap import cli

    parser = argparse.ArgumentParser(prog="python -m olmo_tap.serve.memcheck", description=__doc__.split("\n")[0])
    cli.add_model_args(parser)
    parser.add_argument("--tokens", type=int, default=None, help="tokens per check (default: the model's context)")
    parser.add_argument("--out", required=True, type=Path, help="where to write the JSON report")
    args = parser.parse_args(argv)
    print(f"memcheck: loading {args.model} ...", file=sys.stderr)
    model, tokenizer = cli.load_model_and_tokenizer(args)
    report = measure(model, tokenizer, str(args.model), args.tokens)
    print(table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"memcheck: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
