"""Model implementations. Importing this package attaches, for every registered
HF family ``f``, the methods ``ReaLModel.from_f``, ``to_f``, ``config_from_f``,
``config_to_f`` and ``make_f_config``."""

from __future__ import annotations

from typing import Any

import realhf.api.from_hf  # noqa: F401  (registers the families)
from realhf.api.core.model_api import HF_MODEL_FAMILIES, ReaLModelConfig, get_hf_family
from realhf.impl.model.nn.real_llm_api import ReaLModel


def _attach(name: str) -> None:
    from realhf.impl.model.nn import real_llm_hf

    family = get_hf_family(name)

    def from_family(cls, load_dir: str, init_critic_from_actor: bool = False, **kwargs) -> ReaLModel:
        return real_llm_hf.load_from_hf(name, load_dir, init_critic_from_actor, **kwargs)

    def to_family(self: ReaLModel, tokenizer: Any, save_dir: str) -> None:
        real_llm_hf.save_to_hf(self, name, tokenizer, save_dir)

    def config_from(hf_config_or_path: Any, is_critic: bool = False) -> ReaLModelConfig:
        return family.config_from_hf_converter(hf_config_or_path, is_critic=is_critic)

    def make_config() -> ReaLModelConfig:
        if family.real_config_maker is None:
            raise NotImplementedError(f"Family {name!r} registers no test config.")
        return family.real_config_maker()

    setattr(ReaLModel, f"from_{name}", classmethod(from_family))
    setattr(ReaLModel, f"to_{name}", to_family)
    setattr(ReaLModel, f"config_from_{name}", staticmethod(config_from))
    setattr(ReaLModel, f"config_to_{name}", staticmethod(family.config_to_hf_converter))
    setattr(ReaLModel, f"make_{name}_config", staticmethod(make_config))


for _name in HF_MODEL_FAMILIES.names():
    _attach(_name)
