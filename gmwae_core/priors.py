"""The Gaussian-mixture prior p(k) = 1/K, p(z|k) = N(mu0_k, sigma0^2 I) (paper Eq. 7).

The means are equidistant where that is possible (one-hot for K <= d, a regular simplex
for K = d + 1, both with pairwise distance sqrt 2). For K > d + 1 no equidistant set
exists; the means are then placed to maximise their minimum pairwise distance. In every
case sigma0 follows from the overlap the user asks for between the two nearest modes:

    prior_overlap = 2 * Phi(-dist_min / (2 * sigma0))
    =>  sigma0 = dist_min / (2 * Phi^{-1}(1 - prior_overlap / 2))

which gives the paper's dist = 4 * sigma0 at prior_overlap = 2 * Phi(-2) (about 4.6%).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from scipy.stats import norm

from .config import ConfigError

__all__ = ["MixturePrior", "prior_means", "sigma0_from_overlap", "overlap_from_sigma0"]


def sigma0_from_overlap(dist_min: float, prior_overlap: float) -> float:
    """sigma0 such that the two nearest modes (at distance dist_min) share `prior_overlap`."""
    return dist_min / (2.0 * float(norm.isf(prior_overlap / 2.0)))


def overlap_from_sigma0(dist: float, sigma0: float) -> float:
    """2 * Phi(-dist / (2 sigma0)): the mass two modes at distance `dist` share."""
    return float(2.0 * norm.cdf(-dist / (2.0 * sigma0)))


def _simplex(K: int) -> torch.Tensor:
    """K = d + 1 vertices of a regular simplex in d dims, pairwise distance sqrt 2."""
    e = torch.eye(K, dtype=torch.float64)
    centred = e - e.mean(0, keepdim=True)  # (K, K), rank K - 1
    # An orthonormal basis of the hyperplane sum(x) = 0 keeps all distances.
    basis = torch.linalg.svd(centred, full_matrices=False).Vh[: K - 1]  # (K-1, K)
    return centred @ basis.T  # (K, K-1)


def _max_min_placement(K: int, d: int, seed: int, steps: int = 3000) -> torch.Tensor:
    """K points in the unit ball of R^d spread to maximise the minimum pairwise distance.

    Gradient ascent on a soft minimum of the pairwise distances whose temperature falls
    over the run, with points projected back into the ball. Deterministic for a seed.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(K, d, generator=gen, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1.0)
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.02)
    iu = torch.triu_indices(K, K, offset=1)
    best, best_min = x.detach().clone(), -1.0
    for step in range(steps):
        temp = 0.1 * (0.01 ** (step / steps))  # anneal the soft-min towards the hard min
        dist = torch.cdist(x, x)[iu[0], iu[1]]
        soft_min = -temp * torch.logsumexp(-dist / temp, dim=0)
        opt.zero_grad()
        (-soft_min).backward()
        opt.step()
        with torch.no_grad():
            x /= x.norm(dim=1, keepdim=True).clamp_min(1.0)
            cur = torch.cdist(x, x)[iu[0], iu[1]].min().item()
            if cur > best_min:
                best, best_min = x.detach().clone(), cur
    return best


def prior_means(K: int, d: int, seed: int = 0) -> torch.Tensor:
    """The K mode means mu0_k, shape (K, d), float64."""
    if K <= d:
        return torch.eye(K, d, dtype=torch.float64)
    if K == d + 1:
        return _simplex(K)
    return _cached_placement(K, d, seed).clone()


@functools.lru_cache(maxsize=32)
def _cached_placement(K: int, d: int, seed: int) -> torch.Tensor:
    """_max_min_placement, computed once per process: its 3,000 steps take a second or more,
    which every Trainer built in a process (each evaluation, export and trial of a study)
    would pay again. Callers get a clone (prior_means)."""
    return _max_min_placement(K, d, seed)


@dataclass(frozen=True)
class MixturePrior:
    """p(z, k) with its geometry recorded: means, sigma0, min/max pairwise distance."""

    means: torch.Tensor  # (K, d)
    sigma0: float
    dist_min: float
    dist_max: float

    @classmethod
    def build(cls, K: int, latent_dim: int, prior_overlap: float, seed: int = 0) -> "MixturePrior":
        means = prior_means(K, latent_dim, seed)
        iu = torch.triu_indices(K, K, offset=1)
        pair = torch.cdist(means, means)[iu[0], iu[1]]
        dist_min, dist_max = pair.min().item(), pair.max().item()
        if not dist_min > 1e-6:
            raise ConfigError(f"Prior means collapsed (min distance {dist_min}) for K={K}, "
                             f"d={latent_dim}; use a larger model.latent_dim.")
        return cls(means.float(), sigma0_from_overlap(dist_min, prior_overlap), dist_min, dist_max)

    @property
    def K(self) -> int:
        return self.means.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.means.shape[1]

    def to(self, device: torch.device | str) -> "MixturePrior":
        return MixturePrior(self.means.to(device), self.sigma0, self.dist_min, self.dist_max)

    def sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
               scale: float = 1.0) -> torch.Tensor:
        """z ~ p(z|k) for every k: returns shape + (K, d); `scale` multiplies sigma0."""
        K, d = self.means.shape
        eps = torch.randn(*shape, K, d, generator=generator, device=self.means.device)
        return self.means + (scale * self.sigma0) * eps

    def info(self) -> dict[str, float]:
        """The geometry as plain numbers, for metrics.json and tracking."""
        return {
            "prior/sigma0": self.sigma0,
            "prior/dist_min": self.dist_min,
            "prior/dist_max": self.dist_max,
            "prior/overlap_min_pair": overlap_from_sigma0(self.dist_min, self.sigma0),
            "prior/overlap_max_pair": overlap_from_sigma0(self.dist_max, self.sigma0),
        }
