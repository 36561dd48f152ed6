"""The ``rule_reward`` interface end to end on embedded prompts and tokenizer."""

import textwrap

import pytest
import torch

import realhf.impl.model.interface  # noqa: F401  (the import path that registers "rule_reward")
from realhf.api.core.config import ModelAbstraction, ModelInterfaceAbstraction
from realhf.api.core.data_api import DatasetUtility, SequenceSample
from realhf.api.core.model_api import make_interface, make_model
from realhf.assets import dataset_path, tokenizer_path
from realhf.impl.dataset.prompt_dataset import PromptDataset
from realhf.impl.reward.interface import RuleRewardInterface
from realhf.impl.reward.pool import RewardError

pytestmark = pytest.mark.timeout(120)

# completion template per prompt (ans = reference answer) and its expected math reward.
# "<eos>" stands for the EOS token: what follows it must be ignored.
COMPLETIONS = [
    (" Rosa has \\boxed{{{ans}}} pencils.", 1.0),
    (" It is \\boxed{{{wrong}}}.", 0.0),
    (" so the total is {ans}<eos> #### {wrong}", 1.0),
    (" #### {wrong}<eos> #### {ans}", 0.0),
    (" I cannot tell.", 0.0),
    (" Answer: {ans}<eos>", 1.0),
]


@pytest.fixture(scope="module")
def model():
    return make_model(ModelAbstraction("tokenizer", args={"tokenizer_path": tokenizer_path()}), "reward")


@pytest.fixture(scope="module")
def prompts(model):
    ds = PromptDataset(DatasetUtility(seed=1, dp_rank=0, world_size=1, tokenizer=model.tokenizer),
                       max_length=128, dataset_path=dataset_path("prompt-train"))
    return [ds[i] for i in range(len(COMPLETIONS))]


def completion_tokens(tok, template, answer):
    text = template.format(ans=answer, wrong=int(answer) + 1)
    ids = []
    for k, part in enumerate(text.split("<eos>")):
        if k:
            ids.append(tok.eos_token_id)
        ids += tok(part, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def rollouts(model, prompts, with_mask=True, with_prompts=False):
    """PPO-style items: packed_input_ids = prompt + completion, plus the prompt info keys."""
    items = []
    for item, (template, _) in zip(prompts, COMPLETIONS):
        prompt = item.data["packed_prompts"]
        seq = torch.cat([prompt, completion_tokens(model.tokenizer, template, item.metadata["answer"][0])])
        data = {"packed_input_ids": seq}
        if with_mask:
            data["prompt_mask"] = torch.arange(len(seq)) < len(prompt)
        if with_prompts:
            data["packed_prompts"] = prompt
        seqlens = {k: [[len(v)]] for k, v in data.items()}
        items.append(SequenceSample(keys=set(data), trailing_shapes={k: () for k in data},
                                    dtypes={k: v.dtype for k, v in data.items()}, ids=item.ids, seqlens=seqlens,
                                    data=data, metadata=dict(item.metadata)))
    return SequenceSample.gather(items)


EXPECTED = torch.tensor([r for _, r in COMPLETIONS])


def iface(**args):
    return make_interface(ModelInterfaceAbstraction("rule_reward", args=args))


def test_the_prompts_carry_numeric_answers(prompts):
    assert all(p.metadata["answer"][0].isdigit() for p in prompts)


@pytest.mark.parametrize("n_workers", [0, 1])
def test_rewards_from_prompt_mask_with_scaling_and_bias(model, prompts, n_workers):
    rw = iface(reward="math", n_workers=n_workers, output_scaling=2.0, output_bias=0.5)
    assert isinstance(rw, RuleRewardInterface)
    try:
        sample = rollouts(model, prompts)
        out = rw.inference(model, sample)
    finally:
        rw.close()
    assert out.keys == {"rewards"} and out.ids == sample.ids
    assert out.dtypes["rewards"] == torch.float32 and out.seqlens["rewards"] == [[1]] * len(COMPLETIONS)
    torch.testing.assert_close(out.data["rewards"], (EXPECTED - 0.5) * 2.0)


def test_rewards_from_packed_prompts_and_a_mixture(model, prompts):
    rw = iface(reward=[{"name": "math", "weight": 1.0}, {"name": "format", "weight": 0.25}], n_workers=0)
    out = rw.inference(model, rollouts(model, prompts, with_mask=False, with_prompts=True))
    has_format = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])  # after EOS does not count
    torch.testing.assert_close(out.data["rewards"], EXPECTED + 0.25 * has_format)


def test_items_with_several_sequences_get_one_reward_each(model, prompts):
    tok = model.tokenizer
    prompt, answer = prompts[0].data["packed_prompts"], prompts[0].metadata["answer"][0]
    seqs = [torch.cat([prompt, completion_tokens(tok, t, answer)]) for t, _ in COMPLETIONS[:3]]
    data = {"packed_input_ids": torch.cat(seqs), "packed_prompts": prompt}
    sample = SequenceSample(keys=set(data), trailing_shapes={k: () for k in data},
                            dtypes={k: torch.int64 for k in data}, ids=prompts[0].ids,
                            seqlens={"packed_input_ids": [[len(s) for s in seqs]], "packed_prompts": [[len(prompt)]]},
                            data=data, metadata=dict(prompts[0].metadata))
    out = iface(n_workers=0).inference(model, sample)
    assert out.seqlens["rewards"] == [[3]]
    torch.testing.assert_close(out.data["rewards"], EXPECTED[:3])


def test_custom_function_sees_decoded_texts_and_metadata(model, prompts, tmp_path):
    path = tmp_path / "texts.py"
    path.write_text(textwrap.dedent('''
        def check(prompt, completion, answer, reference, id):
            assert prompt.startswith("Question:") and prompt.endswith("Answer:"), prompt
            assert "<eos>" not in completion and answer == reference and isinstance(id, str)
            return float(len(completion.strip()) > 0)
    '''))
    rw = iface(reward={"name": "custom", "path": str(path), "function": "check"}, n_workers=1,
               default_reward=None)
    try:
        out = rw.inference(model, rollouts(model, prompts))
    finally:
        rw.close()
    torch.testing.assert_close(out.data["rewards"], torch.ones(len(COMPLETIONS)))


def test_answer_key_is_configurable(model, prompts):
    sample = rollouts(model, prompts)
    sample.metadata["solution"] = sample.metadata.pop("answer")
    with pytest.raises(ValueError, match="'answer'.*'solution'"):
        iface(n_workers=0).inference(model, sample)
    out = iface(n_workers=0, answer_key="solution").inference(model, sample)
    torch.testing.assert_close(out.data["rewards"], EXPECTED)


def test_failures_use_default_reward_or_raise(model, prompts):
    sample = rollouts(model, prompts)
    sample.metadata["answer"][1] = None
    out = iface(n_workers=0, default_reward=-3.0).inference(model, sample)
    torch.testing.assert_close(out.data["rewards"], torch.tensor([1.0, -3.0, 1.0, 0.0, 0.0, 1.0]))
    with pytest.raises(RewardError, match="no reference answer") as e:
        iface(n_workers=0, default_reward=None).inference(model, sample)
    assert e.value.item_id == sample.ids[1]


def test_missing_prompt_information_is_explained(model, prompts):
    with pytest.raises(ValueError, match="add 'prompt_mask'"):
        iface(n_workers=0).inference(model, rollouts(model, prompts, with_mask=False))


def test_bad_spec_fails_when_the_interface_is_built():
    with pytest.raises(ValueError, match="unknown reward name 'maths'"):
        iface(reward="maths")
