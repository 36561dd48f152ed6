"""Master worker: walks the dataflow graph once per step and drives the model workers.

The master holds only metadata. Per step it asks the data heads for the
next batch (``fetch``); then every call whose dependencies are done is
issued at once: its pre-hooks (parameter reallocation), the transfer of its
inputs (tensors go worker to worker, never through the master; items are
assigned to the call's dp ranks, each data head keeping its own items on
the source model, elsewhere spread to balance tokens), the call itself
(``mfc``) and its post-hooks. Each request goes only to the ranks that take
part in it (the call's mesh, a transfer's senders and receivers, a hook's
layouts), so calls on disjoint meshes run at the same time, and a transfer
for one call overlaps another call's compute. Calls on one model role keep
graph order, so they see parameters in version order. When a call's replies
are in, the master records where its outputs live and issues what became
ready. Per-call start/end (the workers' clocks, relative to the step start)
go to ``StepLog.timing``. After each step: save / evaluate triggers, a log
line, and the step's items are dropped.

A call with an ``input_filter`` (DAPO's dynamic sampling) gets its batch
refilled: the calls producing the filter's keys run round after round on
further batches from the dataloader until enough items pass, then the other
calls run once on the items kept (:mod:`realhf.system.item_filter`; the
filtered call's statistics gain ``filter_rounds``, ``filter_passed``,
``filter_dropped`` and ``filter_items``; repeated calls time as
``name#round``).

:class:`MasterCore` is transport-agnostic (:mod:`realhf.system.transport`):
``submit(ranks, handle, data)`` / ``wait_any(tickets)`` for operations,
``call_all(handle, data)`` for requests every worker answers (each picks its
own part, e.g. its dp rank's ids). Failures and timeouts raise.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import pickle
import time
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import networkx as nx

from realhf.api.core.config import ModelName
from realhf.api.core.data_api import SequenceSample
from realhf.api.core.dfg import MFCDef
from realhf.api.core.model_api import FinetuneSpec
from realhf.api.core.system_api import ExperimentConfig
from realhf.base import constants, logging, timeutil
from realhf.system.item_filter import choose_items, filter_phases, filter_plan
from realhf.system.model_worker import data_head_ranks, source_rpc
from realhf.system.stats_sinks import TensorboardSink, make_wandb_sink
from realhf.system.trial_files import describe_layouts
from realhf.system.transport import PipeTransport, Ticket, WorkerTransport  # noqa: F401  (re-exported)
from realhf.system.watchdog import check_finite_stats

logger = logging.getLogger("master_worker")


@dataclasses.dataclass
class _Item:
    """Where the keys of one sample item live: key -> ranks holding it (first = owner)."""

    lengths: Dict[str, int]
    holders: Dict[str, List[int]]


def assign_by_load(ids: List[Any], size: Dict[Any, int], n_parts: int,
                   local: Callable[[Any, int], int]) -> List[List[Any]]:
    """Split ``ids`` over ``n_parts`` dp ranks: data stays where it is, loads within one item.

    An item goes to the rank holding most of it (``local(item, rank)``; the
    least loaded one on ties), items held nowhere longest first onto the least
    loaded rank; then, while the most and least loaded ranks differ by more
    than the largest item, the item of the former that best halves the gap
    moves to the latter (each move shrinks the sum of squared loads, so this
    ends). E.g. generation -> reward on the same ranks moves nothing unless
    the generated lengths are unbalanced. Each part keeps the order of ``ids``.
    """
    load = [0] * n_parts
    parts: List[List[Any]] = [[] for _ in range(n_parts)]

    def put(i: Any, j: int) -> None:
        parts[j].append(i)
        load[j] += size[i]

    by_size = sorted(ids, key=lambda i: -size[i])
    homeless = []
    for i in by_size:
        held = [local(i, j) for j in range(n_parts)]
        if max(held) > 0:
            put(i, min(range(n_parts), key=lambda j: (-held[j], load[j], j)))
        else:
            homeless.append(i)
    for i in homeless:
        put(i, min(range(n_parts), key=lambda j: (load[j], len(parts[j]), j)))
    slack = size[by_size[0]] if by_size else 0
    while True:
        hi = max(range(n_parts), key=lambda j: (load[j], -j))
        lo = min(range(n_parts), key=lambda j: (load[j], j))
        gap = load[hi] - load[lo]
        movable = [i for i in parts[hi] if 0 < size[i] < gap]
        if gap <= slack or not movable:
            break
        i = min(movable, key=lambda i: abs(gap - 2 * size[i]))
        parts[hi].remove(i)
        load[hi] -= size[i]
        put(i, lo)
    order = {i: n for n, i in enumerate(ids)}
    return [sorted(p, key=order.__getitem__) for p in parts]


@dataclasses.dataclass
class StepLog:
    """One finished step. Every count is 1-based, in the log line, stats.jsonl and checkpoint names
    alike: the first step is epoch 1, step 1, global step 1."""

    epoch: int
    epoch_step: int
    global_step: int
    seconds: float
    n_tokens: int
    stats: Dict[str, Dict[str, float]]
    timing: Dict[str, Dict[str, float]] = dataclasses.field(default_factory=dict)


class MasterCore:
    """Runs an experiment to completion over ``transport``; see the module docstring."""

    def __init__(self, cfg: ExperimentConfig, transport: WorkerTransport, experiment_name: str,
                 trial_name: str, recover_dir: Optional[str] = None, save_recover_states: bool = False,
                 resume: bool = True, concurrent: bool = True):
        self.cfg = cfg
        self.t = transport
        self.concurrent = concurrent
        self.exp, self.trial = experiment_name, trial_name
        self.order = [next(r for r in cfg.model_rpcs if r.name == n) for n in nx.topological_sort(cfg.graph)]
        self._by_name = {r.name: r for r in cfg.model_rpcs}
        self.src = source_rpc(cfg)
        self.heads = data_head_ranks(cfg, self.src.model_name)
        ctl = cfg.exp_ctrl
        self.save_ctl = timeutil.EpochStepTimeFreqCtl(ctl.save_freq_epochs, ctl.save_freq_steps, ctl.save_freq_secs)
        self.eval_ctl = timeutil.EpochStepTimeFreqCtl(ctl.eval_freq_epochs, ctl.eval_freq_steps, ctl.eval_freq_secs)
        self.epoch = self.epoch_step = self.global_step = 0
        self.recover_dir = recover_dir
        self.save_recover_states = save_recover_states
        self.resume = resume  # load the state in recover_dir (False: recover_dir is only written)
        self.history: List[StepLog] = []
        self.cache_clears: List[int] = []  # global steps after which workers emptied their CUDA cache
        self.filtered = filter_phases(self.order, cfg.graph)
        # every dp rank of every call needs an item (the loader's rule for a trailing batch)
        self._min_items = max(self.cfg.model_layouts[r.model_name].topology.get_dim("data") for r in self.order)

    # ----------------------------------------------------------------- layout
    def _dp_ranks(self, name: ModelName) -> List[List[int]]:
        """Global ranks of each dp group of ``name`` (all its tp and pp ranks)."""
        layout = self.cfg.model_layouts[name]
        topo = layout.topology
        out: List[List[int]] = [[] for _ in range(topo.get_dim("data"))]
        for local in range(topo.world_size()):
            out[topo.get_coord(local).data].append(layout.to_global(local))
        return out

    def _last_stage_ranks(self, name: ModelName, dp_rank: int) -> List[int]:
        layout = self.cfg.model_layouts[name]
        topo = layout.topology
        pp = topo.get_dim("pipe")
        return [layout.to_global(topo.get_rank(pipe=pp - 1, data=dp_rank, model=t))
                for t in range(topo.get_dim("model"))]

    # ------------------------------------------------------------------ setup
    def initialize(self) -> FinetuneSpec:
        sizes = [s for s in self.t.call_all("spec") if s is not None]
        if not sizes:
            raise RuntimeError("No data head reported a dataset; check the model workers' datasets.")
        spec = FinetuneSpec(self.cfg.exp_ctrl.total_train_epochs, sum(sizes), self.src.n_seqs)
        for name in self.cfg.model_layouts:
            self.t.call_all("initialize", {"model_name": name, "ft_spec": spec})
        self.ft_spec = spec
        return spec

    # ------------------------------------------------------------------- data
    def _fetch(self, skip: Optional[Set[Any]] = None
               ) -> Tuple[Dict[Any, _Item], Dict[int, List[Any]], bool]:
        """The next batch's items, their ids per data head, and whether the epoch ended.
        ``skip``: ids the heads leave out (already drawn in this step, by a refill)."""
        replies = self.t.call_all("fetch", {"skip": set(skip)} if skip else None)
        items: Dict[Any, _Item] = {}
        by_head: Dict[int, List[Any]] = {}
        epoch_done = False
        for d, rank in enumerate(self.heads):
            r = replies[rank]
            meta: Optional[SequenceSample] = r["meta"]
            by_head[d] = [] if meta is None else list(meta.ids)
            if meta is None:
                epoch_done = epoch_done or r["epoch_done"]
                continue
            epoch_done = epoch_done or r["epoch_done"]
            for i, id_ in enumerate(meta.ids):
                lengths = {k: sum(meta.seqlens[k][i]) for k in meta.keys}
                items[id_] = _Item(lengths, {k: [rank] for k in meta.keys})
        return items, by_head, epoch_done

    def _assign(self, rpc: MFCDef, items: Dict[Any, _Item], by_head: Dict[int, List[Any]]) -> List[List[Any]]:
        """Item ids per dp rank of the call's model."""
        dp = len(self._dp_ranks(rpc.model_name))
        if rpc.model_name == self.src.model_name and len(by_head) == dp:
            return [by_head[d] for d in range(dp)]
        ids = [i for d in sorted(by_head) for i in by_head[d]]
        if rpc.balanced_dp:
            k = math.ceil(len(ids) / dp)
            return [ids[j * k:(j + 1) * k] for j in range(dp)]
        key = max(rpc.input_keys, key=lambda k: sum(items[i].lengths.get(k, 0) for i in ids)) if rpc.input_keys else None
        size = {i: items[i].lengths.get(key, 1) if key else 1 for i in ids}
        groups = [set(g) for g in self._dp_ranks(rpc.model_name)]

        def local(i: Any, j: int) -> int:
            """Input elements of item ``i`` that dp rank ``j`` produced itself (its owner ranks,
            not copies moved there by other calls, so the choice does not depend on call order)."""
            return sum(items[i].lengths.get(k, 0) for k in rpc.input_keys
                       if k in items[i].holders and items[i].holders[k][0] in groups[j])

        return assign_by_load(ids, size, dp, local)

    def _transfer_plan(self, rpc: MFCDef, assignment: List[List[Any]], items: Dict[Any, _Item]):
        groups = self._dp_ranks(rpc.model_name)
        plan: Dict[Tuple[int, Tuple[int, ...], Tuple[str, ...]], List[Any]] = defaultdict(list)
        for d, ids in enumerate(assignment):
            for i in ids:
                it = items[i]
                per_src: Dict[Tuple[int, Tuple[int, ...]], List[str]] = defaultdict(list)
                for k in rpc.input_keys:
                    if k not in it.holders:
                        raise RuntimeError(f"MFC {rpc.name} needs key {k!r} of item {i!r}, which nobody holds.")
                    dsts = tuple(r for r in groups[d] if r not in it.holders[k])
                    if dsts:
                        per_src[(it.holders[k][0], dsts)].append(k)
                        it.holders[k].extend(dsts)
                for (src, dsts), keys in per_src.items():
                    plan[(src, dsts, tuple(keys))].append(i)
        return [(src, list(dsts), ids, list(keys)) for (src, dsts, keys), ids in plan.items()]

    # ------------------------------------------------------------------- step
    def _mesh(self, name: ModelName) -> List[int]:
        layout = self.cfg.model_layouts[name]
        return sorted(layout.to_global(r) for r in range(layout.topology.world_size()))

    def _hook_ranks(self, hook: Any, call: ModelName) -> List[int]:
        """Ranks that take part in ``hook``: the layouts it reads and writes."""
        other = getattr(hook, "source", None) or getattr(hook, "target", None)
        names = [call] + ([other] if other in self.cfg.model_layouts else [])
        return sorted({r for n in names for r in self._mesh(n)})

    def _issue_transfers(self, rpcs: List[MFCDef], items: Dict[Any, _Item],
                         by_head) -> Dict[str, List[Tuple[str, Ticket]]]:
        """Assign each call's items to its dp ranks and send the inputs there: one
        request for all of ``rpcs`` (calls that became ready together), so each pair of
        workers exchanges one message, whichever calls the data is for."""
        plans: Dict[str, list] = {}
        for rpc in rpcs:
            assignment = self._assign(rpc, items, by_head)
            self._assignments[rpc.name] = assignment
            plans[rpc.name] = self._transfer_plan(rpc, assignment, items)
        plan = [step for name in plans for step in plans[name]]
        if not plan:
            return {rpc.name: [] for rpc in rpcs}
        ranks = sorted({src for src, _, _, _ in plan} | {d for _, dsts, _, _ in plan for d in dsts})
        ticket = self.t.submit(ranks, "transfer", plan)
        return {name: ([("transfer", ticket)] if steps else []) for name, steps in plans.items()}

    def _issue_call(self, rpc: MFCDef) -> List[Tuple[str, Ticket]]:
        """Pre-hooks, the call, post-hooks. Nothing waits here: each worker runs its
        requests in arrival order, so inputs land before the call and post-hooks run after it."""
        ops: List[Tuple[str, Ticket]] = []
        for h in rpc.pre_hooks:
            ops.append(("pre_hooks", self.t.submit(self._hook_ranks(h, rpc.model_name), "hook",
                                                   {"hook": h, "call": rpc.model_name})))
        ops.append(("call", self.t.submit(self._mesh(rpc.model_name), "mfc",
                                          {"rpc": rpc.name, "ids": self._assignments.pop(rpc.name)})))
        for h in rpc.post_hooks:
            ops.append(("post_hooks", self.t.submit(self._hook_ranks(h, rpc.model_name), "hook",
                                                    {"hook": h, "call": rpc.model_name})))
        return ops

    def _finish(self, rpc: MFCDef, ops: List[Tuple[str, Ticket]], items: Dict[Any, _Item],
                t_step: float, timing_key: str) -> Dict[str, float]:
        """Record where the call's outputs live; return its statistics and fill its timeline entry."""
        call = next(t for kind, t in ops if kind == "call")
        first = min(t.sent_at for _, t in ops)
        stats: Dict[str, float] = {}
        for rank in call.ranks:
            r = call.replies[rank]
            if r is None:
                continue
            if r["meta"] is not None:
                meta: SequenceSample = r["meta"]
                holders = self._last_stage_ranks(rpc.model_name, r["dp_rank"])
                holders = [rank] + [h for h in holders if h != rank]
                for n, id_ in enumerate(meta.ids):
                    for k in meta.keys:
                        items[id_].holders[k] = list(holders)
                        items[id_].lengths[k] = sum(meta.seqlens[k][n])
            if isinstance(r["stats"], dict) and not stats:
                stats = {k: float(v) for k, v in r["stats"].items() if isinstance(v, (int, float))}
        timing = {"pre_hooks_s": 0.0, "transfer_s": 0.0, "call_s": 0.0, "post_hooks_s": 0.0,
                  "issued": first - t_step,
                  "done": max(t.received_at for _, t in ops) - t_step}
        for kind, t in ops:
            span = t.span()
            if span is not None:
                timing[f"{kind}_s"] += span[1] - span[0]
        span = call.span()
        if span is not None:
            timing["start"], timing["end"] = span[0] - t_step, span[1] - t_step
        timing["ranks"] = list(call.ranks)
        timing["rank_spans"] = {r: [a - t_step, b - t_step] for r, (a, b) in sorted(call.spans.items())}
        self._timing[timing_key] = timing
        return stats

    def _dependencies(self) -> Dict[str, Set[str]]:
        """Graph parents, plus: calls on one model role keep graph order (parameter versions)."""
        deps = {r.name: set(self.cfg.graph.predecessors(r.name)) for r in self.order}
        last: Dict[str, str] = {}
        for r in self.order:
            if r.role in last:
                deps[r.name].add(last[r.role])
            last[r.role] = r.name
        return deps

    def _run_calls(self, items: Dict[Any, _Item], by_head, t_step: float,
                   calls: Optional[List[MFCDef]] = None, tag: str = "") -> Dict[str, Dict[str, float]]:
        """Issue every call (of ``calls``, default all) as soon as its dependencies are done (one at a
        time when not ``concurrent``); calls on disjoint meshes then run at the same time. Dependencies
        outside ``calls`` ran before. ``tag`` suffixes the timing entries (refill rounds)."""
        calls = self.order if calls is None else calls
        names = {r.name for r in calls}
        deps = {n: d & names for n, d in self._dependencies().items() if n in names}
        done: Set[str] = set()
        in_flight: Dict[str, List[Tuple[str, Ticket]]] = {}
        stats: Dict[str, Dict[str, float]] = {}
        self._assignments: Dict[str, List[List[Any]]] = {}
        while len(done) < len(calls):
            ready = [r for r in calls if r.name not in done and r.name not in in_flight
                     and deps[r.name] <= done]
            if not self.concurrent:
                ready = ready[:1] if not in_flight else []
            # Inputs move first: a rank about to start a long call still serves
            # the transfers other calls need from it.
            in_flight.update(self._issue_transfers(ready, items, by_head))
            for rpc in ready:
                in_flight[rpc.name] += self._issue_call(rpc)
            pending = [t for ops in in_flight.values() for _, t in ops if not t.done]
            if pending:
                self.t.wait_any(pending)
            for name in [n for n, ops in in_flight.items() if all(t.done for _, t in ops)]:
                rpc = self._by_name[name]
                stats[name] = self._finish(rpc, in_flight.pop(name), items, t_step, name + tag)
                done.add(name)
                if rpc.is_train:
                    check_finite_stats(rpc.name, stats[name], self.global_step + 1, self.epoch + 1,
                                       self.epoch_step + 1)
        return {r.name: stats[r.name] for r in calls}

    def _filter(self, ids: List[Any], items: Dict[Any, _Item], t_step: float, tag: str) -> Dict[Any, bool]:
        """Run the input filter where the items live (after moving keys it needs onto one rank)."""
        flt = self.filtered.call.input_filter
        transfers, by_rank = filter_plan(flt.keys, ids, {i: items[i].holders for i in ids})
        tickets = []
        if transfers:
            ranks = sorted({src for src, _, _, _ in transfers} | {d for _, dsts, _, _ in transfers for d in dsts})
            tickets.append(self.t.submit(ranks, "transfer", transfers))
        ticket = self.t.submit(sorted(by_rank), "filter", {"filter": flt, "ids": by_rank})
        for t in tickets + [ticket]:
            while not t.done:
                self.t.wait_any([t])
        keep: Dict[Any, bool] = {}
        for r in ticket.ranks:
            keep.update(ticket.replies[r] or {})
        a, b = ticket.span() or (ticket.sent_at, ticket.received_at)
        self._timing["filter" + tag] = {"call_s": b - a, "start": a - t_step, "end": b - t_step,
                                        "ranks": list(ticket.ranks)}
        return keep

    def _run_filtered(self, items: Dict[Any, _Item], by_head,
                      t_step: float) -> Tuple[Dict[str, Dict[str, float]], int]:
        """Producer rounds until the filtered call's batch is full (or the cap), then the other calls
        on the kept items. Refill batches join ``items``; returns the statistics and the epochs
        that ended while refilling."""
        ph = self.filtered
        flt, need = ph.call.input_filter, ph.call.n_seqs
        stats: Dict[str, Dict[str, float]] = {}
        drawn: List[Any] = []
        passed: List[Any] = []
        failed: List[Any] = []
        rounds = epochs = 0
        round_items, round_heads = items, by_head
        while True:
            rounds += 1
            tag = "" if rounds == 1 else f"#{rounds}"
            stats.update(self._run_calls(round_items, round_heads, t_step, ph.producers, tag))
            ids = [i for d in sorted(round_heads) for i in round_heads[d]]
            keep = self._filter(ids, items, t_step, tag)
            drawn += ids
            passed += [i for i in ids if keep[i]]
            failed += [i for i in ids if not keep[i]]
            if len(passed) >= need or (flt.max_rounds and rounds >= flt.max_rounds):
                break
            round_items, round_heads, epoch_done = self._fetch(skip=set(items))
            items.update(round_items)  # cleared with the step's items in any case
            epochs += int(epoch_done)
            if len(round_items) < self._min_items:
                logger.warning(f"{ph.call.name}: the refill drew only {len(round_items)} prompts not yet drawn in "
                               f"this step after {rounds} rounds; going on with {min(len(passed), need)} of {need} "
                               "items that passed the filter.")
                break
        chosen = choose_items(passed, failed, drawn, need, self._min_items)
        if len(passed) < need:
            logger.info(f"{ph.call.name}: {len(passed)} of {need} items passed {flt.name!r} in {rounds} rounds; "
                        f"running on {len(chosen)}.")
        stats.update(self._run_calls({i: items[i] for i in chosen}, {0: chosen}, t_step, ph.rest))
        stats[ph.call.name].update(filter_rounds=float(rounds), filter_passed=float(len(passed)),
                                   filter_dropped=float(len(failed)), filter_items=float(len(chosen)))
        return {r.name: stats[r.name] for r in self.order}, epochs

    def _train_rpcs(self) -> List[MFCDef]:
        return [r for r in self.order if r.is_train]

    def save(self) -> List[str]:
        """Save every trained model, named after the last finished step."""
        last = self.history[-1] if self.history else None
        epoch, epoch_step = (last.epoch, last.epoch_step) if last else (self.epoch + 1, self.epoch_step)
        dirs = []
        for rpc in self._train_rpcs():
            d = os.path.join(constants.get_save_path(self.exp, self.trial), rpc.role,
                             f"epoch{epoch}epochstep{epoch_step}globalstep{self.global_step}")
            self.t.call_all("save", {"model_name": rpc.model_name, "rpc": rpc.name, "save_dir": d})
            dirs.append(d)
            logger.info(f"Saved {rpc.role} to {d}")
        return dirs

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        out = {}
        for rpc in self._train_rpcs():
            replies = self.t.call_all("evaluate", {"model_name": rpc.model_name, "rpc": rpc.name})
            stats = next((r for r in replies if r), None)
            if stats:
                out[rpc.name] = stats
                logger.info(f"Evaluation {rpc.name}: " + ", ".join(f"{k}={v:.4g}" for k, v in stats.items()))
        self.last_eval = out
        if out:
            self._append_stats({"global_step": self.global_step, "eval": out})
        return out

    # --------------------------------------------------------------- recovery
    def _recover_state(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "epoch_step": self.epoch_step, "global_step": self.global_step,
                "save_ctl": self.save_ctl.state_dict(), "eval_ctl": self.eval_ctl.state_dict()}

    def dump_recover(self) -> None:
        """Worker states go to a per-step directory; ``recover_info.pkl`` (written last,
        atomically) names it, so a crash mid-dump leaves the previous state usable."""
        import shutil

        os.makedirs(self.recover_dir, exist_ok=True)
        step_dir = os.path.join(self.recover_dir, f"globalstep{self.global_step}")
        self.t.call_all("state", {"dir": step_dir})
        info = dict(self._recover_state(), dir=step_dir, layouts=describe_layouts(self.cfg))
        path = os.path.join(self.recover_dir, "recover_info.pkl")
        with open(path + ".tmp", "wb") as f:
            pickle.dump(info, f)
        os.replace(path + ".tmp", path)
        for name in os.listdir(self.recover_dir):
            full = os.path.join(self.recover_dir, name)
            if name.startswith("globalstep") and full != step_dir:
                shutil.rmtree(full, ignore_errors=True)

    def load_recover(self) -> bool:
        path = os.path.join(self.recover_dir or "", "recover_info.pkl")
        if not self.recover_dir or not os.path.exists(path):
            return False
        with open(path, "rb") as f:
            st = pickle.load(f)
        self.t.call_all("load_state", {"dir": st["dir"]})
        self.epoch, self.epoch_step, self.global_step = st["epoch"], st["epoch_step"], st["global_step"]
        self.save_ctl.load_state_dict(st["save_ctl"])
        self.eval_ctl.load_state_dict(st["eval_ctl"])
        logger.info(f"Resumed from {st['dir']} at global step {self.global_step}.")
        return True

    # -------------------------------------------------------------------- run
    def total_steps(self) -> int:
        total = self.ft_spec.total_train_steps
        bench = self.cfg.exp_ctrl.benchmark_steps
        return min(total, bench) if bench else total

    def step(self) -> StepLog:
        t0, t_step = time.perf_counter(), time.time()
        items, by_head, epoch_done = self._fetch()
        fetch_s = time.perf_counter() - t0
        self._timing: Dict[str, Dict[str, float]] = {"fetch": {"call_s": fetch_s, "start": 0.0, "end": fetch_s}}
        epochs_done = int(epoch_done)
        if self.filtered is None:
            stats = self._run_calls(items, by_head, t_step)
        else:
            stats, refill_epochs = self._run_filtered(items, by_head, t_step)
            epochs_done += refill_epochs
        n_tokens = sum(max(it.lengths.values(), default=0) for it in items.values())
        self.t.call_all("clear", list(items))
        self.global_step += 1
        self.epoch_step += 1
        # The step is labelled within the epoch it belongs to; only then does the epoch roll over.
        log = StepLog(self.epoch + 1, self.epoch_step, self.global_step, time.perf_counter() - t0, n_tokens, stats,
                      self._timing)
        if epochs_done:  # a refill may draw past the end of an epoch
            self.epoch += epochs_done
            self.epoch_step = 0
        self.history.append(log)
        return log

    def run(self) -> List[StepLog]:
        if not hasattr(self, "ft_spec"):
            self.initialize()
        if self.resume:
            self.load_recover()
        total = self.total_steps()
        # What exists now lives for the whole run: keep it out of the collector's full
        # passes, which otherwise walk it again mid-step (pauses of 0.02-0.26 s were measured).
        gc.freeze()
        start = time.perf_counter()
        while self.global_step < total:
            epoch_before = self.epoch
            log = self.step()
            new_epochs = self.epoch - epoch_before
            elapsed = time.perf_counter() - start
            done = self.global_step
            eta = elapsed / max(1, len(self.history)) * (total - done)
            parts = [f"{k}: " + ", ".join(f"{n}={v:.4g}" for n, v in s.items()) for k, s in log.stats.items() if s]
            width = 20
            bar = "#" * (width * done // total) + "." * (width - width * done // total)
            logger.info(
                f"[{bar}] epoch {log.epoch}/{self.cfg.exp_ctrl.total_train_epochs} step {log.epoch_step} "
                f"global step {done}/{total} | {log.seconds:.2f}s, {log.n_tokens} tokens, "
                f"{log.n_tokens / max(log.seconds, 1e-9):.0f} tokens/s, ETA {eta:.0f}s | " + " | ".join(parts)
            )
            self._write_stats(log, eta)
            last = done >= total
            if self.eval_ctl.check(epochs=new_epochs, steps=1) or (last and self._has_eval()):
                self.evaluate()
            if self.save_ctl.check(epochs=new_epochs, steps=1) or last:
                self.save()
            if self.save_recover_states and self.recover_dir:
                self.dump_recover()
            freq = getattr(self.cfg, "cache_clear_freq", None)
            if freq and done % freq == 0:
                self.t.call_all("empty_cache")
                self.cache_clears.append(done)
        return self.history

    def _write_stats(self, log: StepLog, eta: float) -> None:
        """One JSON line per step in ``<log dir>/stats.jsonl`` (full precision, for tools and tests)."""
        rec = dataclasses.asdict(log)
        rec["eta_s"] = eta
        self._append_stats(rec)

    def _sinks(self) -> List[Any]:
        """Tensorboard (when installed) and wandb (``cfg.wandb_mode``), created on first use."""
        if not hasattr(self, "_stat_sinks"):
            log_dir = constants.get_log_path(self.exp, self.trial)
            wandb = make_wandb_sink(getattr(self.cfg, "wandb_mode", "disabled"), self.exp, self.trial, log_dir)
            self._stat_sinks = [TensorboardSink(log_dir)] + ([wandb] if wandb is not None else [])
        return self._stat_sinks

    def close(self) -> None:
        for sink in getattr(self, "_stat_sinks", []):
            if hasattr(sink, "close"):
                sink.close()

    def _append_stats(self, rec: Dict[str, Any]) -> None:
        import json

        for sink in self._sinks():
            sink.log(rec)

        d = constants.get_log_path(self.exp, self.trial)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "stats.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _has_eval(self) -> bool:
        ctl = self.cfg.exp_ctrl
        return any(v is not None for v in (ctl.eval_freq_epochs, ctl.eval_freq_steps, ctl.eval_freq_secs))


# ---------------------------------------------------------------------------
# The master worker process (launched by realhf.apps.remote, type "master_worker")
# ---------------------------------------------------------------------------
from realhf.system.worker_base import PollResult, Worker, WorkerExit, register_worker  # noqa: E402


class MasterWorker(Worker):
    """Runs :class:`MasterCore` over a ZeroMQ :class:`MasterStream` to all model workers.

    Config: ``{"experiment_config": path, "recover_dir": str or None,
    "save_recover_states": bool, "resume": bool, "request_timeout": seconds}``.
    """

    def _configure(self, config: Dict[str, Any]) -> None:
        from realhf.system.request_reply_stream import MasterStream

        with open(config["experiment_config"], "rb") as f:
            cfg: ExperimentConfig = pickle.load(f)
        names = [f"model_worker/{i}" for i in range(cfg.n_model_workers)]
        self.stream = MasterStream(self.experiment_name, self.trial_name, names,
                                   timeout_s=config.get("request_timeout", 3600.0))
        self.core = MasterCore(cfg, self.stream, self.experiment_name, self.trial_name,
                               recover_dir=config.get("recover_dir"),
                               save_recover_states=bool(config.get("save_recover_states", False)),
                               resume=bool(config.get("resume", True)))

    def _poll(self) -> PollResult:
        try:
            self.core.run()
        finally:
            self.core.close()
        self.stream.call_all("exit")
        raise WorkerExit()

    def _exit_hook(self, status) -> None:
        stream = getattr(self, "stream", None)
        if stream is not None:
            stream.close()


register_worker("master_worker", MasterWorker)
