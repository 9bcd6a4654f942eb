"""Markdown tables of a run (printed at the end of ``olmo-tap bench``, ready for the README)."""

from __future__ import annotations

from olmo_tap.benchmarks.schema import ConfigResult, Results, group_suffix


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.0f}"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("| " + " | ".join("---:" if i in right else "---" for i in range(len(header))) + " |")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _ratio(a: ConfigResult, b: ConfigResult | None) -> str:
    return "–" if b is None else f"{a.tokens_per_s / b.tokens_per_s:.2f}x"


def decoders_table(results: Results) -> list[str]:
    by_name = {c.name: c for c in results.configs}
    hf = by_name.get("hf_generate")
    header = [
        "configuration",
        "heads",
        "dtype",
        "tok/s",
        "decode tok/s",
        "TTFT ms",
        "vs baseline",
        "vs naive",
        "vs transformers",
        "acceptance",
        "tok/round",
        "BW util.",
        "weights / peak RSS MiB"
        if results.configs and results.configs[0].memory.kind == "peak_rss"
        else "weights / peak MiB",
    ]
    rows = []
    for c in results.configs:
        suffix = group_suffix(c.group, results.model.n_heads)  # ratios within the configuration's own group
        baseline = by_name.get("baseline" + suffix)
        naive = by_name.get("hydra_naive" + suffix) if c.kind == "hydra_poe" else None
        rows.append(
            [
                c.name,
                "–" if c.n_heads is None else str(c.n_heads),
                c.dtype,
                _num(c.tokens_per_s),
                _num(c.decode_tokens_per_s),
                _num(c.ttft_ms.median, 0),
                _ratio(c, baseline) if c.kind in ("hydra_poe", "hydra_naive") else "–",
                _ratio(c, naive),
                _ratio(c, hf) if c.kind == "baseline" and c.group == results.model.n_heads else "–",
                _num(c.poe.acceptance_rate, 2) if c.poe else "–",
                _num(c.poe.tokens_per_round, 2) if c.poe else "–",
                "–" if c.bandwidth_utilisation is None else f"{100 * c.bandwidth_utilisation:.0f}%",
                f"{_mib(c.memory.weight_bytes)} / {_mib(c.memory.peak_bytes)}",
            ]
        )
    return _table(header, rows, right=set(range(3, len(header))))


def trained_jury_table(results: Results) -> list[str]:
    """The trained jury's rows: speed against its own baseline, and acceptance beside the main model's."""
    if not results.trained_jury:
        return []
    own = {c.name: c for c in results.trained_jury}
    main = {c.name: c for c in results.configs}
    rows = []
    for c in results.trained_jury:
        twin = main.get(c.name.removeprefix("jury_"))
        rows.append(
            [
                c.name,
                _num(c.tokens_per_s),
                _ratio(c, own.get("jury_baseline")) if c.kind != "baseline" else "–",
                _num(c.poe.acceptance_rate, 2) if c.poe else "–",
                _num(twin.poe.acceptance_rate, 2) if twin and twin.poe else "–",
                _num(c.poe.tokens_per_round, 2) if c.poe else "–",
                _ratio(c, twin),
            ]
        )
    header = ["configuration", "tok/s", "vs its baseline", "acceptance", "clones' acceptance", "tok/round",
              "vs clones"]  # fmt: skip
    return _table(header, rows, right=set(range(1, len(header))))


def quantized_table(results: Results) -> list[str]:
    """The quantized group: speed, TTFT, bytes per token against the bandwidth, memory."""
    llama = next((c for c in results.quantized if c.kind == "llama_cpp"), None)
    rows = []
    for c in results.quantized:
        rows.append(
            [
                c.name,
                c.quantization or "–",
                _num(c.tokens_per_s),
                _num(c.decode_tokens_per_s),
                "–" if llama is None or not c.decode_tokens_per_s or not llama.decode_tokens_per_s
                else f"{c.decode_tokens_per_s / llama.decode_tokens_per_s:.2f}x",
                _num(c.ttft_ms.median, 0),
                _num(c.poe.acceptance_rate, 2) if c.poe else "–",
                f"{c.weight_bytes_per_token / 2**20:.0f}",
                "–" if c.bandwidth_utilisation is None else f"{100 * c.bandwidth_utilisation:.0f}%",
                f"{_mib(c.memory.weight_bytes)} / {_mib(c.memory.peak_bytes)}",
            ]
        )  # fmt: skip
    header = ["configuration", "weights", "tok/s", "decode tok/s", "vs llama.cpp", "TTFT ms", "acceptance",
              "MiB read/token", "BW util.", "weights / peak RSS MiB"]  # fmt: skip
    return _table(header, rows, right=set(range(2, len(header))))


def linear_table(results: Results) -> list[str]:
    header = [
        "dtype",
        "decoder",
        "decode step ms",
        "linear layers, olmo-tap kernels ms",
        "step / those",
        "linear layers, stock F.linear ms",
        "step / those",
    ]
    rows = [
        [
            x.dtype,
            x.decoder,
            _num(x.decode_step_ms),
            _num(x.packed_ms.median),
            f"{x.step_over_packed:.2f}x",
            _num(x.stock_ms.median),
            f"{x.step_over_stock:.2f}x",
        ]
        for x in results.linear_layers
    ]
    return _table(header, rows, right={2, 3, 4, 5, 6})


def targets_table(results: Results) -> list[str]:
    rows = []
    for t in results.targets:
        met = {True: "**met**", False: "not met", None: "not measured"}[t.met]
        rows.append(
            [t.name, "–" if t.value is None else f"{t.value:.2f}", f"{t.relation} {t.threshold:g}", met, t.detail]
        )
    return _table(["target", "measured", "needed", "", "detail"], rows, right={1})


def profile_table(results: Results) -> list[str]:
    p = results.profile
    if p is None:
        return []
    rows = [[op.name, _num(op.calls_per_token), _num(op.self_ms_per_token, 2)] for op in p.ops]
    return _table(["operator", "calls/token", "self ms/token"], rows, right={1, 2})


def headline(results: Results) -> str:
    m, cfg = results.machine, results.config
    load = "" if not m.load_average_start else f", load average {m.load_average_start[0]} at start"
    return (
        f"{results.model.source} ({results.model.n_heads} heads x {results.model.heads_depth}), "
        f"{cfg['prompt_length']}-token prompt, {cfg['gen_length']} new tokens, {m.device_name} "
        f"({m.cpu_count} CPUs, {m.torch_threads} torch threads{load}), torch {results.versions.torch}, "
        f"memory bandwidth {results.bandwidth.read_gb_s:.1f} GB/s read, {results.created}"
    )


def markdown_report(results: Results) -> str:
    """Every table of the run, in Markdown."""
    parts = [headline(results), "", *decoders_table(results), "", *linear_table(results), "", *targets_table(results)]
    if results.trained_jury:
        jury = results.config.get("jury_model")
        parts += ["", f"The trained jury ({jury}), timed in a group of its own:", "", *trained_jury_table(results)]
    if results.quantized:
        parts += ["", "Quantized weights and llama.cpp on the same GGUF file, timed in a group of their own:", "",
                  *quantized_table(results)]  # fmt: skip
    if results.profile is not None:
        p = results.profile
        parts += [
            "",
            f"Operators of a {p.dtype} baseline decode step ({p.tokens} steps under torch.profiler, "
            f"{p.self_ms_per_token:.1f} ms self time per step, profiler cost included):",
            "",
            *profile_table(results),
        ]
    if results.notes:
        parts += ["", *[f"- {note}" for note in results.notes]]
    return "\n".join(parts) + "\n"
