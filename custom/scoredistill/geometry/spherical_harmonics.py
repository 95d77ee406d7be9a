"""Spherical-harmonic colour of 3D Gaussians: band counts, the DC coefficient, the progressive degree schedule.

Colours follow gsplat / 3DGS (Kerbl et al. 2023, "3D Gaussian Splatting", Sec. 4): ``rgb = max(SH(dir) + 0.5, 0)``
with real SH up to degree 3, so a DC coefficient ``c`` renders as ``SH_C0 * c + 0.5`` (:func:`rgb_to_sh0` /
:func:`sh0_to_rgb`); a colour channel holds ``K = (degree + 1) ** 2`` coefficients (:func:`num_sh_bases`).
"""
from __future__ import annotations

import math

from torch import Tensor

#: Y_0^0 = 1 / (2 sqrt(pi))
SH_C0 = 0.28209479177387814


def num_sh_bases(degree: int) -> int:
    """Number of SH coefficients per colour channel for ``degree`` (0..3): ``(degree + 1) ** 2``.

    Raises:
        ValueError: ``degree`` outside 0..3 (gsplat evaluates up to degree 3 on CPU, 4 on CUDA).
    """
    if not 0 <= int(degree) <= 3:
        raise ValueError(f"sh_degree must be in 0..3, got {degree}")
    return (int(degree) + 1) ** 2


def sh_degree_from_bases(k: int) -> int:
    d = int(round(math.sqrt(k))) - 1
    if (d + 1) ** 2 != k:
        raise ValueError(f"{k} SH coefficients per channel is not a square number")
    return d


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    """DC coefficient that renders ``rgb`` (any shape ``[..., 3]``, values in [0, 1])."""
    return (rgb - 0.5) / SH_C0


def sh0_to_rgb(sh0: Tensor) -> Tensor:
    """Colour rendered by a DC coefficient alone (inverse of :func:`rgb_to_sh0`)."""
    return sh0 * SH_C0 + 0.5


def active_sh_degree_at(step: int, max_degree: int, interval: int) -> int:
    """Progressive SH schedule of 3DGS: degree ``min(max_degree, step // interval)``.

    ``interval <= 0`` disables the schedule (the full ``max_degree`` from step 0).
    """
    if interval <= 0:
        return int(max_degree)
    return int(min(max_degree, max(step, 0) // interval))
