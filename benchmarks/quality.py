"""Quality under a fixed CPU budget: GM-WAE vs GM-VAE vs K-means on MNIST.

    python benchmarks/quality.py --data-dir ../shared/data/mnist --minutes 20 \\
        --out benchmarks/results/quality.json
    python benchmarks/quality.py --smoke --out /tmp/quality.json    # seconds, synthetic data

Each family trains with the `cpu` preset for the same wall-clock budget (pretraining
included, evaluation excluded), then is scored on the whole test split. scikit-learn's
K-means (K=10) on raw pixels is measured in the same run as the anchor. Writes JSON and
prints a table; the run folders (figures, checkpoints) go to --runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gmwae_core import (FAMILIES, ConfigError, from_preset, load_splits, parse_overrides,
                        train_run)
from gmwae_core.metrics import clustering_metrics

KEYS = ["cluster_acc", "cluster_acc_greedy", "nmi", "ari", "active_components",
        "assignment_entropy", "mmd", "recon_mse"]


def kmeans_anchor(data_cfg, K: int, seed: int) -> dict[str, float]:
    from sklearn.cluster import KMeans

    splits = load_splits(data_cfg)
    x = splits.train_x.flatten(1).numpy()
    start = time.monotonic()
    km = KMeans(n_clusters=K, n_init=3, random_state=seed).fit(x)
    pred = km.predict(splits.test_x.flatten(1).numpy())
    m = clustering_metrics(splits.test_y.numpy(), np.eye(K)[pred])
    return {**{f"test/{k}": v for k, v in m.items()}, "seconds": time.monotonic() - start}


def targets(results: dict, K: int) -> dict[str, bool | None]:
    """The issue's three targets; None for a target whose family was not run (--families)."""
    wae, vae = results["families"].get("gmwae"), results["families"].get("gmvae")
    kmeans_acc = results["kmeans"]["test/cluster_acc"]
    return {
        "gmwae_beats_kmeans": None if wae is None else wae["test/cluster_acc"] > kmeans_acc,
        "gmwae_all_modes_active": None if wae is None else wae["test/active_components"] == K,
        "gmvae_collapsed_le_3": None if vae is None else vae["test/active_components"] <= 3,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("GMWAE_DATA_DIR"))
    p.add_argument("--minutes", type=float, default=20.0, help="training budget per family")
    p.add_argument("--families", default="gmwae,gmvae")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--runs", default="runs/quality", help="folder for the runs' outputs")
    p.add_argument("--out", default="benchmarks/results/quality.json")
    p.add_argument("--smoke", action="store_true", help="synthetic data, a few seconds")
    args = p.parse_args()

    base = {"dataset": "mnist", "data_dir": args.data_dir, "minutes": args.minutes,
            "epochs": 1_000_000, "eval_size": 2000}
    if args.smoke:
        base = {"dataset": "synthetic", "minutes": 0.05, "epochs": 1_000_000,
                "decoder_width": 8, "pretrain_steps": 5}
    families = args.families.split(",")
    if any(f not in FAMILIES for f in families):
        raise SystemExit(f"--families {args.families!r}: use a comma-separated list of "
                         f"{' and '.join(FAMILIES)}, e.g. --families gmwae,gmvae")
    try:
        base.update(parse_overrides(args.overrides))
        cfg = from_preset("cpu", base)  # bad --set keys or values stop here, before training
    except ConfigError as e:
        raise SystemExit(f"--set: {e}") from None
    results: dict = {"budget_minutes_per_family": base["minutes"], "preset": "cpu",
                     "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                     "cpus": os.cpu_count(), "families": {}}
    for family in families:
        run_cfg = from_preset("cpu", base, family=family)
        print(f"== {family}: {base['minutes']} min on {run_cfg.data.dataset} ...", file=sys.stderr)
        m = train_run(run_cfg, Path(args.runs) / family)
        results["families"][family] = {
            **{f"test/{k}": m[f"test/{k}"] for k in KEYS},
            "epochs": m["run/epochs"], "steps": m["run/steps"],
            "train_seconds": m["run/train_seconds"], "config": run_cfg.to_dict()}
    results["kmeans"] = kmeans_anchor(cfg.data, cfg.model.K, cfg.train.seed)

    results["targets"] = targets(results, cfg.model.K)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))

    cols = ["cluster_acc", "cluster_acc_greedy", "nmi", "active_components", "assignment_entropy"]
    print(f"\n{'method':<10}" + "".join(f"{c:>20}" for c in cols) + f"{'steps':>8}")
    rows = [(f, r) for f, r in results["families"].items()] + [("kmeans", results["kmeans"])]
    for name, r in rows:
        print(f"{name:<10}" + "".join(f"{r[f'test/{c}']:>20.4f}" for c in cols)
              + f"{r.get('steps', float('nan')):>8.0f}")
    print("\ntargets:", json.dumps(results["targets"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
