"""The ``olmo-tap`` command: one entry point, one sub-command per job."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from olmo_tap.certainty.names import DEFAULT_SIMILARITY, SIMILARITY_NAMES
from olmo_tap.inference.prompts import not_unicode
from olmo_tap.model.config import ConfigError
from olmo_tap.quant import KEPT_GGUF_TYPES
from olmo_tap.weights.errors import WeightsError
from olmo_tap.weights.presets import DEFAULT_MODEL

# Exit codes of every sub-command: 0 success (or honest), 1 not honest (verify / audit only), 2 bad input or
# usage, 3 anything unexpected (a bug: reported as such, with a traceback only under OLMO_TAP_DEBUG=1).
EXIT_OK, EXIT_NOT_HONEST, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
DEBUG_ENV = "OLMO_TAP_DEBUG"
REPORT_TO = "the olmo-tap maintainers (the project's issue tracker)"
# Seeds every sampler accepts: torch.Generator.manual_seed takes [-2**63, 2**64); negative seeds would be folded
# into that range differently by torch and by olmo-tap's own key derivation, so they are refused everywhere.
SEED_BOUND = 2**64

# Modules exposing ``register(subparsers, add_model_args)``, one per subsystem.
SUBCOMMAND_MODULES: list[str] = [
    "olmo_tap.verify.cli",
    "olmo_tap.verify.signing_cli",
    "olmo_tap.serve.cli",
    "olmo_tap.benchmarks.cli",
    "olmo_tap.train.cli",
    "olmo_tap.batch.cli",
]


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers ("1,2,4"; "" is the empty list)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def str_list(text: str) -> list[str]:
    """argparse type: comma-separated names, blanks dropped."""
    return [x.strip() for x in text.split(",") if x.strip()]


def add_model_args(
    parser: argparse.ArgumentParser, split: bool = True, model_default: str | None = DEFAULT_MODEL
) -> None:
    """--model, --dtype, --device, and (with ``split``) the Hydra's --heads and --heads-depth."""
    group = parser.add_argument_group("model")
    default = f" (default: {model_default})" if model_default else ""
    group.add_argument(
        "--model",
        default=model_default,
        help=f"preset name, HF checkpoint directory, hub id, .gguf file or saved ensemble{default}",
    )
    if split:
        group.add_argument(
            "--heads", type=int, default=None, help="number of heads (default: 5, or the saved ensemble's)"
        )
        group.add_argument("--heads-depth", type=int, default=None, help="layers per head (default: 3)")
    group.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on CUDA)"
    )
    group.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    group.add_argument(
        "--quantize",
        choices=("int8", "int4", "gguf"),
        default=None,
        help="keep the weights quantized (CPU): int8 per channel, int4 in groups of 32, or gguf: a GGUF file's own "
        f"blocks ({', '.join(KEPT_GGUF_TYPES)}); default: float weights",
    )


def _nearest_existing(path: Path) -> Path:
    """``path`` itself, or its nearest ancestor that exists (what a writer making missing directories writes in)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe(directory: Path, option: str, path: str) -> None:
    """Write (and remove) a temporary entry in ``directory``: permissions alone miss read-only file systems, and
    root passes them."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".olmo-tap-probe-"):
            pass
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot be written ({e.strerror or e})") from None


def check_writable(path: str, option: str, *, creates_parents: bool = False) -> None:
    """Fail now, before any model loads or tokens are decoded, if file ``path`` cannot be written.

    Probed by writing, not by ``os.access``. A file that exists is opened for appending (its content is not
    touched); a new one is probed with a temporary sibling, so nothing is left behind. With ``creates_parents``
    (the writer makes missing directories) the nearest existing ancestor must take a new entry.
    """
    target = Path(path).expanduser()
    if target.is_dir():
        raise ValueError(f"{option} {path}: is a directory")
    if target.exists():
        try:
            with target.open("a"):
                return
        except OSError as e:
            raise ValueError(f"{option} {path}: cannot be written ({e.strerror or e})") from None
    parent = _nearest_existing(target.parent) if creates_parents else target.parent
    if not parent.is_dir():
        missing = "is not a directory" if parent.exists() else "does not exist"
        raise ValueError(f"{option} {path}: cannot be written, directory {parent} {missing}")
    _probe(parent, option, path)


def check_writable_dir(path: str, option: str) -> None:
    """Fail now, before minutes of measuring or hours of training, if directory ``path`` cannot be made and
    written: it, or the nearest of its ancestors that exists, must be a directory that takes a new entry (the
    writers make the missing ones)."""
    target = Path(path).expanduser()
    existing = _nearest_existing(target)
    if not existing.is_dir():
        if existing == target:
            raise ValueError(f"{option} {path}: is a file, not a directory")
        raise ValueError(f"{option} {path}: cannot be made, {existing} is a file")
    _probe(existing, option, path)


# Where a command writes (attribute, option; a directory unless the subcommand sets out_is_file): checked before
# the command's work starts, so a typo or a read-only place fails in a second, not after the run.
OUTPUT_OPTIONS = (
    ("out", "--out"),
    ("results", "--results"),
    ("adapters", "--adapters"),
    ("results_dir", "--results-dir"),
)


def check_outputs(args: argparse.Namespace) -> None:
    """Check every output place ``args`` names (see ``OUTPUT_OPTIONS``); a subcommand whose ``--out`` is a file
    says so with ``out_is_file``."""
    for attr, option in OUTPUT_OPTIONS:
        path = getattr(args, attr, None)
        if not isinstance(path, str | Path):
            continue
        if attr == "out" and getattr(args, "out_is_file", False):
            check_writable(str(path), option, creates_parents=True)
        else:
            check_writable_dir(str(path), option)


def check_seed(seed: int | None, what: str = "--seed") -> None:
    """Refuse a seed outside [0, 2**64): what every sampler, torch's and olmo-tap's own, takes."""
    if seed is not None and not 0 <= seed < SEED_BOUND:
        raise ValueError(f"{what} must be between 0 and 2**64 - 1, got {seed}")


def load_model_and_tokenizer(args: argparse.Namespace) -> tuple[Any, Any]:
    from olmo_tap.hydra import HydraTransformer
    from olmo_tap.weights.tokenizer import load_tokenizer

    model = HydraTransformer.from_pretrained(
        args.model,
        n_heads=args.heads,
        heads_depth=args.heads_depth,
        dtype=args.dtype,
        device=args.device,
        quantize=getattr(args, "quantize", None),
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

    from olmo_tap.model.kv_cache import HydraCache
    from olmo_tap.model.native_attention import status as attention_status
    from olmo_tap.model.native_layer import status as layer_status
    from olmo_tap.model.native_linear import status as linear_status
    from olmo_tap.model.native_norm import status as norm_status

    model, tokenizer = load_model_and_tokenizer(args)
    config, base = model.config, model.base_config
    if model.quantization is not None:
        from olmo_tap.quant.linear import fused_kernel_status
        from olmo_tap.quant.model import quantized_bytes

        param_bytes = quantized_bytes(model) + sum(
            p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta"
        )
        weights_in = f"quantized: {model.quantization}"
    else:
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        weights_in = f"in {str(model.dtype).removeprefix('torch.')}"
    kv_per_token = HydraCache.bytes_per_slot(model, 1)  # the trunk and the text heads, in the cache's dtype
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
            f"{model.num_params():,} ({format_bytes(param_bytes)} {weights_in})",
        ),
        ("KV cache", f"{format_bytes(kv_per_token)} per token of context, per answer"),
        ("uncertainty head", str(model.uncertainty_head) if model.uncertainty_head is not None else "none"),
        (
            "text heads",
            f"{model.n_text_heads}, "
            + (
                "identical copies: no independent jury"
                if model.identical_heads(range(model.n_text_heads))
                else "independent weights"
            ),
        ),
        ("device", f"{model.device} ({torch.get_num_threads()} CPU threads)"),
        ("linear kernels", linear_status(model) if model.quantization is None else fused_kernel_status()),
        ("cached attention", attention_status(model)),
        ("norms", norm_status(model)),
        ("decode layers", layer_status(model)),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def build_decoder(args: argparse.Namespace, model: Any, tokenizer: Any) -> Any:
    from olmo_tap.inference.poe import PoE
    from olmo_tap.inference.settings import DecodeSettings

    settings = DecodeSettings(
        mode=args.mode,
        temperature=0.0 if getattr(args, "greedy", False) else args.temperature,
        gamma=args.gamma,
        beta=args.beta,
        seed=args.seed,
        veto_threshold=args.veto,
        draft_head=args.draft_head,
        head=args.draft_head,
        max_new_tokens=args.max_new_tokens,
        compile=args.compile,
    )
    return PoE.from_settings(model, tokenizer, settings)


def cmd_generate(args: argparse.Namespace) -> int:
    import json

    from olmo_tap.terminal import TrustPrinter

    # Output paths first: a typo in one should cost a second, not a model load and a whole generation.
    if args.save:
        check_writable(args.save, "--save")
    if args.save_tokens:
        check_writable(args.save_tokens, "--save-tokens")
    signing_key = None
    if args.signing_key:
        from olmo_tap.verify.signing import load_private_key

        # Before the model loads: a bad key should cost a second, not a model load.
        signing_key = load_private_key(args.signing_key)
    bank = None
    if args.robustness:
        from olmo_tap.robustness.probe import resolve_bank

        # Before the model loads too: a malformed bank should cost a second.
        bank = resolve_bank(args.attack_bank, args.model)
    model, tokenizer = load_model_and_tokenizer(args)
    decoder = build_decoder(args, model, tokenizer)
    if args.compile:
        note = "--compile: the second token waits for a one-off compile (about a minute on 2 CPU cores)"
        print(note, file=sys.stderr)
    temperature = 0.0 if args.greedy else args.temperature
    printer = TrustPrinter(sys.stdout, color=sys.stdout.isatty() and not args.no_color)
    from olmo_tap.certainty.answer import CertaintyRun
    from olmo_tap.certainty.kle import N_SAMPLES

    similarity = f"nli:{args.nli_model}" if args.nli_model else args.similarity
    requested = args.certainty or ("mcq" if args.mcq else "auto")

    def announce() -> None:
        print(f"certainty: sampling {N_SAMPLES} more answers for Kernel Language Entropy ...", file=sys.stderr)

    certainty = CertaintyRun(requested, model, tokenizer, decoder.settings, similarity, args.seed, announce)
    robustness = robustness_run(args, model, tokenizer, bank, certainty.similarity)
    if args.chat:
        return chat_loop(decoder, temperature, args, printer, certainty, robustness)
    messages = [{"role": "user", "content": args.prompt}]
    plan, seed = certainty.plan(messages)
    stream = decoder.stream(messages=messages, is_mcq=plan.mcq, temperature=temperature, seed=seed)
    for event in stream:
        if not args.json:
            printer.token(event)
    output = stream.output
    if not args.json:
        printer.end()
    answer_certainty = certainty.result(plan, output, messages)
    answer_robustness = robustness_result(robustness, plan, output, messages)
    if args.json:
        shown = {**output.to_dict(), "certainty": answer_certainty}
        if answer_robustness is not None:
            shown["robustness"] = answer_robustness
        print(json.dumps(shown, indent=2))
    if args.save:
        from olmo_tap.inference.transcript import save_transcript

        transcript = save_transcript(output, args.save, args.model, signing_key, answer_certainty, answer_robustness)
        print(f"transcript saved to {args.save} (digest {transcript['digest']})", file=sys.stderr)
        if signing_key is not None:
            print(f"signed by {transcript['signature']['fingerprint']}", file=sys.stderr)
    if args.save_tokens:
        from olmo_tap.verify.cli import write_token_sequence

        write_token_sequence(args.save_tokens, output.prompt_ids, output.token_ids, output.settings["seed"])
    print(printer.summary(output), file=sys.stderr)
    print(certainty_lines(answer_certainty), file=sys.stderr)
    print_robustness(answer_robustness)
    return 0


def robustness_run(args: argparse.Namespace, model: Any, tokenizer: Any, bank: Any, similarity: Any) -> Any:
    """The robustness probe of ``generate --robustness`` (None without it), on the certainty's similarity."""
    if not args.robustness:
        return None
    from olmo_tap.robustness.probe import RobustnessRun

    def announce(k: int) -> None:
        print(f"robustness: decoding {k} answers with adversarial suffixes appended ...", file=sys.stderr)

    return RobustnessRun(model, tokenizer, bank, similarity, announce)


def robustness_result(robustness: Any, plan: Any, output: Any, messages: list[dict[str, str]]) -> Any:
    """The answer's robustness record (None when the probe was not asked for)."""
    if robustness is None:
        return None
    return robustness.result(output, messages, scored_mcq=plan.mcq)


def print_robustness(record: dict[str, Any] | None) -> None:
    if record is not None:
        from olmo_tap.robustness.probe import summary_line

        print(summary_line(record), file=sys.stderr)


def certainty_lines(certainty: dict[str, Any]) -> str:
    """The certainty as the CLI prints it: the value and its method, then a KLE answer's claims."""
    value, method = certainty.get("value"), certainty.get("method")
    if value is None:
        return f"certainty: n/a ({certainty.get('reason')})"
    if method == "kle":
        how = f"Kernel Language Entropy over {certainty['n_samples']} sampled answers, {certainty['similarity']}"
    else:
        how = "the uncertainty head's p(correct)"
    lines = [f"certainty: {100 * value:.1f}% ({how})"]
    for claim in certainty.get("claims") or []:
        if claim["confidence"] is not None:
            tier = f"{100 * claim['confidence']:.0f}% {claim['confidence_level']}"
            guidance = f" - {claim['guidance']}" if claim["guidance"] else ""
            lines.append(f"  claim {tier}: {claim['text']}{guidance}")
    return "\n".join(lines)


def chat_loop(
    decoder: Any, temperature: float, args: argparse.Namespace, printer: Any, certainty: Any, robustness: Any = None
) -> int:
    """Interactive multi-turn chat on stdin/stdout; an empty line or EOF ends it."""
    messages: list[dict[str, str]] = []
    print("olmo-tap chat: type a message, an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        why = not_unicode(line)
        if why is not None:  # one mistyped line (another encoding) is the user's to retype, not the chat's end
            print(f"olmo-tap: that line cannot be tokenized ({why}); type it again", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        plan, seed = certainty.plan(messages)
        print("jury> ", end="", flush=True)
        stream = decoder.stream(messages=messages, temperature=temperature, is_mcq=plan.mcq, seed=seed)
        for event in stream:
            printer.token(event)
        printer.end()
        print(printer.summary(stream.output), file=sys.stderr)
        print(certainty_lines(certainty.result(plan, stream.output, messages)), file=sys.stderr)
        print_robustness(robustness_result(robustness, plan, stream.output, messages))
        messages.append({"role": "assistant", "content": stream.output.text})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="olmo-tap", description="Trustworthy inference with a Hydra of language-model heads."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="architecture, heads, parameters, memory and device of a model")
    add_model_args(info)
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="answer a prompt with the jury, streaming it with its trust signals")
    gen.add_argument("prompt", nargs="?", help="the user message (not needed with --chat)")
    add_model_args(gen)
    gen.add_argument("--mode", choices=["poe", "naive", "single"], default="poe", help="decoder (default: poe)")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (default 0 = greedy; try 0.7)"
    )
    gen.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    gen.add_argument("--seed", type=int, default=None, help="seed of every random draw (default: random, reported)")
    gen.add_argument("--gamma", type=int, default=4, help="draft tokens per round (speed only)")
    gen.add_argument("--beta", type=float, default=1.0, help="inverse temperature of the verifiers' product")
    gen.add_argument("--veto", type=float, default=None, help="veto threshold tau in [0, 1) (default: soft PoE)")
    gen.add_argument("--draft-head", type=int, default=None, help="fixed draft head (single mode: the head used)")
    gen.add_argument(
        "--compile",
        action="store_true",
        help="single and poe modes: compile the (draft) head's decode step to native code (faster steps; a one-off "
        "compile of ~1 min)",
    )
    gen.add_argument(
        "--certainty",
        choices=["auto", "mcq", "kle", "off"],
        default=None,
        help="the answer's certainty: auto (default) gives multiple choice the uncertainty head's p(correct) and free "
        "text Kernel Language Entropy over 5 sampled answers (5 more answers, batched); mcq or kle forces one",
    )
    gen.add_argument("--mcq", action="store_true", help="same as --certainty mcq")
    gen.add_argument(
        "--similarity",
        choices=SIMILARITY_NAMES,
        default=DEFAULT_SIMILARITY,
        help="KLE's similarity of two answers (default: %(default)s, chosen by results/certainty/kle.md)",
    )
    gen.add_argument(
        "--nli-model",
        default=None,
        metavar="CHECKPOINT",
        help="KLE's similarity from a Hugging Face NLI model (directory or hub id), e.g. the original's "
        "tasksource/ModernBERT-large-nli",
    )
    gen.add_argument(
        "--robustness",
        action="store_true",
        help="the robustness probe: append each of 3 adversarial suffixes from the attack bank to the question, "
        "answer again with the same settings and seed (3 more answers, batched) and count how many flip the answer",
    )
    gen.add_argument(
        "--attack-bank",
        default=None,
        metavar="PATH",
        help="the probe's attack bank (olmo-tap train attacks); default: the one shipped for the model's preset",
    )
    gen.add_argument("--json", action="store_true", help="print the full PoEOutput as JSON instead of text")
    gen.add_argument("--chat", action="store_true", help="interactive multi-turn chat")
    gen.add_argument("--save", default=None, help="write a transcript (JSON) for `olmo-tap audit`")
    gen.add_argument(
        "--signing-key",
        default=None,
        metavar="PATH",
        help="sign the saved transcript's digest with this Ed25519 private key (olmo-tap keygen); needs --save",
    )
    gen.add_argument("--save-tokens", default=None, help="append prompt and output ids (JSONL) for `olmo-tap verify`")
    gen.add_argument("--no-color", action="store_true", help="plain text even on a terminal")
    gen.set_defaults(func=cmd_generate)

    # Each subsystem registers its own sub-commands (its module must import nothing heavy at top level).
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(sub, add_model_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate" and not args.chat and not args.prompt:
        parser.error("generate needs a prompt (or --chat)")
    if args.command == "generate" and args.compile and args.mode == "naive":
        parser.error("--compile needs --mode single or poe (naive decoding runs every head each step)")
    if args.command == "generate" and args.mcq and args.certainty not in (None, "mcq"):
        parser.error(f"--mcq asks for the uncertainty head, --certainty {args.certainty} for another")
    if args.command == "generate" and args.attack_bank and not args.robustness:
        parser.error("--attack-bank is the robustness probe's bank: it needs --robustness")
    if args.command == "generate" and args.signing_key and not args.save:
        parser.error("--signing-key signs the saved transcript: it needs --save PATH")
    if args.command == "generate":
        try:
            check_seed(args.seed)
        except ValueError as e:
            parser.error(str(e))
        why = None if args.chat or not args.prompt else not_unicode(args.prompt)
        if why is not None:  # before the model loads
            parser.error(f"the prompt cannot be tokenized: {why}")
    try:
        if args.command in ("train", "experiment", "bench"):
            check_outputs(args)
        return args.func(args)
    except (WeightsError, ConfigError, ValueError) as e:
        print(f"olmo-tap: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError) as e:
        # a path the user gave that is missing or not theirs to write: their input, not a bug
        print(f"olmo-tap: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RecursionError as e:
        if "JSON" not in str(e):  # json's decoder names itself; any other runaway recursion is a bug
            return internal_error(e)
        # json's parser recurses once per nesting level: a hostile file reaches here, whichever reader it went to
        print("olmo-tap: error: an input file is too deeply nested (JSON beyond Python's limit)", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nolmo-tap: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        return internal_error(e)


def internal_error(error: BaseException) -> int:
    """Report a bug as one, without a traceback a user cannot act on (unless $OLMO_TAP_DEBUG asks for it)."""
    debug = os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    detail = (str(error).strip().splitlines() or [""])[0][:500]
    print(f"olmo-tap: internal error: {type(error).__name__}: {detail}", file=sys.stderr)
    hint = "" if debug else f"; rerun with {DEBUG_ENV}=1 for the traceback"
    print(f"olmo-tap: this is a bug; please report it to {REPORT_TO} with the command you ran{hint}", file=sys.stderr)
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
