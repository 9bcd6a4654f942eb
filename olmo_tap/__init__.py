"""olmo-tap: trustworthy inference with open language models.

A Hydra splits a model into a shared trunk and N heads that decode as a jury.
"""

from typing import Any

from olmo_tap.hydra import HydraTransformer, HydraTransformerConfig
from olmo_tap.model.config import ConfigError, TransformerConfig
from olmo_tap.weights.ensemble import load_ensemble, load_original_ensemble, save_ensemble
from olmo_tap.weights.errors import WeightsError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "HydraTransformer",
    "HydraTransformerConfig",
    "TransformerConfig",
    "WeightsError",
    "load_ensemble",
    "load_original_ensemble",
    "load_tokenizer",
    "save_ensemble",
]


def load_tokenizer(source: str = "smollm2-135m-instruct") -> Any:
    """The tokenizer (a transformers tokenizer with its chat template) matching a model source.

    Imported lazily so that ``import olmo_tap`` stays light; see ``olmo_tap.weights.tokenizer``."""
    from olmo_tap.weights.tokenizer import load_tokenizer as _load

    return _load(source)
