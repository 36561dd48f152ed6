"""Model function calls (MFCs), the dataflow graph over them, and their hooks.

An experiment is a set of :class:`MFCDef`: each names the model replica it
runs on, what it does (generate / inference / train_step), the algorithm
(``interface_impl``), and the data keys it reads and writes. :func:`build_graph`
connects the producer of every key to its consumers; keys nobody produces
come from the dataset. The master worker walks this graph once per step.

Hooks a model function call carries around its execution:

A trainable role is instantiated only on its train replica; a call of that
role on another layout first pulls the parameters into its own replica
(``ParamReallocHook(source=train replica)``) and gives them back afterwards
(``ParamReallocHook(target=train replica)``: the optimizer keeps the train
replica's tensors, so "back" only drops the copy). Frozen roles whose meshes
are shared with other calls free their memory after each call
(``OffloadHook``). A custom hook ``ParamReallocHook(target=ref, eta=...)``
after the actor's train call makes a reference model trail the actor by EMA.

The master worker attaches the hooks as pre- or post-hooks of a call; model
workers execute them.

A call may also take only the items that pass a filter and have its batch
refilled (:class:`ItemFilter`, ``MFCDef.input_filter``; DAPO's dynamic
sampling): the calls producing the filter's keys run round after round on
fresh prompts until ``n_seqs`` items pass; see :mod:`realhf.system.item_filter`.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Union

import networkx as nx

from realhf.api.core.config import ModelFamily, ModelInterfaceAbstraction, ModelInterfaceType, ModelName
from realhf.base import cpu_threads

# The documented customization code writes ``dfg.ModelInterface("name")``.
ModelInterface = ModelInterfaceAbstraction


def _as_model_name(value: Union[None, str, ModelName], field: str) -> Optional[ModelName]:
    if value is None or isinstance(value, ModelName):
        return value
    if isinstance(value, str):
        return ModelName.parse(value)
    raise TypeError(f"ParamReallocHook.{field} must be a ModelName or 'role@replica', got {type(value).__name__}.")


@dataclasses.dataclass(frozen=True)
class ParamReallocHook:
    """Move parameters between the call's model and another replica.

    Exactly one of ``source`` (pull from it before/after the call into the
    call's model) and ``target`` (push the call's model into it) is set.
    ``eta`` < 1 blends instead of copying: ``target = eta * source + (1 - eta) * target``.
    """

    source: Optional[ModelName] = None
    target: Optional[ModelName] = None
    eta: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "source", _as_model_name(self.source, "source"))
        object.__setattr__(self, "target", _as_model_name(self.target, "target"))
        if (self.source is None) == (self.target is None):
            raise ValueError("ParamReallocHook needs exactly one of source= and target=.")
        if not 0.0 < float(self.eta) <= 1.0:
            raise ValueError(f"ParamReallocHook.eta must be in (0, 1], got {self.eta}.")


@dataclasses.dataclass(frozen=True)
class OffloadHook:
    """Release the call's model parameter memory after the call; the next call reloads it."""


RPCHook = Union[ParamReallocHook, OffloadHook]


@dataclasses.dataclass(frozen=True)
class ItemFilter:
    """Which items a call takes, and how hard the master tries to fill its batch with them.

    ``name`` is a filter function registered with
    :func:`realhf.api.core.model_api.register_item_filter`:
    ``fn(sample, **args) -> one bool per item`` (True = keep), deciding each
    item on its own (items are filtered where they live, a few per rank).
    It reads ``keys``, which must be input keys of the call.

    The calls that produce ``keys`` (and everything they depend on) run on
    the step's batch, the filter drops items, and while fewer than the call's
    ``n_seqs`` items passed the master draws another batch from the
    dataloader and runs those calls again on it; the filtered call and every
    other call then run once on exactly ``n_seqs`` passing items (the first
    ones, in draw order). ``max_rounds`` caps the batches drawn per step, the
    first included (0: no cap; the refill also stops when a batch brings no
    prompt this step has not drawn yet); when it is reached the calls run on
    the items that passed.
    """

    name: str
    keys: Sequence[str]
    args: Dict[str, Any] = dataclasses.field(default_factory=dict)
    max_rounds: int = 0

    def __post_init__(self):
        object.__setattr__(self, "keys", tuple(self.keys))
        if not self.keys:
            raise GraphError(f"ItemFilter {self.name!r} reads no key; name the keys it decides on.")
        if not isinstance(self.max_rounds, int) or self.max_rounds < 0:
            raise GraphError(f"ItemFilter {self.name!r}: max_rounds must be an int >= 0 (0: no cap), "
                             f"got {self.max_rounds!r}.")


class GraphError(ValueError):
    """The MFCs do not form a valid dataflow graph."""


@dataclasses.dataclass
class MFCDef:
    """One model function call: a node of the dataflow graph.

    :param name: unique name of the call (e.g. ``actor_gen``).
    :param n_seqs: sequences per call (the batch size of a step).
    :param interface_type: generate, inference, train_step or evaluate.
    :param interface_impl: the registered interface and its arguments.
    :param model_name: the replica it runs on (``"actor"`` means ``actor@0``).
    :param input_keys / output_keys: data keys read / written.
    :param input_key_remap / output_key_remap: renames between the graph's
        keys and the interface's (graph key -> interface key for inputs,
        interface key -> graph key for outputs).
    :param n_mbs: micro-batches per call (None: one, or the pipeline default).
    :param max_tokens_per_mb: token budget of one micro-batch (None: no budget); with it the
        call uses at least as many micro-batches as the budget needs.
    :param cpu_threads: threads the native kernels of the call use on each CPU
        worker (None: one; see ``realhf.base.cpu_threads``).
    :param balanced_dp: equal numbers of sequences per dp rank (else token-balanced).
    :param log_return_value: log the call's returned statistics.
    :param pre_hooks / post_hooks: hooks run before / after the call.
    :param input_filter: take only items passing this filter and refill the
        batch (:class:`ItemFilter`; at most one call of a graph has one).
    """

    name: str
    n_seqs: int
    interface_type: ModelInterfaceType
    interface_impl: ModelInterfaceAbstraction
    model_name: Union[str, ModelName]
    input_keys: Sequence[str] = ()
    input_key_remap: Dict[str, str] = dataclasses.field(default_factory=dict)
    output_keys: Sequence[str] = ()
    output_key_remap: Dict[str, str] = dataclasses.field(default_factory=dict)
    n_mbs: Optional[int] = None
    max_tokens_per_mb: Optional[int] = None
    cpu_threads: Optional[int] = None
    balanced_dp: bool = False
    log_return_value: bool = False
    model_type: Optional[ModelFamily] = None
    model_path: Optional[str] = None
    pre_hooks: List[RPCHook] = dataclasses.field(default_factory=list)
    post_hooks: List[RPCHook] = dataclasses.field(default_factory=list)
    input_filter: Optional[ItemFilter] = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise GraphError(f"MFCDef.name must be a non-empty string, got {self.name!r}.")
        self.model_name = ModelName.parse(self.model_name)
        if isinstance(self.interface_type, str):
            try:
                self.interface_type = ModelInterfaceType(self.interface_type)
            except ValueError:
                allowed = [t.value for t in ModelInterfaceType]
                raise GraphError(f"MFC {self.name}: interface_type {self.interface_type!r} not in {allowed}.") from None
        if isinstance(self.interface_impl, str):
            self.interface_impl = ModelInterfaceAbstraction(self.interface_impl)
        if not isinstance(self.n_seqs, int) or self.n_seqs < 1:
            raise GraphError(f"MFC {self.name}: n_seqs must be a positive int, got {self.n_seqs!r}.")
        if self.n_mbs is not None and (not isinstance(self.n_mbs, int) or self.n_mbs < 1):
            raise GraphError(f"MFC {self.name}: n_mbs must be None or a positive int, got {self.n_mbs!r}.")
        if self.max_tokens_per_mb is not None and (not isinstance(self.max_tokens_per_mb, int)
                                                   or self.max_tokens_per_mb < 1):
            raise GraphError(f"MFC {self.name}: max_tokens_per_mb must be None or a positive int, "
                             f"got {self.max_tokens_per_mb!r}.")
        try:
            cpu_threads.check(self.cpu_threads)
        except ValueError as e:
            raise GraphError(f"MFC {self.name}: {e}") from None
        self.input_keys = tuple(self.input_keys)
        self.output_keys = tuple(self.output_keys)
        for k in self.input_key_remap:
            if k not in self.input_keys:
                raise GraphError(f"MFC {self.name}: input_key_remap renames {k!r}, which is not an input key.")
        if self.input_filter is not None:
            extra = [k for k in self.input_filter.keys if k not in self.input_keys]
            if extra:
                raise GraphError(f"MFC {self.name}: input_filter {self.input_filter.name!r} reads {extra}, which "
                                 f"are not input keys of the call {list(self.input_keys)}.")
        self._G: Optional[nx.DiGraph] = None

    # ------------------------------------------------------------- graph view
    def _graph(self) -> nx.DiGraph:
        if self._G is None:
            raise GraphError(f"MFC {self.name} is not part of a graph yet; call build_graph first.")
        return self._G

    @property
    def role(self) -> str:
        return self.model_name.role

    @property
    def is_train(self) -> bool:
        return self.interface_type == ModelInterfaceType.TRAIN_STEP

    @property
    def parents(self) -> List["MFCDef"]:
        g = self._graph()
        return [g.nodes[n]["mfc"] for n in g.predecessors(self.name)]

    @property
    def children(self) -> List["MFCDef"]:
        g = self._graph()
        return [g.nodes[n]["mfc"] for n in g.successors(self.name)]

    @property
    def is_src(self) -> bool:
        return len(self.parents) == 0

    @property
    def is_dst(self) -> bool:
        return len(self.children) == 0

    def all_successors(self) -> List["MFCDef"]:
        g = self._graph()
        return [g.nodes[n]["mfc"] for n in nx.descendants(g, self.name)]

    @property
    def is_dst_of_model_role(self) -> bool:
        """No later call in the graph uses the same role (the role's last call of a step)."""
        return all(c.role != self.role for c in self.all_successors())

    @property
    def data_producers(self) -> Dict[str, ModelName]:
        """Input key -> replica producing it (keys from the dataset are absent)."""
        g = self._graph()
        out = {}
        for p in g.predecessors(self.name):
            for k in g.edges[p, self.name]["keys"]:
                out[k] = g.nodes[p]["mfc"].model_name
        return out

    def __hash__(self) -> int:
        return hash(self.name)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, MFCDef) and other.name == self.name


def _produced_keys(rpc: MFCDef) -> List[str]:
    return [rpc.output_key_remap.get(k, k) for k in rpc.output_keys]


def build_graph(rpcs: Sequence[MFCDef], dataset_keys: Optional[Iterable[str]] = None) -> nx.DiGraph:
    """Connect every key's producer to its consumers and check the result.

    :param dataset_keys: keys the dataset provides; when given, an input key
        that no MFC produces and the dataset lacks is an error.
    Raises :class:`GraphError` for duplicate names, a key produced twice, two
    train calls on one role, two calls with an input filter, a missing key,
    or a cycle.
    """
    rpcs = list(rpcs)
    names = [r.name for r in rpcs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise GraphError(f"Duplicate MFC names: {dup}.")
    filtered = [r.name for r in rpcs if r.input_filter is not None]
    if len(filtered) > 1:
        raise GraphError(f"MFCs {filtered} each have an input_filter; a step's batch is filtered at most once.")
    trains: Dict[str, str] = {}
    for r in rpcs:
        if r.is_train:
            if r.role in trains:
                raise GraphError(
                    f"Role {r.role!r} has two train calls ({trains[r.role]} and {r.name}); "
                    "a role is trained by at most one MFC."
                )
            trains[r.role] = r.name
    producer: Dict[str, str] = {}
    for r in rpcs:
        for k in _produced_keys(r):
            if k in producer:
                raise GraphError(f"Key {k!r} is produced by both {producer[k]} and {r.name}.")
            producer[k] = r.name
    g = nx.DiGraph()
    for r in rpcs:
        g.add_node(r.name, mfc=r)
    provided: Optional[Set[str]] = None if dataset_keys is None else set(dataset_keys)
    for r in rpcs:
        for k in r.input_keys:
            src = producer.get(k)
            if src is None:
                if provided is not None and k not in provided:
                    known = sorted(set(producer) | provided)
                    hint = difflib.get_close_matches(k, known, n=1)
                    extra = f" Did you mean {hint[0]!r}?" if hint else ""
                    raise GraphError(
                        f"MFC {r.name} reads key {k!r}, which no MFC produces and the dataset does not provide "
                        f"(dataset keys: {sorted(provided)}).{extra}"
                    )
                continue
            if src == r.name:
                raise GraphError(f"MFC {r.name} reads its own output {k!r}.")
            if g.has_edge(src, r.name):
                g.edges[src, r.name]["keys"].append(k)
            else:
                g.add_edge(src, r.name, keys=[k])
    if not nx.is_directed_acyclic_graph(g):
        cycle = nx.find_cycle(g)
        raise GraphError("The MFCs form a cycle: " + " -> ".join(e[0] for e in cycle) + f" -> {cycle[0][0]}.")
    for r in rpcs:
        r._G = g
    return g
