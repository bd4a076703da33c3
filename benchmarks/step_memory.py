"""One training step's memory, measured against gmwae_core.memory's estimate, and the GPU
memory the shipped studies' configurations need.

    python benchmarks/step_memory.py --out benchmarks/results/memory/step-memory.json
    python benchmarks/step_memory.py --smoke --out /tmp/step_memory.json     # seconds

Each configuration runs in its own process: the trainer is built, the kernel's peak
resident set (VmHWM) is reset, one optimiser step runs, and the peak minus the memory
before the step is the step's measured memory. The estimate's multipliers come from these
runs; the table shows measured / estimated. Then the GPU estimate for the paper point and
the widest corner of the `wide` space (what studies/paper.yaml and wide.yaml search).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from record import provenance  # benchmarks/record.py: the results record's provenance keys

ROOT = Path(__file__).resolve().parents[1]
# (family, decoder width, batch, K, S): N = B K S from 1,600 to 19,200 images per step
FULL = [("gmwae", 8, 32, 30, 5), ("gmwae", 8, 64, 30, 5), ("gmwae", 8, 128, 30, 5),
        ("gmwae", 64, 32, 10, 5), ("gmwae", 128, 32, 10, 5), ("gmvae", 64, 32, 10, 5),
        ("gmvae", 128, 64, 10, 5)]
SMOKE = [("gmwae", 8, 32, 30, 5), ("gmvae", 64, 32, 10, 5)]

MEASURE = r"""
import gc, json, sys, torch
torch.set_num_threads(1)
from gmwae_core import Trainer, from_preset, load_splits
from gmwae_core.memory import step_memory
family, w, b, k, s = sys.argv[1], *map(int, sys.argv[2:])
cfg = from_preset("cpu", {"dataset": "synthetic", "decoder_width": w, "batch_size": b, "K": k,
                          "num_samples": s, "latent_dim": 8, "pretrain_steps": 0,
                          "eval_size": 100}, family=family)
trainer = Trainer(cfg, load_splits(cfg.data))
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak resident set (VmHWM)
before = status("VmRSS:")
trainer.train_steps(1)
est = step_memory(cfg)
print(json.dumps({"family": family, "width": w, "batch": b, "K": k, "S": s,
                  "images": est.images, "measured_bytes": status("VmHWM:") - before,
                  "estimated_bytes": est.tensor_bytes}))
"""


def measure(row) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, *map(str, row)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    if done.returncode:
        raise SystemExit(f"measuring {row} failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["ratio"] = out["measured_bytes"] / out["estimated_bytes"]
    return out


def shipped() -> list[dict]:
    """The GPU estimate at the paper point and at the wide space's widest corner."""
    from gmwae_core import from_preset
    from gmwae_core.memory import GIB, step_memory

    corners = {"paper point (paper preset)": {},
               "wide: K 30, batch 256, width 128": {"K": 30, "batch_size": 256,
                                                    "decoder_width": 128}}
    rows = []
    for label, over in corners.items():
        for family in ("gmwae", "gmvae"):
            est = step_memory(from_preset("paper", over, family=family))
            rows.append({"config": label, "family": family, "images": est.images,
                         "gpu_gib": est.gpu_bytes / GIB})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/memory/step-memory.json")
    p.add_argument("--smoke", action="store_true", help="two small configurations")
    args = p.parse_args(argv)
    rows = [measure(r) for r in (SMOKE if args.smoke else FULL)]
    gpu = shipped()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = provenance({"configurations": "smoke" if args.smoke else "full"}, __file__, argv)
    out.write_text(json.dumps({**record, "cpu_steps": rows, "gpu_estimates": gpu}, indent=2))
    print(f"{'family':<7}{'width':>6}{'B':>5}{'K':>4}{'S':>3}{'N':>7}{'measured MiB':>14}"
          f"{'estimated MiB':>15}{'ratio':>7}")
    for r in rows:
        print(f"{r['family']:<7}{r['width']:>6}{r['batch']:>5}{r['K']:>4}{r['S']:>3}"
              f"{r['images']:>7}{r['measured_bytes'] / 2**20:>14.0f}"
              f"{r['estimated_bytes'] / 2**20:>15.0f}{r['ratio']:>7.2f}")
    print(f"\n{'GPU estimate (S = 5)':<36}{'family':<8}{'N':>7}{'GiB':>7}")
    for r in gpu:
        print(f"{r['config']:<36}{r['family']:<8}{r['images']:>7}{r['gpu_gib']:>7.1f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
