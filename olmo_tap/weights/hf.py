"""Hugging Face checkpoints: ``config.json`` <-> ``TransformerConfig``, safetensors directories, hub downloads.

Every checkpoint format is read into HF tensor names (``model.layers.{i}.self_attn.q_proj.weight`` ...), so this
module also owns the list of tensors (and their shapes) that a config implies: ``expected_hf_shapes``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from olmo_tap.jsonl import read_json
from olmo_tap.model.config import ConfigError, TransformerConfig
from olmo_tap.weights.errors import WeightsError

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# HF model_type -> our family; nothing else is mapped, so anything else is rejected.
_FAMILY_OF_MODEL_TYPE = {"olmo2": "olmo2", "llama": "llama"}
_ARCHITECTURE_OF_FAMILY = {"olmo2": "Olmo2ForCausalLM", "llama": "LlamaForCausalLM"}
# transformers' own class defaults, used when a (hand-written or older) config.json omits a key, so that we read
# such a file exactly as transformers would.
_DEFAULT_EPS = {"olmo2": 1e-5, "llama": 1e-6}
_DEFAULT_MAX_POSITIONS = 2048
_DEFAULT_ROPE_THETA = 10000.0

# What a hub download fetches: config, weights (safetensors only) and every tokenizer file format.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"]

# Buffers some checkpoints carry that are recomputed, not loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_SHOW = 5  # how many offending names an error message lists


# ----- config.json ----------------------------------------------------------------------------------------------------


def _first_id(value: Any) -> Any:
    """Token ids may be a list (several EOS tokens); the model config keeps the first one."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _rope_theta(cfg: dict[str, Any]) -> float:
    """Read rope theta from wherever this transformers version put it, rejecting any RoPE scaling.

    transformers <= 4 writes ``rope_theta`` at the top level and ``rope_scaling`` (null or a dict); transformers 5
    writes ``rope_parameters: {rope_type, rope_theta}``. Scaled RoPE (linear, yarn, llama3 ...) would silently
    change the positions the model sees, so only the unscaled ``default`` type is accepted. (``config_from_hf``
    names the file in the errors; the value's range is ``TransformerConfig``'s to check.)
    """
    found: dict[str, float] = {}
    if cfg.get("rope_theta") is not None:
        found["rope_theta"] = cfg["rope_theta"]
    for key in ("rope_parameters", "rope_scaling"):
        params = cfg.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ConfigError(f"{key} must be an object or null, got {params!r}")
        rope_type = params.get("rope_type", params.get("type"))
        if rope_type not in (None, "default"):
            raise ConfigError(f"unsupported rope scaling type {rope_type!r} in {key}; only unscaled RoPE ('default')")
        if params.get("rope_theta") is not None:
            found[f"{key}.rope_theta"] = params["rope_theta"]
    values = set(found.values())
    if len(values) > 1:
        raise ConfigError(f"conflicting rope theta values {found}")
    theta = values.pop() if values else _DEFAULT_ROPE_THETA
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ConfigError(f"rope theta must be a number, got {theta!r}")
    return float(theta)


def config_from_hf(cfg: dict[str, Any], source: str = CONFIG_NAME) -> TransformerConfig:
    """Map a Hugging Face ``config.json`` dict (OLMo-2 or Llama) onto a ``TransformerConfig``.

    ``source`` only names the file in error messages. Raises ``ConfigError`` for anything we cannot run.
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    family = _FAMILY_OF_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise ConfigError(f"{source}: unsupported architecture {model_type!r}; supported: olmo2, llama")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ConfigError(f"{source}: {key}=true is unsupported (olmo-tap's layers have no biases)")
    activation = cfg.get("hidden_act", "silu")
    if activation not in ("silu", "swish"):
        raise ConfigError(f"{source}: unsupported hidden_act {activation!r}; only silu (SwiGLU) is supported")

    def required(key: str) -> Any:
        if cfg.get(key) is None:
            raise ConfigError(f"{source}: missing required key {key!r}")
        return cfg[key]

    d_model = required("hidden_size")
    n_heads = required("num_attention_heads")
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        # transformers' default; only meaningful when the division is exact.
        if not (isinstance(d_model, int) and isinstance(n_heads, int) and n_heads > 0 and d_model % n_heads == 0):
            raise ConfigError(f"{source}: no head_dim, and hidden_size {d_model!r} is not a multiple of heads")
        head_dim = d_model // n_heads
    eps = cfg.get("rms_norm_eps")
    try:
        return TransformerConfig(
            family=family,  # type: ignore[arg-type]
            vocab_size=required("vocab_size"),
            d_model=d_model,
            n_layers=required("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            ffn_hidden=required("intermediate_size"),
            rope_theta=_rope_theta(cfg),
            norm_eps=float(_DEFAULT_EPS[family] if eps is None else eps),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_seq_len=cfg.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS,
            bos_token_id=_first_id(cfg.get("bos_token_id")),
            eos_token_id=_first_id(cfg.get("eos_token_id")),
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e
    except (TypeError, ValueError) as e:  # e.g. a string where a number belongs
        raise ConfigError(f"{source}: invalid value: {e}") from e


def config_to_hf(cfg: TransformerConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The HF ``config.json`` dict for ``cfg``; ``config_from_hf`` reads it back to ``cfg`` and transformers loads it.

    RoPE theta is written both the transformers-4 way (top level) and the transformers-5 way (``rope_parameters``).
    """
    out: dict[str, Any] = {
        "architectures": [_ARCHITECTURE_OF_FAMILY[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_hidden,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.family == "llama":
        out["mlp_bias"] = False
    return out


# ----- tensor names and shapes ----------------------------------------------------------------------------------------


def expected_hf_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``cfg`` holds, under its HF name, with its shape (``lm_head`` only if untied)."""
    d, f = cfg.d_model, cfg.ffn_hidden
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (cfg.q_dim, d)
        shapes[p + "self_attn.k_proj.weight"] = (cfg.kv_dim, d)
        shapes[p + "self_attn.v_proj.weight"] = (cfg.kv_dim, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, cfg.q_dim)
        shapes[p + "mlp.gate_proj.weight"] = (f, d)
        shapes[p + "mlp.up_proj.weight"] = (f, d)
        shapes[p + "mlp.down_proj.weight"] = (d, f)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        if cfg.family == "olmo2":
            # QK-norm runs over the whole q / k projection, before the split into heads.
            shapes[p + "self_attn.q_norm.weight"] = (cfg.q_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (cfg.kv_dim,)
            shapes[p + "post_feedforward_layernorm.weight"] = (d,)
        else:
            shapes[p + "input_layernorm.weight"] = (d,)
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return shown + (f", ... ({len(names) - _SHOW} more)" if len(names) > _SHOW else "")


def validate_hf_state(cfg: TransformerConfig, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Check that ``state`` holds exactly the tensors ``cfg`` implies, with the right shapes; return it cleaned.

    Cleaning drops recomputed buffers (rotary ``inv_freq``) and, for tied configs, an ``lm_head.weight`` that merely
    repeats the embedding (some exporters save both). All problems are reported together.
    """
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_embeddings and "lm_head.weight" in state:
        head, embed = state.pop("lm_head.weight"), state.get("model.embed_tokens.weight")
        if embed is not None and (head.shape != embed.shape or not torch.equal(head, embed)):
            raise WeightsError(
                f"{source}: the config ties the embeddings (tie_word_embeddings) but lm_head.weight differs from "
                "model.embed_tokens.weight"
            )
    expected = expected_hf_shapes(cfg)
    not_float = [f"{k} ({v.dtype})" for k, v in state.items() if k in expected and not torch.is_floating_point(v)]
    check_hf_shapes(cfg, {k: tuple(v.shape) for k, v in state.items()}, source, not_float)
    return state


def check_hf_shapes(
    cfg: TransformerConfig, shapes: dict[str, tuple[int, ...]], source: str, not_float: list[str] | None = None
) -> None:
    """Check that a checkpoint's tensors (HF name -> shape) are exactly the ones ``cfg`` implies; all problems are
    reported together (with ``not_float``, the names of tensors that are not floating point)."""
    expected = expected_hf_shapes(cfg)
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    mismatched = [
        f"{k} is {shapes[k]}, expected {expected[k]}" for k in expected if k in shapes and shapes[k] != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_some(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) with the config: {_some(mismatched)}")
    if not_float:
        problems.append(f"non-floating-point tensor(s): {_some(not_float)}")
    if problems:
        arch = (
            f"{cfg.family}, {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads}/{cfg.n_kv_heads} heads x "
            f"{cfg.head_dim}, ffn {cfg.ffn_hidden}, vocab {cfg.vocab_size}, tied={cfg.tie_embeddings}"
        )
        raise WeightsError(f"{source}: checkpoint does not match its config ({arch}): " + "; ".join(problems))


# ----- files ----------------------------------------------------------------------------------------------------------


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file, in their stored dtype."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"cannot read safetensors file {path}: {e} (is the file truncated or corrupt?)") from e


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory: one ``model.safetensors`` or the shards its index lists."""
    single, index = directory / SAFETENSORS_NAME, directory / SAFETENSORS_INDEX_NAME
    if single.is_file():  # transformers also prefers the single file when both exist
        return load_safetensors(single)
    if index.is_file():
        data = read_json(index, "safetensors index", WeightsError)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"safetensors index {index} has no 'weight_map' object")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            # Shards live next to the index; refuse names that would escape the directory.
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise WeightsError(f"safetensors index {index} lists an invalid shard file name {shard!r}")
            if not (directory / shard).is_file():
                raise WeightsError(f"safetensors index {index} lists shard {shard!r}, which does not exist")
            state.update(load_safetensors(directory / shard))
        absent = [f"{name} (in {shard})" for name, shard in weight_map.items() if name not in state]
        if absent:
            raise WeightsError(f"safetensors index {index} lists tensors its shards do not contain: {_some(absent)}")
        return state
    pickles = [name for name in _PICKLE_NAMES if (directory / name).exists()]
    if pickles:
        raise WeightsError(
            f"{directory} has only PyTorch pickle weights ({', '.join(pickles)}); olmo-tap reads safetensors only. "
            'Re-save them as safetensors with: python -c "from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{directory}').save_pretrained('{directory}')\""
        )
    raise WeightsError(f"{directory} has no weights: expected {SAFETENSORS_NAME} or {SAFETENSORS_INDEX_NAME}")


def read_hf_dir(path: str | Path) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face checkpoint directory (config.json + safetensors) into (config, HF-named tensors).

    Tensors keep their stored dtype. A directory holding OLMo-core tensor names is converted to HF names. The
    result is validated against the config: every expected tensor present with its expected shape, nothing extra.
    """
    from olmo_tap.weights.olmo_core import is_olmo_core_state, olmo_core_to_hf

    directory = Path(path).expanduser()
    if not directory.exists():
        raise WeightsError(f"checkpoint directory {directory} does not exist")
    if not directory.is_dir():
        raise WeightsError(f"{directory} is not a directory (expected a checkpoint directory with {CONFIG_NAME})")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise WeightsError(f"{directory} has no {CONFIG_NAME}: not a Hugging Face checkpoint directory")
    cfg = config_from_hf(read_json(config_path, "model config", WeightsError), source=str(config_path))
    state = _read_weights(directory)
    if is_olmo_core_state(state):
        state = olmo_core_to_hf(state)
    return cfg, validate_hf_state(cfg, state, str(directory))


# ----- hub ------------------------------------------------------------------------------------------------------------

_HUB_ALTERNATIVES = (
    "alternatives: set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache, pass a local checkpoint "
    "directory or .gguf file, or use a preset such as 'smollm2-135m-instruct' (embedded, no network needed)"
)


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it only once, at import)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return bool(constants.HF_HUB_OFFLINE) or flag


def download_from_hub(
    repo_id: str, *, revision: str | None = None, endpoint: str | None = None, timeout: float = 10.0
) -> Path:
    """Download (or find in the HF cache) a hub checkpoint's config, safetensors and tokenizer files.

    Fails within about ``timeout`` seconds with a WeightsError when the hub cannot be reached and no cached copy
    exists, or at once when the repository does not exist.
    """
    try:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub import constants as hub_constants
        from huggingface_hub import errors as hub_errors
    except ImportError as e:
        raise WeightsError(f"downloading {repo_id!r} needs huggingface_hub: pip install huggingface_hub") from e

    def cached() -> Path | None:
        try:
            found = snapshot_download(
                repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=True
            )
        except Exception:  # any failure here just means "not cached"
            return None
        return Path(found)

    if _hub_offline():
        local = cached()
        if local is None:
            raise WeightsError(
                f"hub model {repo_id!r}: HF_HUB_OFFLINE is set and the model is not in the local Hugging Face cache; "
                "unset HF_HUB_OFFLINE to download it, or pass a local directory, .gguf file or preset"
            )
        return local

    # A short metadata request first: without it an unreachable hub can stall a download for minutes of
    # retries, and it tells a missing repository apart from a network problem.
    try:
        HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, timeout=timeout)
    except hub_errors.GatedRepoError as e:
        raise WeightsError(
            f"hub model {repo_id!r} is gated: accept its terms on the hub, then log in (hf auth login) or set HF_TOKEN"
        ) from e
    except hub_errors.RepositoryNotFoundError as e:
        raise WeightsError(
            f"hub model {repo_id!r} does not exist (or is private: log in or set HF_TOKEN); it is also not a local "
            "file, directory or preset"
        ) from e
    except hub_errors.RevisionNotFoundError as e:
        raise WeightsError(f"hub model {repo_id!r} has no revision {revision!r}") from e
    except hub_errors.HFValidationError as e:
        raise WeightsError(f"{repo_id!r} is not a valid hub id: {e}") from e
    except Exception as e:  # network errors come from httpx / requests, depending on the version
        local = cached()  # a copy downloaded earlier still works without the network
        if local is not None:
            return local
        where = endpoint or hub_constants.ENDPOINT
        raise WeightsError(
            f"could not reach the Hugging Face hub ({where}) to fetch {repo_id!r}: {type(e).__name__}: {e}; "
            + _HUB_ALTERNATIVES
        ) from e
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS, etag_timeout=timeout, endpoint=endpoint
            )
        )
    except Exception as e:
        raise WeightsError(
            f"downloading {repo_id!r} from the Hugging Face hub failed: {type(e).__name__}: {e}; " + _HUB_ALTERNATIVES
        ) from e
