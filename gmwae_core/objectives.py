"""The objectives, as pure functions: tensors in, (scalar, dict of named terms) out.

GM-WAE (paper Eq. 4, authors' code):
    L = recon_weight * E_x sum_k q(k|x) mean_s ||x - g(z_ks)||^2  +  lambda * MMD(q(z), p(z))
GM-VAE (paper Eq. 2, the negative ELBO):
    L = E_x [ sum_k q(k|x) (mean_s -log p(x|z_ks) + KL(q(z|k,x) || p(z|k))) + KL(q(k|x) || p(k)) ]
Both take the expectation over k exactly: every k is decoded and weighted by q(k|x).
"""
from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F

__all__ = [
    "IMQ_SCALES",
    "squared_distances",
    "imq_kernel_sum",
    "weighted_mmd",
    "kl_diag_gaussians",
    "kl_categorical_uniform",
    "wae_objective",
    "vae_objective",
    "moment_matching_loss",
    "consistency_kl",
    "balance_kl",
]

# Bandwidths of the inverse-multiquadric kernel mixture, as multiples of c_base = 2 d.
IMQ_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2 from one matmul, clamped at 0 against round-off. (N, d), (M, d) -> (N, M)."""
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1).unsqueeze(0) - 2.0 * (a @ b.T)
    return sq.clamp_min(0.0)


def _imq_sum(dist2: torch.Tensor, cs: tuple[float, ...]) -> torch.Tensor:
    """sum_i C_i / (C_i + D). Eagerly a pass over D per scale, accumulated in place (one extra
    (N, M) buffer however many scales); compiled, one pass."""
    out = torch.zeros_like(dist2)
    for c in cs:
        out.add_(c / (c + dist2))
    return out


def _imq_sum_backward(dist2: torch.Tensor, grad: torch.Tensor,
                      cs: tuple[float, ...]) -> torch.Tensor:
    """grad * d/dD sum_i C_i / (C_i + D) = grad * sum_i -C_i / (C_i + D)^2."""
    d_out = torch.zeros_like(dist2)
    for c in cs:
        d_out.sub_(c / (c + dist2) ** 2)
    return grad * d_out


_EAGER = (_imq_sum, _imq_sum_backward)
# FUSED_KERNEL_ENV=0 keeps the eager loop on every device; 1 compiles it on every device
# (CPU included, where it needs a C++ compiler); unset: compiled on CUDA only.
FUSED_KERNEL_ENV = "GMWAE_FUSED_KERNEL"
_compiled: dict[str, tuple | None] = {}  # device type -> (forward, backward), None: failed


def _imq_functions(device: torch.device, fused: bool | None):
    """The (forward, backward) pair for this device: torch.compile'd (Triton on CUDA, C++
    on CPU), so that the seven scales are one pass over the distance block, or the eager
    loop. A compilation that fails once is reported and the eager loop used from then on."""
    if fused is None:
        env = os.environ.get(FUSED_KERNEL_ENV, "")
        fused = env == "1" or (env != "0" and device.type == "cuda")
    # Under torch.func transforms (a stack of runs) the eager loop: vmap batches it op by op.
    if (not fused or device.type == "meta" or _compiled.get(device.type, ()) is None
            or torch._C._are_functorch_transforms_active()):
        return _EAGER
    if device.type not in _compiled:
        _compiled[device.type] = tuple(torch.compile(fn, dynamic=True, fullgraph=True)
                                       for fn in _EAGER)
    return _compiled[device.type]


def _call(kind: int, device: torch.device, fused: bool | None, *args):
    functions = _imq_functions(device, fused)
    if functions is _EAGER:
        return functions[kind](*args)
    try:
        return functions[kind](*args)
    except Exception as error:  # noqa: BLE001 - the compiled function's failure, reported
        _compiled[device.type] = None
        warnings.warn(f"the fused IMQ kernel did not compile on {device.type} "
                      f"({type(error).__name__}: {str(error)[:200]}); using the eager loop. "
                      f"Set {FUSED_KERNEL_ENV}=0 to skip the attempt.", RuntimeWarning,
                      stacklevel=3)
        return _EAGER[kind](*args)


class _IMQKernelSum(torch.autograd.Function):
    """sum_i C_i / (C_i + D): one saved tensor instead of one per scale, and, compiled,
    one pass over D forward and one backward instead of one per scale. torch.func's vmap
    (a stack of runs) batches it by running forward and backward over the stack."""

    generate_vmap_rule = True

    @staticmethod
    def forward(dist2: torch.Tensor, cs: tuple[float, ...], fused: bool | None) -> torch.Tensor:
        return _call(0, dist2.device, fused, dist2, cs)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        dist2, cs, fused = inputs
        ctx.save_for_backward(dist2)
        ctx.cs, ctx.fused = cs, fused

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (dist2,) = ctx.saved_tensors
        return _call(1, dist2.device, ctx.fused, dist2, grad, ctx.cs), None, None


def imq_kernel_sum(dist2: torch.Tensor, latent_dim: int,
                   fused: bool | None = None) -> torch.Tensor:
    """Eq. 6: k(a, b) = sum_i C_i / (C_i + ||a - b||^2), C_i = 2 d * IMQ_SCALES[i].

    fused: compile the sum into one pass (None: on CUDA, or as GMWAE_FUSED_KERNEL says)."""
    return _IMQKernelSum.apply(dist2, tuple(2.0 * latent_dim * s for s in IMQ_SCALES), fused)


def weighted_mmd(z_q: torch.Tensor, w_q: torch.Tensor, z_p: torch.Tensor,
                 w_p: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """The authors' weighted U-statistic MMD between the aggregate posterior and the prior.

    z_q, z_p: (N, M, d), M samples attached to each of N batch items; w_q, w_p: (N, M)
    sample weights (posterior: q(k|x)/S, prior: 1/(K S), so each item's weights sum to 1).
    With k the IMQ kernel sum and [n != m] leaving out same-batch-index pairs:

        MMD = sum_{n!=m} sum_{a,b} w_q[n,a] w_q[m,b] k(z_q[n,a], z_q[m,b]) / (N (N-1))
            + sum_{n!=m} sum_{a,b} w_p[n,a] w_p[m,b] k(z_p[n,a], z_p[m,b]) / (N (N-1))
            - 2 sum_{n,m} sum_{a,b} w_q[n,a] w_p[m,b] k(z_q[n,a], z_p[m,b]) / N^2

    Each block of distances (qq, qp, pp) is computed once and serves every kernel scale.
    The blocks are kept apart so that pp, a constant when only z_q carries gradients,
    gets no backward pass, and qp is not computed twice. The value can be slightly
    negative: the within terms are unbiased, the cross term is not. fused: see imq_kernel_sum.
    """
    N, M, d = z_q.shape
    zq, zp = z_q.reshape(N * M, d), z_p.reshape(N * M, d)
    wq, wp = w_q.reshape(-1), w_p.reshape(-1)
    k_qq = imq_kernel_sum(squared_distances(zq, zq), d, fused)  # (NM, NM)
    k_pp = imq_kernel_sum(squared_distances(zp, zp), d, fused)
    k_qp = imq_kernel_sum(squared_distances(zq, zp), d, fused)

    def within(kern: torch.Tensor, w_flat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # All pairs, less the n == m pairs: the diagonal blocks, (M, M, N).
        same = torch.einsum("abn,na,nb->", torch.diagonal(kern.view(N, M, N, M), dim1=0, dim2=2),
                            w, w)
        return (w_flat @ kern @ w_flat - same) / (N * (N - 1))

    return within(k_qq, wq, w_q) + within(k_pp, wp, w_p) - 2.0 * (wq @ k_qp @ wp) / (N * N)


def kl_diag_gaussians(mean: torch.Tensor, logvar: torch.Tensor, prior_mean: torch.Tensor,
                      prior_var: float | torch.Tensor) -> torch.Tensor:
    """KL(N(mean, diag(exp logvar)) || N(prior_mean, prior_var I)), summed over the last dim.

    0.5 * sum_i [ var_i / s^2 + (mean_i - m_i)^2 / s^2 - 1 - log(var_i / s^2) ]

    prior_var: a float, or a 0-dim tensor (one per run in a stack of runs).
    """
    log_prior_var = (torch.log(prior_var) if isinstance(prior_var, torch.Tensor)
                     else math.log(prior_var))
    log_ratio = logvar - log_prior_var
    return 0.5 * (torch.exp(log_ratio) + (mean - prior_mean) ** 2 / prior_var - 1.0
                  - log_ratio).sum(-1)


def kl_categorical_uniform(q_k_logits: torch.Tensor) -> torch.Tensor:
    """KL(q(k|x) || 1/K) = sum_k q log q + log K, per batch item: (B, K) -> (B,)."""
    log_q = F.log_softmax(q_k_logits, dim=-1)
    return (log_q.exp() * log_q).sum(-1) + math.log(q_k_logits.shape[-1])


def wae_objective(x: torch.Tensor, x_rec_logits: torch.Tensor, q_k_logits: torch.Tensor,
                  z_q: torch.Tensor, z_p: torch.Tensor, lambda_mmd: float,
                  recon_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GM-WAE loss (Eq. 4).

    x: (B, 1, 28, 28); x_rec_logits: (B, K, S, 1, 28, 28) decoder logits of z_q;
    q_k_logits: (B, K); z_q: (B, K, S, d) posterior samples; z_p: (B, K, S, d) prior samples
    (z_p[:, k] ~ p(z|k)).
    """
    B, K, S, d = z_q.shape
    q_k = torch.softmax(q_k_logits, dim=-1)  # (B, K)
    x_rec = torch.sigmoid(x_rec_logits)
    sq_err = ((x.unsqueeze(1).unsqueeze(1) - x_rec) ** 2).flatten(3).sum(-1)  # (B, K, S)
    recon = (q_k * sq_err.mean(-1)).sum(-1).mean()
    w_q = (q_k / S).unsqueeze(-1).expand(B, K, S).reshape(B, K * S)
    w_p = torch.full_like(w_q, 1.0 / (K * S))
    mmd = weighted_mmd(z_q.reshape(B, K * S, d), w_q, z_p.reshape(B, K * S, d), w_p)
    loss = recon_weight * recon + lambda_mmd * mmd
    return loss, {"loss": loss, "recon": recon, "mmd": mmd}


def vae_objective(x: torch.Tensor, x_rec_logits: torch.Tensor, q_k_logits: torch.Tensor,
                  q_z_mean: torch.Tensor, q_z_logvar: torch.Tensor, prior_means: torch.Tensor,
                  prior_var: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GM-VAE loss: the negative ELBO of Eq. 2 with the sum over k taken exactly.

    recon_k is the Bernoulli negative log-likelihood of x under logits g(z_ks), averaged
    over the S samples; both KLs are in closed form.
    """
    B, K, S = x_rec_logits.shape[:3]
    q_k = torch.softmax(q_k_logits, dim=-1)  # (B, K)
    target = x.unsqueeze(1).unsqueeze(1).expand_as(x_rec_logits)
    nll = F.binary_cross_entropy_with_logits(x_rec_logits, target, reduction="none")
    nll = nll.flatten(3).sum(-1).mean(-1)  # (B, K)
    kl_z = kl_diag_gaussians(q_z_mean, q_z_logvar, prior_means, prior_var)  # (B, K)
    kl_k = kl_categorical_uniform(q_k_logits)  # (B,)
    recon = (q_k * nll).sum(-1).mean()
    kl_continuous = (q_k * kl_z).sum(-1).mean()
    kl_discrete = kl_k.mean()
    loss = recon + kl_continuous + kl_discrete
    return loss, {"loss": loss, "recon": recon, "kl_continuous": kl_continuous,
                  "kl_discrete": kl_discrete}


def moment_matching_loss(z_q: torch.Tensor, prior_means: torch.Tensor,
                         prior_var: float) -> torch.Tensor:
    """Encoder pretraining (the authors' `pretrain_encoder`): each q(z|k,x) matches the mean
    and the covariance of p(z|k) = N(mu0_k, sigma0^2 I). z_q: (B, K, S, d); per k, over the
    B*S samples, with m_k their mean and C_k their covariance:

        sum_k ||m_k - mu0_k||^2 + ||C_k - sigma0^2 I||_F^2       (summed over k, not averaged)
    """
    B, K, S, d = z_q.shape
    z = z_q.transpose(1, 2).reshape(B * S, K, d)
    mean = z.mean(0)  # (K, d)
    centred = (z - mean).transpose(0, 1)  # (K, BS, d)
    cov = centred.transpose(1, 2) @ centred / (B * S - 1)  # (K, d, d)
    eye = torch.eye(d, device=z_q.device, dtype=z_q.dtype)
    mean_loss = ((mean - prior_means) ** 2).sum()
    cov_loss = ((cov - prior_var * eye) ** 2).sum()
    return mean_loss + cov_loss


def consistency_kl(q_k_logits: torch.Tensor, q_k_logits_t: torch.Tensor) -> torch.Tensor:
    """Augmentation consistency of the discrete code, q(k|x) the fixed target:

        E_x KL( sg[q(k|x)] || q(k|T(x)) ) = E_x sum_k q(k|x) (log q(k|x) - log q(k|T(x)))

    (B, K) logits of x and of T(x) -> scalar; 0 exactly when q(k|T(x)) = q(k|x).
    """
    log_q = F.log_softmax(q_k_logits.detach(), -1)
    log_q_t = F.log_softmax(q_k_logits_t, -1)
    return (log_q.exp() * (log_q - log_q_t)).sum(-1).mean()


def balance_kl(q_k_logits: torch.Tensor) -> torch.Tensor:
    """KL(q(k) || 1/K) of the batch's aggregate q(k) = mean_x q(k|x):

        sum_k q(k) log q(k) + log K

    0 when the batch uses every k equally; log K when it uses one.
    """
    agg = torch.softmax(q_k_logits, -1).mean(0)
    return (agg * torch.log(agg.clamp_min(1e-12))).sum() + math.log(q_k_logits.shape[-1])
