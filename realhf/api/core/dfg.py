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
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Union

import networkx as nx

from realhf.api.core.config import ModelFamily, ModelInterfaceAbstraction, ModelInterfaceType, ModelName

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
    :param balanced_dp: equal numbers of sequences per dp rank (else token-balanced).
    :param log_return_value: log the call's returned statistics.
    :param pre_hooks / post_hooks: hooks run before / after the call.
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
    balanced_dp: bool = False
    log_return_value: bool = False
    model_type: Optional[ModelFamily] = None
    model_path: Optional[str] = None
    pre_hooks: List[RPCHook] = dataclasses.field(default_factory=list)
    post_hooks: List[RPCHook] = dataclasses.field(default_factory=list)

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
        self.input_keys = tuple(self.input_keys)
        self.output_keys = tuple(self.output_keys)
        for k in self.input_key_remap:
            if k not in self.input_keys:
                raise GraphError(f"MFC {self.name}: input_key_remap renames {k!r}, which is not an input key.")
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
    train calls on one role, a missing key, or a cycle.
    """
    rpcs = list(rpcs)
    names = [r.name for r in rpcs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise GraphError(f"Duplicate MFC names: {dup}.")
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
