"""What gmwae_core does on a real GPU, in one short run (for a lent GPU machine).

    python benchmarks/gpu_check.py --data-dir DIR --out gpu_check.json   # ~6 min, H100/H200
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check.json    # CPU, seconds

Needs only gmwae_core's own dependencies (torch, numpy, scikit-learn, scipy): a GPU
machine without Ray, Optuna or MLflow runs it.

1. memory: one optimiser step per configuration; the step's peak of allocated CUDA memory
   (torch.cuda.max_memory_allocated above what was allocated before it) against
   gmwae_core.memory's estimate of the step's tensors, and the process's peak reserved
   memory against the estimate of the allocator's reserve (benchmarks/memory_fit.py fits
   the estimate's GPU constants to these rows);
2. synchronisation: host synchronisations counted with torch.cuda.set_sync_debug_mode, in
   one optimizer_step and in train_steps (which records history), with the gmwae_core
   line that caused each;
3. speed: steps per second of the paper preset per family: fp32 (TF32 convolutions, as the
   Trainer sets them), the networks under bf16 autocast (train.precision=bf16), the same
   with cuDNN's autotuner (torch.backends.cudnn.benchmark), and the whole step under bf16
   autocast; with each, the step's FLOPs (FlopCounterMode, benchmarks/flops.py), its
   TFLOP/s and the fraction of this device's matmul peak for its precision (TF32 or bf16),
   measured in the same run;
4. training: the paper preset on MNIST (standard 60k/10k split, Hungarian accuracy) for a
   wall-clock budget per family: validation accuracy and active modes per epoch, the
   epoch's time, and the test metrics at the end;
5. paper: GM-WAE, paper preset, the paper's protocol (data.protocol=paper: 70k pooled, the
   last 1,000 held out, the greedy map fitted on the training images) for a wall-clock
   budget per variant of benchmarks/quality.py (the paper's model, and with the
   consistency option): `paper/` accuracy per epoch, the epoch's time, steps per second;
   `--set KEY=VALUE` changes the variants' settings (e.g. train.consistency_weight=4);
6. kernel: the MMD's IMQ kernel sum eager against fused (benchmarks/mmd_kernel.py: Triton
   through torch.compile), forward + backward at 1,000 to 12,800 codes, and their agreement;
7. packing: aggregate steps/s of 1 to 16 trials on the device, as processes and as one
   stacked process (benchmarks/packing.py), at the quickstart's size and the paper point.

    python benchmarks/gpu_check.py --sections syncs,speed,paper --paper-seconds 120 ...
    GMWAE_FUSED_KERNEL=0 python benchmarks/gpu_check.py --sections speed ...   # eager MMD
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gmwae_core import ConfigError, Trainer, from_preset, load_splits, parse_overrides  # noqa: E402
from gmwae_core.config import canonical_key  # noqa: E402
from gmwae_core.memory import GIB, step_memory  # noqa: E402
from mmd_kernel import SIZES as KERNEL_SIZES  # noqa: E402  (benchmarks/mmd_kernel.py)
from mmd_kernel import SMOKE_SIZES as KERNEL_SMOKE_SIZES  # noqa: E402
from mmd_kernel import kernel_row  # noqa: E402
from flops import matmul_peaks, peak_key, step_flops  # noqa: E402  (benchmarks/flops.py)
from packing import COUNTS as PACKING_COUNTS  # noqa: E402  (benchmarks/packing.py)
from packing import SIZES as PACKING_SIZES  # noqa: E402
from packing import packing_rows  # noqa: E402
from packing import table as packing_table  # noqa: E402
from quality import VARIANTS  # noqa: E402  (benchmarks/quality.py)
from record import provenance  # noqa: E402  (benchmarks/record.py)

# (label, family, overrides on the paper preset)
MEMORY = [("paper gmwae", "gmwae", {}), ("paper gmvae", "gmvae", {}),
          ("K=20 S=5 B=128 gmwae", "gmwae", {"K": 20}),
          ("K=20 B=256 gmwae", "gmwae", {"K": 20, "batch_size": 256}),
          ("w=256 B=256 gmvae", "gmvae", {"decoder_width": 256, "batch_size": 256})]
SMOKE_MEMORY = MEMORY[:2]


def _base(family: str, overrides: dict, smoke: bool, dataset: str = "synthetic",
          data_dir: str | None = None):
    extra = {"dataset": dataset, **overrides}
    if data_dir:
        extra["data_dir"] = data_dir
    if smoke:
        extra.update({"decoder_width": 8, "batch_size": 16, "num_samples": 2, "device": "cpu",
                      "pretrain_steps": 5, "eval_size": 200})
    return from_preset("paper", extra, family=family)


def memory_rows(smoke: bool) -> list[dict]:
    rows = []
    for label, family, overrides in (SMOKE_MEMORY if smoke else MEMORY):
        cfg = _base(family, {**overrides, "pretrain_steps": 0}, smoke)
        est = step_memory(cfg)
        row = {"config": label, "family": family, "images": est.images,
               "estimated_step_gib": est.tensor_bytes / GIB, "estimated_gpu_gib": est.gpu_bytes / GIB}
        trainer = Trainer(cfg, load_splits(cfg.data))
        batch = trainer._next_batch()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            trainer.optimizer_step(batch)
            torch.cuda.synchronize()
            row["measured_step_gib"] = (torch.cuda.max_memory_allocated() - before) / GIB
            row["reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
            row["measured/estimated"] = row["measured_step_gib"] / row["estimated_step_gib"]
            row["estimated_reserved_gib"] = est.gpu_reserved_bytes / GIB
            row["reserved/estimated"] = row["reserved_gib"] / row["estimated_reserved_gib"]
        else:
            trainer.optimizer_step(batch)
        rows.append(row)
        del trainer, batch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


@contextlib.contextmanager
def _syncs(out: list[str]):
    """Collect each host synchronisation's gmwae_core line (CUDA only)."""
    if not torch.cuda.is_available():
        yield
        return

    def show(message, category, filename, lineno, file=None, line=None):
        where = next((f"{Path(f.filename).name}:{f.lineno} {f.function}"
                      for f in inspect.stack()[1:] if "gmwae_core" in f.filename), filename)
        out.append(where)

    saved = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = saved


def sync_rows(smoke: bool) -> list[dict]:
    rows = []
    for family in ("gmwae", "gmvae"):
        cfg = _base(family, {"pretrain_steps": 0, "history_every": 5}, smoke)
        trainer = Trainer(cfg, load_splits(cfg.data))
        trainer.train_steps(3)  # warm: cuBLAS handles, allocator
        batch = trainer._next_batch()
        step: list[str] = []
        with _syncs(step):
            trainer.optimizer_step(batch)
        loop: list[str] = []
        with _syncs(loop):
            trainer.train_steps(10)
        rows.append({"family": family, "optimizer_step_syncs": len(step),
                     "optimizer_step_where": sorted(set(step)),
                     "train_steps_10_syncs": len(loop), "train_steps_where": sorted(set(loop))})
    return rows


SPEED_MODES = ("fp32", "bf16 networks", "bf16 networks + cudnn autotune", "bf16 step")


def speed_rows(smoke: bool, steps: int) -> dict:
    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda" if cuda else "cpu")
    peaks = matmul_peaks(device, 0.3 if smoke else 3.0)
    rows = []
    for family in ("gmwae", "gmvae"):
        for mode in SPEED_MODES:
            # bf16 networks: train.precision=bf16 (q(k|x) and the decoder under autocast;
            # the q(z|k,x) heads, the sampling, the loss and the MMD in fp32)
            precision = "bf16" if mode.startswith("bf16 networks") else "fp32"
            cfg = _base(family, {"pretrain_steps": 0, "precision": precision}, smoke)
            saved_autotune = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = mode.endswith("cudnn autotune")
            trainer = Trainer(cfg, load_splits(cfg.data))
            whole = mode == "bf16 step"
            cast = (torch.autocast(trainer.device.type, dtype=torch.bfloat16)
                    if whole else contextlib.nullcontext())
            row = {"family": family, "mode": mode, "batch": cfg.train.batch_size}
            try:
                with cast:
                    for _ in range(5):
                        trainer.optimizer_step(trainer._next_batch())
                    flops = step_flops(trainer)
                    if cuda:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(steps):
                        terms, _ = trainer.optimizer_step(trainer._next_batch())
                    loss = float(terms["loss"].detach()) if "loss" in terms else None
                    if cuda:
                        torch.cuda.synchronize()
                row["steps_per_s"] = steps / (time.perf_counter() - start)
                row["images_per_s"] = row["steps_per_s"] * cfg.train.batch_size
                row["gflop_per_step"] = flops / 1e9
                row["tflops"] = flops * row["steps_per_s"] / 1e12
                row["peak"] = peak_key("bf16" if whole else trainer.precision, device)
                row["fraction_of_peak"] = (1e3 * row["tflops"] / peaks[row["peak"]]
                                           if row["peak"] in peaks else None)
                row["finite_loss"] = loss is None or loss == loss
            except Exception as e:  # noqa: BLE001 - report, go on with the next mode
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            finally:
                torch.backends.cudnn.benchmark = saved_autotune
            rows.append(row)
    return {"matmul_peak_gflops": peaks, "rows": rows}


def training_rows(smoke: bool, data_dir: str | None, seconds: dict[str, float]) -> list[dict]:
    out = []
    for family, budget in seconds.items():
        cfg = _base(family, {"epochs": 1000, "minutes": budget / 60.0}, smoke,
                    dataset="synthetic" if smoke else "mnist", data_dir=data_dir)
        trainer = Trainer(cfg, load_splits(cfg.data))
        start = time.monotonic()
        trainer.pretrain()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        pretrain_s = time.monotonic() - start
        epochs = []
        while not epochs or not trainer.budget_exhausted:  # a row if pretraining used it all
            t0 = time.monotonic()
            train = trainer.train_epoch()
            t1 = time.monotonic()
            val = trainer.evaluate("val").metrics
            epochs.append({"epoch": trainer.epoch, "step": trainer.step,
                           "epoch_seconds": t1 - t0, "eval_seconds": time.monotonic() - t1,
                           "val/cluster_acc": val["val/cluster_acc"],
                           "val/active_components": val["val/active_components"],
                           "train/loss": train.get("train/loss")})
            print(f"  {family} epoch {trainer.epoch:3d}  {t1 - t0:6.2f} s  val acc "
                  f"{val['val/cluster_acc']:.3f}  active {val['val/active_components']:.0f}",
                  flush=True)
        test = trainer.evaluate("test").metrics
        out.append({"family": family, "budget_seconds": budget, "pretrain_steps":
                    cfg.train.pretrain_steps, "pretrain_seconds": pretrain_s,
                    "steps_per_epoch": trainer.steps_per_epoch, "epochs": epochs,
                    "test": {k: v for k, v in test.items() if isinstance(v, float)}})
    return out


def _paper_settings(variant: str, overrides: dict) -> dict:
    """The variant's own settings, then --set (which may change them: consistency_weight=4),
    each under its full key, so a --set replaces the variant's value in the record too."""
    own = {canonical_key(k): v for k, v in VARIANTS[variant].items() if k != "family"}
    return {**own, **{canonical_key(k): v for k, v in overrides.items()}}


def paper_rows(smoke: bool, data_dir: str | None, seconds: float,
               variants: list[str], overrides: dict) -> list[dict]:
    out = []
    for variant in variants:
        settings = _paper_settings(variant, overrides)
        cfg = _base(VARIANTS[variant]["family"], {"epochs": 1000, "minutes": seconds / 60.0,
                                                  "protocol": "paper", **settings}, smoke,
                    dataset="synthetic" if smoke else "mnist", data_dir=data_dir)
        trainer = Trainer(cfg, load_splits(cfg.data))
        start = time.monotonic()
        trainer.pretrain()
        pretrain_s = time.monotonic() - start
        epochs = []
        while not epochs or not trainer.budget_exhausted:  # a row if pretraining used it all
            t0, step0 = time.monotonic(), trainer.step
            trainer.train_epoch()
            t1 = time.monotonic()
            paper = trainer.evaluate_paper()
            epochs.append({"epoch": trainer.epoch, "step": trainer.step, "epoch_seconds": t1 - t0,
                           "steps_per_s": (trainer.step - step0) / (t1 - t0),
                           "lr": trainer.optimizer.param_groups[0]["lr"],
                           "eval_seconds": time.monotonic() - t1, **paper})
            print(f"  {variant} epoch {trainer.epoch:3d}  {t1 - t0:6.2f} s  paper acc "
                  f"{paper['paper/cluster_acc_greedy']:.3f} (Hungarian "
                  f"{paper['paper/cluster_acc']:.3f})  active "
                  f"{paper['paper/active_components']:.0f}", flush=True)
        out.append({"variant": variant, "settings": settings, "budget_seconds": seconds,
                    "pretrain_seconds": pretrain_s, "steps_per_epoch": trainer.steps_per_epoch,
                    "n_fit": len(trainer.splits.train_x), "n_held": len(trainer.splits.test_x),
                    "epochs": epochs})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", default=None, help="MNIST's IDX files (default: $GMWAE_DATA_DIR)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, seconds")
    p.add_argument("--train-seconds", type=float, nargs=2, default=(150.0, 60.0),
                   metavar=("GMWAE", "GMVAE"), help="training budget per family")
    p.add_argument("--paper-seconds", type=float, default=120.0,
                   help="paper section: training budget per variant")
    p.add_argument("--paper-variants", default="paper,consistency",
                   help=f"paper section: variants of benchmarks/quality.py ({', '.join(VARIANTS)})")
    p.add_argument("--sections", default="memory,syncs,speed,training,paper,kernel",
                   help="comma-separated sections to run (packing too, when named)")
    p.add_argument("--packing-seconds", type=float, default=8.0,
                   help="packing section: timed window per row")
    p.add_argument("--packing-counts", default=",".join(map(str, PACKING_COUNTS)),
                   help="packing section: trials per device")
    p.add_argument("--packing-sizes", default=",".join(PACKING_SIZES),
                   help=f"packing section: of {', '.join(PACKING_SIZES)}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="paper section: applied to every variant, after its own settings "
                        "(e.g. --set train.consistency_weight=4)")
    args = p.parse_args(argv)
    wanted = args.sections.split(",")
    known = ("memory", "syncs", "speed", "training", "paper", "kernel", "packing")
    bad = [w for w in wanted if w not in known] + [
        v for v in args.paper_variants.split(",") if v not in VARIANTS] + [
        z for z in args.packing_sizes.split(",") if z not in PACKING_SIZES]
    try:
        packing_counts = [int(c) for c in args.packing_counts.split(",")]
    except ValueError:
        p.error(f"--packing-counts must be comma-separated whole numbers, got {args.packing_counts!r}")
    if bad:
        p.error(f"unknown section, variant or size {bad}: sections are {', '.join(known)}; "
                f"variants {', '.join(VARIANTS)}; packing sizes {', '.join(PACKING_SIZES)}")
    try:  # a bad --set stops here, before any section runs
        overrides = parse_overrides(args.overrides)
        for variant in args.paper_variants.split(","):
            _base(VARIANTS[variant]["family"], {"protocol": "paper",
                                                **_paper_settings(variant, overrides)}, args.smoke)
    except ConfigError as e:
        p.error(f"--set: {e}")
    torch.manual_seed(0)
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "smoke": args.smoke}
    print(json.dumps(info), flush=True)
    settings = {"sections": wanted, "smoke": args.smoke, "paper_seconds": args.paper_seconds,
                "packing_seconds": args.packing_seconds, "packing_counts": packing_counts,
                "paper_variants": args.paper_variants.split(","), "overrides": overrides}
    result = {**provenance(settings, __file__, argv,
                           gpu=info["device"] if info["device"] != "cpu" else None),
              "info": info}
    sections = [("memory", lambda: memory_rows(args.smoke)),
                ("syncs", lambda: sync_rows(args.smoke)),
                ("speed", lambda: speed_rows(args.smoke, 10 if args.smoke else 100)),
                ("training", lambda: training_rows(
                    args.smoke, args.data_dir,
                    {"gmwae": 3.0, "gmvae": 2.0} if args.smoke
                    else dict(zip(("gmwae", "gmvae"), args.train_seconds)))),
                ("paper", lambda: paper_rows(args.smoke, args.data_dir,
                                             2.0 if args.smoke else args.paper_seconds,
                                             args.paper_variants.split(","), overrides)),
                ("kernel", lambda: [kernel_row(n, torch.device("cuda" if torch.cuda.is_available()
                                                              else "cpu"), 0.2 if args.smoke else 2.0)
                                    for n in (KERNEL_SMOKE_SIZES if args.smoke else KERNEL_SIZES)]),
                ("packing", lambda: packing_rows(
                    args.packing_sizes.split(","),
                    [c for c in packing_counts if c <= 2] if args.smoke else packing_counts,
                    ("processes", "stacked"), 1.0 if args.smoke else args.packing_seconds, "gmwae",
                    torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"),
                    args.smoke))]
    sections = [(name, run) for name, run in sections if name in wanted]
    for name, run in sections:
        start = time.monotonic()
        try:
            result[name] = run()
        except Exception as e:  # noqa: BLE001 - one section failing must not lose the others
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"[{name}: {time.monotonic() - start:.0f} s] {json.dumps(result[name])[:3000]}",
              flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    _table(result)
    return 0


def _table(result: dict) -> None:
    print(f"\n{'memory':<24}{'images':>8}{'est step GiB':>14}{'meas GiB':>10}{'ratio':>7}"
          f"{'reserved':>10}{'est res':>9}{'ratio':>7}")
    for r in result.get("memory", []) if isinstance(result.get("memory"), list) else []:
        print(f"{r['config']:<24}{r['images']:>8}{r['estimated_step_gib']:>14.2f}"
              f"{r.get('measured_step_gib', float('nan')):>10.2f}"
              f"{r.get('measured/estimated', float('nan')):>7.2f}"
              f"{r.get('reserved_gib', float('nan')):>10.2f}"
              f"{r.get('estimated_reserved_gib', float('nan')):>9.2f}"
              f"{r.get('reserved/estimated', float('nan')):>7.2f}")
    speed = result.get("speed") if isinstance(result.get("speed"), dict) else {}
    for r in speed.get("rows", []):
        fraction = r.get("fraction_of_peak")
        share = "" if fraction is None else f"{fraction:.1%} of the {r['peak']} peak"
        print(f"speed {r['family']} {r['mode']:<31} {r.get('steps_per_s', float('nan')):8.1f} "
              f"steps/s {r.get('gflop_per_step', float('nan')):7.1f} GFLOP/step "
              f"{r.get('tflops', float('nan')):7.2f} TFLOP/s {share} {r.get('error', '')}")
    if isinstance(result.get("packing"), list):
        print(packing_table(result["packing"]))
    for r in result.get("training", []) if isinstance(result.get("training"), list) else []:
        last = r["epochs"][-1] if r["epochs"] else {}
        print(f"train {r['family']}: {len(r['epochs'])} epochs, "
              f"{sum(e['epoch_seconds'] for e in r['epochs']) / max(1, len(r['epochs'])):.2f} s/epoch, "
              f"last val acc {last.get('val/cluster_acc', float('nan')):.3f}, test acc "
              f"{r['test'].get('test/cluster_acc', float('nan')):.3f}")
    for r in result.get("paper", []) if isinstance(result.get("paper"), list) else []:
        accs = " ".join(f"{e['paper/cluster_acc_greedy']:.3f}" for e in r["epochs"])
        seconds = sum(e["epoch_seconds"] for e in r["epochs"]) / max(1, len(r["epochs"]))
        print(f"paper protocol, {r['variant']}: {len(r['epochs'])} epochs, {seconds:.2f} s/epoch, "
              f"greedy accuracy per epoch {accs}")
    for r in result.get("kernel", []) if isinstance(result.get("kernel"), list) else []:
        print(f"IMQ kernel, {r['codes']} codes: eager {r['eager_ms']:.2f} ms, fused {r['fused_ms']:.2f} ms "
              f"(x{r['speedup']:.2f}; compiled in {r['fused_first_call_s']:.1f} s), "
              f"grad diff {r['max_grad_diff']:.1e}")


if __name__ == "__main__":
    raise SystemExit(main())
