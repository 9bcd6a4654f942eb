"""fp32 products of a few rows with the weights coming from memory, as in decoding: olmo-tap's native kernel
against oneDNN's prepacked weights (``python -m olmo_tap.benchmarks.fp32_products``).

A decode step reads every weight once, so a product's speed is how fast it streams the weight from memory, not
from cache: each shape gets enough distinct copies (at least 256 MB in all) that a pass over them never finds
one in cache, and a measurement is one pass over all copies. Routes alternate round by round
(``run_interleaved``); medians. Per shape and row count: microseconds per product, and the weight bytes read per
second. Each route's largest error against float64 is checked first (a fast wrong kernel is no candidate).
Writes ``fp32_products.json`` and ``.md`` under ``--out`` (default ``results/engine``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from olmo_tap.benchmarks.harness import machine_info, run_interleaved
from olmo_tap.benchmarks.quant_kernels import SHAPES
from olmo_tap.model import kernels, native_linear
from olmo_tap.model.layers import _packed_product

ROWS = (1, 2, 8, 16, 32)
COLD_BYTES = 256 << 20  # more than any CPU's last-level cache


def _routes(weights: list[torch.Tensor]) -> dict[str, Callable[[torch.Tensor], list[torch.Tensor]]]:
    """Per route, one pass of a row block over every copy of the weight."""
    out = weights[0].size(0)
    routes: dict[str, Callable[[torch.Tensor], list[torch.Tensor]]] = {}
    if kernels.onednn_refusal(torch.float32) is None:
        dnn = [kernels.reorder_weight(w, 4) for w in weights]
        routes["onednn"] = lambda x: [_packed_product(x, p) for p in dnn]
    if native_linear.takes_native():
        nat = [native_linear.pack(w) for w in weights]
        routes["native"] = lambda x: [native_linear.product(x, p, out) for p in nat]
    return routes


def run(out_dir: Path, budget_ms: float, progress: bool) -> dict[str, Any]:
    started = time.time()
    table = []
    with torch.no_grad():
        for name, n_out, n_in in SHAPES:
            size = n_out * n_in * 4
            copies = max(2, -(-COLD_BYTES // size))
            g = torch.Generator().manual_seed(n_out + n_in)
            weights = [torch.randn(n_out, n_in, generator=g) * 0.02 for _ in range(copies)]
            routes = _routes(weights)
            for rows in ROWS:
                x = torch.randn(rows, n_in, generator=g)
                exact = x.double() @ weights[0].double().T
                errors = {r: float((fn(x)[0].double() - exact).abs().max()) for r, fn in routes.items()}
                times = run_interleaved(
                    {r: (lambda _i, fn=fn, x=x: _timed(fn, x)) for r, fn in routes.items()},
                    warmup_ms=budget_ms / 2, measure_ms=budget_ms, min_repeats=5, max_repeats=100,
                    desc=f"{name} x {rows} rows", progress=progress,
                )  # fmt: skip
                us = {r: 1e6 * statistics.median(t) / copies for r, t in times.items()}
                table.append({
                    "shape": name, "out": n_out, "in": n_in, "rows": rows, "copies": copies, "us": us,
                    "gb_per_s": {r: size / (t * 1e-6) / 1e9 for r, t in us.items()},
                    "max_abs_error_vs_float64": errors,
                })  # fmt: skip
    report = {
        "experiment": "fp32-products",
        "machine": machine_info(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "native_vector_path": native_linear.vector_path() if native_linear.takes_native() else None,
        "seconds": round(time.time() - started, 1),
        "table": table,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fp32_products.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "fp32_products.md").write_text(markdown(report))
    return report


def _timed(fn: Callable[[torch.Tensor], list[torch.Tensor]], x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"fp32 products, weights from memory (distinct copies, >= 256 MB per shape): microseconds per product and "
        f"weight GB/s, medians of alternating rounds; {m['cpu']} ({', '.join(m['cpu_flags'])}), "
        f"{report['threads']} threads, native path {report['native_vector_path']}.",
        "",
        "| shape | rows | oneDNN us | native us | oneDNN GB/s | native GB/s | native / oneDNN time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["table"]:
        us, gb = row["us"], row["gb_per_s"]
        ratio = f"{us['native'] / us['onednn']:.2f}" if {"native", "onednn"} <= us.keys() else "-"
        cells = [f"{us[r]:.0f}" if r in us else "-" for r in ("onednn", "native")]
        cells += [f"{gb[r]:.1f}" if r in gb else "-" for r in ("onednn", "native")]
        lines.append(f"| {row['shape']} {row['out']}x{row['in']} | {row['rows']} | {' | '.join(cells)} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/engine"))
    parser.add_argument("--budget-ms", type=float, default=1500.0, help="measured time per route and cell")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(markdown(run(args.out, args.budget_ms, not args.no_progress)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
