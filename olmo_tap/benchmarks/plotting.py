"""``graph.png`` of a run: time to first token, per-position latency and tokens/s, and PoE's gamma sweep.

Drawn on a bare ``matplotlib.figure.Figure`` (Agg canvas, no pyplot and no global backend change), so it works
headless and inside other programs.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure

from olmo_tap.benchmarks.schema import ConfigResult, Results
from olmo_tap.benchmarks.targets import TARGET_GAMMA


def _position_series(results: Results) -> list[ConfigResult]:
    """The curves worth reading per position: every configuration of the main Hydra but PoE, and PoE at the
    targets' gamma (else the sweep's first)."""
    main_heads = results.model.n_heads
    main = [c for c in results.configs if c.group == main_heads]
    gammas = sorted({c.gamma for c in main if c.kind == "hydra_poe" and c.gamma is not None})
    shown = TARGET_GAMMA if TARGET_GAMMA in gammas else (gammas[0] if gammas else None)
    return [c for c in main if c.kind != "hydra_poe" or c.gamma == shown]


def _style(c: ConfigResult, main_heads: int) -> dict:
    """Colour by kind (sampled PoE olive); dashed when sampled, dotted for a Hydra with other than main_heads."""
    colours = {"hf_generate": "tab:gray", "baseline": "tab:blue", "hydra_naive": "tab:red", "hydra_poe": "tab:green"}
    style = {"color": colours[c.kind], "linestyle": "-"}
    if c.kind == "baseline" and c.name != "baseline":
        style["color"] = "tab:cyan"
    if c.sampling == "sampled":
        style.update(color="tab:olive", linestyle="--")
    if c.group != main_heads:
        style["linestyle"] = ":"
    return style


def _nan(values: list[float | None]) -> list[float]:
    return [math.nan if v is None else v for v in values]


def plot_results(results: Results, path: Path) -> None:
    fig = Figure(figsize=(16, 11), layout="constrained")
    (ttft_ax, latency_ax), (rate_ax, sweep_ax) = fig.subplots(2, 2)
    m = results.model
    fig.suptitle(
        f"olmo-tap bench: {m.source}, {m.n_heads} heads x {m.heads_depth}, {m.dtype} on {results.machine.device_name}"
        f" (torch threads: {results.machine.torch_threads}), prompt {results.config['prompt_length']} + "
        f"{results.config['gen_length']} new tokens, {results.created[:10]}",
        fontsize=11,
    )

    # 1. Time to first token: one box per configuration, every sample drawn over it.
    configs = list(reversed(results.configs))
    samples = [c.ttft_samples_ms for c in configs]
    ttft_ax.boxplot(samples, orientation="horizontal", showfliers=False, widths=0.6)
    for i, values in enumerate(samples, start=1):
        ttft_ax.scatter(values, [i] * len(values), s=6, alpha=0.4, color=_style(configs[i - 1], m.n_heads)["color"])
    ttft_ax.set_yticks(range(1, len(configs) + 1), [c.name for c in configs], fontsize=7)
    ttft_ax.set_xscale("log")
    ttft_ax.set_xlabel("time to first token (ms, prefill included; log scale)")
    ttft_ax.set_title("Time to first token: distribution")
    ttft_ax.grid(axis="x", alpha=0.3)

    # 2 and 3. Per-position amortised latency and its inverse.
    for c in _position_series(results):
        positions = range(len(c.per_position_latency_ms))
        style = _style(c, m.n_heads)
        latency_ax.plot(positions, _nan(c.per_position_latency_ms), label=c.name, linewidth=1.2, **style)
        rate_ax.plot(positions, _nan(c.per_position_tokens_per_s), label=c.name, linewidth=1.2, **style)
    latency_ax.set_title("Decode latency per position (round time / tokens it emitted)")
    latency_ax.set_xlabel("generated token index")
    latency_ax.set_ylabel("ms per token")
    rate_ax.set_title("Tokens/s per position")
    rate_ax.set_xlabel("generated token index")
    rate_ax.set_ylabel("tokens/s")
    for ax in (latency_ax, rate_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    # 4. PoE's gamma sweep: speed (left axis) and acceptance (right axis), references as horizontal lines.
    acceptance_ax = sweep_ax.twinx()
    poe = [c for c in results.configs if c.kind == "hydra_poe" and c.poe is not None]
    groups = sorted({(c.n_heads, c.sampling) for c in poe}, key=lambda g: (g[0] or 0, g[1]))
    markers = {"greedy": "o", "sampled": "s"}
    colours = {"greedy": "tab:green", "sampled": "tab:olive"}
    for n_heads, sampling in groups:
        rows = sorted((c for c in poe if (c.n_heads, c.sampling) == (n_heads, sampling)), key=lambda c: c.gamma or 0)
        gammas = [c.gamma for c in rows]
        linestyle = "-" if n_heads == m.n_heads else ":"
        label = f"PoE {sampling}, {n_heads} heads"
        sweep_ax.plot(
            gammas,
            [c.tokens_per_s for c in rows],
            marker=markers[sampling],
            linestyle=linestyle,
            color=colours[sampling],
            label=label + " (tok/s)",
        )
        acceptance_ax.plot(
            gammas,
            [c.poe.acceptance_rate for c in rows],
            marker=markers[sampling],
            linestyle=linestyle,
            color="tab:purple",
            alpha=0.5,
            label=label + " (acceptance)",
        )
    for c in results.configs:
        if c.kind != "hydra_poe":
            sweep_ax.axhline(
                c.tokens_per_s, linewidth=0.8, alpha=0.7, label=f"{c.name} (tok/s)", **_style(c, m.n_heads)
            )
    sweep_ax.set_xscale("log", base=2)
    all_gammas = sorted({c.gamma for c in poe if c.gamma is not None})
    sweep_ax.set_xticks(all_gammas, [str(g) for g in all_gammas])
    sweep_ax.minorticks_off()
    sweep_ax.set_xlabel("gamma (draft tokens per round)")
    sweep_ax.set_ylabel("end-to-end tokens/s")
    acceptance_ax.set_ylabel("acceptance rate", color="tab:purple")
    acceptance_ax.set_ylim(0, 1.05)
    sweep_ax.set_title("PoE gamma sweep: speed and acceptance")
    sweep_ax.grid(alpha=0.3)
    handles = sweep_ax.get_legend_handles_labels()
    more = acceptance_ax.get_legend_handles_labels()
    sweep_ax.legend(
        handles[0] + more[0], handles[1] + more[1], fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=3
    )
    fig.savefig(path, dpi=110)
