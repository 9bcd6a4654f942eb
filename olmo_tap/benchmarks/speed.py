"""Decode speed on one machine, in one run: our KV-cached decoding vs transformers' generate(),
bf16 vs fp32, framework overhead vs the bare linear layers, and PoE vs single-head and naive decoding.

    python -m olmo_tap.benchmarks.speed [--model PRESET|DIR] [--new-tokens 128] [--prompt-tokens 64]

Greedy, fixed lengths (end-of-text ignored), 2 CPU threads unless told otherwise. Each figure is
the median of ``--repeats`` timed runs after a warm-up run. Prints a table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from olmo_tap.hydra import HydraTransformer
from olmo_tap.inference.poe import PoE
from olmo_tap.model.layers import linear


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prompt_ids(tokenizer: Any, n_tokens: int) -> list[int]:
    """A real chat prompt padded with real text to ``n_tokens`` tokens."""
    text = "Explain, step by step, how a bicycle works and why it stays upright. " * 20
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(ids, add_special_tokens=False)
    return ids[-n_tokens:]


def linear_layers_seconds(model: HydraTransformer, head: int, repeats: int) -> float:
    """One token through just the linear layers of trunk + one head + lm_head: the same weights,
    shapes, dtype and kernels (``olmo_tap.model.layers.linear``) as a decode step."""
    calls = []
    for block, tower in [(b, 0) for b in model.trunk] + [(b, head) for b in model.heads]:
        for name in ("wqkv", "wo", "w13", "w2"):
            calls.append((getattr(block, name), slice(tower, tower + 1), block._packed[name]))
    calls.append((model.lm_head.unsqueeze(0), slice(0, 1), model._packed_lm_head))
    inputs = {w.size(1): torch.randn(1, 1, w.size(1), dtype=model.dtype, device=model.device) for w, _, _ in calls}

    def run() -> None:
        with torch.no_grad():
            for w, sel, packed in calls:
                linear(inputs[w.size(1)], w, sel, packed)

    return median_seconds(lambda: [run() for _ in range(32)], repeats) / 32


def decode_seconds(
    model: HydraTransformer, tokenizer: Any, ids: list[int], new_tokens: int, repeats: int, **kw: Any
) -> tuple[float, Any]:
    """Median seconds of a greedy fixed-length decode, and the output of the last run."""
    decoder = PoE(model, tokenizer, max_new_tokens=new_tokens, ignore_eos=True, seed=0, **kw)
    outputs = []
    seconds = median_seconds(
        lambda: outputs.append(decoder.generate_with_cache(prompt_ids=ids, temperature=0)), repeats
    )
    return seconds, outputs[-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-hf", action="store_true", help="do not time transformers' generate()")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from olmo_tap.weights.sources import read_base_checkpoint
    from olmo_tap.weights.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    ids = prompt_ids(tokenizer, args.prompt_tokens)
    n = args.new_tokens
    rows: list[tuple[str, float, str]] = []
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"# prompt {len(ids)} tokens, {n} new tokens, greedy, median of {args.repeats}")

    hf_tps = None
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        _, _, directory = read_base_checkpoint(args.model, progress=False)
        hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        input_ids = torch.tensor([ids])

        def hf_generate() -> None:
            with torch.no_grad():
                hf.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        hf_tps = n / median_seconds(hf_generate, args.repeats)
        rows.append(("transformers generate() fp32", hf_tps, "reference"))
        del hf

    for dtype in (torch.float32, torch.bfloat16):
        single = HydraTransformer.from_pretrained(args.model, n_heads=1, heads_depth=3, dtype=dtype, progress=False)
        seconds = decode_seconds(single, tokenizer, ids, n, args.repeats, mode="single")[0]
        tps = n / seconds
        name = str(dtype).removeprefix("torch.")
        rows.append((f"olmo-tap single tower {name}", tps, f"{tps / hf_tps:.2f}x transformers fp32" if hf_tps else ""))
        # framework overhead: one cached decode step (prefill excluded) vs its bare linear layers
        step = (seconds - decode_seconds(single, tokenizer, ids, 1, args.repeats, mode="single")[0]) / (n - 1)
        linear_s = linear_layers_seconds(single, 0, args.repeats)
        rows.append(
            (
                f"  {name} decode step / bare linear layers",
                step / linear_s,
                f"{1e3 * step:.1f} ms vs {1e3 * linear_s:.1f} ms",
            )
        )
        del single

    for n_heads in (5, 9):
        hydra = HydraTransformer.from_pretrained(args.model, n_heads=n_heads, heads_depth=3, progress=False)
        decoders = {
            "single head": PoE(hydra, tokenizer, max_new_tokens=n, ignore_eos=True, seed=0, mode="single", head=0),
            "naive averaging": PoE(hydra, tokenizer, max_new_tokens=n, ignore_eos=True, seed=0, mode="naive"),
            "PoE gamma 4": PoE(hydra, tokenizer, gamma=4, max_new_tokens=n, ignore_eos=True, seed=0, draft_head=0),
        }
        # interleaved repetitions, so slow drifts of the machine hit every decoder alike
        times: dict[str, list[float]] = {name: [] for name in decoders}
        outputs = {}
        for _ in range(args.repeats + 1):
            for name, decoder in decoders.items():
                start = time.perf_counter()
                outputs[name] = decoder.generate_with_cache(prompt_ids=ids, temperature=0)
                times[name].append(time.perf_counter() - start)
        tps = {name: n / statistics.median(t[1:]) for name, t in times.items()}  # first run: warm-up
        out = outputs["PoE gamma 4"]
        for name in decoders:
            note = ""
            if name.startswith("PoE"):
                note = (
                    f"{tps[name] / tps['single head']:.2f}x single, {tps[name] / tps['naive averaging']:.2f}x naive; "
                    f"acceptance {out.acceptance_rate:.2f}, {out.tokens_per_round:.2f} tokens/round"
                )
            rows.append((f"{n_heads} heads x 3: {name}", tps[name], note))
        del hydra, decoders

    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        unit = "x" if "/" in name else "tok/s"
        print(f"{name:<{width}}  {value:8.2f} {unit:<5}  {note}")


if __name__ == "__main__":
    main()
