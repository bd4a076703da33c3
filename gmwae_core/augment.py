"""T(x) of the consistency term: small random shifts and rotations of a batch of images.

    T(x) = x sampled on the grid  R(theta) u + t,   theta ~ U(-a, a), t ~ U(-s, s)^2 pixels,

one (theta, t) per image, bilinear, zero outside the image. Draws come from the trainer's
generator, so a seeded run sees the same T.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["random_shift_rotate"]


def random_shift_rotate(x: torch.Tensor, max_shift: float, max_degrees: float,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """x (B, C, H, W) -> the same images, each shifted by up to `max_shift` pixels along each
    axis and rotated by up to `max_degrees` degrees, drawn uniformly per image."""
    B, _, H, W = x.shape
    u = torch.rand(B, 3, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
    theta = u[:, 0] * math.radians(max_degrees)
    cos, sin = torch.cos(theta), torch.sin(theta)
    # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size.
    tx, ty = u[:, 1] * max_shift * 2 / W, u[:, 2] * max_shift * 2 / H
    affine = torch.stack([torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], 1)
    grid = F.affine_grid(affine, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
