"""Dashboard build time and size for a large study written to real stores.

    python benchmarks/dashboard.py --trials 200 --out benchmarks/results/dashboard/report.json
    python benchmarks/dashboard.py --smoke --out /tmp/dashboard.json       # 20 trials

Writes `--trials` synthetic trials (half per family) into a fresh Optuna sqlite storage and
a fresh MLflow sqlite store exactly as a study leaves them: Optuna trials with params,
values and the ledger's user attributes; MLflow parent and child runs with params, tags,
val metrics per iteration, a step history (`history/*`, every 5 of 900 steps) and a
label-by-k artifact per trial; some trials ASHA-stopped, some failed. Then times
`gmwae dashboard`'s work (read the stores, draw, write the HTML) and reports the file
size. Targets: under 10 s and under 15 MB.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from record import provenance  # benchmarks/record.py: the results record's provenance keys

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
sys.path.insert(0, str(Path(__file__).parents[1]))

TARGET_SECONDS = 10.0
TARGET_MB = 15.0


def write_study(folder: Path, trials: int, steps: int, seed: int = 0):
    """A study of `trials` synthetic trials in real stores under `folder`; returns its spec."""
    import optuna
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from study.spec import spec_from_dict
    from study.tracking import StudyTracker

    rng = random.Random(seed)
    spec = spec_from_dict({"name": "bench", "space": "default", "trials": trials // 2,
                           "max_iterations": 3, "storage": {
                               "optuna": f"sqlite:///{folder}/optuna.db",
                               "mlflow": f"sqlite:///{folder}/mlflow.db",
                               "ray": str(folder / "ray")}})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tracker = StudyTracker(spec.store("mlflow"), spec.name)
    client: MlflowClient = tracker.client
    # The trials' values come from the spec's own search space (which keys each family
    # searches, and their ranges), drawn by Optuna's random sampler.
    sampler = optuna.samplers.RandomSampler(seed=seed)
    for family in spec.families:
        study = optuna.create_study(study_name=f"{spec.name}/{family}", sampler=sampler,
                                    storage=spec.store("optuna"), direction="maximize")
        study.set_user_attr("spec", json.loads(json.dumps(spec.to_dict())))
        for number in range(trials // 2):
            trial = study.ask()
            params = spec.search_space(trial, family)
            K = spec.run_config(family, params).model.K
            failed = rng.random() < 0.05
            stopped = not failed and rng.random() < 0.5
            iters = 1 if stopped else 3
            accs = [min(1.0, 0.2 + 0.1 * i + rng.uniform(0, 0.3)) for i in range(iters)]
            if failed:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                for key, value in {"best_value": max(accs), "latest_iteration": iters,
                                   "best_iteration": accs.index(max(accs)) + 1}.items():
                    trial.set_user_attr(key, value)
                study.tell(trial, accs[-1])
            run = client.create_run(tracker.experiment_id, run_name=f"{family}-{number}", tags={
                "mlflow.parentRunId": tracker.parent_run_id, "role": "trial", "family": family,
                "study": spec.name, "optuna_trial": str(number), "iterations": str(iters),
                "stopped_early": str(stopped).lower(), "git_sha": "benchmark"})
            run_id = run.info.run_id
            metrics = []
            for i, acc in enumerate(accs, start=1):
                metrics += [Metric("val/cluster_acc", acc, 0, i),
                            Metric("val/mmd", rng.uniform(0.01, 0.5), 0, i),
                            Metric("val/active_components", rng.randint(2, K), 0, i),
                            Metric("val/assignment_entropy", rng.uniform(0.3, 1.0), 0, i)]
            for step in range(5, steps + 1, 5):
                metrics += [Metric("history/active_components", rng.randint(1, K), 0, step),
                            Metric("history/assignment_entropy", rng.uniform(0, 1), 0, step)]
            for i in range(0, len(metrics), 900):
                client.log_batch(run_id, metrics=metrics[i: i + 900],
                                 params=[Param(k, str(v)) for k, v in params.items()] if i == 0
                                 else [])
            matrix = [[rng.random() for _ in range(K)] for _ in range(10)]
            matrix = [[v / sum(row) for v in row] for row in matrix]
            client.log_dict(run_id, matrix, "label_by_k.json")
            client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
    return spec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--steps", type=int, default=900, help="training steps per trial (history)")
    p.add_argument("--smoke", action="store_true", help="20 trials, 100 steps")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/dashboard/report.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.trials, args.steps, args.repeats = 20, 100, 1
    out = Path(args.out).resolve()
    from dashboards.report import write_report

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.chdir(folder)  # MLflow's sqlite artifact root lands here, not in the repository
        start = time.monotonic()
        spec = write_study(folder, args.trials, args.steps)
        written = time.monotonic() - start
        times = []
        for _ in range(args.repeats):
            start = time.monotonic()
            html = write_report(spec, folder / "report.html", log_to_mlflow=False)
            times.append(time.monotonic() - start)
        size_mb = html.stat().st_size / 1e6
    result = {**provenance({"trials": args.trials, "steps": args.steps, "repeats": args.repeats},
                           __file__, argv),
              "trials": args.trials, "steps": args.steps, "store_write_seconds": written,
              "build_seconds": times, "build_seconds_median": sorted(times)[len(times) // 2],
              "size_mb": size_mb,
              "targets": {"seconds": {"target": TARGET_SECONDS,
                                      "met": sorted(times)[len(times) // 2] < TARGET_SECONDS},
                          "size": {"target_mb": TARGET_MB, "met": size_mb < TARGET_MB}}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{'trials':>7}{'build s (median)':>18}{'size MB':>9}  targets (<{TARGET_SECONDS:g} s, "
          f"<{TARGET_MB:g} MB)")
    print(f"{args.trials:>7}{result['build_seconds_median']:>18.2f}{size_mb:>9.2f}  "
          f"{'met' if result['targets']['seconds']['met'] else 'NOT met'}, "
          f"{'met' if result['targets']['size']['met'] else 'NOT met'}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
