"""The model families, each defined once.

A family is its name and label, the loss it minimises (one of gmwae_core.objectives, fed
from the networks' outputs of a step), the config keys only it uses, the loss terms it
reports, and whether its step holds the MMD's N x N blocks. The rest of the code reads
FAMILY_DEFS: the config's checks, the trainer, the memory estimate, the search spaces, the
command line, export's model card and the dashboards. A third family is one more entry
here (and its loss in objectives.py), plus the search spaces that should search it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

__all__ = ["Family", "StepOutputs", "FAMILY_DEFS", "family"]


class StepOutputs(NamedTuple):
    """What a training step's forward pass gives a family's loss."""

    x: Any
    """(B, 1, 28, 28) images."""
    x_rec_logits: Any
    """(B, K, S, 1, 28, 28) decoder logits of every code's samples."""
    q_k_logits: Any
    """(B, K)."""
    q_z_mean: Any
    q_z_logvar: Any
    """(B, K, d) each: q(z|k,x)."""
    z_q: Any
    """(B, K, S, d) samples of q(z|k,x)."""
    prior: Any
    """The prior (means (K, d), sigma0, sample): a training.DrawnPrior, whose `sample` gives
    the step's z ~ p(z|k) from noise drawn before the step (training.draw_step)."""


def _gmwae_loss(out: StepOutputs, model) -> tuple[Any, dict[str, Any]]:
    from torch.profiler import record_function

    from .objectives import wae_objective

    with record_function("mmd"):  # the profile's region (benchmarks/throughput.py)
        z_p = out.prior.sample((out.x.shape[0], model.num_samples))  # (B, S, K, d)
        return wae_objective(out.x, out.x_rec_logits, out.q_k_logits, out.z_q,
                             z_p.transpose(1, 2), model.lambda_mmd, model.recon_weight)


def _gmvae_loss(out: StepOutputs, model) -> tuple[Any, dict[str, Any]]:
    from .objectives import vae_objective

    return vae_objective(out.x, out.x_rec_logits, out.q_k_logits, out.q_z_mean,
                         out.q_z_logvar, out.prior.means, out.prior.sigma0 ** 2)


@dataclass(frozen=True)
class Family:
    name: str
    """The value of RunConfig.family and the suffix of its Optuna study (NAME/gmwae)."""
    label: str
    """How people write it (GM-WAE)."""
    equation: str
    """What it minimises, in the paper's terms."""
    loss: Callable[[StepOutputs, Any], tuple[Any, dict[str, Any]]]
    """(step outputs, ModelConfig) -> (scalar loss, named terms); the terms are `terms`. The
    config's lambda_mmd and recon_weight may be 0-dim tensors (a stack of runs, one value each)."""
    terms: tuple[str, ...]
    """The loss terms it reports (train/..., history/...)."""
    own_keys: tuple[str, ...] = ()
    """Config keys (bare) only this family uses."""
    holds_mmd: bool = False
    """Its step holds the MMD's N x N kernel blocks (gmwae_core.memory)."""
    samples_prior: bool = False
    """Its loss reads B x S draws of z ~ p(z|k) per step (prior.sample((B, S)))."""
    colour: str = "#555555"
    """Its colour in the dashboards."""


FAMILY_DEFS: dict[str, Family] = {f.name: f for f in (
    Family("gmwae", "GM-WAE", "reconstruction + lambda MMD(q(z), p(z)) (paper Eq. 4)",
           _gmwae_loss, ("loss", "recon", "mmd"), own_keys=("lambda_mmd", "recon_weight"),
           holds_mmd=True, samples_prior=True, colour="#1f77b4"),
    Family("gmvae", "GM-VAE", "the negative ELBO (paper Eq. 2)",
           _gmvae_loss, ("loss", "recon", "kl_continuous", "kl_discrete"), colour="#d62728"),
)}


def family(name: str) -> Family:
    return FAMILY_DEFS[name]
