import numpy as np
import pytest

from gmwae_core.metrics import (active_components, assignment_entropy, cluster_acc_greedy,
                                cluster_acc_hungarian, cluster_acc_many, clustering_metrics,
                                label_by_k, majority_labels)


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


def test_many_to_one_accuracy_by_hand():
    # labels 0,0,1,1,1,2 in clusters 0,0,0,1,1,2: cluster 0 holds {0,0,1} -> label 0,
    # cluster 1 {1,1} -> 1, cluster 2 {2} -> 2: 5 of 6 right.
    labels = np.array([0, 0, 1, 1, 1, 2])
    clusters = np.array([0, 0, 0, 1, 1, 2])
    assert list(majority_labels(labels, clusters, K=4)) == [0, 1, 2, -1]  # k=3: nobody
    assert cluster_acc_many(labels, clusters) == pytest.approx(5 / 6)
    # Splitting a class over two clusters costs nothing many-to-one; Hungarian pays for it.
    split = np.array([0, 3, 1, 1, 1, 2])
    assert cluster_acc_many(labels, split) == 1.0
    assert cluster_acc_hungarian(labels, split) == pytest.approx(5 / 6)


def test_many_to_one_map_fitted_on_one_split_scores_another():
    fitted = majority_labels(np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0]), K=3)
    assert list(fitted) == [1, 0, -1]
    # test points: cluster 1 -> 0 (right), cluster 0 -> 1 (one right, one wrong),
    # cluster 2 was never seen when fitting: an error
    acc = cluster_acc_many(np.array([0, 1, 0, 2]), np.array([1, 0, 0, 2]), fitted)
    assert acc == pytest.approx(2 / 4)


def test_ami_is_chance_corrected_and_comparable_across_K():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 5000)
    # random clusters score ~0 AMI at any K, while many-to-one accuracy rises with K
    for K in (10, 40):
        m = clustering_metrics(labels, np.eye(K)[rng.integers(0, K, 5000)])
        assert abs(m["ami"]) < 0.01
    many = [clustering_metrics(labels, np.eye(K)[rng.integers(0, K, 5000)])["cluster_acc_many"]
            for K in (10, 200)]
    assert many[1] > many[0] + 0.02
    # splitting each class in two keeps AMI high (0.9+) and costs Hungarian half the points
    split = labels * 2 + rng.integers(0, 2, 5000)
    m = clustering_metrics(labels, np.eye(20)[split])
    assert m["ami"] > 0.85 and m["cluster_acc_many"] == 1.0
    assert m["cluster_acc"] == pytest.approx(0.5, abs=0.03)
    perfect = clustering_metrics(labels, np.eye(10)[labels])
    assert perfect["ami"] == pytest.approx(1.0) and perfect["cluster_acc_many"] == 1.0


def test_augment_ari_is_one_for_kept_clusters_whatever_their_names_and_zero_for_one_cluster():
    from gmwae_core.metrics import augment_ari

    clusters = np.repeat(np.arange(5), 40)
    assert augment_ari(clusters, (clusters + 2) % 5) == pytest.approx(1.0)
    moved = clusters.copy()
    moved[::4] = (moved[::4] + 1) % 5  # a quarter of the images change cluster
    assert 0.2 < augment_ari(clusters, moved) < 0.9
    one = np.zeros(200, dtype=int)  # collapse agrees with itself trivially: no credit
    assert augment_ari(one, one) == 0.0


def test_augment_mi_rewards_even_certain_kept_clusters_and_gives_collapse_nothing():
    from gmwae_core.metrics import augment_mi

    K = 8
    even = np.eye(K)[np.arange(800) % K]
    assert augment_mi(even, even) == pytest.approx(1.0)
    collapsed = np.zeros((800, K))
    collapsed[:, 0] = 1.0
    assert augment_mi(collapsed, collapsed) == pytest.approx(0.0, abs=1e-12)
    unsure = np.full((800, K), 1.0 / K)  # every image the same q(k|x): nothing learnt
    assert augment_mi(unsure, unsure) == pytest.approx(0.0, abs=1e-12)
    half = np.eye(K)[np.arange(800) % 2]  # two of the K clusters used
    assert augment_mi(half, half) == pytest.approx(np.log(2) / np.log(K))
    shuffled = even[np.random.default_rng(0).permutation(800)]  # T(x) lands anywhere
    assert augment_mi(even, shuffled) < 0.05


def test_latent_silhouette_separates_tight_far_clusters_and_scores_one_cluster_worst():
    from gmwae_core.metrics import latent_silhouette

    rng = np.random.default_rng(0)
    clusters = np.repeat(np.arange(3), 50)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    tight = centres[clusters] + rng.normal(0, 0.1, (150, 2))
    assert latent_silhouette(tight, clusters) > 0.9
    mixed = rng.normal(0, 1, (150, 2))
    assert abs(latent_silhouette(mixed, clusters)) < 0.1
    assert latent_silhouette(tight, np.zeros(150, dtype=int)) == -1.0


def test_seed_stability_is_the_mean_pairwise_ari_and_needs_two_runs():
    from gmwae_core.metrics import seed_stability

    a = np.repeat(np.arange(4), 25)
    b = (a + 1) % 4  # the same partition, other names
    c = np.random.default_rng(0).integers(0, 4, 100)
    assert seed_stability([a, b]) == pytest.approx(1.0)
    assert seed_stability([a, b, c]) < 0.5
    with pytest.raises(ValueError, match="at least 2"):
        seed_stability([a])


def test_every_label_free_metric_has_a_direction_and_no_label_metric_is_among_them():
    from gmwae_core.metrics import EVAL_METRICS, LABEL_METRICS

    assert {"augment_ari", "augment_mi", "silhouette"} <= set(EVAL_METRICS) - LABEL_METRICS
    assert LABEL_METRICS <= set(EVAL_METRICS)
    assert set(EVAL_METRICS.values()) == {"min", "max"}
