"""Studies on local clusters: utilisation on an autoscaling cluster, families in turn vs
together; and the smoke study's wall time on the static 3-node cluster vs plain local Ray.

    python benchmarks/cluster.py --out benchmarks/results/cluster/autoscaling.json   # autoscaling
    python benchmarks/cluster.py --static --out benchmarks/results/cluster/static.json      # static

Autoscaling (cluster.local --autoscaling: a head with 0 CPUs, 0..2 workers of
{CPU 1, GPU 1} with fake GPUs, PostgreSQL, an MLflow server): the same study (studies/
smoke.yaml with --set: `--trials` per family, 3 iterations of `--steps` steps, no ASHA,
half a (fake) GPU per trial trained on the CPU, so the full cluster holds 4 trials)
submitted with `ray job submit` twice, run_families=in_turn and then together, each from zero workers (the cluster is
let scale down in between). Per run: seconds from submit to the first trial running and
to the end, worker nodes launched and removed (polled from the dashboard), and the
utilisation = the sum of trial-seconds / (slots x the time from the first trial's start
to the last trial's end), slots = trials the cluster holds at its full size; trial times
are the MLflow child runs' start and end.

1. Plain local Ray: `gmwae study run SPEC` (ray.init on this machine, sqlite stores).
2. The local cluster (cluster.local: PostgreSQL, an MLflow server, a Ray head with 0
   CPUs and two 1-CPU workers, all `ray start`): `ray job submit --working-dir . -- gmwae
   study run SPEC` with the PostgreSQL/MLflow-server stores, timed from submission to the
   job's end. The cluster's start-up is timed apart (paid once, not per study).

Both run studies/smoke.yaml (3 trials per family, 2 at a time, 1 CPU each).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import provenance  # benchmarks/record.py: the results record's provenance keys

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent


def spec_file(folder: Path, storage: dict[str, str], name: str) -> Path:
    text = (ROOT / "studies/smoke.yaml").read_text().replace("name: smoke", f"name: {name}")
    text = text.replace("optuna: sqlite:///runs/{name}/optuna.db", f"optuna: '{storage['optuna']}'")
    text = text.replace("mlflow: sqlite:///runs/{name}/mlflow.db", f"mlflow: {storage['mlflow']}")
    text = text.replace("ray: runs/{name}/ray", f"ray: {storage['ray']}")
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def run(cmd: list[str], **kw) -> float:
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}{done.stdout[-3000:]}")
    return time.monotonic() - start


def workers(cluster) -> set[str]:
    return {n["raylet"]["nodeId"] for n in cluster.alive_node_list()
            if n["raylet"].get("resourcesTotal", {}).get("GPU", 0) > 0}


def autoscaled_run(cluster, name: str, mode: str, trials: int, steps: int) -> dict:
    """One study on the autoscaling cluster, from zero workers; its timings and utilisation."""
    import mlflow
    from ray.job_submission import JobSubmissionClient

    from cluster.local import ray_auth_headers

    deadline = time.monotonic() + 300
    while workers(cluster) and time.monotonic() < deadline:  # start from zero workers
        time.sleep(2)
    sets = [*cluster.study_sets(), "resources.gpu=0.5", "resources.cpu=0.5", "fixed.device=cpu",
            f"trials={trials}", "max_iterations=3", f"steps_per_iteration={steps}", "scheduler.type=none",
            "max_concurrent=4", f"run_families={mode}"]
    jobs = JobSubmissionClient(cluster.dashboard_url, headers=ray_auth_headers())
    submitted_at = time.time()
    job = jobs.submit_job(entrypoint=" ".join(
        ["gmwae", "study", "run", str(ROOT / "studies/smoke.yaml"), "--quiet", "--name", name,
         *[f"--set '{s}'" for s in sets]]))
    seen: set[str] = set()
    while not jobs.get_job_status(job).is_terminal():
        seen |= workers(cluster)
        time.sleep(0.5)
    ended_at = time.time()
    if jobs.get_job_status(job).name != "SUCCEEDED":
        raise SystemExit(f"study {name} failed:\n{jobs.get_job_logs(job)[-4000:]}")
    client = mlflow.MlflowClient(cluster.mlflow_url)
    experiment = client.get_experiment_by_name(name)
    runs = [r for r in client.search_runs([experiment.experiment_id])
            if r.data.tags.get("role") == "trial"]
    starts = [r.info.start_time / 1000 for r in runs]
    ends = [r.info.end_time / 1000 for r in runs]
    trial_seconds = sum(e - s for s, e in zip(starts, ends))
    slots = 4  # 2 workers x (1 GPU / 0.5 per trial)
    span = max(ends) - min(starts)
    deadline = time.monotonic() + 300
    while workers(cluster) and time.monotonic() < deadline:  # idle timeout: they go
        time.sleep(2)
    removed = len(seen - workers(cluster))
    return {"mode": mode, "trials": len(runs), "submit_to_first_trial_s": min(starts) - submitted_at,
            "submit_to_end_s": ended_at - submitted_at, "trial_span_s": span,
            "trial_seconds": trial_seconds, "mean_trial_s": trial_seconds / len(runs),
            "slots": slots, "utilisation": trial_seconds / (slots * span),
            "workers_launched": len(seen), "workers_removed": removed}


def autoscaling(out: Path, trials: int, steps: int, idle_minutes: float = 0.25,
                argv: list[str] | None = None) -> dict:
    """`argv`: main()'s arguments, for the results file's command."""
    from cluster.local import LocalCluster

    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        cluster = LocalCluster(Path(tmp) / "cluster", workers=2, cpus_per_worker=1,
                               autoscaling=True, gpus_per_worker=1,
                               idle_timeout_minutes=idle_minutes).start()
        startup_s = time.monotonic() - start
        try:
            runs = [autoscaled_run(cluster, f"util-{mode.replace('_', '-')}", mode, trials, steps)
                    for mode in ("in_turn", "together")]
        finally:
            cluster.stop()
    result = {**provenance({"study": "studies/smoke.yaml", "trials_per_family": trials,
                            "steps": steps, "idle_minutes": idle_minutes}, __file__, argv),
              "study": "studies/smoke.yaml", "trials_per_family": trials, "steps": steps,
              "cluster_startup_seconds": startup_s, "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{'families':<10}{'trials':>7}{'first trial s':>14}{'end s':>8}{'trial s':>9}"
          f"{'span s':>8}{'utilisation':>12}{'launched':>9}{'removed':>8}")
    for r in runs:
        print(f"{r['mode']:<10}{r['trials']:>7}{r['submit_to_first_trial_s']:>14.1f}"
              f"{r['submit_to_end_s']:>8.1f}{r['mean_trial_s']:>9.1f}{r['trial_span_s']:>8.1f}"
              f"{r['utilisation']:>12.2f}{r['workers_launched']:>9}{r['workers_removed']:>8}")
    print(f"cluster start-up {startup_s:.1f} s (once); wrote {out}")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/cluster/autoscaling.json")
    p.add_argument("--static", action="store_true",
                   help="the static 3-node cluster vs plain local Ray (the older benchmark)")
    p.add_argument("--trials", type=int, default=8, help="autoscaling: trials per family")
    p.add_argument("--steps", type=int, default=150, help="autoscaling: steps per iteration")
    p.add_argument("--smoke", action="store_true",
                   help="autoscaling, 2 trials of 10 steps, 6 s idle timeout")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if not args.static:
        # the smoke run's workers go after 6 s idle (the benchmark's after 15 s)
        autoscaling(out, 2 if args.smoke else args.trials, 10 if args.smoke else args.steps,
                    0.1 if args.smoke else 0.25, argv)
        return 0
    from cluster.local import LocalCluster

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        local = spec_file(tmp, {"optuna": f"sqlite:///{tmp}/optuna.db",
                                "mlflow": f"sqlite:///{tmp}/mlflow.db", "ray": str(tmp / "ray")},
                          "bench-local")
        local_s = run([str(BIN / "gmwae"), "study", "run", str(local), "--quiet"], cwd=tmp, env=env)

        start = time.monotonic()
        cluster = LocalCluster(tmp / "cluster", workers=2, cpus_per_worker=1).start()
        startup_s = time.monotonic() - start
        try:
            spec = spec_file(tmp, {"optuna": cluster.optuna_url(), "mlflow": cluster.mlflow_url,
                                   "ray": str(cluster.storage_path)}, "bench-cluster")
            cluster_s = run([str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url,
                             "--working-dir", ".", "--", "gmwae", "study", "run", str(spec),
                             "--quiet"], cwd=ROOT, env=cluster.env())
        finally:
            cluster.stop()
    result = {**provenance({"study": "studies/smoke.yaml", "workers": 2, "cpus_per_worker": 1},
                           __file__, argv),
              "study": "studies/smoke.yaml", "local_ray_seconds": local_s,
              "cluster_seconds": cluster_s, "cluster_startup_seconds": startup_s,
              "ratio": cluster_s / local_s}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{'where':<44}{'wall s':>8}")
    print(f"{'plain local Ray (ray.init), sqlite stores':<44}{local_s:>8.1f}")
    print(f"{'local 3-node cluster, ray job submit':<44}{cluster_s:>8.1f}   "
          f"({cluster_s / local_s:.2f}x)")
    print(f"{'  cluster start-up (once)':<44}{startup_s:>8.1f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
