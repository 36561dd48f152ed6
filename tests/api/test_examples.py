"""The examples run as documented."""

import importlib.util
import os


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_custom_namedarray_dataset_is_packed_by_the_loader():
    from realhf.api.core import data_api

    try:
        batch = _load("custom_dataset").main()
    finally:
        data_api.DATASETS.unregister("reversed_words")
    lens = [s[0] for s in batch.seqlens["packed_input_ids"]]
    assert batch.bs == 8 and batch.data["packed_input_ids"].numel() == sum(lens)
    assert batch.seqlens["prompt_mask"] == batch.seqlens["packed_input_ids"]
    assert all(str(i).startswith("rank0-") for i in batch.ids)
    # Every item is "<words> => <words reversed></s>": prompt tokens come first.
    for m in batch.data["prompt_mask"].split(lens):
        n = int(m.sum())
        assert 0 < n < len(m) and bool(m[:n].all()) and not bool(m[n:].any())
