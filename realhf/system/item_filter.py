"""Filter + refill of a step's batch (``MFCDef.input_filter``): the master's planning side.

A graph with a filtered call splits into two phases per step:

* the *producers*: the calls writing the filter's keys and everything they
  depend on (e.g. ``actor_gen`` and ``rew_inf`` for DAPO's dynamic
  sampling). They run on a batch of prompts, the filter runs where the
  items live, and while too few items passed the master draws another batch
  from the dataloader and runs the producers again on it, one round after
  the other (each round is a normal concurrent walk of those calls, so
  calls still go only to their meshes and every worker sees its requests
  in one order: the results do not depend on timing, only on the seed);
* the *rest*: every other call (the filtered call, a reference model,
  ...), once, on the items kept (``n_seqs`` of the filtered call, or all
  that passed when the cap on rounds was reached).

Calls on one model role keep graph order, so a producer may not come after
another call of its role that is not a producer (it would have to run
before it in every round): :func:`filter_phases` refuses such graphs.
The filter needs every key of an item on one rank: :func:`filter_plan`
picks the rank holding most of them (the owner of the first key first) and
plans transfers of the others to it.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import networkx as nx

from realhf.api.core.dfg import GraphError, MFCDef

Transfer = Tuple[int, List[int], List[Any], List[str]]


@dataclasses.dataclass
class FilterPhases:
    """The filtered call, the calls re-run each round (graph order) and the calls run once after."""

    call: MFCDef
    producers: List[MFCDef]
    rest: List[MFCDef]


def filter_phases(order: Sequence[MFCDef], graph: nx.DiGraph) -> Optional[FilterPhases]:
    """Split the calls (``order``: graph order) around the call with an input filter; None without one."""
    filtered = [r for r in order if r.input_filter is not None]
    if not filtered:
        return None
    call = filtered[0]
    keys = set(call.input_filter.keys)
    sources = {p for p in graph.predecessors(call.name) if keys & set(graph.edges[p, call.name]["keys"])}
    names = set(sources)
    for s in sources:
        names |= nx.ancestors(graph, s)
    producers = [r for r in order if r.name in names]
    rest = [r for r in order if r.name not in names]
    for late in producers:
        early = [r.name for r in rest if r.role == late.role and order.index(r) < order.index(late)]
        if early:
            raise GraphError(f"MFC {late.name} produces what input_filter {call.input_filter.name!r} of "
                             f"{call.name} reads, so it is re-run to refill the batch; but {early} on the same "
                             f"role {late.role!r} come before it and are not part of the refill.")
    return FilterPhases(call, producers, rest)


def filter_plan(keys: Sequence[str], ids: Sequence[Any], holders: Dict[Any, Dict[str, List[int]]]
                ) -> Tuple[List[Transfer], Dict[int, List[Any]]]:
    """Where to run the filter on each item, and the transfers that bring it every key first.

    ``holders[id][key]``: ranks holding the key (first = owner); updated with
    the planned copies. Returns ``(transfers as (src, dsts, ids, keys),
    {rank: ids it filters})``.
    """
    plan: Dict[Tuple[int, int, Tuple[str, ...]], List[Any]] = defaultdict(list)
    by_rank: Dict[int, List[Any]] = defaultdict(list)
    for i in ids:
        held = holders[i]
        missing = [k for k in keys if k not in held]
        if missing:
            raise RuntimeError(f"The input filter needs keys {missing} of item {i!r}, which nobody holds.")
        dst = max(held[keys[0]], key=lambda r: sum(r in held[k] for k in keys))  # ties: the first, the owner
        per_src: Dict[int, List[str]] = defaultdict(list)
        for k in keys:
            if dst not in held[k]:
                per_src[held[k][0]].append(k)
                held[k].append(dst)
        for src, ks in per_src.items():
            plan[(src, dst, tuple(ks))].append(i)
        by_rank[dst].append(i)
    transfers = [(src, [dst], list(v), list(ks)) for (src, dst, ks), v in plan.items()]
    return transfers, dict(by_rank)


def choose_items(passed: Sequence[Any], failed: Sequence[Any], drawn: Sequence[Any], need: int,
                 at_least: int) -> List[Any]:
    """The items the calls after the filter get, in draw order: the first ``need`` that passed.

    When fewer passed than ``at_least`` (every dp rank of every later call
    needs an item), the first failed ones make up the difference: the
    filtered call's interface must tolerate them (grpo_actor masks groups of
    equal rewards out of its loss anyway).
    """
    chosen = list(passed[:need])
    if len(chosen) < at_least:
        chosen += list(failed[:at_least - len(chosen)])
    rank = {i: n for n, i in enumerate(drawn)}
    return sorted(chosen, key=rank.__getitem__)


__all__ = ["FilterPhases", "choose_items", "filter_phases", "filter_plan"]
