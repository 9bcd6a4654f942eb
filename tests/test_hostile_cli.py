"""Hardening: every CPU (the stock-kernel fallback), untrusted files, and the CLI's exit codes.

Each test forces the hostile case (a CPU without oneDNN bf16, a torn or garbage file, an unwritable path, a
directory that is not ours, an interrupted save, an unexpected exception) and checks the safe outcome. Tiny
models only; the one compile takes ~30 s.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import olmo_tap.cli
from olmo_tap import HydraTransformer, WeightsError, save_ensemble
from olmo_tap.batch.files import read_records
from olmo_tap.cli import main
from olmo_tap.jsonl import iter_jsonl
from olmo_tap.model import kernels, layers, native_linear
from olmo_tap.train.instructions import generate_instructions
from olmo_tap.train.trainer import TrainConfig, train_adapter
from olmo_tap.verify.records import TokenSequence, read_token_sequences
from olmo_tap.weights import ensemble as ensemble_module
from tests.tiny import LetterTokenizer, tiny_hydra

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
AVX2_ERROR = (
    "mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq"
)
DEEP_JSON = "[" * 100_000 + "]" * 100_000


@pytest.fixture
def kernel_state(monkeypatch):
    """A fresh kernel choice (no probe results, no override, no env var), restored afterwards; every weight
    is large enough to pack, so tiny models take the oneDNN path where this CPU has it (fp32 too: these tests are
    about oneDNN's fallbacks, the native fp32 kernel's are in test_native_linear.py)."""
    monkeypatch.setattr(kernels, "_probed", {})
    monkeypatch.delenv(kernels.KERNELS_ENV, raising=False)
    monkeypatch.setenv(native_linear.LINEAR_ENV, "onednn")
    monkeypatch.setattr(layers, "PACK_MIN_ELEMENTS", 0)
    kernels.set_kernel_path(None)
    yield
    kernels.set_kernel_path(None)


def logits_of(model: HydraTransformer, ids: torch.Tensor) -> torch.Tensor:
    """Prefill, then two cached decode steps (the shapes oneDNN serves differently), as fp32."""
    with torch.no_grad():
        cache = model.new_cache(1, ids.size(1))
        out = [model(ids[:, :-2], cache=cache)[:, :, -1:]]
        out += [model(ids[:, i : i + 1], start_pos=i, cache=cache) for i in (ids.size(1) - 2, ids.size(1) - 1)]
    return torch.cat(out, dim=2).float()


def tiny_loader(args) -> tuple[HydraTransformer, LetterTokenizer]:
    return tiny_hydra(vocab=6), LetterTokenizer(6)


def packed(model: HydraTransformer) -> bool:
    return model._packed_lm_head.current is not None


# ----- 1. every CPU: the kernel path ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forced_stock_kernels_give_the_prepacked_logits(kernel_state, dtype):
    model = tiny_hydra(vocab=26, n_heads=3, heads_depth=1, seed=1).to(dtype)
    ids = torch.randint(0, 26, (1, 9), generator=torch.Generator().manual_seed(3))
    auto = logits_of(model, ids)
    assert packed(model) == (kernels.onednn_refusal(dtype) is None)
    kernels.set_kernel_path("stock")
    stock = logits_of(model, ids)
    assert not packed(model)  # the model built before the switch follows it
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: one rounding of the outputs apart
    torch.testing.assert_close(stock, auto, atol=tolerance, rtol=0)
    assert "forced: set_kernel_path('stock')" in kernels.describe()


def test_a_cpu_without_onednn_bf16_runs_bf16_on_stock_kernels(kernel_state, monkeypatch):
    # An AVX2-only EPYC: torch says oneDNN cannot take bf16; packing would raise AVX2_ERROR deep in torch.
    monkeypatch.setattr(kernels, "_cpu_takes_onednn_bf16", lambda: False)

    def reorder_as_on_avx2(weight, hint):
        if weight.dtype == torch.bfloat16:
            raise RuntimeError(AVX2_ERROR)
        return torch.ops.mkldnn._reorder_linear_weight(weight, hint)

    monkeypatch.setattr(kernels, "reorder_weight", reorder_as_on_avx2)
    assert kernels.onednn_refusal(torch.bfloat16) == kernels.BF16_CPU_NEEDS
    fp32_packs = kernels.onednn_refusal(torch.float32) is None
    model = tiny_hydra(vocab=26, n_heads=2, heads_depth=1, seed=2)
    ids = torch.randint(0, 26, (1, 7), generator=torch.Generator().manual_seed(4))
    fp32 = logits_of(model, ids)
    assert packed(model) == fp32_packs
    bf16 = logits_of(model.to(torch.bfloat16), ids)
    assert not packed(model)
    torch.testing.assert_close(bf16, fp32, atol=0.1, rtol=0)  # bf16 against fp32: only rounding apart
    line = kernels.describe()
    assert "bf16: CPU lacks avx512bw/vl/dq or avx_ne_convert" in line
    assert ("oneDNN prepacked (fp32)" in line) == fp32_packs


@pytest.mark.parametrize("fails", ["probe", "real weight"])
def test_onednn_failing_at_run_time_falls_back_instead_of_raising(kernel_state, monkeypatch, fails):
    # torch believes the CPU takes bf16, but oneDNN refuses: on the one-off probe, or only on a real weight.
    def refusing_reorder(weight, hint):
        if weight.dtype == torch.bfloat16 and (fails == "probe" or weight.shape != (8, 16)):
            raise RuntimeError(AVX2_ERROR)
        return torch.ops.mkldnn._reorder_linear_weight(weight, hint)

    if kernels.onednn_refusal(torch.bfloat16) is not None:
        pytest.skip(f"bf16 runs on stock kernels here anyway: {kernels.onednn_refusal(torch.bfloat16)}")
    monkeypatch.setattr(kernels, "_probed", {})
    monkeypatch.setattr(kernels, "reorder_weight", refusing_reorder)
    model = tiny_hydra(vocab=26, n_heads=2, heads_depth=1, seed=5).to(torch.bfloat16)
    ids = torch.randint(0, 26, (1, 7), generator=torch.Generator().manual_seed(6))
    fallen_back = logits_of(model, ids)  # no exception
    assert not packed(model)
    assert "mkldnn_reorder_linear_weight" in kernels.onednn_refusal(torch.bfloat16)
    kernels.set_kernel_path("stock")
    torch.testing.assert_close(logits_of(model, ids), fallen_back, atol=0, rtol=0)


def test_kernel_path_comes_from_the_environment(kernel_state, monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "stock")
    assert kernels.kernel_path() == "stock"
    assert kernels.describe() == "stock matmul (fp32, bf16: forced: OLMO_TAP_KERNELS=stock)"
    model = tiny_hydra(vocab=26, n_heads=2, heads_depth=1).prepack()
    assert not packed(model)
    monkeypatch.setenv(kernels.KERNELS_ENV, "fastest")
    with pytest.raises(ValueError, match="OLMO_TAP_KERNELS must be one of auto, stock"):
        kernels.kernel_path()
    with pytest.raises(ValueError, match="kernel path must be"):
        kernels.set_kernel_path("onednn")


def test_info_names_the_kernel_path(kernel_state, monkeypatch, capsys):
    monkeypatch.setattr(
        olmo_tap.cli, "load_model_and_tokenizer", lambda args: (tiny_hydra(vocab=6), LetterTokenizer(6))
    )
    monkeypatch.setenv(kernels.KERNELS_ENV, "stock")
    assert main(["info"]) == 0
    assert "linear kernels    stock matmul (fp32, bf16: forced: OLMO_TAP_KERNELS=stock)" in capsys.readouterr().out
    monkeypatch.setenv(kernels.KERNELS_ENV, "bogus")
    assert main(["info"]) == 2
    assert "OLMO_TAP_KERNELS must be one of" in capsys.readouterr().err


@pytest.fixture(scope="module")
def packable_checkpoint(tmp_path_factory) -> Path:
    """A small Llama checkpoint whose layer weights are big enough to be prepacked, with a word tokenizer."""
    from tests.conftest import tiny_hf_model
    from tests.test_benchmarks import _word_tokenizer

    directory = tmp_path_factory.mktemp("packable")
    tiny_hf_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2).save_pretrained(directory)
    _word_tokenizer().save_pretrained(directory)
    return directory


def test_bf16_generate_on_a_real_avx2_only_onednn(packable_checkpoint):
    """The reported failure itself: oneDNN limited to AVX2 (ONEDNN_MAX_CPU_ISA, read by oneDNN at start-up, so a
    fresh process) refuses to pack bf16 with the very error seen on AVX2 EPYCs; generate must not hit it."""
    script = (
        "import sys, torch\n"
        "from olmo_tap.cli import main\n"
        "print('bf16 oneDNN:', torch.ops.mkldnn._is_mkldnn_bf16_supported())\n"
        f"args = ['--model', {str(packable_checkpoint)!r}, '--dtype', 'bf16', '--heads', '2', '--heads-depth', '1']\n"
        "assert main(['info', *args]) == 0\n"
        "sys.exit(main(['generate', 'how a bicycle works', *args, '--max-new-tokens', '4', '--no-color']))\n"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop(kernels.KERNELS_ENV, None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mkldnn_reorder_linear_weight" not in done.stderr
    if "bf16 oneDNN: False" in done.stdout:  # the limit took effect (a torch with oneDNN)
        assert "stock matmul (bf16: CPU lacks avx512bw/vl/dq or avx_ne_convert)" in done.stdout


def test_compiled_step_with_stock_kernels_matches_eager_bf16(kernel_state, monkeypatch):
    """What an AVX2-only CPU compiles: Inductor packs no bf16 weight for oneDNN; the step still works."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(kernels, "_cpu_takes_onednn_bf16", lambda: False)
    kernels.set_kernel_path(None)
    model = tiny_hydra(vocab=26, n_heads=2, heads_depth=1, seed=7).to(torch.bfloat16)
    ids = torch.randint(0, 26, (1, 8), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        cache = model.new_cache(1, ids.size(1))
        model(ids[:, :4], head_indices=[1], cache=cache)
        eager = [
            model(ids[:, p : p + 1], head_indices=[1], start_pos=p, cache=cache)[0, 0, 0].float() for p in range(4, 8)
        ]
        model(ids[:, :4], head_indices=[1], cache=cache)
        tower = model.compiled_tower(1, ids.size(1))
        tower.load_cache(cache, 0, 4)
        counters.clear()
        compiled = [tower.step(int(ids[0, p]), p).float() for p in range(4, 8)]
    assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] == 0
    for position, (a, b) in enumerate(zip(compiled, eager, strict=True), start=4):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=0, msg=f"position {position}")


# ----- 2. checkpoints are data, never code ------------------------------------------------------------------------


def test_no_torch_load_without_weights_only_true():
    offenders = []
    for path in (ROOT / "olmo_tap").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


def letter_items(model: HydraTransformer, n: int = 12):
    from olmo_tap.train.data import ChatExample, encode_example
    from olmo_tap.train.lora_heads import lm_items

    tokenizer = LetterTokenizer(26, eos_token_id=25)
    examples = [ChatExample.from_prompt("abcdefgh"[i % 5 :], "cba") for i in range(n)]
    return lm_items(model, [encode_example(tokenizer, e) for e in examples], progress=False)


@pytest.mark.parametrize("garbage", [b"\x00not a checkpoint at all", b"", b"PK\x03\x04torn zip"])
def test_a_corrupt_checkpoint_is_a_clear_error_naming_the_file(tmp_path, garbage):
    from olmo_tap.train.lora_heads import lm_loss_fn

    model = tiny_hydra(vocab=26, n_heads=2, heads_depth=1)
    checkpoint = tmp_path / "head0.ckpt"
    checkpoint.write_bytes(garbage)
    config = TrainConfig(rank=2, alpha=4.0, epochs=1, batch_size=4)
    with pytest.raises(ValueError, match=rf"checkpoint {checkpoint} cannot be read.*delete it"):
        train_adapter(model, 0, letter_items(model), lm_loss_fn(model, 0, 26), config, checkpoint=checkpoint)


def test_a_checkpoint_that_pickles_code_is_refused(tmp_path):
    from olmo_tap.train.lora_heads import lm_loss_fn

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    model = tiny_hydra(vocab=26, n_heads=2, heads_depth=1)
    checkpoint = tmp_path / "head0.ckpt"
    torch.save({"run": Payload()}, checkpoint)
    config = TrainConfig(rank=2, alpha=4.0, epochs=1, batch_size=4)
    with pytest.raises(ValueError, match="cannot be read"):
        train_adapter(model, 0, letter_items(model), lm_loss_fn(model, 0, 26), config, checkpoint=checkpoint)


class SavingLetterTokenizer(LetterTokenizer):
    def __init__(self) -> None:
        super().__init__(26, eos_token_id=25)

    def save_pretrained(self, directory: str) -> None:
        pass


def test_train_heads_exits_2_on_a_corrupt_checkpoint(tmp_path, monkeypatch, capsys):
    model = tiny_hydra(vocab=26, n_heads=2, heads_depth=1)
    monkeypatch.setattr(olmo_tap.cli, "load_model_and_tokenizer", lambda args: (model, SavingLetterTokenizer()))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": "ab"}) + "\n" for p in ("abc", "bcd", "cde", "def")))
    out = tmp_path / "jury"
    checkpoint = out / ".training" / "head0.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"garbage")
    argv = ["train", "heads", "--data", str(data), "--out", str(out), "--no-progress", "--rank", "2", "--epochs", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {checkpoint} cannot be read" in err and "delete it" in err and "Traceback" not in err


# ----- 3. save_ensemble deletes nothing that is not an ensemble, and replaces atomically -------------------------


def test_save_ensemble_refuses_a_directory_that_is_not_an_ensemble(tmp_path):
    model = tiny_hydra(vocab=6, n_heads=2)
    target = tmp_path / "thesis"
    target.mkdir()
    (target / "chapter1.tex").write_text("years of work")
    with pytest.raises(WeightsError, match=rf"refusing to replace {target}: it is not an olmo-tap ensemble"):
        save_ensemble(model, target)
    assert (target / "chapter1.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]  # no temporary sibling left behind
    (target / "hydra_config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(WeightsError, match="refusing to replace"):
        save_ensemble(model, target)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(WeightsError, match="exists and is not a directory"):
        save_ensemble(model, a_file)
    assert a_file.read_text() == "mine"
    # a training run's scratch directory is replaceable only by the trainer that names it
    run = tmp_path / "run"
    (run / ".training").mkdir(parents=True)
    with pytest.raises(WeightsError, match="refusing to replace"):
        save_ensemble(model, run)
    save_ensemble(model, run, work_dir=".training")
    assert not (run / ".training").exists() and (run / "hydra_config.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert save_ensemble(model, empty) == empty


@pytest.mark.parametrize("where", ["writing the weights", "saving the tokenizer", "renaming into place"])
def test_an_interrupted_save_leaves_the_old_ensemble_loadable(tmp_path, monkeypatch, where):
    old_model, new_model = tiny_hydra(vocab=6, n_heads=2, seed=0), tiny_hydra(vocab=6, n_heads=2, seed=1)
    target = save_ensemble(old_model, tmp_path / "ens", metadata={"which": "old"})

    class Crash(Exception):
        pass

    tokenizer = None
    if where == "writing the weights":
        real_save_file = ensemble_module.save_file

        def torn_save_file(state, path, metadata=None):
            real_save_file(state, path, metadata=metadata)
            with open(path, "r+b") as f:
                f.truncate(100)  # half a file on disk, then the crash
            raise Crash

        monkeypatch.setattr(ensemble_module, "save_file", torn_save_file)
    elif where == "saving the tokenizer":

        class CrashingTokenizer:
            def save_pretrained(self, directory: str) -> None:
                raise Crash

        tokenizer = CrashingTokenizer()
    else:
        real_rename = Path.rename

        def failing_rename(self, destination):
            if Path(destination) == target and self.name.startswith(".ens.") and not self.name.endswith(".old"):
                raise OSError(5, "Input/output error")
            return real_rename(self, destination)

        monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises((Crash, OSError)):
        save_ensemble(new_model, target, tokenizer, metadata={"which": "new"})
    monkeypatch.undo()
    again = HydraTransformer.from_pretrained(target, progress=False)
    for (name, a), (_, b) in zip(old_model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert json.loads((target / "hydra_config.json").read_text())["metadata"] == {"which": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens"]  # nothing half-written left beside it
    save_ensemble(new_model, target)  # and a later save replaces it, leaving nothing beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens"]
    again = HydraTransformer.from_pretrained(target, progress=False)
    assert torch.equal(again.lm_head, new_model.lm_head)


# ----- 4. exit codes ----------------------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the checks under test must come before it."""

    def refuse(args):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(olmo_tap.cli, "load_model_and_tokenizer", refuse)
    monkeypatch.setattr("olmo_tap.verify.outputs.verify_outputs", refuse, raising=False)


@pytest.mark.parametrize("seed", [2**64, 2**70, -1])
def test_a_record_seed_outside_the_generator_range_is_bad_input(tmp_path, capsys, no_model, seed):
    records = tmp_path / "outputs.jsonl"
    records.write_text(
        json.dumps({"prompt_token_ids": [1, 2], "output_token_ids": [3]})
        + "\n"
        + json.dumps({"prompt_token_ids": [1, 2], "output_token_ids": [3], "seed": seed})
        + "\n"
    )
    code, err = run_cli(["verify", str(records), "--temperature", "0.7", "--model", "x"], capsys)
    assert code == 2
    assert f"{records}:2: field 'seed' must be between 0 and 2**64 - 1" in err and "Traceback" not in err
    assert TokenSequence.from_dict({"prompt_token_ids": [1], "output_token_ids": [], "seed": 2**64 - 1}).seed
    code, err = run_cli(["verify", str(records), "--model", "x", "--temperature", "0", "--seed", str(2**64)], capsys)
    assert code == 2 and "--seed must be between 0 and 2**64 - 1" in err


def test_generate_refuses_a_seed_outside_the_generator_range(capsys, no_model):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "hi", "--seed", str(2**64)])
    assert exit_info.value.code == 2 and "--seed must be between 0 and 2**64 - 1" in capsys.readouterr().err


def unwritable_paths(tmp_path: Path) -> dict[str, Path]:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    return {
        "under a file": a_file / "out.json",
        "missing directory": tmp_path / "missing" / "out.json",
        "a directory": a_dir,
    }


@pytest.mark.parametrize("option", ["--save", "--save-tokens"])
def test_generate_checks_its_output_paths_before_the_work(tmp_path, capsys, no_model, option):
    for case, path in unwritable_paths(tmp_path).items():
        code, err = run_cli(["generate", "hi", option, str(path)], capsys)
        assert code == 2, case
        assert f"{option} {path}" in err and "Traceback" not in err, case


def test_verify_checks_metrics_out_before_the_work(tmp_path, capsys, no_model):
    records = tmp_path / "outputs.jsonl"
    records.write_text(json.dumps({"prompt_token_ids": [1, 2], "output_token_ids": [3]}) + "\n")
    paths = unwritable_paths(tmp_path)
    for case in ("under a file", "a directory"):
        path = paths[case]
        argv = ["verify", str(records), "--model", "x", "--temperature", "0", "--metrics-out", str(path)]
        code, err = run_cli(argv, capsys)
        assert code == 2, case
        assert f"--metrics-out {path}" in err, case
    # a missing directory is fine for --metrics-out (its writer creates it): the check lets it through
    olmo_tap.cli.check_writable(str(tmp_path / "new" / "m.jsonl"), "--metrics-out", creates_parents=True)
    assert not (tmp_path / "new").exists()  # the probe leaves nothing behind


def test_generate_exit_0_with_its_outputs_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        olmo_tap.cli, "load_model_and_tokenizer", lambda args: (tiny_hydra(vocab=6), LetterTokenizer(6))
    )
    tokens = tmp_path / "tokens.jsonl"
    argv = ["generate", "abc", "--max-new-tokens", "3", "--seed", str(2**64 - 1), "--save-tokens", str(tokens)]
    argv += ["--save", str(tmp_path / "t.json"), "--temperature", "0.9", "--no-color"]
    code, _ = run_cli(argv, capsys)
    assert code == 0
    assert read_token_sequences(tokens)[0].seed == 2**64 - 1
    assert (tmp_path / "t.json").is_file()


def test_device_cuda_without_cuda_is_bad_input(tiny_checkpoint, capsys, monkeypatch):
    _, directory, _ = tiny_checkpoint
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = run_cli(["info", "--model", str(directory), "--device", "cuda"], capsys)
    assert code == 2 and "device 'cuda' asked for" in err and "--device cpu" in err and "Traceback" not in err
    code, err = run_cli(["info", "--model", str(directory), "--device", "toaster"], capsys)
    assert code == 2 and "unknown device 'toaster'" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2, 3]", "expected a JSON object, found list"),
        ('"olmo-tap-ensemble"', "expected a JSON object, found str"),
        (None, "unknown dtype 'nn'"),
        ("{", "is not valid JSON"),
        (DEEP_JSON, "too deeply nested"),
    ],
)
def test_a_bad_hydra_config_is_bad_input_naming_the_file(tmp_path, capsys, content, message):
    directory = save_ensemble(tiny_hydra(vocab=6, n_heads=2), tmp_path / "ens")
    config_file = directory / "hydra_config.json"
    if content is None:  # a real ensemble whose dtype names something torch has that is not a dtype
        info = json.loads(config_file.read_text())
        info["dtype"] = "nn"
        content = json.dumps(info)
    config_file.write_text(content)
    code, err = run_cli(["info", "--model", str(directory)], capsys)
    assert code == 2, err
    assert str(config_file) in err and message in err and "Traceback" not in err


def test_a_hydra_config_with_a_bad_uncertainty_head_is_bad_input(tmp_path):
    directory = save_ensemble(tiny_hydra(vocab=6, n_heads=2), tmp_path / "ens")
    info = json.loads((directory / "hydra_config.json").read_text())
    info["uncertainty_head"] = 7
    (directory / "hydra_config.json").write_text(json.dumps(info))
    with pytest.raises(WeightsError, match="uncertainty_head 7 is not one of the heads"):
        HydraTransformer.from_pretrained(directory, progress=False)


def test_deeply_nested_json_is_bad_input(tmp_path, capsys, no_model):
    records = tmp_path / "outputs.jsonl"
    records.write_text(json.dumps({"prompt_token_ids": [1], "output_token_ids": []}) + "\n" + DEEP_JSON + "\n")
    code, err = run_cli(["verify", str(records), "--model", "x", "--temperature", "0"], capsys)
    assert code == 2 and str(records) in err and "too deeply nested" in err
    transcript = tmp_path / "transcript.json"  # read by a reader that does not catch it: main does
    transcript.write_text(DEEP_JSON)
    code, err = run_cli(["audit", str(transcript), "--model", str(tmp_path / "no-model-here")], capsys)
    assert code == 2 and "too deeply nested" in err and "Traceback" not in err


def test_an_unexpected_error_exits_3_without_a_traceback(capsys, monkeypatch):
    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(olmo_tap.cli, "load_model_and_tokenizer", broken)
    monkeypatch.delenv("OLMO_TAP_DEBUG", raising=False)
    code, err = run_cli(["info"], capsys)
    assert code == 3
    assert "olmo-tap: internal error: ZeroDivisionError: a bug" in err and "OLMO_TAP_DEBUG=1" in err
    assert "report it" in err and "Traceback" not in err
    monkeypatch.setenv("OLMO_TAP_DEBUG", "1")
    code, err = run_cli(["info"], capsys)
    assert code == 3 and "Traceback" in err and "internal error: ZeroDivisionError" in err


def test_the_installed_command_exits_3_on_an_unexpected_error(tmp_path):
    # The real entry point in a fresh process; sitecustomize plants the bug before it runs.
    (tmp_path / "sitecustomize.py").write_text(
        "import olmo_tap.cli\n"
        "def broken(args):\n"
        "    raise KeyError('planted bug')\n"
        "olmo_tap.cli.load_model_and_tokenizer = broken\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OLMO_TAP_DEBUG"}
    env["PYTHONPATH"] = str(tmp_path)
    command = Path(sys.executable).parent / "olmo-tap"
    done = subprocess.run([str(command), "info"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "olmo-tap: internal error: KeyError" in done.stderr and "planted bug" in done.stderr
    assert "Traceback" not in done.stderr and "OLMO_TAP_DEBUG=1" in done.stderr


# ----- 5. train instructions resumes past a torn last line ---------------------------------------------------------


def test_instructions_resume_past_a_torn_last_line(tmp_path, capsys):
    model, tokenizer = tiny_hydra(vocab=6, n_heads=2), LetterTokenizer(6)
    prompts = ["abc", "bcd", "cde"]
    settings = {"max_new_tokens": 3, "head": 0}
    partial = tmp_path / "instructions.jsonl.partial"
    done = {"prompt": "abc", "response": "cached answer", "finish_reason": "eos", "settings": settings}
    partial.write_text(json.dumps(done) + "\n" + '{"prompt": "bcd", "response": "half an ans')  # killed mid-write
    examples, summary = generate_instructions(
        model, tokenizer, prompts, max_new_tokens=3, progress=False, cache=partial
    )
    assert "dropped the unfinished last line 2" in capsys.readouterr().err
    assert examples == [{"prompt": "abc", "response": "cached answer"}]  # reused; the others ran to the length limit
    assert summary == {"prompts": 3, "kept": 1, "dropped_unfinished": 2}
    lines = partial.read_text().splitlines()
    assert [json.loads(line)["prompt"] for line in lines] == ["abc", "bcd", "cde"]  # every line whole again
    # a damaged line that is not the last is no torn write: an error naming the file and line
    partial.write_text("{oops\n" + json.dumps(done) + "\n")
    with pytest.raises(ValueError, match=rf"{partial}:1: not valid JSON.*delete"):
        generate_instructions(model, tokenizer, prompts, max_new_tokens=3, progress=False, cache=partial)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["experiment", "signals", "--out", "{file}"], "--out {file}: is a file, not a directory"),
        (["experiment", "signals", "--out", "{file}/sub"], "--out {file}/sub: cannot be made, {file} is a file"),
        (["experiment", "poisoning", "--results", "{file}/r"], "--results {file}/r: cannot be made"),
        (["train", "heads", "--data", "x.jsonl", "--out", "{file}"], "--out {file}: is a file"),
        (["train", "attacks", "--out", "{file}/bank.json"], "--out {file}/bank.json: cannot be written"),
        (["bench", "--results-dir", "{file}"], "--results-dir {file}: is a file"),
    ],
)
def test_an_output_place_that_cannot_be_written_fails_before_the_work(tmp_path, monkeypatch, capsys, argv, message):
    """A long command (an experiment, training, a benchmark) checks where it will write before it starts, not
    after minutes of work: every command's work is replaced by a failure here, so reaching it fails the test."""
    import olmo_tap.benchmarks.cli
    import olmo_tap.train.cli

    def started(*args, **kwargs):
        raise AssertionError("the command's work started")

    for module in (olmo_tap.train.cli, olmo_tap.benchmarks.cli):
        for name in dir(module):
            if name.startswith("cmd_") or name == "run_bench":
                monkeypatch.setattr(module, name, started)
    monkeypatch.setattr(olmo_tap.cli, "load_model_and_tokenizer", started, raising=False)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    argv = [part.format(file=a_file) for part in argv]
    assert olmo_tap.cli.main(argv) == olmo_tap.cli.EXIT_USAGE
    assert message.format(file=a_file) in capsys.readouterr().err


def test_output_places_that_can_be_made_pass_the_check(tmp_path):
    import argparse

    olmo_tap.cli.check_outputs(argparse.Namespace(out=str(tmp_path / "new" / "deeper"), results=None))
    olmo_tap.cli.check_outputs(argparse.Namespace(out=str(tmp_path / "n" / "bank.json"), out_is_file=True))
    olmo_tap.cli.check_outputs(argparse.Namespace(out=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # probed, nothing left behind, nothing made


def test_a_prompt_that_is_not_utf8_fails_before_the_model_loads(monkeypatch, capsys):
    monkeypatch.setattr(olmo_tap.cli, "cmd_generate", lambda args: pytest.fail("the model was loaded"), raising=False)
    with pytest.raises(SystemExit) as exited:
        olmo_tap.cli.main(["generate", b"caf\xe9".decode("utf-8", "surrogateescape")])
    assert exited.value.code == 2
    assert "the prompt cannot be tokenized: byte 0xE9 at character 3 is not UTF-8" in capsys.readouterr().err


def test_a_chat_line_that_is_not_utf8_is_asked_again_not_the_end(monkeypatch, capsys):
    """One line in another encoding is the user's to retype: the chat says so and reads the next line."""
    lines = iter([b"caf\xe9".decode("utf-8", "surrogateescape"), ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert olmo_tap.cli.chat_loop(None, 0.0, None, None, None) == 0  # the decoder is never reached
    told = "that line cannot be tokenized (byte 0xE9 at character 3 is not UTF-8); type it again"
    assert told in capsys.readouterr().err
    assert next(lines, "done") == "done"


def test_a_jsonl_line_that_is_not_utf8_is_named_not_replaced(tmp_path):
    """A Latin-1 line used to be read with U+FFFD in place of its bytes (a batch answered 'caf\ufffd') or to fail
    with the codec's words and no file; now it is named by file, line and byte, and a batch skips only it."""
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"prompt": "hi", "response": "yo"}\n{"prompt": "caf\xe9", "response": "x"}\n{"prompt": "ok"}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:2: not UTF-8 \(byte 0xE9 is byte 16 of the line\)"):
        list(iter_jsonl(data))
    records = list(read_records(data))
    assert [r.index for r in records] == [0, 1, 2]
    assert records[0].value == {"prompt": "hi", "response": "yo"} and records[0].error is None
    assert records[1].value is None and "not UTF-8 (byte 0xE9" in records[1].error
    assert records[2].value == {"prompt": "ok"} and records[2].error is None


def test_a_jsonl_file_with_a_byte_order_mark_or_a_directory(tmp_path):
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b'\xef\xbb\xbf{"prompt": "hi"}\n{"prompt": "\xef\xbb\xbfkept"}\n')
    assert [record for _, record in iter_jsonl(data)] == [{"prompt": "hi"}, {"prompt": "\ufeffkept"}]
    assert [r.value for r in read_records(data)] == [{"prompt": "hi"}, {"prompt": "\ufeffkept"}]
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"folder\.jsonl is a directory, not a JSONL file"):
        list(iter_jsonl(folder))
    with pytest.raises(ValueError, match=r"folder\.jsonl is a directory, not a file"):
        list(read_records(folder))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'{"a": "caf\xe9"}', r"is not UTF-8 \(byte 0xE9 on line 1\)"),
        (b'{\n"a": 1,\n}', r"is not valid JSON \(line 3 column 1: "),
        (DEEP_JSON.encode(), "is too deeply nested to read"),
        (None, "is a directory, not a file"),
    ],
)
def test_every_json_file_a_user_names_fails_the_same_clear_way(tmp_path, capsys, content, problem):
    """A transcript to audit, a benchmark config, a Hydra config and an attack bank: one reader, one kind of
    message naming what the file is for, the file and its problem (no codec or errno text, no traceback)."""
    from olmo_tap.benchmarks.config import load_config
    from olmo_tap.inference.transcript import read_transcript
    from olmo_tap.robustness.bank import BankError, load_bank
    from olmo_tap.weights.ensemble import read_ensemble_info

    def place(name: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        return path

    cases = [
        (read_transcript, place("t.json"), "transcript file", ValueError),
        (load_config, place("bench.json"), "benchmark config", ValueError),
        (lambda p: read_ensemble_info(p.parent), place("ens/hydra_config.json"), "Hydra config", WeightsError),
        (load_bank, place("bank.json"), "attack bank", BankError),
    ]
    for read, path, what, error in cases:
        with pytest.raises(error, match=f"{what} {re.escape(str(path))} {problem}"):
            read(path)
    code, err = run_cli(["audit", str(tmp_path / "t.json")], capsys)
    assert code == 2 and "transcript file" in err and "Traceback" not in err


def test_a_json_file_may_start_with_a_byte_order_mark(tmp_path):
    from olmo_tap.jsonl import read_json

    path = tmp_path / "bom.json"
    path.write_bytes(b'\xef\xbb\xbf{"gamma": 4}')
    assert read_json(path) == {"gamma": 4}


def test_a_record_naming_a_key_twice_is_refused_in_files_too(tmp_path):
    """Batch audit reads transcripts from JSONL, ``olmo-tap audit`` from a JSON file: a key given twice is
    ambiguous (parsers differ on which value counts) in both, named, and a batch skips only that record."""
    data = tmp_path / "records.jsonl"
    data.write_text('{"id": 1, "token_ids": [5], "token_ids": [6]}\n{"id": 2}\n')
    first, second = read_records(data)
    assert first.value is None and first.error == "ambiguous JSON: the key 'token_ids' appears twice in one object"
    assert second.value == {"id": 2} and second.error is None
    with pytest.raises(ValueError, match=r"records\.jsonl:1: ambiguous JSON: the key 'token_ids' appears twice"):
        list(iter_jsonl(data))
    from olmo_tap.jsonl import read_json

    (tmp_path / "one.json").write_text('{"a": {"b": 1, "b": 1}}')
    with pytest.raises(ValueError, match=r"one\.json is ambiguous: the key 'b' appears twice in one object"):
        read_json(tmp_path / "one.json", "transcript file")
