"""Benchmarks (CPU, fast): statistics on known inputs, the harness's bookkeeping, config errors, the targets,
and a whole run on a tiny random checkpoint through ``olmo-tap bench`` (results.json against its schema, a
readable graph.png). Nothing here asserts a speed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_hf_model
from tiny import tiny_hydra

from olmo_tap.benchmarks.config import load_config
from olmo_tap.benchmarks.harness import Stopwatch, run_interleaved
from olmo_tap.benchmarks.inference import (
    Candidate,
    WeightBytes,
    build_prompt_ids,
    load_results,
    weight_bytes_per_token,
)
from olmo_tap.benchmarks.schema import Results
from olmo_tap.benchmarks.stats import (
    amortised_latencies,
    decode_tokens_per_second,
    iqr_filter,
    per_position_median,
    summarize,
)
from olmo_tap.benchmarks.targets import evaluate
from olmo_tap.cli import main
from olmo_tap.weights.errors import WeightsError

# ----- statistics -----------------------------------------------------------------------------------------------------


def test_iqr_filter_drops_values_beyond_tukey_fences():
    # Q1 = 2, Q3 = 4, IQR = 2: fences at -1 and 7.
    assert iqr_filter([1, 2, 3, 4, 100]) == [1, 2, 3, 4]
    assert iqr_filter([3, 1, 2, 4, -50, 7]) == [3, 1, 2, 4, 7]  # order kept; 7 sits within the upper fence
    assert iqr_filter([1, 1000, 2]) == [1, 1000, 2]  # too few values to call anything an outlier


def test_summarize_known_values():
    s = summarize([1, 2, 3, 4, 100])
    assert (s["n"], s["n_outliers"]) == (4, 1)
    assert s["median"] == 2.5 and s["mean"] == 2.5 and (s["min"], s["max"]) == (1, 4)
    assert s["p10"] == pytest.approx(1.3) and s["p90"] == pytest.approx(3.7)
    assert s["stdev"] == pytest.approx(math.sqrt(5 / 3))
    assert summarize([7.0])["stdev"] == 0.0
    with pytest.raises(ValueError, match="empty"):
        summarize([])


def test_amortised_latencies_and_decode_rate():
    arrivals = [100.0, 100.5, 101.0, 101.5, 141.5, 142.0, 202.0]
    sizes = [4, 2, 1]
    assert amortised_latencies(arrivals, sizes) == [None] * 4 + [20.25, 20.25, 60.0]
    # 3 tokens after the first round, in 202 - 101.5 ms
    assert decode_tokens_per_second(arrivals, 4) == pytest.approx(3000 / 100.5)
    assert decode_tokens_per_second(arrivals[:4], 4) is None
    # a plain decoder: the gaps between tokens
    assert amortised_latencies([10.0, 30.0, 35.0], [1, 1, 1]) == [None, 20.0, 5.0]
    with pytest.raises(ValueError, match="add up"):
        amortised_latencies([1.0, 2.0], [1])


def test_per_position_median_ignores_missing_values():
    rows = [[None, 1.0, 4.0], [None, 3.0], [None, 2.0, 6.0]]
    assert per_position_median(rows) == [None, 2.0, 5.0]


# ----- harness ------------------------------------------------------------------------------------------------------


def test_run_interleaved_rounds_warmup_and_bounds():
    calls: list[tuple[str, int]] = []
    tasks = {name: (lambda r, name=name: calls.append((name, r)) or (name, r)) for name in ("a", "b")}
    results = run_interleaved(tasks, warmup_ms=1e-9, measure_ms=0, min_repeats=3, max_repeats=5, progress=False)
    # one warm-up round (discarded), then exactly min_repeats rounds: the budget is already spent
    assert calls == [("a", 0), ("b", 0)] + [(n, r) for r in range(3) for n in ("a", "b")]
    assert results == {"a": [("a", 0), ("a", 1), ("a", 2)], "b": [("b", 0), ("b", 1), ("b", 2)]}
    capped = run_interleaved(tasks, warmup_ms=0, measure_ms=1e9, min_repeats=1, max_repeats=2, progress=False)
    assert [len(v) for v in capped.values()] == [2, 2]


def test_stopwatch_marks_are_ordered():
    watch = Stopwatch("cpu")
    watch.start()
    for _ in range(3):
        sum(range(10_000))
        watch.mark()
    marks, total = watch.stop()
    assert len(marks) == 3 and 0 <= marks[0] <= marks[1] <= marks[2] <= total


PEAK_MEMORY_PROBE = """
import json, torch
from olmo_tap.benchmarks.harness import PeakMemory
with PeakMemory("cpu") as memory:
    block = torch.ones(96 * 2**20 // 4)
    del block
print(json.dumps([memory.kind, memory.peak_bytes, memory.resettable, memory.increase_bytes]))
"""


def test_peak_memory_sees_a_large_allocation():
    # A fresh process: in this one, memory freed by earlier tests may still be resident and be reused, so
    # the block would not raise the RSS at all (correctly, but the test could not see the allocation).
    size = 96 * 2**20
    run = subprocess.run([sys.executable, "-c", PEAK_MEMORY_PROBE], capture_output=True, text=True, check=True)
    kind, peak, resettable, increase = json.loads(run.stdout.strip().splitlines()[-1])
    assert kind == "peak_rss" and peak is not None
    if not resettable:
        pytest.skip("this kernel does not let a process reset its peak RSS")
    assert increase is not None and increase >= 0.9 * size


def test_weight_bytes_per_token_follow_the_rounds():
    model = tiny_hydra(vocab=6, n_heads=4, heads_depth=1)
    w = WeightBytes.of(model)
    c = model.base_config
    per_layer = 4 * (c.d_model * (c.q_dim + 2 * c.kv_dim) + c.q_dim * c.d_model + 3 * c.d_model * c.ffn_hidden)
    per_layer += 4 * 2 * c.d_model  # two norms
    assert (w.trunk, w.head) == (per_layer, per_layer)  # 1 trunk layer, 1 layer per head, fp32
    assert w.lm_head == 4 * (c.d_model * c.vocab_size + c.d_model)

    def candidate(kind: str) -> Candidate:
        return Candidate("x", kind, 4, 4, torch.float32, 2, "greedy", 0.0, lambda *a: None, weights=w, n_text_heads=4)

    assert weight_bytes_per_token(candidate("baseline"), [], 4) == w.tower
    assert weight_bytes_per_token(candidate("hydra_naive"), [], 4) == w.trunk + 4 * w.head + w.lm_head
    # two runs of 4 tokens at gamma 2: rounds (2, 2), (2, 2) and (1, 2), (2, 2), (1, 1)... drafted steps 4 and 5
    rounds = [[(2, 2), (2, 2)], [(1, 2), (2, 2), (1, 1)]]
    verify = 3 * w.head + w.lm_head
    expected = (4 * w.tower + 2 * verify + 5 * w.tower + 3 * verify) / 8
    assert weight_bytes_per_token(candidate("hydra_poe"), rounds, 4) == pytest.approx(expected)


def test_prompt_has_the_asked_length_and_ends_with_the_generation_prompt(tiny_bench_checkpoint):
    from olmo_tap.weights.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_bench_checkpoint))
    ids = build_prompt_ids(tokenizer, 12)
    assert len(ids) == 12
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<s>")  # the template's generation prompt


# ----- configs ------------------------------------------------------------------------------------------------------


def write_config(tmp_path: Path, **keys) -> Path:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(keys))
    return path


def test_default_config_and_quick_section():
    full, quick = load_config(), load_config(quick=True)
    assert full.gammas == [1, 2, 4, 8] and full.samplings == ["greedy", "sampled"] and full.extra_heads == [9]
    assert quick.gen_length < full.gen_length and quick.extra_heads == []


def test_precedence_file_then_quick_then_flags(tmp_path):
    path = write_config(tmp_path, gen_length=40, beta=0.5, quick={"gen_length": 8})
    assert load_config(path).gen_length == 40
    config = load_config(path, quick=True, overrides={"beta": None, "gammas": [3]})
    assert (config.gen_length, config.beta, config.gammas) == (8, 0.5, [3])


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"gamma": [4]}, r"unknown benchmark config key\(s\) \['gamma'\]"),
        ({"quick": {"gen_lenght": 3}}, r"unknown benchmark config key\(s\) \['gen_lenght'\]"),
        ({"gammas": []}, "gammas is empty"),
        ({"gammas": [4, 0]}, r"every value of gammas must be >= 1, got \[0\]"),
        ({"gammas": [2, 2]}, "duplicates"),
        ({"gammas": "4"}, "gammas must be a list of integers"),
        ({"samplings": ["beam"]}, "samplings must be distinct values"),
        ({"temperature": 0}, "temperature must be a number > 0"),
        ({"temperature": 1e-300}, r"temperature must be 0 \(greedy\) or between 0.0001 and 100, got 1e-300"),
        ({"beta": 1e9}, r"beta must be a number in \(0, 100\]"),
        ({"gen_length": 1}, "gen_length must be an integer >= 2"),
        ({"heads": 1}, "heads must be an integer >= 2"),
        ({"dtype": "float8"}, "dtype: unknown dtype 'float8'"),
        ({"min_repeats": 5, "max_repeats": 2}, "max_repeats must be an integer >= 5"),
        ({"hf_generate": "yes"}, "hf_generate must be true or false"),
    ],
)
def test_bad_configs_are_named(tmp_path, keys, message):
    with pytest.raises(ValueError, match=message):
        load_config(write_config(tmp_path, **keys))


def test_unknown_model_fails_before_loading(tmp_path):
    with pytest.raises(WeightsError, match="no such file, directory, preset or hub id: 'no-such-model'"):
        load_config(write_config(tmp_path, model="no-such-model"))


def test_cli_reports_a_bad_config(tmp_path, capsys):
    assert main(["bench", "--config", str(write_config(tmp_path, gammas=[])), "--no-progress"]) == 2
    assert "gammas is empty" in capsys.readouterr().err
    assert main(["bench", "--config", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_refuses_a_concurrency_sweep_it_cannot_run_before_loading(tmp_path, capsys, monkeypatch):
    from olmo_tap.benchmarks import concurrency

    monkeypatch.setattr(concurrency, "run_sweep", lambda *a, **k: pytest.fail("the sweep ran"))
    argv = ["bench", "--concurrency", "1,8", "--results-dir", str(tmp_path), "--no-progress"]
    assert main([*argv, "--requests", "4"]) == 2
    assert "--requests 4 cannot keep 8 streams busy" in capsys.readouterr().err
    assert main([*argv, "--requests", "0"]) == 2
    assert "--requests must be >= 1, got 0" in capsys.readouterr().err


# ----- targets ------------------------------------------------------------------------------------------------------


def _row(name: str, kind: str, tps: float, n_heads: int | None = 5, dtype: str = "float32") -> dict:
    return {
        "name": name,
        "kind": kind,
        "tokens_per_s": tps,
        "n_heads": n_heads,
        "dtype": dtype,
        "poe": None,
        "group": 5,
    }


def test_targets_judged_and_missing_ones_reported():
    configs = [
        _row("hf_generate", "hf_generate", 10.0, None),
        _row("baseline", "baseline", 14.0),
        _row("baseline_bf16", "baseline", 21.0, 1, "bfloat16"),
        _row("hydra_naive", "hydra_naive", 10.0),
        _row("hydra_poe_g4_greedy", "hydra_poe", 12.0),
    ]
    linear = [
        {
            "dtype": "float32",
            "decode_step_ms": 40.0,
            "packed_ms": {"median": 32.0},
            "stock_ms": {"median": 45.0},
            "step_over_packed": 1.25,
            "step_over_stock": 40 / 45,
        }
    ]
    linear.append({**linear[0], "decoder": "compiled", "decode_step_ms": 33.0, "step_over_packed": 33 / 32})
    found = {t["name"]: t for t in evaluate(configs, linear, "cpu")}
    met = {name: t["met"] for name, t in found.items()}
    assert met == {
        "baseline >= 1.3x transformers generate() (same dtype)": True,  # 1.4
        "baseline bf16 >= 2.0x transformers fp32 (CPU)": True,  # 2.1
        "float32 decode step <= 1.15x its bare linear layers": False,  # 1.25
        "float32 compiled decode step <= 1.15x its bare linear layers": True,  # 1.03
        "PoE gamma 4 greedy >= 0.8x baseline": True,  # 0.857
        "PoE gamma 4 greedy >= 1.1x naive, 5 heads": True,  # 1.2
        "PoE gamma 4 greedy >= 1.3x naive, 9 heads": None,  # no 9-head rows
    }
    assert found["PoE gamma 4 greedy >= 1.1x naive, 5 heads"]["value"] == pytest.approx(1.2)
    assert "bf16" not in " ".join(t["name"] for t in evaluate(configs, linear, "cuda"))


# ----- a whole run --------------------------------------------------------------------------------------------------


def _word_tokenizer():
    """A word-level tokenizer of VOCAB tokens with a chat template (transformers' own classes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["explain", "step", "by", "how", "a", "bicycle", "works", "and", "why", "it", "stays", "upright", ",", "."]
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        chat_template="{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s>{% endif %}",
    )


@pytest.fixture(scope="module")
def tiny_bench_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint with a tokenizer, both saved by transformers."""
    directory = tmp_path_factory.mktemp("tiny-bench")
    tiny_hf_model("llama").save_pretrained(directory)
    _word_tokenizer().save_pretrained(directory)
    return directory


TINY_RUN = {
    "threads": 1,  # tiny matmuls: one thread avoids waiting on a second one that another process keeps busy
    "heads": 3,
    "heads_depth": 1,
    "extra_heads": [4],
    "extra_baseline_dtypes": ["bfloat16"],
    "prompt_length": 10,
    "gen_length": 6,
    "gammas": [1, 4],
    "warmup_ms": 1e-6,
    "measure_ms": 0,
    "min_repeats": 2,
    "max_repeats": 2,
    "ttft_ms": 0,
    "ttft_min_repeats": 3,
    "micro_ms": 5,
    "bandwidth_mib": 4,
    "profile_tokens": 3,
}


@pytest.fixture(scope="module")
def tiny_jury_checkpoint(tmp_path_factory) -> Path:
    """Another tiny random Llama (other weights, same tokenizer): stands in for the trained jury."""
    directory = tmp_path_factory.mktemp("tiny-jury")
    tiny_hf_model("llama", seed=1).save_pretrained(directory)
    _word_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_run(tiny_bench_checkpoint, tiny_jury_checkpoint, tmp_path_factory) -> tuple[Path, str]:
    """(run directory, printed report) of ``olmo-tap bench`` on the tiny checkpoint."""
    root = tmp_path_factory.mktemp("bench-results")
    config = root / "tiny.json"
    run = {"model": str(tiny_bench_checkpoint), "jury_model": str(tiny_jury_checkpoint), **TINY_RUN}
    config.write_text(json.dumps(run))
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["bench", "--config", str(config), "--results-dir", str(root), "--no-progress"]) == 0
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    return run_dir, out.getvalue()


def test_the_trained_jury_is_timed_in_a_group_of_its_own(tiny_run):
    run_dir, printed = tiny_run
    results = load_results(run_dir)
    names = [c.name for c in results.trained_jury]
    assert names[:2] == ["jury_baseline", "jury_hydra_naive"] and "jury_hydra_poe_g4_greedy" in names
    assert all(c.poe is not None for c in results.trained_jury if c.kind == "hydra_poe")
    assert not set(names) & {c.name for c in results.configs}
    assert "The trained jury" in printed and "clones' acceptance" in printed


def test_run_writes_results_matching_the_schema(tiny_run):
    run_dir, _ = tiny_run
    assert run_dir.name.endswith("_run01")
    results = Results.model_validate_json((run_dir / "results.json").read_text())  # extra keys are forbidden
    names = [c.name for c in results.configs]
    poe_names = [f"hydra_poe_g{g}_{s}" for g in (1, 4) for s in ("greedy", "sampled")]
    assert names == [
        "hf_generate",
        "baseline",
        "baseline_bf16",
        "hydra_naive",
        *poe_names,
        "baseline_4h",
        "hydra_naive_4h",
        *[n + "_4h" for n in poe_names],
    ]
    assert [c.group for c in results.configs] == [3] * 8 + [4] * 6
    for c in results.configs:
        assert c.n_runs == 2 and len(c.ttft_samples_ms) >= 3 and c.ttft_ms.n + c.ttft_ms.n_outliers >= 3
        assert len(c.per_position_latency_ms) == 6 and c.per_position_latency_ms[-1] > 0
        assert c.tokens_per_s > 0 and c.weight_bytes_per_token > 0 and c.memory.weight_bytes > 0
        assert (c.poe is not None) == (c.kind == "hydra_poe")
    by_name = {c.name: c for c in results.configs}
    greedy4 = by_name["hydra_poe_g4_greedy"].poe
    # 6 tokens at gamma 4: at least two rounds, every drafted token decided or cut by a rejection
    assert greedy4.rounds_per_call >= 2 and greedy4.draft_steps_per_call >= greedy4.drafted_per_call
    assert 0 <= greedy4.acceptance_rate <= 1 and greedy4.tokens_per_round <= 4
    assert by_name["baseline"].per_position_latency_ms[0] is None  # the first token's time is the TTFT
    assert by_name["hf_generate"].n_heads is None and by_name["baseline_bf16"].dtype == "bfloat16"
    assert [(x.dtype, x.decoder) for x in results.linear_layers] == [
        ("float32", "eager"),
        ("bfloat16", "eager"),
        ("float32", "compiled"),
        ("bfloat16", "compiled"),
    ]
    assert results.profile is not None and results.profile.tokens == 3 and results.profile.ops
    assert results.model.n_heads == 3 and results.prompt_ids and len(results.prompt_ids) == 10
    assert results.machine.torch_threads == 1 and results.versions.torch == torch.__version__
    assert results.config["gammas"] == [1, 4]
    met = {t.name: t.met for t in results.targets}
    assert met["PoE gamma 4 greedy >= 1.3x naive, 9 heads"] is None  # not part of this run
    assert all(v is not None for k, v in met.items() if "9 heads" not in k and "5 heads" not in k)


def test_greedy_decoders_agree_on_cloned_heads(tiny_run):
    """Heads loaded from one checkpoint are clones: greedy single, naive and PoE must write the same text."""
    results = Results.model_validate_json((tiny_run[0] / "results.json").read_text())
    greedy = [c for c in results.configs if c.sampling == "greedy" and c.dtype == "float32" and c.kind != "hf_generate"]
    texts = {c.name: c.sample_text for c in greedy}
    assert len(set(texts.values())) == 1, texts


def test_run_draws_a_readable_graph_and_prints_tables(tiny_run):
    from matplotlib.image import imread

    run_dir, printed = tiny_run
    image = imread(run_dir / "graph.png")
    assert image.ndim == 3 and image.shape[0] > 500 and image.shape[1] > 800 and image.std() > 0.01
    assert "| configuration | heads | dtype | tok/s |" in printed and "| target |" in printed
    assert "hydra_poe_g4_sampled_4h" in printed


def test_report_redraws_from_an_existing_run(tiny_run, capsys):
    run_dir, printed = tiny_run
    (run_dir / "graph.png").unlink()
    assert main(["bench", "--report", str(run_dir)]) == 0
    assert (run_dir / "graph.png").is_file()
    assert capsys.readouterr().out == printed


def test_concurrency_levels_measure_streams_through_the_real_server(tmp_path):
    from tiny import LetterTokenizer, tiny_hydra

    from olmo_tap.benchmarks import concurrency
    from olmo_tap.serve.app import create_app
    from olmo_tap.serve.config import ServeConfig
    from olmo_tap.serve.live import LiveServer

    app = create_app(tiny_hydra(vocab=20, n_heads=3), LetterTokenizer(20), "tiny", ServeConfig(max_batch=2))
    with LiveServer(app) as server:
        # 4 requests, 3 clients: 2 decoded together, the third waits for a slot, the fourth for a client
        level = concurrency.http_level(server.url, 3, 4, 5)
        alone = concurrency.http_level(server.url, 1, 4, 5)  # the same requests one at a time
    assert level["streams"] == 3 and level["requests"] == 4 and level["failed"] == 0 and level["tokens"] == 20
    assert concurrency.same_answers([level, alone]) and len(set(level["answers"])) > 1
    assert not concurrency.same_answers([level, dict(alone, answers=alone["answers"][::-1])])
    assert level["aggregate_tok_s"] > 0 and level["ttft_p50_s"] <= level["ttft_p95_s"]
    assert 0 < level["itl_p50_s"] <= level["itl_p95_s"]
    one = dict(level, streams=1, aggregate_tok_s=10.0, itl_p50_s=0.1)
    eight = dict(level, streams=8, aggregate_tok_s=45.0, itl_p50_s=0.15)
    results = {
        "kind": "concurrency",
        "model": "tiny",
        "settings": {"dtype": "float32", "max_tokens": 5, "max_batch": 2},
        "machine": {"cpu": "cpu", "cpu_flags": ["avx2"], "torch_threads": 1},
        "http": [one, eight],
        "python": [one, eight],
    }
    assert [t["met"] for t in concurrency.targets(results)] == [True, True]
    assert "| 8 | 45.0 |" in concurrency.markdown(results)
    results["same_answers"] = {"http": True, "python": False}
    assert "HTTP yes, Python API NO" in concurrency.markdown(results)
    json_path, graph_path = concurrency.write(results, tmp_path / "run")
    assert json_path.exists() and graph_path.stat().st_size > 0


def test_a_serve_process_that_cannot_start_says_why(tmp_path):
    from olmo_tap.serve.live import ServeProcess

    missing = tmp_path / "no-such-model"
    with pytest.raises(RuntimeError, match=r"did not start.*no-such-model"), ServeProcess(["--model", str(missing)]):
        pass


def test_a_llama_cpp_build_that_dies_on_this_cpu_is_a_note_not_a_crash(monkeypatch, tmp_path):
    """llama.cpp is probed on the file in a child process first: a build whose kernels the CPU refuses (SIGILL)
    or that fails otherwise leaves the bench running, with the reason as the row's note."""
    import signal
    import types

    from olmo_tap.benchmarks import llama_cpp_reference

    monkeypatch.setitem(sys.modules, "llama_cpp", types.ModuleType("llama_cpp"))
    outcomes = iter([(-signal.SIGILL, ""), (1, "ValueError: Failed to load model from file\n"), (0, "")])

    def child(args, **kwargs):
        assert args[0] == sys.executable and str(tmp_path / "m.gguf") in args
        code, err = next(outcomes)
        return subprocess.CompletedProcess(args, code, "", err)

    monkeypatch.setattr(llama_cpp_reference.subprocess, "run", child)
    assert "dies by SIGILL on this CPU" in llama_cpp_reference.available(tmp_path / "m.gguf", 2)
    assert "Failed to load model" in llama_cpp_reference.available(tmp_path / "m.gguf", 2)
    assert llama_cpp_reference.available(tmp_path / "m.gguf", 2) is None
    assert llama_cpp_reference.available() is None  # installed, no file to probe
