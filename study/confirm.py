"""`gmwae study confirm`: re-train each family's best configuration with new seeds.

    gmwae study confirm quickstart --seeds 5

The best trial of each family (by validation accuracy) is trained again, once per new
seed, for the study's full budget (no early stopping), as Ray trials tracked in MLflow
under the study's parent run (child runs with role=confirm). The test metrics are then
summarised as mean +- std over the seeds (std with ddof=1): the table a paper prints,
written as confirm.md and confirm.json and logged to the parent run, with each family's
seed stability (the mean adjusted Rand index between every two seeds' clusterings of the
test images, metrics.seed_stability: label-free).
"""
from __future__ import annotations

import functools
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

from gmwae_core.metrics import seed_stability

from .export import ExportError, chosen_trials
from .runner import connect_ray, family_trainable
from .stores import open_tracker, resolve_study_data
from .spec import StudySpec
from .tracking import TrialLogger
from .trial_states import best_value

__all__ = ["confirm_study", "CONFIRM_METRICS", "summarise", "format_table"]

CONFIRM_METRICS = ("test/cluster_acc", "test/cluster_acc_greedy", "test/cluster_acc_many",
                   "test/nmi", "test/ari", "test/ami",
                   "test/active_components", "test/assignment_entropy", "test/mmd",
                   "test/recon_mse", "test/augment_ari", "test/augment_mi", "test/silhouette")


def confirm_seeds(spec: StudySpec, n: int) -> list[int]:
    """n seeds none of the search used (every search trial ran with spec.seed)."""
    if n < 2:
        raise ExportError(f"`--seeds` must be at least 2 to give a std, but got {n}. Use --seeds 5.")
    return [spec.seed + 1 + i for i in range(n)]


def summarise(values: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """{metric: [value per seed]} -> {metric: {mean, std, n}} (std with ddof=1)."""
    out = {}
    for key, vals in values.items():
        vals = [v for v in vals if math.isfinite(v)]
        if vals:
            out[key] = {"mean": statistics.fmean(vals), "n": len(vals),
                        "std": statistics.stdev(vals) if len(vals) > 1 else float("nan")}
    return out


def format_table(table: dict[str, Any]) -> str:
    """The markdown table: one row per family, mean +- std per metric."""
    keys = [k for k in CONFIRM_METRICS if any(k in f["summary"] for f in table["families"].values())]
    lines = [f"# Study `{table['study']}`: best configuration per family, {table['seeds_requested']} "
             f"new seeds", "",
             "| family | trial | seeds | " + " | ".join(k.removeprefix("test/") for k in keys)
             + " | seed stability |",
             "|---|---:|---:|" + "---:|" * (len(keys) + 1)]
    for family, row in table["families"].items():
        cells = []
        for k in keys:
            s = row["summary"].get(k)
            cells.append("" if s is None else f"{s['mean']:.3f} ± {s['std']:.3f}")
        stability = row.get("seed_stability", float("nan"))
        cells.append("" if not math.isfinite(stability) else f"{stability:.3f}")
        lines.append(f"| {family} | {row['optuna_trial']} | {row['seeds_finished']}"
                     f"/{len(row['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "Test split; mean ± std over seeds (std with ddof=1). Seed stability: the "
              "mean adjusted Rand index between every two seeds' clusterings of the test "
              "images (1: every seed finds the same clusters; reads no labels). Parameters "
              "per family:", ""]
    for family, row in table["families"].items():
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in sorted(row["params"].items()))
        lines.append(f"- {family} (trial {row['optuna_trial']}, {row['search_metric']} in the "
                     f"search {row['search_value']:.4g}): {params}")
    return "\n".join(lines) + "\n"


def confirm_study(spec: StudySpec, seeds: int = 5, out: Optional[str | Path] = None,
                  address: Optional[str] = None, verbose: int = 1,
                  trainable: Optional[Callable] = None) -> dict[str, Any]:
    """Run the confirmation trials; returns the table (also written to `out`, default
    runs/NAME/confirm, and logged to the study's parent MLflow run)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from ray import tune

    from gmwae_core.data import describe_splits

    from .trainable import TEST_CLUSTERS, TrialSetup, train_trial

    seed_list = confirm_seeds(spec, seeds)
    best = {family: trials[0] for family, trials in chosen_trials(spec, 1).items()}
    spec = resolve_study_data(spec)
    tracker = open_tracker(spec)
    out = Path(out or Path("runs") / spec.name / "confirm")
    ray_storage, trial_spec = connect_ray(spec, address)
    dataset = describe_splits(spec.run_config(spec.families[0], {}).data)
    batch = time.strftime("%Y%m%d-%H%M%S")
    table: dict[str, Any] = {"study": spec.name, "seeds_requested": seeds, "families": {},
                             "confirm_batch": batch}
    for family, trial in best.items():
        params = trial.params
        fn = family_trainable(trainable or train_trial,
                               TrialSetup(trial_spec, family, test_at_end=True))
        tuner = tune.Tuner(
            tune.with_resources(fn, {"cpu": trial_spec.resources.cpu,
                                     "gpu": trial_spec.resources.gpu}),
            param_space={**params, "_confirms": trial.number, "_confirm_batch": batch,
                         "seed": tune.grid_search(seed_list)},
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent),
            run_config=tune.RunConfig(
                name=f"{spec.name}-{family}-confirm", storage_path=ray_storage, verbose=verbose,
                callbacks=[TrialLogger(tracker, family, spec.max_iterations, role="confirm",
                                       run_config=functools.partial(spec.run_config, family),
                                       dataset=dataset)],
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        results = tuner.fit()
        per_seed, clusterings = {}, []
        for r in results:
            if r.error is None and r.metrics and "test/mmd" in r.metrics:
                per_seed[int(r.config["seed"])] = {k: float(r.metrics[k]) for k in CONFIRM_METRICS
                                                   if k in r.metrics}
                if r.checkpoint is not None:
                    with r.checkpoint.as_directory() as folder:
                        if (Path(folder) / TEST_CLUSTERS).is_file():
                            clusterings.append(json.loads((Path(folder) / TEST_CLUSTERS).read_text()))
        values = {k: [m[k] for m in per_seed.values() if k in m] for k in CONFIRM_METRICS}
        table["families"][family] = {
            "optuna_trial": trial.number, "params": params, "seeds": seed_list,
            "search_metric": spec.objective.metric, "search_value": best_value(trial),
            "seeds_finished": len(per_seed), "per_seed": per_seed, "summary": summarise(values),
            "seed_stability": (seed_stability(clusterings) if len(clusterings) >= 2
                               else float("nan"))}
    out.mkdir(parents=True, exist_ok=True)
    markdown = format_table(table)
    (out / "confirm.json").write_text(json.dumps(table, indent=2, sort_keys=True))
    (out / "confirm.md").write_text(markdown)
    tracker.client.log_artifact(tracker.parent_run_id, str(out / "confirm.json"), "confirm")
    tracker.client.log_artifact(tracker.parent_run_id, str(out / "confirm.md"), "confirm")
    table["markdown"], table["out"] = markdown, str(out)
    return table
