"""Instruction data without a download: the base model's own answers to a prompt set shipped with the package.

``prompts.txt`` (next to this module) holds short everyday prompts. A head answers each one with
greedy single-head decoding; answers that end with the end-of-text token become
``{"prompt", "response"}`` examples. Answers cut off by ``max_new_tokens`` are dropped (training on
them would teach the heads to stop mid-sentence) and counted in the summary. Answers can be cached
in a JSONL file as they are decoded, so an interrupted run picks up where it stopped. Training heads on the
model's own answers keeps their behaviour close to the base model's, which is what a clean shard
should do; the poisoning experiment adds its triggered examples on top.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from olmo_tap.hydra import HydraTransformer

PROMPT_SET = "prompts.txt"


def load_prompt_set() -> list[str]:
    """The shipped prompts, in file order (comments and blank lines skipped)."""
    text = resources.files("olmo_tap.train").joinpath(PROMPT_SET).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def read_answer_cache(path: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Answers cached in ``path`` for ``settings``, by prompt.

    A run killed mid-write leaves half a last line: it is dropped (cut from the file, so the next append starts
    on a line of its own) with a note, and that prompt is answered again. A damaged line before the last is
    not a torn write: it is an error naming the file and line.
    """
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    offset = 0
    for number, raw in enumerate(lines, start=1):
        last = number == len(lines)
        try:
            record = json.loads(raw) if raw.strip() else None
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if last:
                with path.open("r+b") as f:
                    f.truncate(offset)
                note = f"note: dropped the unfinished last line {number} of {path} (an interrupted write); "
                print(note + "its prompt is answered again", file=sys.stderr)
                break
            raise ValueError(
                f"{path}:{number}: not valid JSON ({e}); delete {path} to answer every prompt afresh"
            ) from None
        if last and not raw.endswith(b"\n"):
            with path.open("ab") as f:  # a complete record whose newline was lost: the next append needs it
                f.write(b"\n")
        offset += len(raw)
        if (
            isinstance(record, dict)
            and record.get("settings") == settings
            and isinstance(record.get("prompt"), str)
            and isinstance(record.get("response"), str)
            and "finish_reason" in record
        ):
            done[record["prompt"]] = record
    return done


def generate_instructions(
    model: HydraTransformer,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    head: int = 0,
    progress: bool = True,
    cache: str | Path | None = None,
) -> tuple[list[dict[str, str]], dict[str, int]]:
    """(examples, summary): the model's greedy answers (head ``head`` alone) to ``prompts``.

    With ``cache`` (a JSONL file), every answer is appended as soon as it is decoded and answers
    already there for the same prompt and settings are reused, so an interrupted run resumes.
    """
    from olmo_tap.inference.poe import PoE

    if not prompts:
        raise ValueError("no prompts to answer")
    settings = {"max_new_tokens": max_new_tokens, "head": head}
    cache_path = Path(cache) if cache is not None else None
    done = read_answer_cache(cache_path, settings) if cache_path is not None else {}
    decoder = PoE(model, tokenizer, max_new_tokens=max_new_tokens, mode="single", head=head, seed=0)
    answers = []
    for prompt in tqdm(prompts, desc="answering prompts", disable=not progress, unit="prompt"):
        if prompt not in done:
            output = decoder.generate_with_cache(prompt, temperature=0)
            done[prompt] = {
                "prompt": prompt,
                "response": output.text.strip(),
                "finish_reason": output.finish_reason,
                "settings": settings,
            }
            if cache_path is not None:
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                with cache_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(done[prompt], ensure_ascii=False) + "\n")
        answers.append(done[prompt])
    # Answers cut off by max_new_tokens are dropped: training on them would teach the heads to stop mid-sentence.
    examples = [
        {"prompt": a["prompt"], "response": a["response"]}
        for a in answers
        if a["finish_reason"] == "eos" and a["response"]
    ]
    return examples, {
        "prompts": len(prompts),
        "kept": len(examples),
        "dropped_unfinished": len(prompts) - len(examples),
    }
