"""The tokenizer (with its chat template) of any model source: preset, HF directory, saved ensemble, GGUF, hub id."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from olmo_tap.weights.errors import WeightsError
from olmo_tap.weights.presets import SOURCE_MARKER
from olmo_tap.weights.sources import TOKENIZER_FILES, ResolvedSource, find_tokenizer_dir, resolve

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def load_tokenizer(source: str | Path | ResolvedSource, progress: bool = True) -> PreTrainedTokenizerBase:
    """Load the tokenizer of ``source``.

    GGUF sources (including the default preset) use the tokenizer saved by their cached conversion, which avoids
    transformers' slow GGUF tokenizer conversion on every start. An ensemble directory holds its tokenizer itself
    (or in a ``tokenizer/`` subdirectory).
    """
    resolved = resolve(source)
    directory = resolved.materialize(progress=progress)
    tokenizer_dir = find_tokenizer_dir(directory)
    if tokenizer_dir is None:
        raise WeightsError(
            f"no tokenizer at {resolved.name!r}: {directory} has none of {', '.join(TOKENIZER_FILES)} "
            "(nor a tokenizer/ subdirectory with them)"
        )
    try:
        tokenizer = _from_directory(tokenizer_dir)
    except Exception as e:  # transformers raises many kinds of errors for broken tokenizer files
        raise WeightsError(f"cannot load the tokenizer in {tokenizer_dir}: {type(e).__name__}: {e}") from e
    if not getattr(tokenizer, "chat_template", None):
        # Base (non-instruct) models have none; chatting needs one, plain completion does not.
        logger.warning("the tokenizer in %s has no chat template", tokenizer_dir)
    return tokenizer


def _from_directory(directory: Path) -> PreTrainedTokenizerBase:
    """AutoTokenizer's tokenizer for ``directory``; for olmo-tap's own conversion of a GGUF file, whose tokenizer
    files it saved itself as transformers' generic backend, that class directly. AutoTokenizer would first build the
    model's config class to second-guess the declared class, and that import alone (transformers' model machinery,
    torch.distributed.tensor, sympy) keeps ~50 MB resident for the life of the process; importing AutoTokenizer at
    all scans transformers' model packages (0.5-1.3 s), so it is imported only where it is used."""
    from transformers import TokenizersBackend

    own = all((directory / name).is_file() for name in (SOURCE_MARKER, "tokenizer.json", "tokenizer_config.json"))
    if own:
        declared = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
        if declared == TokenizersBackend.__name__:
            return TokenizersBackend.from_pretrained(str(directory))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def vocab_limit(tokenizer: Any, vocab_size: int) -> int:
    """Token ids a model may emit: its embedding rows are often padded past the tokenizer's vocabulary
    (ids past ``len(tokenizer)`` decode to nothing), so decoding, training and verification cut there."""
    return min(len(tokenizer), vocab_size)
