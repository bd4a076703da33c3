"""Checkpoint folders: weights, trainer state, config, metrics, and a manifest of hashes.

    DIR/weights.pt        model state_dict; torch.load(path, weights_only=True) reads it
    DIR/trainer_state.pt  optimiser, counters, RNG, step history (to continue the run)
    DIR/config.json       the RunConfig (RunConfig.from_dict reads it back)
    DIR/metrics.json      flat metrics ("test/cluster_acc", ...)
    DIR/manifest.json     sha256 of each file above, checked on load

A folder is written to DIR.tmp-* first and renamed into place, so a crash never leaves a
half-written checkpoint behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .config import ConfigError, RunConfig
from .networks import GMLVM
from .training import Trainer

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "read_config", "init_from",
           "load_model"]

WEIGHTS = "weights.pt"
TRAINER_STATE = "trainer_state.pt"
CONFIG = "config.json"
METRICS = "metrics.json"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint folder is missing, altered, corrupt or from an incompatible config."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(trainer: Trainer, directory: str | Path,
                    metrics: Optional[dict[str, float]] = None) -> Path:
    """Write `trainer`'s checkpoint to `directory` atomically (replacing an older one)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp-", dir=directory.parent))
    try:
        state = trainer.state_dict()
        torch.save(state.pop("model"), tmp / WEIGHTS)
        torch.save(state, tmp / TRAINER_STATE)
        (tmp / CONFIG).write_text(json.dumps(trainer.cfg.to_dict(), indent=2))
        (tmp / METRICS).write_text(json.dumps(metrics or {}, indent=2, sort_keys=True))
        files = {name: _sha256(tmp / name) for name in (WEIGHTS, TRAINER_STATE, CONFIG, METRICS)}
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT_VERSION, "files": files}, indent=2))
        if directory.exists():
            old = directory.with_name(directory.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _verify(directory: Path) -> None:
    if not directory.is_dir():
        raise CheckpointError(f"Checkpoint folder {directory} does not exist. Pass the folder a "
                              f"run wrote (OUT/checkpoint).")
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory} has no {MANIFEST}: it is not a gmwae checkpoint "
                              f"folder, or it was written half-way. Use a complete checkpoint.")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{manifest_path} is corrupt. Use a complete checkpoint.") from None
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"Checkpoint {directory} is missing {name}. Restore the folder "
                                  f"from the run or its export.")
        if _sha256(path) != digest:
            raise CheckpointError(f"Checkpoint file {path} was altered or is corrupt (its sha256 "
                                  f"differs from {MANIFEST}). Restore it from the run or its export.")


def read_config(directory: str | Path) -> RunConfig:
    """The RunConfig a checkpoint was saved with (after checking the manifest)."""
    directory = Path(directory)
    _verify(directory)
    try:
        return RunConfig.from_dict(json.loads((directory / CONFIG).read_text()))
    except (json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"{directory / CONFIG} is not a valid run config: {e}") from None


def _load_weights(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and tensor errors alike mean "corrupt"
        raise CheckpointError(f"Could not read {path}: {type(e).__name__}: {e}. The file is "
                              f"corrupt; restore it from the run or its export.") from None


def _check_shapes(weights: dict, trainer: Trainer, source: Path) -> None:
    expected = trainer.model.state_dict()
    wrong = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    missing = [k for k in expected if k not in weights]
    if wrong or missing:
        mc = trainer.cfg.model
        raise CheckpointError(
            f"Checkpoint {source} does not fit a model with K={mc.K}, latent_dim={mc.latent_dim}, "
            f"decoder_width={mc.decoder_width}, encoder_hidden={mc.encoder_hidden}: "
            f"{'; '.join(wrong[:3] + [f'missing {m}' for m in missing[:3]])}. Use the same model "
            f"settings as the checkpoint (see its config.json).")


def load_checkpoint(directory: str | Path, trainer: Trainer, with_state: bool = True) -> dict:
    """Load a checkpoint into `trainer` (weights, and optimiser/counters if `with_state`).

    Returns the checkpoint's metrics.json.
    """
    directory = Path(directory)
    saved = read_config(directory)
    weights = _load_weights(directory / WEIGHTS)
    _check_shapes(weights, trainer, directory)
    if with_state:
        if saved.family != trainer.cfg.family:
            raise CheckpointError(f"Checkpoint {directory} is a {saved.family} run; this run is "
                                  f"{trainer.cfg.family}. Use --init-from to start from its weights.")
        state = _load_weights(directory / TRAINER_STATE)
        state["model"] = weights
        trainer.load_state_dict(state)
    else:
        trainer.model.load_state_dict(weights)
    return json.loads((directory / METRICS).read_text())


def load_model(directory: str | Path) -> tuple[RunConfig, GMLVM]:
    """A checkpoint's network alone, on the CPU in eval mode: no data, no trainer (what an
    exported model needs to assign images to clusters)."""
    directory = Path(directory)
    cfg = read_config(directory)
    model = GMLVM(cfg.model)
    try:
        model.load_state_dict(_load_weights(directory / WEIGHTS))
    except RuntimeError as e:
        raise CheckpointError(f"Checkpoint {directory} does not fit its own config.json: "
                              f"{str(e).splitlines()[0]}. Restore the folder from its export.") from None
    return cfg, model.eval()


def init_from(directory: str | Path, trainer: Trainer) -> None:
    """Start `trainer` from another run's weights only (e.g. a GM-VAE from a trained GM-WAE)."""
    load_checkpoint(directory, trainer, with_state=False)
    trainer.pretrained = True  # the encoders already fit the data; do not pretrain again
