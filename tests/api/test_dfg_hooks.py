"""Hooks carried by model function calls."""

import pytest

from realhf.api.core.config import ModelName
from realhf.api.core.dfg import OffloadHook, ParamReallocHook


def test_realloc_hook_parses_names_and_defaults():
    h = ParamReallocHook(source="actor@1")
    assert h.source == ModelName("actor", 1) and h.target is None and h.eta == 1.0
    h = ParamReallocHook(target=ModelName("ref", 0), eta=0.001)
    assert h.target == ModelName("ref", 0) and h.eta == 0.001
    assert OffloadHook() == OffloadHook()


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({}, "exactly one of source= and target="),
        ({"source": "actor", "target": "ref"}, "exactly one of source= and target="),
        ({"target": "ref", "eta": 0.0}, r"eta must be in \(0, 1\]"),
        ({"target": "ref", "eta": 1.5}, r"eta must be in \(0, 1\]"),
    ],
)
def test_realloc_hook_errors_name_the_field(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ParamReallocHook(**kw)


def test_realloc_hook_rejects_other_types():
    with pytest.raises(TypeError, match="ParamReallocHook.source"):
        ParamReallocHook(source=3)
