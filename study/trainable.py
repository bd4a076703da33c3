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
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ray import tune

from gmwae_core import (DataConfig, Splits, Trainer, load_checkpoint, load_splits,
                        save_checkpoint)
from gmwae_core.figures import write_figures

from .search import ITERATION, RESUME_FROM, private_keys_removed

__all__ = ["TrialSetup", "cached_splits", "train_trial", "NoCudaError", "require_cuda",
           "NO_CUDA", "TEST_CLUSTERS"]

TEST_CLUSTERS = "test_clusters.json"
"""In a confirm trial's last checkpoint: the argmax q(k|x) of every test image."""
NO_CUDA = "NoCudaError"
"""The name a trial's error carries when it asked for a GPU and found no CUDA device (the
driver's NoCudaStop reads it in the trial's error text and stops the study)."""


class NoCudaError(RuntimeError):
    """A trial that asks for a GPU found no CUDA device on its node."""


def require_cuda(gpu: float, device: str) -> None:
    """NoCudaError when a trial asks for `gpu` > 0 and its node's torch sees no CUDA device,
    unless the spec chose `device: cpu` itself (then the GPU share is deliberate: a fake-GPU
    test cluster, or a GPU node kept for another job). `device: auto` would otherwise train
    on the node's CPU threads without a word, at a fraction of the speed the study paid for."""
    import socket

    import torch

    if gpu <= 0 or device == "cpu" or torch.cuda.is_available():
        return
    build = (f"CUDA {torch.version.cuda}" if torch.version.cuda else
             "a CPU-only build" if not getattr(torch.version, "hip", None) else
             f"ROCm {torch.version.hip}")
    raise NoCudaError(
        f"A trial asks resources.gpu {gpu:g}, but node {socket.gethostname()} "
        f"({_node_ip()}) has no CUDA device visible to torch {torch.__version__} ({build}; "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}). Install "
        f"the torch build the node's NVIDIA driver runs (`nvidia-smi` shows the highest CUDA "
        f"version the driver supports; ray_cluster.yaml pins the build, docs/cluster.md says "
        f"how to change both), or train on CPUs deliberately with `fixed: {{device: cpu}}` in "
        f"the spec.")


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray: the hostname alone names the node
        return "no Ray node"


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
    require_cuda(setup.spec.resources.gpu, cfg.train.device)
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
        test = None
        if setup.test_at_end and iteration == setup.spec.max_iterations:
            test = trainer.evaluate("test")
            metrics.update(test.metrics)
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(trainer, Path(tmp) / "checkpoint", metrics)
            if test is not None:  # each test image's cluster: confirm compares the seeds'
                (Path(tmp) / TEST_CLUSTERS).write_text(json.dumps(test.q_k.argmax(1).tolist()))
            # For the tracker and the dashboards: step history (paper Fig. 1), label-by-k (5a).
            (Path(tmp) / "history.json").write_text(json.dumps(trainer.history))
            (Path(tmp) / "label_by_k.json").write_text(json.dumps(val.label_by_k.tolist()))
            if iteration == setup.spec.max_iterations:
                write_figures(trainer, val, Path(tmp) / "figures", split="val")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
