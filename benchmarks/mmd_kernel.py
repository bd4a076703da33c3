"""The MMD's IMQ kernel sum, eager (one pass over the distance block per scale) against
fused (torch.compile: one pass forward, one backward), forward + backward of weighted_mmd.

    python benchmarks/mmd_kernel.py --out benchmarks/results/mmd_kernel/cpu.json
    python benchmarks/mmd_kernel.py --smoke --out /tmp/mmd_kernel.json   # seconds

Sizes are the number of codes N*M in one batch (B x K x S): 640 is the cpu preset
(64 x 10 x 1), 1,000 the paper's batch (100 x 10 x 1), 5,000 and 12,800 the GPU
configurations of gpu_check.py (K=20 S=5 B=128 has 12,800 codes; three N x N blocks). Each
row: ms per forward + backward, eager and fused, the speed-up, and the largest difference
between the two MMD values and gradients (float32). The first fused call compiles (Triton
on CUDA, C++ on CPU); its time is reported apart and not in the average.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gmwae_core.objectives import weighted_mmd  # noqa: E402

from record import provenance  # benchmarks/record.py: the results record's provenance keys

SIZES = (640, 1000, 5000, 12800)
SMOKE_SIZES = (160,)
LATENT_DIM = 8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def kernel_row(codes: int, device: torch.device, seconds: float) -> dict:
    """weighted_mmd forward + backward at `codes` codes, eager and fused."""
    g = torch.Generator(device="cpu").manual_seed(codes)
    n, m = max(2, codes // 10), 10  # N batch items x M codes each
    z_q = torch.randn(n, m, LATENT_DIM, generator=g).to(device).requires_grad_()
    z_p = torch.randn(n, m, LATENT_DIM, generator=g).to(device)
    w = torch.full((n, m), 1.0 / m, device=device)
    row = {"codes": n * m, "device": str(device)}
    grads = {}
    for mode, fused in (("eager", False), ("fused", True)):
        def step():
            z_q.grad = None
            value = weighted_mmd(z_q, w, z_p, w, fused=fused)
            value.backward()
            return value
        start = time.perf_counter()
        value = step()
        _sync(device)
        row[f"{mode}_first_call_s"] = time.perf_counter() - start
        reps, start = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - start < seconds:
            step()
            reps += 1
        _sync(device)
        row[f"{mode}_ms"] = 1e3 * (time.perf_counter() - start) / reps
        grads[mode] = (float(value.detach()), z_q.grad.clone())
    row["speedup"] = row["eager_ms"] / row["fused_ms"]
    row["max_value_diff"] = abs(grads["eager"][0] - grads["fused"][0])
    row["max_grad_diff"] = float((grads["eager"][1] - grads["fused"][1]).abs().max())
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="one small size, seconds")
    p.add_argument("--sizes", default=None,
                   help=f"comma-separated code counts (default {','.join(map(str, SIZES))})")
    p.add_argument("--seconds", type=float, default=3.0, help="timing per size and mode")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        sizes = (SMOKE_SIZES if args.smoke else
                 tuple(int(s) for s in args.sizes.split(",")) if args.sizes else SIZES)
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    device = torch.device(args.device)
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "latent_dim": LATENT_DIM, "smoke": args.smoke}
    rows = [kernel_row(n, device, 0.2 if args.smoke else args.seconds) for n in sizes]
    settings = {"sizes": list(sizes), "seconds": args.seconds, "device": args.device,
                "latent_dim": LATENT_DIM, "smoke": args.smoke}
    record = provenance(settings, __file__, argv,
                        gpu=info["device"] if device.type == "cuda" else None)
    Path(args.out).write_text(json.dumps({**record, "info": info, "rows": rows}, indent=2))
    print(json.dumps(info))
    print(f"{'codes':>7}{'eager ms':>10}{'fused ms':>10}{'speed-up':>10}{'compile s':>11}"
          f"{'value diff':>12}{'grad diff':>11}")
    for r in rows:
        print(f"{r['codes']:>7}{r['eager_ms']:>10.2f}{r['fused_ms']:>10.2f}{r['speedup']:>10.2f}"
              f"{r['fused_first_call_s']:>11.1f}{r['max_value_diff']:>12.2e}{r['max_grad_diff']:>11.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
