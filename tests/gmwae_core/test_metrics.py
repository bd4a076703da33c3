import numpy as np
import pytest

from gmwae_core.metrics import (active_components, assignment_entropy, cluster_acc_greedy,
                                cluster_acc_hungarian, clustering_metrics, label_by_k)


def noisy_q(labels, K, rng, noise=1.5):
    logits = rng.normal(0, noise, (len(labels), K))
    logits[np.arange(len(labels)), labels % K] += 2.0
    q = np.exp(logits)
    return q / q.sum(1, keepdims=True)


def test_perfect_clustering_scores_one_under_both_protocols():
    labels = np.repeat(np.arange(10), 20)
    q = np.eye(10)[(labels + 3) % 10]  # clusters are a relabelling of the labels
    assert cluster_acc_hungarian(labels, q.argmax(1)) == 1.0
    assert cluster_acc_greedy(labels, q) == 1.0
    m = clustering_metrics(labels, q)
    assert m["nmi"] == pytest.approx(1.0) and m["ari"] == pytest.approx(1.0)
    assert m["active_components"] == 10 and m["assignment_entropy"] == pytest.approx(1.0)


def test_accuracies_are_invariant_to_relabelling_the_clusters():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 500)
    q = noisy_q(labels, 10, rng)
    perm = rng.permutation(10)
    assert cluster_acc_hungarian(labels, q.argmax(1)) == cluster_acc_hungarian(labels, perm[q.argmax(1)])
    inverse = np.argsort(perm)
    assert cluster_acc_greedy(labels, q) == cluster_acc_greedy(labels, q[:, inverse])


@pytest.mark.parametrize("K", [5, 10, 14])
def test_greedy_never_beats_hungarian(K):
    rng = np.random.default_rng(K)
    for _ in range(30):
        labels = rng.integers(0, 10, 300)
        q = noisy_q(labels, K, rng, noise=rng.uniform(0.5, 3))
        assert cluster_acc_greedy(labels, q) <= cluster_acc_hungarian(labels, q.argmax(1)) + 1e-12


def test_hungarian_counts_unmatched_clusters_as_errors():
    labels = np.array([0, 0, 1, 1])
    clusters = np.array([0, 1, 2, 2])  # 3 clusters, 2 labels: one cluster must stay unmatched
    assert cluster_acc_hungarian(labels, clusters) == 0.75


def test_collapse_metrics_on_a_collapsed_assignment():
    K = 10
    q = np.zeros((400, K))
    q[:300, 0] = 1.0
    q[300:390, 1] = 1.0
    q[390:, 2] = 1.0  # 10 of 400 = 2.5% >= 1/(4K) = 2.5%
    assert active_components(q.argmax(1), K) == 3
    agg = np.array([0.75, 0.225, 0.025])
    assert assignment_entropy(q) == pytest.approx(-(agg * np.log(agg)).sum() / np.log(K))
    assert clustering_metrics(np.zeros(400, int), q)["mean_entropy"] == pytest.approx(0.0, abs=1e-9)


def test_label_by_k_rows_are_mean_responsibilities():
    labels = np.array([0, 0, 1])
    q = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8]])
    assert np.allclose(label_by_k(labels, q, 3), [[0.8, 0.2], [0.2, 0.8], [0, 0]])
