"""Compiled native operators (built by setup.py from csrc/).

torch is imported first so that the extensions find libc10 and libtorch.
Use them through ``realhf.impl.ops``, which falls back to Python when an
extension is missing.
"""

import torch  # noqa: F401
