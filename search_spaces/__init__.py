"""Define-by-run Optuna search spaces, per family: (trial, family) -> dict of plain values.

Keys are RunConfig keys (bare names, see gmwae_core.config). lambda_mmd exists only for
GM-WAE. Each space also names its paper point, the configuration closest to the paper's
(K=10, d=10, overlap 2*Phi(-2), lambda=10) that the space allows; studies enqueue it first.
No computation happens here (OptunaSearch's rule for define-by-run functions).
"""
from __future__ import annotations

from typing import Any, Callable

from gmwae_core import PAPER_PRIOR_OVERLAP

__all__ = ["SPACES", "space_names", "paper_point"]


def fixed(trial, family: str) -> dict[str, Any]:
    """Nothing searched: every trial runs the preset with the spec's `fixed` values (repeats,
    overhead measurements)."""
    return {}


def smoke(trial, family: str) -> dict[str, Any]:
    """Seconds per trial, for tests: a narrow space over the synthetic set."""
    out: dict[str, Any] = {}
    if family == "gmwae":
        out["lambda_mmd"] = trial.suggest_float("lambda_mmd", 1.0, 100.0, log=True)
    out["prior_overlap"] = trial.suggest_float("prior_overlap", 0.01, 0.2, log=True)
    out["latent_dim"] = trial.suggest_int("latent_dim", 4, 10)
    out["K"] = trial.suggest_int("K", 8, 12)
    return out


def default(trial, family: str) -> dict[str, Any]:
    """CPU-sized: around the cpu preset, the paper's knobs plus lr, batch and width."""
    out: dict[str, Any] = {}
    if family == "gmwae":
        out["lambda_mmd"] = trial.suggest_float("lambda_mmd", 1.0, 100.0, log=True)
    out["prior_overlap"] = trial.suggest_float("prior_overlap", 0.005, 0.2, log=True)
    out["latent_dim"] = trial.suggest_int("latent_dim", 4, 16)
    out["K"] = trial.suggest_int("K", 8, 16)
    out["lr"] = trial.suggest_float("lr", 2e-4, 3e-3, log=True)
    out["batch_size"] = trial.suggest_categorical("batch_size", [32, 64, 128])
    out["decoder_width"] = trial.suggest_categorical("decoder_width", [16, 32, 64])
    return out


def wide(trial, family: str) -> dict[str, Any]:
    """GPU-sized: K 2..30, d 2..64, lambda 0.1..1000 (log), overlap 0.5%..30%."""
    out: dict[str, Any] = {}
    if family == "gmwae":
        out["lambda_mmd"] = trial.suggest_float("lambda_mmd", 0.1, 1000.0, log=True)
    out["prior_overlap"] = trial.suggest_float("prior_overlap", 0.005, 0.3, log=True)
    out["latent_dim"] = trial.suggest_int("latent_dim", 2, 64, log=True)
    out["K"] = trial.suggest_int("K", 2, 30)
    out["lr"] = trial.suggest_float("lr", 1e-4, 3e-3, log=True)
    out["batch_size"] = trial.suggest_categorical("batch_size", [64, 128, 256])
    out["decoder_width"] = trial.suggest_categorical("decoder_width", [64, 128])
    return out


SPACES: dict[str, Callable[..., dict[str, Any]]] = {"fixed": fixed, "smoke": smoke,
                                                    "default": default, "wide": wide}

_PAPER = {"lambda_mmd": 10.0, "prior_overlap": PAPER_PRIOR_OVERLAP, "latent_dim": 10, "K": 10}
_PAPER_EXTRA = {"default": {"lr": 1e-3, "batch_size": 64, "decoder_width": 32},
                "wide": {"lr": 8e-4, "batch_size": 128, "decoder_width": 128}}


def space_names() -> list[str]:
    return sorted(SPACES)


def paper_point(space: str, family: str) -> dict[str, Any]:
    """The paper's setting in `space`'s parameters, for `family` (no lambda for GM-VAE)."""
    if space == "fixed":
        return {}
    point = {**_PAPER, **_PAPER_EXTRA.get(space, {})}
    if family != "gmwae":
        point.pop("lambda_mmd")
    return point
