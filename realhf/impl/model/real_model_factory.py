"""The ``real_model`` model: a ReaLModel stage for the active model scope.

Model workers build every hosted shard inside ``constants.model_scope(name)``,
so the pipeline stage and tensor-parallel shard come from the scope's grid.
Weights come from a Hugging Face checkpoint (``path``), or are initialized
from ``seed`` (``init_from_scratch``; the config then comes from ``path``'s
config.json or from ``config``). ``instantiate=False`` gives an empty handle
that receives its weights by parameter reallocation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Union

import torch

from realhf.api.core.config import ModelName
from realhf.api.core.model_api import Model, ReaLModelConfig, get_hf_family, register_model
from realhf.base import constants

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _dtype(d: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    if d not in _DTYPES:
        raise ValueError(f"real_model: dtype {d!r} not in {sorted(_DTYPES)}.")
    return _DTYPES[d]


def _scope() -> Dict[str, int]:
    if not constants.in_model_scope():
        return dict(pp_size=1, pp_rank=0)
    return dict(pp_size=constants.pipe_parallel_world_size(), pp_rank=constants.pipe_parallel_rank())


def _config(family: str, path: Optional[str], config: Optional[Dict[str, Any]], is_critic: bool) -> ReaLModelConfig:
    fam = get_hf_family(family)
    if config is not None:
        cfg = ReaLModelConfig(**config) if isinstance(config, dict) else config
        return dataclasses.replace(cfg, is_critic=is_critic, tied_embedding=cfg.tied_embedding and not is_critic)
    if path:
        from realhf.impl.model.conversion.hf_io import read_hf_config

        return fam.config_from_hf_converter(read_hf_config(path), is_critic=is_critic)
    raise ValueError(f"real_model: give path= (an HF checkpoint directory) or config= for family {family!r}.")


def make_real_model(
    name: ModelName,
    device: Union[str, torch.device] = "cpu",
    family: str = "llama",
    path: Optional[str] = None,
    config: Optional[Dict[str, Any]] = None,
    tokenizer_path: Optional[str] = None,
    init_from_scratch: bool = False,
    is_critic: bool = False,
    init_critic_from_actor: bool = False,
    dtype: Union[str, torch.dtype] = "float32",
    seed: int = 1,
    instantiate: bool = True,
) -> Model:
    """Build this rank's stage of ``family`` (see the module docstring)."""
    from realhf.api.core.data_api import load_hf_tokenizer
    from realhf.impl.model.nn.real_llm_api import ReaLModel

    dt = _dtype(dtype)
    tok_path = tokenizer_path or path
    tokenizer = load_hf_tokenizer(tok_path) if tok_path else None
    stage = _scope()
    if instantiate and path and not init_from_scratch:
        from realhf.impl.model.nn.real_llm_hf import load_from_hf

        module = load_from_hf(family, path, init_critic_from_actor=init_critic_from_actor, is_critic=is_critic,
                              dtype=dt, device=device, seed=seed, **stage)
    else:
        cfg = _config(family, path, config, is_critic or init_critic_from_actor)
        module = ReaLModel(cfg, dtype=dt, device=device, **stage)
        if instantiate:
            module.instantiate(init=False)
            # Weights depend on the seed only, not on the layout (see ReaLModel.init_weights).
            module.init_weights(seed=seed)
    module.hf_family = family
    return Model(name=ModelName.parse(name), module=module, tokenizer=tokenizer, device=device, dtype=dt)


register_model("real_model", make_real_model)
