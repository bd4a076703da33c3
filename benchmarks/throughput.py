"""Training throughput of GM-WAE and GM-VAE at the cpu and paper widths, against the machine's peak.

    python benchmarks/throughput.py --out benchmarks/results/throughput/cpu.json
    python benchmarks/throughput.py --smoke --out /tmp/throughput.json   # seconds

For each variant: steps/s and images/s of the real training step (Trainer.train_steps on
MNIST-shaped data), the step's FLOPs as torch counts them (benchmarks/flops.py:
FlopCounterMode over one optimizer step), and its rate as a fraction of the matmul peak
measured in the same run on the same threads, for the step's precision (fp32, or bf16 for
+bf16; TF32 on CUDA). Then a torch.profiler breakdown of a step into its regions
(encoders, decoder, mmd, backward, optimizer), and each decoder convolution's forward +
backward alone at the step's shapes, in GFLOP/s.

Variants: a preset name, then any of `+gmvae` (the GM-VAE family; GM-WAE by default),
`+compile` (torch.compile the decoder), `+bf16` (train.precision=bf16: the networks under
bf16 autocast), `+wN` (decoder width N instead of the preset's), e.g.
`--presets cpu,cpu+gmvae,cpu+bf16,cpu+w64`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from gmwae_core import ConfigError, Trainer, from_preset, load_splits

from flops import matmul_peaks, peak_key, step_flops  # benchmarks/flops.py
from record import provenance  # benchmarks/record.py: the results record's provenance keys

REGIONS = ("encoders", "decoder", "mmd", "backward", "optimizer")


def _time(fn, reps: int, device: torch.device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def component_ms(trainer: Trainer, reps: int) -> dict[str, float]:
    """Forward + backward of each part alone, at the step's shapes (ms)."""
    from gmwae_core.objectives import weighted_mmd

    m, B, dev = trainer.cfg.model, trainer.cfg.train.batch_size, trainer.device
    model, x = trainer.model, trainer.splits.train_x[:B]
    S, KS = m.num_samples, m.K * m.num_samples

    def encoders():
        q_k_logits, mean, logvar = model.encode(x)
        (q_k_logits.sum() + model.sample_z(mean, logvar, S).sum()).backward()

    def decoder():
        trainer._decode(torch.randn(B, m.K, S, m.latent_dim, device=dev, requires_grad=True)).sum().backward()

    def mmd():
        z_q = torch.randn(B, KS, m.latent_dim, device=dev, requires_grad=True)
        w = torch.full((B, KS), 1.0 / KS, device=dev)
        weighted_mmd(z_q, w, torch.randn(B, KS, m.latent_dim, device=dev), w).backward()

    out = {name: 1e3 * _time(fn, reps, dev) for name, fn in
           (("encoders", encoders), ("decoder", decoder), ("mmd", mmd))}
    out["optimizer"] = 1e3 * _time(trainer.optimizer.step, reps, dev)
    trainer.optimizer.zero_grad(set_to_none=True)
    return out


def decoder_layer_rates(trainer: Trainer, reps: int) -> list[dict]:
    """Each decoder (transposed) convolution's forward + backward alone, at the step's shapes."""
    m, dev = trainer.cfg.model, trainer.device
    codes = trainer.cfg.train.batch_size * m.K * m.num_samples
    rows, side = [], 7
    for layer in trainer.model.decoder.deconv:
        if not isinstance(layer, nn.ConvTranspose2d):
            continue
        x = torch.randn(codes, layer.in_channels, side, side, device=dev).contiguous(
            memory_format=torch.channels_last).requires_grad_()
        out = layer(x)
        grad = torch.randn_like(out)
        inputs = [x, *layer.parameters()]
        ms = 1e3 * _time(lambda: torch.autograd.grad(layer(x), inputs, grad), reps, dev)
        macs = x.numel() * layer.out_channels * layer.kernel_size[0] * layer.kernel_size[1]
        rows.append({"layer": f"{layer.in_channels}->{layer.out_channels} ch, {side}->{out.shape[-1]} px",
                     "fwd_bwd_ms": ms, "gflops": 3 * 2 * macs / ms / 1e6})
        side = out.shape[-1]
    return rows


def variant_config(variant: str, device: torch.device):
    """`variant`: a preset name, then any of +gmvae (the family), +compile (torch.compile the
    decoder), +bf16 (train.precision=bf16) and +wN (decoder width N), e.g. cpu+w64+bf16."""
    preset, *extras = variant.split("+")
    overrides = {"dataset": "synthetic", "pretrain_steps": 0, "device": device.type,
                 "family": "gmwae", "compile": False, "precision": "fp32"}
    for extra in extras:
        if extra == "gmvae":
            overrides["family"] = "gmvae"
        elif extra == "compile":
            overrides["compile"] = True
        elif extra == "bf16":
            overrides["precision"] = "bf16"
        elif extra.startswith("w") and extra[1:].isdigit():
            overrides["decoder_width"] = int(extra[1:])
        else:
            raise SystemExit(f"--presets: unknown variant {variant!r} (part {extra!r}); use "
                             f"PRESET with any of +gmvae, +compile, +bf16 and +wN "
                             f"(e.g. cpu+w64+bf16)")
    try:
        return from_preset(preset, overrides)
    except ConfigError as e:
        raise SystemExit(f"--presets {variant!r}: {e}") from None


def measure(variant: str, steps: int, device: torch.device) -> dict:
    cfg = variant_config(variant, device)
    trainer = Trainer(cfg, load_splits(cfg.data))
    trainer.train_steps(2 if steps >= 5 else 1)  # warm-up: allocator, oneDNN/cuDNN plans, compile
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.train_steps(steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / steps
    flops = step_flops(trainer)
    with profile(activities=[ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if device.type == "cuda" else [])) as prof:
        trainer.train_steps(min(steps, 5))
    regions = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages() if e.key in REGIONS}
    parts = component_ms(trainer, min(steps, 5))
    layers = decoder_layer_rates(trainer, min(steps, 5))
    total = sum(regions.values())
    m = cfg.model
    return {
        "preset": variant, "family": cfg.family, "precision": trainer.precision,
        "decoder_width": m.decoder_width, "num_samples": m.num_samples,
        "batch_size": cfg.train.batch_size, "codes_per_step": cfg.train.batch_size * m.K * m.num_samples,
        "step_ms": 1e3 * step_s, "steps_per_s": 1 / step_s,
        "images_per_s": cfg.train.batch_size / step_s, "gflop_per_step": flops / 1e9,
        "gflops": flops / step_s / 1e9,
        "profile_share": {k: regions.get(k, 0.0) / total for k in REGIONS},
        "component_ms": parts,
        "decoder_layers": layers,
        "top_ops": [(e.key, e.self_cpu_time_total / 1e3) for e in sorted(
            prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="cpu,cpu+gmvae,paper,paper+gmvae",
                   help="comma-separated variants: PRESET with any of +gmvae, +compile, +bf16, +wN")
    p.add_argument("--steps", type=int, default=30, help="timed steps for the cpu preset")
    p.add_argument("--paper-steps", type=int, default=2, help="timed steps for the paper preset")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="benchmarks/results/throughput/cpu.json")
    p.add_argument("--smoke", action="store_true", help="cpu preset, 2 steps")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    presets = ["cpu"] if args.smoke else args.presets.split(",")
    for variant in presets:  # every variant checked before anything is measured
        variant_config(variant, device)
    peaks = matmul_peaks(device, 0.5 if args.smoke else 3.0)
    rows = []
    for preset in presets:
        steps = 2 if args.smoke else (args.paper_steps if preset.startswith("paper") else args.steps)
        row = measure(preset, steps, device)
        row["peak"] = peak_key(row["precision"], device)
        row["fraction_of_matmul_peak"] = (row["gflops"] / peaks[row["peak"]]
                                          if row["peak"] in peaks else None)
        rows.append(row)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    settings = {"presets": presets, "steps": args.steps, "paper_steps": args.paper_steps,
                "device": str(device), "smoke": args.smoke}
    result = {**provenance(settings, __file__, gpu=gpu),
              "device": str(device), "gpu": gpu,
              "threads": torch.get_num_threads(),
              "matmul_peak_gflops": peaks, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"device {device}, {torch.get_num_threads()} threads, matmul peaks "
          + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()) + " GFLOP/s")
    print(f"{'preset':<13}{'width':>6}{'S':>3}{'batch':>6}{'ms/step':>9}{'img/s':>8}"
          f"{'GFLOP/step':>11}{'GFLOP/s':>9}{'of peak':>8}   fwd+bwd ms alone | profile share")
    for r in rows:
        share = " ".join(f"{k} {v:.0f}" for k, v in r["component_ms"].items()) + " | " + " ".join(
            f"{k} {v:.0%}" for k, v in r["profile_share"].items())
        print(f"{r['preset']:<13}{r['decoder_width']:>6}{r['num_samples']:>3}{r['batch_size']:>6}"
              f"{r['step_ms']:>9.1f}{r['images_per_s']:>8.0f}{r['gflop_per_step']:>11.2f}"
              f"{r['gflops']:>9.1f}{r['fraction_of_matmul_peak'] or float('nan'):>8.0%}   {share}")
    print("decoder convolutions alone (forward + backward at the step's shapes):")
    for r in rows:
        print(f"  {r['preset']:<13}" + " | ".join(
            f"{x['layer']}: {x['fwd_bwd_ms']:.1f} ms {x['gflops']:.0f} GFLOP/s "
            f"({x['gflops'] / peaks[r['peak']] if r['peak'] in peaks else float('nan'):.0%})"
            for x in r["decoder_layers"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
