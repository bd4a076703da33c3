"""Platform overhead: N identical trials through Ray Tune + Optuna + MLflow vs gmwae_core.

    python benchmarks/overhead.py --data-dir ../shared/data/mnist --trials 4 --steps 100 \\
        --out benchmarks/results/overhead/local-ray.json
    python benchmarks/overhead.py --smoke --out /tmp/overhead.json      # synthetic, seconds

1. Sequential: N trials one at a time through `run_study` (space `fixed`, 2 CPUs per
   trial) vs the same N trainings called directly (same threads, the same work per trial:
   load data, pretrain, train, validate, checkpoint, figures). Ratio of wall times;
   target <= 1.10. Ray's start-up is measured apart (paid once per study).
2. Concurrency: N trials with 1 CPU each, 2 at a time vs 1 at a time; throughput ratio;
   target >= 1.8. Measured twice: on the studies' wall times (which include the study's
   one-off start-up: MLflow and Optuna stores, the first workers), and on the trials'
   span (first trial start to last trial end, from the MLflow child runs' times).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from record import provenance  # benchmarks/record.py: the results record's provenance keys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def make_spec(args, tmp: Path, name: str, cpu: float, concurrent: int):
    from study.spec import spec_from_dict

    fixed = {"pretrain_steps": 50, "eval_size": 500}
    if args.smoke:
        fixed.update({"decoder_width": 8, "batch_size": 32, "pretrain_steps": 2})
    return spec_from_dict({
        "name": name, "families": ["gmwae"], "space": "fixed",
        "dataset": "synthetic" if args.smoke else "mnist", "data_dir": args.data_dir,
        "fixed": fixed, "trials": args.trials, "max_iterations": 1,
        "steps_per_iteration": args.steps, "scheduler": "none",
        "resources": {"cpu": cpu, "gpu": 0}, "max_concurrent": concurrent,
        "storage": {"optuna": f"sqlite:///{tmp}/{name}-optuna.db",
                    "mlflow": f"sqlite:///{tmp}/{name}-mlflow.db", "ray": str(tmp / "ray")}})


def direct(spec, tmp: Path) -> float:
    """The trainable's work, called N times in this process."""
    import torch

    from gmwae_core import Trainer, load_splits, save_checkpoint
    from gmwae_core.figures import write_figures
    from study.stores import resolve_study_data

    spec = resolve_study_data(spec)
    torch.set_num_threads(int(spec.resources.cpu))
    start = time.perf_counter()
    for i in range(spec.trials):
        cfg = spec.run_config("gmwae", {})
        trainer = Trainer(cfg, load_splits(cfg.data))
        trainer.train_steps(spec.steps_per_iteration)
        val = trainer.evaluate("val")
        save_checkpoint(trainer, tmp / f"direct-{i}" / "checkpoint", val.metrics)
        write_figures(trainer, val, tmp / f"direct-{i}" / "figures", split="val")
    return time.perf_counter() - start


def platform(spec) -> tuple[float, float]:
    """(wall seconds of the study, seconds from its first trial's start to its last's end)."""
    from mlflow import MlflowClient

    from study.runner import run_study

    start = time.perf_counter()
    summary = run_study(spec, verbose=0)
    wall = time.perf_counter() - start
    if summary["gmwae"]["failed"]:
        raise RuntimeError(f"{summary['gmwae']['failed']} trials failed in {spec.name}")
    client = MlflowClient(spec.store("mlflow"))
    experiment = client.get_experiment_by_name(spec.name)
    runs = [r for r in client.search_runs([experiment.experiment_id])
            if r.data.tags.get("role") == "trial"]
    if len(runs) != spec.trials:
        raise RuntimeError(f"{spec.name}: {len(runs)} trial runs in MLflow, expected {spec.trials}")
    span = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1e3
    return wall, span


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("GMWAE_DATA_DIR"))
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--steps", type=int, default=100, help="training steps per trial")
    p.add_argument("--out", default="benchmarks/results/overhead/local-ray.json")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.trials, args.steps = 2, 5
    import ray

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        ray_init = time.perf_counter() - start
        seq_direct = direct(make_spec(args, tmp, "direct", 2, 1), tmp)
        seq_platform, _ = platform(make_spec(args, tmp, "seq2cpu", 2, 1))
        one_at_a_time, one_span = platform(make_spec(args, tmp, "seq1cpu", 1, 1))
        two_at_a_time, two_span = platform(make_spec(args, tmp, "par1cpu", 1, 2))
        ray.shutdown()
    result = {
        **provenance({"trials": args.trials, "steps_per_trial": args.steps, "smoke": args.smoke},
                     __file__),
        "trials": args.trials, "steps_per_trial": args.steps, "smoke": args.smoke,
        "ray_init_seconds": ray_init,
        "sequential": {"direct_seconds": seq_direct, "platform_seconds": seq_platform,
                       "ratio": seq_platform / seq_direct, "target_max": 1.10},
        "concurrency": {"one_at_a_time_seconds": one_at_a_time,
                        "two_at_a_time_seconds": two_at_a_time,
                        "throughput_ratio": one_at_a_time / two_at_a_time, "target_min": 1.8,
                        "one_at_a_time_trial_span_seconds": one_span,
                        "two_at_a_time_trial_span_seconds": two_span,
                        "trial_span_throughput_ratio": one_span / two_span},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    s, c = result["sequential"], result["concurrency"]
    print(f"{args.trials} trials x {args.steps} steps; Ray start-up {ray_init:.1f} s (once per study)")
    print(f"{'measurement':<44}{'seconds':>10}{'ratio':>8}{'target':>9}")
    print(f"{'direct gmwae_core, sequential (2 threads)':<44}{s['direct_seconds']:>10.1f}")
    print(f"{'platform, sequential (2 CPUs per trial)':<44}{s['platform_seconds']:>10.1f}"
          f"{s['ratio']:>8.2f}{'<= 1.10':>9}")
    print(f"{'platform, 1 CPU per trial, 1 at a time':<44}{c['one_at_a_time_seconds']:>10.1f}")
    print(f"{'platform, 1 CPU per trial, 2 at a time':<44}{c['two_at_a_time_seconds']:>10.1f}"
          f"{c['throughput_ratio']:>8.2f}{'>= 1.8':>9}")
    span = f"{c['one_at_a_time_trial_span_seconds']:.1f} / {c['two_at_a_time_trial_span_seconds']:.1f}"
    print(f"{'  trials only (first start to last end), 1 / 2':<47}{span:>15}"
          f"{c['trial_span_throughput_ratio']:>8.2f}{'>= 1.8':>9}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
