"""``python -m olmo_tap.benchmarks.llama_cpp_logits``: olmo-tap's quantized logits against llama.cpp's on the
same GGUF file, an outside engine's arithmetic on the same weights.

For each prompt (the chat template's ids, fed to both engines as ids), the logits at every prompt position of
the embedded default's base model (the clones preset: head 0 is the file's own last layers), loaded with
``--quantize gguf`` on each quantized route (``native``: activations rounded to int8 per block of 32, as
llama.cpp does; ``dequantize``: float products of the file's dequantized weights), against llama.cpp's
(llama-cpp-python, ``logits_all``). Reported per route: mean and largest |difference| at the last position and
over all positions, and how often the two engines' greedy tokens agree. Needs ``pip install llama-cpp-python``.

``--gguf FILE`` compares on another GGUF file (its head 0 is likewise the file's own model); ``--requantize
Q4_K_M`` first has llama.cpp requantize the embedded file (its ``llama_model_quantize``, into the olmo-tap cache),
which gives the K-quant mixture common GGUF downloads hold (Q4_K and Q6_K, and Q5_0 / Q8_0 for the tensors whose
rows are no multiple of 256), from nothing but the wheel's file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

PRESET = "smollm2-135m-instruct-clones"
PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about snow.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "Who wrote Hamlet?",
    "How many legs does a spider have?",
    "Translate 'good morning' into French.",
    "What is 12 times 7?",
)
ROUTES = ("native", "dequantize")
# llama.cpp's lead of its top token over its runner-up above which the engines' greedy tokens must agree: twice
# the mean |difference| of their logits. Below it the order is decided by rounding (the 8-bit activations turn
# float rounding into code flips that can move a logit by ~1), and any two builds may disagree.
DECIDED_MARGIN = 0.5


def llama_cpp_logits(path: Path, ids: list[int], threads: int) -> np.ndarray:
    """(positions, vocab) logits llama.cpp computes for ``ids`` in one ``eval``."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=max(64, len(ids) + 8), n_threads=threads, logits_all=True, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def olmo_tap_logits(model: Any, ids: list[int], vocab: int) -> np.ndarray:
    """(positions, vocab) logits of ``model``'s head 0 for ``ids`` in one pass, on the route in force."""
    with torch.no_grad():
        return model.forward(torch.tensor([ids]), head_indices=[0])[0, 0, :, :vocab].float().numpy()


def compare(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    diff = np.abs(ours - theirs)
    top2 = np.sort(theirs, axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > DECIDED_MARGIN
    agree = ours.argmax(-1) == theirs.argmax(-1)
    return {
        "last_mean_abs": float(diff[-1].mean()),
        "last_max_abs": float(diff[-1].max()),
        "all_mean_abs": float(diff.mean()),
        "largest_logit": float(np.abs(theirs[-1]).max()),
        "greedy_agree_last": bool(ours[-1].argmax() == theirs[-1].argmax()),
        "greedy_agree_all": float(agree.mean()),
        "decided_positions": int(decided.sum()),
        "greedy_agree_decided": float(agree[decided].mean()) if decided.any() else 1.0,
    }


def requantized(path: Path, ftype: str, threads: int) -> Path:
    """GGUF ``path`` requantized by llama.cpp to ``ftype`` (a ``LLAMA_FTYPE_MOSTLY_*`` name, e.g. Q4_K_M), kept in
    the olmo-tap cache and made once."""
    import ctypes

    import llama_cpp

    from olmo_tap.weights.presets import cache_dir

    code = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}", None)
    if code is None:
        known = sorted(
            n.removeprefix("LLAMA_FTYPE_MOSTLY_") for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_")
        )
        raise SystemExit(f"--requantize {ftype!r}: not a llama.cpp file type; one of {', '.join(known)}")
    target = cache_dir() / "requantized" / f"{path.stem}.{ftype}.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = code, True, threads
        if llama_cpp.llama_model_quantize(str(path).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama.cpp could not requantize {path.name} to {ftype}")
        partial.rename(target)
    return target


def run(threads: int, gguf: Path | None = None, requantize: str | None = None) -> dict[str, Any]:
    from olmo_tap.benchmarks.harness import machine_info, software_versions
    from olmo_tap.benchmarks.llama_cpp_reference import available
    from olmo_tap.inference.prompts import encode_chat
    from olmo_tap.quant.linear import route_as
    from olmo_tap.weights.gguf_header import read_gguf_header
    from olmo_tap.weights.loading import load_hydra
    from olmo_tap.weights.presets import PRESETS, embedded_gguf_path
    from olmo_tap.weights.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    if why := available(None):
        raise SystemExit(f"llama.cpp cannot run here: {why}")
    path = gguf if gguf is not None else embedded_gguf_path(PRESETS[PRESET])
    if requantize is not None:
        path = requantized(path, requantize, threads)
    if why := available(path, threads):
        raise SystemExit(f"llama.cpp cannot run here: {why}")
    source = PRESET if path == embedded_gguf_path(PRESETS[PRESET]) else str(path)
    tokenizer = load_tokenizer(source, progress=False)
    ids = {p: encode_chat(tokenizer, p) for p in PROMPTS}
    theirs = {p: llama_cpp_logits(path, ids[p], threads) for p in PROMPTS}
    model = load_hydra(source, progress=False, quantize="gguf")
    rows = []
    for route in ROUTES:
        with route_as(route):
            for p in PROMPTS:
                ours = olmo_tap_logits(model, ids[p], theirs[p].shape[1])
                rows.append({"route": route, "prompt": p, **compare(ours, theirs[p])})
    import llama_cpp

    types = sorted({t.tensor_type.name for t in read_gguf_header(path).tensors})
    return {
        "file": path.name,
        "tensor_types": types,
        "machine": machine_info(torch.device("cpu")),
        "software": {**software_versions(), "llama_cpp_python": llama_cpp.__version__},
        "threads": threads,
        "rows": rows,
    }


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        f"olmo-tap's `--quantize gguf` logits against llama.cpp's on `{results['file']}` "
        f"({', '.join(results.get('tensor_types', []))}; head 0: the file's own model), "
        f"{machine.get('cpu', '?')} ({', '.join(machine.get('cpu_flags', []))}), "
        f"{results['threads']} threads, llama-cpp-python {results['software']['llama_cpp_python']}. Logits at every "
        "prompt position; the same ids in both engines.",
        "",
        "| route | prompt | last position mean / max abs diff | largest logit | all positions mean | "
        f"greedy token agrees (last; all positions; where llama.cpp leads by > {DECIDED_MARGIN}) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['route']} | {r['prompt']} | {r['last_mean_abs']:.3f} / {r['last_max_abs']:.3f} | "
            f"{r['largest_logit']:.1f} | {r['all_mean_abs']:.3f} | {'yes' if r['greedy_agree_last'] else 'no'}; "
            f"{r['greedy_agree_all']:.0%}; {r['greedy_agree_decided']:.0%} of {r['decided_positions']} |"
        )
    lines.append("")
    for route in ROUTES:
        rows = [r for r in results["rows"] if r["route"] == route]
        decided = sum(r["decided_positions"] for r in rows)
        agreed = sum(r["greedy_agree_decided"] * r["decided_positions"] for r in rows)
        lines.append(
            f"- {route}: mean abs diff over all positions {np.mean([r['all_mean_abs'] for r in rows]):.3f}; "
            f"greedy token at the last position agrees on {sum(r['greedy_agree_last'] for r in rows)} of "
            f"{len(rows)} prompts, at all positions {np.mean([r['greedy_agree_all'] for r in rows]):.0%}, where "
            f"llama.cpp leads by > {DECIDED_MARGIN} at {agreed:.0f} of {decided}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="writes OUT.md and OUT.json (default: results/quant/"
                        "llama_cpp_logits, with the file type when requantized)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--gguf", type=Path, default=None, help="another GGUF file (default: the embedded one)")
    parser.add_argument("--requantize", default=None, metavar="TYPE",
                        help="have llama.cpp requantize the file first, e.g. Q4_K_M")  # fmt: skip
    args = parser.parse_args(argv)
    if args.gguf is not None and not args.gguf.is_file():
        parser.error(f"--gguf {args.gguf}: no such file")
    results = run(args.threads, args.gguf, args.requantize)
    suffix = f"_{args.requantize}" if args.requantize else ""
    out = Path(args.out or f"results/quant/llama_cpp_logits{suffix}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
