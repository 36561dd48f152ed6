import copy
import pickle

import numpy as np
import pytest
import torch

from realhf.base import namedarray
from realhf.base.namedarray import (NamedArray, flatten, from_dict, from_flattened, recursive_aggregate,
                                    recursive_apply)


def make_torch() -> NamedArray:
    return NamedArray(
        x=torch.arange(12, dtype=torch.float32).reshape(4, 3),
        y=torch.arange(4),
        z=None,
        nested=NamedArray(a=torch.ones(4, 2), b=None),
    )


def make_numpy() -> NamedArray:
    return NamedArray(x=np.arange(8.0).reshape(4, 2), y=np.arange(4))


class Sub(NamedArray):
    pass


def test_attribute_and_key_access():
    p = make_torch()
    assert p.x is p["x"]
    assert p.nested.a is p["nested"]["a"]
    assert p.z is None
    assert "x" in p and "nested" in p and "w" not in p
    assert list(p.keys()) == ["x", "y", "z", "nested"]
    assert [v is p[k] for k, v in p.items()] == [True] * 4
    assert [v is p[k] for v, k in zip(p.values(), p.keys())] == [True] * 4
    assert [v is p[k] for v, k in zip(iter(p), p.keys())] == [True] * 4
    assert len(p) == 4
    with pytest.raises(AttributeError, match="w"):
        _ = p.w
    with pytest.raises(KeyError, match="w"):
        _ = p["w"]


def test_adding_fields():
    p = NamedArray(x=torch.zeros(2))
    p.y = torch.ones(2)
    p["w"] = np.zeros(2)
    assert list(p.keys()) == ["x", "y", "w"]
    assert torch.equal(p.y, torch.ones(2))
    # Names of methods are usable as fields through string keys only.
    p["values"] = torch.full((2,), 7.0)
    assert torch.equal(p["values"], torch.full((2,), 7.0))
    assert callable(p.values)
    with pytest.raises(AttributeError, match="values"):
        p.values = torch.zeros(2)


def test_double_star_unpacking_and_dict():
    p = NamedArray(a=1, b=torch.tensor([2]))

    def f(a, b):
        return a, b

    a, b = f(**p)
    assert a == 1 and torch.equal(b, torch.tensor([2]))
    assert dict(p) == {"a": 1, "b": p.b}


@pytest.mark.parametrize("index", [1, slice(1, 3), [0, 2], "tensor", "mask"])
def test_indexing_slices_every_field(index):
    p = make_torch()
    p.register_metadata(note="kept")
    if index == "tensor":
        index = torch.tensor([3, 0])
    elif index == "mask":
        index = torch.tensor([True, False, True, False])
    q = p[index]
    assert type(q) is NamedArray
    assert torch.equal(q.x, p.x[index])
    assert torch.equal(q.y, p.y[index])
    assert q.z is None
    assert torch.equal(q.nested.a, p.nested.a[index])
    assert q.nested.b is None
    assert dict(q.metadata) == {"note": "kept"}


def test_indexing_numpy_and_subclass():
    p = make_numpy()
    q = p[np.array([3, 1])]
    np.testing.assert_array_equal(q.x, p.x[[3, 1]])
    np.testing.assert_array_equal(q.y, np.array([3, 1]))
    s = Sub(x=torch.arange(3))
    assert type(s[1:]) is Sub
    assert type(recursive_apply(s, lambda t: t * 2)) is Sub


def test_setitem_scalar_and_structured():
    p = make_torch()
    p[0] = 5
    assert torch.all(p.x[0] == 5) and p.y[0] == 5 and torch.all(p.nested.a[0] == 5)
    assert p.z is None
    src = NamedArray(x=torch.full((2, 3), -1.0), y=torch.tensor([7, 8]), z=None,
                     nested=NamedArray(a=torch.zeros(2, 2), b=None))
    p[1:3] = src
    assert torch.equal(p.x[1:3], src.x)
    assert p.y.tolist() == [5, 7, 8, 3]
    assert torch.equal(p.nested.a[1:3], torch.zeros(2, 2))
    # Untouched rows keep their values.
    assert torch.equal(p.x[3], torch.tensor([9.0, 10.0, 11.0]))


def test_setitem_mismatched_structure():
    p = make_torch()
    with pytest.raises(ValueError, match="missing fields"):
        p[0] = NamedArray(x=torch.zeros(3))
    with pytest.raises(ValueError):
        p[0] = NamedArray(x=torch.zeros(3), y=torch.tensor(0), z=None, nested=NamedArray(c=torch.zeros(2)))


def test_metadata_register_collision_pop_clear():
    p = make_torch()
    p.register_metadata(seqlens=[1, 2, 3, 4], source="unit")
    assert dict(p.metadata) == {"seqlens": [1, 2, 3, 4], "source": "unit"}
    with pytest.raises(TypeError):
        p.metadata["other"] = 1  # read-only view
    with pytest.raises(KeyError, match="x"):
        p.register_metadata(x=1)
    assert p.pop_metadata("source") == "unit"
    assert list(p.metadata) == ["seqlens"]
    with pytest.raises(KeyError):
        p.pop_metadata("source")
    p.clear_metadata()
    assert dict(p.metadata) == {}
    assert "seqlens" not in p  # metadata never shows up as a field


def test_pickle_and_deepcopy_keep_metadata():
    p = make_torch()
    p.register_metadata(seqlens=[3, 1])
    for q in (pickle.loads(pickle.dumps(p)), copy.deepcopy(p)):
        assert type(q) is NamedArray
        assert list(q.keys()) == list(p.keys())
        assert torch.equal(q.x, p.x) and q.x is not p.x
        assert torch.equal(q.nested.a, p.nested.a)
        assert q.z is None
        assert dict(q.metadata) == {"seqlens": [3, 1]}
    d = copy.deepcopy(p)
    d.x[0, 0] = 100.0
    d.register_metadata(extra=1)
    assert p.x[0, 0] == 0.0 and "extra" not in p.metadata
    s = pickle.loads(pickle.dumps(Sub(a=np.arange(2))))
    assert type(s) is Sub


def test_length_shape_size_to_dict_repr():
    p = make_torch()
    assert p.length() == 4
    assert p.length(1) == 3
    assert NamedArray(a=None, b=NamedArray(c=torch.zeros(2, 5))).length(1) == 5
    with pytest.raises(ValueError):
        p.length(3)
    assert p.shape == {"x": (4, 3), "y": (4,), "z": None, "nested": {"a": (4, 2), "b": None}}
    assert p.size() == 12 + 4 + 8
    d = p.to_dict()
    assert isinstance(d["nested"], dict) and d["nested"]["a"] is p.nested.a and d["z"] is None
    r = repr(p)
    assert "x=" in r and "(4, 3)" in r and "nested=NamedArray(" in r


def test_from_dict_nested_without_mutation():
    raw = {"a": np.arange(3), "b": {"c": torch.ones(3), "d": {}}, "e": None, "f": {}}
    before = dict(raw)
    p = from_dict(raw)
    assert raw == before and isinstance(raw["b"], dict) and raw["b"]["d"] == {}
    assert isinstance(p.b, NamedArray)
    assert p.b.d is None and p.e is None and p.f is None
    assert torch.equal(p.b.c, torch.ones(3))
    assert p[1:].shape == {"a": (2,), "b": {"c": (2,), "d": None}, "e": None, "f": None}


def test_recursive_aggregate_cat_and_stack():
    xs = [NamedArray(a=torch.full((i + 1,), float(i)), n=NamedArray(b=torch.tensor([i])))
          for i in range(3)]
    cat = recursive_aggregate(xs, torch.cat)
    assert cat.a.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    assert cat.n.b.tolist() == [0, 1, 2]
    ys = [NamedArray(a=np.full(2, i), b=None) for i in range(3)]
    st = recursive_aggregate(ys, np.stack)
    assert st.a.shape == (3, 2) and st.a[:, 0].tolist() == [0, 1, 2]
    assert st.b is None


def test_recursive_aggregate_fills_missing_with_zeros():
    xs = [NamedArray(a=torch.ones(2), m=None),
          NamedArray(a=torch.ones(2), m=torch.full((2,), 3.0)),
          NamedArray(a=torch.ones(2), m=None)]
    out = recursive_aggregate(xs, torch.stack)
    assert out.m.tolist() == [[0.0, 0.0], [3.0, 3.0], [0.0, 0.0]]
    nested = [NamedArray(n=None), NamedArray(n=NamedArray(v=np.ones(2)))]
    out = recursive_aggregate(nested, np.concatenate)
    assert out.n.v.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_recursive_aggregate_errors_name_the_field():
    xs = [NamedArray(outer=NamedArray(bad=torch.zeros(2, 2))),
          NamedArray(outer=NamedArray(bad=torch.zeros(2, 3)))]
    with pytest.raises(RuntimeError, match="outer.bad"):
        recursive_aggregate(xs, torch.cat)
    with pytest.raises(ValueError, match="outer"):
        recursive_aggregate([NamedArray(outer=NamedArray(a=1)), NamedArray(outer=NamedArray(b=1))], list)
    with pytest.raises(ValueError):
        recursive_aggregate([], torch.cat)


def test_recursive_apply_keeps_none_and_metadata():
    p = make_torch()
    p.register_metadata(seqlens=[1, 3])
    q = recursive_apply(p, lambda t: t.double() * 2)
    assert q.x.dtype == torch.float64 and torch.equal(q.x, p.x.double() * 2)
    assert q.z is None and q.nested.b is None
    assert dict(q.metadata) == {"seqlens": [1, 3]}
    with pytest.raises(AttributeError, match="nested.a"):
        recursive_apply(NamedArray(nested=NamedArray(a=3)), lambda t: t.double())


def test_flatten_round_trip():
    p = make_torch()
    flat = flatten(p)
    assert [k for k, _ in flat] == ["x", "y", "z", "nested.a", "nested.b"]
    q = from_flattened(flat)
    assert q.shape == p.shape
    assert torch.equal(q.nested.a, p.nested.a) and q.nested.b is None and q.z is None
    with pytest.raises(ValueError, match="a.b"):
        flatten(NamedArray(**{"a.b": 1}))


def test_split():
    p = NamedArray(a=torch.arange(7), b=np.arange(14).reshape(7, 2))
    parts = namedarray.split(p, 3)
    assert [q.length() for q in parts] == [3, 2, 2]
    assert torch.equal(torch.cat([q.a for q in parts]), p.a)
    np.testing.assert_array_equal(np.concatenate([q.b for q in parts]), p.b)
    with pytest.raises(ValueError):
        namedarray.split(p, 0)


def test_arithmetic_fieldwise():
    p = NamedArray(a=torch.tensor([1.0, 2.0]), b=np.array([3.0, 4.0]), c=None)
    p.register_metadata(tag=1)
    q = NamedArray(a=torch.tensor([10.0, 20.0]), b=np.array([1.0, 2.0]), c=None)
    s = p + q
    assert s.a.tolist() == [11.0, 22.0] and s.b.tolist() == [4.0, 6.0] and s.c is None
    assert dict(s.metadata) == {"tag": 1}
    assert (p - q).a.tolist() == [-9.0, -18.0]
    assert (p * 2).b.tolist() == [6.0, 8.0]
    assert (2 * p).a.tolist() == [2.0, 4.0]
    assert (p / 2).a.tolist() == [0.5, 1.0]
    assert (1 - p).b.tolist() == [-2.0, -3.0]
    assert (6 / p).a.tolist() == [6.0, 3.0]
    assert (np.float64(2) * p).b.tolist() == [6.0, 8.0]
    # In-place versions update the hosted arrays themselves.
    a_before, b_before = p.a, p.b
    p += q
    p *= 2
    assert p.a is a_before and p.b is b_before
    assert p.a.tolist() == [22.0, 44.0] and p.b.tolist() == [8.0, 12.0]
    p -= 2
    p /= 2
    assert p.a.tolist() == [10.0, 21.0] and p.c is None
    with pytest.raises(ValueError):
        _ = p + NamedArray(a=torch.zeros(2))
    with pytest.raises(ValueError, match="c"):
        _ = p + NamedArray(a=torch.zeros(2), b=np.zeros(2), c=np.zeros(2))
