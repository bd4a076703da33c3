"""The Ray Tune trainable: a thin wrapper over gmwae_core.

config (the searched values) -> RunConfig -> Trainer; each iteration trains one epoch
(or `steps_per_iteration` steps), evaluates on the validation split and reports the
metrics with a checkpoint. The last iteration's checkpoint also holds the figures.

Tune reuses a trial's worker process for the next trial of the same family
(`reuse_actors`), so torch is imported once per worker and the data set is loaded once
per worker and data config (`cached_splits`): that is most of a trial's fixed cost.
"""
from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ray import tune

from gmwae_core import (DataConfig, Splits, Trainer, load_checkpoint, load_splits,
                        save_checkpoint)
from gmwae_core.figures import write_figures

from .search import ITERATION, RESUME_FROM, private_keys_removed

__all__ = ["TrialSetup", "cached_splits", "train_trial"]


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one family shares (bound into the family's trainable)."""

    spec: Any  # study.spec.StudySpec
    family: str
    test_at_end: bool = False
    """Also evaluate the test split at the last iteration (confirm runs; never in a search)."""


@functools.lru_cache(maxsize=1)
def cached_splits(data: DataConfig) -> Splits:
    """load_splits, kept for the worker's next trial (Trainer never writes to the splits)."""
    return load_splits(data)


def train_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    import torch

    torch.set_num_threads(max(1, int(setup.spec.resources.cpu)))
    cfg = setup.spec.run_config(setup.family, private_keys_removed(config))
    trainer = Trainer(cfg, cached_splits(cfg.data))
    checkpoint: Optional[tune.Checkpoint] = tune.get_checkpoint()
    if checkpoint is None and config.get(RESUME_FROM):  # cut off by a killed driver
        checkpoint = tune.Checkpoint(config[RESUME_FROM])
    iteration = 0
    if checkpoint is not None:  # a retried or resumed trial continues where it stopped
        with checkpoint.as_directory() as folder:
            iteration = int(load_checkpoint(Path(folder) / "checkpoint", trainer)[ITERATION])
    steps = setup.spec.steps_per_iteration or trainer.steps_per_epoch
    trainer.budget_steps = steps * setup.spec.max_iterations  # what lr_schedule=linear decays over
    while iteration < setup.spec.max_iterations:
        train_metrics = trainer.train_steps(steps)
        val = trainer.evaluate("val")
        iteration += 1
        metrics = {**train_metrics, **val.metrics, ITERATION: iteration,
                   "steps": trainer.step, "train_seconds": trainer.train_seconds}
        if setup.test_at_end and iteration == setup.spec.max_iterations:
            metrics.update(trainer.evaluate("test").metrics)
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(trainer, Path(tmp) / "checkpoint", metrics)
            # For the tracker and the dashboards: step history (paper Fig. 1), label-by-k (5a).
            (Path(tmp) / "history.json").write_text(json.dumps(trainer.history))
            (Path(tmp) / "label_by_k.json").write_text(json.dumps(val.label_by_k.tolist()))
            if iteration == setup.spec.max_iterations:
                write_figures(trainer, val, Path(tmp) / "figures", split="val")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
