"""gmwae_core: GM-WAE and GM-VAE (Gaujac, Feige, Barber 2018) in plain PyTorch.

Knows nothing of Ray, MLflow or Optuna: trains and evaluates in a Python shell.
"""
from .checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint
from .config import (DATASETS, FAMILIES, PAPER_PRIOR_OVERLAP, PRESETS, ConfigError, DataConfig,
                     ModelConfig, RunConfig, TrainConfig, from_preset, parse_overrides)
from .data import DataError, Splits, load_splits
from .networks import GMLVM
from .priors import MixturePrior
from .run import Progress, evaluate_checkpoint, train_run
from .training import EvalResult, NonFiniteLossError, Trainer

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "NonFiniteLossError",
    "DATASETS", "FAMILIES", "PAPER_PRIOR_OVERLAP", "PRESETS",
    "ModelConfig", "TrainConfig", "DataConfig", "RunConfig", "from_preset", "parse_overrides",
    "Splits", "load_splits", "MixturePrior", "GMLVM", "Trainer", "EvalResult",
    "save_checkpoint", "load_checkpoint", "read_config",
    "Progress", "train_run", "evaluate_checkpoint",
]
