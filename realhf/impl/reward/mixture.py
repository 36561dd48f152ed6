"""Named reward functions and weighted mixtures of them.

A *spec* selects rewards by name, so it is plain data that travels in
experiment configs and to pool worker processes (which rebuild the functions
themselves). Accepted forms::

    "math"
    {"name": "format", "pattern": r"####"}
    [{"name": "math", "weight": 1.0}, {"name": "format", "weight": 0.1}]
    [{"name": "custom", "path": "/abs/my_reward.py", "function": "score", "weight": 0.5}]

Every key of an entry other than ``name`` and ``weight`` (default 1.0) is an
option of that reward's factory. Built-ins:

* ``math`` (option ``tol``): 1 if the final answer equals ``reference``
  (see :mod:`realhf.impl.reward.math_verify`), 0 otherwise.
* ``format`` (option ``pattern``): 1 if the regex matches the completion.
* ``custom`` (options ``path``, ``function``): a user function, see
  :mod:`realhf.impl.reward.custom`.

A mixture's reward is ``sum(weight_i * reward_i)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from realhf.impl.reward.custom import adapt_reward_fn, load_reward_function
from realhf.impl.reward.math_verify import DEFAULT_FORMAT_PATTERN, format_reward, math_reward

RewardSpec = Union[str, Mapping[str, Any], Sequence[Union[str, Mapping[str, Any]]]]
#: factory(**options) -> fn(prompt, completion, **metadata) -> float
RewardFactory = Callable[..., Callable[..., float]]


class RewardSpecError(ValueError):
    """A reward spec entry is malformed; the message names the entry."""


class ComponentFailure(Exception):
    """One reward function of a mixture failed on one item (``cause`` is its error text)."""

    def __init__(self, label: str, cause: str):
        super().__init__(f"{label}: {cause}")
        self.label = label
        self.cause = cause


# --------------------------------------------------------------------- registry
_REGISTRY: Dict[str, RewardFactory] = {}


def register_reward(name: str, factory: RewardFactory) -> None:
    """Register ``factory(**options)`` under ``name``.

    Pool workers started with the ``spawn`` context only know names
    registered when :mod:`realhf.impl.reward` is imported; elsewhere prefer
    ``custom`` with a file path, which every worker can load.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward names must be non-empty strings, got {name!r}.")
    if name in _REGISTRY:
        raise ValueError(f"reward {name!r} is already registered.")
    _REGISTRY[name] = factory


def registered_rewards() -> List[str]:
    return sorted(_REGISTRY)


def _math(tol: float = 1e-6) -> Callable[..., float]:
    tol = float(tol)

    def math_fn(prompt: str, completion: str, reference: Optional[str] = None) -> float:
        return math_reward(completion, reference, tol)

    return math_fn


def _format(pattern: str = DEFAULT_FORMAT_PATTERN) -> Callable[..., float]:
    re.compile(pattern)  # a bad pattern fails when the spec is built, not per item

    def format_fn(prompt: str, completion: str) -> float:
        return format_reward(completion, pattern)

    return format_fn


def _custom(path: str, function: str) -> Callable[..., float]:
    return load_reward_function(path, function)


register_reward("math", _math)
register_reward("format", _format)
register_reward("custom", _custom)


# ------------------------------------------------------------------------- spec
def _describe(entry: Any) -> str:
    return repr(entry) if len(repr(entry)) <= 200 else repr(entry)[:197] + "..."


def _check_options(where: str, name: str, given: List[Any]) -> None:
    """The entry's options against its factory's parameters: unknown or missing ones name the entry."""
    try:
        params = inspect.signature(_REGISTRY[name]).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): the factory call checks
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    options = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    known = [p.name for p in options]
    unknown = [k for k in given if k not in known]
    if unknown:
        raise RewardSpecError(f"{where}: reward {name!r} has no option {unknown[0]!r}; its options are "
                              f"{known or 'none'} (besides 'name' and 'weight').")
    missing = [p.name for p in options if p.default is p.empty and p.name not in given]
    if missing:
        raise RewardSpecError(f"{where}: reward {name!r} needs {missing}.")


def normalize_spec(spec: RewardSpec) -> List[Dict[str, Any]]:
    """Entries as ``{"name", "weight", **options}`` dicts; raises RewardSpecError naming a bad entry."""
    if isinstance(spec, (str, Mapping)):
        spec = [spec]
    if not isinstance(spec, Sequence) or len(spec) == 0:
        raise RewardSpecError(f"a reward spec is a name, an entry dict or a non-empty list of them; got {spec!r}.")
    out = []
    for i, entry in enumerate(spec):
        where = f"reward spec entry {i} ({_describe(entry)})"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, Mapping):
            raise RewardSpecError(f"{where}: must be a name or a dict, not {type(entry).__name__}.")
        entry = dict(entry)
        name = entry.get("name")
        glued = [k for k, v in entry.items() if v is None and isinstance(k, str) and ":" in k]
        if name is None and glued:
            raise RewardSpecError(f"{where}: keys {glued} look like 'key:value' without a space, which YAML reads "
                                  "as one key; write {name: custom, path: ..., function: ...} with a space after "
                                  "each colon.")
        if name not in _REGISTRY:
            raise RewardSpecError(f"{where}: unknown reward name {name!r}; registered: {registered_rewards()}.")
        _check_options(where, name, [k for k in entry if k not in ("name", "weight")])
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise RewardSpecError(f"{where}: weight must be a finite number, got {weight!r}.")
        entry["weight"] = float(weight)
        out.append(entry)
    return out


# ---------------------------------------------------------------------- mixture
@dataclasses.dataclass(frozen=True)
class RewardComponent:
    """One weighted reward function; ``call(prompt, completion, metadata)``."""

    label: str
    weight: float
    call: Callable[[str, str, Mapping[str, Any]], float]


def _label(entry: Mapping[str, Any]) -> str:
    if entry["name"] == "custom":
        return f"custom:{entry.get('function')}@{entry.get('path')}"
    return str(entry["name"])


class RewardMixture:
    """A weighted sum of reward functions, built from a spec."""

    def __init__(self, components: Sequence[RewardComponent]):
        self.components = list(components)

    @property
    def labels(self) -> List[str]:
        return [c.label for c in self.components]

    def score(self, prompt: str, completion: str, metadata: Optional[Mapping[str, Any]] = None,
              on_component: Optional[Callable[[int], None]] = None) -> float:
        """The weighted sum; a failing function raises ComponentFailure naming it.

        ``on_component(i)`` runs before component ``i`` (the pool uses it to
        time each call separately).
        """
        metadata = {} if metadata is None else metadata
        total = 0.0
        for i, comp in enumerate(self.components):
            if on_component is not None:
                on_component(i)
            try:
                value = comp.call(prompt, completion, metadata)
            except Exception as e:
                raise ComponentFailure(comp.label, f"{type(e).__name__}: {e}") from e
            total += comp.weight * value
        return total

    def __call__(self, prompt: str, completion: str, metadata: Optional[Mapping[str, Any]] = None) -> float:
        return self.score(prompt, completion, metadata)


def build_mixture(spec: RewardSpec) -> RewardMixture:
    """Resolve every entry of ``spec`` (errors name the entry and keep the cause's text)."""
    components = []
    for i, entry in enumerate(normalize_spec(spec)):
        options = {k: v for k, v in entry.items() if k not in ("name", "weight")}
        where = f"reward spec entry {i} ({_describe(entry)})"
        try:
            fn = _REGISTRY[entry["name"]](**options)
            call = adapt_reward_fn(fn, _label(entry))
        except TypeError as e:
            raise RewardSpecError(f"{where}: {e}") from e
        except (OSError, ImportError, AttributeError, re.error, ValueError) as e:
            raise RewardSpecError(f"{where}: {type(e).__name__}: {e}") from e
        components.append(RewardComponent(_label(entry), entry["weight"], call))
    return RewardMixture(components)
