"""How many trials one device should hold: aggregate steps/s of 1 to 16 trials at once.

    python benchmarks/packing.py --out benchmarks/results/packing/cpu.json
    python benchmarks/packing.py --smoke --out /tmp/packing.json           # seconds
    python benchmarks/gpu_check.py --sections packing ...                   # on a GPU

Two sizes: the quickstart's trial (the cpu preset, batch 64) and the paper point (the
paper preset). Two ways to share the device among N trials:

  processes   N processes, each training its own Trainer (what Ray does with
              `resources.gpu: 1/N`): they start together and each counts its steps in
              the same wall-clock window;
  stacked     one process training the N runs as one (gmwae_core.stacked.StackedTrainer:
              torch.func over stacked parameters, one kernel per layer for all N).

Each row: the aggregate steps/s (all trials' steps over the window) and its ratio to one
trial alone, measured in the same run. A count whose estimated memory (gmwae_core.memory)
does not fit the device is recorded as skipped, not run. Needs only gmwae_core's own
dependencies, so a GPU machine without Ray runs it.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gmwae_core import Trainer, from_preset, load_splits  # noqa: E402
from gmwae_core.memory import GIB, step_memory  # noqa: E402
from gmwae_core.stacked import StackedTrainer  # noqa: E402

SIZES = {"quickstart": ("cpu", {"batch_size": 64}), "paper": ("paper", {})}
COUNTS = (1, 2, 4, 8, 16)
MODES = ("processes", "stacked")
SMOKE = {"decoder_width": 8, "batch_size": 16, "num_samples": 1}


def size_config(size: str, family: str, seed: int, device: str, smoke: bool, precision: str):
    preset, overrides = SIZES[size]
    extra = {"dataset": "synthetic", "pretrain_steps": 0, "seed": seed, "device": device,
             "precision": precision, **overrides, **(SMOKE if smoke else {})}
    return from_preset(preset, extra, family=family)


def _timed_window(step, seconds: float, device: torch.device) -> tuple[int, float]:
    """Steps of `step()` in a window of `seconds` (synchronised at both ends): (steps, s)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        done += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done, time.perf_counter() - start


def _process_trial(cfg, threads: int, seconds: float, barrier, results) -> None:
    """One trial's process: build, warm up, wait for the others, then step for `seconds`."""
    torch.set_num_threads(threads)
    trainer = Trainer(cfg, load_splits(cfg.data))
    trainer.train_steps(3)
    barrier.wait()
    steps, elapsed = _timed_window(lambda: trainer.train_steps(1), seconds, trainer.device)
    results.put((steps, elapsed))


def run_processes(cfgs, seconds: float) -> float:
    """Aggregate steps/s of one process per config, stepping at the same time."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(len(cfgs)), ctx.Queue()
    threads = max(1, torch.get_num_threads() // len(cfgs))  # the CPU's cores, shared out
    procs = [ctx.Process(target=_process_trial, args=(cfg, threads, seconds, barrier, results))
             for cfg in cfgs]
    for p in procs:
        p.start()
    out = [results.get(timeout=600 + seconds) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a trial process exited with status {p.exitcode}")
    return sum(steps / elapsed for steps, elapsed in out)


def run_stacked(cfgs, seconds: float) -> float:
    """Aggregate steps/s of the configs trained as one stack in this process."""
    stack = StackedTrainer(cfgs, load_splits(cfgs[0].data))
    stack.train_steps(3)
    steps, elapsed = _timed_window(lambda: stack.train_steps(1), seconds, stack.device)
    return len(cfgs) * steps / elapsed


def device_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    return None


def packing_rows(sizes, counts, modes, seconds: float, family: str, device: torch.device,
                 smoke: bool, precision: str = "auto") -> list[dict]:
    rows = []
    capacity = device_memory_gib(device)
    for size in sizes:
        alone = None
        for mode in modes:
            for n in counts:
                cfgs = [size_config(size, family, seed, device.type, smoke, precision)
                        for seed in range(n)]
                need = n * step_memory(cfgs[0]).gpu_bytes / GIB
                row = {"size": size, "family": family, "mode": mode, "trials": n,
                       "batch_size": cfgs[0].train.batch_size,
                       "estimated_gib": need if device.type == "cuda" else None}
                if capacity is not None and need > 0.9 * capacity:
                    row["skipped"] = (f"estimated {need:.1f} GiB for {n} trials, over 90% of "
                                      f"the device's {capacity:.0f} GiB")
                    rows.append(row)
                    continue
                try:
                    rate = (run_processes if mode == "processes" else run_stacked)(cfgs, seconds)
                except Exception as e:  # noqa: BLE001 - one count failing keeps the others
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    rows.append(row)
                    continue
                if n == 1 and mode == "processes":
                    alone = rate
                row["aggregate_steps_per_s"] = rate
                row["per_trial_steps_per_s"] = rate / n
                row["vs_one_alone"] = rate / alone if alone else None
                rows.append(row)
                print(f"  {size:<10} {mode:<9} {n:>2} trials: {rate:8.1f} steps/s in all"
                      + (f" ({rate / alone:.2f}x one alone)" if alone else ""), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'size':<11}{'mode':<10}{'trials':>6}{'steps/s in all':>16}{'per trial':>11}"
             f"{'vs one alone':>14}"]
    for r in rows:
        if "aggregate_steps_per_s" in r:
            vs = r["vs_one_alone"]
            lines.append(f"{r['size']:<11}{r['mode']:<10}{r['trials']:>6}"
                         f"{r['aggregate_steps_per_s']:>16.1f}{r['per_trial_steps_per_s']:>11.1f}"
                         f"{'' if vs is None else f'{vs:.2f}x':>14}")
        else:
            lines.append(f"{r['size']:<11}{r['mode']:<10}{r['trials']:>6}  "
                         f"{r.get('skipped') or r.get('error')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--sizes", default="quickstart,paper", help=f"of {', '.join(SIZES)}")
    p.add_argument("--counts", default=",".join(map(str, COUNTS)), help="trials per device")
    p.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    p.add_argument("--family", default="gmwae", choices=["gmwae", "gmvae"])
    p.add_argument("--seconds", type=float, default=20.0, help="timed window per row")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 and 2 trials, 1 s windows")
    args = p.parse_args(argv)
    sizes, modes = args.sizes.split(","), args.modes.split(",")
    bad = [s for s in sizes if s not in SIZES] + [m for m in modes if m not in MODES]
    try:
        counts = [int(c) for c in args.counts.split(",")]
    except ValueError:
        p.error(f"--counts must be comma-separated whole numbers, got {args.counts!r}")
    if bad or min(counts) < 1:
        p.error(f"unknown size or mode {bad} or a count below 1 ({args.counts}): sizes are "
                f"{', '.join(SIZES)}; modes {', '.join(MODES)}")
    if args.smoke:
        counts, seconds = [c for c in counts if c <= 2] or [1], 1.0
    else:
        seconds = args.seconds
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    rows = packing_rows(sizes, counts, modes, seconds, args.family, device, args.smoke,
                        args.precision)
    from record import provenance  # noqa: E402  (benchmarks/record.py)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    settings = {"sizes": sizes, "counts": counts, "modes": modes, "family": args.family,
                "seconds": seconds, "precision": args.precision, "device": str(device),
                "smoke": args.smoke}
    result = {**provenance(settings, __file__, gpu=gpu), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
