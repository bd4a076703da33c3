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

The two multipliers were measured on a CPU, as the peak resident memory of one step
minus the memory before it (benchmarks/step_memory.py: measured / estimated over widths
8 to 128, N from 1,600 to 19,200, both families; docs/results.md).

A GPU holds the same terms with multipliers of its own: the fused MMD kernel and cuDNN
keep other intermediates than the CPU's eager code, and the caching allocator reserves in
blocks. The GPU_* constants are fitted by least squares to the reserved memory of steps
measured on a GPU (benchmarks/memory_fit.py on the record of benchmarks/gpu_check.py;
docs/results.md shows the fit and every row's ratio); the CUDA context and cuDNN
workspaces, which the allocator does not count, come on top (CUDA_OVERHEAD_BYTES).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import RunConfig
from .families import FAMILY_DEFS

__all__ = ["StepMemory", "step_memory", "gpu_share", "MMD_BLOCKS", "DECODER_SAVED", "GIB",
           "GPU_MMD_BLOCKS", "GPU_DECODER_SAVED", "GPU_BASE_BYTES", "CUDA_OVERHEAD_BYTES"]

GIB = 1024 ** 3
MMD_BLOCKS = 10.0
"""Live (N x N) float32 blocks of the MMD at the step's peak (measured: 9.8)."""
DECODER_SAVED = 1.75
"""Decoder activations held at the peak, in forward passes' worth (measured: 1.72)."""
BASE_BYTES = 64 * 1024 ** 2
"""Weights, optimiser state, a batch and the encoders' activations (the step's other
allocations, measured within this at every configuration of the benchmark)."""
GPU_MMD_BLOCKS = 8.1
"""On a GPU: the MMD's (N x N) float32 blocks in the allocator's reserve at the peak."""
GPU_DECODER_SAVED = 1.64
"""On a GPU: the decoder's activations in the reserve, in forward passes' worth."""
GPU_BASE_BYTES = 96 * 1024 ** 2
"""On a GPU: the reserve's part that does not grow with N (weights, optimiser, a batch)."""
CUDA_OVERHEAD_BYTES = 768 * 1024 ** 2
"""CUDA context and cuDNN workspaces of a process on a GPU (outside the allocator)."""


@dataclass(frozen=True)
class StepMemory:
    images: int
    """N = B K S, the images one step decodes."""
    mmd_bytes: float
    decoder_bytes: float
    base_bytes: float
    gpu_reserved_bytes: float
    """What the CUDA caching allocator reserves for a trial at the step's peak."""

    @property
    def tensor_bytes(self) -> float:
        """The step's tensors at their peak (what a CPU step adds to the process)."""
        return self.mmd_bytes + self.decoder_bytes + self.base_bytes

    @property
    def gpu_bytes(self) -> float:
        """GPU memory one trial needs: the allocator's reserve and the CUDA context."""
        return self.gpu_reserved_bytes + CUDA_OVERHEAD_BYTES

    def describe(self) -> str:
        mmd = self.mmd_bytes / MMD_BLOCKS * GPU_MMD_BLOCKS
        decoder = self.decoder_bytes / DECODER_SAVED * GPU_DECODER_SAVED
        return (f"{self.gpu_bytes / GIB:.1f} GiB on a GPU (N = B*K*S = {self.images} images "
                f"per step: MMD {mmd / GIB:.1f} GiB, decoder {decoder / GIB:.1f} GiB)")


def step_memory(cfg: RunConfig) -> StepMemory:
    """The memory one training step of `cfg` needs (see the module's docstring)."""
    m, b = cfg.model, cfg.train.batch_size
    images = b * m.K * m.num_samples
    block = 4.0 * images ** 2 if FAMILY_DEFS[cfg.family].holds_mmd else 0.0
    decoder_pass = 4.0 * images * (686 * m.decoder_width + 2352)
    reserved = GPU_MMD_BLOCKS * block + GPU_DECODER_SAVED * decoder_pass + GPU_BASE_BYTES
    return StepMemory(images, MMD_BLOCKS * block, DECODER_SAVED * decoder_pass,
                      float(BASE_BYTES), reserved)


def gpu_share(cfg: RunConfig, gpu_memory_gib: float) -> float:
    """The smallest fraction of one GPU (in steps of 0.05) that holds a trial of `cfg`;
    above 1.0 when no single GPU does."""
    need = step_memory(cfg).gpu_bytes / (gpu_memory_gib * GIB)
    return math.ceil(need * 20 - 1e-9) / 20
