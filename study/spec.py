"""Study specs: YAML files validated into a frozen StudySpec (unknown keys are errors).

    name: quickstart
    families: [gmwae, gmvae]
    space: default            # search_spaces/default.yaml, a YAML file, or the parameters inline
    dataset: mnist
    data_dir: null            # default: $GMWAE_DATA_DIR
    preset: cpu               # gmwae_core preset the searched values override
    fixed: {eval_size: 1000}  # RunConfig values fixed for every trial
    metric: val/cluster_acc   # what the search optimises: any val/ metric (val/ami when K is searched)
    mode: max                 # max or min; default: the metric's own direction
    trials: 6                 # per family: the same budget for both
    points:                   # run first, after the paper point; other keys: the paper point's
      gmwae: [{consistency_weight: 4.0, balance_weight: 1.0}]
    max_iterations: 3         # reports per trial
    steps_per_iteration: 400  # null: one epoch
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # or {type: none}
    resources: {cpu: 1, gpu: 0}
    max_concurrent: 2
    seed: 0
    storage:
      optuna: sqlite:///runs/{name}/optuna.db
      mlflow: sqlite:///runs/{name}/mlflow.db
      ray: runs/{name}/ray
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from gmwae_core.config import (DATASETS, FAMILIES, PRESETS, UNLABELLED_DATASETS, ConfigError,
                               RunConfig, canonical_key, coerce_field, reject_unknown_keys)

from .objective import LABEL_FREE_METRIC, Objective, default_metric, label_free_metrics

__all__ = ["StudySpec", "Scheduler", "Resources", "Storage", "load_spec", "SpecError",
           "apply_sets"]


class SpecError(ConfigError):
    """A study spec broke a rule; the message names the key, the value and the fix."""


def _fail(key: str, rule: str, value: Any, fix: str) -> None:
    raise SpecError(f"`{key}` {rule}, but got {value!r}. {fix}")


@dataclass(frozen=True)
class Scheduler:
    type: str = "asha"
    """asha (Tune's ASHAScheduler on the study's metric) or none."""
    grace_period: int = 1
    """Iterations every trial gets before ASHA may stop it."""
    reduction_factor: int = 2
    """ASHA keeps 1/reduction_factor of the trials at each rung."""

    def __post_init__(self) -> None:
        if self.type not in ("asha", "none"):
            _fail("scheduler.type", "must be asha or none", self.type, "Use asha.")
        if self.grace_period < 1:
            _fail("scheduler.grace_period", "must be at least 1", self.grace_period, "Use 1.")
        if self.reduction_factor < 2:
            _fail("scheduler.reduction_factor", "must be at least 2", self.reduction_factor, "Use 2.")


@dataclass(frozen=True)
class Resources:
    cpu: float = 1.0
    """CPUs per trial (1 on a 2-core machine runs two trials at once)."""
    gpu: float = 0.0
    """GPUs per trial; fractions share a GPU (0.25: four trials per GPU)."""
    gpu_memory_gb: Optional[float] = None
    """Memory of one GPU of the nodes that run trials (24 for an A10G, 80 for an H100):
    with it, the widest trial's estimated need sizes `gpu` or refuses the study."""

    def __post_init__(self) -> None:
        if not self.cpu > 0:
            _fail("resources.cpu", "must be positive", self.cpu, "Use 1.")
        if self.gpu < 0:
            _fail("resources.gpu", "must be >= 0", self.gpu, "Use 0 on a CPU machine.")
        if self.gpu_memory_gb is not None and not self.gpu_memory_gb > 0:
            _fail("resources.gpu_memory_gb", "must be positive (GiB of one GPU)",
                  self.gpu_memory_gb, "Use 24 for an A10G, 80 for an H100, or leave it out.")


@dataclass(frozen=True)
class Storage:
    optuna: str = "sqlite:///runs/{name}/optuna.db"
    """Optuna storage URL (sqlite:///FILE, or postgresql://... on a cluster)."""
    mlflow: str = "sqlite:///runs/{name}/mlflow.db"
    """MLflow tracking URI (sqlite:///FILE, or http://HOST:PORT for a server)."""
    ray: str = "runs/{name}/ray"
    """Ray Tune storage_path: a local folder, or a shared one (NFS, s3://) on a cluster."""


@dataclass(frozen=True)
class StudySpec:
    name: str
    """Names the Optuna studies ({name}/{family}), the MLflow experiment and the Ray run."""
    families: tuple[str, ...] = FAMILIES
    """Which families to search: gmwae, gmvae or both; each gets `trials` trials."""
    space: Any = "default"
    """A shipped space's name (search_spaces/NAME.yaml), a YAML file's path, or the
    parameters inline as a mapping (search_spaces: Optuna's vocabulary)."""
    dataset: str = "mnist"
    """mnist, fashion-mnist, digits (scikit-learn's, offline), synthetic, or images: your
    own images without labels (a folder of image files or an .npy array, at `data_dir`)."""
    data_dir: Optional[str] = None
    """Folder with the dataset's IDX files (gzipped or not); None: $GMWAE_DATA_DIR. For
    dataset images: the folder of image files or the .npy array (required)."""
    preset: str = "cpu"
    """The gmwae_core preset (cpu or paper) that fixed and searched values override."""
    fixed: dict = field(default_factory=dict)
    """RunConfig values fixed for every trial (bare or dotted keys)."""
    metric: Optional[str] = None
    """The validation metric the search optimises (study.objective); None: val/ami when
    the space searches K (comparable across K), else val/cluster_acc; on images without
    labels, val/augment_mi (metrics that read labels are refused there)."""
    mode: Optional[str] = None
    """max or min; None: the metric's own direction."""
    trials: int = 6
    """Trials per family; every family gets the same budget."""
    points: dict = field(default_factory=dict)
    """Per family, points the search runs first, in order, after the paper point (Optuna's
    enqueued trials), each with the paper point's value of every searched key it leaves
    out: {gmwae: [{consistency_weight: 4.0, balance_weight: 1.0}]}. They count in `trials`
    (with fewer trials, the first ones run); a resumed study enqueues none."""
    max_iterations: int = 3
    """Reports per trial: ASHA compares trials at these, and a trial ends after the last."""
    steps_per_iteration: Optional[int] = None
    """Training steps between two reports; None: one epoch."""
    scheduler: Scheduler = field(default_factory=Scheduler)
    """Early stopping of trials (the `scheduler.*` keys below)."""
    resources: Resources = field(default_factory=Resources)
    """What one trial asks of the cluster (the `resources.*` keys below)."""
    max_concurrent: int = 2
    """Trials running at once, over both families."""
    max_failures: int = 2
    """Times Tune retries a trial that died (a lost node, an error), from its last checkpoint."""
    seed: int = 0
    """Seed of the Optuna samplers and of every trial's training."""
    storage: Storage = field(default_factory=Storage)
    """Where the study's records live (the `storage.*` keys below; {name} is the study's name)."""
    run_families: str = "together"
    """together: both families' trials in one Tune run, sharing the cluster (each keeps its
    own Optuna study, budget and ASHA); in_turn: one family after the other."""
    node_wait_minutes: float = 20.0
    """How long trials may all wait for nodes (none running) before the study stops and
    says what it asked for and what the cluster has; an autoscaled GPU node takes minutes."""

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            _fail("name", "must be letters, digits, - or _", self.name, "Use e.g. quickstart.")
        if not self.families:
            _fail("families", "must name at least one family", list(self.families),
                  "Use [gmwae, gmvae].")
        for fam in self.families:
            if fam not in FAMILIES:
                _fail("families", f"may only contain {list(FAMILIES)}", list(self.families),
                      "Use [gmwae, gmvae].")
        if len(set(self.families)) != len(self.families):
            _fail("families", "must not repeat a family", list(self.families), "List each once.")
        space = self.search_space  # a SpaceError (a SpecError's sibling) names the parameter
        searched = space.keys()
        for key in self.fixed:
            try:
                canonical = canonical_key(str(key))
            except ConfigError as e:
                raise SpecError(f"`fixed.{key}`: {e}") from None
            if canonical in searched:
                param = next(p for p in space.params if canonical_key(p.name) == canonical)
                _fail(f"fixed.{key}", f"is also searched by the space ({param.describe()}); a "
                      f"value cannot be both fixed and searched", self.fixed[key],
                      f"Remove {key} from `fixed`, or search a space without it (write the "
                      f"space inline under `space:`, or in a file).")
        if self.dataset not in DATASETS:
            _fail("dataset", f"must be one of {list(DATASETS)}", self.dataset, "Use mnist or digits.")
        if self.preset not in PRESETS:
            _fail("preset", f"must be one of {list(PRESETS)}", self.preset, "Use cpu or paper.")
        if self.trials < 1:
            _fail("trials", "must be at least 1 (trials per family)", self.trials, "Use 6.")
        for family in self.points:
            if family not in self.families:
                _fail(f"points.{family}", f"must name a family the study searches "
                      f"({list(self.families)})", self.points[family],
                      f"Remove it, or add {family} to `families`.")
        for family in self.families:  # each point must make a valid run config, before any trial
            for start in self.search_space.start_points(family, self.points.get(family, ())):
                self.run_config(family, start)
        if self.max_iterations < 1:
            _fail("max_iterations", "must be at least 1", self.max_iterations, "Use 3.")
        if self.steps_per_iteration is not None and self.steps_per_iteration < 1:
            _fail("steps_per_iteration", "must be at least 1 when given", self.steps_per_iteration,
                  "Leave it null for one epoch per iteration.")
        if self.max_failures < 0:
            _fail("max_failures", "must be >= 0", self.max_failures, "Use 2 (0: never retry).")
        if self.run_families not in ("together", "in_turn"):
            _fail("run_families", "must be together or in_turn", self.run_families,
                  "Use together (the default).")
        if not self.node_wait_minutes > 0:
            _fail("node_wait_minutes", "must be positive", self.node_wait_minutes, "Use 20.")
        if self.max_concurrent < 1:
            _fail("max_concurrent", "must be at least 1", self.max_concurrent, "Use 2.")
        labelled = self.dataset not in UNLABELLED_DATASETS
        if self.metric is None:
            object.__setattr__(self, "metric", default_metric(self.searched_keys(), labelled))
        try:
            objective = Objective(self.metric, self.mode)
        except ConfigError as e:
            raise SpecError(str(e)) from None
        if objective.reads_labels and not labelled:
            _fail("metric", f"must read the images alone (dataset {self.dataset} has no labels)",
                  self.metric,
                  f"Use metric: {LABEL_FREE_METRIC}, or another metric that reads the images "
                  f"alone: {', '.join(label_free_metrics())}.")
        object.__setattr__(self, "mode", objective.mode)
        self.run_config(self.families[0], {})  # the fixed values must make a valid run config
        for family in self.families:  # and so must the space's corners, before any trial
            for corner in space.corners(family):
                self.run_config(family, corner)

    @functools.cached_property
    def search_space(self):
        """The space, parsed once (search_spaces.SearchSpace)."""
        from search_spaces import SpaceError, load_space

        try:
            return load_space(self.space)
        except SpaceError as e:
            raise SpecError(str(e)) from None

    def start_points(self, family: str) -> list[dict[str, Any]]:
        """What the family's search runs first: the paper point, then `points` (completed),
        as many as `trials` allows (`--trials 1` runs the paper point alone)."""
        return self.search_space.start_points(family, self.points.get(family, ()))[:self.trials]

    def start_origins(self, family: str) -> tuple[str, ...]:
        """What each of start_points is: "paper point", then "points[i]"."""
        paper = ("paper point",) if self.search_space.paper_point(family) else ()
        given = tuple(f"points[{i}]" for i in range(len(self.points.get(family, ()))))
        return (paper + given)[:self.trials]

    def searched_keys(self) -> set[str]:
        """The config keys (bare names: K, lr) the space searches for any of the families."""
        return {key.split(".")[-1] for family in self.families
                for key in self.search_space.keys(family)}

    @property
    def objective(self) -> Objective:
        """The metric the search optimises and its direction, as one value."""
        return Objective(self.metric, self.mode)

    def run_config(self, family: str, params: dict[str, Any]) -> RunConfig:
        """The RunConfig of one trial: preset, then dataset and fixed values, then params."""
        from gmwae_core import from_preset

        base = {"dataset": self.dataset, "data_dir": self.data_dir, "seed": self.seed,
                "epochs": 1_000_000}
        try:
            return from_preset(self.preset, {**base, **self.fixed, **params}, family=family)
        except ConfigError as e:
            raise SpecError(f"In the study spec's `fixed` or search space: {e}") from None

    def store(self, which: str) -> str:
        """A store location with {name} filled in and ${VAR} taken from the environment
        (how a password reaches a study without being written in its spec)."""
        import os
        import re

        value = getattr(self.storage, which).replace("{name}", self.name)
        missing = [v for v in re.findall(r"\$\{(\w+)\}", value) if v not in os.environ]
        if missing:
            raise SpecError(f"`storage.{which}` uses ${{{missing[0]}}}, but the environment variable "
                            f"{missing[0]} is not set. Export it (e.g. `export {missing[0]}=$(cat "
                            f"FILE)`) before running the study.")
        return os.path.expandvars(value)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["families"] = list(self.families)
        return d


_NESTED = {"scheduler": Scheduler, "resources": Resources, "storage": Storage}


def spec_from_dict(d: Any, source: str = "spec") -> StudySpec:
    """Validate a parsed spec; every problem is a SpecError that names `source`."""
    try:
        return _spec_from_dict(d, source)
    except SpecError:
        raise
    except ConfigError as e:
        raise SpecError(f"{source}: {e}") from None


def _spec_from_dict(d: Any, source: str) -> StudySpec:
    if not isinstance(d, dict):
        raise SpecError(f"{source} must be a YAML mapping of keys to values, but got "
                        f"{type(d).__name__}. See studies/smoke.yaml for an example.")
    reject_unknown_keys(d, {f.name for f in fields(StudySpec)}, "")
    if "name" not in d:
        raise SpecError(f"{source} lacks `name`. Add e.g. `name: my-study`.")
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        if key in _NESTED:
            cls = _NESTED[key]
            if isinstance(value, str) and key == "scheduler":
                value = {"type": value}
            if not isinstance(value, dict):
                raise SpecError(f"`{key}` must be a mapping, but got {value!r}. "
                                f"Keys: {', '.join(f.name for f in fields(cls))}.")
            reject_unknown_keys(value, {f.name for f in fields(cls)}, key + ".")
            kwargs[key] = cls(**{k: coerce_field(cls, k, v, key + ".") for k, v in value.items()})
        elif key == "families":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list):
                raise SpecError(f"`families` must be a list, but got {value!r}. Use [gmwae, gmvae].")
            kwargs[key] = tuple(value)
        elif key == "fixed":
            if not isinstance(value, dict):
                raise SpecError(f"`fixed` must be a mapping of config keys, but got {value!r}.")
            kwargs[key] = dict(value)
        elif key == "points":
            kwargs[key] = _points(value)
        elif key == "space":
            if not isinstance(value, (str, dict)):
                raise SpecError(f"`space` must name a search space or be a mapping of "
                                f"parameters, but got {value!r}. Use default.")
            kwargs[key] = dict(value) if isinstance(value, dict) else value
        else:
            kwargs[key] = coerce_field(StudySpec, key, value, "")
    return StudySpec(**kwargs)


def _points(value: Any) -> dict[str, tuple[dict, ...]]:
    """`points:` as parsed: family -> its points (one mapping alone is a list of one)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"`points` must map families to lists of points, but got {value!r}. "
                        f"Write e.g. points: {{gmwae: [{{consistency_weight: 4.0}}]}}.")
    out = {}
    for family, points in value.items():
        if isinstance(points, dict):
            points = [points]
        if not isinstance(points, (list, tuple)) or not all(isinstance(p, dict) for p in points):
            raise SpecError(f"`points.{family}` must be a list of mappings (searched key: "
                            f"value), but got {points!r}. Write e.g. [{{consistency_weight: 4.0}}].")
        out[str(family)] = tuple(dict(p) for p in points)
    return out


def apply_sets(d: dict, sets: Sequence[str]) -> dict:
    """`d` (a parsed spec) with each "KEY=VALUE" of `sets` applied; KEY may be dotted
    (storage.ray, resources.gpu, fixed.lambda_mmd), VALUE is read as YAML (1, 0.25, true,
    [gmwae], s3://bucket/ray). The result is validated by spec_from_dict as usual."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    top = {f.name for f in fields(StudySpec)}
    for item in sets:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecError(f"`--set` takes KEY=VALUE, but got {item!r}. Use e.g. "
                            f"--set storage.ray=s3://bucket/ray or --set trials=8.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        head, _, rest = key.partition(".")
        if head not in top:
            raise SpecError(f"`--set {key}`: {head!r} is not a study spec key. Keys: "
                            f"{', '.join(sorted(top))} (nested: storage.optuna, resources.gpu, "
                            f"fixed.KEY, ...).")
        if not rest:
            out[head] = value
            continue
        if head != "fixed" and head not in _NESTED:
            raise SpecError(f"`--set {key}`: {head!r} has no sub-keys. Use --set {head}=VALUE.")
        if head in _NESTED and rest not in {f.name for f in fields(_NESTED[head])}:
            raise SpecError(f"`--set {key}`: {rest!r} is not a key of `{head}`. Keys: "
                            f"{', '.join(f.name for f in fields(_NESTED[head]))}.")
        nested = out.get(head)
        if isinstance(nested, str) and head == "scheduler":
            nested = {"type": nested}
        out[head] = {**(nested if isinstance(nested, dict) else {}), rest: value}
    return out


def load_spec(path: str | Path, overrides: Optional[dict[str, Any]] = None,
              sets: Sequence[str] = ()) -> StudySpec:
    """Read and validate a YAML spec; `overrides` replace top-level keys (e.g. trials),
    then `sets` ("KEY=VALUE", dotted keys) are applied (see apply_sets)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"Study spec {path} does not exist. Use one of studies/*.yaml or write one "
                        f"(see studies/smoke.yaml).")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path} is not valid YAML: {e}") from None
    if isinstance(d, dict) and overrides:
        d = {**d, **overrides}
    if isinstance(d, dict) and sets:
        d = apply_sets(d, sets)
    return spec_from_dict(d, str(path) + (" with --set" if sets else ""))
