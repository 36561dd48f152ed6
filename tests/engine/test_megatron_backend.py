"""The megatron backend name fails clearly where it cannot run."""

import pytest

import realhf.impl.model.backend  # noqa: F401  (registers the backends)
from realhf.api.core import model_api
from realhf.impl.model.backend import megatron


@pytest.mark.skipif(not megatron.missing_requirements(), reason="megatron-core and CUDA are both present")
def test_megatron_backend_names_what_is_missing():
    with pytest.raises(RuntimeError) as e:
        model_api.make_backend("megatron")
    msg = str(e.value)
    assert "Backend 'megatron' cannot run here" in msg and "backend 'train'" in msg
    for reason in megatron.missing_requirements():
        assert reason in msg


def test_registered_backends():
    assert {"megatron", "train", "inference", "null"} <= set(model_api.BACKENDS.names())
