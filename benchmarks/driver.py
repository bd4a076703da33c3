"""One study driver at cluster scale: how long a trial's report waits for its MLflow row,
and how many trials finish per minute, at 4, 8 and 32 concurrent trials.

    python benchmarks/driver.py --out benchmarks/results/driver/local-cluster.json
    python benchmarks/driver.py --smoke --out /tmp/driver.json             # seconds

Every Optuna and MLflow write of a study goes through the driver's Tune loop, one
callback after another. This runs real studies through `run_study` on a Ray cluster of
processes with the cluster stores (cluster.local: PostgreSQL for Optuna, an MLflow
server, a head with no CPU and workers with --num-cpus slots each), with a light
trainable in place of training: each iteration sleeps `--report-seconds` and reports
synthetic metrics, so the driver's writes, not the trials, set the pace. Per slot count
(the study's max_concurrent, the cluster holding at least as many), it records:

- lag: from a report (the time the trial took as it reported) to the moment the
  driver's MLflow write of it returned (study.tracking.TrialLogger.write_metrics, after
  the Optuna write of the same result in the driver's loop): p50, p95 and max over every
  report;
- throughput: trials finished per minute, first trial's start to last trial's end, and
  the ideal (slots x 60 / a trial's own length).

Targets: p95 lag under 2 s at every slot count, and throughput that grows with the slots.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from record import provenance  # benchmarks/record.py: the results record's provenance keys

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")

SLOTS, SMOKE_SLOTS = (4, 8, 32), (2, 4)


def light_trial(config: dict, setup) -> None:
    """Reports synthetic validation metrics every `report_seconds`, like a training trial
    that spends its time on the GPU (what the driver sees of it)."""
    from ray import tune

    from study.search import ITERATION

    rng = random.Random(config.get("seed", 0))
    for i in range(1, setup.spec.max_iterations + 1):
        time.sleep(float(os.environ.get("GMWAE_DRIVER_REPORT_SECONDS", "0.5")))
        tune.report({"val/cluster_acc": rng.random(), "val/ami": rng.random(),
                     "val/mmd": rng.random(), "val/active_modes": 10.0,
                     "train/loss": rng.random(), ITERATION: i, "steps": i,
                     "reported_at": time.time()})


def measure(cluster, slots: int, n_trials: int, iterations: int, report_s: float) -> dict:
    """One study of `n_trials` light trials, `slots` at a time; lag and throughput."""
    import mlflow

    from study import tracking
    from study.runner import run_study
    from study.spec import spec_from_dict

    lags: list[float] = []
    wrapped = tracking.TrialLogger.write_metrics

    def timed(self, run_id, metrics, result):
        wrapped(self, run_id, metrics, result)  # returns once the MLflow server has the row
        lags.append(time.time() - float(result["reported_at"]))

    name = f"driver-{slots}"
    spec = spec_from_dict({
        "name": name, "dataset": "synthetic", "space": "fixed", "families": ["gmwae"],
        "trials": n_trials, "max_concurrent": slots, "max_iterations": iterations,
        "scheduler": {"type": "none"}, "metric": "val/cluster_acc",
        "resources": {"cpu": 1, "gpu": 0},
        "storage": {"optuna": cluster.optuna_url(with_password=True),
                    "mlflow": cluster.mlflow_url, "ray": f"{cluster.storage_path}"}})
    tracking.TrialLogger.write_metrics = timed
    os.environ["GMWAE_DRIVER_REPORT_SECONDS"] = str(report_s)
    try:
        start = time.monotonic()
        run_study(spec, address=cluster.ray_address, verbose=0, trainable=light_trial)
        wall = time.monotonic() - start
    finally:
        tracking.TrialLogger.write_metrics = wrapped
    client = mlflow.MlflowClient(cluster.mlflow_url)
    experiment = client.get_experiment_by_name(name)
    runs = [r for r in client.search_runs([experiment.experiment_id], max_results=5000)
            if r.data.tags.get("role") == "trial"]
    span = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000
    ordered = sorted(lags)
    return {"slots": slots, "trials": len(runs), "reports": len(lags),
            "lag_p50_s": statistics.median(ordered),
            "lag_p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "lag_max_s": ordered[-1], "trial_span_s": span, "study_wall_s": wall,
            "trials_per_minute": len(runs) * 60 / span,
            "ideal_trials_per_minute": slots * 60 / (iterations * report_s)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slots", default=None, help=f"comma-separated (default {SLOTS})")
    p.add_argument("--trials-per-slot", type=int, default=3)
    p.add_argument("--iterations", type=int, default=10, help="reports per trial")
    p.add_argument("--report-seconds", type=float, default=0.5)
    p.add_argument("--smoke", action="store_true", help=f"slots {SMOKE_SLOTS}, short trials")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        slots = ([int(s) for s in args.slots.split(",")] if args.slots else
                 list(SMOKE_SLOTS if args.smoke else SLOTS))
    except ValueError:
        print(f"error: --slots must be comma-separated integers, got {args.slots!r}",
              file=sys.stderr)
        return 2
    if not slots or min(slots) < 1:
        print(f"error: --slots must be positive, got {args.slots!r}", file=sys.stderr)
        return 2
    iterations, per_slot = (3, 2) if args.smoke else (args.iterations, args.trials_per_slot)
    from cluster.local import LocalCluster

    workers = 2 if args.smoke else 4
    per_worker = -(-max(slots) // workers)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(Path(tmp) / "cluster", workers=workers,
                               cpus_per_worker=per_worker).start()
        try:
            for n in slots:
                rows.append(measure(cluster, n, n * per_slot, iterations, args.report_seconds))
                print(f"{n} slots: {json.dumps(rows[-1])}", flush=True)
        finally:
            import ray

            ray.shutdown()  # before the cluster goes: a driver left connected dies with its GCS
            cluster.stop()
    settings = {"slots": slots, "trials_per_slot": per_slot, "iterations": iterations,
                "report_seconds": args.report_seconds, "smoke": args.smoke,
                "cluster": f"cluster.local: {workers} workers x {per_worker} CPU slots, "
                           f"PostgreSQL, MLflow server"}
    result = {**provenance(settings, __file__, argv), "rows": rows,
              "targets": {"lag_p95_s_max": 2.0, "throughput_grows_with_slots": True}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'slots':>5}{'trials':>7}{'lag p50 s':>10}{'p95 s':>7}{'max s':>7}"
          f"{'trials/min':>11}{'ideal':>7}")
    for r in rows:
        print(f"{r['slots']:>5}{r['trials']:>7}{r['lag_p50_s']:>10.2f}{r['lag_p95_s']:>7.2f}"
              f"{r['lag_max_s']:>7.2f}{r['trials_per_minute']:>11.1f}"
              f"{r['ideal_trials_per_minute']:>7.1f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
