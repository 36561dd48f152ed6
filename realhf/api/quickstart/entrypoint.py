"""Quickstart command line: ``python -m realhf.apps.quickstart <name> key=value ...``.

Experiments are registered by name with :func:`register_quickstart_exp` and
parsed from dotted overrides (``model.optimizer.lr=1e-4``, ``null`` = None)
on top of their dataclass defaults, using OmegaConf structured configs.
Every problem surfaces as one :class:`ConfigError` line that names the key.

A script can define and launch its own experiment::

    register_quickstart_exp("my-sft", MySFTConfig)
    if __name__ == "__main__":
        quickstart_main()          # python my_exp.py my-sft key=value ...

``python -m realhf.apps.quickstart --import my_exp.py my-sft ...`` also works.
"""

import dataclasses
import difflib
import importlib
import importlib.util
import os
import sys
import typing
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from realhf.api.quickstart.base import ConfigError, check_finite_floats
from realhf.api.quickstart.experiment import SFTConfig, default_trial_name
from realhf.base.registry import Registry, RegistryError

QUICKSTART_EXPS: Registry = Registry("quickstart experiment")
# Names registered here as defaults; a later registration of the same name
# (e.g. a full implementation in realhf.experiments) replaces them silently.
_BUILTIN_DEFAULTS: Dict[str, type] = {}

USAGE = (
    "usage: python -m realhf.apps.quickstart [--import MODULE_OR_FILE] [--config FILE.yaml] "
    "<experiment> [key=value ...]\n"
    "       python -m realhf.apps.quickstart <experiment> --help   (list its keys and defaults)"
)


def register_quickstart_exp(name: str, config_cls: type, *, override: bool = False) -> type:
    """Register a dataclass config (a ``CommonExperimentConfig`` subclass) under ``name``."""
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        raise TypeError(f"register_quickstart_exp({name!r}, ...) needs a dataclass type, got {config_cls!r}.")
    if _BUILTIN_DEFAULTS.get(name) is not None and _BUILTIN_DEFAULTS[name] is not config_cls:
        override = True
        _BUILTIN_DEFAULTS.pop(name)
    return QUICKSTART_EXPS.register(name, config_cls, override=override)


def _register_builtin(name: str, config_cls: type) -> None:
    if name not in QUICKSTART_EXPS:
        QUICKSTART_EXPS.register(name, config_cls)
        _BUILTIN_DEFAULTS[name] = config_cls


_register_builtin("sft", SFTConfig)

_experiments_import_error: Optional[BaseException] = None


def _import_builtin_experiments() -> None:
    """Import ``realhf.experiments`` (it registers rw, dpo, ppo, ...); failures are reported on lookup."""
    global _experiments_import_error
    try:
        importlib.import_module("realhf.experiments")
    except Exception as e:  # noqa: BLE001 - reported only if the experiment is then unknown
        _experiments_import_error = e


def get_quickstart_exp(name: str) -> type:
    """The config class registered under ``name``; ConfigError listing the registered names otherwise."""
    try:
        return QUICKSTART_EXPS.get(name)
    except RegistryError as e:
        msg = str(e)
        if _experiments_import_error is not None:
            msg += f" (importing realhf.experiments failed: {_experiments_import_error!r})"
        raise ConfigError(msg) from None


IMPORTED_USER_MODULES: List[str] = []  # passed on to launched workers


def import_user_module(spec: str) -> None:
    """Import a dotted module name or a ``.py`` file (its registrations take effect)."""
    IMPORTED_USER_MODULES.append(os.path.abspath(spec) if spec.endswith(".py") or os.sep in spec else spec)
    if spec.endswith(".py") or os.sep in spec:
        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise ConfigError(f"--import {spec!r}: no such file.")
        mod_name = "_realhf_user_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            importlib.import_module(spec)
        except ModuleNotFoundError as e:
            raise ConfigError(f"--import {spec!r}: {e}.") from None


# --------------------------------------------------------------------------- #
# Field introspection (for messages)
# --------------------------------------------------------------------------- #
def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _field_types(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}


def field_type(cls: type, dotted: str) -> Optional[Any]:
    """Annotated type of a dotted field of a dataclass, or None if it does not exist."""
    tp: Any = cls
    for part in dotted.split("."):
        hints = _field_types(_unwrap_optional(tp))
        names = {f.name for f in dataclasses.fields(_unwrap_optional(tp))} if hints else set()
        if part not in names:
            return None
        tp = hints[part]
    return tp


def _type_name(tp: Any) -> str:
    inner = _unwrap_optional(tp)
    name = getattr(inner, "__name__", None) or str(inner).replace("typing.", "")
    return f"{name} or null" if inner is not tp else name


def all_keys(cls: type, prefix: str = "") -> List[str]:
    """Every dotted leaf and section key of a dataclass config."""
    out: List[str] = []
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        out.append(key)
        inner = _unwrap_optional(hints.get(f.name))
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            out.extend(all_keys(inner, key + "."))
    return out


def _unknown_key_message(cls: type, key: str, written: Optional[str] = None) -> str:
    """``key``: the first unknown component's dotted key; ``written``: the whole key the user typed."""
    if written and written != key and written.startswith(key + "."):
        # A typo in a section name (``modle.path``): match the whole typed key.
        depth = written.count(".")
        same_depth = [k for k in all_keys(cls) if k.count(".") == depth]
        close = difflib.get_close_matches(written, same_depth, n=1, cutoff=0.6)
        if close:
            return f"unknown key '{written}'; did you mean '{close[0]}'?"
    parent, _, leaf = key.rpartition(".")
    parent_tp = _unwrap_optional(field_type(cls, parent)) if parent else cls
    msg = f"unknown key '{key}'"
    siblings = [f.name for f in dataclasses.fields(parent_tp)] if dataclasses.is_dataclass(parent_tp) else []
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if close:
        return msg + f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?"
    keys = all_keys(cls)
    by_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if by_leaf:
        return msg + f"; did you mean '{by_leaf[0]}'?"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if close:
        return msg + f"; did you mean '{close[0]}'?"
    where = f"'{parent}'" if parent else "the top level"
    return msg + f"; valid keys at {where}: {siblings}"


# --------------------------------------------------------------------------- #
# Parsing
# --------------------------------------------------------------------------- #
def _clear_readonly(node: Any) -> None:
    """Frozen dataclasses (ModelFamily) become read-only nodes; overrides must be able to set them."""
    if isinstance(node, DictConfig):
        OmegaConf.set_readonly(node, None)
        for k in node.keys():
            child = node._get_node(k)
            if isinstance(child, DictConfig):
                _clear_readonly(child)


def _merge_one(
    cls: type, base: DictConfig, other: DictConfig, origin: str, written: Optional[str] = None
) -> DictConfig:
    try:
        merged = OmegaConf.merge(base, other)
    except oc_errors.ConfigKeyError as e:
        msg = _unknown_key_message(cls, str(e.full_key or e.key), written)
        raise ConfigError(msg + f" ({origin}).") from None
    except oc_errors.ValidationError as e:
        key = str(e.full_key or e.key)
        value = OmegaConf.select(other, key, default=None)
        tp = field_type(cls, key)
        expected = _type_name(tp) if tp is not None else "a different type"
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {expected} ({origin}).") from None
    except oc_errors.OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{key}: {first} ({origin}).") from None
    _clear_readonly(merged)
    return merged


def _locate_failure(node: DictConfig, prefix: str) -> str:
    """Dotted key of the deepest section whose dataclass refuses to be built (for messages)."""
    for k in node.keys():
        child = node._get_node(k)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            key = f"{prefix}.{k}" if prefix else str(k)
            try:
                OmegaConf.to_object(child)
            except Exception:  # noqa: BLE001
                return _locate_failure(child, key)
    return prefix


def _parse_override(item: str, cls: Optional[type] = None) -> DictConfig:
    """One ``key=value`` as a config; values of ``str`` fields are kept verbatim (``trial_name=01``)."""
    raw = item
    if item.startswith("~"):
        raise ConfigError(f"override {raw!r}: deleting keys is not supported; set the key to null instead.")
    item = item.lstrip("+")
    key, sep, _ = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {raw!r} is malformed; expected key=value (e.g. model.optimizer.lr=1e-4).")
    key, value = key.strip(), item.partition("=")[2]
    tp = field_type(cls, key) if cls is not None else None
    if tp is not None and _unwrap_optional(tp) is str and not (value == "null" and _unwrap_optional(tp) is not tp):
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        node: Any = value
        for part in reversed(key.split(".")):
            node = {part: node}
        return OmegaConf.create(node)
    try:
        return OmegaConf.from_dotlist([item])
    except oc_errors.OmegaConfBaseException as e:
        raise ConfigError(f"override {raw!r} cannot be parsed: {str(e).splitlines()[0]}.") from None


def parse_quickstart(
    name: str,
    overrides: Sequence[str] = (),
    *,
    config_files: Sequence[str] = (),
    auto_trial_name: bool = True,
    validate: bool = True,
) -> Any:
    """Build and validate the config of experiment ``name`` from dotted overrides.

    :param name: a registered experiment ("sft", ...).
    :param overrides: ``key=value`` strings (``null`` = None; a leading ``+`` is ignored).
    :param config_files: YAML files merged before the overrides.
    :param auto_trial_name: fill ``trial_name`` with ``run<timestamp>`` if not given.
    :param validate: run the config's ``validate()``.
    :raises ConfigError: for any problem; the message names the key.
    """
    cls = get_quickstart_exp(name)
    cfg = OmegaConf.structured(cls)
    _clear_readonly(cfg)
    for path in config_files:
        try:
            loaded = OmegaConf.load(path)
        except (OSError, Exception) as e:  # noqa: BLE001 - YAML and IO errors
            raise ConfigError(f"--config {path!r} cannot be read: {str(e).splitlines()[0]}.") from None
        cfg = _merge_one(cls, cfg, loaded, f"from {path}")
    for item in overrides:
        written = item.lstrip("+").partition("=")[0].strip()
        cfg = _merge_one(cls, cfg, _parse_override(item, cls), f"from override {item!r}", written)
    field_names = {f.name for f in dataclasses.fields(cls)}
    if auto_trial_name and "trial_name" in field_names and OmegaConf.is_missing(cfg, "trial_name"):
        cfg.trial_name = default_trial_name()
    for key in ("experiment_name", "trial_name"):
        if key in field_names and OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{key} is required; pass e.g. {key}={'my-exp' if key == 'experiment_name' else 'run1'}.")
    check_finite_floats(OmegaConf.to_container(cfg, throw_on_missing=False))
    try:
        obj = OmegaConf.to_object(cfg)
    except oc_errors.MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} is required (it has no default).") from None
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a dataclass __post_init__ refused a value
        key = getattr(e, "full_key", None) or _locate_failure(cfg, "")
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{key}: {first}" if key else first) from None
    if validate:
        obj.validate()
    return obj


def format_config_help(name: str) -> str:
    cls = get_quickstart_exp(name)
    cfg = OmegaConf.structured(cls)
    return f"{name} ({cls.__module__}.{cls.__qualname__}); keys and defaults:\n" + OmegaConf.to_yaml(cfg)


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #
def _split_argv(argv: Sequence[str]):
    imports: List[str] = []
    configs: List[str] = []
    rest: List[str] = []
    want_help = False
    it = iter(argv)
    for a in it:
        if a in ("-h", "--help"):
            want_help = True
        elif a in ("--import", "--config"):
            value = next(it, None)
            if value is None:
                raise ConfigError(f"{a} needs a value.")
            (imports if a == "--import" else configs).append(value)
        elif a.startswith("--import=") or a.startswith("--config="):
            opt, _, value = a.partition("=")
            (imports if opt == "--import" else configs).append(value)
        elif a.startswith("--"):
            raise ConfigError(f"unknown option {a!r}; options are --import, --config and --help.")
        else:
            rest.append(a)
    return imports, configs, rest, want_help


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``<experiment> key=value ...``, validate, and launch via ``realhf.apps.main.main_start``.

    Returns the process exit code: 2 for configuration errors (one line on stderr).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        imports, configs, rest, want_help = _split_argv(argv)
        for spec in imports:
            import_user_module(spec)
        if not rest:
            _import_builtin_experiments()
            print(USAGE + f"\nregistered experiments: {QUICKSTART_EXPS.names()}")
            return 0 if want_help else 2
        name, overrides = rest[0], rest[1:]
        if name not in QUICKSTART_EXPS or name in _BUILTIN_DEFAULTS:
            _import_builtin_experiments()
        if want_help:
            print(format_config_help(name))
            return 0
        config = parse_quickstart(name, overrides, config_files=configs)
    except ConfigError as e:
        print("error: " + " ".join(str(e).split("\n")), file=sys.stderr)
        return 2
    try:
        app_main = importlib.import_module("realhf.apps.main")
    except ModuleNotFoundError as e:
        if e.name not in ("realhf.apps.main", "realhf.apps"):
            raise
        print("error: the launcher realhf.apps.main is not available in this installation; "
              "the configuration is valid but cannot be started.", file=sys.stderr)
        return 1
    start = getattr(app_main, "main_start", None)
    if start is None:
        print("error: realhf.apps.main has no main_start(config); cannot launch.", file=sys.stderr)
        return 1
    if not callable(getattr(config, "initial_setup", None)):
        print(f"error: {type(config).__name__} (experiment {name!r}) has no initial_setup() building its "
              "workers and dataflow graph, so it cannot be launched; register a full implementation "
              f"with register_quickstart_exp({name!r}, ...).", file=sys.stderr)
        return 1
    result = start(config)
    return result if isinstance(result, int) else 0


def quickstart_main() -> None:
    """Entry point for scripts that register their own experiments (reads sys.argv, exits)."""
    sys.exit(main(sys.argv[1:]))


__all__ = [
    "QUICKSTART_EXPS", "format_config_help", "get_quickstart_exp", "main", "parse_quickstart",
    "quickstart_main", "register_quickstart_exp",
]
