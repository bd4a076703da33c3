"""The paper's experiment at its full schedule, over seeds, in windows of GPU time.

    python benchmarks/reproduce.py --data-dir DIR --epochs E --state runs/reproduce \
        --window-seconds 540 --out benchmarks/results/reproduce/NAME.json      # each window
    python benchmarks/reproduce.py --smoke --epochs 2 --state /tmp/r --out /tmp/r.json

Each variant of benchmarks/quality.py (default: the paper's GM-WAE, GM-VAE and the
consistency option) trains at the paper preset on the paper's protocol (data.protocol=
paper: MNIST's 70,000 images pooled, the last 1,000 held out) for `--epochs` epochs with
the authors' learning-rate decay, one run per seed. A GPU comes for minutes at a time, so
a call trains for at most `--window-seconds`, saves every run's exact state under
`--state` (weights, Adam, counters, generator: Trainer.state_dict) and stops; the next
call, in the next window, goes on from there, as if never stopped. A variant's seeds train
at once: as one stack (`--mode stacked`, gmwae_core.stacked) or one after another.

The JSON is rewritten by every call: per variant and seed, the epochs done and, once a
run has finished its schedule, its paper-protocol metrics (Trainer.evaluate_paper: the
greedy map fitted on the training images, scored on the held-out 1,000; it reads labels);
per variant the mean and standard deviation over the finished seeds; and each window's
steps per second. `"complete": true` once every run has finished.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gmwae_core import ConfigError, Trainer, from_preset, load_splits  # noqa: E402
from gmwae_core.stacked import StackedTrainer  # noqa: E402
from quality import VARIANTS  # noqa: E402  (benchmarks/quality.py)
from record import provenance  # noqa: E402  (benchmarks/record.py)

DEFAULT_VARIANTS = ("paper", "gmvae", "consistency")
CHUNK_STEPS = 50  # steps between looks at the clock
SAFETY_SECONDS = {False: 30.0, True: 1.0}  # kept for evaluation and saving (smoke: True)
SMOKE = {"dataset": "synthetic", "decoder_width": 8, "batch_size": 32, "num_samples": 1,
         "pretrain_steps": 5, "device": "cpu"}


def run_config(variant: str, seed: int, epochs: int, data_dir: str | None, smoke: bool):
    settings = {k: v for k, v in VARIANTS[variant].items() if k != "family"}
    extra = {"protocol": "paper", "epochs": epochs, "seed": seed, **settings,
             **(SMOKE if smoke else {"dataset": "mnist"})}
    if data_dir and not smoke:
        extra["data_dir"] = data_dir
    return from_preset("paper", extra, family=VARIANTS[variant]["family"])


def _state_path(state: Path, variant: str, seed: int) -> Path:
    return state / variant / f"seed{seed}.pt"


def _train_window(trainers: list[Trainer], stacked: bool, deadline: float,
                  splits) -> tuple[int, float]:
    """Train the unfinished runs until their schedule ends or `deadline` (the monotonic time
    by which training stops: the window's end less the time kept for evaluation and
    saving) passes, a chunk of steps at a time. Returns (steps over all runs, seconds)."""
    start, steps = time.monotonic(), 0
    runs = [t for t in trainers if t.step < t.budget_steps]
    if not runs:
        return 0, 0.0
    if stacked:
        stack = StackedTrainer([t.cfg for t in runs], splits)
        for own, fresh in zip(runs, stack.trainers):  # each run's saved state, into the stack
            fresh.load_state_dict(own.state_dict())
        groups = [(stack, stack.trainers)]
    else:
        groups = [(t, [t]) for t in runs]
    for unit, members in groups:
        while time.monotonic() < deadline:
            left = min(t.budget_steps - t.step for t in members)
            if left <= 0:
                break
            unit.train_steps(min(CHUNK_STEPS, left))
            steps += min(CHUNK_STEPS, left) * len(members)
        for t in members:
            t.epoch = t.step // t.steps_per_epoch
    if stacked:
        for own, fresh in zip(runs, groups[0][1]):
            own.load_state_dict(fresh.state_dict())
    if trainers[0].device.type == "cuda":
        torch.cuda.synchronize()
    return steps, time.monotonic() - start


def reproduce(variants, seeds, epochs, data_dir, state: Path, window_seconds: float,
              stacked: bool, smoke: bool, previous: dict) -> dict:
    deadline = time.monotonic() + window_seconds - SAFETY_SECONDS[smoke]
    out = {"variants": previous.get("variants", {}), "windows": previous.get("windows", [])}
    window = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": 0,
              "seconds": 0.0, "mode": "stacked" if stacked else "sequential"}
    for variant in variants:
        cfgs = [run_config(variant, seed, epochs, data_dir, smoke) for seed in seeds]
        splits = load_splits(cfgs[0].data)
        trainers = []
        for cfg in cfgs:
            t = Trainer(cfg, splits)
            path = _state_path(state, variant, cfg.train.seed)
            if path.exists():
                t.load_state_dict(torch.load(path, weights_only=True))
            trainers.append(t)
        record = out["variants"].setdefault(variant, {"runs": {}})
        if time.monotonic() < deadline:
            steps, seconds = _train_window(trainers, stacked, deadline, splits)
            window["steps"] += steps
            window["seconds"] += seconds
        for t in trainers:
            path = _state_path(state, variant, t.cfg.train.seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(t.state_dict(), path)
            run = record["runs"].setdefault(str(t.cfg.train.seed), {})
            run.update({"epochs_done": t.step / t.steps_per_epoch, "steps": t.step,
                        "of_steps": t.budget_steps})
            if t.step >= t.budget_steps and "paper" not in run:
                run["paper"] = t.evaluate_paper()
        done = [r["paper"]["paper/cluster_acc_greedy"] for r in record["runs"].values()
                if "paper" in r]
        record["finished_seeds"] = len(done)
        if done:
            record["cluster_acc_greedy_mean"] = statistics.fmean(done)
            record["cluster_acc_greedy_std"] = statistics.stdev(done) if len(done) > 1 else 0.0
    window["steps_per_s"] = window["steps"] / window["seconds"] if window["seconds"] else None
    out["windows"].append(window)
    out["complete"] = all(len([r for r in out["variants"][v]["runs"].values() if "paper" in r])
                          == len(seeds) for v in variants)
    return out


def table(result: dict) -> str:
    lines = [f"{'variant':<14}{'seeds done':>11}{'greedy acc mean':>17}{'std':>8}   epochs per seed"]
    for variant, record in result["variants"].items():
        mean = record.get("cluster_acc_greedy_mean")
        std = record.get("cluster_acc_greedy_std")
        epochs = " ".join(f"{r['epochs_done']:.1f}" for r in record["runs"].values())
        lines.append(f"{variant:<14}{record['finished_seeds']:>11}"
                     f"{'' if mean is None else f'{mean:.3f}':>17}"
                     f"{'' if std is None else f'{std:.3f}':>8}   {epochs}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--state", required=True, help="folder of the runs' saved states")
    p.add_argument("--epochs", type=int, required=True,
                   help="epochs per run (the paper preset decays the rate at 30 and 50)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"of benchmarks/quality.py's: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--window-seconds", type=float, default=540.0)
    p.add_argument("--mode", default="stacked", choices=["stacked", "sequential"])
    p.add_argument("--data-dir", default=None, help="MNIST's IDX files (default: $GMWAE_DATA_DIR)")
    p.add_argument("--smoke", action="store_true", help="synthetic data, tiny shapes, CPU")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant {bad}: variants are {', '.join(VARIANTS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be comma-separated whole numbers, got {args.seeds!r}")
    try:  # every run's config checked before any trains
        for v in variants:
            run_config(v, seeds[0], args.epochs, args.data_dir, args.smoke)
    except ConfigError as e:
        p.error(str(e))
    out_path = Path(args.out)
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    settings = {"variants": variants, "seeds": seeds, "epochs": args.epochs,
                "state": args.state, "mode": args.mode, "smoke": args.smoke}
    if previous and previous.get("settings", {}).get("epochs") != args.epochs:
        p.error(f"{args.out} holds runs of {previous['settings']['epochs']} epochs, not "
                f"{args.epochs}: use the same --epochs, or another --out and --state")
    result = reproduce(variants, seeds, args.epochs, args.data_dir, Path(args.state),
                       args.window_seconds, args.mode == "stacked", args.smoke, previous)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    sources = previous.get("sources", []) + [
        {k: v for k, v in provenance(settings, __file__, argv, gpu=gpu).items() if k != "settings"}]
    full = {**provenance(settings, __file__, argv, gpu=gpu), "sources": sources, **result}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(full, indent=2))
    print(table(result))
    print(f"{'complete' if result['complete'] else 'not complete: run again'}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
