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
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from olmo_tap.hydra import HydraTransformer
from olmo_tap.jsonl import iter_jsonl

PROMPT_SET = "prompts.txt"


def load_prompt_set() -> list[str]:
    """The shipped prompts, in file order (comments and blank lines skipped)."""
    text = resources.files("olmo_tap.train").joinpath(PROMPT_SET).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


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
    done: dict[str, dict[str, Any]] = {}
    cache_path = Path(cache) if cache is not None else None
    if cache_path is not None and cache_path.is_file():
        for _, record in iter_jsonl(cache_path):
            if isinstance(record, dict) and record.get("settings") == settings and "prompt" in record:
                done[record["prompt"]] = record
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
