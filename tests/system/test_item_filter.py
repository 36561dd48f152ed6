"""Input filters of calls (filter + refill): graph checks, the master's planning, the GRPO filter, fetch skips."""

from __future__ import annotations

import networkx as nx
import pytest
import torch

import realhf.impl.model.interface  # noqa: F401  (registers grpo_dynamic_sampling)
from realhf.api.core import dfg
from realhf.api.core.config import ModelInterfaceType
from realhf.api.core.data_api import PackedDataLoader, SequenceSample
from realhf.api.core.dfg import GraphError, ItemFilter, MFCDef, build_graph
from realhf.api.core.model_api import apply_item_filter, register_item_filter
from realhf.system.item_filter import choose_items, filter_phases, filter_plan

GEN, INF, TRAIN = ModelInterfaceType.GENERATE, ModelInterfaceType.INFERENCE, ModelInterfaceType.TRAIN_STEP
FLT = ItemFilter("grpo_dynamic_sampling", ["rewards"], {"group_size": 2, "max_new_tokens": 4}, max_rounds=3)


def _grpo(flt=FLT, ref_role: str = "ref"):
    def mfc(name, role, kind, ins, outs, **kw):
        return MFCDef(name, 8, kind, dfg.ModelInterface("grpo_actor"), role, input_keys=ins, output_keys=outs, **kw)

    return [
        mfc("actor_gen", "actor", GEN, ["packed_prompts"], ["packed_input_ids", "prompt_mask", "packed_logprobs"]),
        mfc("rew_inf", "reward", INF, ["packed_input_ids", "prompt_mask"], ["rewards"]),
        mfc("ref_inf", ref_role, INF, ["packed_input_ids"], ["packed_ref_logprobs"]),
        mfc("actor_train", "actor", TRAIN, ["packed_input_ids", "packed_logprobs", "packed_ref_logprobs", "rewards"],
            [], input_filter=flt),
    ]


def _order(rpcs):
    g = build_graph(rpcs, ["packed_prompts"])
    by = {r.name: r for r in rpcs}
    return [by[n] for n in nx.topological_sort(g)], g


def test_producers_of_the_filter_keys_are_re_run_the_rest_runs_once():
    order, g = _order(_grpo())
    ph = filter_phases(order, g)
    assert ph.call.name == "actor_train"
    assert [r.name for r in ph.producers] == ["actor_gen", "rew_inf"]
    assert {r.name for r in ph.rest} == {"ref_inf", "actor_train"}
    assert filter_phases(*_order(_grpo(flt=None))) is None


def test_graphs_the_refill_cannot_run_are_refused():
    with pytest.raises(GraphError, match="input_filter .* reads \\['values'\\]"):
        _grpo(flt=ItemFilter("f", ["values"]))
    with pytest.raises(GraphError, match="max_rounds"):
        ItemFilter("f", ["rewards"], max_rounds=-1)
    rpcs = _grpo()
    rpcs[2].input_filter = ItemFilter("f", ["packed_input_ids"])
    with pytest.raises(GraphError, match="at most once"):
        build_graph(rpcs, ["packed_prompts"])
    # ref_inf on the reward's role, before rew_inf: rew_inf could not be re-run without it
    rpcs = _grpo(ref_role="reward")
    order, g = _order([rpcs[0], rpcs[2], rpcs[1], rpcs[3]])
    assert [r.name for r in order] == ["actor_gen", "ref_inf", "rew_inf", "actor_train"]
    with pytest.raises(GraphError, match="same role 'reward'"):
        filter_phases(order, g)
    # unless rew_inf reads its output: then it is a producer too
    rpcs[1].input_keys = ("packed_input_ids", "prompt_mask", "packed_ref_logprobs")
    order, g = _order(rpcs)
    assert [r.name for r in filter_phases(order, g).producers] == ["actor_gen", "ref_inf", "rew_inf"]


def test_filter_runs_where_most_keys_are_and_fetches_the_others():
    holders = {"a": {"rewards": [2, 3], "prompt_mask": [0, 3]},  # rank 3 holds both
               "b": {"rewards": [2], "prompt_mask": [0]},  # none holds both: bring prompt_mask to the owner
               "c": {"rewards": [1], "prompt_mask": [0]}}
    transfers, by_rank = filter_plan(["rewards", "prompt_mask"], ["a", "b", "c"], holders)
    assert by_rank == {3: ["a"], 2: ["b"], 1: ["c"]}
    assert sorted(transfers) == [(0, [1], ["c"], ["prompt_mask"]), (0, [2], ["b"], ["prompt_mask"])]
    assert holders["b"]["prompt_mask"] == [0, 2]  # recorded: a later call finds the copy
    with pytest.raises(RuntimeError, match="nobody holds"):
        filter_plan(["values"], ["a"], holders)


def test_chosen_items_are_the_first_that_passed_padded_to_one_per_dp_rank():
    drawn = list("abcdefgh")
    assert choose_items(["b", "e", "f", "h"], ["a", "c", "d", "g"], drawn, need=3, at_least=2) == ["b", "e", "f"]
    assert choose_items(["e"], ["a", "c"], drawn, need=3, at_least=2) == ["a", "e"]  # draw order kept


def test_grpo_filter_drops_groups_of_equal_rewards_after_the_overlong_penalty():
    # two groups of two; lengths 6 and 8 with 2-token prompts: 4 and 6 answer tokens
    lens = [6, 8, 6, 6]
    pm = torch.cat([torch.arange(n) < 2 for n in lens])
    sample = SequenceSample(keys={"rewards", "prompt_mask"}, trailing_shapes={"rewards": (), "prompt_mask": ()},
                            dtypes={"rewards": torch.float32, "prompt_mask": torch.bool}, ids=["x", "y"],
                            seqlens={"rewards": [[2], [2]], "prompt_mask": [[6, 8], [6, 6]]},
                            data={"rewards": torch.tensor([3.0, 3.0, 0.0, 0.0]), "prompt_mask": pm})
    assert apply_item_filter("grpo_dynamic_sampling", sample, {"group_size": 2, "max_new_tokens": 6}) == [False, False]
    # the penalty separates the 4- and 6-token answers of the first group, as in train_step
    args = {"group_size": 2, "max_new_tokens": 6, "overlong_tokens": 2, "overlong_penalty_factor": 1.0}
    assert apply_item_filter("grpo_dynamic_sampling", sample, args) == [True, False]
    # 3 and 3 - 1 = 2 are clipped to the same 0.5
    assert apply_item_filter("grpo_dynamic_sampling", sample, dict(args, max_reward_clip=0.5)) == [False, False]


def test_a_filter_must_decide_every_item():
    register_item_filter("test_first_only", lambda sample: [True])
    sample = SequenceSample.from_default([1, 1], ["p", "q"], {"rewards": torch.zeros(2)})
    with pytest.raises(ValueError, match="1 decisions for 2 items"):
        apply_item_filter("test_first_only", sample)


def test_fetch_leaves_out_the_ids_a_refill_already_drew():
    from realhf.system.model_worker import ModelWorkerCore

    data = [SequenceSample.from_default([2], [f"p{i}"], {"packed_prompts": torch.tensor([i, i])}) for i in range(6)]
    heads = []
    for h in range(2):
        core = ModelWorkerCore.__new__(ModelWorkerCore)
        core.loader = PackedDataLoader(data, batch_size=6, shuffle=False)
        core.store, core.head_index, core.n_heads = {}, h, 2
        heads.append(core)
    replies = [c._fetch({"skip": {"p1", "p2", "p4"}}) for c in heads]
    # every head drops the same ids, then takes its slice of what is left
    assert [r["meta"].ids for r in replies] == [["p0", "p3"], ["p5"]]
    assert sorted(heads[0].store) == ["p0", "p3"] and sorted(heads[1].store) == ["p5"]
