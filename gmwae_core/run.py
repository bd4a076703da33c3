"""A whole run in a plain Python shell: train, evaluate, save, draw.

    from gmwae_core import from_preset, train_run
    metrics = train_run(from_preset("cpu", {"dataset": "digits", "epochs": 3}), "out/")

The platform (study/) calls the same pieces epoch by epoch; this module is what
`gmwae train` and `gmwae evaluate` run.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

from .checkpoint import init_from as load_init, load_checkpoint, read_config, save_checkpoint
from .config import ConfigError, RunConfig
from .data import load_splits
from .figures import write_figures
from .training import Trainer

__all__ = ["train_run", "evaluate_checkpoint", "Progress"]


class Progress:
    """Callbacks a front end passes to show progress; the defaults do nothing."""

    def start(self, total_steps: int, budget_seconds: Optional[float]) -> None: ...

    def step(self, step: int) -> None: ...

    def epoch(self, epoch: int, row: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def train_run(cfg: RunConfig, out_dir: str | Path, init_from: Optional[str | Path] = None,
              progress: Optional[Progress] = None,
              on_epoch: Optional[Callable[[Trainer, dict], None]] = None) -> dict[str, float]:
    """Train `cfg` and write OUT/metrics.json, OUT/history.json, OUT/figures/, OUT/checkpoint/.

    Returns the flat metrics: the last epoch's train/ and val/ values, test/ values,
    the prior's geometry (prior/...) and run/ counters.
    """
    progress = progress or Progress()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, load_splits(cfg.data))
    if init_from is not None:
        load_init(init_from, trainer)
    budget = None if cfg.train.minutes is None else 60.0 * cfg.train.minutes
    progress.start(trainer.steps_per_epoch * cfg.train.epochs, budget)
    epochs, start = [], time.monotonic()
    try:
        for _ in range(cfg.train.epochs):
            train_metrics = trainer.train_epoch(on_step=progress.step)
            val = trainer.evaluate("val")
            row = {"epoch": float(trainer.epoch), "step": float(trainer.step),
                   "train_seconds": trainer.train_seconds, **train_metrics, **val.metrics}
            epochs.append(row)
            progress.epoch(trainer.epoch, row)
            if on_epoch is not None:
                on_epoch(trainer, row)
            if trainer.budget_exhausted:
                break
    finally:
        progress.close()
    test = trainer.evaluate("test")
    metrics = {**epochs[-1], **test.metrics, **trainer.prior.info(),
               "run/epochs": float(trainer.epoch), "run/steps": float(trainer.step),
               "run/train_seconds": trainer.train_seconds,
               "run/wall_seconds": time.monotonic() - start}
    if cfg.data.protocol == "paper":
        metrics.update(trainer.evaluate_paper())
    for key in ("epoch", "step", "train_seconds"):
        metrics.pop(key)
    save_checkpoint(trainer, out / "checkpoint", metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    (out / "history.json").write_text(json.dumps({"epochs": epochs, "steps": trainer.history}))
    (out / "label_by_k.json").write_text(json.dumps(
        {"split": "test", "matrix": test.label_by_k.round(6).tolist()}))
    write_figures(trainer, test, out / "figures")
    return metrics


def evaluate_checkpoint(directory: str | Path, overrides: Optional[dict] = None,
                        assignments: Optional[str | Path] = None
                        ) -> tuple[dict[str, float], dict[str, float]]:
    """Recompute a checkpoint's test metrics; returns (recomputed, saved). With
    `assignments`, also writes each test image's cluster (argmax q(k|x)) and label there
    (CSV: index,cluster,label).

    `overrides` may change the data section only (dataset, data_dir, eval_size, protocol,
    ...). With data.protocol=paper the test split is the paper's held-out 1,000 and the
    `paper/...` metrics (Trainer.evaluate_paper) come too.
    """
    cfg = read_config(directory)
    if overrides:
        bad = [k for k in overrides if not (k.startswith("data.") or k in
                                            ("dataset", "data_dir", "eval_size", "val_size",
                                             "protocol"))]
        if bad:
            raise ConfigError(f"evaluate may only change data settings, but got {bad}. The model "
                             f"settings come from the checkpoint's config.json.")
        cfg = cfg.replace(overrides)
    trainer = Trainer(cfg, load_splits(cfg.data))
    saved = load_checkpoint(directory, trainer, with_state=False)
    result = trainer.evaluate("test")
    if cfg.data.protocol == "paper":
        result.metrics.update(trainer.evaluate_paper())
    if assignments is not None:
        clusters = result.q_k.argmax(1)
        Path(assignments).write_text("index,cluster,label\n" + "".join(
            f"{i},{k},{y}\n" for i, (k, y) in enumerate(zip(clusters, result.labels))))
    return result.metrics, saved
