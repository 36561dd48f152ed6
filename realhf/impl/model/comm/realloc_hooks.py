"""Executing the hooks of a model function call on a model worker.

A worker knows, for every model replica, its config, its layout and (where
this rank is part of the layout) its stage: a :class:`Replica`. Hooks come
from ``realhf.api.core.dfg``:

* ``ParamReallocHook(source=S)`` on a call of replica ``C``: copy S's weights
  into C's layout. A frozen source is released afterwards; a trainable one
  keeps its buffer (the optimizer owns it).
* ``ParamReallocHook(target=T)`` on ``C``: if T is trainable and ``eta == 1``
  it already holds these weights, so C's copy is only dropped; otherwise the
  weights of C are copied (``eta == 1``) or blended (``eta < 1``, EMA) into T.
* ``OffloadHook`` on ``C``: release C's parameter memory until its next use.

Every rank of the world may call :func:`run_hook`; ranks outside both
layouts return immediately, so the caller need not know who takes part.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from realhf.api.core.config import ModelName
from realhf.api.core.dfg import OffloadHook, ParamReallocHook, RPCHook
from realhf.api.core.model_api import ReaLModelConfig
from realhf.base.topology import ModelParallelLayout
from realhf.impl.model.comm import global_comm
from realhf.impl.model.comm.param_realloc import layout_dims, reallocate, release_params
from realhf.impl.model.nn.real_llm_api import ReaLModel


@dataclasses.dataclass
class Replica:
    """One model replica as seen from this rank.

    :param model: this rank's stage (possibly not instantiated: an empty
        handle that receives weights on demand), or None if the rank is not in
        ``layout``.
    :param trainable: the replica an optimizer updates; it is never freed.
    """

    name: ModelName
    config: ReaLModelConfig
    layout: ModelParallelLayout
    model: Optional[ReaLModel] = None
    trainable: bool = False


def empty_stage(config: ReaLModelConfig, layout: ModelParallelLayout, rank: int, tp_group: Any = None,
                dtype: torch.dtype = torch.float32, device: str = "cpu") -> Optional[ReaLModel]:
    """The (not instantiated) stage ``rank`` holds in ``layout``, or None if it holds none.

    With tensor parallelism the tp group defaults to the one ``setup_global_comm`` created.
    """
    if rank not in layout:
        return None
    pp, _, tp = layout_dims(layout)
    c = layout.coord(rank)
    if tp > 1 and tp_group is None:
        tp_group = global_comm.cached_group(layout.tp_group_of(rank))
    return ReaLModel(config, dtype=dtype, device=device, pp_size=pp, pp_rank=c.pipe, tp_size=tp,
                     tp_rank=c.model, tp_group=tp_group)


def _realloc(src: Replica, dst: Replica, eta: float, free_source: bool, group: Any,
             share: bool = False, links: Any = None) -> Dict[str, Any]:
    return reallocate(src.config, src.layout, dst.layout, src.model, dst.model, eta=eta,
                      free_source=free_source, group=group, share=share, links=links)


def run_hook(hook: RPCHook, call: ModelName, replicas: Dict[ModelName, Replica], group: Any = None,
             share: bool = False, links: Any = None) -> Dict[str, Any]:
    """Run ``hook`` attached to a call on replica ``call``; returns this rank's transfer stats.

    ``share``: ``call``'s replica is handed back (released) after every use, so a
    ``source=`` reallocation may lend it the source's own buffer where this rank
    holds the same stage in both layouts (see ``reallocate``). ``links``: the
    worker's ``LocalLinks``, which carry weights between ranks of one host."""
    me = dist.get_rank() if dist.is_initialized() else 0
    if call not in replicas:
        raise KeyError(f"Hook on unknown model {call}; known: {sorted(map(str, replicas))}.")
    this = replicas[call]
    if isinstance(hook, OffloadHook):
        if this.model is not None and this.model.instantiated:
            this.model.async_offload(auto_reload=True)  # the next call reloads it
        return {}
    if not isinstance(hook, ParamReallocHook):
        raise TypeError(f"Unknown hook {hook!r}.")
    other_name = hook.source if hook.source is not None else hook.target
    if other_name not in replicas:
        raise KeyError(f"ParamReallocHook names unknown model {other_name}; known: {sorted(map(str, replicas))}.")
    other = replicas[other_name]
    if me not in this.layout and me not in other.layout:
        return {}
    if hook.source is not None:
        if hook.eta != 1.0 and this.model is not None and not this.model.instantiated:
            raise ValueError(f"EMA into {call} needs its current weights, but it holds none.")
        return _realloc(other, this, hook.eta, free_source=not other.trainable, group=group,
                        share=share and hook.eta == 1.0, links=links)
    if other.trainable and hook.eta == 1.0:
        # The train replica already holds exactly these weights; drop the copy.
        if this.model is not None and not this.trainable:
            release_params(this.model)
        return {}
    return _realloc(this, other, hook.eta, free_source=not this.trainable and hook.eta == 1.0, group=group,
                    links=links)
