"""A jury trained with ``olmo-tap train heads`` on the embedded default is a model like any other: it loads
with ``--model <dir>`` in generate, verify, audit, serve and bench, and keeps its trained heads."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from olmo_tap import HydraTransformer, load_tokenizer
from olmo_tap.cli import main
from olmo_tap.jsonl import write_jsonl
from olmo_tap.serve.app import create_app

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS = 3


@pytest.fixture(scope="module")
def jury_dir(olmo_tap_cache, tmp_path_factory):
    work = tmp_path_factory.mktemp("trained-jury")
    data = work / "data.jsonl"
    write_jsonl(data, [{"prompt": f"Say the number {i}.", "response": f"The number is {i}."} for i in range(24)])
    out = work / "jury"
    args = ["train", "heads", "--data", str(data), "--out", str(out), "--heads", str(HEADS), "--epochs", "1"]
    assert main([*args, "--batch-size", "4", "--lr", "5e-3", "--no-progress"]) == 0
    return out


def test_trained_heads_differ_from_each_other_and_from_the_base(jury_dir):
    jury = HydraTransformer.from_pretrained(jury_dir, progress=False)
    base = HydraTransformer.from_pretrained("smollm2-135m-instruct-clones", n_heads=HEADS, progress=False)
    assert jury.n_heads == HEADS
    w2, base_w2 = jury.heads[0].w2, base.heads[0].w2
    assert all(not torch.equal(w2[h], base_w2[h]) for h in range(HEADS))
    assert not torch.equal(w2[0], w2[1])
    assert torch.equal(jury.embed.weight, base.embed.weight)  # the trunk is untouched


def test_generate_verify_and_audit_take_the_trained_jury(jury_dir, tmp_path, capsys):
    model = ["--model", str(jury_dir)]
    tokens, transcript = tmp_path / "outputs.jsonl", tmp_path / "transcript.json"
    common = ["--max-new-tokens", "12", "--temperature", "0.8", "--seed", "5", "--no-color", *model]
    assert main(["generate", "Say the number 3.", "--mode", "single", "--save-tokens", str(tokens), *common]) == 0
    assert main(["generate", "Say the number 7.", "--save", str(transcript), *common]) == 0
    saved = json.loads(transcript.read_text())
    assert saved["settings"]["n_heads"] == HEADS

    capsys.readouterr()
    verify = ["verify", str(tokens), "--temperature", "0.8", "--sampling-method", "olmo_tap", "--json", *model]
    assert main(verify) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["exact_match_rate"] == 1.0
    assert main(["audit", str(transcript), *model]) == 0


def test_serve_answers_with_the_trained_jury(jury_dir):
    model = HydraTransformer.from_pretrained(jury_dir, progress=False)
    with TestClient(create_app(model, load_tokenizer(jury_dir), "trained-jury"), base_url="http://localhost") as client:
        body = {"model": "trained-jury", "messages": [{"role": "user", "content": "Say the number 2."}]}
        reply = client.post("/v1/chat/completions", json={**body, "max_tokens": 6, "seed": 1})
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["model"] == "trained-jury"
    assert answer["usage"]["completion_tokens"] >= 1 and "trust" in answer


def test_bench_takes_the_trained_jury(jury_dir, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "extra_heads": [],
                "extra_baseline_dtypes": [],
                "prompt_length": 16,
                "gen_length": 6,
                "gammas": [2],
                "samplings": ["greedy"],
                "warmup_ms": 0,
                "measure_ms": 1,
                "min_repeats": 1,
                "max_repeats": 1,
                "ttft_ms": 1,
                "ttft_min_repeats": 1,
                "micro_ms": 1,
                "bandwidth_mib": 8,
                "profile_tokens": 2,
                "compiled_step": False,  # timed by the tiny bench run (tests/test_benchmarks.py): a minute here
            }
        )
    )
    args = ["bench", "--config", str(config), "--model", str(jury_dir), "--no-hf", "--no-progress"]
    assert main([*args, "--results-dir", str(tmp_path / "results")]) == 0
    (run,) = (tmp_path / "results").iterdir()
    results = json.loads((run / "results.json").read_text())
    assert results["config"]["model"] == str(jury_dir)
    assert {c["name"] for c in results["configs"]} >= {"baseline", "hydra_naive", "hydra_poe_g2_greedy"}
