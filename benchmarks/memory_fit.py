"""gmwae_core.memory's GPU constants, fitted to a GPU's measured steps.

    python benchmarks/memory_fit.py                                   # the H200 record
    python benchmarks/memory_fit.py --record R.json --out F.json      # another GPU's

Reads the memory rows of a benchmarks/gpu_check.py record (one optimiser step per
configuration: the process's peak reserved CUDA memory) and fits, by least squares,

    reserved = GPU_MMD_BLOCKS x 4 N^2 (GM-WAE only) + GPU_DECODER_SAVED x 4 N (686 w + 2352)
               + GPU_BASE_BYTES

(N = B K S images per step, w the decoder's width; the terms of gmwae_core/memory.py).
Prints the fitted constants beside the shipped ones and, per row, the reserved memory
against the shipped estimate (target: 0.85 to 1.15); writes both to the results record.
Runs on a CPU in seconds: the measuring was done on the GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gmwae_core import memory  # noqa: E402
from gmwae_core.memory import GIB, step_memory  # noqa: E402
from gpu_check import MEMORY, _base  # noqa: E402  (benchmarks/gpu_check.py)
from record import provenance  # noqa: E402  (benchmarks/record.py)

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks/results/gpu/h200-check.json"
OUT = ROOT / "benchmarks/results/memory/gpu-fit.json"
TARGET = (0.85, 1.15)


def configs() -> dict:
    """gpu_check.py's memory configurations by label, as it built them."""
    return {label: _base(family, {**overrides, "pretrain_steps": 0}, smoke=False)
            for label, family, overrides in MEMORY}


def fit(rows: list[dict]) -> dict[str, float]:
    """Least-squares constants (blocks, passes, base bytes) for the rows' reserved memory."""
    by_label = configs()
    design, reserved = [], []
    for row in rows:
        cfg = by_label[row["config"]]
        images, width = row["images"], cfg.model.decoder_width
        design.append([4.0 * images ** 2 if row["family"] == "gmwae" else 0.0,
                       4.0 * images * (686 * width + 2352), 1.0])
        reserved.append(row["reserved_gib"] * GIB)
    (blocks, passes, base), *_ = np.linalg.lstsq(np.array(design), np.array(reserved), rcond=None)
    return {"GPU_MMD_BLOCKS": float(blocks), "GPU_DECODER_SAVED": float(passes),
            "GPU_BASE_BYTES": float(base)}


def shipped_rows(rows: list[dict]) -> list[dict]:
    """Each row's measured reserve against the shipped estimate (gmwae_core.memory now)."""
    by_label = configs()
    out = []
    for row in rows:
        est = step_memory(by_label[row["config"]])
        out.append({"config": row["config"], "family": row["family"], "images": row["images"],
                    "reserved_gib": row["reserved_gib"],
                    "estimated_reserved_gib": est.gpu_reserved_bytes / GIB,
                    "reserved/estimated": row["reserved_gib"] * GIB / est.gpu_reserved_bytes})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--record", default=str(RECORD), help="a gpu_check.py JSON with memory rows")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    record = json.loads(Path(args.record).read_text())
    rows = [r for r in record["memory"] if "reserved_gib" in r]
    if len(rows) < 3:
        print(f"error: {args.record} holds {len(rows)} memory rows measured on a GPU; the fit "
              f"needs at least 3 (run benchmarks/gpu_check.py --sections memory on a GPU).",
              file=sys.stderr)
        return 2
    fitted = fit(rows)
    shipped = {k: getattr(memory, k) for k in fitted}
    checked = shipped_rows(rows)
    print(f"{'constant':<20}{'fitted':>16}{'shipped':>16}")
    for k in fitted:
        print(f"{k:<20}{fitted[k]:>16.4g}{shipped[k]:>16.4g}")
    print(f"\n{'configuration':<24}{'reserved GiB':>14}{'estimated':>11}{'ratio':>7}")
    for r in checked:
        print(f"{r['config']:<24}{r['reserved_gib']:>14.2f}{r['estimated_reserved_gib']:>11.2f}"
              f"{r['reserved/estimated']:>7.2f}")
    source = Path(args.record).resolve()
    settings = {"record": str(source.relative_to(ROOT)) if source.is_relative_to(ROOT)
                else str(source), "measured_on": record["machine"], "target": list(TARGET)}
    result = {**provenance(settings, __file__, argv), "fitted": fitted, "shipped": shipped,
              "rows": checked}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
