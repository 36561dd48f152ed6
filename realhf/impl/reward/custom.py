"""User reward functions loaded from a Python file by path and function name.

The function is looked up by *name* in the file at *path* (the file is run as
a fresh module, once per process and path), so a reward can live outside the
repository and still run inside pool worker processes, which load it
themselves instead of receiving a pickled function.

Accepted signature::

    def my_reward(prompt: str, completion: str, **metadata) -> float

``prompt`` and ``completion`` are the decoded texts and are passed
positionally (the parameters may have other names). ``metadata`` holds the
item's dataset fields (e.g. ``answer``), ``id`` and ``reference`` (the
reference answer the caller selected; see the ``rule_reward`` interface). A function declaring fewer keyword
parameters, e.g. ``def f(prompt, completion, answer)``, receives only those
it names; one with ``**kwargs`` receives all. The result must convert to a
finite float (``bool`` counts as 0/1).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import os
import sys
import threading
from types import ModuleType
from typing import Any, Callable, Dict, Mapping

RewardFn = Callable[..., float]

_MODULES: Dict[str, ModuleType] = {}
_LOCK = threading.Lock()


def _load_module(path: str, wanted: str) -> ModuleType:
    """Run ``path`` as a module once per process (cached by absolute path);
    ``wanted`` (the function looked for) only enriches error messages."""
    path = os.path.abspath(os.path.expanduser(path))
    with _LOCK:
        if path in _MODULES:
            return _MODULES[path]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"custom reward file {path!r} does not exist (or is not a file); "
                                    f"it should define the reward function {wanted!r}.")
        mod_name = "realhf_custom_reward_" + hashlib.sha1(path.encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"custom reward file {path!r} cannot be loaded as a Python module "
                              f"(it should be a .py file defining {wanted!r}).")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # lets the file's dataclasses/pickling find their module
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as e:
            sys.modules.pop(mod_name, None)
            raise ImportError(f"custom reward file {path!r} failed to import while looking for {wanted!r}: "
                              f"{type(e).__name__}: {e}") from e
        _MODULES[path] = module
        return module


def _positional_capacity(fn: Callable) -> int:
    """How many positional arguments ``fn`` accepts (a large number for ``*args``)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 1 << 30
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def adapt_reward_fn(fn: Callable, label: str) -> Callable[[str, str, Mapping[str, Any]], float]:
    """Wrap ``fn`` into ``call(prompt, completion, metadata) -> float``.

    Passes only the metadata keys ``fn`` declares (all with ``**kwargs``) and
    checks the result, so a mismatch surfaces as an error naming ``label``.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise TypeError(f"reward function {label} has no inspectable signature: {e}") from e
    if _positional_capacity(fn) < 2:
        raise TypeError(f"reward function {label} must accept (prompt, completion, **metadata); "
                        f"its signature is {sig}.")
    params = list(sig.parameters.values())
    positional_names = {p.name for p in params[:2] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)}
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params)
    keyword_names = {p.name for p in params[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def call(prompt: str, completion: str, metadata: Mapping[str, Any]) -> float:
        if takes_all:
            kwargs = {k: v for k, v in metadata.items() if k not in positional_names}
        else:
            kwargs = {k: v for k, v in metadata.items() if k in keyword_names}
        value = fn(prompt, completion, **kwargs)
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"returned {value!r} ({type(value).__name__}), not a number") from None
        if not math.isfinite(result):
            raise ValueError(f"returned a non-finite reward {result}")
        return result

    call.__name__ = getattr(fn, "__name__", "reward")
    return call


def load_reward_function(path: str, name: str) -> RewardFn:
    """The callable ``name`` defined in the Python file ``path``.

    Errors name the path and the function: missing file (FileNotFoundError),
    a file that fails to import (ImportError), no such attribute
    (AttributeError) or an attribute that is not callable (TypeError).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"custom reward function name must be a non-empty string, got {name!r} (file {path!r}).")
    module = _load_module(path, name)
    if not hasattr(module, name):
        available = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)
        raise AttributeError(f"custom reward file {path!r} defines no {name!r}; "
                             f"functions defined there: {available or 'none'}.")
    fn = getattr(module, name)
    if not callable(fn):
        raise TypeError(f"{name!r} in custom reward file {path!r} is not callable "
                        f"(it is a {type(fn).__name__}).")
    return fn
