"""Cross-field checks of quickstart experiments (heads, batch sizes, sequence room).

Each raises :class:`ConfigError` naming the dotted key and what is allowed;
the experiment configs call them from ``validate()``.
"""

from typing import Mapping, Optional

from realhf.api.quickstart.base import ConfigError, join_key
from realhf.api.quickstart.model import MFCConfig, ModelTrainEvalConfig, load_real_config


def check_language_model(key: str, model: ModelTrainEvalConfig, purpose: str) -> None:
    """``model`` must have the LM head (``type.is_critic=False``) to be used for ``purpose``."""
    if model.type.is_critic:
        raise ConfigError(
            f"{join_key(key, 'type.is_critic')}=True: {purpose} needs a language model with its LM head; "
            f"set {join_key(key, 'type.is_critic')}=False."
        )


def check_batch_covers_dp(batch_key: str, batch_size: int, allocations: Mapping[str, MFCConfig],
                          allocation_keys: Optional[Mapping[str, str]] = None) -> None:
    """Every data-parallel rank of every call gets at least one sequence of a batch."""
    if not allocations:
        return
    name, alloc = max(allocations.items(), key=lambda kv: kv[1].parallel.data_parallel_size)
    dp = alloc.parallel.data_parallel_size
    if batch_size < dp:
        where = (allocation_keys or {}).get(name, name)
        raise ConfigError(
            f"{batch_key}={batch_size} is smaller than the data-parallel size {dp} of MFC {name!r} "
            f"({where}); each data-parallel rank needs at least one sequence per batch, so "
            f"{batch_key} must be at least {dp}."
        )


def check_prompt_room(length_key: str, length: int, model_key: str, model: ModelTrainEvalConfig) -> None:
    """A prompt of ``length`` tokens must leave at least one position for an answer token."""
    real = load_real_config(model)
    n_pos = getattr(real, "n_positions", None) if real is not None else None
    if n_pos is not None and length >= n_pos:
        raise ConfigError(
            f"{length_key}={length} leaves no room for an answer token: the model at {model_key}.path has "
            f"n_positions={n_pos}; {length_key} must be at most {n_pos - 1}."
        )


def check_seqlen_fits(length_key: str, length: int, model_key: str, model: ModelTrainEvalConfig) -> None:
    """Sequences of ``length`` tokens must fit the learned position table of absolute-position models."""
    real = load_real_config(model)
    if real is None or getattr(real, "apply_rotary", True) or getattr(real, "n_positions", None) is None:
        return
    if length > real.n_positions:
        raise ConfigError(
            f"{length_key}={length} exceeds the {real.n_positions} positions of the model at {model_key}.path "
            f"(learned position embeddings); {length_key} must be at most {real.n_positions}."
        )


DEFAULT_SIZE = 7  # the reference's placeholder default of ``type.size``: not checked


def checkpoint_billions(real_config) -> float:
    """Parameters of a model config, in billions (embedding, blocks and head)."""
    from realhf.impl.model.nn.flat_param import stage_param_shapes

    n = 0
    for _, shape in stage_param_shapes(real_config, range(real_config.n_layers + 2)):
        k = 1
        for d in shape:
            k *= int(d)
        n += k
    return n / 1e9


def check_model_size(key: str, model: ModelTrainEvalConfig) -> None:
    """A ``type.size`` other than 0 (unspecified) or the default must match the checkpoint.

    Allowed: within 50% of the checkpoint's parameter count in billions, or
    within 1 for models under 2B parameters.
    """
    size = model.type.size
    if size in (0, DEFAULT_SIZE):
        return
    try:
        real = load_real_config(model)
    except Exception:  # noqa: BLE001 - a family mismatch is reported by resolved_allocations
        return
    if real is None:
        return
    b = checkpoint_billions(real)
    if abs(size - b) > max(1.0, 0.5 * b):
        raise ConfigError(
            f"{join_key(key, 'type.size')}={size} does not match the checkpoint at {join_key(key, 'path')}, which has "
            f"{b:.3g}B parameters; set it to about {max(round(b), 0)} (billions) or 0 (unspecified)."
        )


__all__ = ["check_batch_covers_dp", "check_model_size", "check_language_model", "check_prompt_room", "check_seqlen_fits"]
