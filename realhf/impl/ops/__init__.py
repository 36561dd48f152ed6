"""Low-level tensor operators with native kernels and torch fallbacks.

Public API:

* :func:`merge_intervals`, :func:`slice_intervals`, :func:`set_intervals` --
  half-open interval bookkeeping and gather/scatter over flat buffers, used by
  parameter reallocation between parallel layouts;
* :func:`gae_1d` -- generalized advantage estimation over packed sequences;
* :mod:`realhf.impl.ops.fused_layers` -- RMS norm, rotary embedding, the
  gated-MLP product, packed and prefix-tree attention and next-token
  log-probs as fused kernels (what the model's layers and losses call);
* :func:`available_backends` -- which implementations can run here.

Each operator picks the fastest usable backend for the tensor's device
("cuda", "triton", "cpp" or the always-available "python"); pass
``backend=...`` or set ``REAL_OP_BACKEND`` to force one (see
:mod:`realhf.impl.ops.dispatch`).
"""

from realhf.impl.ops.dispatch import BackendError, available_backends
from realhf.impl.ops.gae import gae_1d
from realhf.impl.ops.intervals import merge_intervals, set_intervals, slice_intervals

__all__ = [
    "BackendError",
    "available_backends",
    "gae_1d",
    "merge_intervals",
    "set_intervals",
    "slice_intervals",
]
