"""``olmo-tap bench --concurrency 1,2,4,8,16``: many answers at once, through the real HTTP server and the
Python API.

Every level serves the same requests: ``requests`` prompts (default ``max(levels)``, at least 8), request i with its
own fixed seed
(so its draft head), greedy PoE of the same length (the prompts ask for long stories; an answer that ends
earlier counts the tokens it has). At level n, n clients each send a request, and send the next one in line
when theirs is answered (a closed loop: n requests in flight at every moment until the line is empty), to
``olmo-tap serve`` in a child process on localhost (as deployed: its event loop and decoding thread share no
interpreter lock with the clients); the same requests then go through ``PoE.generate_many`` with
``max_batch=n`` (the Python API's batch). Because a row's arithmetic does not depend on its batch, every level
decodes the same tokens (checked: ``same_answers``): the levels differ only in how many answers share a step,
not in which draft heads run or how often their drafts are accepted. (One random request as the single
stream would let its draft head's acceptance, 0.8 to 0.97 on the trained jury, swing the baseline by 25%.)

Measured per level, over ``repeats`` rounds: aggregate tokens/s (all tokens over the wall time from the first
request to the last token), per-request tokens/s, time to first token (from the request's sending; p50, p95)
and inter-token latency: a request's time from its first token to its last over its tokens after the first
(p50, p95 over requests; PoE emits a round's tokens together, so single gaps say little).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TOPICS = (
    "a lighthouse keeper", "a lost robot", "the first city on Mars", "a dragon who cannot fly", "an old clockmaker",
    "a river that flows uphill", "a library under the sea", "two rival bakers", "a cat who became mayor",
    "the last tree in a desert", "a ship made of glass", "a painter who sees sounds", "a village in the clouds",
    "a detective who is a dog", "the day the sun was late", "a map that changes at night",
)  # fmt: skip


FIRST_SEED = 1000  # request i decodes with seed FIRST_SEED + i


def prompts(n: int) -> list[str]:
    return [f"Tell me a long story about {TOPICS[i % len(TOPICS)]}." for i in range(n)]


def seeds(n: int) -> list[int]:
    return [FIRST_SEED + i for i in range(n)]


def digest(text: str) -> str:
    """A short fingerprint of an answer: the levels' answers are compared by it."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class StreamTiming:
    """One streamed answer as the client saw it (seconds since the level's start)."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    status: int = 0
    text: str = ""

    @property
    def tokens(self) -> int:
        return len(self.arrivals)

    @property
    def ttft(self) -> float | None:
        return self.arrivals[0] - self.sent if self.arrivals else None

    @property
    def inter_token(self) -> float | None:
        return (self.arrivals[-1] - self.arrivals[0]) / (self.tokens - 1) if self.tokens > 1 else None

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / (self.arrivals[-1] - self.sent) if self.arrivals else None


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarise(streams: list[StreamTiming], wall_s: float, concurrency: int) -> dict[str, Any]:
    """The figures of one level (``concurrency`` requests in flight) from its requests' streams."""
    ttft = [s.ttft for s in streams if s.ttft is not None]
    itl = [s.inter_token for s in streams if s.inter_token is not None]
    per_stream = [s.tokens_per_s for s in streams if s.tokens_per_s is not None]
    tokens = sum(s.tokens for s in streams)
    return {
        "streams": concurrency,
        "requests": len(streams),
        "tokens": tokens,
        "wall_s": wall_s,
        "aggregate_tok_s": tokens / wall_s if wall_s > 0 else None,
        "per_stream_tok_s": statistics.fmean(per_stream) if per_stream else None,
        "ttft_p50_s": _percentile(ttft, 0.5),
        "ttft_p95_s": _percentile(ttft, 0.95),
        "itl_p50_s": _percentile(itl, 0.5),
        "itl_p95_s": _percentile(itl, 0.95),
        "failed": sum(s.status != 200 for s in streams),
        "answers": [digest(s.text) for s in streams],
    }


async def _one_stream(client: Any, body: dict[str, Any], start: float) -> StreamTiming:
    timing = StreamTiming(sent=time.perf_counter() - start)
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        timing.status = response.status_code
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            choice = (chunk.get("choices") or [{}])[0]
            if choice.get("finish_reason") is None and chunk.get("trust", {}).get("index") is not None:
                timing.arrivals.append(time.perf_counter() - start)
            timing.text += (choice.get("delta") or {}).get("content") or ""
    return timing


def http_level(url: str, streams: int, requests: int, max_tokens: int) -> dict[str, Any]:
    """``requests`` streamed greedy PoE answers from the server at ``url``, ``streams`` of them in flight at
    every moment (each client sends the next request in line when its answer is complete)."""
    import httpx

    bodies = [
        {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "seed": seed,
            "mode": "poe",
            "stream": True,
        }
        for prompt, seed in zip(prompts(requests), seeds(requests), strict=True)
    ]

    async def run() -> tuple[list[StreamTiming], float]:
        timings: list[StreamTiming | None] = [None] * requests
        line = iter(range(requests))
        limits = httpx.Limits(max_connections=streams + 4)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            start = time.perf_counter()

            async def one_client() -> None:
                for i in line:  # shared by the clients: each request is sent once
                    timings[i] = await _one_stream(client, bodies[i], start)

            await asyncio.gather(*(one_client() for _ in range(streams)))
            return [t for t in timings if t is not None], time.perf_counter() - start

    timings, wall = asyncio.run(run())
    return summarise(timings, wall, streams)


def python_level(decoder: Any, streams: int, requests: int, max_batch: int) -> dict[str, Any]:
    """The same requests through ``PoE.generate_many``, ``streams`` at a time up to the server's ``max_batch``
    (no HTTP, no per-token timing)."""
    start = time.perf_counter()
    batch = min(streams, max_batch)
    outputs = decoder.generate_many(prompts(requests), seeds=seeds(requests), max_batch=batch, temperature=0.0)
    wall = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outputs)
    return {
        "streams": streams,
        "requests": requests,
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tok_s": tokens / wall,
        "per_stream_tok_s": statistics.fmean(len(o.token_ids) / o.elapsed_s for o in outputs if o.elapsed_s > 0),
        "answers": [digest(o.text) for o in outputs],
    }


def same_answers(levels: list[dict[str, Any]]) -> bool:
    """Whether every level (and every repeat of it) gave every request the same answer."""
    return len({tuple(level["answers"]) for level in levels}) == 1


def _median_of(levels: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure, the median over repeats (the repeat with the median aggregate keeps its counts)."""
    merged = dict(sorted(levels, key=lambda r: r["aggregate_tok_s"] or 0)[len(levels) // 2])
    for key, value in merged.items():
        if isinstance(value, float):
            values = [r[key] for r in levels if r.get(key) is not None]
            merged[key] = statistics.median(values) if values else None
    merged["repeats"] = [{k: r[k] for k in ("aggregate_tok_s", "wall_s", "tokens")} for r in levels]
    merged.pop("answers", None)
    return merged


def run_sweep(
    model_name: str,
    levels: list[int],
    *,
    max_tokens: int = 64,
    max_batch: int = 8,
    repeats: int = 2,
    requests: int | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Load ``model_name`` once, serve it, and measure every level ``repeats`` times (levels interleaved, so a
    drift in the machine's speed reaches all alike), each level serving the same ``requests`` (default
    ``max(levels)``, at least 8). With as many requests as streams, the top level is one wave: its batch empties
    as its answers end, and the last answer decodes alone; with several times as many, a finished answer's
    slot takes the next request, and the level holds its streams for most of its time (a server's steady state)."""
    from tqdm import tqdm

    from olmo_tap.benchmarks.harness import load_average, machine_info, software_versions
    from olmo_tap.inference.poe import PoE
    from olmo_tap.inference.settings import DecodeSettings
    from olmo_tap.serve.live import ServeProcess
    from olmo_tap.weights.loading import load_hydra
    from olmo_tap.weights.tokenizer import load_tokenizer

    if threads:
        torch.set_num_threads(threads)
    model = load_hydra(model_name, progress=progress).prepack()
    tokenizer = load_tokenizer(model_name, progress=progress)
    machine = machine_info(model.device)
    decoder = PoE.from_settings(model, tokenizer, DecodeSettings(max_new_tokens=max_tokens, temperature=0.0))
    requests = requests or max(8, *levels)
    if requests < max(levels):
        raise ValueError(f"{requests} requests cannot keep {max(levels)} streams busy: give at least as many")
    http: dict[int, list[dict[str, Any]]] = {n: [] for n in levels}
    api: dict[int, list[dict[str, Any]]] = {n: [] for n in levels}
    bar = tqdm(total=2 * repeats * len(levels), desc="concurrency", unit="level", disable=not progress)
    serve_args = ["--model", model_name, "--max-batch", str(max_batch), "--queue-size", str(max(levels)),
                  "--request-timeout", "3600"]  # fmt: skip
    with ServeProcess(serve_args, threads=threads or torch.get_num_threads()) as server:
        http_level(server.url, 1, 1, 4)  # warm-up: first-call costs (packing, allocator) out of the figures
        for _ in range(repeats):
            for n in levels:
                http[n].append(http_level(server.url, n, requests, max_tokens))
                bar.update()
                api[n].append(python_level(decoder, n, requests, max_batch))
                bar.update()
    bar.close()
    machine["load_average_end"] = load_average()
    return {
        "kind": "concurrency",
        "model": model_name,
        "settings": {
            "mode": "poe",
            "temperature": 0.0,
            "max_tokens": max_tokens,
            "max_batch": max_batch,
            "repeats": repeats,
            "requests": requests,
            "seeds": f"request i: {FIRST_SEED} + i",
            "dtype": str(model.dtype).removeprefix("torch."),
        },
        "machine": machine,
        "software": software_versions(),
        "http": [_median_of(http[n]) for n in levels],
        "python": [_median_of(api[n]) for n in levels],
        "same_answers": {
            "http": same_answers([r for n in levels for r in http[n]]),
            "python": same_answers([r for n in levels for r in api[n]]),
        },
    }


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets read off the HTTP sweep: 8 streams >= 4x one stream's aggregate; inter-token p50 at 8
    streams <= 2x one stream's."""
    by_n = {r["streams"]: r for r in results["http"]}
    out = []
    if 1 in by_n and 8 in by_n:
        one, eight = by_n[1], by_n[8]
        ratio = eight["aggregate_tok_s"] / one["aggregate_tok_s"]
        out.append({"target": "8 streams >= 4x the aggregate tok/s of 1", "value": round(ratio, 2), "met": ratio >= 4})
        if one["itl_p50_s"] and eight["itl_p50_s"]:
            itl = eight["itl_p50_s"] / one["itl_p50_s"]
            out.append(
                {"target": "inter-token p50 at 8 streams <= 2x that of 1", "value": round(itl, 2), "met": itl <= 2}
            )
    return out


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Concurrency sweep: {results['model']}, {results['settings']['dtype']}, greedy PoE, "
        f"{results['settings']['max_tokens']} tokens per answer, --max-batch {results['settings']['max_batch']}; "
        f"{m['cpu']} ({', '.join(m['cpu_flags'])}), {m['torch_threads']} threads.",
        "",
        f"Every level serves the same {results['settings'].get('requests', '?')} requests (request i: prompt i, "
        f"seed {FIRST_SEED} + i), a level's streams at a time (a client sends the next request in line when its "
        "answer ends); the answers were the same at every level: "
        f"HTTP {_yes(results.get('same_answers', {}).get('http'))}, "
        f"Python API {_yes(results.get('same_answers', {}).get('python'))}.",
        "",
        "| streams | HTTP aggregate tok/s | per stream | TTFT p50 / p95 (s) | inter-token p50 / p95 (ms) "
        "| Python API aggregate tok/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for h, p in zip(results["http"], results["python"], strict=True):
        itl = "-" if h["itl_p50_s"] is None else f"{1000 * h['itl_p50_s']:.0f} / {1000 * h['itl_p95_s']:.0f}"
        lines.append(
            f"| {h['streams']} | {h['aggregate_tok_s']:.1f} | {h['per_stream_tok_s']:.1f} | "
            f"{h['ttft_p50_s']:.2f} / {h['ttft_p95_s']:.2f} | {itl} | {p['aggregate_tok_s']:.1f} |"
        )
    lines.append("")
    for t in targets(results):
        lines.append(f"- {t['target']}: {t['value']} ({'met' if t['met'] else 'NOT met'})")
    return "\n".join(lines) + "\n"


def _yes(flag: bool | None) -> str:
    return "not checked" if flag is None else ("yes" if flag else "NO")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = [r["streams"] for r in results["http"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(streams, [r["aggregate_tok_s"] for r in results["http"]], "o-", label="HTTP server, aggregate")
    ax1.plot(streams, [r["aggregate_tok_s"] for r in results["python"]], "s--", label="Python API, aggregate")
    ax1.plot(streams, [r["per_stream_tok_s"] for r in results["http"]], "^:", label="HTTP server, per stream")
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(streams, [str(s) for s in streams])
    ax1.set_xlabel("requests in flight")
    ax1.set_ylabel("tokens / s")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(streams, [r["ttft_p50_s"] for r in results["http"]], "o-", label="time to first token, p50 (s)")
    ax2.plot(streams, [(r["itl_p50_s"] or 0) * 10 for r in results["http"]], "s--", label="inter-token p50 (10 ms)")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(streams, [str(s) for s in streams])
    ax2.set_xlabel("requests in flight")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(
        f"{results['model']}: greedy PoE through olmo-tap serve (--max-batch {results['settings']['max_batch']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    json_path, graph_path = directory / "results.json", directory / "graph.png"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, graph_path)
    (directory / "README.md").write_text(markdown(results))
    return json_path, graph_path
