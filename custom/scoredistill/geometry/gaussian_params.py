"""3D Gaussian splatting parameters: their layout and activations (what every other geometry module shares).

Plain functions over tensors; nothing here imports threestudio.

Parameter layout (gsplat's names, Kerbl et al. 2023, "3D Gaussian Splatting", Sec. 4 and 5):

=============  ============  =====================================================================
key            shape         meaning (activation to the rendered quantity)
=============  ============  =====================================================================
``means``      ``[N, 3]``    centres in world coordinates (identity)
``scales``     ``[N, 3]``    log standard deviations along the local axes (``exp``)
``quats``      ``[N, 4]``    rotation quaternions ``(w, x, y, z)`` (normalised to unit length)
``opacities``  ``[N]``       opacity logits (``sigmoid``)
``sh0``        ``[N, 1, 3]`` degree-0 spherical-harmonic colour coefficient (DC)
``shN``        ``[N, K-1, 3]`` higher SH bands, ``K = (degree + 1) ** 2``; ``[N, 0, 3]`` for degree 0
=============  ============  =====================================================================

The SH colour maths is in :mod:`scoredistill.geometry.spherical_harmonics`, the 3DGS PLY file in
:mod:`scoredistill.geometry.gaussian_ply`, the initialisers (points, meshes, Shap-E) in
:mod:`scoredistill.geometry.gaussian_init`.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor

PARAM_KEYS = ("means", "scales", "quats", "opacities", "sh0", "shN")


def inverse_sigmoid(x: Tensor) -> Tensor:
    return torch.log(x / (1 - x))


def activated(params: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Rendered quantities from raw parameters.

    Returns ``means [N,3]``, ``scales [N,3]`` (> 0), ``quats [N,4]`` (unit), ``opacities [N]`` in (0, 1),
    ``colors [N,K,3]`` (SH coefficients, DC first).
    """
    return {
        "means": params["means"],
        "scales": torch.exp(params["scales"]),
        "quats": F.normalize(params["quats"], dim=-1),
        "opacities": torch.sigmoid(params["opacities"]),
        "colors": torch.cat([params["sh0"], params["shN"]], dim=1),
    }
