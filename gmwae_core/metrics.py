"""Evaluation metrics, one definition each (names are the MLflow keys, without prefix).

Clustering: `cluster_acc` (Hungarian matching of clusters to labels on counts),
`cluster_acc_greedy` (the paper's greedy map of clusters to labels, on mean q(k|x) per
label, fitted on the split it scores: the paper's protocol, which fits the map on the
training images and scores held-out ones, is Trainer.evaluate_paper), `cluster_acc_many`
(each cluster takes the majority label of a fitting split), `nmi`, `ari`, `ami`.

Which to compare: with K fixed at the number of classes, `cluster_acc` (the paper's
headline). Across K, `ami`: Hungarian accuracy counts every cluster beyond the number of
classes as errors (a search over K is pushed to K = 10 by the metric), many-to-one accuracy
rises with K (K = N scores 1), and AMI is corrected for chance, so comparable across K.
Collapse: `active_components`, `assignment_entropy`, `mean_entropy`, and the label-by-k
matrix E[q(k|x) | label] (paper Fig. 5a).

Label-free criteria, for data without labels (docs/concepts.md, "Choosing without labels"):
`augment_ari` (agreement of the argmax q(k|x) of images and of randomly shifted and rotated
copies), `augment_mi` (the mutual information of those two assignments, which rewards
using the K clusters evenly as well as agreeing), `silhouette` (separation of the clusters in latent space), with `mmd`, `recon_mse`
and `assignment_entropy` from the images alone; `seed_stability` compares the clusterings of
several runs of one configuration (confirm).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import (adjusted_mutual_info_score, adjusted_rand_score,
                             normalized_mutual_info_score)

__all__ = [
    "EVAL_METRICS",
    "LABEL_METRICS",
    "cluster_acc_hungarian",
    "cluster_acc_greedy",
    "greedy_labels",
    "majority_labels",
    "cluster_acc_many",
    "label_by_k",
    "active_components",
    "active_from_counts",
    "active_count",
    "aggregate_entropy",
    "assignment_entropy",
    "mean_entropy",
    "clustering_metrics",
    "collapse_metrics",
    "augment_ari",
    "augment_mi",
    "latent_silhouette",
    "seed_stability",
]


EVAL_METRICS: dict[str, str] = {
    "cluster_acc": "max", "cluster_acc_greedy": "max", "cluster_acc_many": "max",
    "nmi": "max", "ari": "max", "ami": "max",
    "active_components": "max", "assignment_entropy": "max", "mean_entropy": "min",
    "mmd": "min", "recon_mse": "min", "kl_discrete": "min", "kl_continuous": "min",
    "augment_ari": "max", "augment_mi": "max", "silhouette": "max",
}
"""Every metric Trainer.evaluate reports for a split (as `{split}/{name}`) and its better
direction: max (higher is better) or min."""
LABEL_METRICS = frozenset({"cluster_acc", "cluster_acc_greedy", "cluster_acc_many", "nmi", "ari",
                           "ami"})
"""The metrics of EVAL_METRICS that compare the clusters with the split's labels. A study
whose objective is one of them chooses its models with the validation split's labels; the
others read the images alone."""


def _contingency(labels: np.ndarray, clusters: np.ndarray, n_labels: int, K: int) -> np.ndarray:
    counts = np.zeros((n_labels, K), dtype=np.int64)  # (labels, clusters)
    np.add.at(counts, (labels, clusters), 1)
    return counts


def cluster_acc_hungarian(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Best one-to-one matching of clusters to labels (Hungarian on counts); accuracy in [0, 1].

    Clusters left unmatched (K > number of labels) count as errors.
    """
    labels, clusters = np.asarray(labels), np.asarray(clusters)
    counts = _contingency(labels, clusters, labels.max() + 1, clusters.max() + 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(labels))


def majority_labels(labels: np.ndarray, clusters: np.ndarray, K: int) -> np.ndarray:
    """Each cluster's most frequent label among the points assigned to it: (K,); -1 for a
    cluster no point was assigned to (ties: the smaller label)."""
    labels, clusters = np.asarray(labels), np.asarray(clusters)
    counts = _contingency(labels, clusters, int(labels.max()) + 1, K)  # (labels, K)
    return np.where(counts.sum(0) > 0, counts.argmax(0), -1)


def cluster_acc_many(labels: np.ndarray, clusters: np.ndarray,
                     k_to_label: np.ndarray | None = None) -> float:
    """Many-to-one accuracy: a point is right when its cluster's label is its own, with each
    cluster labelled by `k_to_label` (majority_labels of a fitting split; default: fitted
    on these points). Clusters the fit never saw count as errors."""
    labels, clusters = np.asarray(labels), np.asarray(clusters)
    if k_to_label is None:
        k_to_label = majority_labels(labels, clusters, int(clusters.max()) + 1)
    k_to_label = np.asarray(k_to_label)
    known = clusters < len(k_to_label)
    guess = np.where(known, k_to_label[np.minimum(clusters, len(k_to_label) - 1)], -1)
    return float((guess == labels).mean())


def label_by_k(labels: np.ndarray, q_k: np.ndarray, n_labels: int) -> np.ndarray:
    """E[q(k|x) | label] for each label row: (n_labels, K); rows of absent labels are 0."""
    out = np.zeros((n_labels, q_k.shape[1]))
    for label in range(n_labels):
        sel = labels == label
        if sel.any():
            out[label] = q_k[sel].mean(0)
    return out


def cluster_acc_greedy(labels: np.ndarray, q_k: np.ndarray,
                       k_to_label: np.ndarray | None = None) -> float:
    """The paper's greedy accuracy (Section 3.1): give each label the k that maximises its mean
    q(k|x), taking (label, k) pairs in decreasing order of that mean, one k per label;
    a point is right when its argmax k was given its label. Never above Hungarian.
    `k_to_label`: the map fitted on other images (greedy_labels), e.g. the paper's training
    images when scoring its held-out 1,000 (the paper's protocol); default: fitted on the
    images it scores, which reads their labels twice and is not the paper's protocol.
    """
    labels = np.asarray(labels)
    if k_to_label is None:
        k_to_label = greedy_labels(labels, q_k)
    return float((k_to_label[q_k.argmax(1)] == labels).mean())


def greedy_labels(labels: np.ndarray, q_k: np.ndarray) -> np.ndarray:
    """The paper's greedy map: (K,) label of each k, -1 for a k no label took."""
    labels = np.asarray(labels)
    n_labels, K = labels.max() + 1, q_k.shape[1]
    means = label_by_k(labels, q_k, n_labels)
    k_to_label = np.full(K, -1)
    free_labels, free_k = set(range(n_labels)), set(range(K))
    for flat in np.argsort(-means, axis=None, kind="stable"):
        label, k = divmod(int(flat), K)
        if label in free_labels and k in free_k:
            k_to_label[k] = label
            free_labels.discard(label)
            free_k.discard(k)
            if not free_labels or not free_k:
                break
    return k_to_label


def active_count(counts: torch.Tensor) -> torch.Tensor:
    """Number of k whose share of the argmax counts (K,) is at least 1/(4K), as a 0-dim
    tensor on the counts' device (no host synchronisation)."""
    K = counts.shape[-1]
    return (counts / counts.sum().clamp_min(1.0) >= 1.0 / (4 * K)).sum()


def active_from_counts(counts: np.ndarray | torch.Tensor) -> int:
    """Number of k whose share of the argmax counts (K,) is at least 1/(4K)."""
    return int(active_count(torch.as_tensor(counts, dtype=torch.float64)))


def active_components(clusters: np.ndarray, K: int) -> int:
    """Number of k whose share of argmax assignments is at least 1/(4K)."""
    return active_from_counts(np.bincount(clusters, minlength=K))


def aggregate_entropy(q_k: torch.Tensor) -> torch.Tensor:
    """Entropy of the aggregate q(k) = mean_x q(k|x), divided by log K, as a 0-dim tensor on
    q_k's device (no host synchronisation)."""
    agg = q_k.mean(0)
    return -torch.special.xlogy(agg, agg).sum() / math.log(q_k.shape[1])


def assignment_entropy(q_k: np.ndarray | torch.Tensor) -> float:
    """Entropy of the aggregate q(k) = mean_x q(k|x), divided by log K: 1 balanced, 0 one mode."""
    return float(aggregate_entropy(torch.as_tensor(q_k)))


def mean_entropy(q_k: np.ndarray) -> float:
    """Mean over x of the entropy of q(k|x), divided by log K (0: every point certain)."""
    p = np.clip(q_k, 1e-12, 1.0)
    return float(-(q_k * np.log(p)).sum(1).mean() / math.log(q_k.shape[1]))


def clustering_metrics(labels: np.ndarray, q_k: np.ndarray,
                       k_to_label: np.ndarray | None = None) -> dict[str, float]:
    """All clustering and collapse metrics of one split from q(k|x) (N, K) and labels (N,);
    `k_to_label`: the many-to-one map fitted on another split (default: on this one)."""
    clusters = q_k.argmax(1)
    return {
        "cluster_acc": cluster_acc_hungarian(labels, clusters),
        "cluster_acc_greedy": cluster_acc_greedy(labels, q_k),
        "cluster_acc_many": cluster_acc_many(labels, clusters, k_to_label),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "ari": float(adjusted_rand_score(labels, clusters)),
        "ami": float(adjusted_mutual_info_score(labels, clusters)),
        **collapse_metrics(q_k),
    }


def collapse_metrics(q_k: np.ndarray) -> dict[str, float]:
    """The collapse metrics of one split from q(k|x) (N, K): they read no labels."""
    return {
        "active_components": float(active_components(q_k.argmax(1), q_k.shape[1])),
        "assignment_entropy": assignment_entropy(q_k),
        "mean_entropy": mean_entropy(q_k),
    }


def augment_ari(clusters: np.ndarray, clusters_augmented: np.ndarray) -> float:
    """Adjusted Rand index between the clusters of images and of transformed copies of the
    same images (1: every image keeps its cluster; about 0: chance). A clustering that puts
    every image in one cluster agrees with itself trivially and scores 0. Reads no labels."""
    clusters, clusters_augmented = np.asarray(clusters), np.asarray(clusters_augmented)
    if len(np.unique(clusters)) < 2 or len(np.unique(clusters_augmented)) < 2:
        return 0.0
    return float(adjusted_rand_score(clusters, clusters_augmented))


def augment_mi(q_k: np.ndarray, q_k_augmented: np.ndarray) -> float:
    """Mutual information between the cluster k of an image and k' of a transformed copy,
    from the joint P(k, k') = mean_x q(k|x) q(k'|T(x)) (symmetrised), divided by log K:
    1 when the K clusters are equally used, every image is certain and keeps its cluster;
    0 when one cluster takes every image, or q(k|x) is the same for every image (the
    objective of Ji et al., "Invariant information clustering", ICCV 2019, read as a
    score). Reads no labels."""
    q_k = np.asarray(q_k, dtype=np.float64)
    q_t = np.asarray(q_k_augmented, dtype=np.float64)
    joint = q_k.T @ q_t / len(q_k)
    joint = (joint + joint.T) / 2
    joint /= joint.sum()
    marginal = joint.sum(1)
    outer = np.outer(marginal, marginal)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / outer[nz])).sum())
    return max(0.0, mi / math.log(q_k.shape[1]))


def latent_silhouette(codes: np.ndarray, clusters: np.ndarray) -> float:
    """Mean silhouette of the codes (N, d) grouped by their clusters (N,), Euclidean: near 1
    when clusters are tight and far apart. A clustering with fewer than two clusters
    separates nothing and scores -1, the scale's worst. Reads no labels."""
    from sklearn.metrics import silhouette_score

    codes, clusters = np.asarray(codes, dtype=np.float64), np.asarray(clusters)
    n_clusters = len(np.unique(clusters))
    if n_clusters < 2 or n_clusters >= len(clusters):
        return -1.0
    return float(silhouette_score(codes, clusters, metric="euclidean"))


def seed_stability(clusterings: list[np.ndarray]) -> float:
    """Mean adjusted Rand index over every pair of clusterings of the same images (runs of
    one configuration with different seeds): 1 when each seed finds the same partition, up
    to the clusters' names. Needs two clusterings or more. Reads no labels."""
    if len(clusterings) < 2:
        raise ValueError(f"`clusterings` must hold at least 2 runs' clusters, but got "
                         f"{len(clusterings)}. Run the configuration with two seeds or more.")
    scores = [adjusted_rand_score(a, b) for i, a in enumerate(clusterings)
              for b in clusterings[i + 1:]]
    return float(np.mean(scores))
