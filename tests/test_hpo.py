"""accelops.hpo: search spaces, bracket arithmetic, the optimisers' ask/tell and BOHB's
kernel density estimators (the Study, its journal and executors: test_hpo_study.py)."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accelops import hpo
from accelops.hpo.space import Categorical, Float, Int, Ordinal, SearchSpace


def issue_space():
    return hpo.SearchSpace({
        "lr": hpo.Float(1e-5, 1e-1, log=True),
        "layers": hpo.Int(1, 8),
        "act": hpo.Categorical(["relu", "gelu"]),
        "width": hpo.Ordinal([64, 128, 256]),
        "optimizer": hpo.Categorical(["sgd", "adam"]),
        "momentum": hpo.Float(0.0, 0.99, condition=("optimizer", ["sgd"])),
    })


# ---------------------------------------------------------------------------------------
# search space
# ---------------------------------------------------------------------------------------

@st.composite
def spaces(draw):
    """Random spaces of every parameter type, some conditional on an earlier categorical."""
    n = draw(st.integers(1, 6))
    params = {}
    for i in range(n):
        kind = draw(st.sampled_from(["float", "flog", "int", "ilog", "cat", "ord"]))
        lo = draw(st.integers(1, 50))
        span = draw(st.integers(0, 1000))
        if kind == "float":
            p = Float(float(-lo), float(-lo + span + 1))
        elif kind == "flog":
            p = Float(lo * 1e-4, lo * 1e-4 * (span + 2), log=True)
        elif kind == "int":
            p = Int(-lo, -lo + span)
        elif kind == "ilog":
            p = Int(lo, lo + span, log=True)
        elif kind == "cat":
            p = Categorical(list(range(draw(st.integers(1, 5)))) + ["x"])
        else:
            p = Ordinal([2 ** k for k in range(draw(st.integers(1, 6)))])
        cats = [nm for nm, q in params.items() if isinstance(q, Categorical)]
        if cats and draw(st.booleans()):
            parent = draw(st.sampled_from(cats))
            p = type(p).from_spec({**p.spec(), "condition": (parent, [params[parent].values[0]])})
        params[f"p{i}"] = p
    return SearchSpace(params)


@settings(max_examples=60, deadline=None)
@given(space=spaces(), seed=st.integers(0, 2**32 - 1))
def test_space_samples_are_valid_and_round_trip(space, seed):
    rng = np.random.default_rng(seed)
    for _ in range(5):
        config = space.sample(rng)
        space.validate(config)                       # samples are valid
        assert set(config) == set(space.active(config))
        u = space.to_unit(config)
        assert u.shape == (len(space),)
        active = ~np.isnan(u)
        assert [space.names[i] for i in np.flatnonzero(active)] == list(config)  # NaN exactly when inactive
        assert np.all((u[active] >= 0) & (u[active] <= 1))
        back = space.from_unit(u)
        assert list(back) == list(config)
        for name, value in config.items():
            if space[name].kind == "float":
                assert math.isclose(back[name], value, rel_tol=1e-12, abs_tol=1e-12)
            else:
                assert back[name] == value and type(back[name]) is type(value)
        # decoding a full random vector drops the inactive entries and gives a valid config
        space.validate(space.from_unit(rng.random(len(space))))


@settings(max_examples=60, deadline=None)
@given(space=spaces(), seed=st.integers(0, 2**32 - 1))
def test_space_conditions_respected(space, seed):
    rng = np.random.default_rng(seed)
    for _ in range(5):
        config = space.sample(rng)
        for name, p in space.params.items():
            if p.condition is None:
                assert name in config
            else:
                parent, values = p.condition
                assert (name in config) == (config.get(parent, object()) in values)


@settings(max_examples=40, deadline=None)
@given(low=st.integers(-1000, 1000), span=st.integers(0, 1000), log=st.booleans())
def test_int_unit_cells_round_trip(low, span, log):
    if log:
        low = abs(low) + 1
    p = SearchSpace({"k": Int(low, low + span, log=log)})["k"]
    for k in {low, low + span // 2, low + span}:
        assert p.from_unit(p.to_unit(k)) == k
    assert p.from_unit(0.0) == low and p.from_unit(1.0) == low + span


def test_space_issue_example_and_defaults():
    space = issue_space()
    assert space.default() == {"lr": pytest.approx(1e-3), "layers": 5, "act": "relu", "width": 64,
                               "optimizer": "sgd", "momentum": pytest.approx(0.495)}
    assert Float(1e-4, 1e-2, log=True).from_unit(0.5) == pytest.approx(1e-3)
    c = {"lr": 1e-3, "layers": 2, "act": "gelu", "width": 128, "optimizer": "adam"}
    u = space.to_unit(c)
    np.testing.assert_allclose(u[:5], [0.5, 1.5 / 8, 0.75, 0.5, 0.75])
    assert np.isnan(u[5])
    assert SearchSpace.from_spec(space.spec()) == space


@pytest.mark.parametrize("make, match", [
    (lambda: Float(1.0, 1.0), "empty range"),
    (lambda: Float(2.0, 1.0), "empty range"),
    (lambda: Int(3, 2), "empty range"),
    (lambda: Float(0.0, 1.0, log=True), "includes 0 or less"),
    (lambda: Float(-1.0, 1.0, log=True), "includes 0 or less"),
    (lambda: Int(0, 10, log=True), "includes 0 or less"),
    (lambda: Float(0.0, math.inf), "finite"),
    (lambda: Categorical([]), "empty"),
    (lambda: Categorical(["a", "a"]), "duplicate"),
    (lambda: Float(0, 1, default=2.0), "default"),
    (lambda: SearchSpace({"x": Float(0, 1, condition=("nope", [1]))}), "unknown parent 'nope'"),
    (lambda: SearchSpace({"o": Categorical(["a", "b"]), "x": Float(0, 1, condition=("o", ["c"]))}),
     "can never be taken by parent 'o'"),
    (lambda: SearchSpace({"o": Categorical(["a", "b"]), "x": Float(0, 1, condition=("o", []))}), "no values"),
    (lambda: SearchSpace({"a": Categorical([1, 2], condition=("b", [1])),
                          "b": Categorical([1, 2], condition=("a", [1]))}), "cycle"),
    (lambda: SearchSpace({"a": Categorical([1, 2], condition=("a", [1]))}), "cycle"),
    (lambda: SearchSpace({}), "non-empty"),
])
def test_space_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_space_bad_types():
    with pytest.raises(TypeError, match="integer"):
        Int(1.5, 3)
    with pytest.raises(TypeError, match="JSON"):
        Categorical([object()])
    with pytest.raises(TypeError, match="condition"):
        Float(0, 1, condition="optimizer")


def test_space_validate_errors_name_the_parameter():
    space = issue_space()
    good = {"lr": 1e-3, "layers": 2, "act": "gelu", "width": 128, "optimizer": "sgd", "momentum": 0.5}
    space.validate(good)
    cases = [
        ({**good, "lr": 1.0}, "'lr'"),
        ({**good, "layers": 2.5}, "'layers'"),
        ({**good, "layers": 9}, "'layers'"),
        ({**good, "act": "tanh"}, "'act'"),
        ({**good, "width": 100}, "'width'"),
        ({**good, "extra": 1}, "unknown parameter"),
        ({k: v for k, v in good.items() if k != "momentum"}, "'momentum' is active"),
        ({**good, "optimizer": "adam"}, "'momentum' is inactive"),
    ]
    for config, match in cases:
        with pytest.raises(ValueError, match=match):
            space.validate(config)
        assert not space.is_valid(config)


def test_space_grid():
    space = issue_space()
    grid = list(space.grid(3))
    # lr 3 x layers 3 x act 2 x width 3 x (sgd with 3 momenta + adam)
    assert len(grid) == 3 * 3 * 2 * 3 * 4
    assert len({tuple(sorted(c.items())) for c in grid}) == len(grid)
    for c in grid:
        space.validate(c)
    assert sorted({c["lr"] for c in grid}) == pytest.approx([1e-5, 1e-3, 1e-1])
    grid = list(space.grid({"lr": 2, "layers": 1, "momentum": 1}))
    assert len(grid) == 2 * 1 * 2 * 3 * 2
    assert {c["layers"] for c in grid} == {5}
    assert sorted(Int(1, 3).grid(10)) == [1, 2, 3]
    with pytest.raises(ValueError, match="unknown"):
        list(space.grid({"nope": 3}))
    with pytest.raises(ValueError, match=">= 1"):
        list(space.grid(0))
