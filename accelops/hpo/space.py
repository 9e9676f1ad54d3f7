"""Search spaces: typed parameters, conditions, sampling and the unit-cube encoding.

A configuration is a plain dict holding the *active* parameters only (a conditional
parameter whose parent does not take one of the given values is absent). The encoding
maps a configuration to a vector in [0, 1]^d, one entry per parameter in declaration
order, NaN for inactive parameters; that vector is what the model-based optimisers
(BOHB's kernel density estimators) work on.

Encodings, chosen so that a uniform draw in the unit cube is the natural prior and
`from_unit(to_unit(c)) == c` holds exactly for every discrete value:

- Float: linear, or linear in log(x) when ``log=True``.
- Int: the cell [low - 0.5, high + 0.5] (in log space when ``log=True``) mapped onto
  [0, 1] and rounded, as ConfigSpace does, so every integer owns an equal cell on the
  linear scale; an integer encodes to the centre of its cell.
- Categorical / Ordinal with c values: value i owns [i/c, (i+1)/c) and encodes to its
  centre (i + 0.5)/c. BOHB reads the index back with floor(u * c).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterator, Mapping

import numpy as np

__all__ = ["Float", "Int", "Categorical", "Ordinal", "SearchSpace", "as_rng"]

# JSON scalars only, so a configuration always fits in a journal line unchanged.
_SCALARS = (str, int, float, bool, type(None))


def as_rng(rng) -> np.random.Generator:
    """A numpy Generator from a Generator, a seed (int) or None."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _check_number(name: str, value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what}: {name} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{what}: {name} must be finite, got {value!r}")
    return value


def _parse_condition(condition):
    if condition is None:
        return None
    if not (isinstance(condition, (tuple, list)) and len(condition) == 2 and isinstance(condition[0], str)):
        raise TypeError(
            f"condition must be a pair (parent_name, values), e.g. ('optimizer', ['sgd']), got {condition!r}"
        )
    parent, values = condition
    if isinstance(values, (list, tuple, set, frozenset)):
        values = list(values)
    else:
        values = [values]
    if not values:
        raise ValueError(f"condition on {parent!r} lists no values: the parameter could never be active")
    return (parent, tuple(values))


class Param:
    """Base of the parameter types. ``name`` is set when a SearchSpace adopts the parameter."""

    kind = "param"
    n_levels = 0  # 0: continuous in the model (Float, Int); c: c discrete levels
    unit_step = 0.0  # the smallest distance between two values in the unit cube (0: continuous)

    def __init__(self, default=None, condition=None):
        self.name: str | None = None
        self.condition = _parse_condition(condition)
        self._default = default

    # -- overridden -------------------------------------------------------------------
    def contains(self, value) -> bool:
        raise NotImplementedError

    def _describe_domain(self) -> str:
        raise NotImplementedError

    def to_unit(self, value) -> float:
        raise NotImplementedError

    def from_unit(self, u: float):
        raise NotImplementedError

    def grid(self, resolution: int) -> list:
        raise NotImplementedError

    def _spec_args(self) -> dict:
        raise NotImplementedError

    def _default_value(self):
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------
    @property
    def default(self):
        return self._default_value() if self._default is None else self._default

    def _check_default(self):
        if self._default is not None and not self.contains(self._default):
            raise ValueError(f"{type(self).__name__}: default {self._default!r} is not in {self._describe_domain()}")

    def check(self, value) -> None:
        if not self.contains(value):
            raise ValueError(f"parameter {self.name!r}: {value!r} is not in {self._describe_domain()}")

    def spec(self) -> dict:
        d = {"type": type(self).__name__, **self._spec_args()}
        if self._default is not None:
            d["default"] = self._default
        if self.condition is not None:
            d["condition"] = [self.condition[0], list(self.condition[1])]
        return d

    def _copy(self, name: str) -> "Param":
        p = type(self).from_spec(self.spec())
        p.name = name
        return p

    @classmethod
    def from_spec(cls, spec: Mapping) -> "Param":
        spec = dict(spec)
        kind = _TYPES[spec.pop("type")]
        if "condition" in spec:
            spec["condition"] = tuple(spec["condition"])
        return kind(**spec)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.spec().items() if k != "type")
        return f"{type(self).__name__}({args})"


class Float(Param):
    """A real parameter in [low, high], sampled uniformly (in log space when ``log``)."""

    kind = "float"

    def __init__(self, low, high, log: bool = False, default=None, condition=None):
        super().__init__(default, condition)
        _check_number("low", low, "Float")
        _check_number("high", high, "Float")
        if not low < high:
            raise ValueError(f"Float: empty range, low={low!r} must be < high={high!r}")
        if log and low <= 0:
            raise ValueError(f"Float: a log range needs low > 0, got low={low!r} (the range includes 0 or less)")
        self.low, self.high, self.log = float(low), float(high), bool(log)
        if log:
            self._a, self._b = math.log(self.low), math.log(self.high)
        else:
            self._a, self._b = self.low, self.high
        self._check_default()

    def contains(self, value) -> bool:
        return (
            isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool)
            and self.low <= float(value) <= self.high
        )

    def _describe_domain(self):
        return f"[{self.low!r}, {self.high!r}]" + (" (log)" if self.log else "")

    def to_unit(self, value) -> float:
        x = math.log(value) if self.log else float(value)
        return min(1.0, max(0.0, (x - self._a) / (self._b - self._a)))

    def from_unit(self, u: float) -> float:
        x = self._a + float(u) * (self._b - self._a)
        if self.log:
            x = math.exp(x)
        return min(self.high, max(self.low, x))

    def grid(self, resolution: int) -> list:
        us = [0.5] if resolution == 1 else np.linspace(0.0, 1.0, resolution)
        return [self.from_unit(u) for u in us]

    def _default_value(self):
        return self.from_unit(0.5)

    def _spec_args(self):
        return {"low": self.low, "high": self.high, "log": self.log}


class Int(Param):
    """An integer parameter in [low, high] (both included); ``log`` samples log-uniformly."""

    kind = "int"

    def __init__(self, low, high, log: bool = False, default=None, condition=None):
        super().__init__(default, condition)
        for nm, v in (("low", low), ("high", high)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"Int: {nm} must be an integer, got {v!r}")
        if not low <= high:
            raise ValueError(f"Int: empty range, low={low!r} must be <= high={high!r}")
        if log and low <= 0:
            raise ValueError(f"Int: a log range needs low >= 1, got low={low!r} (the range includes 0 or less)")
        self.low, self.high, self.log = int(low), int(high), bool(log)
        lo, hi = self.low - 0.5, self.high + 0.5
        self._a, self._b = (math.log(lo), math.log(hi)) if log else (lo, hi)
        if self.high == self.low:
            self.unit_step = 1.0
        elif log:  # the steps shrink with the value: the last one is the smallest
            self.unit_step = (math.log(self.high) - math.log(self.high - 1)) / (self._b - self._a)
        else:
            self.unit_step = 1.0 / (self._b - self._a)
        self._check_default()

    def contains(self, value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and self.low <= value <= self.high

    def _describe_domain(self):
        return f"the integers [{self.low}, {self.high}]" + (" (log)" if self.log else "")

    def to_unit(self, value) -> float:
        x = math.log(value) if self.log else float(value)
        return (x - self._a) / (self._b - self._a)

    def from_unit(self, u: float) -> int:
        x = self._a + float(u) * (self._b - self._a)
        if self.log:
            x = math.exp(x)
        return int(min(self.high, max(self.low, math.floor(x + 0.5))))

    def grid(self, resolution: int) -> list:
        us = [0.5] if resolution == 1 else np.linspace(0.0, 1.0, resolution)
        return sorted({self.from_unit(u) for u in us})

    def _default_value(self):
        return self.from_unit(0.5)

    def _spec_args(self):
        return {"low": self.low, "high": self.high, "log": self.log}


class _Discrete(Param):
    def __init__(self, values, default=None, condition=None):
        super().__init__(default, condition)
        what = type(self).__name__
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise TypeError(f"{what}: values must be a list, got {values!r}")
        values = list(values)
        if not values:
            raise ValueError(f"{what}: empty list of values")
        for v in values:
            if not isinstance(v, _SCALARS) or (isinstance(v, float) and not math.isfinite(v)):
                raise TypeError(
                    f"{what}: values must be str, int, finite float, bool or None "
                    f"(they are written to the journal as JSON), got {v!r}"
                )
        keys = [_key(v) for v in values]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{what}: duplicate values in {values!r}")
        self.values = values
        self._index = {k: i for i, k in enumerate(keys)}
        self.n_levels = len(values)
        self.unit_step = 1.0 / len(values)
        self._check_default()

    def index(self, value) -> int:
        return self._index[_key(value)]

    def contains(self, value) -> bool:
        return isinstance(value, _SCALARS) and _key(value) in self._index

    def _describe_domain(self):
        return f"{self.values!r}"

    def to_unit(self, value) -> float:
        return (self.index(value) + 0.5) / self.n_levels

    def from_unit(self, u: float):
        return self.values[min(self.n_levels - 1, max(0, int(math.floor(float(u) * self.n_levels))))]

    def grid(self, resolution: int) -> list:
        return list(self.values)

    def _default_value(self):
        return self.values[0]

    def _spec_args(self):
        return {"values": list(self.values)} if isinstance(self, Ordinal) else {"choices": list(self.values)}


def _key(v):
    # 1 == 1.0 == True in Python; as parameter values they are different choices.
    return (type(v).__name__ if not isinstance(v, (int, float)) or isinstance(v, bool) else "num", v)


class Categorical(_Discrete):
    """Unordered choices (the model uses an Aitchison-Aitken kernel)."""

    kind = "categorical"

    def __init__(self, choices, default=None, condition=None):
        super().__init__(choices, default, condition)

    @property
    def choices(self):
        return self.values


class Ordinal(_Discrete):
    """Ordered values (the model uses a Wang-Ryzin kernel on their ranks)."""

    kind = "ordinal"

    def __init__(self, values, default=None, condition=None):
        super().__init__(values, default, condition)


_TYPES = {"Float": Float, "Int": Int, "Categorical": Categorical, "Ordinal": Ordinal}


class SearchSpace:
    """Named parameters with optional conditions ``condition=(parent, values)``.

    A conditional parameter is active when its parent is active and takes one of the
    values; conditions may chain. Unknown parents, values the parent cannot take and
    cycles are ``ValueError`` at construction.
    """

    def __init__(self, params: Mapping[str, Param]):
        if not isinstance(params, Mapping) or not params:
            raise ValueError("SearchSpace needs a non-empty dict {name: parameter}")
        self.params: dict[str, Param] = {}
        for name, p in params.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"parameter names must be non-empty strings, got {name!r}")
            if not isinstance(p, Param):
                raise TypeError(f"parameter {name!r} must be Float, Int, Categorical or Ordinal, got {p!r}")
            self.params[name] = p._copy(name)
        self.names = list(self.params)
        self._pos = {n: i for i, n in enumerate(self.names)}
        for name, p in self.params.items():
            if p.condition is None:
                continue
            parent, values = p.condition
            if parent not in self.params:
                raise ValueError(
                    f"parameter {name!r}: condition on unknown parent {parent!r} (parameters: {self.names})"
                )
            bad = [v for v in values if not self.params[parent].contains(v)]
            if bad:
                raise ValueError(
                    f"parameter {name!r}: condition values {bad!r} can never be taken by "
                    f"parent {parent!r}, whose domain is {self.params[parent]._describe_domain()}"
                )
        self.order = self._topological_order()
        self.kinds = [p.kind for p in self.params.values()]
        self.n_levels = np.array([p.n_levels for p in self.params.values()], dtype=np.int64)
        self.unit_steps = np.array([p.unit_step for p in self.params.values()], dtype=np.float64)

    def _topological_order(self) -> list[str]:
        order, state = [], {}
        for start in self.names:
            path = []
            node = start
            # Each parameter has at most one parent, so a walk up the chain finds any cycle.
            while node is not None and state.get(node) != "done":
                if node in path:
                    cycle = path[path.index(node) :] + [node]
                    raise ValueError("conditions form a cycle: " + " -> ".join(repr(c) for c in cycle))
                path.append(node)
                cond = self.params[node].condition
                node = cond[0] if cond else None
            for n in reversed(path):
                if state.get(n) != "done":
                    state[n] = "done"
                    order.append(n)
        return order

    def __len__(self):
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def __getitem__(self, name) -> Param:
        return self.params[name]

    def __repr__(self):
        inner = ", ".join(f"{n!r}: {p!r}" for n, p in self.params.items())
        return f"SearchSpace({{{inner}}})"

    def __eq__(self, other):
        return isinstance(other, SearchSpace) and self.spec() == other.spec()

    # -- conditions ---------------------------------------------------------------------
    def _active(self, values: Mapping[str, Any]) -> dict[str, bool]:
        """Which parameters are active given (at least) the values of the active parents."""
        active = {}
        for n in self.order:
            cond = self.params[n].condition
            if cond is None:
                active[n] = True
            else:
                parent, allowed = cond
                active[n] = active[parent] and parent in values and _key(values[parent]) in {_key(a) for a in allowed}
        return active

    def active(self, config: Mapping[str, Any]) -> list[str]:
        """Names of the parameters active in ``config`` (declaration order)."""
        act = self._active(config)
        return [n for n in self.names if act[n]]

    # -- sampling and encoding ----------------------------------------------------------
    def sample(self, rng=None) -> dict:
        """One configuration drawn from the prior (uniform in the unit cube)."""
        rng = as_rng(rng)
        return self.from_unit(rng.random(len(self.names)))

    def from_unit(self, vector) -> dict:
        """Decode a vector in [0, 1]^d; entries of inactive parameters are ignored (may be NaN)."""
        v = np.asarray(vector, dtype=np.float64)
        if v.shape != (len(self.names),):
            raise ValueError(f"from_unit: expected a vector of length {len(self.names)}, got shape {v.shape}")
        values = {}
        for n in self.order:
            cond = self.params[n].condition
            if cond is not None:
                parent, allowed = cond
                if parent not in values or _key(values[parent]) not in {_key(a) for a in allowed}:
                    continue
            u = v[self._pos[n]]
            if math.isnan(u):
                raise ValueError(f"from_unit: parameter {n!r} is active but its entry is NaN")
            values[n] = self.params[n].from_unit(min(1.0, max(0.0, u)))
        return {n: values[n] for n in self.names if n in values}

    def to_unit(self, config: Mapping[str, Any]) -> np.ndarray:
        """Encode a (valid) configuration; inactive parameters are NaN."""
        self.validate(config)
        v = np.full(len(self.names), np.nan)
        for n, value in config.items():
            v[self._pos[n]] = self.params[n].to_unit(value)
        return v

    def validate(self, config: Mapping[str, Any]) -> dict:
        """Raise ValueError/TypeError naming the parameter unless ``config`` is a valid
        configuration: known names, values in their domains, every active parameter
        present and no inactive one. Returns the config."""
        if not isinstance(config, Mapping):
            raise TypeError(f"a configuration must be a dict, got {type(config).__name__}")
        unknown = [k for k in config if k not in self.params]
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown}; the space has {self.names}")
        for n, value in config.items():
            self.params[n].check(value)
        act = self._active(config)
        for n in self.names:
            if act[n] and n not in config:
                raise ValueError(f"parameter {n!r} is active in this configuration but missing")
            if not act[n] and n in config:
                parent, allowed = self.params[n].condition
                raise ValueError(
                    f"parameter {n!r} is inactive (its parent {parent!r} is "
                    f"{config.get(parent, '<inactive>')!r}, not one of {list(allowed)!r}) "
                    "but present"
                )
        return dict(config)

    def is_valid(self, config) -> bool:
        try:
            self.validate(config)
        except (ValueError, TypeError):
            return False
        return True

    def default(self) -> dict:
        """Every parameter at its default (midpoint, geometric midpoint, first choice), inactive ones dropped."""
        values = {n: p.default for n, p in self.params.items()}
        act = self._active(values)
        return {n: values[n] for n in self.names if act[n]}

    def grid(self, resolution: int | Mapping[str, int] = 5) -> Iterator[dict]:
        """Every combination of the per-parameter grids, inactive parameters dropped and
        duplicates (that differ only in inactive parameters) skipped. ``resolution`` is the
        number of points for continuous parameters (ends included), an int for all or a dict
        per name (others get 5); categorical and ordinal parameters use all their values."""
        if isinstance(resolution, Mapping):
            unknown = [k for k in resolution if k not in self.params]
            if unknown:
                raise ValueError(f"resolution names unknown parameter(s) {unknown}")
            res = {n: resolution.get(n, 5) for n in self.names}
        else:
            res = {n: resolution for n in self.names}
        for n, r in res.items():
            if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
                raise ValueError(f"resolution for {n!r} must be an integer >= 1, got {r!r}")
        axes = [self.params[n].grid(int(res[n])) for n in self.names]
        seen = set()
        for combo in itertools.product(*axes):
            values = dict(zip(self.names, combo))
            act = self._active(values)
            config = {n: values[n] for n in self.names if act[n]}
            key = tuple((n, _key(v)) for n, v in config.items())
            if key in seen:
                continue
            seen.add(key)
            yield config

    # -- serialisation (journal headers) ------------------------------------------------
    def spec(self) -> dict:
        return {n: p.spec() for n, p in self.params.items()}

    @classmethod
    def from_spec(cls, spec: Mapping) -> "SearchSpace":
        return cls({n: Param.from_spec(s) for n, s in spec.items()})
