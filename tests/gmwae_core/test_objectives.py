import math
import re

import pytest
import torch

from gmwae_core.objectives import (IMQ_SCALES, kl_categorical_uniform, kl_diag_gaussians,
                                   moment_matching_loss, wae_objective, weighted_mmd)


def direct_mmd(z_q, w_q, z_p, w_p):
    """The estimator of DESIGN.md written as plain loops over every pair of samples."""
    N, M, d = z_q.shape

    def k(a, b):
        dist2 = float(((a - b) ** 2).sum())
        return sum(2 * d * s / (2 * d * s + dist2) for s in IMQ_SCALES)

    qq = pp = qp = 0.0
    for n in range(N):
        for m in range(N):
            for a in range(M):
                for b in range(M):
                    qp += w_q[n, a] * w_p[m, b] * k(z_q[n, a], z_p[m, b])
                    if n != m:
                        qq += w_q[n, a] * w_q[m, b] * k(z_q[n, a], z_q[m, b])
                        pp += w_p[n, a] * w_p[m, b] * k(z_p[n, a], z_p[m, b])
    return qq / (N * (N - 1)) + pp / (N * (N - 1)) - 2 * qp / N ** 2


def test_weighted_mmd_equals_the_double_loop():
    g = torch.Generator().manual_seed(0)
    N, M, d = 4, 3, 2
    z_q, z_p = torch.randn(N, M, d, generator=g), torch.randn(N, M, d, generator=g) + 0.5
    w_q = torch.softmax(torch.randn(N, M, generator=g), -1)
    w_p = torch.full((N, M), 1 / M)
    got = weighted_mmd(z_q.double(), w_q.double(), z_p.double(), w_p.double()).item()
    assert got == pytest.approx(float(direct_mmd(z_q.double(), w_q.double(), z_p.double(),
                                                 w_p.double())), rel=1e-9, abs=1e-12)


def test_mmd_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(1)
    N, d = 300, 4
    ones = torch.ones(N, 1)

    def mmd(shift):
        a = torch.randn(N, 1, d, generator=g)
        b = torch.randn(N, 1, d, generator=g) + shift
        return weighted_mmd(a, ones, b, ones).item()

    same = mmd(0.0)
    values = [mmd(s) for s in (0.5, 1.0, 2.0)]
    assert abs(same) < 0.05
    assert values[0] > same + 0.05
    assert values == sorted(values)


def test_kl_diag_gaussians_matches_monte_carlo():
    g = torch.Generator().manual_seed(2)
    mean, logvar = torch.randn(3, generator=g), torch.randn(3, generator=g) * 0.5
    prior_mean, prior_var = torch.randn(3, generator=g), 0.3
    closed = kl_diag_gaussians(mean, logvar, prior_mean, prior_var).item()
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(prior_mean, math.sqrt(prior_var))
    z = q.sample((400000,))
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean().item()
    assert closed == pytest.approx(mc, rel=0.02)


def test_kl_categorical_uniform_matches_its_definition():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    q = torch.softmax(logits, -1)
    direct = (q * (q.log() - math.log(1 / 3))).sum(-1)
    assert torch.allclose(kl_categorical_uniform(logits), direct, atol=1e-6)
    assert kl_categorical_uniform(logits)[1].item() == pytest.approx(0.0, abs=1e-7)


def test_wae_reconstruction_term_is_the_q_weighted_squared_error():
    g = torch.Generator().manual_seed(3)
    B, K, S, d = 2, 3, 2, 2
    x = torch.rand(B, 1, 28, 28, generator=g)
    logits = torch.randn(B, K, S, 1, 28, 28, generator=g)
    q_k_logits = torch.randn(B, K, generator=g)
    z = torch.randn(B, K, S, d, generator=g)
    _, terms = wae_objective(x, logits, q_k_logits, z, z.clone(), lambda_mmd=10, recon_weight=0.05)
    q = torch.softmax(q_k_logits, -1)
    expected = sum(q[b, k] * ((x[b] - torch.sigmoid(logits[b, k, s])) ** 2).sum() / S
                   for b in range(B) for k in range(K) for s in range(S)) / B
    assert terms["recon"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(0.05 * expected.item() + 10 * terms["mmd"].item(),
                                                 rel=1e-5)


def test_moment_matching_loss_is_zero_at_the_prior_moments():
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g = torch.Generator().manual_seed(4)
    z = means.view(1, 2, 1, 2) + 0.5 * torch.randn(50000, 2, 1, 2, generator=g)
    assert moment_matching_loss(z, means, 0.25).item() < 1e-3
    assert moment_matching_loss(z + 1.0, means, 0.25).item() > 1.5


# The fused IMQ kernel: torch.compile of the seven-scale sum. On CUDA it becomes Triton; here
# it is compiled for the CPU (C++), which runs the same generated graph.

def test_the_fused_kernel_gives_the_eager_mmd_and_gradients():
    g = torch.Generator().manual_seed(3)
    z_q = torch.randn(12, 5, 4, generator=g, requires_grad=True)
    z_p = torch.randn(12, 5, 4, generator=g)
    w = torch.softmax(torch.randn(12, 5, generator=g), -1)
    grads = []
    for fused in (False, True):
        z_q.grad = None
        value = weighted_mmd(z_q, w, z_p, w, fused=fused)
        value.backward()
        grads.append((float(value), z_q.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5, abs=1e-7)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-7)
    assert float(grads[1][1].abs().max()) > 0


def test_the_fused_kernel_is_one_pass_over_the_distances_forward_and_backward():
    from torch._inductor.utils import run_and_get_code

    from gmwae_core.objectives import _imq_sum, _imq_sum_backward

    dist2, cs = torch.rand(64, 48) * 10, tuple(2.0 * 8 * s for s in IMQ_SCALES)
    for fn, args in ((_imq_sum, (dist2, cs)), (_imq_sum_backward, (dist2, torch.rand(64, 48), cs))):
        torch._dynamo.reset()
        compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        out, codes = run_and_get_code(compiled, *args)
        kernels = {name for code in codes for name in re.findall(r"cpp_fused_\w+", code)}
        assert len(kernels) == 1, (fn.__name__, kernels)  # eager: one pass per scale and op
        assert torch.allclose(out, fn(*args), rtol=1e-5)


def test_the_kernel_choice_follows_the_device_and_the_environment(monkeypatch):
    from gmwae_core import objectives

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(objectives.FUSED_KERNEL_ENV, raising=False)
    eager = (objectives._imq_sum, objectives._imq_sum_backward)
    assert objectives._imq_functions(cpu, None) == eager
    monkeypatch.setattr(objectives, "_compiled", {"cuda": ("fwd", "bwd")})
    assert objectives._imq_functions(cuda, None) == ("fwd", "bwd")  # CUDA: fused by default
    monkeypatch.setenv(objectives.FUSED_KERNEL_ENV, "0")
    assert objectives._imq_functions(cuda, None) == eager
    assert objectives._imq_functions(cuda, True) == ("fwd", "bwd")  # the argument wins


def test_a_kernel_that_does_not_compile_warns_and_falls_back_to_the_eager_loop(monkeypatch):
    from gmwae_core import objectives

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(objectives, "_compiled", {"cpu": (broken, broken)})
    z_q, z_p = torch.randn(6, 3, 2, requires_grad=True), torch.randn(6, 3, 2)
    w = torch.full((6, 3), 1 / 3)
    with pytest.warns(RuntimeWarning, match="did not compile on cpu .*no C\\+\\+ compiler.*"
                                            "GMWAE_FUSED_KERNEL=0"):
        value = weighted_mmd(z_q, w, z_p, w, fused=True)
    value.backward()  # the backward takes the eager loop too
    assert objectives._compiled["cpu"] is None
    assert z_q.grad is not None and float(z_q.grad.abs().max()) > 0
    assert float(value) == float(weighted_mmd(z_q, w, z_p, w, fused=False))


def test_matmuls_stay_full_float32_on_cuda_while_convolutions_use_tf32():
    from gmwae_core.training import use_tf32_for_convolutions_only

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:  # the flags are process-wide and settable without a GPU
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, False
        use_tf32_for_convolutions_only()
        assert torch.backends.cuda.matmul.allow_tf32 is False  # the MMD's distances
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
