"""What quantized weights cost in memory: ``olmo-tap experiment quant-memory``.

Two parts, written to ``memory.json`` and ``memory.md``:

- **Measured**: for the embedded default and each ``--quantize`` scheme (and fp32 for comparison), a fresh
  process loads the model and decodes one answer with PoE; its peak RSS (``ru_maxrss``) is read after importing
  torch, after loading, and at the end, against the issue's budget of three times the GGUF file plus the KV cache.
  A fresh process per configuration, because RSS peaks never come down within one.
- **Computed from the shapes**: the weight bytes of an OLMo-2-1B and -7B Hydra (5 heads x 3 layers) in each
  storage (fp32, bf16, int8 per channel, int4 in groups of 32, GGUF Q4_K / Q6_K blocks as olmo-tap holds them),
  and its KV cache per position.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from olmo_tap.hydra import HydraTransformerConfig
from olmo_tap.model.config import TransformerConfig

SCHEMES = ("fp32", "gguf", "int8", "int4")
PROMPT = "Explain in two sentences why the sky is blue."
NEW_TOKENS = 64


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(preset: str, scheme: str) -> dict[str, Any]:
    """Run inside the fresh process: load, decode, and report peak RSS at each stage (MB)."""
    stages = {"import torch": _rss_mb()}
    from olmo_tap.inference.poe import PoE
    from olmo_tap.weights.loading import load_hydra
    from olmo_tap.weights.tokenizer import load_tokenizer

    started = time.perf_counter()
    quantize = None if scheme == "fp32" else scheme
    model = load_hydra(preset, dtype=torch.float32, device="cpu", progress=False, quantize=quantize)
    stages["load"] = _rss_mb()
    load_s = time.perf_counter() - started
    tokenizer = load_tokenizer(preset)
    stages["tokenizer"] = _rss_mb()
    poe = PoE(model, tokenizer, gamma=4, seed=0, max_new_tokens=NEW_TOKENS)
    out = poe.generate_with_cache(PROMPT, temperature=0)
    stages["decode"] = _rss_mb()
    c = model.base_config
    positions = len(tokenizer.encode(PROMPT)) + NEW_TOKENS
    return {
        "preset": preset,
        "scheme": scheme,
        "peak_rss_mb": stages,
        "load_s": round(load_s, 1),
        "tokens": len(out.token_ids),
        "kv_bytes": kv_bytes_per_position(model.config, 4) * positions,
        "quantization": model.quantization,
        "vocab": c.vocab_size,
    }


def run_quant_memory(out: str | Path, preset: str = "smollm2-135m-instruct", progress: bool = True) -> dict[str, Any]:
    """Measure each scheme in its own process, compute the OLMo-2 table; write memory.json and memory.md."""
    from olmo_tap.benchmarks.harness import machine_info
    from olmo_tap.weights.loading import gguf_source_path
    from olmo_tap.weights.sources import resolve

    gguf_path = gguf_source_path(resolve(preset))
    measured = []
    for scheme in SCHEMES:
        if progress:
            print(f"measuring {preset} {scheme} in a fresh process ...", file=sys.stderr, flush=True)
        code = (
            "import json; from olmo_tap.benchmarks.quant_memory import child; "
            f"print(json.dumps(child({preset!r}, {scheme!r})))"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"measuring {scheme} failed:\n{done.stderr[-2000:]}")
        measured.append(json.loads(done.stdout.strip().splitlines()[-1]))
    report = {
        "experiment": "quant-memory",
        "machine": machine_info(torch.device("cpu")),
        "torch": torch.__version__,
        "gguf_file": None if gguf_path is None else {"name": gguf_path.name, "bytes": gguf_path.stat().st_size},
        "measured": measured,
        "computed": [
            shapes_table(name, HydraTransformerConfig.split(config, 5, 3))
            for name, config in (
                ("OLMo-2-1B", TransformerConfig.olmo2_1b()),
                ("OLMo-2-7B", TransformerConfig.olmo2_7b()),
            )
        ],
    }
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "memory.json").write_text(json.dumps(report, indent=2) + "\n")
    (path / "memory.md").write_text(markdown(report))
    return report


# ----- computed from the shapes ---------------------------------------------------------------------------------------


def _linears(c: TransformerConfig) -> list[tuple[int, int]]:
    """(out, in) of one layer's linears: q, k, v, o, gate, up, down."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    d, f = c.d_model, c.ffn_hidden
    return [(q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f)]


# bytes of an (out, in) weight in each storage: codes plus the fp32 scales (and minimums) olmo-tap keeps
STORAGE_BYTES = {
    "fp32": lambda o, i: 4 * o * i,
    "bf16": lambda o, i: 2 * o * i,
    "int8 (per channel)": lambda o, i: o * i + 4 * o,
    "int4 (groups of 32)": lambda o, i: o * i // 2 + 8 * (o * i // 32),
    "GGUF Q4_K held as int4/32": lambda o, i: o * i // 2 + 8 * (o * i // 32),
    "GGUF Q6_K held as int8/16": lambda o, i: o * i + 4 * (o * i // 16),
}
# the same weights in the GGUF file itself (bits per weight of the block formats)
FILE_BITS = {"Q4_K": 4.5, "Q6_K": 6.5625, "Q8_0": 8.5}


def kv_bytes_per_position(config: HydraTransformerConfig, element_bytes: int) -> int:
    """Keys and values of one position in every tower layer (the trunk once, each head's layers per head)."""
    c = config.base_config
    tower_layers = config.trunk_layers + config.n_heads * config.head_layers
    return 2 * c.n_kv_heads * c.head_dim * element_bytes * tower_layers


def shapes_table(name: str, config: HydraTransformerConfig) -> dict[str, Any]:
    c = config.base_config
    layers = config.trunk_layers + config.n_heads * config.head_layers
    tables = [(c.vocab_size, c.d_model)] * (1 if c.tie_embeddings else 2)
    weights = _linears(c) * layers + tables
    storage = {k: sum(f(o, i) for o, i in weights) for k, f in STORAGE_BYTES.items()}
    params = sum(o * i for o, i in weights)
    return {
        "model": name,
        "heads": config.n_heads,
        "heads_depth": config.head_layers,
        "params": params,
        "bytes": storage,
        "file_bytes": {k: int(params * bits / 8) for k, bits in FILE_BITS.items()},
        "kv_bytes_per_position": {"fp32": kv_bytes_per_position(config, 4), "bf16": kv_bytes_per_position(config, 2)},
    }


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    gguf = report["gguf_file"]
    lines = [
        f"Memory of quantized weights; {m['cpu']} ({', '.join(m['cpu_flags'])}), torch {report['torch']}.",
        "",
        f"## Measured: peak RSS of a fresh process, {report['measured'][0]['preset']}, PoE gamma 4 greedy, "
        f"{NEW_TOKENS} new tokens",
        "",
    ]
    if gguf:
        lines.append(f"GGUF file {gguf['name']}: {gguf['bytes'] / 1e6:.1f} MB; budget 3 x file = "
                     f"{3 * gguf['bytes'] / 1e6:.0f} MB plus the KV cache.")  # fmt: skip
        lines.append("")
    lines += [
        "| weights | after import torch | after load | after tokenizer | after decoding | above torch | KV cache "
        "| within 3 x file + KV, above torch | load s |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in report["measured"]:
        s = row["peak_rss_mb"]
        label = row["quantization"] or "fp32"
        above = s["decode"] - s["import torch"]  # MiB, as ru_maxrss counts them
        within = "" if gguf is None else ("yes" if above * 2**20 <= 3 * gguf["bytes"] + row["kv_bytes"] else "no")
        lines.append(
            f"| {label} | {s['import torch']:.0f} MiB | {s['load']:.0f} MiB | {s['tokenizer']:.0f} MiB | "
            f"{s['decode']:.0f} MiB | {above:.0f} MiB | {row['kv_bytes'] / 1e6:.1f} MB | {within} | {row['load_s']} |"
        )
    lines += ["", "## Computed from the shapes: a Hydra of 5 heads x 3 layers, weights only", ""]
    kinds = list(STORAGE_BYTES)
    lines += ["| model | params | " + " | ".join(kinds) + " | KV per position (fp32) |",
              "|---|---:|" + "---:|" * (len(kinds) + 1)]  # fmt: skip
    for row in report["computed"]:
        cells = " | ".join(f"{row['bytes'][k] / 2**30:.2f} GiB" for k in kinds)
        kv = row["kv_bytes_per_position"]["fp32"]
        lines.append(f"| {row['model']} | {row['params'] / 1e9:.2f} B | {cells} | {kv / 2**10:.0f} KiB |")
    lines += [
        "",
        "The GGUF rows assume every weight in that one type; a Q4_K_M file mixes Q4_K with Q6_K for some weights, "
        "so it lies between the two. In the file itself the same weights take "
        + "; ".join(
            f"{row['model']} " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in row["file_bytes"].items())
            for row in report["computed"]
        )
        + ": olmo-tap keeps a K-quant block's scale (and minimum) in fp32 (Q4_K's need 17 bits) beside byte-aligned "
        "codes, so its copy is larger than the file's (Q4_0, Q4_1 and Q8_0 blocks keep their fp16 scales where "
        "the native kernel runs).",
    ]
    return "\n".join(lines) + "\n"
