"""The outside reference: transformers' own model and ``generate()`` on the same base checkpoint.

For the embedded GGUF default that checkpoint is the HF-style directory the weights layer converted it into
(``olmo_tap.weights.presets.convert_gguf``), so both sides read the very same fp32 tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from olmo_tap.benchmarks.harness import Stopwatch
from olmo_tap.weights.sources import resolve


def load_reference_model(source: str, dtype: torch.dtype, device: torch.device) -> Any:
    """transformers' model of ``source`` (a base checkpoint, not a saved ensemble) in ``dtype`` on ``device``."""
    directory = resolve(source).materialize(progress=False)
    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype).to(device).eval()


def reference_weight_bytes_per_token(model: Any) -> int:
    """Bytes of weights one decode step reads: every parameter but the input embedding (of which one row is
    read), the embedding counted once when it is tied to the lm_head."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # shared parameters are listed once
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    return total if tied else total - embedding.numel() * embedding.element_size()


class _ArrivalStreamer(BaseStreamer):
    """Marks a timestamp for every generated token (generate() first hands over the prompt: skipped)."""

    def __init__(self, watch: Stopwatch) -> None:
        self.watch = watch
        self.prompt_seen = False
        self.token_ids: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.watch.mark()
        self.token_ids.extend(int(t) for t in value.reshape(-1))

    def end(self) -> None:
        pass


def generate_timed(model: Any, prompt_ids: list[int], new_tokens: int, watch: Stopwatch) -> list[int]:
    """Greedy ``generate()`` of exactly ``new_tokens`` tokens (end-of-text suppressed until then), with a
    ``watch`` mark at each token's arrival; returns the new token ids."""
    eos = model.config.eos_token_id
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos if isinstance(eos, int) else (eos[0] if eos else 0),
    )
    input_ids = torch.tensor([prompt_ids], device=model.device)
    streamer = _ArrivalStreamer(watch)
    with torch.no_grad():
        model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config, streamer=streamer
        )
    return streamer.token_ids
