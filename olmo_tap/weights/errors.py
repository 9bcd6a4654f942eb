"""The error every checkpoint-loading failure raises.

Loaders catch the exceptions of the libraries they use (safetensors, json, gguf, huggingface_hub, torch) and
re-raise them as ``WeightsError(...) from e`` so that a user sees which file or source failed and why, not a
library traceback. Architecture problems (an unsupported model type, an impossible shape) raise
``olmo_tap.model.config.ConfigError`` instead.
"""


class WeightsError(ValueError):
    """A checkpoint or weight source that cannot be loaded; the message names the source and the problem."""
