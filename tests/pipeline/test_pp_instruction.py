import pytest

from realhf.impl.model.parallelism.pipeline_parallel import instruction as I

NAMES = [
    "ForwardPass", "BackwardPass", "SendActivation", "RecvActivation", "SendGrad",
    "RecvGrad", "SendNextTokens", "RecvNextTokens", "ReduceGrads", "OptimizerStep",
]


def test_registry_has_all():
    assert set(NAMES) <= set(I.INSTRUCTION_REGISTRY)


@pytest.mark.parametrize("name", NAMES)
def test_round_trip(name):
    ins = I.make_instruction(name, stage_id=2, micro_batch_id=7, step_id=13)
    s = ins.encode()
    assert s == f"{name}(stage_id=2,micro_batch_id=7,step_id=13)"
    back = I.decode_instruction(s)
    assert back == ins and type(back) is type(ins)
    assert str(ins) == s
    assert hash(back) == hash(ins)


def test_distinct_types_not_equal():
    assert I.ForwardPass(0, 0, 0) != I.BackwardPass(0, 0, 0)


@pytest.mark.parametrize("bad", ["", "Foo(stage_id=0,micro_batch_id=0,step_id=0)",
                                 "ForwardPass(0,0,0)", "ForwardPass(stage_id=a,micro_batch_id=0,step_id=0)"])
def test_decode_errors(bad):
    with pytest.raises(ValueError):
        I.decode_instruction(bad)


def test_duplicate_registration_rejected():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class ForwardPass(I.PipeInstruction):
        pass

    with pytest.raises(ValueError):
        I.register_instruction(ForwardPass)
