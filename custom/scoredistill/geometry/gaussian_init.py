"""3D Gaussian splatting parameters: activations, spherical harmonics, PLY I/O, initialisers.

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

Colours follow gsplat/3DGS: ``rgb = max(SH(dir) + 0.5, 0)``, so a DC coefficient ``c`` renders as
``SH_C0 * c + 0.5`` (:func:`rgb_to_sh0` / :func:`sh0_to_rgb`).

The PLY layout is the one of the reference 3DGS implementation, read by common splat viewers:
``x y z nx ny nz f_dc_0..2 f_rest_0..(3(K-1)-1) opacity scale_0..2 rot_0..3`` (float32), with
``f_rest`` channel-major (all of red's bands, then green's, then blue's), opacities as logits and
scales as logs (the stored values are the raw parameters, so a round trip is bit-exact).
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: Y_0^0 = 1 / (2 sqrt(pi))
SH_C0 = 0.28209479177387814

PARAM_KEYS = ("means", "scales", "quats", "opacities", "sh0", "shN")


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


def inverse_sigmoid(x: Tensor) -> Tensor:
    return torch.log(x / (1 - x))


def active_sh_degree_at(step: int, max_degree: int, interval: int) -> int:
    """Progressive SH schedule of 3DGS: degree ``min(max_degree, step // interval)``.

    ``interval <= 0`` disables the schedule (the full ``max_degree`` from step 0).
    """
    if interval <= 0:
        return int(max_degree)
    return int(min(max_degree, max(step, 0) // interval))


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


def nearest_neighbour_sq_dist(points: Tensor, k: int = 3, chunk: int = 4096) -> Tensor:
    """Mean squared distance to the ``k`` nearest other points, ``[N]`` (3DGS's initial scale).

    Brute force in chunks (``O(N^2)`` time, ``O(chunk * N)`` memory).  Returns ones for N == 1.
    """
    n = points.shape[0]
    if n <= 1:
        return torch.ones(n, dtype=points.dtype, device=points.device)
    k = min(k, n - 1)
    out = []
    for start in range(0, n, chunk):
        block = points[start : start + chunk]
        d2 = torch.cdist(block, points).pow(2)
        idx = torch.arange(start, start + block.shape[0], device=points.device)
        d2[torch.arange(block.shape[0], device=points.device), idx] = float("inf")
        out.append(d2.topk(k, dim=1, largest=False).values.mean(dim=1))
    return torch.cat(out)


def params_from_points(
    points: Tensor,
    colors: Optional[Tensor] = None,
    sh_degree: int = 0,
    init_opacity: float = 0.1,
    init_scale: Optional[float] = None,
    min_scale: float = 1e-7,
) -> Dict[str, Tensor]:
    """Gaussian parameters centred on ``points`` (3DGS initialisation, Kerbl et al. 2023 Sec. 5).

    Args:
        points: ``[N, 3]`` centres.
        colors: ``[N, 3]`` RGB in [0, 1] (default 0.5 grey); become the DC coefficient, higher bands 0.
        sh_degree: maximum SH degree (0..3) -> ``shN`` has ``(sh_degree+1)**2 - 1`` bands.
        init_opacity: opacity in (0, 1) (stored as its logit).
        init_scale: isotropic standard deviation; ``None`` = sqrt of the mean squared distance to the
            3 nearest neighbours (the 3DGS rule).
        min_scale: lower clamp of the nearest-neighbour scale.

    Raises:
        ValueError: bad shapes or ``init_opacity`` outside (0, 1) or ``init_scale <= 0``.
    """
    if points.ndim != 2 or points.shape[1] != 3 or points.shape[0] == 0:
        raise ValueError(f"points must have shape [N>0, 3], got {tuple(points.shape)}")
    if not 0.0 < init_opacity < 1.0:
        raise ValueError(f"init_opacity must be in (0, 1), got {init_opacity}")
    n = points.shape[0]
    points = points.float()
    if colors is None:
        colors = torch.full((n, 3), 0.5, dtype=points.dtype, device=points.device)
    if colors.shape != (n, 3):
        raise ValueError(f"colors must have shape [{n}, 3], got {tuple(colors.shape)}")
    k = num_sh_bases(sh_degree)
    if init_scale is None:
        dist = torch.sqrt(nearest_neighbour_sq_dist(points).clamp_min(min_scale**2))
    else:
        if init_scale <= 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        dist = torch.full((n,), float(init_scale), dtype=points.dtype, device=points.device)
    quats = torch.zeros(n, 4, dtype=points.dtype, device=points.device)
    quats[:, 0] = 1.0
    return {
        "means": points.clone(),
        "scales": torch.log(dist)[:, None].repeat(1, 3),
        "quats": quats,
        "opacities": torch.full((n,), math.log(init_opacity / (1 - init_opacity)), dtype=points.dtype, device=points.device),
        "sh0": rgb_to_sh0(colors.float().clamp(0, 1))[:, None, :],
        "shN": torch.zeros(n, k - 1, 3, dtype=points.dtype, device=points.device),
    }


# ----------------------------------------------------------------------------------------------
# PLY I/O (standard 3DGS layout)


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


# atomic writes: one mechanism for the pack (scoredistill.atomic_io); the PLY names are kept
from scoredistill.atomic_io import _umask, remove_stale_temp_files  # noqa: E402,F401
from scoredistill.atomic_io import atomic_write as write_ply_atomic  # noqa: E402


def save_gaussians_ply(path: str, params: Dict[str, Tensor]) -> str:
    """Write ``params`` as a binary little-endian 3DGS PLY at ``path``, atomically (temp file + rename)."""
    from plyfile import PlyData, PlyElement

    arr = params_to_ply_array(params)
    element = PlyElement.describe(arr, "vertex")
    return write_ply_atomic(path, lambda tmp: PlyData([element], text=False, byte_order="<").write(tmp))


def _where(path: str, setting: Optional[str]) -> str:
    return f"{setting} = {path!r}" if setting else repr(path)


def _read_ply(path: str, setting: Optional[str] = None):
    """``plyfile.PlyData.read`` with errors that name the file (and the setting it came from)."""
    from plyfile import PlyData

    if not os.path.isfile(path):
        raise ValueError(f"{_where(path, setting)}: no such file")
    try:
        return PlyData.read(path)
    except Exception as e:  # plyfile raises PlyParseError, ValueError, struct/numpy errors on a bad file
        raise ValueError(f"{_where(path, setting)}: cannot read the PLY (truncated or not a PLY?): {type(e).__name__}: {e}") from e


def _check_finite(path: str, setting: Optional[str], named: Dict[str, Tensor]) -> None:
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in named.items() if v.numel() and not bool(torch.isfinite(v).all())}
    if bad:
        raise ValueError(
            f"{_where(path, setting)}: the PLY holds non-finite (NaN/inf) values: "
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
        raise ValueError(f"{_where(path, setting)}: the PLY holds values out of range: " + "; ".join(problems))


def _sh_degree_of(path: str, setting: Optional[str], n_rest: int) -> int:
    if n_rest % 3:
        raise ValueError(f"{_where(path, setting)}: {n_rest} f_rest_* properties is not a multiple of 3")
    k = 1 + n_rest // 3
    if int(round(k ** 0.5)) ** 2 != k or k > 16:
        raise ValueError(f"{_where(path, setting)}: {n_rest} f_rest_* properties ({k} SH coefficients per channel) is "
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
        raise ValueError(f"{_where(path, setting)}: cannot read the PLY header: {e}") from e
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
    ply = _read_ply(path, setting)
    if "vertex" not in [e.name for e in ply.elements]:
        raise ValueError(f"{_where(path, setting)}: not a 3D Gaussian PLY, no vertex element")
    vertex = ply["vertex"]
    names = set(vertex.data.dtype.names)
    required = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"] + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)]
    missing = [p for p in required if p not in names]
    if missing:
        raise ValueError(f"{_where(path, setting)}: not a 3D Gaussian PLY, missing vertex properties {missing}")
    n_rest = len([p for p in names if p.startswith("f_rest_")])
    file_degree = _sh_degree_of(path, setting, n_rest)
    degree = file_degree if sh_degree is None else int(sh_degree)
    k = num_sh_bases(degree)
    if file_degree > degree and not drop_sh_bands:
        raise ValueError(
            f"{_where(path, setting)}: the PLY has SH degree {file_degree} ({3 * (num_sh_bases(file_degree) - 1)} f_rest "
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
    _check_finite(path, setting, {
        "x/y/z": out["means"], "scale_*": out["scales"], "rot_*": out["quats"], "opacity": out["opacities"],
        "f_dc_*": out["sh0"], "f_rest_*": out["shN"],
    })
    _check_ranges(path, setting, out)
    return out


# ----------------------------------------------------------------------------------------------
# point sources for initialisation


def _as_unit_colors(c: np.ndarray) -> np.ndarray:
    c = np.asarray(c)
    if c.dtype.kind in "ui" or (c.size and c.max() > 1.0):
        return c.astype(np.float32) / 255.0
    return c.astype(np.float32)


def load_point_cloud(path: str, setting: Optional[str] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Points ``[N, 3]`` and colours ``[N, 3]`` in [0, 1] (or ``None``) from a PLY point cloud.

    Colours are read from ``red/green/blue`` (uchar -> /255, float as is).  A PLY in the 3DGS layout
    gives the colours of its DC coefficients.

    Raises:
        ValueError (naming the file and ``setting``): unreadable PLY, no ``vertex`` element with
            ``x, y, z``, no points, or non-finite values.
    """
    ply = _read_ply(path, setting)
    if "vertex" not in [e.name for e in ply.elements]:
        raise ValueError(f"{_where(path, setting)}: PLY has no vertex element")
    v = ply["vertex"]
    names = v.data.dtype.names
    if not all(p in names for p in ("x", "y", "z")):
        raise ValueError(f"{_where(path, setting)}: PLY vertices have no x, y, z")
    if len(v.data) == 0:
        raise ValueError(f"{_where(path, setting)}: the point cloud has no points")
    pts = torch.from_numpy(np.stack([np.asarray(v[p], dtype=np.float32) for p in "xyz"], 1))
    colors = None
    if all(p in names for p in ("red", "green", "blue")):
        colors = torch.from_numpy(_as_unit_colors(np.stack([np.asarray(v[p]) for p in ("red", "green", "blue")], 1)))
    elif all(p in names for p in ("f_dc_0", "f_dc_1", "f_dc_2")):
        dc = torch.from_numpy(np.stack([np.asarray(v[f"f_dc_{i}"], dtype=np.float32) for i in range(3)], 1))
        colors = sh0_to_rgb(dc).clamp(0, 1)
    _check_finite(path, setting, {"x/y/z": pts, **({"colours": colors} if colors is not None else {})})
    return pts, colors


def load_mesh(path: str) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Vertices ``[V, 3]``, faces ``[F, 3]`` (long) and vertex colours ``[V, 3]`` in [0, 1] or ``None``.

    Reads .obj/.ply/... with trimesh (``process=False`` keeps the vertex order).

    Raises:
        ValueError: the file has no triangle faces.
    """
    import trimesh

    mesh = trimesh.load(path, force="mesh", process=False)
    faces = np.asarray(mesh.faces)
    if faces.ndim != 2 or len(faces) == 0:
        raise ValueError(f"{path}: mesh has no triangle faces")
    verts = torch.from_numpy(np.asarray(mesh.vertices, dtype=np.float32))
    colors = None
    visual = getattr(mesh, "visual", None)
    if visual is not None and getattr(visual, "kind", None) == "vertex":
        vc = np.asarray(visual.vertex_colors)[:, :3]
        colors = torch.from_numpy(_as_unit_colors(vc))
    elif visual is not None and getattr(visual, "kind", None) == "texture":
        try:
            vc = np.asarray(visual.to_color().vertex_colors)[:, :3]
            colors = torch.from_numpy(_as_unit_colors(vc))
        except Exception:  # pragma: no cover - texture sampling is best effort
            colors = None
    return verts, torch.from_numpy(faces.astype(np.int64)), colors


def sample_mesh_surface(
    verts: Tensor,
    faces: Tensor,
    n: int,
    vertex_colors: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """``n`` points uniformly distributed over the triangle surface (area-weighted face choice,
    uniform barycentric coordinates), with barycentrically interpolated vertex colours.

    Returns ``points [n, 3]`` and ``colors [n, 3]`` (``None`` without ``vertex_colors``).

    Raises:
        ValueError: ``n < 1`` or the mesh has zero total area.
    """
    if n < 1:
        raise ValueError(f"number of points must be >= 1, got {n}")
    verts = verts.float()
    tri = verts[faces]  # [F, 3, 3]
    area = 0.5 * torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1).norm(dim=-1)
    if not float(area.sum()) > 0:
        raise ValueError("mesh has zero surface area")
    face_idx = torch.multinomial(area / area.sum(), n, replacement=True, generator=generator)
    u = torch.rand(n, generator=generator)
    v = torch.rand(n, generator=generator)
    flip = (u + v) > 1
    u = torch.where(flip, 1 - u, u)
    v = torch.where(flip, 1 - v, v)
    w = torch.stack([1 - u - v, u, v], dim=1)  # [n, 3] barycentric
    points = (tri[face_idx] * w[:, :, None]).sum(1)
    colors = None
    if vertex_colors is not None:
        colors = (vertex_colors.float()[faces[face_idx]] * w[:, :, None]).sum(1)
    return points, colors


def sample_sphere(n: int, radius: float, surface: bool = False, generator: Optional[torch.Generator] = None) -> Tensor:
    """``n`` points uniform in the ball of ``radius`` (or on its surface when ``surface``)."""
    if n < 1 or radius <= 0:
        raise ValueError(f"sphere initialisation needs num_points >= 1 and radius > 0, got {n}, {radius}")
    d = F.normalize(torch.randn(n, 3, generator=generator), dim=-1)
    if surface:
        return d * radius
    r = torch.rand(n, 1, generator=generator) ** (1.0 / 3.0)
    return d * r * radius


def sample_box(n: int, half_extent: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """``n`` points uniform in the axis-aligned cube ``[-half_extent, half_extent]^3``."""
    if n < 1 or half_extent <= 0:
        raise ValueError(f"box initialisation needs num_points >= 1 and radius > 0, got {n}, {half_extent}")
    return (torch.rand(n, 3, generator=generator) * 2 - 1) * half_extent


def upsample_points(
    points: Tensor,
    colors: Optional[Tensor],
    n_total: int,
    jitter: float,
    color_jitter: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Grow a sparse cloud to ``n_total`` points (the papers' 4k Shap-E/Point-E points -> 50k-100k).

    Keeps the original points and adds ``n_total - N`` points, each a randomly chosen original point
    plus isotropic Gaussian noise of std ``jitter``; its colour is the parent's plus Gaussian noise of
    std ``color_jitter``, clamped to [0, 1] (the noise-growing of GaussianDreamer, used through it by
    LODS-GS; DreamMapping upsamples Shap-E to ~50k).  ``n_total <= N`` returns the input unchanged.
    """
    n = points.shape[0]
    if n_total <= n:
        return points, colors
    m = n_total - n
    parent = torch.randint(0, n, (m,), generator=generator)
    new = points[parent] + torch.randn(m, 3, generator=generator) * jitter
    out_c = None
    if colors is not None:
        new_c = colors[parent] + torch.randn(m, 3, generator=generator) * color_jitter
        out_c = torch.cat([colors, new_c.clamp(0, 1)])
    return torch.cat([points, new]), out_c


def shap_e_mesh_to_points(
    verts: Tensor,
    faces: Tensor,
    vertex_channels: Optional[Dict[str, Tensor]],
    n_points: int,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Surface samples of a diffusers ``ShapEPipeline(output_type="mesh")`` output.

    Args:
        verts, faces: ``MeshDecoderOutput.verts [V, 3]``, ``.faces [F, 3]``.
        vertex_channels: ``MeshDecoderOutput.vertex_channels`` = ``{"R": [V], "G": [V], "B": [V]}``
            in [0, 1] (or ``None``).
        n_points: number of surface samples.
    """
    colors = None
    if vertex_channels:
        colors = torch.stack([vertex_channels[c].float().cpu() for c in ("R", "G", "B")], dim=1).clamp(0, 1)
    return sample_mesh_surface(verts.float().cpu(), faces.long().cpu(), n_points, colors, generator=generator)


def run_shap_e(
    prompt: str,
    pretrained_model_name_or_path: str = "openai/shap-e",
    guidance_scale: float = 15.0,
    num_inference_steps: int = 64,
    frame_size: int = 256,
    device: str = "cuda",
    seed: int = 0,
):
    """Generate a coloured mesh for ``prompt`` with diffusers' ``ShapEPipeline`` (downloads the weights).

    Returns ``(verts, faces, vertex_channels)`` of the first ``MeshDecoderOutput``.
    """
    from diffusers import ShapEPipeline

    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    pipe = ShapEPipeline.from_pretrained(pretrained_model_name_or_path, torch_dtype=dtype).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = pipe(
        prompt,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        frame_size=frame_size,
        output_type="mesh",
        generator=generator,
    )
    mesh = out.images[0]
    result = (mesh.verts.detach().float().cpu(), mesh.faces.detach().long().cpu(),
              {k: v.detach().float().cpu() for k, v in (mesh.vertex_channels or {}).items()})
    del pipe
    return result


def apply_init_transform(points: Tensor, scale: float = 1.0, rotation_deg_z: float = 0.0, swap_yz: bool = False, offset=(0.0, 0.0, 0.0)) -> Tensor:
    """Place an initial cloud in threestudio's frame (z up): optional y/z swap (y-up sources, mapping
    ``(x, y, z) -> (x, -z, y)``), rotation about +z, uniform scale, then offset."""
    p = points
    if swap_yz:
        p = torch.stack([p[:, 0], -p[:, 2], p[:, 1]], dim=1)
    if rotation_deg_z:
        a = math.radians(rotation_deg_z)
        c, s = math.cos(a), math.sin(a)
        rot = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=p.dtype)
        p = p @ rot.T
    return p * scale + torch.tensor(offset, dtype=p.dtype)
