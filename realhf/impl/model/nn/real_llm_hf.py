"""Loading ReaLModel weights from, and saving them to, HuggingFace checkpoints.

A stage reads only the checkpoint entries of its own layers (the family's
``*_param_names`` give the HF names), converts names with the family's
state-dict converter and copies the tensors into its flat buffer.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from realhf.api.core.model_api import HFModelFamily, ReaLModelConfig, get_hf_family
from realhf.impl.model.conversion.hf_io import (
    CheckpointError,
    copy_hf_aux_files,
    list_checkpoint_files,
    load_hf_state_dict,
    read_hf_config,
    save_hf_state_dict,
)
from realhf.impl.model.nn.real_llm_api import ReaLModel
from realhf.impl.model.nn.real_llm_base import head_key, layer_param_shapes


def stage_hf_param_names(
    family: HFModelFamily, config: ReaLModelConfig, layer_indices: Sequence[int], with_head: bool = True
) -> List[str]:
    names: List[str] = []
    for i in layer_indices:
        if i == 0:
            names += family.embedding_param_names(config)
        elif i <= config.n_layers:
            names += family.tblock_param_names(config, i - 1)
        elif with_head:
            names += family.head_param_names(config)
    return names


def expected_hf_shapes(
    family: HFModelFamily, config: ReaLModelConfig, layer_indices: Sequence[int], with_head: bool = True
) -> Dict[str, Tuple[int, ...]]:
    """HF key -> full (unsharded) shape that ``family``'s converter expects for these layers.

    Computed by converting meta tensors of ReaLModel's own layout, so it is
    exactly what loading will need and costs no memory.
    """
    indices = [i for i in layer_indices if with_head or i <= config.n_layers]
    sd = {k: torch.empty(shape, device="meta") for i in indices for k, shape in layer_param_shapes(config, i)}
    if config.tied_embedding:
        sd.pop(head_key(config), None)
    hf = family.sd_to_hf_converter(sd, config)
    wanted = stage_hf_param_names(family, config, indices, with_head=with_head)
    # A tied head is read from the embedding entry, which this stage may not convert itself.
    if config.tied_embedding and with_head and config.n_layers + 1 in indices and 0 not in indices:
        hf.update(family.sd_to_hf_converter({"0.wte.weight": torch.empty(
            dict(layer_param_shapes(config, 0))["0.wte.weight"], device="meta")}, config))
    return {k: tuple(hf[k].shape) for k in wanted if k in hf}


def _check_loaded(hf_sd: Dict[str, torch.Tensor], expected: Dict[str, Tuple[int, ...]], load_dir: str) -> None:
    """Name the HF key and file when a tensor is missing or has the wrong shape."""
    files = ", ".join(os.path.basename(f) for f in list_checkpoint_files(load_dir)[1])
    for k, shape in expected.items():
        if k not in hf_sd:
            raise CheckpointError(f"{load_dir}: tensor {k!r} is missing from the checkpoint ({files}).")
        if tuple(hf_sd[k].shape) != shape:
            raise CheckpointError(f"{load_dir}: tensor {k!r} has shape {list(hf_sd[k].shape)} in the "
                                  f"checkpoint ({files}); the model config needs {list(shape)}.")


def load_from_hf(
    family_name: str,
    load_dir: str,
    init_critic_from_actor: bool = False,
    is_critic: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    layer_indices: Optional[Sequence[int]] = None,
    pp_size: int = 1,
    pp_rank: int = 0,
    seed: int = 1,
) -> ReaLModel:
    """Build and fill a ReaLModel (or one pipeline stage of it) from ``load_dir``.

    ``init_critic_from_actor``: a critic whose body comes from an actor
    checkpoint and whose scalar head is freshly initialized from ``seed`` (the
    same head on every rank and layout). ``is_critic``: the checkpoint itself
    holds a scalar head (saved by a ReaL critic).
    """
    family = get_hf_family(family_name)
    hf_cfg = read_hf_config(load_dir)
    archs = hf_cfg.get("architectures") or []
    if archs and archs[0] != family.hf_cls_name:
        raise ValueError(f"{load_dir} holds a {archs[0]}, family {family_name!r} expects {family.hf_cls_name}.")
    critic = is_critic or init_critic_from_actor
    config = family.config_from_hf_converter(hf_cfg, is_critic=critic)
    config.base_model_path = os.fspath(load_dir)
    model = ReaLModel(config, dtype=dtype, device=device, layer_indices=layer_indices, pp_size=pp_size, pp_rank=pp_rank)
    expected = expected_hf_shapes(family, config, model.layer_indices, with_head=not init_critic_from_actor)
    raw = load_hf_state_dict(load_dir, key_filter=lambda k: family.normalize_hf_key(k) in expected)
    hf_sd = {family.normalize_hf_key(k): v for k, v in raw.items()}
    _check_loaded(hf_sd, expected, os.fspath(load_dir))
    sd = family.sd_from_hf_converter(hf_sd, config)
    hk = head_key(config)
    if model.has_head:
        if init_critic_from_actor:
            sd[hk] = ReaLModel.new_critic_head(config, seed=seed)
        elif config.tied_embedding and hk not in sd:
            sd[hk] = sd["0.wte.weight"]
    sd = {k: v for k, v in sd.items() if k in model.param_spec}
    model.instantiate(init=False)
    model.load_state_dict(sd, strict=True)
    model.hf_family = family_name
    return model


def hf_state_dict(model: ReaLModel, family_name: str) -> Dict[str, torch.Tensor]:
    """This stage's weights under HF names (a tied head is left to the embedding)."""
    family = get_hf_family(family_name)
    sd = model.state_dict()
    if model.config.tied_embedding:
        sd.pop(head_key(model.config), None)
    return family.sd_to_hf_converter(sd, model.config)


def save_to_hf(model: ReaLModel, family_name: str, tokenizer: Any, save_dir: str) -> None:
    """Write config.json, weights and tokenizer files loadable by transformers."""
    family = get_hf_family(family_name)
    os.makedirs(save_dir, exist_ok=True)
    hf_config = family.config_to_hf_converter(model.config)
    hf_config.dtype = str(model.dtype).removeprefix("torch.")
    hf_config.save_pretrained(save_dir)
    save_hf_state_dict({k: v.detach().cpu().contiguous() for k, v in hf_state_dict(model, family_name).items()}, save_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_dir)
    elif model.config.base_model_path:
        copy_hf_aux_files(model.config.base_model_path, save_dir)
