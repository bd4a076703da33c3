"""Choosing models without labels: how well each label-free criterion picks trials.

    python benchmarks/selection.py --dataset mnist --data-dir ../shared/data/mnist \\
        --trials 24 --steps 400 --out benchmarks/results/selection/mnist.json
    python benchmarks/selection.py --dataset digits --trials 24 --steps 400 \\
        --out benchmarks/results/selection/digits.json
    python benchmarks/selection.py --smoke --out /tmp/selection.json      # seconds, synthetic

For each family, `--trials` settings are drawn at random (Optuna's RandomSampler, seeded)
from a search space (default SPACE: the quickstart's, which varies K, lambda, the prior
overlap, d, the learning rate, the batch, the decoder and the consistency and balance
options, with its smaller batches and decoders), and
each is trained from the `cpu` preset for `--steps` optimiser steps (the same work on any
machine). Each trial keeps its validation metrics (what a study's objective reads) and its
test metrics on the whole test split.

Every label-free metric of gmwae_core.metrics (EVAL_METRICS less LABEL_METRICS), read on
validation, is then scored as a selection criterion against the test accuracy
(`--target`, default test/cluster_acc), per family:

    spearman  rank correlation between the criterion (signed by its direction, so that
              +1 means "better by the criterion" always goes with higher accuracy) and
              the target, across the family's trials
    regret    the target of the trial the labels pick (best val/cluster_acc, the
              labelled objective), minus that of the trial the criterion picks: 0 when
              the criterion picks as well as the labels; negative when it picks better
    regret_oracle  the best target of any trial minus that of the criterion's pick

`val/cluster_acc` itself is in the table as the labelled reference. Prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gmwae_core.metrics import EVAL_METRICS, LABEL_METRICS  # noqa: E402

from record import provenance  # noqa: E402  (benchmarks/record.py)

SPACE = {
    "lambda_mmd": {"type": "float", "low": 1.0, "high": 100.0, "log": True, "families": ["gmwae"]},
    "prior_overlap": {"type": "float", "low": 0.005, "high": 0.2, "log": True},
    "latent_dim": {"type": "int", "low": 4, "high": 16},
    "K": {"type": "int", "low": 8, "high": 16},
    "lr": {"type": "float", "low": 2.0e-4, "high": 3.0e-3, "log": True},
    "batch_size": {"type": "categorical", "choices": [32, 64]},
    "decoder_width": {"type": "categorical", "choices": [16, 32]},
    "consistency_weight": {"type": "float", "low": 0.0, "high": 8.0,
                           "by_family": {"gmvae": {"high": 100.0}}},
    "balance_weight": {"type": "float", "low": 0.0, "high": 2.0,
                       "by_family": {"gmvae": {"high": 100.0}}},
}
"""The settings drawn (`--space selection`): the quickstart's space (search_spaces/
quickstart.yaml) with its two smaller batches and decoders, so that two CPU cores train
the trials of both datasets in under an hour."""
LABELLED_CHOICE = "val/cluster_acc"
"""What the labels would pick by: the default objective, read on validation."""
CRITERIA = tuple(f"val/{name}" for name in EVAL_METRICS if name not in LABEL_METRICS)
"""The label-free criteria scored: every metric a trial reports that reads no labels."""


def direction(metric: str) -> str:
    return EVAL_METRICS[metric.split("/", 1)[1]]


def draw_settings(space: str, family: str, n: int, seed: int) -> list[dict[str, Any]]:
    """`n` points of `space` for `family`, drawn by Optuna's RandomSampler with `seed`."""
    import optuna

    from search_spaces import load_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    loaded = load_space(SPACE if space == "selection" else space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points = []
    for _ in range(n):
        trial = study.ask()
        points.append(loaded(trial, family))
        study.tell(trial, 0.0)
    return points


def run_trial(job: dict[str, Any]) -> dict[str, Any]:
    """Train one drawn setting for the job's steps; its val and test metrics, or its error."""
    import torch

    from gmwae_core import Trainer, from_preset, load_splits
    from gmwae_core.training import NonFiniteLossError

    torch.set_num_threads(1)
    overrides = {**job["fixed"], **job["params"], "family": job["family"], "seed": job["seed"]}
    cfg = from_preset("cpu", overrides)
    start = time.monotonic()
    row: dict[str, Any] = {"family": job["family"], "index": job["index"],
                           "params": job["params"]}
    try:
        trainer = Trainer(cfg, load_splits(cfg.data))
        trainer.budget_steps = job["steps"]
        trainer.train_steps(job["steps"])
        row["metrics"] = {**trainer.evaluate("val").metrics, **trainer.evaluate("test").metrics}
    except NonFiniteLossError as e:
        row["error"] = str(e)
    row["seconds"] = round(time.monotonic() - start, 1)
    return row


def spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def score_criteria(trials: list[dict[str, Any]], target: str) -> dict[str, dict[str, float]]:
    """Per criterion (and the labelled reference): spearman, regret, regret_oracle, pick."""
    done = [t for t in trials if "metrics" in t and math.isfinite(t["metrics"][target])]
    if len(done) < 2:
        return {}
    acc = [t["metrics"][target] for t in done]

    def pick(metric: str) -> int:
        sign = 1.0 if direction(metric) == "max" else -1.0
        values = [sign * t["metrics"][metric] if math.isfinite(t["metrics"][metric])
                  else -math.inf for t in done]
        return int(np.argmax(values))

    labelled = acc[pick(LABELLED_CHOICE)]
    out = {}
    for metric in (LABELLED_CHOICE, *CRITERIA):
        sign = 1.0 if direction(metric) == "max" else -1.0
        pairs = [(sign * t["metrics"][metric], a) for t, a in zip(done, acc)
                 if math.isfinite(t["metrics"][metric])]
        chosen = pick(metric)
        out[metric] = {"spearman": spearman([p for p, _ in pairs], [a for _, a in pairs]),
                       "regret": labelled - acc[chosen], "regret_oracle": max(acc) - acc[chosen],
                       "picked_trial": done[chosen]["index"], "picked_target": acc[chosen],
                       "reads_labels": metric.split("/", 1)[1] in LABEL_METRICS}
    return out


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    target = result["settings"]["target"]
    families = sorted({t["family"] for t in result["trials"]})
    return {family: {"trials": sum(t["family"] == family for t in result["trials"]),
                     "finished": sum(t["family"] == family and "metrics" in t
                                     for t in result["trials"]),
                     "criteria": score_criteria([t for t in result["trials"]
                                                 if t["family"] == family], target)}
            for family in families}


def print_table(result: dict[str, Any]) -> None:
    s = result["settings"]
    print(f"\n{s['dataset']}: {s['trials']} trials per family, {s['steps']} steps each; "
          f"target {s['target']} (regret: labels' pick minus the criterion's pick)")
    print(f"{'family':<7} {'criterion':<24} {'spearman':>9} {'regret':>8} {'oracle':>8}")
    for family, fam in result["summary"].items():
        for metric, c in fam["criteria"].items():
            print(f"{family:<7} {metric:<24} {c['spearman']:>9.3f} {c['regret']:>8.3f} "
                  f"{c['regret_oracle']:>8.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="mnist", choices=("mnist", "fashion-mnist", "digits",
                                                          "synthetic"))
    p.add_argument("--data-dir", default=None, help="folder of the IDX files (mnist)")
    p.add_argument("--families", default="gmwae,gmvae")
    p.add_argument("--space", default="selection",
                   help="selection (SPACE, above), a shipped space's name or a YAML path")
    p.add_argument("--trials", type=int, default=24, help="settings drawn per family")
    p.add_argument("--steps", type=int, default=400, help="optimiser steps per trial")
    p.add_argument("--eval-size", type=int, default=2000, help="validation images scored")
    p.add_argument("--target", default="test/cluster_acc")
    p.add_argument("--seed", type=int, default=0, help="seeds the draws and every trial")
    p.add_argument("--workers", type=int, default=2, help="trials trained at once, 1 thread each")
    p.add_argument("--smoke", action="store_true", help="synthetic data, 3 trials of 20 steps")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.smoke:
        args.dataset, args.trials, args.steps, args.eval_size = "synthetic", 3, 20, 200
    if args.trials < 2:
        p.error(f"--trials must be at least 2 (a choice needs two trials), but got {args.trials}")
    if args.steps < 1:
        p.error(f"--steps must be at least 1, but got {args.steps}")
    if args.target.split("/", 1)[0] != "test" or args.target.split("/", 1)[-1] not in LABEL_METRICS:
        p.error(f"--target must be a test metric that reads labels (test/cluster_acc, "
                f"test/ami, ...), but got {args.target!r}")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    fixed: dict[str, Any] = {"dataset": args.dataset, "eval_size": args.eval_size}
    if args.data_dir:
        fixed["data_dir"] = str(Path(args.data_dir).resolve())
    if args.smoke:
        fixed.update({"pretrain_steps": 5, "val_size": 300})
    jobs = [{"family": family, "index": i, "params": params, "fixed": fixed,
             "steps": args.steps, "seed": args.seed}
            for family in families
            for i, params in enumerate(draw_settings(args.space, family, args.trials, args.seed))]
    settings = {"dataset": args.dataset, "families": families, "space": args.space,
                "trials": args.trials, "steps": args.steps, "eval_size": args.eval_size,
                "target": args.target, "seed": args.seed, "preset": "cpu", "fixed": fixed,
                "labelled_choice": LABELLED_CHOICE, "workers": args.workers}
    record = provenance(settings, __file__, argv)  # the checkout the trials ran
    start = time.monotonic()
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        trials = []
        for row in pool.imap_unordered(run_trial, jobs):
            trials.append(row)
            print(f"{row['family']} trial {row['index']}: "
                  f"{row['metrics'][args.target]:.3f}" if "metrics" in row else
                  f"{row['family']} trial {row['index']}: failed", f"({row['seconds']} s)",
                  flush=True)
    trials.sort(key=lambda t: (t["family"], t["index"]))
    result = {**record, "trials": trials,
              "seconds": round(time.monotonic() - start, 1)}
    result["summary"] = summarise(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True, allow_nan=True) + "\n")
    print_table(result)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
