import math

import pytest
import torch

from gmwae_core import ConfigError, ModelConfig, PAPER_PRIOR_OVERLAP
from gmwae_core.priors import (MixturePrior, _max_min_placement, overlap_from_sigma0, prior_means,
                               sigma0_from_overlap)


def pairwise(means: torch.Tensor) -> torch.Tensor:
    K = len(means)
    iu = torch.triu_indices(K, K, offset=1)
    return torch.cdist(means.double(), means.double())[iu[0], iu[1]]


@pytest.mark.parametrize("K,d", [(10, 10), (4, 10), (2, 1), (11, 10), (3, 2)])
def test_equidistant_means_have_the_distance_implied_by_the_overlap(K, d):
    prior = MixturePrior.build(K, d, PAPER_PRIOR_OVERLAP)
    dist = pairwise(prior.means)
    assert torch.allclose(dist, torch.full_like(dist, math.sqrt(2)), atol=1e-5)
    # The paper: distance between any pair of means is 4 sigma0 at ~5% overlap.
    assert prior.sigma0 == pytest.approx(math.sqrt(2) / 4, rel=1e-9)
    assert overlap_from_sigma0(dist.min().item(), prior.sigma0) == pytest.approx(PAPER_PRIOR_OVERLAP)


@pytest.mark.parametrize("overlap", [0.005, 0.05, 0.3])
def test_sigma0_inverts_the_overlap(overlap):
    sigma0 = sigma0_from_overlap(1.7, overlap)
    assert overlap_from_sigma0(1.7, sigma0) == pytest.approx(overlap, rel=1e-9)
    prior = MixturePrior.build(10, 10, overlap)
    assert 2 * torch.distributions.Normal(0, 1).cdf(
        torch.tensor(-math.sqrt(2) / (2 * prior.sigma0))).item() == pytest.approx(overlap, rel=1e-5)


def test_more_modes_than_d_plus_one_are_distinct_and_record_their_min_distance():
    prior = MixturePrior.build(6, 2, 0.05, seed=0)
    dist = pairwise(prior.means)
    assert dist.min().item() == pytest.approx(prior.dist_min, rel=1e-5)
    assert dist.max().item() == pytest.approx(prior.dist_max, rel=1e-5)
    # Six points in the unit disc can be at least 1 apart (a hexagon); the placement gets close.
    assert prior.dist_min > 0.95
    assert prior.means.norm(dim=1).max() <= 1 + 1e-5
    assert overlap_from_sigma0(prior.dist_min, prior.sigma0) == pytest.approx(0.05, rel=1e-6)
    assert prior.info()["prior/overlap_max_pair"] < 0.05  # farther pairs overlap less


def test_max_min_placement_is_deterministic_per_seed_and_spreads_a_line():
    a = MixturePrior.build(12, 3, 0.05, seed=3)
    b = MixturePrior.build(12, 3, 0.05, seed=3)
    assert torch.equal(a.means, b.means)
    # the per-process cache gives what the placement itself gives, and a copy each time
    fresh = _max_min_placement(12, 3, 3)
    assert torch.equal(fresh, _max_min_placement(12, 3, 3))
    assert torch.equal(a.means, fresh.float())
    assert not torch.equal(a.means, MixturePrior.build(12, 3, 0.05, seed=4).means)
    mine = prior_means(12, 3, 3)
    mine.zero_()
    assert torch.equal(prior_means(12, 3, 3), fresh)
    line = MixturePrior.build(3, 1, 0.05)
    assert sorted(line.means.flatten().tolist()) == pytest.approx([-1, 0, 1], abs=0.02)


def test_prior_samples_have_the_right_moments():
    prior = MixturePrior.build(4, 6, 0.05)
    z = prior.sample((20000,), torch.Generator().manual_seed(0))  # (N, K, d)
    assert z.shape == (20000, 4, 6)
    assert torch.allclose(z.mean(0), prior.means, atol=0.02)
    assert z.std(0).mean().item() == pytest.approx(prior.sigma0, rel=0.02)


@pytest.mark.parametrize("field,value", [("K", 1), ("latent_dim", 0), ("prior_overlap", 0.0),
                                         ("prior_overlap", 1.0), ("decoder_width", 0),
                                         ("decoder_width", 30)])
def test_bad_model_values_are_rejected_with_the_name_and_value(field, value):
    with pytest.raises(ConfigError, match=rf"`model.{field}`.*{value!r}"):
        ModelConfig(**{field: value})
