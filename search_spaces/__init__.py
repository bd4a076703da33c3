"""Search spaces written in YAML, in Optuna's vocabulary: a file here (`space: default`
reads search_spaces/default.yaml), a path to one, or a mapping inline in the study spec.

    lambda_mmd: {type: float, low: 1.0, high: 100.0, log: true, families: [gmwae]}
    prior_overlap: {type: float, low: 0.005, high: 0.2, log: true}
    latent_dim: {type: int, low: 4, high: 16}
    K: {type: int, low: 8, high: 20}
    batch_size: {type: categorical, choices: [32, 64, 128]}
    lr: {type: float, low: 2.0e-4, high: 3.0e-3, log: true, paper: 1.0e-3}

Every key is a RunConfig key (bare or dotted). `families:` limits a parameter to some
families; a key only some families have (gmwae_core.config.FAMILY_ONLY: lambda_mmd) is
limited to them anyway. `by_family:` gives one family its own range, where a value means
something else on that family's loss (the options' weights: GM-VAE's ELBO is in nats, tens
of times GM-WAE's loss):

    consistency_weight: {type: float, low: 0.0, high: 8.0, by_family: {gmvae: {high: 100.0}}}

The paper point, enqueued first, is the paper's value of each searched key (K 10, d 10,
overlap 2*Phi(-2), lambda 10, or the parameter's `paper:`); a key without one is sampled; a
paper value outside its range means no paper point. A study spec's `points:` come next
(start_points), each completed with the paper point's values.
No computation happens in a suggest (OptunaSearch's rule for define-by-run spaces).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from gmwae_core import PAPER_PRIOR_OVERLAP
from gmwae_core.config import FAMILIES, FAMILY_ONLY, ConfigError, canonical_key

__all__ = ["SearchSpace", "Param", "SpaceError", "load_space", "space_names", "FOLDER", "PAPER"]

FOLDER = Path(__file__).parent
PAPER: dict[str, Any] = {"lambda_mmd": 10.0, "prior_overlap": PAPER_PRIOR_OVERLAP,
                         "latent_dim": 10, "K": 10}
"""The paper's setting of the knobs it names (Section 3)."""
TYPES = ("float", "int", "categorical")
FIELDS = {"type", "low", "high", "log", "step", "choices", "families", "paper", "by_family"}
FAMILY_FIELDS = FIELDS - {"type", "families", "by_family"}
"""What `by_family: {FAMILY: {...}}` may change: the range and the paper value."""


class SpaceError(ConfigError):
    """A search space broke a rule; the message names the parameter, the rule and the fix."""


def _fail(where: str, key: str, rule: str, value: Any, fix: str) -> None:
    raise SpaceError(f"{where}: `{key}` {rule}, but got {value!r}. {fix}")


@dataclass(frozen=True)
class Param:
    name: str
    """The config key as written (bare `K` or dotted `model.K`)."""
    type: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: tuple = ()
    families: tuple[str, ...] = FAMILIES
    paper: Any = None
    """The paper's value of this key (None: none; it is then sampled at the paper point)."""
    by_family: tuple[tuple[str, "Param"], ...] = ()
    """(family, this parameter as that family draws it) where `by_family:` gave one."""

    def for_family(self, family: str) -> "Param":
        """This parameter as `family` draws it: its own range where `by_family:` gave one."""
        return dict(self.by_family).get(family, self)

    def suggest(self, trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_categorical(self.name, list(self.choices))

    def allows(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in self.choices
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def describe(self) -> str:
        if self.type == "categorical":
            return f"{self.name}: one of {list(self.choices)}"
        scale = ", log" if self.log else ""
        low, high = (f"{self.low:g}", f"{self.high:g}")
        return f"{self.name}: {self.type} {low}..{high}{scale}"

    @property
    def widest(self) -> Any:
        """The value a step's memory is largest at (numbers: the highest)."""
        if self.type == "categorical":
            numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool)
                          for c in self.choices)
            return max(self.choices) if numeric else self.choices[0]
        return int(self.high) if self.type == "int" else self.high


@dataclass(frozen=True)
class SearchSpace:
    name: str
    params: tuple[Param, ...] = ()
    source: dict = field(default_factory=dict, compare=False)

    def of(self, family: str) -> tuple[Param, ...]:
        """The family's parameters, each with the family's own range (`by_family:`)."""
        return tuple(p.for_family(family) for p in self.params if family in p.families)

    def __call__(self, trial, family: str) -> dict[str, Any]:
        """Define-by-run: the family's searched values, as config keys."""
        return {p.name: p.suggest(trial) for p in self.of(family)}

    def keys(self, family: Optional[str] = None) -> set[str]:
        """Searched keys (canonical: model.K), for one family or any."""
        return {canonical_key(p.name) for p in self.params
                if family is None or family in p.families}

    def paper_point(self, family: str) -> Optional[dict[str, Any]]:
        """The paper's values of the searched keys that have one; None when one lies outside
        its range (the space does not allow the paper point)."""
        point = {}
        for p in self.of(family):
            value = self._paper_value(p)
            if value is None:
                continue
            if not p.allows(value):
                return None
            point[p.name] = int(value) if p.type == "int" else value
        return point

    def start_points(self, family: str, points: Sequence[dict] = (),
                     where: str = "points") -> list[dict[str, Any]]:
        """What the family's search runs first, in order (Optuna's enqueued trials): the
        paper point where the space allows it, then each of `points` (a study spec's
        `points:`) with the paper point's value of every key it leaves out; a key that
        neither gives is sampled."""
        paper = self.paper_point(family)
        return ([paper] if paper else []) + [
            {**(paper or {}), **self.point(family, values, f"{where}.{family}[{i}]")}
            for i, values in enumerate(points)]

    def point(self, family: str, values: Any, where: str) -> dict[str, Any]:
        """`values` (config keys, bare or dotted, to values) checked against the family's
        parameters and keyed by their names, as the search suggests them."""
        if not isinstance(values, dict) or not values:
            _fail(where, "point", "must be a non-empty mapping of searched keys to values",
                  values, "Write e.g. {consistency_weight: 4.0, balance_weight: 1.0}.")
        params = {canonical_key(p.name): p for p in self.of(family)}
        out: dict[str, Any] = {}
        for key, value in values.items():
            try:
                p = params.get(canonical_key(str(key)))
            except ConfigError as e:
                raise SpaceError(f"{where}: {e}") from None
            if p is None:
                _fail(where, key, f"is not searched for {family} (searched: "
                      f"{', '.join(q.name for q in self.of(family)) or 'nothing'})", value,
                      "Give only searched keys; a value for every trial goes in `fixed:`.")
            value = _number(value)
            if p.type == "int" and isinstance(value, float) and value.is_integer():
                value = int(value)
            numeric_ok = p.type == "categorical" or (
                not isinstance(value, bool) and (p.type == "float" or isinstance(value, int)))
            if not (numeric_ok and p.allows(value)):
                _fail(where, key, f"must be a value the space allows for {family} "
                      f"({p.describe()})", value, "Give one inside the range, or widen the space.")
            out[p.name] = float(value) if p.type == "float" else value
        return out

    @staticmethod
    def _paper_value(p: Param) -> Any:
        return p.paper if p.paper is not None else PAPER.get(p.name.split(".")[-1])

    def paper_point_note(self, family: str) -> str:
        point = self.paper_point(family)
        if point is None:
            out = [f"{p.name}={self._paper_value(p)}" for p in self.of(family)
                   if self._paper_value(p) is not None and not p.allows(self._paper_value(p))]
            return f"paper point: not enqueued ({', '.join(out)} outside the space)"
        if not point:
            return "paper point: none (no searched key has a paper value)"
        sampled = [p.name for p in self.of(family) if p.name not in point]
        text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in point.items())
        return f"paper point (enqueued first): {text}" + (
            f"; sampled: {', '.join(sampled)}" if sampled else "")

    def corners(self, family: str) -> list[dict[str, Any]]:
        """Every parameter at its lowest, then at its highest value (first and last choice)."""
        low = {p.name: (p.choices[0] if p.type == "categorical" else
                        int(p.low) if p.type == "int" else p.low) for p in self.of(family)}
        high = {p.name: (p.choices[-1] if p.type == "categorical" else
                         int(p.high) if p.type == "int" else p.high) for p in self.of(family)}
        return [low, high]

    def widest(self, family: str) -> dict[str, Any]:
        return {p.name: p.widest for p in self.of(family)}


def space_names() -> list[str]:
    """The shipped spaces: search_spaces/*.yaml."""
    return sorted(p.stem for p in FOLDER.glob("*.yaml"))


def load_space(space: str | dict) -> SearchSpace:
    """A space from its name (search_spaces/NAME.yaml), a YAML file's path, or a mapping."""
    if isinstance(space, dict):
        return _parse(space, "inline space", "inline")
    if not isinstance(space, str) or not space:
        raise SpaceError(f"`space` must name a search space ({', '.join(space_names())}), a "
                         f"YAML file or be a mapping of parameters, but got {space!r}. Use default.")
    path = FOLDER / f"{space}.yaml"
    if not path.is_file():
        path = Path(space)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        raise SpaceError(f"`space` {space!r} is neither a shipped space ({', '.join(space_names())}) "
                         f"nor a YAML file. Use one of those, a path to a file, or write the "
                         f"parameters inline (see search_spaces/default.yaml).")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpaceError(f"Search space {path} is not valid YAML: {e}") from None
    return _parse(d, f"search space {path}", path.stem if path.parent == FOLDER else str(path))


def _parse(d: Any, where: str, name: str) -> SearchSpace:
    if not isinstance(d, dict):
        raise SpaceError(f"{where} must be a mapping of config keys to parameters, but got "
                         f"{type(d).__name__}. See search_spaces/default.yaml.")
    params, seen = [], {}
    for key, spec in d.items():
        key = str(key)
        try:
            canonical = canonical_key(key)
        except ConfigError as e:
            raise SpaceError(f"{where}: {e}") from None
        if canonical in seen:
            _fail(where, key, f"names the same config key as `{seen[canonical]}`", key,
                  "Keep one of them.")
        seen[canonical] = key
        params.append(_param(key, spec, where))
    return SearchSpace(name, tuple(params), source=d)


def _number(value: Any) -> Any:
    """YAML 1.1 reads 1e-4 (no dot) as a string: take it as the number it means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _param(key: str, spec: Any, where: str) -> Param:
    """The parameter, checked, then each family's own (`by_family:`), checked the same way."""
    param = _one_param(key, spec, where)
    by_family = _by_family(key, spec, param.families, where)
    return replace(param, by_family=by_family) if by_family else param


def _one_param(key: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict):
        _fail(where, key, "must be a mapping with a type (float, int or categorical)", spec,
              "Write e.g. {type: float, low: 1.0, high: 100.0, log: true}.")
    unknown = sorted(set(spec) - FIELDS)
    if unknown:
        _fail(where, f"{key}.{unknown[0]}", f"is not a parameter field ({', '.join(sorted(FIELDS))})",
              unknown[0], "Remove it.")
    kind = spec.get("type")
    if kind not in TYPES:
        _fail(where, f"{key}.type", f"must be one of {list(TYPES)}", kind,
              "Use float or int with low/high, or categorical with choices.")
    own = FAMILY_ONLY.get(key.split(".")[-1], FAMILIES)
    families = spec.get("families", list(own))
    if isinstance(families, str):
        families = [families]
    if not isinstance(families, list) or not families:
        _fail(where, f"{key}.families", "must be a non-empty list of families", families,
              f"Use e.g. [{own[0]}], or leave it out for every family that has {key}.")
    for f in families:
        if f not in FAMILIES:
            _fail(where, f"{key}.families", f"may only contain {list(FAMILIES)}", families,
                  f"Use e.g. [{FAMILIES[0]}].")
        if f not in own:
            _fail(where, f"{key}.families", f"may only name families that have {key} "
                  f"({list(own)})", families, f"Use {list(own)}.")
    out = {"name": key, "type": kind, "families": tuple(families),
           "paper": _number(spec.get("paper"))}
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            _fail(where, f"{key}.choices", "must be a non-empty list", choices,
                  "Write e.g. choices: [32, 64, 128].")
        if any(k in spec for k in ("low", "high", "log", "step")):
            _fail(where, key, "is categorical: it takes choices, not low/high/log/step",
                  spec, "Remove low/high/log/step, or use type: float or int.")
        return Param(**out, choices=tuple(choices))
    if "choices" in spec:
        _fail(where, f"{key}.choices", f"belongs to categorical parameters, not {kind}",
              spec["choices"], "Use type: categorical, or low/high.")
    low, high, log, step = (_number(spec.get("low")), _number(spec.get("high")),
                            spec.get("log", False), _number(spec.get("step")))
    for bound, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(where, f"{key}.{bound}", "must be a finite number", value,
                  "Give both low and high, e.g. low: 1, high: 10.")
        if kind == "int" and not float(value).is_integer():
            _fail(where, f"{key}.{bound}", "must be a whole number for type int", value,
                  "Use type: float, or whole bounds.")
    if not low < high:
        _fail(where, f"{key}.low", f"must be below high ({high})", low,
              "Swap them, or fix the value in `fixed` instead of searching it.")
    if not isinstance(log, bool):
        _fail(where, f"{key}.log", "must be true or false", log, "Use log: true for a log scale.")
    if log and low <= 0:
        _fail(where, f"{key}.low", "must be > 0 with log: true", low,
              "Raise low above 0, or set log: false.")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float))
                             or step <= 0 or log):
        _fail(where, f"{key}.step", "must be a positive number, and cannot go with log: true",
              step, "Remove step, or set log: false.")
    return Param(**out, low=low, high=high, log=log, step=step)


def _by_family(key: str, spec: dict, families: tuple[str, ...],
               where: str) -> tuple[tuple[str, Param], ...]:
    """`by_family: {FAMILY: {low: .., high: ..}}`: each family's parameter, checked by the
    same rules as the parameter itself (the family's fields over the parameter's own)."""
    given = spec.get("by_family")
    if given is None:
        return ()
    if not isinstance(given, dict) or not given:
        _fail(where, f"{key}.by_family", "must map a family to the fields it changes", given,
              f"Write e.g. by_family: {{{families[-1]}: {{high: 100.0}}}}.")
    out = []
    for family, fields in given.items():
        if family not in families:
            _fail(where, f"{key}.by_family", f"may only name the parameter's families "
                  f"({list(families)})", family, f"Use one of {list(families)}.")
        if not isinstance(fields, dict) or not fields:
            _fail(where, f"{key}.by_family.{family}", "must be a mapping of fields to change",
                  fields, "Write e.g. {low: 0.0, high: 100.0}.")
        unknown = sorted(set(fields) - FAMILY_FIELDS)
        if unknown:
            _fail(where, f"{key}.by_family.{family}.{unknown[0]}", f"cannot differ by family "
                  f"(only {', '.join(sorted(FAMILY_FIELDS))} can)", unknown[0], "Remove it.")
        own = {k: v for k, v in spec.items() if k != "by_family"}
        out.append((family, _one_param(key, {**own, **fields}, f"{where} (by_family.{family})")))
    return tuple(out)
