"""The 3DGS PLY file of 3D Gaussians: write, read, and refuse what would break a run.

The PLY layout is the one of the reference 3DGS implementation (Kerbl et al. 2023, "3D Gaussian Splatting"), read
by common splat viewers: ``x y z nx ny nz f_dc_0..2 f_rest_0..(3(K-1)-1) opacity scale_0..2 rot_0..3`` (float32),
with ``f_rest`` channel-major (all of red's bands, then green's, then blue's), opacities as logits and scales as logs
(the stored values are the raw parameters of :mod:`scoredistill.geometry.gaussian_params`, so a round trip is
bit-exact).  Reading refuses, naming the file and the setting it came from, a truncated file, missing properties,
an ``f_rest`` count of no SH degree 0..3, non-finite values and values out of range (:data:`LOG_SCALE_RANGE`,
:data:`MAX_ABS_MEAN`, all-zero rotations).
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

# atomic writes: one mechanism for the pack (scoredistill.atomic_io); the PLY name is kept
from scoredistill.atomic_io import atomic_write as write_ply_atomic
from scoredistill.geometry.spherical_harmonics import num_sh_bases, sh_degree_from_bases


def ply_property_names(sh_degree: int) -> Tuple[str, ...]:
    """Vertex property names of the 3DGS PLY layout for ``sh_degree``."""
    k = num_sh_bases(sh_degree)
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(3 * (k - 1))]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    return tuple(names)


def params_to_ply_array(params: Dict[str, Tensor]) -> np.ndarray:
    """Structured float32 array in the 3DGS PLY layout (``f_rest`` channel-major)."""
    means = params["means"].detach().cpu().float()
    n = means.shape[0]
    k = 1 + params["shN"].shape[1]
    degree = sh_degree_from_bases(k)
    f_rest = params["shN"].detach().cpu().float().transpose(1, 2).reshape(n, 3 * (k - 1))  # [N, 3*(K-1)]
    cols = [
        means,
        torch.zeros(n, 3),
        params["sh0"].detach().cpu().float().reshape(n, 3),
        f_rest,
        params["opacities"].detach().cpu().float().reshape(n, 1),
        params["scales"].detach().cpu().float(),
        params["quats"].detach().cpu().float(),
    ]
    flat = torch.cat(cols, dim=1).numpy()
    names = ply_property_names(degree)
    arr = np.empty(n, dtype=[(name, "<f4") for name in names])
    for i, name in enumerate(names):
        arr[name] = flat[:, i]
    return arr


def save_gaussians_ply(path: str, params: Dict[str, Tensor]) -> str:
    """Write ``params`` as a binary little-endian 3DGS PLY at ``path``, atomically (temp file + rename)."""
    from plyfile import PlyData, PlyElement

    arr = params_to_ply_array(params)
    element = PlyElement.describe(arr, "vertex")
    return write_ply_atomic(path, lambda tmp: PlyData([element], text=False, byte_order="<").write(tmp))


def describe_source(path: str, setting: Optional[str]) -> str:
    """How messages name a file: ``setting = 'path'`` when it came from a config setting, else ``'path'``."""
    return f"{setting} = {path!r}" if setting else repr(path)


def read_ply(path: str, setting: Optional[str] = None):
    """``plyfile.PlyData.read`` with errors that name the file (and the setting it came from)."""
    from plyfile import PlyData

    if not os.path.isfile(path):
        raise ValueError(f"{describe_source(path, setting)}: no such file")
    try:
        return PlyData.read(path)
    except Exception as e:  # plyfile raises PlyParseError, ValueError, struct/numpy errors on a bad file
        raise ValueError(f"{describe_source(path, setting)}: cannot read the PLY (truncated or not a PLY?): {type(e).__name__}: {e}") from e


def check_finite_values(path: str, setting: Optional[str], named: Dict[str, Tensor]) -> None:
    """Refuse NaN / inf in any of the ``named`` tensors read from ``path``, counting them per property."""
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in named.items() if v.numel() and not bool(torch.isfinite(v).all())}
    if bad:
        raise ValueError(
            f"{describe_source(path, setting)}: the PLY holds non-finite (NaN/inf) values: "
            + ", ".join(f"{n} in {k}" for k, n in bad.items())
        )


#: log-scales a 3DGS PLY may hold: ``exp(20)`` ~ 4.9e8 scene units, ``exp(-40)`` ~ 4e-18 (its square is still a normal
#: float32).  Beyond, ``exp`` and the covariance ``R S S^T R^T`` overflow or underflow float32 (log-scale 100 made
#: ``scoredistill mesh`` raise ``OverflowError`` and a PLY ``init_path`` crash mid-training).
LOG_SCALE_RANGE = (-40.0, 20.0)
#: largest ``|x|, |y|, |z|`` of a Gaussian's mean (means near float32's 3.4e38 hung the mesh export in xatlas)
MAX_ABS_MEAN = 1e6


def _check_ranges(path: str, setting: Optional[str], params: Dict[str, Tensor]) -> None:
    """Finite but unusable values, refused naming the file, the property, how many Gaussians and the range."""
    lo, hi = LOG_SCALE_RANGE
    problems = []
    s = params["scales"]
    out = ((s < lo) | (s > hi)).any(dim=1) if s.numel() else torch.zeros(0, dtype=torch.bool)
    if bool(out.any()):
        problems.append(f"scale_* (log-scales) of {int(out.sum())} Gaussians outside [{lo:g}, {hi:g}] "
                        f"(min {float(s.min()):.4g}, max {float(s.max()):.4g})")
    m = params["means"]
    far = (m.abs() > MAX_ABS_MEAN).any(dim=1) if m.numel() else torch.zeros(0, dtype=torch.bool)
    if bool(far.any()):
        problems.append(f"x/y/z of {int(far.sum())} Gaussians beyond +-{MAX_ABS_MEAN:g} (max |x| {float(m.abs().max()):.4g})")
    q = params["quats"]
    zero = (q.norm(dim=1) == 0) if q.numel() else torch.zeros(0, dtype=torch.bool)
    if bool(zero.any()):
        problems.append(f"rot_* of {int(zero.sum())} Gaussians all zero (not a rotation)")
    if problems:
        raise ValueError(f"{describe_source(path, setting)}: the PLY holds values out of range: " + "; ".join(problems))


def _sh_degree_of(path: str, setting: Optional[str], n_rest: int) -> int:
    if n_rest % 3:
        raise ValueError(f"{describe_source(path, setting)}: {n_rest} f_rest_* properties is not a multiple of 3")
    k = 1 + n_rest // 3
    if int(round(k ** 0.5)) ** 2 != k or k > 16:
        raise ValueError(f"{describe_source(path, setting)}: {n_rest} f_rest_* properties ({k} SH coefficients per channel) is "
                         "not an SH degree 0..3 (0, 9, 24 or 45 f_rest values)")
    return sh_degree_from_bases(k)


def ply_sh_degree(path: str, setting: Optional[str] = None) -> int:
    """SH degree of a 3DGS PLY, from its header only (the ``f_rest_*`` property count)."""
    names = []
    try:
        with open(path, "rb") as f:
            for _ in range(10000):
                line = f.readline()
                if not line or line.strip() == b"end_header":
                    break
                parts = line.split()
                if len(parts) >= 3 and parts[0] == b"property":
                    names.append(parts[-1].decode("ascii", "replace"))
    except OSError as e:
        raise ValueError(f"{describe_source(path, setting)}: cannot read the PLY header: {e}") from e
    n_rest = len([p for p in names if p.startswith("f_rest_")])
    return _sh_degree_of(path, setting, n_rest)


def load_gaussians_ply(
    path: str,
    sh_degree: Optional[int] = None,
    drop_sh_bands: bool = False,
    setting: Optional[str] = None,
    sh_setting: str = "sh_degree",
) -> Dict[str, Tensor]:
    """Read a 3DGS PLY into raw parameters (float32, CPU).

    Args:
        path: PLY with the 3DGS vertex properties (extra properties are ignored).
        sh_degree: SH degree of the returned ``shN``; ``None`` = the file's.  Missing bands are zero.
            A file with MORE bands than ``sh_degree`` is refused (the reference 3DGS loader asserts the
            band count) unless ``drop_sh_bands`` is true, which drops the extra bands explicitly.
        drop_sh_bands: accept a file of a higher SH degree and drop its extra bands.
        setting: the config setting ``path`` came from (e.g. ``system.geometry.init_path``), for messages.
        sh_setting: the config setting of ``sh_degree``, for messages.

    Raises:
        ValueError (naming the file and ``setting``): unreadable/truncated PLY, a required property missing,
            an ``f_rest`` count that is not ``3 * (K - 1)`` for an SH degree 0..3, non-finite values, log-scales
            outside :data:`LOG_SCALE_RANGE`, means beyond :data:`MAX_ABS_MEAN`, an all-zero rotation, or more SH bands than
            ``sh_degree`` without ``drop_sh_bands``.
    """
    ply = read_ply(path, setting)
    if "vertex" not in [e.name for e in ply.elements]:
        raise ValueError(f"{describe_source(path, setting)}: not a 3D Gaussian PLY, no vertex element")
    vertex = ply["vertex"]
    names = set(vertex.data.dtype.names)
    required = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"] + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)]
    missing = [p for p in required if p not in names]
    if missing:
        raise ValueError(f"{describe_source(path, setting)}: not a 3D Gaussian PLY, missing vertex properties {missing}")
    n_rest = len([p for p in names if p.startswith("f_rest_")])
    file_degree = _sh_degree_of(path, setting, n_rest)
    degree = file_degree if sh_degree is None else int(sh_degree)
    k = num_sh_bases(degree)
    if file_degree > degree and not drop_sh_bands:
        raise ValueError(
            f"{describe_source(path, setting)}: the PLY has SH degree {file_degree} ({3 * (num_sh_bases(file_degree) - 1)} f_rest "
            f"values per Gaussian) but {sh_setting} is {degree}; set {sh_setting}: {file_degree} to keep its "
            f"view-dependent colour (or drop_sh_bands: true to drop the bands above degree {degree})"
        )

    def col(*props):
        return torch.from_numpy(np.stack([np.asarray(vertex[p], dtype=np.float32) for p in props], axis=1))

    n = len(vertex.data)
    f_rest = col(*[f"f_rest_{i}" for i in range(n_rest)]) if n_rest else torch.zeros(n, 0)
    shN = f_rest.reshape(n, 3, n_rest // 3).transpose(1, 2).contiguous()  # [N, K-1, 3]
    if shN.shape[1] >= k - 1:
        shN = shN[:, : k - 1].contiguous()
    else:
        shN = torch.cat([shN, torch.zeros(n, k - 1 - shN.shape[1], 3)], dim=1)
    out = {
        "means": col("x", "y", "z"),
        "scales": col("scale_0", "scale_1", "scale_2"),
        "quats": col("rot_0", "rot_1", "rot_2", "rot_3"),
        "opacities": col("opacity")[:, 0].contiguous(),
        "sh0": col("f_dc_0", "f_dc_1", "f_dc_2")[:, None, :].contiguous(),
        "shN": shN,
    }
    check_finite_values(path, setting, {
        "x/y/z": out["means"], "scale_*": out["scales"], "rot_*": out["quats"], "opacity": out["opacities"],
        "f_dc_*": out["sh0"], "f_rest_*": out["shN"],
    })
    _check_ranges(path, setting, out)
    return out
