"""Which kernel route runs quantized linear layers fastest here: ``olmo-tap train experiment quant-kernels``.

For each linear shape of the embedded default (SmolLM2-135M: fused q/k/v, o, fused gate/up, down, lm_head) and
each row count (1 = a decode step; 5-24 = a verification pass; 64 = a prompt), the time of one product by every
route available in this process, timed in alternating rounds (``run_interleaved``), medians:

- ``fp32`` / ``bf16``: the float weight, oneDNN-prepacked (the project's float path);
- ``int8pack`` / ``int4pack``: torch's own weight-only kernels (``_weight_int8pack_mm``,
  ``_weight_int4pack_mm_for_cpu``);
- ``torchao-int8``: torchao's ``Int8WeightOnlyConfig`` on an ``nn.Linear`` (only where torchao imports);
- ``native-int8`` / ``native-int4``: olmo-tap's own kernel (``olmo_tap/quant/native.cpp``: int8-rounded activations,
  integer products with the codes); on a CPU with VNNI also ``native-avx2-int8`` / ``native-avx2-int4``, a build of
  it without VNNI's ``dpbusd`` (the same bits: what the VNNI path gains);
- ``fused-int8`` / ``fused-int4``: the dequantizing reduction compiled by Inductor (``olmo_tap.quant.linear``);
- ``chunked-int8`` / ``chunked-int4``: dequantize chunk by chunk into a cache-sized buffer, multiply each chunk.

Writes ``kernels.json`` and ``kernels.md`` (the table, and per scheme the largest row count at which the fused
and fused routes still beat the chunked product over a whole pass: what ``NATIVE_MAX_ROWS`` and ``FUSED_MAX_ROWS``
should be).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from olmo_tap.benchmarks.harness import machine_info, run_interleaved
from olmo_tap.model import kernels
from olmo_tap.quant import linear as qlinear
from olmo_tap.quant import native
from olmo_tap.quant.weights import quantize

# (name, out, in) of the embedded default's linear layers
SHAPES = (("wqkv", 960, 576), ("wo", 576, 576), ("w13", 3072, 576), ("w2", 576, 1536), ("lm_head", 49152, 576))
ROWS = (1, 5, 8, 16, 24, 32, 64)
PASS_LAYERS = 30  # the embedded default's layers: a pass runs each layer weight 30 times, the lm_head once


def _routes(out: int, n_in: int) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], dict[str, torch.Tensor]]:
    """The routes for an (out, in) weight, and per route the float weight its result should equal."""
    g = torch.Generator().manual_seed(out * 7919 + n_in)
    w = torch.randn(out, n_in, generator=g) * 0.02
    q8, q4 = quantize(w, "int8"), quantize(w, "int4")
    d8, d4 = q8.dequantize(), q4.dequantize()
    routes: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        if kernels.onednn_refusal(dtype) is None:
            pack = kernels.reorder_weight(w.to(dtype), 4)
            routes[name] = lambda x, pack=pack, dtype=dtype: torch.ops.mkldnn._linear_pointwise(
                x.to(dtype), pack, None, "none", [], ""
            )
        else:
            cast = w.to(dtype)
            routes[name] = lambda x, cast=cast: F.linear(x.to(cast.dtype), cast)
    scale8 = q8.scale.view(-1)
    routes["int8pack"] = lambda x: torch.ops.aten._weight_int8pack_mm(x, q8.codes, scale8)
    int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(_codes_int4(q4), 2)
    scale_zeros = torch.stack((q4.scale.t(), (q4.minimum + 8 * q4.scale).t()), dim=-1).contiguous()  # type: ignore[operator]
    routes["int4pack"] = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4, 32, scale_zeros)
    torchao = _torchao_int8(w)
    if torchao is not None:
        routes["torchao-int8"] = torchao
    for scheme, qw in (("int8", q8), ("int4", q4)):
        args = (qw.codes, qw.scale) if scheme == "int8" else (qw.codes, qw.scale, qw.minimum)
        if native.available() is None:
            for label, ops in _native_builds().items():
                # each build its own copy: the routes alternate, and one copy would reach the second build warm
                tiled = qw.as_tiled()
                routes[f"{label}-{scheme}"] = lambda x, t=tiled, ops=ops: native.product(
                    x, t.scheme, t.codes, t.scale, t.minimum, t.out_features, ops
                )
        routes[f"fused-{scheme}"] = lambda x, scheme=scheme, args=args: qlinear._kernel(scheme)(x, *args)
        routes[f"chunked-{scheme}"] = lambda x, qw=qw: qlinear.dequantized_product(x, qw)
    # torchao quantizes with its own scales: its error is against the float weight, its quantization included
    expected = {r: (w if r.startswith(("fp32", "bf16", "torchao")) else d4 if "int4" in r else d8) for r in routes}
    return routes, expected


def _native_builds() -> dict[str, str]:
    """Route label -> ops namespace of each build of the native kernel to time: this CPU's, and on a VNNI CPU the
    same source without VNNI (where that build fails, only this CPU's)."""
    builds = {"native": "olmo_tap"}
    avx2 = native.path_variant("avx2") if native.VECTOR_PATH == "vnni" else None
    if avx2 is not None and avx2.available() is None:
        builds["native-avx2"] = avx2.name
    return builds


def _codes_int4(qw: Any) -> torch.Tensor:
    """(out, in) int32 codes in input order (torch's int4 packer wants them unpacked)."""
    grouped = qw.codes.view(qw.out_features, -1, 16)
    return torch.cat(((grouped & 15), (grouped >> 4)), dim=-1).view(qw.out_features, -1).to(torch.int32)


def _torchao_int8(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except Exception:  # not installed, or built for another torch
        return None
    layer = torch.nn.Linear(w.size(1), w.size(0), bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    quantize_(layer, Int8WeightOnlyConfig())
    return layer


def run_quant_kernels(out: str | Path, budget_ms: float = 150.0, progress: bool = True) -> dict[str, Any]:
    """Time every route on every shape and row count; write kernels.json and kernels.md under ``out``."""
    torch.manual_seed(0)
    started = time.time()
    table: list[dict[str, Any]] = []
    with torch.no_grad():
        for name, n_out, n_in in SHAPES:
            routes, expected = _routes(n_out, n_in)
            for rows in ROWS:
                x = torch.randn(rows, n_in)
                # a fast wrong kernel is no candidate: each route's largest error against its own weight's product
                errors = {r: float((fn(x).float() - F.linear(x, expected[r])).abs().max()) for r, fn in routes.items()}
                times = run_interleaved(
                    {r: (lambda _i, fn=fn, x=x: _timed(fn, x)) for r, fn in routes.items()},
                    warmup_ms=budget_ms / 2, measure_ms=budget_ms, min_repeats=3, max_repeats=200,
                    desc=f"{name} x {rows} rows", progress=progress,
                )  # fmt: skip
                row = {"shape": name, "out": n_out, "in": n_in, "rows": rows}
                row["us"] = {r: 1e6 * statistics.median(t) for r, t in times.items()}
                row["max_abs_error"] = errors
                table.append(row)
    report = {
        "experiment": "quant-kernels",
        "machine": machine_info(torch.device("cpu")),
        "torch": torch.__version__,
        "seconds": round(time.time() - started, 1),
        "table": table,
        "fused_beats_dequant_up_to": _crossovers(table),
        "max_rows_in_code": {"native": dict(qlinear.NATIVE_MAX_ROWS), "fused": dict(qlinear.FUSED_MAX_ROWS)},
    }
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "kernels.json").write_text(json.dumps(report, indent=2) + "\n")
    (path / "kernels.md").write_text(markdown(report))
    return report


def _timed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def _crossovers(table: list[dict[str, Any]]) -> dict[str, int]:
    """Per scheme, the largest row count up to which the fused reduction beats the chunked product over a whole
    pass of the embedded default: each layer weight counted once per layer (30), the lm_head once (0: never)."""
    result = {}
    for kind in ("native", "fused"):
        for scheme in ("int8", "int4"):
            route = f"{kind}-{scheme}"
            if route not in table[0]["us"]:
                continue
            best = 0
            for rows in ROWS:
                cells = [r for r in table if r["rows"] == rows]

                def pass_us(route: str, cells: list[dict[str, Any]] = cells) -> float:
                    return sum(c["us"][route] * (1 if c["shape"] == "lm_head" else PASS_LAYERS) for c in cells)

                if pass_us(route) > pass_us(f"chunked-{scheme}"):
                    break
                best = rows
            result[route] = best
    return result


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    routes = list(report["table"][0]["us"])
    lines = [
        f"Quantized linear kernels, one product, microseconds (median of alternating rounds); {m['cpu']} "
        f"({', '.join(m['cpu_flags'])}), {m['torch_threads']} threads, torch {report['torch']}. "
        "Weight shapes of the embedded default (out x in); rows: 1 = a decode step, 5-24 = verification, "
        "64 = a prompt.",
        "",
        "| weight | rows | " + " | ".join(routes) + " |",
        "|---|---:|" + "---:|" * len(routes),
    ]
    for row in report["table"]:
        cells = " | ".join(f"{row['us'][r]:.0f}" for r in routes)
        lines.append(f"| {row['shape']} {row['out']}x{row['in']} | {row['rows']} | {cells} |")
    cross = report["fused_beats_dequant_up_to"]
    lines += [
        "",
        "Over a whole pass (each layer weight x 30, the lm_head x 1), against the chunked dequantize-and-multiply, "
        "each few-row route is faster up to "
        + ", ".join(f"{n} rows ({route})" for route, n in cross.items())
        + f"; the code switches at {report['max_rows_in_code']}.",
        "Largest |error| of each route against a float product with its own (dequantized) weight, over every "
        "cell: "
        + ", ".join(f"{r} {max(row['max_abs_error'][r] for row in report['table']):.1e}" for r in routes)
        + " (bf16 rounds its activations and weight, the native kernel its activations to int8 per block of 32; "
        "torchao's is against the float weight, its own int8 rounding included).",
        f"Run time {report['seconds']} s.",
    ]
    return "\n".join(lines) + "\n"
