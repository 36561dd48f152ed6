"""User reward files (realhf.impl.reward.custom) and reward specs (realhf.impl.reward.mixture)."""

import re
import textwrap

import pytest

from realhf.impl.reward.custom import adapt_reward_fn, load_reward_function
from realhf.impl.reward.mixture import ComponentFailure, RewardSpecError, build_mixture, normalize_spec

USER_FILE = textwrap.dedent('''
    NOT_A_FUNCTION = 3

    def full(prompt, completion, **metadata):
        return len(completion) + (100 if metadata.get("answer") == completion else 0)

    def only_answer(p, c, answer):
        return 1.0 if c == answer else 0.0

    def two_args(prompt, completion):
        return 0.5

    def one_arg(completion):
        return 1.0

    def returns_text(prompt, completion):
        return "high"

    def returns_nan(prompt, completion):
        return float("nan")

    def returns_bool(prompt, completion):
        return completion.startswith("yes")
''')


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(USER_FILE)
    return str(path)


def test_load_and_call_with_all_or_declared_metadata(user_file):
    meta = {"answer": "6", "id": "x", "reference": "6"}
    full = adapt_reward_fn(load_reward_function(user_file, "full"), "full")
    assert full("q", "6", meta) == 101.0
    only = adapt_reward_fn(load_reward_function(user_file, "only_answer"), "only_answer")
    assert only("q", "6", meta) == 1.0 and only("q", "7", meta) == 0.0
    two = adapt_reward_fn(load_reward_function(user_file, "two_args"), "two_args")
    assert two("q", "c", meta) == 0.5
    as_bool = adapt_reward_fn(load_reward_function(user_file, "returns_bool"), "returns_bool")
    assert as_bool("q", "yes!", {}) == 1.0 and as_bool("q", "no", {}) == 0.0


def test_the_file_runs_once_per_process(tmp_path):
    path = tmp_path / "counting.py"
    marker = tmp_path / "runs.txt"
    path.write_text(f"open({str(marker)!r}, 'a').write('x')\ndef f(p, c):\n    return 1.0\n")
    load_reward_function(str(path), "f")
    load_reward_function(str(path), "f")
    assert marker.read_text() == "x"


def test_missing_file_names_path_and_function(tmp_path):
    path = str(tmp_path / "nope.py")
    with pytest.raises(FileNotFoundError) as e:
        load_reward_function(path, "score")
    assert path in str(e.value) and "'score'" in str(e.value)


def test_unimportable_file_names_path_and_cause(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def f(:\n")
    with pytest.raises(ImportError) as e:
        load_reward_function(str(path), "f")
    assert str(path) in str(e.value) and "SyntaxError" in str(e.value)
    raising = tmp_path / "raising.py"
    raising.write_text("import no_such_module_for_reward_tests\n")
    with pytest.raises(ImportError, match="ModuleNotFoundError") as e:
        load_reward_function(str(raising), "f")
    assert str(raising) in str(e.value)


def test_missing_function_names_it_and_lists_what_exists(user_file):
    with pytest.raises(AttributeError) as e:
        load_reward_function(user_file, "compute_score")
    msg = str(e.value)
    assert "'compute_score'" in msg and user_file in msg and "only_answer" in msg


def test_not_callable_names_it(user_file):
    with pytest.raises(TypeError) as e:
        load_reward_function(user_file, "NOT_A_FUNCTION")
    assert "'NOT_A_FUNCTION'" in str(e.value) and user_file in str(e.value) and "int" in str(e.value)


def test_signature_and_result_checks(user_file):
    with pytest.raises(TypeError, match="one_arg.*prompt, completion"):
        adapt_reward_fn(load_reward_function(user_file, "one_arg"), "one_arg")
    text = adapt_reward_fn(load_reward_function(user_file, "returns_text"), "returns_text")
    with pytest.raises(TypeError, match="'high'"):
        text("q", "c", {})
    nan = adapt_reward_fn(load_reward_function(user_file, "returns_nan"), "returns_nan")
    with pytest.raises(ValueError, match="non-finite"):
        nan("q", "c", {})


# ------------------------------------------------------------------- mixtures
def test_spec_forms_normalize():
    assert normalize_spec("math") == [{"name": "math", "weight": 1.0}]
    assert normalize_spec({"name": "format", "weight": 2}) == [{"name": "format", "weight": 2.0}]
    assert normalize_spec(["math", {"name": "format", "weight": 0.1, "pattern": "x"}]) == [
        {"name": "math", "weight": 1.0}, {"name": "format", "weight": 0.1, "pattern": "x"}]


@pytest.mark.parametrize("spec,fragment", [
    ([], "non-empty list"),
    (["math", "mat"], re.escape("entry 1 ('mat'): unknown reward name 'mat'")),
    ([{"weight": 1.0}], re.escape("entry 0 ({'weight': 1.0}): unknown reward name None")),
    ([{"name": "math", "weight": "1"}], "entry 0 .*weight must be a finite number"),
    ([{"name": "math", "weight": float("inf")}], "weight must be a finite number"),
    ([{"name": "math", "weight": True}], "weight must be a finite number"),
    (["math", 3], "entry 1 \\(3\\): must be a name or a dict"),
    ([{"name": "math", "tolerance": 1}], "entry 0 .*reward 'math' has no option 'tolerance'; its options are \\['tol'\\]"),
    ([{"name:custom": None, "path:/r.py": None}], "entry 0 .*without a space, which YAML reads as one key"),
    ([{"name": "format", "pattern": "("}], "entry 0 .*error"),
    ([{"name": "custom", "path": "/nonexistent/r.py", "function": "f"}], "entry 0 .*/nonexistent/r.py"),
    ([{"name": "custom", "path": "/nonexistent/r.py"}], re.escape("reward 'custom' needs ['function']")),
])
def test_bad_specs_name_the_entry(spec, fragment):
    with pytest.raises(RewardSpecError, match=fragment):
        build_mixture(spec)


def test_weighted_mixture(user_file):
    mix = build_mixture([{"name": "math", "weight": 1.0}, {"name": "format", "weight": 0.1},
                         {"name": "custom", "path": user_file, "function": "two_args", "weight": -2.0}])
    assert mix.labels == ["math", "format", f"custom:two_args@{user_file}"]
    meta = {"reference": "6"}
    assert mix("q", "\\boxed{6}", meta) == pytest.approx(1.0 + 0.1 - 1.0)
    assert mix("q", "6", meta) == pytest.approx(1.0 + 0.0 - 1.0)
    assert mix("q", "\\boxed{5}", meta) == pytest.approx(0.0 + 0.1 - 1.0)


def test_a_failing_component_is_named(user_file):
    mix = build_mixture(["format", {"name": "custom", "path": user_file, "function": "returns_text"}])
    with pytest.raises(ComponentFailure) as e:
        mix("q", "c", {})
    assert e.value.label == f"custom:returns_text@{user_file}" and "TypeError" in e.value.cause
    with pytest.raises(ComponentFailure, match="math: ValueError: no reference answer"):
        build_mixture("math")("q", "\\boxed{1}", {})
