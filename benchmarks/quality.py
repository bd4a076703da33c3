"""Quality under a fixed CPU budget, over seeds: the paper's GM-WAE, the options past it,
GM-VAE, and K-means on pixels, on MNIST.

    python benchmarks/quality.py --data-dir ../shared/data/mnist --minutes 20 --seeds 3 \\
        --variants paper,consistency --out benchmarks/results/quality/seeds.json
    python benchmarks/quality.py --epochs 8 --seed-list 3,4,5 ... --out held.json   # a step budget
    python benchmarks/quality.py --merge part1.json part2.json --out all.json
    python benchmarks/quality.py --smoke --out /tmp/quality.json            # seconds, synthetic

Every run trains the `cpu` preset (plus the variant's settings) for the same budget:
wall-clock minutes (pretraining and warm start included, evaluation excluded), or with
--epochs a number of epochs, the same steps on any machine whatever else it runs. Each
run keeps its last epoch's validation metrics (what a choice between variants may read)
and its test metrics on the whole test split (what is reported once the choice is made):
Hungarian accuracy, greedy accuracy, NMI, AMI, active modes, MMD, reconstruction. K-means
(K=10, scikit-learn, n_init=3) on raw pixels runs once per seed in the same run. The JSON
keeps every (variant, seed) run, so files measured apart merge (--merge) when their
budget and data agree; the summary (mean, std, n per variant) and the targets are
recomputed from the merged runs. Prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gmwae_core import ConfigError, from_preset, load_splits, parse_overrides, train_run
from gmwae_core.config import canonical_key
from gmwae_core.metrics import clustering_metrics
from gmwae_core.training import cpu_has_fast_bf16

from record import provenance  # benchmarks/record.py: the results record's provenance keys

KEYS = ["cluster_acc", "cluster_acc_greedy", "nmi", "ami", "ari", "active_components",
        "assignment_entropy", "mmd", "recon_mse"]
"""Metrics kept per run, for the test split (`test/...`) and the validation split
(`val/...`, the last epoch's): choices between variants read `val/`, never `test/`."""
SUMMARY_KEYS = ["cluster_acc", "nmi", "ami", "active_components"]

VARIANTS: dict[str, dict] = {
    "paper": {"family": "gmwae"},
    "consistency": {"family": "gmwae", "consistency_weight": 1.0, "balance_weight": 1.0},
    "warm-start": {"family": "gmwae", "warm_start_steps": 1000},
    "gmvae": {"family": "gmvae"},
    "gmvae-consistency": {"family": "gmvae", "consistency_weight": 1.0, "balance_weight": 1.0},
    # The option at the shipped weights (docs/decisions/consistency-weights.md): GM-WAE at
    # 4 and 1 with the authors' pretraining; GM-VAE at 50 and 50, on its ELBO's scale.
    "consistency-tuned": {"family": "gmwae", "consistency_weight": 4.0, "balance_weight": 1.0,
                          "pretrain_steps": 1500, "pretrain_batch": 1000},
    "gmvae-consistency-tuned": {"family": "gmvae", "consistency_weight": 50.0,
                                "balance_weight": 50.0},
}
"""Each variant: the cpu preset plus these settings (then --set). The plain `consistency`
variants keep weights 1 and 1."""
CONSISTENCY_TARGET = 0.85
"""The mean test accuracy the GM-WAE with the consistency option is expected to reach."""


def kmeans_anchor(data_cfg, K: int, seed: int) -> dict[str, float]:
    from sklearn.cluster import KMeans

    splits = load_splits(data_cfg)
    x = splits.train_x.flatten(1).numpy()
    start = time.monotonic()
    km = KMeans(n_clusters=K, n_init=3, random_state=seed).fit(x)
    pred = km.predict(splits.test_x.flatten(1).numpy())
    m = clustering_metrics(splits.test_y.numpy(), np.eye(K)[pred])
    return {**{f"test/{k}": v for k, v in m.items()}, "seconds": time.monotonic() - start}


def summarise(runs: dict[str, dict]) -> dict[str, dict]:
    """{seed: row} -> {metric: {mean, std, n, per_seed}}; std is 0 for one seed."""
    out = {}
    for key in SUMMARY_KEYS:
        values = {seed: row[f"test/{key}"] for seed, row in sorted(runs.items(), key=lambda kv: int(kv[0]))}
        v = list(values.values())
        out[key] = {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                    "n": len(v), "per_seed": values}
    return out


def targets(results: dict, K: int) -> dict[str, bool | None]:
    """The issue's targets; None for a target whose variant has no run."""
    runs, summary = results["runs"], results["summary"]

    def mean(variant):
        return summary[variant]["cluster_acc"]["mean"] if variant in summary else None

    paper = mean("paper")
    return {
        "paper_mean_ge_0.65": None if paper is None else paper >= 0.65,
        "paper_every_seed_ge_9_modes": None if "paper" not in runs else all(
            r["test/active_components"] >= K - 1 for r in runs["paper"].values()),
        "paper_beats_kmeans": None if paper is None else paper > summary["kmeans"]["cluster_acc"]["mean"],
        **{f"{v}_mean_ge_{CONSISTENCY_TARGET}": None if mean(v) is None else mean(v) >= CONSISTENCY_TARGET
           for v in ("consistency", "consistency-tuned")},
        "gmvae_collapsed_le_3_every_seed": None if "gmvae" not in runs else all(
            r["test/active_components"] <= 3 for r in runs["gmvae"].values()),
    }


def finish(results: dict, K: int) -> dict:
    results["summary"] = {v: summarise(r) for v, r in results["runs"].items()}
    results["summary"]["kmeans"] = summarise(results["kmeans"])
    results["targets"] = targets(results, K)
    return results


def print_table(results: dict) -> None:
    cols = SUMMARY_KEYS
    print(f"\n{'variant':<20}{'seeds':>6}" + "".join(f"{c:>22}" for c in cols))
    for name, s in results["summary"].items():
        print(f"{name:<20}{s['cluster_acc']['n']:>6}" + "".join(
            f"{s[c]['mean']:>14.4f} ± {s[c]['std']:<5.3f}" for c in cols))
    print("\nper seed, test Hungarian accuracy (active modes):")
    for name, runs in [*results["runs"].items(), ("kmeans", results["kmeans"])]:
        print(f"  {name:<20}" + "  ".join(
            f"seed {seed}: {r['test/cluster_acc']:.4f} ({r['test/active_components']:.0f})"
            for seed, r in sorted(runs.items(), key=lambda kv: int(kv[0]))))
    print("\ntargets:", json.dumps(results["targets"]))


def merge(paths: list[str]) -> dict:
    """The runs of several result files, which must share budget, preset and data."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    same = ("budget_minutes", "budget_epochs", "preset", "data")
    for path, part in zip(paths[1:], parts[1:]):
        for key in same:
            if part.get(key) != parts[0].get(key):
                raise SystemExit(f"--merge: {path} has {key}={part.get(key)!r}, but {paths[0]} "
                                 f"has {parts[0].get(key)!r}; only runs measured alike merge.")
        if _cpu(part) != _cpu(parts[0]) and parts[0].get("budget_minutes") is not None:
            raise SystemExit(f"--merge: {path} ran on {_cpu(part)}, but {paths[0]} on "
                             f"{_cpu(parts[0])}; runs of one time budget on different "
                             f"processors make different numbers of steps: merge the files "
                             f"of one processor, or measure with a step budget (--epochs).")
    # The seeds and variants the merged runs hold (a part written after each seed may hold
    # fewer than its command asked for).
    seeds = sorted({int(s) for part in parts for runs in part["runs"].values() for s in runs})
    variants = sorted({v for part in parts for v in part["runs"]})
    out = {**provenance({**parts[0]["settings"], "seeds": seeds, "variants": variants}, __file__),
           **{k: parts[0].get(k) for k in (*same, "K", "torch_threads")}}
    out["machine"] = parts[0]["machine"]
    out["variants"], out["runs"], out["kmeans"] = {}, {}, {}
    # Each part's own provenance: under a step budget the parts may come from other machines.
    out["sources"] = [{"file": p, **{k: part[k] for k in ("date", "commit", "machine", "command")}}
                      for p, part in zip(paths, parts)]
    trained_with: dict[str, tuple[str, dict]] = {}  # variant -> (file, a run's config)
    for path, part in zip(paths, parts):
        for variant, runs in part["runs"].items():
            if out["variants"].setdefault(variant, part["variants"][variant]) != part["variants"][variant]:
                raise SystemExit(f"--merge: variant {variant!r} has other settings in one of "
                                 f"{paths}; rename it in one file.")
            for seed, run in runs.items():
                # The preset may have changed between the files' commits: the runs' own
                # configurations, not the variants' names, must agree (seed and data folder aside).
                first_path, first = trained_with.setdefault(variant, (path, run["config"]))
                differ = _config_differences(first, run["config"], first_path)
                if differ:
                    raise SystemExit(
                        f"--merge: variant {variant!r}, seed {seed} in {path} trained with "
                        f"{', '.join(differ)}; only runs of one configuration merge: rerun "
                        f"the seed with the other file's settings.")
            out["runs"].setdefault(variant, {}).update(runs)
        out["kmeans"].update(part["kmeans"])
    return finish(out, out["K"])


def _cpu(result: dict) -> str:
    """The processor a result file ran on: its model and the speed flags it has."""
    machine = result["machine"]
    return f"{machine['processor']} ({', '.join(machine['flags']) or 'no speed flags'})"


def _config_differences(a: dict, b: dict, a_path: str) -> list[str]:
    """`section.key=B (A in a_path)` for every config value that differs, the seed and the
    data folder aside."""
    ignore = {("train", "seed"), ("data", "data_dir")}
    return [f"{sec}.{key}={b.get(sec, {}).get(key)!r} ({a[sec].get(key)!r} in {a_path})"
            for sec in sorted(set(a) | set(b)) if isinstance(a.get(sec), dict)
            for key in sorted(set(a[sec]) | set(b.get(sec, {})))
            if (sec, key) not in ignore and a[sec].get(key) != b.get(sec, {}).get(key)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("GMWAE_DATA_DIR"))
    p.add_argument("--minutes", type=float, default=20.0, help="training budget per run")
    p.add_argument("--epochs", type=int, default=None,
                   help="a step budget of this many epochs instead of --minutes: the same "
                        "steps on any machine, whatever else it runs")
    p.add_argument("--variants", default="paper,gmvae",
                   help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", type=int, default=1, help="run seeds 0..N-1")
    p.add_argument("--seed-list", default=None, help="run these seeds instead (e.g. 3,4)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="applied to every variant")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge these result files into --out and print the table; runs nothing")
    p.add_argument("--runs", default="runs/quality", help="folder for the runs' outputs")
    p.add_argument("--out", default="benchmarks/results/quality/run.json")
    p.add_argument("--smoke", action="store_true", help="synthetic data, a few seconds a run")
    args = p.parse_args()

    if args.merge:
        results = merge(args.merge)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print_table(results)
        print(f"wrote {args.out}")
        return 0

    base = {"dataset": "mnist", "data_dir": args.data_dir, "minutes": args.minutes,
            "epochs": 1_000_000, "eval_size": 2000}
    if args.epochs is not None:
        base.update(minutes=None, epochs=args.epochs)
    smoke = {}      # over a variant's own settings too: no variant's pretraining runs long here
    if args.smoke:
        base = {"dataset": "synthetic", "minutes": 0.05, "epochs": 1_000_000, "decoder_width": 8}
        smoke = {"pretrain_steps": 5, "pretrain_batch": 64}
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants {args.variants!r}: {unknown} unknown; use a comma-separated "
                         f"list of {', '.join(VARIANTS)}")
    try:
        seeds = ([int(s) for s in args.seed_list.split(",")] if args.seed_list
                 else list(range(args.seeds)))
    except ValueError:
        raise SystemExit(f"--seed-list {args.seed_list!r}: use integers, e.g. --seed-list 3,4") from None
    if not seeds or min(seeds) < 0:
        raise SystemExit(f"--seeds {args.seeds}: run at least one seed (>= 0)")
    try:
        overrides = parse_overrides(args.overrides)
        if any(canonical_key(key) == "train.seed" for key in overrides):
            raise SystemExit(f"--set {' '.join(args.overrides)}: the seed is set per run by "
                             f"--seeds N or --seed-list; use --seed-list 2 instead")
        # --set goes last: it changes a variant's own settings too (--set consistency_weight=4).
        configs = {(v, s): from_preset("cpu", {**base, **VARIANTS[v], **smoke, **overrides,
                                                  "seed": s})
                   for v in variants for s in seeds}  # bad --set stops here, before training
    except ConfigError as e:
        raise SystemExit(f"--set: {e}") from None
    cfg = next(iter(configs.values()))
    settings = {"budget_minutes": cfg.train.minutes,
                "budget_epochs": None if cfg.train.minutes is not None else cfg.train.epochs,
                "preset": "cpu", "variants": variants, "seeds": seeds,
                "overrides": parse_overrides(args.overrides), "dataset": cfg.data.dataset,
                "eval_size": cfg.data.eval_size, "torch_threads": torch.get_num_threads()}
    results: dict = {**provenance(settings, __file__),
                     "budget_minutes": cfg.train.minutes, "budget_epochs": settings["budget_epochs"],
                     "preset": "cpu",
                     "data": {"dataset": cfg.data.dataset, "eval_size": cfg.data.eval_size},
                     "K": cfg.model.K, "torch_threads": torch.get_num_threads(),
                     "bf16_kernels": cpu_has_fast_bf16(),
                     "variants": {v: {**VARIANTS[v], **parse_overrides(args.overrides)}
                                  for v in variants},
                     "runs": {v: {} for v in variants}, "kmeans": {}}
    for seed in seeds:
        for variant in variants:
            run_cfg = configs[(variant, seed)]
            print(f"== {variant}, seed {seed}: {run_cfg.train.minutes} min on {run_cfg.data.dataset} ...",
                  file=sys.stderr, flush=True)
            m = train_run(run_cfg, Path(args.runs) / f"{variant}-seed{seed}")
            results["runs"][variant][str(seed)] = {
                **{f"{split}/{k}": m[f"{split}/{k}"] for split in ("test", "val") for k in KEYS},
                "epochs": m["run/epochs"], "steps": m["run/steps"],
                "bf16_networks": m.get("train/bf16_networks"),
                "train_seconds": m["run/train_seconds"], "config": run_cfg.to_dict()}
        results["kmeans"][str(seed)] = kmeans_anchor(cfg.data, cfg.model.K, seed)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(finish(results, cfg.model.K), indent=2))  # per seed
    print_table(results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
