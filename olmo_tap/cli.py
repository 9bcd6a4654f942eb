"""The ``olmo-tap`` command: one entry point, one sub-command per job."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from olmo_tap.model.config import ConfigError
from olmo_tap.weights.errors import WeightsError
from olmo_tap.weights.presets import DEFAULT_MODEL


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"preset name, HF checkpoint directory, hub id, .gguf file or saved ensemble (default: {DEFAULT_MODEL})",
    )
    group.add_argument("--heads", type=int, default=None, help="number of heads (default: 5, or the saved ensemble's)")
    group.add_argument("--heads-depth", type=int, default=None, help="layers per head (default: 3)")
    group.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on CUDA)"
    )
    group.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")


def load_model_and_tokenizer(args: argparse.Namespace) -> tuple[Any, Any]:
    from olmo_tap.hydra import HydraTransformer
    from olmo_tap.weights.tokenizer import load_tokenizer

    model = HydraTransformer.from_pretrained(
        args.model, n_heads=args.heads, heads_depth=args.heads_depth, dtype=args.dtype, device=args.device
    )
    return model, load_tokenizer(args.model)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    model, tokenizer = load_model_and_tokenizer(args)
    config, base = model.config, model.base_config
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = 2 * base.kv_dim * model.dtype.itemsize * (config.trunk_layers + model.n_heads * config.head_layers)
    rows = [
        ("model", str(args.model)),
        ("family", base.family),
        ("layers", f"{base.n_layers} = trunk {config.trunk_layers} + {model.n_heads} heads x {config.head_layers}"),
        ("d_model / ffn", f"{base.d_model} / {base.ffn_hidden}"),
        ("attention", f"{base.n_heads} query heads, {base.n_kv_heads} kv heads, head_dim {base.head_dim}"),
        ("vocab", f"{base.vocab_size} rows, tokenizer {len(tokenizer)} tokens, tied lm_head: {base.tie_embeddings}"),
        ("context", f"{base.max_seq_len} tokens, rope theta {base.rope_theta:g}"),
        (
            "parameters",
            f"{model.num_params():,} ({format_bytes(param_bytes)} in {str(model.dtype).removeprefix('torch.')})",
        ),
        ("KV cache", f"{format_bytes(kv_per_token)} per token of context"),
        ("uncertainty head", str(model.uncertainty_head) if model.uncertainty_head is not None else "none"),
        ("device", f"{model.device} ({torch.get_num_threads()} CPU threads)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from olmo_tap.inference.decoding import decode_single_head
    from olmo_tap.inference.prompts import encode_chat, stop_token_ids
    from olmo_tap.inference.text import TextStream

    model, tokenizer = load_model_and_tokenizer(args)
    temperature = 0.0 if args.greedy else args.temperature
    prompt_ids = encode_chat(tokenizer, args.prompt)
    stream = TextStream(tokenizer)
    start = time.perf_counter()
    n_tokens = 0
    for token in decode_single_head(
        model,
        prompt_ids,
        max_new_tokens=args.max_new_tokens,
        head=args.head,
        temperature=temperature,
        seed=args.seed,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_ids=stop_token_ids(tokenizer, model.base_config.eos_token_id),
        vocab_limit=len(tokenizer),
    ):
        n_tokens += 1
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()
    sys.stdout.write(stream.flush() + "\n")
    elapsed = time.perf_counter() - start
    mode = "greedy" if temperature == 0 else f"T={temperature:g}, seed {args.seed}"
    print(
        f"[single head {args.head}, {mode}] {n_tokens} tokens in {elapsed:.2f} s "
        f"({n_tokens / elapsed:.1f} tok/s, incl. prefill)",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="olmo-tap", description="Trustworthy inference with a Hydra of language-model heads."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="architecture, heads, parameters, memory and device of a model")
    add_model_args(info)
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="generate an answer to a prompt, streaming it to the terminal")
    gen.add_argument("prompt", help="the user message")
    add_model_args(gen)
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
    gen.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the replayable sampling noise")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    gen.add_argument("--head", type=int, default=0, help="which head decodes")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (WeightsError, ConfigError, ValueError) as e:
        print(f"olmo-tap: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nolmo-tap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
