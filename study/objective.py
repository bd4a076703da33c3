"""What a study optimises: one validation metric and its direction, travelling as one value.

ASHA, the Optuna studies, Tune's checkpoint ranking, the ledger of best checkpoints,
`study status`, export's ranking, each family's best and the dashboards all read it from
`spec.objective`. Light to import (no Ray, no Optuna).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, TypeVar

from gmwae_core.config import ConfigError
from gmwae_core.metrics import EVAL_METRICS, LABEL_METRICS

__all__ = ["Objective", "DEFAULT_METRIC", "K_SEARCH_METRIC", "LABEL_FREE_METRIC",
           "default_metric", "reported_metrics", "label_free_metrics"]

DEFAULT_METRIC = "val/cluster_acc"
"""Hungarian accuracy, the paper's headline: the objective when K is not searched."""
K_SEARCH_METRIC = "val/ami"
"""Adjusted mutual information, comparable across K: the objective when K is searched."""
LABEL_FREE_METRIC = "val/augment_mi"
"""The objective on data without labels, and the one to use wherever validation labels
should not steer the choice: the criterion benchmarks/selection.py picks best
(docs/decisions/label-free-objective.md)."""
T = TypeVar("T")


def default_metric(searched: Iterable[str], labelled: bool = True) -> str:
    """The objective a spec gets when it names none: on data without labels
    LABEL_FREE_METRIC; else val/ami when K is searched, val/cluster_acc otherwise."""
    if not labelled:
        return LABEL_FREE_METRIC
    return K_SEARCH_METRIC if "K" in set(searched) else DEFAULT_METRIC


def label_free_metrics() -> list[str]:
    """The `val/` metrics that read the images alone (usable on data without labels)."""
    return [f"val/{name}" for name in EVAL_METRICS if name not in LABEL_METRICS]


def reported_metrics() -> list[str]:
    """The `val/` metrics a trial reports at every iteration (gmwae_core.metrics)."""
    return [f"val/{name}" for name in EVAL_METRICS]


@dataclass(frozen=True)
class Objective:
    metric: str = DEFAULT_METRIC
    """A `val/` metric the trainable reports (val/cluster_acc, val/ami, val/mmd, ...)."""
    mode: Optional[str] = None
    """max or min; None: the metric's own better direction (gmwae_core.metrics)."""

    def __post_init__(self) -> None:
        reported = reported_metrics()
        if self.metric not in reported:
            raise ConfigError(
                f"`metric` must be a validation metric the trainable reports ({', '.join(reported)}), "
                f"but got {self.metric!r}. Use val/ami when K is searched, val/cluster_acc otherwise.")
        if self.mode is None:
            object.__setattr__(self, "mode", EVAL_METRICS[self.metric.split("/", 1)[1]])
        if self.mode not in ("min", "max"):
            raise ConfigError(f"`mode` must be min or max, but got {self.mode!r}. Use "
                              f"{EVAL_METRICS[self.metric.split('/', 1)[1]]} for {self.metric}.")

    @property
    def reads_labels(self) -> bool:
        """Whether choosing by this metric reads the validation split's labels."""
        return self.metric.split("/", 1)[1] in LABEL_METRICS

    @property
    def direction(self) -> str:
        """Optuna's word for the mode."""
        return "maximize" if self.mode == "max" else "minimize"

    @property
    def worst(self) -> float:
        return -math.inf if self.mode == "max" else math.inf

    def better(self, value: Any, than: Optional[float]) -> bool:
        """Whether `value` (finite) beats `than` (None: nothing yet)."""
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if than is None:
            return True
        return value > than if self.mode == "max" else value < than

    def ranked(self, items: Iterable[T], value: Callable[[T], float],
               tie: Callable[[T], Any] = lambda _: 0) -> list[T]:
        """`items` best first (ties: by `tie`, ascending)."""
        sign = -1.0 if self.mode == "max" else 1.0
        return sorted(items, key=lambda item: (sign * value(item), tie(item)))

    def best(self, items: Iterable[T], value: Callable[[T], float],
             tie: Callable[[T], Any] = lambda _: 0) -> Optional[T]:
        ranked = self.ranked(items, value, tie)
        return ranked[0] if ranked else None

    def warnings(self, searched: Iterable[str]) -> list[str]:
        """Why this objective may mislead a search over `searched` keys."""
        if "K" in set(searched) and self.metric == DEFAULT_METRIC:
            return [f"warning: the space searches K and the study optimises {DEFAULT_METRIC} "
                    f"(Hungarian: one cluster per class, every cluster beyond the number of "
                    f"classes counts as an error), so the metric, not the data, pushes K to the "
                    f"number of classes. Use `metric: {K_SEARCH_METRIC}` (chance-corrected, "
                    f"comparable across K) to search K."]
        return []

    @property
    def label(self) -> str:
        """Short column title: `val cluster_acc ↑`."""
        return f"{self.metric.replace('/', ' ')} {'↑' if self.mode == 'max' else '↓'}"
