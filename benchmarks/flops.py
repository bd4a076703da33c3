"""A training step's FLOPs, counted by torch, and the device's own matmul peaks, measured.

    flops = step_flops(trainer)          # one optimizer step under FlopCounterMode
    peaks = matmul_peaks(device)         # {"fp32": GFLOP/s, "tf32": ..., "bf16": ...}
    fraction = flops * steps_per_s / 1e9 / peaks[peak_key(precision, device)]

The count is torch.utils.flop_counter.FlopCounterMode's over one whole optimizer step
(forward, backward and update; convolutions, transposed convolutions and matmuls, which
are the step's FLOPs; elementwise work is not counted). The peak is the best rate of large
square matmuls in the same process, on the same threads or GPU, so a fraction compares the
step with what this machine reaches, not with a datasheet.
"""
from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from gmwae_core.training import cpu_has_fast_bf16

PEAK_SIZES = (1024, 2048, 4096)


def step_flops(trainer) -> float:
    """FLOPs of one optimizer step of `trainer` (a gmwae_core Trainer) on its next batch.
    The step is a real one: the trainer's weights move."""
    batch = trainer._next_batch()
    with FlopCounterMode(display=False) as counter:
        trainer.optimizer_step(batch)
    return float(counter.get_total_flops())


def stacked_step_flops(stack) -> float:
    """FLOPs of one step of a gmwae_core.stacked.StackedTrainer (all its runs)."""
    with FlopCounterMode(display=False) as counter:
        stack.train_steps(1)
    return float(counter.get_total_flops())


def _matmul_rate(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    best = 0.0
    for n in PEAK_SIZES:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / len(PEAK_SIZES):
            a @ b
            reps += 1
            if device.type == "cuda" and reps % 10 == 0:
                torch.cuda.synchronize()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9)
    return best


def matmul_peaks(device: torch.device, seconds: float = 3.0) -> dict[str, float]:
    """GFLOP/s of square matmuls (1024-4096) per precision: fp32; on CUDA tf32 (float32
    inputs through TF32 tensor cores) and bf16; on a CPU bf16 only where oneDNN has bf16
    kernels (training.cpu_has_fast_bf16: elsewhere a bf16 matmul runs a reference loop at
    about 1 GFLOP/s, no peak). `seconds` per precision."""
    peaks = {"fp32": 0.0}
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        peaks["fp32"] = _matmul_rate(device, torch.float32, seconds)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            peaks["tf32"] = _matmul_rate(device, torch.float32, seconds)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    if device.type != "cpu" or cpu_has_fast_bf16():
        peaks["bf16"] = _matmul_rate(device, torch.bfloat16, seconds)
    return peaks


def peak_key(precision: str, device: torch.device) -> str:
    """The peak a step of this precision is compared with: bf16 networks against the bf16
    peak; fp32 on CUDA against TF32 (the Trainer runs its convolutions in TF32), on a CPU
    against fp32."""
    if precision == "bf16":
        return "bf16"
    return "tf32" if device.type == "cuda" else "fp32"
