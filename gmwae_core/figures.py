"""Per-run figures as PNG, after the paper's Figures 2, 3 and 5.

    reconstructions.png     test images and their reconstructions g(mu_k*(x)), k* = argmax q(k|x) (2a)
    samples_per_k.png       one row of prior samples z ~ p(z|k) decoded, per k                     (2b)
    near_mode_samples.png   the same with sigma0 halved                                           (2c)
    interpolations.png      decoded straight lines between the codes of two test images            (3a)
    mode_interpolations.png decoded straight lines between neighbouring mode means mu0_k           (3b)
    label_by_k.png          E[q(k|x) | label]; not drawn for images without labels            (5a)
    latent_embedding.png    2-D t-SNE of z ~ q(z|x) on test images, by label, with prior samples   (5b)

matplotlib is imported here only (Agg backend): the training loop never pays for it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .training import EvalResult, Trainer

__all__ = ["write_figures", "FIGURE_NAMES"]

FIGURE_NAMES = ("reconstructions", "samples_per_k", "near_mode_samples", "interpolations",
                "mode_interpolations", "label_by_k", "latent_embedding")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(images: torch.Tensor) -> np.ndarray:
    """(rows, cols, 1, 28, 28) in [0, 1] -> one (rows*28, cols*28) array with 1-pixel gaps."""
    rows, cols = images.shape[:2]
    out = np.ones((rows * 29 - 1, cols * 29 - 1))
    img = images.squeeze(2).cpu().numpy()
    for r in range(rows):
        for c in range(cols):
            out[r * 29: r * 29 + 28, c * 29: c * 29 + 28] = img[r, c]
    return out


def _save_grid(images: torch.Tensor, path: Path, title: str, ylabel: str = "") -> None:
    plt = _plt()
    rows, cols = images.shape[:2]
    fig, ax = plt.subplots(figsize=(max(4, cols * 0.5), max(2, rows * 0.5 + 0.6)))
    ax.imshow(_grid(images), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([r * 29 + 14 for r in range(rows)] if ylabel else [])
    if ylabel:
        ax.set_yticklabels([str(r) for r in range(rows)])
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _decode(trainer: Trainer, z: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(trainer.model.decoder(z))


@torch.no_grad()
def write_figures(trainer: Trainer, result: EvalResult, folder: str | Path, split: str = "test",
                  n_cols: int = 10, seed: int = 0) -> list[Path]:
    """Write every figure of FIGURE_NAMES into `folder`; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    trainer.model.eval()
    gen = torch.Generator(trainer.device).manual_seed(seed)
    prior, K = trainer.prior, trainer.cfg.model.K
    x_all, y_all = trainer.splits.split(split)
    paths = []

    # 2a: reconstructions of the first n_cols test images, at z = mu_k*(x).
    x = x_all[:n_cols]
    q_k_logits, q_z_mean, _ = trainer.model.encode(x)
    k_star = q_k_logits.argmax(1)
    z = q_z_mean[torch.arange(len(x), device=x.device), k_star]  # (n, d)
    paths.append(folder / "reconstructions.png")
    _save_grid(torch.stack([x, _decode(trainer, z)]), paths[-1],
               "top: test images, bottom: reconstructions")

    # 2b, 2c: samples per k, at sigma0 and sigma0 / 2.
    for name, scale in (("samples_per_k", 1.0), ("near_mode_samples", 0.5)):
        z = prior.sample((n_cols,), gen, scale=scale).transpose(0, 1)  # (K, n, d)
        paths.append(folder / f"{name}.png")
        _save_grid(_decode(trainer, z), paths[-1],
                   f"decoded z ~ N(mu0_k, ({scale:g} sigma0)^2 I)", ylabel="k")

    # 3a: interpolations between the codes of pairs of test images.
    t = torch.linspace(0, 1, n_cols, device=x.device).view(1, -1, 1)
    n_pairs = min(5, len(x_all) // 2)
    a, b = x_all[:n_pairs], x_all[n_pairs: 2 * n_pairs]

    def code(imgs: torch.Tensor) -> torch.Tensor:
        logits, mean, _ = trainer.model.encode(imgs)
        return mean[torch.arange(len(imgs), device=imgs.device), logits.argmax(1)]

    z = code(a).unsqueeze(1) * (1 - t) + code(b).unsqueeze(1) * t  # (pairs, n, d)
    paths.append(folder / "interpolations.png")
    _save_grid(_decode(trainer, z), paths[-1], "interpolations between two test images")

    # 3b: interpolations between the means of neighbouring modes k -> k+1.
    starts = prior.means
    ends = prior.means.roll(-1, 0)
    z = starts.unsqueeze(1) * (1 - t) + ends.unsqueeze(1) * t  # (K, n, d)
    paths.append(folder / "mode_interpolations.png")
    _save_grid(_decode(trainer, z), paths[-1], "interpolations mu0_k -> mu0_(k+1)", ylabel="k")

    plt = _plt()
    if result.label_by_k.shape[0]:  # 5a: the label-by-k matrix (images with labels only)
        paths.append(_label_by_k_figure(plt, result, K, folder))

    # 5b (the paper uses UMAP): z ~ q(z|x) = sum_k q(k|x) q(z|k,x) for up to 1000 test images, and 1000 prior samples.
    from sklearn.manifold import TSNE

    n = min(1000, len(x_all))
    logits, mean, logvar = trainer.model.encode(x_all[:n])
    k = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(1)
    rows = torch.arange(n, device=x_all.device)
    eps = torch.randn(mean[rows, k].shape, generator=gen, device=x_all.device)
    z_q = mean[rows, k] + torch.exp(0.5 * logvar[rows, k]) * eps
    k_p = torch.randint(0, K, (n,), generator=gen, device=x_all.device)
    z_p = prior.means[k_p] + prior.sigma0 * torch.randn(z_q.shape, generator=gen, device=x_all.device)
    both = torch.cat([z_q, z_p]).cpu().numpy()
    emb = (TSNE(n_components=2, init="pca", perplexity=min(30.0, (2 * n - 1) / 3), random_state=0)
           .fit_transform(both) if both.shape[1] > 2 else both)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(emb[n:, 0], emb[n:, 1], s=4, c="lightgrey", label="prior samples")
    labels = y_all[:n].cpu().numpy()
    coloured_by = "label" if labels.min() >= 0 else "cluster (no labels)"
    sc = ax.scatter(emb[:n, 0], emb[:n, 1], s=4, c=labels if labels.min() >= 0 else k.cpu().numpy(),
                    cmap="tab10")
    fig.colorbar(sc, ax=ax, label=coloured_by)
    ax.legend(loc="best", fontsize=8)
    ax.set_title("z ~ q(z|x) on test images (t-SNE), prior samples in grey")
    fig.tight_layout()
    paths.append(folder / "latent_embedding.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def _label_by_k_figure(plt, result: EvalResult, K: int, folder: Path) -> Path:
    """Paper Fig. 5a: E[q(k|x) | label], one row per label."""
    fig, ax = plt.subplots(figsize=(0.5 * K + 2, 0.5 * result.label_by_k.shape[0] + 1))
    im = ax.imshow(result.label_by_k, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xlabel("k")
    ax.set_ylabel("label")
    ax.set_xticks(range(K))
    ax.set_yticks(range(result.label_by_k.shape[0]))
    ax.set_title("E[q(k|x) | label]")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = folder / "label_by_k.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
