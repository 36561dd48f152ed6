"""Dataflow graphs over model function calls."""

import pytest

from realhf.api.core import dfg
from realhf.api.core.config import ModelInterfaceType, ModelName
from realhf.api.core.dfg import GraphError, MFCDef, build_graph

GEN, INF, TRAIN = ModelInterfaceType.GENERATE, ModelInterfaceType.INFERENCE, ModelInterfaceType.TRAIN_STEP


def _ppo():
    def mfc(name, role, kind, iface, ins, outs):
        return MFCDef(name=name, n_seqs=8, interface_type=kind, interface_impl=dfg.ModelInterface(iface),
                      model_name=role, input_keys=ins, output_keys=outs)

    return [
        mfc("actor_gen", "actor", GEN, "ppo_actor", ["packed_prompts"],
            ["seq_no_eos_mask", "packed_input_ids", "packed_logprobs", "prompt_mask"]),
        mfc("rew_inf", "reward", INF, "paired_rw", ["packed_input_ids"], ["rewards"]),
        mfc("ref_inf", "ref", INF, "ppo_actor", ["packed_input_ids"], ["packed_ref_logprobs"]),
        mfc("critic_inf", "critic", INF, "ppo_critic", ["packed_input_ids", "seq_no_eos_mask"], ["values"]),
        mfc("actor_train", "actor", TRAIN, "ppo_actor",
            ["packed_input_ids", "packed_logprobs", "packed_ref_logprobs", "rewards", "values", "prompt_mask",
             "seq_no_eos_mask"], []),
        mfc("critic_train", "critic", TRAIN, "ppo_critic",
            ["packed_input_ids", "packed_logprobs", "packed_ref_logprobs", "rewards", "values", "prompt_mask",
             "seq_no_eos_mask"], []),
    ]


def test_ppo_graph_edges_and_views():
    rpcs = _ppo()
    g = build_graph(rpcs, dataset_keys=["packed_prompts"])
    by = {r.name: r for r in rpcs}
    assert by["actor_gen"].is_src and not by["actor_gen"].is_dst
    assert {r.name for r in by["actor_gen"].children} == {"rew_inf", "ref_inf", "critic_inf", "actor_train",
                                                          "critic_train"}
    assert {r.name for r in by["actor_train"].parents} == {"actor_gen", "rew_inf", "ref_inf", "critic_inf"}
    assert by["actor_train"].is_dst and by["critic_train"].is_dst
    assert by["critic_train"].data_producers["values"] == ModelName("critic", 0)
    assert "packed_prompts" not in by["actor_gen"].data_producers
    assert not by["critic_inf"].is_dst_of_model_role and by["critic_train"].is_dst_of_model_role
    assert sorted(g.edges["actor_gen", "critic_inf"]["keys"]) == ["packed_input_ids", "seq_no_eos_mask"]
    assert {r.name for r in by["rew_inf"].all_successors()} == {"actor_train", "critic_train"}


def test_customization_idiom_from_the_docs():
    rpcs = _ppo()
    idx = next(i for i, r in enumerate(rpcs) if r.model_name.role == "reward")
    rpcs[idx].interface_impl = dfg.ModelInterface("sentiment_scoring")
    rpcs[idx].post_hooks = []
    build_graph(rpcs)
    assert rpcs[idx].interface_impl.type_ == "sentiment_scoring"


def test_output_remap_feeds_consumers():
    a = MFCDef("greedy_gen", 4, GEN, "reinforce", "actor", input_keys=["packed_prompts"],
               output_keys=["packed_input_ids"], output_key_remap={"packed_input_ids": "greedy_packed_input_ids"})
    b = MFCDef("greedy_rw", 4, INF, "paired_rw", "reward", input_keys=["greedy_packed_input_ids"],
               output_keys=["rewards"])
    build_graph([a, b], dataset_keys=["packed_prompts"])
    assert b.parents == [a]


def _one(name, ins, outs, role="actor", kind=INF):
    return MFCDef(name, 2, kind, "null", role, input_keys=ins, output_keys=outs)


@pytest.mark.parametrize(
    "rpcs,msg",
    [
        (lambda: [_one("a", ["x"], ["y"]), _one("b", ["y"], ["x"])], "cycle: a -> b -> a|cycle: b -> a -> b"),
        (lambda: [_one("a", ["packed_promts"], ["y"])], "'packed_promts'.*Did you mean 'packed_prompts'"),
        (lambda: [_one("a", [], [], kind=TRAIN), _one("b", [], [], kind=TRAIN)], "two train calls"),
        (lambda: [_one("a", [], ["y"]), _one("b", [], ["y"])], "produced by both a and b"),
        (lambda: [_one("a", [], []), _one("a", [], [])], "Duplicate MFC names"),
    ],
)
def test_graph_errors_name_the_problem(rpcs, msg):
    with pytest.raises(GraphError, match=msg):
        build_graph(rpcs(), dataset_keys=["packed_prompts"])


def test_mfc_field_errors():
    with pytest.raises(GraphError, match="n_seqs"):
        MFCDef("a", 0, INF, "null", "actor")
    with pytest.raises(GraphError, match="interface_type 'train'"):
        MFCDef("a", 1, "train", "null", "actor")
    with pytest.raises(GraphError, match="not part of a graph"):
        _ = MFCDef("a", 1, "inference", "null", "actor").parents
