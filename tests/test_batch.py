"""``olmo-tap batch`` on a local Ray with 2 CPUs: results that do not depend on the partitioning (1 worker, 2
workers and the plain CLI give the same answers), resuming, bad records, verify and audit verdicts, Parquet, and
one end-to-end run on the embedded default."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from olmo_tap import HydraTransformer, HydraTransformerConfig, TransformerConfig
from olmo_tap.batch.job import run_job
from olmo_tap.batch.work import JobSpec, generate_options, record_seed
from olmo_tap.cli import main
from olmo_tap.inference.poe import PoE
from olmo_tap.inference.transcript import transcript_dict
from olmo_tap.weights.ensemble import save_ensemble
from olmo_tap.weights.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow  # the tokenizer is the embedded default's

TIMING = ("elapsed_s", "tokens_per_second")


@pytest.fixture(scope="module")
def ray_cluster(olmo_tap_cache):
    """One local Ray for the module, 2 CPUs (the jobs find it running and leave it running)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024**2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_dir(olmo_tap_cache, tmp_path_factory) -> Path:
    """A tiny random Hydra (4 heads) with the embedded default's tokenizer, saved as an ensemble."""
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = TransformerConfig("llama", 49152, 32, 3, 4, 2, 8, 48, 10000.0, 1e-5, True, 256, 1, 2)
    torch.manual_seed(0)
    model: HydraTransformer = HydraTransformerConfig.split(config, 4, 1).build()
    with torch.no_grad():
        for block in [*model.trunk, *model.heads]:
            block.reset_parameters(std=1.0 / 32**0.5)
        model.lm_head.normal_(std=0.5)
    return save_ensemble(model.eval(), tmp_path_factory.mktemp("tiny") / "jury", tokenizer)


RECORDS = [
    {"id": "capital", "prompt": "What is the capital of France?"},
    {"id": "colour", "prompt": "Name a colour.", "seed": 5, "settings": {"temperature": 0.8}},
    {"id": 7, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]},
    {"prompt": "Count to three.", "settings": {"mode": "single", "temperature": 1.0}},
    {"id": "long", "prompt": "Tell me a story.", "settings": {"max_new_tokens": 12, "temperature": 0.7}},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {str(r["id"]): r for r in rows}


def answer(row: dict) -> dict:
    """What must not depend on the partitioning: everything but the timings (no replay can know them)."""
    return {k: v for k, v in row.items() if k not in (*TIMING, "index", "id", "record_sha256")}


def generate_spec(tiny_dir: Path, **options) -> JobSpec:
    return JobSpec("generate", str(tiny_dir), generate_options(max_new_tokens=8, **options), threads=1, job_seed=3)


def test_generate_does_not_depend_on_the_partitioning(ray_cluster, one_thread, tiny_dir, tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    one = run_job(generate_spec(tiny_dir), source, tmp_path / "one.jsonl", workers=1, batch_size=2, progress=False)
    two = run_job(generate_spec(tiny_dir), source, tmp_path / "two.jsonl", workers=2, batch_size=1, progress=False)
    assert one.done_now == two.done_now == len(RECORDS) and not one.bad and not two.bad
    by_one, by_two = read_jsonl(tmp_path / "one.jsonl"), read_jsonl(tmp_path / "two.jsonl")
    assert set(by_one) == {"capital", "colour", "7", "4", "long"} == set(by_two)
    for key in by_one:
        assert answer(by_one[key]) == answer(by_two[key]), key
    # ... and each is what the plain CLI answers for that record, with the seed the job derived
    for record in RECORDS:
        key = str(record.get("id", RECORDS.index(record) + 1))
        seed = record.get("seed", record_seed(3, key))
        settings = {"temperature": 0.0, "max_new_tokens": 8, "mode": "poe", **record.get("settings", {})}
        if "messages" in record:
            continue  # the CLI takes one user message; the chat record is covered by 1 vs 2 workers
        args = ["generate", record["prompt"], "--model", str(tiny_dir), "--seed", str(seed), "--json",
                "--certainty", "off", "--mode", settings["mode"], "--temperature", str(settings["temperature"]),
                "--max-new-tokens", str(settings["max_new_tokens"])]  # fmt: skip
        assert main(args) == 0
        alone = json.loads(capsys.readouterr().out)
        assert answer(alone) == answer(by_one[key]), key
        assert alone["settings"]["seed"] == seed


def test_an_interrupted_job_resumes_and_a_different_job_is_refused(ray_cluster, tiny_dir, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    out = tmp_path / "out.jsonl"
    run_job(generate_spec(tiny_dir), source, out, progress=False)
    complete = read_jsonl(out)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:40])  # killed while writing the third result
    report = run_job(generate_spec(tiny_dir), source, out, progress=False)
    assert report.done_before == 2 and report.done_now == 3
    resumed = read_jsonl(out)
    assert len(out.read_text().splitlines()) == 5
    assert {k: answer(v) for k, v in resumed.items()} == {k: answer(v) for k, v in complete.items()}
    again = run_job(generate_spec(tiny_dir), source, out, progress=False)
    assert again.done_now == 0 and again.done_before == 5
    with pytest.raises(ValueError, match=r"another job.*options"):
        run_job(generate_spec(tiny_dir, temperature=0.5), source, out, progress=False)
    edited = [dict(RECORDS[0], prompt="What is the capital of Spain?"), *RECORDS[1:]]
    write_jsonl(source, edited)
    with pytest.raises(ValueError, match=r"in\.jsonl:1: record 'capital' changed"):
        run_job(generate_spec(tiny_dir), source, out, progress=False)


BAD = [
    '{"id": "ok", "prompt": "Hi"}',
    "not json at all",
    '{"id": "x", "prompt": "Hi", "temperature": 2}',
    '{"id": "y"}',
    '{"id": "ok", "prompt": "again"}',
    '{"id": "z", "prompt": "Hi", "settings": {"gamma": 0}}',
    '["a list"]',
]


def test_bad_records_are_named_with_file_and_line(ray_cluster, tiny_dir, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", BAD)
    with pytest.raises(ValueError, match=r"in.jsonl:2: not valid JSON.*--on-error fail"):
        run_job(generate_spec(tiny_dir), source, tmp_path / "fail.jsonl", on_error="fail", progress=False)
    assert not (tmp_path / "fail.jsonl").exists()  # refused before any work
    report = run_job(generate_spec(tiny_dir), source, tmp_path / "out.jsonl", progress=False)
    assert report.done_now == 1
    problems = {b.where.rsplit(":", 1)[1]: b.problem for b in report.bad}
    assert set(problems) == {"2", "3", "4", "5", "6", "7"}
    assert "temperature" in problems["3"] and "prompt" in problems["4"] and "earlier record" in problems["5"]
    assert "gamma" in problems["6"] and "JSON object" in problems["7"]


def sequences(tiny_dir: Path) -> list[dict]:
    """Single-head answers at temperature 0.8 as token-difr records; the third one edited."""
    model = HydraTransformer.from_pretrained(tiny_dir, progress=False)
    tokenizer = load_tokenizer(tiny_dir, progress=False)
    decoder = PoE(model, tokenizer, mode="single", head=0, max_new_tokens=10, temperature=0.8)
    records = []
    for i, prompt in enumerate(["Hi", "Name a fruit.", "Why?", "Go on."]):
        out = decoder.generate_with_cache(prompt, seed=i)
        records.append({"id": f"s{i}", "prompt_token_ids": out.prompt_ids, "output_token_ids": out.token_ids,
                        "seed": i})  # fmt: skip
    records[2]["output_token_ids"][1] = (records[2]["output_token_ids"][1] + 1) % 1000
    return records


def test_verify_a_dataset(ray_cluster, tiny_dir, tmp_path, capsys):
    source = write_jsonl(tmp_path / "claims.jsonl", sequences(tiny_dir))
    out = tmp_path / "verdicts.parquet"
    args = ["batch", "verify", str(source), "--output", str(out), "--model", str(tiny_dir), "--temperature", "0.8",
            "--sampling-method", "olmo_tap", "--head", "0", "--no-progress", "--json"]  # fmt: skip
    assert main(args) == 1  # a record is flagged
    report = json.loads(capsys.readouterr().out)
    assert report["flagged"] == ["s2"] and report["honest"] is False and report["done_now"] == 4
    assert 0 < report["pooled"]["n_tokens"] - report["pooled"]["n_agreeing"] <= 10  # the edit and what follows it
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "verdicts.parquet").to_pylist()
    assert [row["id"] for row in table] == ["s0", "s1", "s2", "s3"]  # input order
    assert json.loads(table[2]["verdict"])["honest"] is False and json.loads(table[0]["verdict"])["honest"]


def test_audit_a_dataset_of_transcripts(ray_cluster, tiny_dir, tmp_path):
    model = HydraTransformer.from_pretrained(tiny_dir, progress=False)
    tokenizer = load_tokenizer(tiny_dir, progress=False)
    decoder = PoE(model, tokenizer, max_new_tokens=8, temperature=0.9)
    transcripts = [transcript_dict(decoder.generate_with_cache(p, seed=i), str(tiny_dir))
                   for i, p in enumerate(["Hi", "Name a fruit.", "Why?"])]  # fmt: skip
    transcripts[1]["token_ids"][0] = (transcripts[1]["token_ids"][0] + 1) % 1000
    records = [{"id": "a", "transcript": transcripts[0]}, {"id": "b", "transcript": transcripts[1]}, transcripts[2]]
    source = write_jsonl(tmp_path / "transcripts.jsonl", records)
    spec = JobSpec("audit", str(tiny_dir), {"tolerance": None, "threshold": 0.9, "confidence": 0.95}, threads=1)
    report = run_job(spec, source, tmp_path / "audits.jsonl", workers=2, batch_size=1, progress=False)
    assert report.summary["flagged"] == ["b"] and report.honest is False
    rows = read_jsonl(tmp_path / "audits.jsonl")
    assert rows["a"]["honest"] and not rows["b"]["honest"] and rows["3"]["honest"]  # a bare transcript: its line


def test_parquet_input(ray_cluster, tiny_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["p", "q"], "prompt": ["Hi", "Name a fruit."]}), tmp_path / "in.parquet")
    report = run_job(generate_spec(tiny_dir), tmp_path / "in.parquet", tmp_path / "out.jsonl", progress=False)
    assert report.done_now == 2 and set(read_jsonl(tmp_path / "out.jsonl")) == {"p", "q"}


def test_the_embedded_default_end_to_end(ray_cluster, one_thread, smollm, tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": "q", "prompt": "What is the capital of Peru?", "seed": 1}])
    out = tmp_path / "out.jsonl"
    args = ["batch", "generate", str(source), "--output", str(out), "--max-new-tokens", "12", "--no-progress"]
    assert main([*args, "--threads-per-worker", "1"]) == 0  # the thread count of the plain CLI run below
    assert "1 records done now" in capsys.readouterr().out
    row = read_jsonl(out)["q"]
    assert main(["generate", "What is the capital of Peru?", "--seed", "1", "--max-new-tokens", "12", "--json",
                 "--certainty", "off"]) == 0  # fmt: skip
    assert answer(json.loads(capsys.readouterr().out)) == answer(row) and "Lima" in "".join(row["output_parts"][1:])


def test_hostile_options(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", RECORDS[:1])
    for extra, message in (
        (["--workers", "0"], "workers"),
        (["--batch-size", "0"], "batch_size"),
        (["--temperature", "-1"], "temperature"),
        (["--seed", "-3"], "seed"),
    ):
        args = ["batch", "generate", str(source), "--output", str(tmp_path / "o.jsonl"), "--no-progress", *extra]
        assert main(args) == 2
        assert message in capsys.readouterr().err
    assert main(["batch", "generate", str(source), "--output", str(source)]) == 2
    assert main(["batch", "generate", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert main(["batch", "audit", str(source), "--output", str(tmp_path / "o.csv")]) == 2
    assert os.environ.get("RAY_ADDRESS") is None
