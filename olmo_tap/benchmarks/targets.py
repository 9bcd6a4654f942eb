"""The speed targets set by the project's issues, judged on one run's results.

Rates are end-to-end tokens/s (prefill included: what a user waits for). A target whose configurations were
not measured in the run is reported with ``met`` None, never silently dropped.
"""

from __future__ import annotations

from typing import Any

from olmo_tap.benchmarks.schema import group_suffix

TARGET_GAMMA = 4  # the PoE targets are stated at gamma 4, greedy
BASELINE_OVER_TRANSFORMERS = 1.3  # same dtype
BF16_OVER_TRANSFORMERS_FP32 = 2.0  # on CPU
STEP_OVER_LINEAR = 1.15  # a decode step against its bare linear layers
POE_OVER_BASELINE = 0.8
POE_OVER_NAIVE = {5: 1.1, 9: 1.3}  # by number of heads
# quantized decoding against llama.cpp on the same GGUF file (decode tok/s, prefill excluded; TTFT)
SINGLE_OVER_LLAMA_CPP = 1.0
POE_OVER_LLAMA_CPP = 0.8


def _target(name: str, value: float | None, relation: str, threshold: float, detail: str) -> dict[str, Any]:
    met = None if value is None else (value >= threshold if relation == ">=" else value <= threshold)
    return {"name": name, "value": value, "relation": relation, "threshold": threshold, "met": met, "detail": detail}


def _rate_ratio(name: str, a: dict | None, b: dict | None, threshold: float, extra: str = "") -> dict[str, Any]:
    if a is None or b is None:
        return _target(name, None, ">=", threshold, "not measured in this run")
    ratio = a["tokens_per_s"] / b["tokens_per_s"]
    detail = f"{a['name']} {a['tokens_per_s']:.1f} vs {b['name']} {b['tokens_per_s']:.1f} tok/s" + extra
    return _target(name, ratio, ">=", threshold, detail)


def _poe_detail(poe: dict | None) -> str:
    if poe is None or poe.get("poe") is None:
        return ""
    stats = poe["poe"]
    text = f"; acceptance {stats['acceptance_rate']:.2f}, {stats['tokens_per_round']:.2f} tokens/round"
    if stats.get("round_ms") is not None and stats.get("verify_ms_per_round_estimate") is not None:
        verify = stats["verify_ms_per_round_estimate"]
        text += f", {stats['round_ms']:.1f} ms per round, of which ~{verify:.1f} ms verification (by subtraction)"
    return text


def evaluate(configs: list[dict[str, Any]], linear_layers: list[dict[str, Any]], device_type: str) -> list[dict]:
    """Every target as {name, value, relation, threshold, met, detail}."""
    by_name = {c["name"]: c for c in configs}
    hf = by_name.get("hf_generate")
    baseline = by_name.get("baseline")
    found = [
        _rate_ratio(
            f"baseline >= {BASELINE_OVER_TRANSFORMERS}x transformers generate() (same dtype)",
            baseline,
            hf if hf is not None and baseline is not None and hf["dtype"] == baseline["dtype"] else None,
            BASELINE_OVER_TRANSFORMERS,
        )
    ]
    if device_type == "cpu":
        found.append(
            _rate_ratio(
                f"baseline bf16 >= {BF16_OVER_TRANSFORMERS_FP32}x transformers fp32 (CPU)",
                next((c for c in configs if c["kind"] == "baseline" and c["dtype"] == "bfloat16"), None),
                hf if hf is not None and hf["dtype"] == "float32" else None,
                BF16_OVER_TRANSFORMERS_FP32,
            )
        )
    for layers in linear_layers:
        found.append(
            _target(
                f"{layers['dtype']}{' compiled' if layers.get('decoder') == 'compiled' else ''} decode step "
                f"<= {STEP_OVER_LINEAR}x its bare linear layers",
                layers["step_over_packed"],
                "<=",
                STEP_OVER_LINEAR,
                f"step {layers['decode_step_ms']:.1f} ms vs {layers['packed_ms']['median']:.1f} ms for its linear "
                f"layers with the project's kernels (stock F.linear: {layers['stock_ms']['median']:.1f} ms, "
                f"step/stock {layers['step_over_stock']:.2f}x)",
            )
        )
    poe_name = f"hydra_poe_g{TARGET_GAMMA}_greedy"
    poe = by_name.get(poe_name)
    found.append(
        _rate_ratio(
            f"PoE gamma {TARGET_GAMMA} greedy >= {POE_OVER_BASELINE}x baseline",
            poe,
            baseline,
            POE_OVER_BASELINE,
            _poe_detail(poe),
        )
    )
    main_heads = baseline["group"] if baseline is not None else None
    for n_heads, threshold in POE_OVER_NAIVE.items():
        suffix = group_suffix(n_heads, main_heads) if main_heads is not None else f"_{n_heads}h"
        jury = by_name.get(poe_name + suffix)
        found.append(
            _rate_ratio(
                f"PoE gamma {TARGET_GAMMA} greedy >= {threshold}x naive, {n_heads} heads",
                jury,
                by_name.get("hydra_naive" + suffix),
                threshold,
                _poe_detail(jury),
            )
        )
    return found


def _decode_ratio(name: str, a: dict | None, b: dict | None, threshold: float) -> dict[str, Any]:
    if a is None or b is None or not a.get("decode_tokens_per_s") or not b.get("decode_tokens_per_s"):
        return _target(name, None, ">=", threshold, "not measured in this run")
    ratio = a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
    detail = (
        f"{a['name']} {a['decode_tokens_per_s']:.1f} vs {b['name']} {b['decode_tokens_per_s']:.1f} decode tok/s "
        f"(end to end {a['tokens_per_s']:.1f} vs {b['tokens_per_s']:.1f})"
    )
    return _target(name, ratio, ">=", threshold, detail + _poe_detail(a))


def evaluate_quantized(rows: list[dict[str, Any]]) -> list[dict]:
    """The quantized targets of each scheme against llama.cpp on the same file (same group, interleaved)."""
    by_name = {r["name"]: r for r in rows}
    llama = by_name.get("llama_cpp")
    found = []
    for scheme in dict.fromkeys(r["name"].split("_", 1)[0][1:] for r in rows if r["kind"] != "llama_cpp"):
        prefix = f"q{scheme}_"
        for name in ("baseline", "baseline_compiled"):
            found.append(
                _decode_ratio(
                    f"{scheme} {name.replace('_', ' ')} >= {SINGLE_OVER_LLAMA_CPP}x llama.cpp (decode tok/s)",
                    by_name.get(prefix + name), llama, SINGLE_OVER_LLAMA_CPP,
                )
            )  # fmt: skip
        for compiled in ("", "_compiled"):
            found.append(
                _decode_ratio(
                    f"{scheme} PoE gamma {TARGET_GAMMA} greedy{compiled.replace('_', ' ')} >= {POE_OVER_LLAMA_CPP}x "
                    "llama.cpp (decode tok/s)",
                    by_name.get(f"{prefix}hydra_poe_g{TARGET_GAMMA}_greedy{compiled}"), llama, POE_OVER_LLAMA_CPP,
                )
            )  # fmt: skip
        for name in ("baseline", f"hydra_poe_g{TARGET_GAMMA}_greedy"):
            ours, theirs = by_name.get(prefix + name), llama
            if ours is None or theirs is None:
                found.append(_target(f"{scheme} {name} TTFT <= llama.cpp's", None, "<=", 1.0, "not measured"))
                continue
            ratio = ours["ttft_ms"]["median"] / theirs["ttft_ms"]["median"]
            detail = f"{ours['ttft_ms']['median']:.0f} vs {theirs['ttft_ms']['median']:.0f} ms (median)"
            found.append(_target(f"{scheme} {name} TTFT <= llama.cpp's", ratio, "<=", 1.0, detail))
    return found
