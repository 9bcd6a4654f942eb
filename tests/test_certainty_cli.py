"""``olmo-tap generate --certainty`` on the embedded default: free text gets KLE (saved in the transcript and audited),
multiple choice the uncertainty head, and contradictory options are refused before any work."""

from __future__ import annotations

import json

import pytest

from olmo_tap.certainty.sampled import sample_seeds
from olmo_tap.cli import main

pytestmark = pytest.mark.slow


def test_free_text_gets_kle_saved_and_audited(smollm, tmp_path, capsys):
    path = tmp_path / "answer.json"
    args = ["generate", "What is the capital of Peru?", "--max-new-tokens", "12", "--seed", "4", "--json"]
    assert main([*args, "--save", str(path)]) == 0
    out, err = capsys.readouterr()
    certainty = json.loads(out)["certainty"]
    assert certainty["method"] == "kle" and certainty["requested"] == "auto" and 0 <= certainty["value"] <= 1
    assert [s["seed"] for s in certainty["samples"]] == sample_seeds(4)
    assert "certainty: " in err and "Kernel Language Entropy over 5 sampled answers" in err
    saved = json.loads(path.read_text())
    assert saved["certainty"]["value"] == certainty["value"]
    assert main(["audit", str(path)]) == 0
    assert "certainty (KLE): ok" in capsys.readouterr().out


def test_multiple_choice_gets_the_uncertainty_head(smollm, capsys):
    question = "Which planet is the largest?\nA) Mars\nB) Jupiter\nC) Venus\nD) Mercury"
    assert main(["generate", question, "--max-new-tokens", "4", "--json"]) == 0
    certainty = json.loads(capsys.readouterr().out)["certainty"]
    assert certainty["detected_mcq"] and certainty["method"] == "uncertainty_head" and 0 < certainty["value"] < 1


def test_certainty_off_and_contradictions(smollm, capsys):
    assert main(["generate", "Hi", "--max-new-tokens", "2", "--certainty", "off"]) == 0
    assert "certainty: n/a (certainty was turned off" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "Hi", "--mcq", "--certainty", "kle"])
    assert exit_.value.code == 2 and "--mcq" in capsys.readouterr().err
    assert main(["generate", "Hi", "--nli-model", "/nonexistent/nli-checkpoint", "--max-new-tokens", "2"]) == 2
    assert "cannot load the NLI model" in capsys.readouterr().err


def test_the_certainty_experiment_runs_small(smollm, tmp_path, capsys):
    out = tmp_path / "certainty"
    args = ["experiment", "certainty", "--questions", "3", "--similarities", "token-overlap", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    results = json.loads((out / "kle.json").read_text())
    assert results["questions"] == 3 and set(results["similarities"]) == {"token-overlap"}
    assert len(json.loads((out / "samples.json").read_text())["samples"]) == 3
    assert "| token-overlap |" in (out / "kle.md").read_text()
    assert main(["experiment", "certainty", "--similarities", "cosine", "--out", str(out)]) == 2
    assert "unknown cosine" in capsys.readouterr().err
