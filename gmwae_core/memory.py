"""Memory of one training step, estimated from the configuration alone (before any trial).

A step decodes every (x, k, s): N = B K S images (batch B, K modes, S samples). Two terms
grow with N and dominate at the paper's shapes and above:

    MMD (GM-WAE only):  MMD_BLOCKS x 4 N^2 bytes
        the (N x N) float32 distance and kernel blocks of weighted_mmd (qq, pp, qp): the
        pre-clamp distances, the clamped ones and the kernel are kept for the backward pass
        of qq and qp, and the forward and backward passes hold a few more blocks at once.
    decoder:            DECODER_SAVED x 4 N (686 w + 2352) bytes
        one forward pass's activations of the decoder of width w per image (49w after the
        linear layer and its batch norm, 98w and 196w after the deconvolutions and theirs,
        784 x 3 for the logits, the sigmoid and the loss), kept for the backward pass.

The two multipliers were measured on this CPU, as the peak resident memory of one step
minus the memory before it (benchmarks/step_memory.py: measured / estimated from 0.85 to
1.13 over widths 8 to 128, N from 1,600 to 19,200, both families). A GPU adds what the CPU does not
have: the CUDA context and cuDNN workspaces (CUDA_OVERHEAD_BYTES) and the caching
allocator's rounding and fragmentation (GPU_SAFETY). The GPU figure is an estimate from
the code and the CPU measurement, not a measurement on a GPU (none was lent).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import RunConfig
from .families import FAMILY_DEFS

__all__ = ["StepMemory", "step_memory", "gpu_share", "MMD_BLOCKS", "DECODER_SAVED", "GIB"]

GIB = 1024 ** 3
MMD_BLOCKS = 10.0
"""Live (N x N) float32 blocks of the MMD at the step's peak (measured: 9.8)."""
DECODER_SAVED = 1.75
"""Decoder activations held at the peak, in forward passes' worth (measured: 1.72)."""
BASE_BYTES = 64 * 1024 ** 2
"""Weights, optimiser state, a batch and the encoders' activations (the step's other
allocations, measured within this at every configuration of the benchmark)."""
CUDA_OVERHEAD_BYTES = 768 * 1024 ** 2
"""CUDA context and cuDNN workspaces of a process on a GPU."""
GPU_SAFETY = 1.25
"""The caching allocator's rounding and fragmentation over the tensors' own bytes."""


@dataclass(frozen=True)
class StepMemory:
    images: int
    """N = B K S, the images one step decodes."""
    mmd_bytes: float
    decoder_bytes: float
    base_bytes: float

    @property
    def tensor_bytes(self) -> float:
        """The step's tensors at their peak (what a CPU step adds to the process)."""
        return self.mmd_bytes + self.decoder_bytes + self.base_bytes

    @property
    def gpu_bytes(self) -> float:
        """GPU memory one trial needs: tensors, allocator overhead, CUDA context."""
        return GPU_SAFETY * self.tensor_bytes + CUDA_OVERHEAD_BYTES

    def describe(self) -> str:
        return (f"{self.gpu_bytes / GIB:.1f} GiB on a GPU (N = B*K*S = {self.images} images "
                f"per step: MMD {self.mmd_bytes / GIB:.1f} GiB, decoder "
                f"{self.decoder_bytes / GIB:.1f} GiB)")


def step_memory(cfg: RunConfig) -> StepMemory:
    """The memory one training step of `cfg` needs (see the module's docstring)."""
    m, b = cfg.model, cfg.train.batch_size
    images = b * m.K * m.num_samples
    mmd = MMD_BLOCKS * 4.0 * images ** 2 if FAMILY_DEFS[cfg.family].holds_mmd else 0.0
    decoder = DECODER_SAVED * 4.0 * images * (686 * m.decoder_width + 2352)
    return StepMemory(images, mmd, decoder, float(BASE_BYTES))


def gpu_share(cfg: RunConfig, gpu_memory_gib: float) -> float:
    """The smallest fraction of one GPU (in steps of 0.05) that holds a trial of `cfg`;
    above 1.0 when no single GPU does."""
    need = step_memory(cfg).gpu_bytes / (gpu_memory_gib * GIB)
    return math.ceil(need * 20 - 1e-9) / 20
