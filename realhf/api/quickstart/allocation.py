"""``allocation_mode``: how each model function call (MFC) is laid out.

Accepted values (``realhf-reference.md`` section 3):

* ``manual``: every MFC uses the experiment's own ``MFCConfig``
  (``allocation`` for SFT, ``actor_train`` ... for PPO); a ``device_mesh`` of
  None means the whole cluster.
* ``pipe_data``: dp = n_gpus_per_node, pp = n_nodes, tp = 1, whole cluster.
* ``pipe_model`` (default): dp = 1, pp = n_nodes, tp = n_gpus_per_node.
* ``d{D}p{P}m{M}`` in any letter order (``t`` is accepted for ``m``; an
  omitted letter means 1): the same layout for every MFC over the whole
  cluster; sequence parallelism is switched on for training MFCs when tp > 1.
* ``name:d4m2p1,*:d2p2m2``: one layout per MFC, ``*`` for all MFCs not named.
* ``heuristic``: the experiment's ``_heuristic_rpc_allocation()``.
* ``search``: :mod:`realhf.search` profiles the devices, searches per-MFC meshes and
  layouts with its cost model and prints the predicted step time.

Every layout must use exactly the devices of its mesh (the whole cluster is
``n_nodes * n_gpus_per_node`` devices; on CPU a device is a worker process).
"""

import dataclasses
import re
import socket
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence

from realhf.api.quickstart.base import ConfigError
from realhf.api.quickstart.model import MFCConfig, ParallelismConfig

NAMED_MODES = ("manual", "heuristic", "search", "pipe_data", "pipe_model")
_FORMS = (
    "manual, heuristic, pipe_data, pipe_model, a 3D layout such as d2p2m2 (letters d, p, m or t in any "
    "order), or per-MFC layouts such as 'trainDefault:d2m2,*:d4'"
)
_TOKEN = re.compile(r"([dpmt])(\d+)")


@dataclasses.dataclass
class AllocationMode:
    """Parsed ``allocation_mode``.

    :param kind: one of NAMED_MODES, "global" (one 3D layout for all MFCs)
        or "per_mfc".
    :param parallel: the layout of a "global" mode.
    :param per_mfc: MFC name (or "*") -> layout, for "per_mfc".
    """

    kind: str
    parallel: Optional[ParallelismConfig] = None
    per_mfc: Dict[str, ParallelismConfig] = dataclasses.field(default_factory=dict)


def parse_3d(spec: str, mode: str) -> ParallelismConfig:
    """``"d4p2m1"`` (any order, ``t`` = ``m``, missing letters = 1) -> ParallelismConfig."""
    pos, seen = 0, {}
    for m in _TOKEN.finditer(spec):
        if m.start() != pos:
            break
        letter = "m" if m.group(1) == "t" else m.group(1)
        if letter in seen:
            raise ConfigError(
                f"allocation_mode={mode!r}: the layout {spec!r} gives the "
                f"{'tensor (m/t)' if letter == 'm' else letter} size twice."
            )
        value = int(m.group(2))
        if value < 1:
            raise ConfigError(f"allocation_mode={mode!r}: sizes in {spec!r} must be >= 1.")
        seen[letter] = value
        pos = m.end()
    if not spec or pos != len(spec):
        raise ConfigError(f"allocation_mode={mode!r} is malformed at {spec!r}; expected {_FORMS}.")
    return ParallelismConfig(
        model_parallel_size=seen.get("m", 1),
        pipeline_parallel_size=seen.get("p", 1),
        data_parallel_size=seen.get("d", 1),
    )


def parse_allocation_mode(mode: str) -> AllocationMode:
    """Parse the syntax of ``allocation_mode`` (sizes are checked by :func:`resolve_allocations`)."""
    if not isinstance(mode, str) or not mode.strip():
        raise ConfigError(f"allocation_mode={mode!r} is empty; expected {_FORMS}.")
    mode_s = mode.strip()
    if mode_s in NAMED_MODES:
        return AllocationMode(kind=mode_s)
    if ":" not in mode_s:
        if "," in mode_s:
            raise ConfigError(
                f"allocation_mode={mode!r} is malformed: per-MFC layouts need 'name:layout' entries; "
                f"expected {_FORMS}."
            )
        return AllocationMode(kind="global", parallel=parse_3d(mode_s, mode))
    per_mfc: Dict[str, ParallelismConfig] = {}
    for entry in mode_s.split(","):
        name, sep, spec = entry.strip().partition(":")
        name, spec = name.strip(), spec.strip()
        if not sep or not name or not spec or ":" in spec:
            raise ConfigError(
                f"allocation_mode={mode!r} is malformed at {entry!r}; per-MFC entries are 'name:layout' "
                "separated by commas, e.g. 'actor_gen:d4m2p1,*:d2p2m2'."
            )
        if name in per_mfc:
            raise ConfigError(f"allocation_mode={mode!r} names MFC {name!r} twice.")
        per_mfc[name] = parse_3d(spec, mode)
    return AllocationMode(kind="per_mfc", per_mfc=per_mfc)


def _expand_nodelist(nodelist: str, key: str) -> List[str]:
    """``NODE[01-02,05],COM08`` -> [NODE01, NODE02, NODE05, COM08]."""
    names: List[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", nodelist):
        part = part.strip()
        m = re.fullmatch(r"([^\[\]]+)\[([0-9,\-]+)\]", part)
        if m is None:
            if not re.fullmatch(r"[A-Za-z0-9.\-]+", part):
                raise ConfigError(f"{key}={nodelist!r} is not a valid nodelist (e.g. NODE[01-02],COM08).")
            names.append(part)
            continue
        prefix = m.group(1)
        for rng in m.group(2).split(","):
            lo, _, hi = rng.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ConfigError(f"{key}={nodelist!r} is not a valid nodelist (e.g. NODE[01-02],COM08).")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                names.append(f"{prefix}{i:0{width}d}")
    if not names:
        raise ConfigError(f"{key}={nodelist!r} names no node.")
    return names


def local_host_names() -> List[str]:
    """Names that denote this machine: localhost, 127.0.0.1 and its host names."""
    names = ["localhost", "127.0.0.1"]
    for n in (socket.gethostname(), socket.getfqdn()):
        for v in (n, n.split(".")[0]):
            if v and v not in names:
                names.append(v)
    return names


def check_local_hosts(hosts: Sequence[str], key: str, value: str) -> None:
    """In ``mode=local`` every host named by ``key`` must be this machine."""
    local = local_host_names()
    foreign = [h for h in hosts if h not in local]
    if foreign:
        raise ConfigError(
            f"{key}={value!r} names host(s) {foreign}, but mode='local' runs on this machine only; use one of "
            f"{local} (or mode=ray / mode=slurm for other machines)."
        )


def device_mesh_size(device_mesh: Optional[str], n_nodes: int, n_gpus_per_node: int, key: str,
                     *, local: bool = False) -> int:
    """Number of devices of a mesh string (None = the whole cluster).

    ``local``: the run is ``mode=local``, so host names must denote this machine.
    """
    if device_mesh is None:
        return n_nodes * n_gpus_per_node
    mesh = device_mesh.strip()
    if ":" in mesh:
        host, _, ids = mesh.partition(":")
        try:
            devices = [int(x) for x in ids.split(",")]
        except ValueError:
            raise ConfigError(
                f"{key}={device_mesh!r} is malformed; expected 'host:i,j,...' with device indices."
            ) from None
        if not host or len(set(devices)) != len(devices) or not all(0 <= d < n_gpus_per_node for d in devices):
            raise ConfigError(
                f"{key}={device_mesh!r} must list distinct device indices in [0, n_gpus_per_node="
                f"{n_gpus_per_node}) of one host."
            )
        if local:
            check_local_hosts([host.strip()], key, device_mesh)
        return len(devices)
    nodes = _expand_nodelist(mesh, key)
    if local:
        check_local_hosts(nodes, key, device_mesh)
    if len(nodes) > n_nodes:
        raise ConfigError(f"{key}={device_mesh!r} names {len(nodes)} nodes but n_nodes={n_nodes}.")
    return len(nodes) * n_gpus_per_node


def check_parallel_fits(parallel: ParallelismConfig, real_config: Any, key: str) -> None:
    """Raise ConfigError if ``parallel`` cannot split the model ``real_config``.

    ``key`` is the dotted key of the layout, e.g. ``allocation.parallel``.
    Tensor parallelism must divide the query heads, the MLP width and the
    vocabulary (KV heads that tp does not divide are replicated, as in
    GQA/MQA); the pipeline cannot have more stages than layers (blocks plus
    embedding and head).
    """
    tp = parallel.model_parallel_size
    tp_key = f"{key}.model_parallel_size"
    if tp > 1:
        for name in ("n_q_heads", "intermediate_dim", "vocab_size"):
            value = getattr(real_config, name)
            if value % tp != 0:
                raise ConfigError(f"{tp_key}={tp} does not divide {name}={value} of the model.")
        if getattr(real_config, "mlp_type", None) == "moe":
            raise ConfigError(f"{tp_key}={tp}: tensor parallelism of MoE models is not supported; use 1.")
        if getattr(real_config, "qk_layernorm", False):
            raise ConfigError(
                f"{tp_key}={tp}: tensor parallelism with per-head q/k norms (qwen3) is not supported; use 1."
            )
    pp = parallel.pipeline_parallel_size
    n_total = real_config.n_layers + 2
    if pp > n_total:
        raise ConfigError(
            f"{key}.pipeline_parallel_size={pp} exceeds the {n_total} layers of the model "
            f"(n_layers={real_config.n_layers} blocks + embedding + head)."
        )


def _with_n_mbs(parallel: ParallelismConfig, base: Optional[MFCConfig], sp: bool) -> MFCConfig:
    p = dataclasses.replace(parallel, use_sequence_parallel=sp)
    return MFCConfig(n_mbs=base.n_mbs if base is not None else None,
                     max_tokens_per_mb=base.max_tokens_per_mb if base is not None else None, parallel=p,
                     device_mesh=None, cpu_threads=base.cpu_threads if base is not None else None)


def _warn_oversubscribed_threads(allocs: Mapping[str, MFCConfig], keys: Mapping[str, str], n_nodes: int,
                                 gpn: int) -> None:
    """A CPU worker is one core: ``cpu_threads`` on a mesh that leaves no other worker of its node
    idle puts more threads than cores on the node (its helper threads spin between products)."""
    for name, alloc in allocs.items():
        threads = alloc.cpu_threads or 1
        if threads <= 1:
            continue
        world = alloc.parallel.world_size
        per_node = world if world <= gpn else -(-world // n_nodes)  # a mesh within a node, or spread evenly
        if per_node * threads > gpn:
            warnings.warn(
                f"{keys.get(name, name)}.cpu_threads={threads} on {per_node} of the {gpn} workers of a node runs "
                f"{per_node * threads} threads for {gpn} CPU workers; give it a mesh that leaves "
                f"{per_node * (threads - 1)} workers idle during the call, or fewer threads.", stacklevel=2)


def resolve_allocations(
    cfg: Any,
    mfc_names: Sequence[str],
    *,
    train_mfc_names: Sequence[str] = (),
    model_configs: Optional[Mapping[str, Any]] = None,
    allocation_keys: Optional[Mapping[str, str]] = None,
) -> Dict[str, MFCConfig]:
    """Per-MFC allocations of an experiment config.

    :param cfg: a ``CommonExperimentConfig`` (reads ``allocation_mode``,
        ``n_nodes``, ``n_gpus_per_node`` and, for ``manual`` and ``n_mbs``,
        its ``allocations`` dict; ``heuristic`` calls its
        ``_heuristic_rpc_allocation()``).
    :param mfc_names: the experiment's MFC names.
    :param train_mfc_names: MFCs that train (sequence parallel when tp > 1 in 3D modes).
    :param model_configs: MFC name -> ReaLModelConfig, to check that layouts fit.
    :param allocation_keys: MFC name -> dotted config key of its MFCConfig
        (used in messages; default: the MFC name).
    """
    mode_str = cfg.allocation_mode
    mode = parse_allocation_mode(mode_str)
    n_nodes, gpn = cfg.n_nodes, cfg.n_gpus_per_node
    n_workers = n_nodes * gpn
    existing: Dict[str, MFCConfig] = dict(getattr(cfg, "allocations", {}) or {})
    keys = {n: (allocation_keys or {}).get(n, n) for n in mfc_names}
    out: Dict[str, MFCConfig] = {}

    if mode.kind == "search":
        from realhf.search.quickstart import search_allocations

        out = search_allocations(cfg, mfc_names, train_mfc_names)[0]
    elif mode.kind == "heuristic":
        fn = getattr(cfg, "_heuristic_rpc_allocation", None)
        if fn is None:
            raise ConfigError(
                f"allocation_mode='heuristic' is not defined for {type(cfg).__name__}; "
                "use manual, pipe_data, pipe_model or a 3D layout such as d2p1m1."
            )
        out = dict(fn())
    elif mode.kind == "manual":
        missing = [n for n in mfc_names if n not in existing]
        if missing:
            raise ConfigError(
                f"allocation_mode='manual' needs an allocation for every MFC; missing: {missing}."
            )
        for name in mfc_names:
            alloc = existing[name]
            key = keys[name]
            alloc.validate(key)
            size = device_mesh_size(alloc.device_mesh, n_nodes, gpn, f"{key}.device_mesh",
                                    local=getattr(cfg, "mode", None) == "local")
            if alloc.parallel.world_size != size:
                where = "the whole cluster" if alloc.device_mesh is None else f"device_mesh={alloc.device_mesh!r}"
                raise ConfigError(
                    f"{key}.parallel={alloc.parallel} uses {alloc.parallel.world_size} devices but {where} has "
                    f"{size} (n_nodes={n_nodes} x n_gpus_per_node={gpn}); make model_parallel_size x "
                    f"pipeline_parallel_size x data_parallel_size equal {size}."
                )
            out[name] = alloc
    else:
        if mode.kind == "pipe_data":
            layouts = {n: ParallelismConfig(1, n_nodes, gpn) for n in mfc_names}
            sp_ok = False
        elif mode.kind == "pipe_model":
            layouts = {n: ParallelismConfig(gpn, n_nodes, 1) for n in mfc_names}
            sp_ok = False
        elif mode.kind == "global":
            layouts = {n: mode.parallel for n in mfc_names}
            sp_ok = True
        else:  # per_mfc
            unknown = [n for n in mode.per_mfc if n != "*" and n not in mfc_names]
            if unknown:
                raise ConfigError(
                    f"allocation_mode={mode_str!r} names unknown MFC(s) {unknown}; "
                    f"this experiment's MFCs are {list(mfc_names)} ('*' = all others)."
                )
            layouts = {}
            for n in mfc_names:
                p = mode.per_mfc.get(n, mode.per_mfc.get("*"))
                if p is None:
                    raise ConfigError(
                        f"allocation_mode={mode_str!r} gives no layout for MFC {n!r}; "
                        "name it or add a '*:...' default."
                    )
                layouts[n] = p
            sp_ok = True
        for name, p in layouts.items():
            if p.world_size != n_workers:
                raise ConfigError(
                    f"allocation_mode={mode_str!r}: layout {p} of MFC {name!r} has d*p*m={p.world_size} but "
                    f"the cluster has {n_workers} workers (n_nodes={n_nodes} x n_gpus_per_node={gpn})."
                )
            sp = sp_ok and p.model_parallel_size > 1 and name in train_mfc_names
            out[name] = _with_n_mbs(p, existing.get(name), sp)

    _warn_oversubscribed_threads(out, keys, n_nodes, gpn)
    if model_configs:
        for name, alloc in out.items():
            real_cfg = model_configs.get(name)
            if real_cfg is None:
                continue
            if mode.kind == "manual":
                key = f"{keys[name]}.parallel"
            else:
                key = f"allocation_mode={mode_str!r} for MFC {name!r}: parallel"
            check_parallel_fits(alloc.parallel, real_cfg, key)
    return out


__all__ = [
    "AllocationMode", "NAMED_MODES", "check_local_hosts", "check_parallel_fits", "device_mesh_size",
    "local_host_names", "parse_3d",
    "parse_allocation_mode", "resolve_allocations",
]
