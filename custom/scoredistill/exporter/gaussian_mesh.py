"""Textured triangle meshes from 3D Gaussians: density grid -> marching cubes -> cleanup -> UV atlas -> texture.

Plain functions over tensors / arrays; nothing here imports threestudio (the adapter is
:mod:`scoredistill.exporter.gaussian_mesh_exporter`, exporter ``gsplat-mesh-exporter``).

Pipeline (:func:`gaussians_to_mesh`):

1. **Density** (:func:`density_grid`). The opacity-weighted Gaussian density of DreamGaussian
   (Tang et al. 2023, Sec. 3.3, "Efficient mesh extraction") and threestudio-3dgs,

   ``D(x) = sum_i o_i exp(-1/2 (x - mu_i)^T Sigma_i^{-1} (x - mu_i))``,  ``Sigma_i = R_i S_i S_i^T R_i^T``

   (3DGS covariance, Kerbl et al. 2023 Eq. 6, gsplat's ``quat_scale_to_covar_preci``), on a regular grid of
   isotropic voxels.  Each Gaussian is truncated at Mahalanobis radius ``cutoff_sigma`` and splatted only into
   the voxels of its ellipsoid's bounding box, in chunks of at most ``chunk_size`` (Gaussian, voxel) pairs, so
   memory is the grid (``4 * voxels`` bytes) plus one chunk, on CPU and CUDA alike.
2. **Surface** (:func:`extract_isosurface`): optional interior fill (voxels enclosed by the dense shell, e.g. the
   inside of a hollow surface of Gaussians, are set above the level, so only the outer surface remains), then
   marching cubes at ``level`` (PyMCubes, as threestudio), back to world coordinates.
3. **Cleanup** (:func:`clean_mesh`, trimesh): merge vertices, drop degenerate faces and small components, outward
   normals, optional Taubin smoothing, optional quadric decimation (fast-simplification through trimesh).
4. **UV atlas** (:func:`uv_unwrap`, xatlas) and **texture** (:func:`bake_texture`): every texel is rasterized in
   UV space (pure torch, no nvdiffrast) to a surface point; its colour is the opacity-weighted mean of the
   Gaussian colours there (:func:`gaussian_colors_at`): ``c(x) = sum_i w_i(x) c_i / sum_i w_i(x)`` with the
   density weights ``w_i`` above, over the ``color_knn`` nearest Gaussians; ``c_i`` is the view-independent DC
   colour ``max(SH_C0 * sh0 + 0.5, 0)`` (default) or the full SH evaluated for a camera looking at the surface
   along its normal (``color_mode="normal_sh"``, direction ``-n``, gsplat's convention ``dir = mean - camera``).
   Empty texels take the colour of the nearest covered texel (no seams under bilinear filtering).

The mesh is computed in the Gaussians' (threestudio's, z-up) world frame; the files (:func:`write_mesh_files`):
OBJ + MTL + PNG, GLB (texture embedded), optional vertex-coloured PLY, and ``<name>.json`` (the mesh's checks:
watertight, components, surface offset, timings), all with vertex normals and by default **+Y up** (the glTF
2.0 spec, Sec. 3.4 "Coordinate System and Units"): ``(x, y, z)_threestudio -> (x, z, -y)``, the conversion
Blender's glTF exporter applies, so Blender's importer gives back the z-up frame.  ``up_axis="z"`` keeps
threestudio's frame in every file.  The files are replaced as a set: written into a hidden sibling folder
first, then swapped in (a full disk leaves the previous set untouched, never a mix of old and new files).

Also: :func:`chamfer_distance` / :func:`mesh_chamfer_distance` (symmetric Chamfer distance, used by the tests and
the ground-truth benchmark).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from scoredistill.atomic_io import atomic_write_bytes as _atomic_write_bytes
from scoredistill.geometry.spherical_harmonics import SH_C0, sh_degree_from_bases
from scoredistill.settings import check_range, in_range, is_number

COLOR_MODES = ("dc", "normal_sh")
FORMATS = ("obj", "glb", "ply")
UP_AXES = ("y", "z")
#: every extension of the file set ``<name>.<ext>`` (replaced together; a format not written this time is removed)
SET_EXTENSIONS = ("obj", "mtl", "png", "glb", "ply", "json")
#: visible Gaussians must have |mean| <= MAX_ABS_MEAN and std in [MIN_STD, MAX_STD] (world units): beyond these the
#: float32 grid, marching cubes and xatlas overflow or run for hours (issue 24: log-scale 100, means at 3e38)
MAX_ABS_MEAN = 1e5
MIN_STD, MAX_STD = 1e-12, 1e4


class MeshExportError(ValueError):
    """The Gaussians cannot be meshed with the given settings (empty / transparent model, grid too small)."""


# ----------------------------------------------------------------------------------------------- settings
@dataclass
class MeshSettings:
    """Settings of the Gaussian -> mesh export: the one definition of the ``gsplat-mesh-exporter`` config keys (its
    ``Config`` derives from this class) and of the ``scoredistill mesh`` defaults.

    ``bounds`` and ``isosurface_threshold`` take several forms (typed ``Any``: OmegaConf, which builds the
    exporter's config, has no ``Union`` of a text and a list); :meth:`check` validates them.
    """

    #: voxels along the longest side of the bounds (other sides: same voxel size)
    resolution: int = 256
    #: "auto" (support of the visible Gaussians), a radius r (cube [-r, r]^3), or [[xmin,ymin,zmin],[xmax,ymax,zmax]]
    bounds: Any = "auto"
    #: explicit bounds crop the scene (surface closed on the boundary) instead of raising when they cut it
    crop_to_bounds: bool = False
    #: iso-level of the opacity-weighted density: "auto" = auto_level_ratio x the median density at the visible
    #: Gaussians' centres (the surface sits at the Gaussians whether they are sparse or dense), or a number
    #: (a lone Gaussian of opacity o reaches o at its centre; DreamGaussian: 1)
    isosurface_threshold: Any = "auto"
    #: with isosurface_threshold "auto": the level as a fraction of the median density at the centres
    auto_level_ratio: float = 0.25
    #: Gaussians below this opacity are ignored (DreamGaussian: 0.005)
    min_opacity: float = 0.005
    #: truncation of every Gaussian at this Mahalanobis radius
    cutoff_sigma: float = 3.0
    #: (Gaussian, voxel) pairs evaluated at once; bounds the extra memory (~100 bytes a pair, from a measured peak)
    chunk_size: int = 4_194_304
    #: fill voxels enclosed by the surface so hollow shells of Gaussians give one outer surface
    fill_interior: bool = True
    #: the interior fill also closes the shell at fill_threshold_ratio x level, so a shell whose density dips just
    #: under the level (a gap) still encloses its cavity (no hidden inner shell)
    fill_threshold_ratio: float = 0.5
    #: each Gaussian is evaluated on the coarsest grid (voxel x 2^l) where its smallest std still spans this many
    #: voxels, then the grids are summed by trilinear upsampling (error < 1% of the level); 0 = every Gaussian on
    #: the full grid (exact, slow for large Gaussians)
    density_min_sigma_voxels: float = 1.5
    #: drop connected components with fewer faces than this fraction of the largest one
    min_component_fraction: float = 0.05
    #: Taubin smoothing iterations after marching cubes (0 = off)
    smooth_iterations: int = 0
    #: quadric decimation to at most this many faces (0 = off)
    decimate_target: int = 30_000
    #: texture width = height in texels
    texture_size: int = 1024
    #: "dc" (view independent, SH degree 0) | "normal_sh" (full SH seen along the surface normal)
    color_mode: str = "dc"
    #: Gaussians (nearest centres) averaged per surface point
    color_knn: int = 16
    #: xatlas chart padding in texels
    uv_padding: int = 2
    #: files to write: any of obj (OBJ + MTL + PNG), glb, ply (vertex colours); <name>.json is always written
    formats: List[str] = field(default_factory=lambda: ["obj", "glb"])
    #: up axis of the written files: "y" (glTF's, (x, y, z) -> (x, z, -y)) or "z" (threestudio's frame, unchanged)
    up_axis: str = "y"

    def check(self, prefix: str = "") -> "MeshSettings":
        """Raise ``ValueError`` naming ``prefix + key`` and its allowed range for a bad value; returns self."""

        def bad(key, allowed, value):
            raise ValueError(f"{prefix}{key} must be {allowed}, got {value!r}")

        def num(key, *allowed, **kw):
            check_range(getattr(self, key), prefix + key, *allowed, **kw)

        num("resolution", 8, 2048, integer=True)
        self.bounds = _parse_bounds(self.bounds, prefix + "bounds")
        if self.isosurface_threshold != "auto" and not in_range(self.isosurface_threshold, 0, open_low=True):
            bad("isosurface_threshold", "'auto' or a finite number > 0", self.isosurface_threshold)
        num("auto_level_ratio", 0, 1, open_low=True, open_high=True)
        num("fill_threshold_ratio", 0, 1, open_low=True)
        num("density_min_sigma_voxels", 0, 16, note=" (0 = exact)")
        if self.up_axis not in UP_AXES:
            bad("up_axis", f"one of {UP_AXES}", self.up_axis)
        num("min_opacity", 0, 1, open_high=True)
        num("cutoff_sigma", 1, 10)
        num("chunk_size", 4096, integer=True)
        num("min_component_fraction", 0, 1)
        num("smooth_iterations", 0, integer=True)
        if not (in_range(self.decimate_target, 4, integer=True) or in_range(self.decimate_target, 0, 0, integer=True)):
            bad("decimate_target", "0 (off) or an integer >= 4", self.decimate_target)
        num("texture_size", 16, 8192, integer=True)
        if self.color_mode not in COLOR_MODES:
            bad("color_mode", f"one of {COLOR_MODES}", self.color_mode)
        num("color_knn", 1, 256, integer=True)
        num("uv_padding", 0, 64, integer=True)
        formats = [self.formats] if isinstance(self.formats, str) else list(self.formats)
        if not formats or any(f not in FORMATS for f in formats):
            bad("formats", f"a non-empty list of {FORMATS}", self.formats)
        self.formats = formats
        return self

    @classmethod
    def from_dict(cls, d: Dict, prefix: str = "") -> "MeshSettings":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(prefix + k for k in unknown)}; known: {sorted(names)}")
        return cls(**d).check(prefix)


def _parse_bounds(bounds, name: str):
    if isinstance(bounds, str):
        if bounds != "auto":
            raise ValueError(f"{name} must be 'auto', a radius > 0 or [[xmin,ymin,zmin],[xmax,ymax,zmax]], got {bounds!r}")
        return bounds
    if is_number(bounds):
        return float(check_range(bounds, f"{name} as a radius", 0, open_low=True))
    try:
        arr = np.asarray([[float(v) for v in row] for row in bounds], dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (2, 3) or not np.isfinite(arr).all() or not (arr[1] > arr[0]).all():
        raise ValueError(f"{name} must be 'auto', a radius > 0 or [[xmin,ymin,zmin],[xmax,ymax,zmax]] with max > min, got {bounds!r}")
    return arr.tolist()


# ----------------------------------------------------------------------------------------------- Gaussians
@dataclass
class GaussianField:
    """Activated Gaussians used by the mesher (visible ones only): means, precision matrices, opacities, SH."""

    means: Tensor  # [N, 3]
    precisions: Tensor  # [N, 3, 3] = Sigma^{-1}
    extents: Tensor  # [N, 3] half side of the bounding box of the cutoff ellipsoid (cutoff * sqrt(Sigma_jj))
    opacities: Tensor  # [N]
    sh: Tensor  # [N, K, 3] (DC first)
    cutoff_sigma: float
    min_std: Optional[Tensor] = None  # [N] smallest std of each Gaussian (picks its grid level in density_grid)

    @property
    def num(self) -> int:
        return int(self.means.shape[0])


def gaussian_field(params: Dict[str, Tensor], min_opacity: float = 0.005, cutoff_sigma: float = 3.0, device=None,
                   source: str = "the model") -> GaussianField:
    """Activate raw parameters (``means, scales`` log std, ``quats`` wxyz, ``opacities`` logits, ``sh0, shN``) and keep
    the Gaussians with opacity >= ``min_opacity`` (non-finite ones are dropped).

    Raises:
        MeshExportError: no Gaussians, every Gaussian below ``min_opacity``, or a visible Gaussian out of range
        (``|mean| > MAX_ABS_MEAN`` or std outside ``[MIN_STD, MAX_STD]``: the grid, marching cubes and xatlas
        would overflow or hang); ``source`` (e.g. the PLY's path) names the input in the message.
    """
    from gsplat.cuda._torch_impl import _quat_scale_to_covar_preci  # same covariance as the renderer

    device = device if device is not None else params["means"].device
    n = int(params["means"].shape[0])
    if n == 0:
        raise MeshExportError("the model has no Gaussians: nothing to mesh")
    p = {k: v.detach().to(device=device, dtype=torch.float32) for k, v in params.items()}
    finite = torch.ones(n, dtype=torch.bool, device=device)
    for k in ("means", "scales", "quats", "opacities", "sh0", "shN"):
        finite &= torch.isfinite(p[k].reshape(n, -1)).all(dim=1) if p[k].numel() else finite
    opac = torch.sigmoid(p["opacities"].reshape(n))
    keep = finite & (opac >= min_opacity)
    if not bool(keep.any()):
        raise MeshExportError(
            f"the model is fully transparent: all {n} Gaussians have opacity < min_opacity={min_opacity} "
            f"(max opacity {float(opac[finite].max()) if bool(finite.any()) else float('nan'):.3g}); nothing to mesh"
        )
    idx = torch.nonzero(keep).squeeze(1)
    means = p["means"][keep]
    far = means.abs().amax(1) > MAX_ABS_MEAN
    if bool(far.any()):
        i = int(far.nonzero()[0, 0])
        raise MeshExportError(
            f"{source}: {int(far.sum())} visible Gaussian(s) have a mean beyond +-{MAX_ABS_MEAN:g} (e.g. Gaussian "
            f"{int(idx[i])} at {[float(f'{v:.4g}') for v in means[i].tolist()]}); the mesher accepts |mean| <= "
            f"{MAX_ABS_MEAN:g} per axis: remove or rescale them, or raise min_opacity to drop them"
        )
    log_s = p["scales"][keep]
    lo_bad, hi_bad = log_s.amin(1) < math.log(MIN_STD), log_s.amax(1) > math.log(MAX_STD)
    if bool((lo_bad | hi_bad).any()):
        i = int((lo_bad | hi_bad).nonzero()[0, 0])
        raise MeshExportError(
            f"{source}: {int((lo_bad | hi_bad).sum())} visible Gaussian(s) have a std outside [{MIN_STD:g}, {MAX_STD:g}] "
            f"(e.g. Gaussian {int(idx[i])} with log-scales {[float(f'{v:.4g}') for v in log_s[i].tolist()]}, i.e. "
            f"log-scale outside [{math.log(MIN_STD):.2f}, {math.log(MAX_STD):.2f}]); the mesher accepts stds in that range"
        )
    scales = torch.exp(log_s)
    quats = F.normalize(p["quats"][keep], dim=-1)
    covars, precis = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=True, triu=False)
    ext = cutoff_sigma * torch.sqrt(torch.diagonal(covars, dim1=-2, dim2=-1).clamp_min(0))
    sh = torch.cat([p["sh0"][keep], p["shN"][keep]], dim=1)
    return GaussianField(means, precis, ext, opac[keep], sh, float(cutoff_sigma), scales.amin(1))


def density_at(points: Tensor, gf: GaussianField) -> Tensor:
    """Brute-force truncated density ``D(x)`` at ``points [P, 3]`` (reference for tests; O(P N) memory)."""
    d = points[:, None, :] - gf.means[None]  # [P, N, 3]
    m2 = torch.einsum("pni,nij,pnj->pn", d, gf.precisions, d)
    w = gf.opacities[None] * torch.exp(-0.5 * m2) * (m2 <= gf.cutoff_sigma**2)
    return w.sum(1)


def _no_bar(progress: Optional[bool]) -> Optional[bool]:
    """tqdm's ``disable`` for ``progress``: True -> shown, False -> hidden, None -> shown on a terminal only."""
    return None if progress is None else not progress


# ----------------------------------------------------------------------------------------------- grid
@dataclass
class Grid:
    """Regular grid: node ``(i, j, k)`` sits at ``origin + voxel * (i, j, k)``; ``dims`` nodes per axis."""

    origin: np.ndarray  # [3]
    voxel: float
    dims: Tuple[int, int, int]

    def node_positions(self, idx: Tensor) -> Tensor:
        return torch.as_tensor(self.origin, dtype=torch.float32, device=idx.device) + self.voxel * idx.float()


def make_grid(gf: GaussianField, bounds, resolution: int, margin_voxels: int = 2) -> Grid:
    """Grid over ``bounds`` ("auto": the union of the visible Gaussians' cutoff boxes plus ``margin_voxels``;
    a radius r: ``[-r, r]^3``; or explicit ``[[lo], [hi]]``) with ``resolution`` nodes along its longest side."""
    if bounds == "auto":
        lo = (gf.means - gf.extents).amin(0).double().cpu().numpy()
        hi = (gf.means + gf.extents).amax(0).double().cpu().numpy()
        span = float((hi - lo).max())
        if not span > 0:
            span = 1e-3
        voxel = span / (resolution - 1 - 2 * margin_voxels)
        lo = lo - margin_voxels * voxel
        hi = hi + margin_voxels * voxel
    else:
        if isinstance(bounds, float):
            lo, hi = np.full(3, -bounds), np.full(3, bounds)
        else:
            lo, hi = np.asarray(bounds[0], dtype=np.float64), np.asarray(bounds[1], dtype=np.float64)
        voxel = float((hi - lo).max()) / (resolution - 1)
    if bounds == "auto":  # cover the support
        dims = tuple(int(max(2, math.ceil((hi[a] - lo[a]) / voxel - 1e-9) + 1)) for a in range(3))
    else:  # stay inside the given bounds (the longest side has exactly `resolution` nodes)
        dims = tuple(int(max(2, math.floor((hi[a] - lo[a]) / voxel + 1e-6) + 1)) for a in range(3))
    return Grid(np.asarray(lo, dtype=np.float64), float(voxel), dims)


def density_grid(gf: GaussianField, grid: Grid, chunk_size: int = 4_194_304, values: Optional[Tensor] = None,
                 min_sigma_voxels: float = 0.0, progress: Optional[bool] = None) -> Tensor:
    """Truncated density ``D`` at every node of ``grid``, shape ``grid.dims`` (float32, on ``gf``'s device).

    Every Gaussian adds ``o exp(-m^2/2)`` (``m`` its Mahalanobis distance, ``m <= cutoff_sigma``) to the nodes
    of its cutoff ellipsoid's bounding box.  Gaussians are grouped by box size and processed in chunks of at
    most ``chunk_size`` (Gaussian, node) pairs; a box larger than a chunk is split into slabs.
    ``values [N, C]``: also accumulate ``sum_i w_i values_i`` (returned as ``[C+1, *dims]``, density first).

    ``min_sigma_voxels > 0`` (tiled over scales): a Gaussian whose smallest std spans at least
    ``2^l * min_sigma_voxels`` voxels is evaluated on the grid ``l`` levels coarser (voxel ``2^l * voxel``, same
    origin), and the levels are summed from the coarsest by 2x cubic upsampling (:func:`upsample2x_cubic`; coarse
    nodes are fine nodes).  The work per Gaussian is then bounded by ``(2 cutoff 2 min_sigma_voxels)^3``
    nodes whatever its size; the interpolation error of a Gaussian sampled every ``sigma / k`` is at most
    ``~1 / (8 k^2)`` of its peak near the centre and far less at the level set (k = 2: < 1% of the level).
    ``0``: every Gaussian on the full grid (exact).  ``progress``: a tqdm bar over the (Gaussian, node) pairs
    (``None``: only on a terminal).
    """
    from tqdm.auto import tqdm

    dev = gf.means.device
    nch = 1 + (0 if values is None else values.shape[1])
    n = gf.num
    level = torch.zeros(n, dtype=torch.long, device=dev)
    if min_sigma_voxels > 0 and gf.min_std is not None:
        ratio = gf.min_std / (min_sigma_voxels * grid.voxel)
        level = torch.floor(torch.log2(ratio.clamp_min(1.0))).long().clamp(0, 12)
    # coarsest level worth a grid: at least 2 nodes a side
    top = int(level.max()) if n else 0
    while top > 0 and max(grid.dims) - 1 < 2**top:
        top -= 1
    level = level.clamp_max(top)
    grids = []
    for lv in range(top + 1):
        f = 2**lv
        dims = tuple(int(math.ceil((d - 1) / f)) + 1 for d in grid.dims)
        grids.append(Grid(grid.origin, grid.voxel * f, dims))
    plans = [_splat_plan(gf, grids[lv], torch.nonzero(level == lv).squeeze(1)) for lv in range(top + 1)]
    total = sum(p["pairs"] for p in plans)
    bar = tqdm(total=total, desc="density grid", unit="pair", unit_scale=True, disable=_no_bar(progress),
               leave=False, mininterval=0.5)
    out = None
    with bar:
        for lv in range(top, -1, -1):
            g = grids[lv]
            if out is None:
                out = torch.zeros((nch, int(np.prod(g.dims))), dtype=torch.float32, device=dev)
            else:  # upsample the coarser sum onto this level's nodes (node 2i of this level = node i of the coarser)
                prev = grids[lv + 1]
                up = upsample2x_cubic(out.reshape(nch, *prev.dims))
                out = up[:, : g.dims[0], : g.dims[1], : g.dims[2]].reshape(nch, -1).contiguous()
                del up
            _splat_level(out, gf, g, plans[lv], chunk_size, values, bar)
    out = out.reshape(nch, *grid.dims)
    return out[0] if values is None else out


def upsample2x_cubic(x: Tensor) -> Tensor:
    """Dyadic upsampling of ``x [C, n0, n1, n2]`` to ``[C, 2 n0 - 1, 2 n1 - 1, 2 n2 - 1]``: node ``2i`` keeps ``x[i]``,
    node ``2i + 1`` is the 4-point cubic (Catmull-Rom) midpoint ``(-x[i-1] + 9 x[i] + 9 x[i+1] - x[i+2]) / 16``,
    linear next to the border; separable, one axis at a time (error O(h^4) against O(h^2) for trilinear)."""
    for dim in (1, 2, 3):
        y = x.movedim(dim, 0)
        n = y.shape[0]
        if n < 2:
            continue
        mid = 0.5 * (y[:-1] + y[1:])
        if n >= 4:
            mid[1:-1] = (9.0 * (y[1:-2] + y[2:-1]) - (y[:-3] + y[3:])) / 16.0
        z = torch.empty((2 * n - 1,) + tuple(y.shape[1:]), dtype=y.dtype, device=y.device)
        z[0::2] = y
        z[1::2] = mid
        x = z.movedim(0, dim)
    return x


def _splat_plan(gf: GaussianField, grid: Grid, ids: Tensor) -> Dict:
    """Boxes of the Gaussians ``ids`` on ``grid``: first node ``i0``, ``side`` per axis, and the pairs to evaluate."""
    dev = gf.means.device
    dims = torch.tensor(grid.dims, device=dev)
    origin = torch.as_tensor(grid.origin, dtype=torch.float32, device=dev)
    means, ext = gf.means[ids], gf.extents[ids]
    i0 = torch.ceil((means - ext - origin) / grid.voxel).long().clamp_min(0)
    i1 = torch.minimum(torch.floor((means + ext - origin) / grid.voxel).long(), dims - 1)
    side = i1 - i0 + 1
    inside = (side > 0).all(1)
    ids, i0, side = ids[inside], i0[inside], side[inside]
    s = side.amax(1)
    order = torch.argsort(s)
    return {"ids": ids[order], "i0": i0[order], "side": side[order], "s": s[order], "pairs": int((s.double() ** 3).sum())}


def _splat_level(out: Tensor, gf: GaussianField, grid: Grid, plan: Dict, chunk_size: int, values, bar) -> None:
    """Add the Gaussians of ``plan`` to ``out [C, nodes of grid]`` (grouped by box side, chunked)."""
    ids_all = plan["ids"]
    if ids_all.numel() == 0:
        return
    dev = out.device
    c2 = gf.cutoff_sigma**2
    origin = torch.as_tensor(grid.origin, dtype=torch.float32, device=dev)
    dy, dz = grid.dims[1], grid.dims[2]
    i0, side = plan["i0"], plan["side"]
    base_flat = (i0[:, 0] * dy + i0[:, 1]) * dz + i0[:, 2]
    base_d = origin + grid.voxel * i0.float() - gf.means[ids_all]  # offset of each box's first node from the centre
    uniq, counts = torch.unique_consecutive(plan["s"], return_counts=True)
    start = 0
    for sv, cnt in zip(uniq.tolist(), counts.tolist()):
        rows = torch.arange(start, start + cnt, device=dev)
        start += cnt
        ar = torch.arange(sv, device=dev)
        if sv**3 <= chunk_size:
            offs = torch.stack(torch.meshgrid(ar, ar, ar, indexing="ij"), -1).reshape(-1, 3)  # [s^3, 3]
            per = max(1, chunk_size // sv**3)
            for b in range(0, cnt, per):
                r = rows[b : b + per]
                _splat(out, gf, ids_all[r], offs, side[r], base_flat[r], base_d[r], grid, c2, values)
                bar.update(int(r.numel()) * sv**3)
        else:  # huge boxes: one Gaussian at a time, in x-slabs
            slab = max(1, chunk_size // sv**2)
            for r in rows.tolist():
                rr = torch.tensor([r], device=dev)
                for x0 in range(0, sv, slab):
                    ax = torch.arange(x0, min(sv, x0 + slab), device=dev)
                    offs = torch.stack(torch.meshgrid(ax, ar, ar, indexing="ij"), -1).reshape(-1, 3)
                    _splat(out, gf, ids_all[rr], offs, side[rr], base_flat[rr], base_d[rr], grid, c2, values)
                    bar.update(int(offs.shape[0]))


def _splat(out, gf, ids, offs, sd, base_flat, base_d, grid, c2, values):
    """Add the Gaussians ``ids`` to the nodes ``i0 + offs`` of their boxes (``offs [M, 3]``, shared by the chunk;
    ``sd [B, 3]`` box sides, ``base_flat [B]`` flat index of the first node, ``base_d [B, 3]`` its offset from the mean)."""
    dy, dz = grid.dims[1], grid.dims[2]
    valid = (offs[None, :, 0] < sd[:, 0:1]) & (offs[None, :, 1] < sd[:, 1:2]) & (offs[None, :, 2] < sd[:, 2:3])
    o = offs.float() * grid.voxel  # [M, 3]
    bd = base_d  # [B, 3]
    d0 = bd[:, 0:1] + o[None, :, 0]
    d1 = bd[:, 1:2] + o[None, :, 1]
    d2 = bd[:, 2:3] + o[None, :, 2]
    P = gf.precisions[ids]  # [B, 3, 3], symmetric
    m2 = (P[:, 0, 0, None] * d0 * d0 + P[:, 1, 1, None] * d1 * d1 + P[:, 2, 2, None] * d2 * d2
          + 2.0 * (P[:, 0, 1, None] * d0 * d1 + P[:, 0, 2, None] * d0 * d2 + P[:, 1, 2, None] * d1 * d2))
    valid &= m2 <= c2
    w = torch.where(valid, gf.opacities[ids][:, None] * torch.exp(-0.5 * m2), torch.zeros((), device=m2.device))
    off_flat = (offs[:, 0] * dy + offs[:, 1]) * dz + offs[:, 2]
    flat = (base_flat[:, None] + off_flat[None]).masked_fill(~valid, 0).reshape(-1)
    out[0].index_add_(0, flat, w.reshape(-1))
    if values is not None:
        v = values[ids]  # [B, C]
        for c in range(v.shape[1]):
            out[1 + c].index_add_(0, flat, (w * v[:, c : c + 1]).reshape(-1))


# ----------------------------------------------------------------------------------------------- surface
def fill_cavities(vol: np.ndarray, level: float, fill_ratio: float = 0.5) -> Tuple[np.ndarray, int]:
    """Raise to ``2 level`` every node below ``level`` that the grid's outside cannot reach (6-neighbourhood,
    ``scipy.ndimage.binary_fill_holes``), with the shell closed at ``fill_ratio * level`` first (and its pin holes of
    1-2 voxels closed by a morphological closing): a cavity enclosed by those nodes is filled even where the shell
    dips just under ``level`` (a gap of 0.49999 under 0.5 would otherwise join the cavity to the outside and leave a
    hidden inner shell).  Then the usual fill at ``level``.  Returns the volume (a copy when changed) and the number of raised nodes."""
    from scipy import ndimage

    raised = np.zeros(vol.shape, dtype=bool)
    # the shell at the lower level, then at the level, each with its pin holes (1-2 voxels, where few Gaussians
    # overlap on a coarse grid) closed morphologically: the band between the shell and the filled cavity that a
    # pin hole would join to the outside is filled too (it left an inner body on the cube)
    # (voxels within 2 of the closed shell's exterior are never raised: the closing's fill of outer creases and pin
    # holes stays out of the surface, which stays on the level set there)
    for t in (float(fill_ratio) * level, float(level)):
        occ = (vol >= t) | raised
        closed = np.pad(occ, 3)
        closed = (ndimage.binary_closing(closed, iterations=2) | closed)[3:-3, 3:-3, 3:-3]
        inside = ndimage.binary_fill_holes(closed)
        near_outside = ndimage.binary_dilation(~inside, iterations=2)
        raised |= inside & ~occ & ~near_outside
    count = int(raised.sum())
    if count:
        vol = vol.copy()
        vol[raised] = np.maximum(vol[raised], 2.0 * level)
    return vol, count


def extract_isosurface(density: Tensor, grid: Grid, level: float, fill_interior: bool = True, fill_ratio: float = 0.5) -> Tuple[np.ndarray, np.ndarray]:
    """Marching cubes (PyMCubes) of ``density`` at ``level``; vertices ``[V, 3]`` in world coordinates, faces ``[F, 3]``.

    ``fill_interior``: cavities are raised above the level first (:func:`fill_cavities`, closing the shell at
    ``fill_ratio * level``), leaving only the outer surface.
    """
    import mcubes

    vol = density.detach().float().cpu().numpy()
    if fill_interior:
        vol, _ = fill_cavities(vol, level, fill_ratio)
    verts, faces = mcubes.marching_cubes(vol, float(level))
    verts = np.asarray(verts, dtype=np.float64) * grid.voxel + grid.origin[None]
    return verts, np.asarray(faces, dtype=np.int64)


def available_memory_bytes(device) -> Optional[int]:
    """Free memory of ``device`` (CUDA: ``torch.cuda.mem_get_info``; CPU: ``MemAvailable`` of /proc/meminfo), or None."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_grid_fits_memory(grid: Grid, device, name: str = "resolution") -> None:
    """Raise :class:`MeshExportError` when the grid cannot be held: float32 nodes on ``device`` plus, on the CPU, the
    arrays of marching cubes and the interior fill (about three more float32 grids)."""
    nodes = int(np.prod(grid.dims))
    dev = torch.device(device)
    need_dev = 4 * nodes
    need_cpu = 3 * 4 * nodes + (need_dev if dev.type == "cpu" else 0)
    checks = [("cpu", need_cpu)] + ([(dev, need_dev)] if dev.type != "cpu" else [])
    for d, need in checks:
        avail = available_memory_bytes(d)
        if avail is not None and need > avail:
            raise MeshExportError(
                f"the grid cannot be held: {grid.dims[0]}x{grid.dims[1]}x{grid.dims[2]} nodes need about {need / 2**30:.1f} GiB "
                f"on {d}, {avail / 2**30:.1f} GiB are available; lower {name}"
            )


def check_grid_holds_scene(density: Tensor, level: float, name: str = "bounds") -> None:
    """Raise :class:`MeshExportError` when the iso-surface reaches the grid's boundary (the grid cuts the scene)."""
    faces = [density[0], density[-1], density[:, 0], density[:, -1], density[:, :, 0], density[:, :, -1]]
    peak = max(float(f.max()) for f in faces)
    if peak >= level:
        raise MeshExportError(
            f"the grid does not hold the scene: the density reaches {peak:.3g} >= isosurface_threshold={level} on the "
            f"boundary of {name}, so the surface would be cut open; enlarge {name}, set it to 'auto', or set "
            f"{name.rsplit('.', 1)[0] + '.' if '.' in name else ''}crop_to_bounds=true to cut the scene there"
        )


def clean_mesh(verts: np.ndarray, faces: np.ndarray, min_component_fraction: float = 0.05, smooth_iterations: int = 0, decimate_target: int = 0):
    """trimesh cleanup: merge duplicate vertices, drop degenerate / duplicate faces and components with fewer faces
    than ``min_component_fraction`` of the largest, orient normals outwards, Taubin smoothing, quadric decimation."""
    import trimesh

    mesh = _drop_small_components(trimesh.Trimesh(vertices=verts, faces=faces, process=True, validate=True), min_component_fraction)
    if smooth_iterations > 0:
        trimesh.smoothing.filter_taubin(mesh, iterations=int(smooth_iterations))
    if decimate_target and len(mesh.faces) > decimate_target:
        mesh = mesh.simplify_quadric_decimation(face_count=int(decimate_target))
        mesh = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, process=True, validate=True)
    mesh = collapse_degenerate_faces(mesh)
    if not mesh.is_watertight:
        mesh = _drop_small_components(repair_manifold(mesh), min_component_fraction)
    mesh.fix_normals()
    return mesh


def _drop_small_components(mesh, fraction: float):
    import trimesh

    if fraction > 0 and len(mesh.faces):
        parts = mesh.split(only_watertight=False)
        if len(parts) > 1:
            biggest = max(len(p.faces) for p in parts)
            parts = [p for p in parts if len(p.faces) >= fraction * biggest]
            mesh = trimesh.util.concatenate(parts)
    return mesh


def _edge_counts(faces: np.ndarray):
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    uniq, inv, cnt = np.unique(e, axis=0, return_inverse=True, return_counts=True)
    return cnt[inv.reshape(-1)].reshape(3, -1).T  # [F, 3] use count of each face's edges


def repair_manifold(mesh, rounds: int = 6):
    """Make a mesh that quadric decimation left with non-manifold edges (shared by 3+ faces: fast-simplification
    folds sheets onto each other) or small holes watertight again: faces on such edges, and faces duplicated in
    any orientation, are removed with their one-ring, and every hole is closed by a fan around its centroid
    (oriented with the surrounding faces).  Returns the input unchanged if it does not succeed in ``rounds``."""
    import trimesh

    orig = mesh
    v = np.asarray(mesh.vertices, dtype=np.float64)
    f = np.asarray(mesh.faces, dtype=np.int64)
    for _ in range(rounds):
        key = np.sort(f, axis=1)
        _, inv, cnt = np.unique(key, axis=0, return_inverse=True, return_counts=True)
        dup = cnt[inv.reshape(-1)] > 1
        ec = _edge_counts(f)
        bad = dup | (ec > 2).any(1)
        if bad.any():  # remove the bad faces and their one-ring (vertex neighbours)
            ring = np.zeros(len(v), dtype=bool)
            ring[f[bad].reshape(-1)] = True
            f = f[~ring[f].any(1)]
        # close the holes: chain boundary half-edges (a -> b of a face whose edge is used once) into loops
        ec = _edge_counts(f)
        half = np.concatenate([f[:, [0, 1]][ec[:, 0] == 1], f[:, [1, 2]][ec[:, 1] == 1], f[:, [2, 0]][ec[:, 2] == 1]])
        if len(half) == 0 and not bad.any():
            break
        nxt = {}
        pinched = False
        for a, b in half.tolist():
            if a in nxt:
                pinched = True
            nxt[a] = b
        if pinched:  # a vertex on two holes: drop its faces and try again
            starts = np.bincount(half[:, 0], minlength=len(v)) > 1
            f = f[~starts[f].any(1)]
            continue
        new_faces, new_verts = [], []
        seen = set()
        for a0 in list(nxt):
            if a0 in seen:
                continue
            loop, a = [], a0
            while a not in seen and a in nxt:
                seen.add(a)
                loop.append(a)
                a = nxt[a]
            if a != a0 or len(loop) < 3:
                continue
            c = len(v) + len(new_verts)
            new_verts.append(v[loop].mean(0))
            for i in range(len(loop)):  # the hole's faces run against the boundary half-edges: (b, a, c)
                new_faces.append([loop[(i + 1) % len(loop)], loop[i], c])
        if new_verts:
            v = np.concatenate([v, np.asarray(new_verts)])
            f = np.concatenate([f, np.asarray(new_faces, dtype=np.int64)])
        m = trimesh.Trimesh(vertices=v, faces=f, process=False)
        if m.is_watertight:
            m.remove_unreferenced_vertices()
            return m
    return orig


def degenerate_faces(mesh, rel_height: float = 1e-6) -> np.ndarray:
    """Boolean mask of the faces whose smallest altitude is below ``rel_height`` times the mesh's bounding-box
    diagonal (zero-area slivers and needles; stricter than trimesh's absolute ``tol.merge``)."""
    v = np.asarray(mesh.vertices, dtype=np.float64)
    f = np.asarray(mesh.faces)
    if len(f) == 0:
        return np.zeros(0, dtype=bool)
    tri = v[f]
    e = np.linalg.norm(tri[:, [1, 2, 0]] - tri, axis=2)  # edges (0-1, 1-2, 2-0)
    area2 = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    height = area2 / np.maximum(e.max(1), 1e-300)
    scale = float(np.linalg.norm(v.max(0) - v.min(0))) if len(v) else 1.0
    return (height <= rel_height * scale) | (f[:, 0] == f[:, 1]) | (f[:, 1] == f[:, 2]) | (f[:, 0] == f[:, 2])


def collapse_degenerate_faces(mesh, rel_height: float = 1e-6, max_rounds: int = 20):
    """Remove degenerate faces (:func:`degenerate_faces`) without opening the surface: the shortest edge of each is
    collapsed (its two vertices merged at their midpoint), which removes the face and its neighbour across that edge
    and joins the two remaining edges.  Quadric decimation can leave such faces (issue 28: a zero-area face on the
    cube)."""
    import trimesh

    for _ in range(max_rounds):
        bad = degenerate_faces(mesh, rel_height)
        if not bad.any():
            return mesh
        v = np.asarray(mesh.vertices, dtype=np.float64).copy()
        f = np.asarray(mesh.faces)
        parent = np.arange(len(v))

        def root(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        tri = v[f[bad]]
        e = np.linalg.norm(tri[:, [1, 2, 0]] - tri, axis=2)
        k = e.argmin(1)
        for face, kk in zip(f[bad], k):
            a, b = root(face[kk]), root(face[(kk + 1) % 3])
            if a != b:
                parent[b] = a
        roots = np.array([root(i) for i in range(len(v))])
        sums = np.zeros_like(v)
        np.add.at(sums, roots, v)
        cnt = np.bincount(roots, minlength=len(v))[:, None]
        v_new = np.where(cnt > 0, sums / np.maximum(cnt, 1), v)
        f_new = roots[f]
        keep = (f_new[:, 0] != f_new[:, 1]) & (f_new[:, 1] != f_new[:, 2]) & (f_new[:, 0] != f_new[:, 2])
        mesh = trimesh.Trimesh(vertices=v_new, faces=f_new[keep], process=True, validate=True)
    return mesh


# ----------------------------------------------------------------------------------------------- colour
def gaussian_colors_at(points: Tensor, gf: GaussianField, normals: Optional[Tensor] = None, mode: str = "dc", knn: int = 16, chunk: int = 65536,
                       progress: Optional[bool] = False) -> Tensor:
    """Colour ``[P, 3]`` in [0, 1] of the Gaussians at ``points [P, 3]``: ``sum_i w_i c_i / sum_i w_i`` over the
    ``knn`` Gaussians with the nearest centres, ``w_i = o_i exp(-m_i^2 / 2)`` (``m_i`` the Mahalanobis distance,
    not truncated here).  Where every weight underflows, the Gaussian with the smallest ``m_i`` gives the colour.

    ``mode="dc"``: ``c_i = max(SH_C0 sh0_i + 0.5, 0)``; ``mode="normal_sh"``: ``c_i = max(SH_i(-n) + 0.5, 0)``, the
    colour a camera on the normal ``n`` sees (gsplat: ``dir = mean - camera``), ``normals`` required.
    """
    from scipy.spatial import cKDTree

    if mode not in COLOR_MODES:
        raise ValueError(f"color_mode must be one of {COLOR_MODES}, got {mode!r}")
    if mode == "normal_sh" and normals is None:
        raise ValueError("color_mode='normal_sh' needs surface normals")
    dev = gf.means.device
    k = min(int(knn), gf.num)
    tree = cKDTree(gf.means.double().cpu().numpy())
    degree = sh_degree_from_bases(gf.sh.shape[1])
    out = torch.empty(points.shape[0], 3, dtype=torch.float32, device=dev)
    pts_np = points.detach().double().cpu().numpy()
    from tqdm.auto import tqdm

    for s in tqdm(range(0, points.shape[0], chunk), desc="texture colours", unit="chunk", disable=_no_bar(progress), leave=False):
        p = points[s : s + chunk].to(dev, torch.float32)
        _, nn_idx = tree.query(pts_np[s : s + chunk], k=k)
        nn_idx = torch.as_tensor(np.asarray(nn_idx).reshape(p.shape[0], k), dtype=torch.long, device=dev)
        d = p[:, None, :] - gf.means[nn_idx]  # [B, k, 3]
        m2 = torch.einsum("bki,bkij,bkj->bk", d, gf.precisions[nn_idx], d)
        logw = torch.log(gf.opacities[nn_idx]) - 0.5 * m2
        w = torch.softmax(logw, dim=1)  # = w_i / sum w_i, stable when all w_i underflow (then ~ smallest m)
        if mode == "dc" or degree == 0:
            cols = (SH_C0 * gf.sh[nn_idx, 0] + 0.5).clamp_min(0)  # [B, k, 3]
        else:
            from gsplat.cuda._torch_impl import _spherical_harmonics

            n = normals[s : s + chunk].to(dev, torch.float32)
            dirs = (-n)[:, None, :].expand(-1, k, -1)
            cols = (_spherical_harmonics(degree, dirs, gf.sh[nn_idx]) + 0.5).clamp_min(0)
        out[s : s + chunk] = (w[..., None] * cols).sum(1)
    return out.clamp(0, 1)


# ----------------------------------------------------------------------------------------------- UV + texture
def uv_unwrap(verts: np.ndarray, faces: np.ndarray, texture_size: int = 1024, padding: int = 2):
    """xatlas parametrisation: returns ``vmapping [V']`` (original vertex of each new one), ``faces [F, 3]`` into the
    new vertices and ``uvs [V', 2]`` in [0, 1] (OpenGL convention: v = 0 at the image's bottom row)."""
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(verts, dtype=np.float32), np.ascontiguousarray(faces, dtype=np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution = int(texture_size)
    pack.padding = int(padding)
    pack.bilinear = True
    atlas.generate(xatlas.ChartOptions(), pack)
    vmapping, indices, uvs = atlas[0]
    return np.asarray(vmapping, dtype=np.int64), np.asarray(indices, dtype=np.int64), np.asarray(uvs, dtype=np.float64)


def rasterize_uv(uvs: Tensor, faces: Tensor, size: int, chunk: int = 1_048_576) -> Tuple[Tensor, Tensor]:
    """Rasterize triangles given by ``uvs [V, 2]`` (OpenGL v up) into a ``size x size`` texture (row 0 = top).

    Returns ``face [H, W]`` (long, -1 = no triangle) and barycentric coordinates ``bary [H, W, 3]`` of each texel
    centre.  Pure torch; triangles are grouped by bounding-box size and processed in chunks of texel candidates.
    """
    dev = uvs.device
    px = torch.stack([uvs[:, 0] * size, (1.0 - uvs[:, 1]) * size], -1).double()  # pixel coords, centres at +0.5
    tri = px[faces]  # [F, 3, 2]
    lo = torch.floor(tri.amin(1) - 0.5).long().clamp(0, size - 1)
    hi = torch.ceil(tri.amax(1) - 0.5).long().clamp(0, size - 1)
    ext = (hi - lo + 1).amax(1)
    face_map = torch.full((size * size,), -1, dtype=torch.long, device=dev)
    bary_map = torch.zeros((size * size, 3), dtype=torch.float32, device=dev)
    order = torch.argsort(ext)
    ext_sorted = ext[order]
    uniq, counts = torch.unique_consecutive(ext_sorted, return_counts=True)
    start = 0
    for e, cnt in zip(uniq.tolist(), counts.tolist()):
        ids = order[start : start + cnt]
        start += cnt
        ar = torch.arange(e, device=dev)
        offs = torch.stack(torch.meshgrid(ar, ar, indexing="ij"), -1).reshape(-1, 2)  # (dx, dy)
        per = max(1, chunk // (e * e))
        for b in range(0, ids.numel(), per):
            fid = ids[b : b + per]
            pix = lo[fid][:, None, :] + offs[None]  # [B, M, 2] (x, y)
            valid = (pix <= hi[fid][:, None, :]).all(-1)
            c = pix.double() + 0.5
            a, bb, cc = tri[fid, 0][:, None], tri[fid, 1][:, None], tri[fid, 2][:, None]
            area = ((bb[..., 0] - a[..., 0]) * (cc[..., 1] - a[..., 1]) - (bb[..., 1] - a[..., 1]) * (cc[..., 0] - a[..., 0]))
            w0 = ((bb[..., 0] - c[..., 0]) * (cc[..., 1] - c[..., 1]) - (bb[..., 1] - c[..., 1]) * (cc[..., 0] - c[..., 0]))
            w1 = ((cc[..., 0] - c[..., 0]) * (a[..., 1] - c[..., 1]) - (cc[..., 1] - c[..., 1]) * (a[..., 0] - c[..., 0]))
            area_safe = torch.where(area.abs() < 1e-12, torch.ones_like(area), area)
            l0, l1 = w0 / area_safe, w1 / area_safe
            l2 = 1.0 - l0 - l1
            eps = 1e-6
            valid &= (l0 >= -eps) & (l1 >= -eps) & (l2 >= -eps) & (area.abs() >= 1e-12)
            if not bool(valid.any()):
                continue
            flat = (pix[..., 1] * size + pix[..., 0])[valid]
            face_map[flat] = fid[:, None].expand_as(valid)[valid]
            bary_map[flat] = torch.stack([l0, l1, l2], -1)[valid].float()
    return face_map.reshape(size, size), bary_map.reshape(size, size, 3)


def fill_empty_texels(image: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Give every uncovered texel the value of the nearest covered one (seam-free bilinear lookups)."""
    from scipy import ndimage

    if covered.all() or not covered.any():
        return image
    _, (iy, ix) = ndimage.distance_transform_edt(~covered, return_indices=True)
    return image[iy, ix]


def bake_texture(verts: Tensor, faces: Tensor, uvs: Tensor, vnormals: Tensor, gf: GaussianField, size: int, mode: str = "dc", knn: int = 16,
                 progress: Optional[bool] = False) -> Tuple[np.ndarray, float]:
    """Texture ``[size, size, 3]`` uint8 (row 0 = top) of the mesh ``verts/faces`` with atlas ``uvs`` (one uv per
    vertex), coloured by :func:`gaussian_colors_at` at each texel's surface point; also returns the covered
    fraction of the texture."""
    face_map, bary = rasterize_uv(uvs, faces, size)
    covered = face_map >= 0
    fidx = face_map[covered]
    b = bary[covered]
    tri = faces[fidx]  # [T, 3]
    pts = (verts[tri] * b[..., None]).sum(1)
    nrm = F.normalize((vnormals[tri] * b[..., None]).sum(1), dim=-1) if mode == "normal_sh" else None
    cols = gaussian_colors_at(pts, gf, nrm, mode=mode, knn=knn, progress=progress)
    img = np.zeros((size, size, 3), dtype=np.float32)
    cov_np = covered.cpu().numpy()
    img[cov_np] = cols.cpu().numpy()
    img = fill_empty_texels(img, cov_np)
    return (np.clip(img, 0, 1) * 255.0 + 0.5).astype(np.uint8), float(cov_np.mean())


# ----------------------------------------------------------------------------------------------- pipeline
@dataclass
class MeshResult:
    mesh: "object"  # trimesh.Trimesh with TextureVisuals (uv + PNG image)
    vertex_colors: Optional[np.ndarray]  # [V, 3] in [0, 1] of the untextured (welded) mesh, or None
    welded: "object"  # trimesh.Trimesh before UV seams were cut (vertex-coloured PLY)
    grid: Grid
    stats: Dict[str, float]


def auto_level(density: Tensor, grid: Grid, gf: GaussianField, ratio: float = 0.25) -> Tuple[float, float]:
    """``(level, median)``: ``ratio`` x the median of the density at the visible Gaussians' centres (trilinear on the
    grid).  The density of a surface of Gaussians scales with how many overlap (a 3DGS model densified 30x sums 30x
    more); a fixed level then sits ever farther out (issue 28: the 100k-Gaussian cube at +-0.80 for centres at
    +-0.55).  Relative to the density at the centres, the level set lies where a surface layer of Gaussians of std
    ``sigma`` falls to ``ratio`` of its peak, ``sigma sqrt(2 ln(1/ratio))`` (1.67 sigma at the default 0.25; 1.18
    sigma at 0.5, closer but bumpier where few Gaussians overlap) from the centres, whatever the number of Gaussians."""
    dev = density.device
    origin = torch.as_tensor(grid.origin, dtype=torch.float32, device=dev)
    u = (gf.means - origin) / grid.voxel  # node coordinates
    dims = torch.tensor(grid.dims, device=dev, dtype=torch.float32)
    coords = 2.0 * u / (dims - 1) - 1.0  # [-1, 1], align_corners=True; grid_sample's (x, y, z) index (W, H, D)
    g = coords[:, [2, 1, 0]].reshape(1, -1, 1, 1, 3)
    vals = F.grid_sample(density[None, None].float(), g, mode="bilinear", align_corners=True)[0, 0].reshape(-1)
    med = float(vals.median())
    return ratio * med, med


def _stage(name: str, progress: Optional[bool]):
    """A one-step tqdm bar for a stage that reports no intermediate progress (shows its elapsed time)."""
    from tqdm.auto import tqdm

    return tqdm(total=1, desc=name, disable=_no_bar(progress), leave=False, bar_format="{desc}: {elapsed}")


def gaussians_to_mesh(params: Dict[str, Tensor], settings: Optional[MeshSettings] = None, device=None, prefix: str = "",
                      progress: Optional[bool] = None, source: str = "the model", **overrides) -> MeshResult:
    """The whole pipeline on raw Gaussian parameters (see the module docstring).  ``progress``: tqdm bars for every
    stage (``None``: on a terminal only); ``source`` names the input in errors (e.g. the PLY's path).

    ``stats``: ``gaussians``, grid dims, ``voxel``, ``level`` (the iso-level used), ``density_peak``,
    ``marching_cubes_faces``, ``faces``, ``vertices``, ``watertight`` (1/0), ``components``, ``degenerate_faces``,
    ``surface_offset_mean`` / ``_p95`` / ``_max`` (distance of the mesh's vertices to the nearest visible Gaussian
    centre, world units), ``median_std`` (of the visible Gaussians), ``texture_coverage``, ``seconds_<stage>``.

    Raises:
        ValueError: bad settings (named ``prefix + key``).
        MeshExportError: empty / fully transparent / out-of-range model, grid cutting the scene, no surface.
    """
    import trimesh
    from PIL import Image
    from scipy.spatial import cKDTree

    s = settings if settings is not None else MeshSettings()
    if overrides:
        s = MeshSettings.from_dict({**asdict(s), **overrides}, prefix)
    s.check(prefix)
    secs: Dict[str, float] = {}
    t0 = time.perf_counter()
    gf = gaussian_field(params, s.min_opacity, s.cutoff_sigma, device=device, source=source)
    grid = make_grid(gf, s.bounds, s.resolution)
    check_grid_fits_memory(grid, gf.means.device, prefix + "resolution")
    dens = density_grid(gf, grid, s.chunk_size, min_sigma_voxels=s.density_min_sigma_voxels, progress=progress)
    if s.isosurface_threshold == "auto":
        level, _ = auto_level(dens, grid, gf, s.auto_level_ratio)
    else:
        level = float(s.isosurface_threshold)
    secs["density"] = time.perf_counter() - t0
    if s.bounds != "auto":
        if s.crop_to_bounds:
            for sl in ((0,), (-1,), (slice(None), 0), (slice(None), -1), (slice(None), slice(None), 0), (slice(None), slice(None), -1)):
                dens[sl] = 0.0  # closes the surface where the bounds cut it
        else:
            check_grid_holds_scene(dens, level, prefix + "bounds")
    peak = float(dens.max())
    if peak < level:
        raise MeshExportError(
            f"no surface: the density peaks at {peak:.3g} < {prefix}isosurface_threshold={level} "
            f"({gf.num} visible Gaussians on a {grid.dims} grid); lower {prefix}isosurface_threshold or set it to 'auto'"
            + ("" if s.bounds == "auto" else f", or check {prefix}bounds")
        )
    t = time.perf_counter()
    with _stage("interior fill + marching cubes", progress) as bar:
        verts, faces = extract_isosurface(dens, grid, level, s.fill_interior, s.fill_threshold_ratio)
        bar.update()
    secs["marching_cubes"] = time.perf_counter() - t
    del dens
    if len(faces) == 0:
        raise MeshExportError(f"marching cubes found no triangles at {prefix}isosurface_threshold={level}")
    mc_faces = len(faces)
    t = time.perf_counter()
    with _stage("cleanup + decimation", progress) as bar:
        welded = clean_mesh(verts, faces, s.min_component_fraction, s.smooth_iterations, s.decimate_target)
        bar.update()
    secs["cleanup"] = time.perf_counter() - t
    dev = gf.means.device
    v = torch.as_tensor(np.array(welded.vertices), dtype=torch.float32, device=dev)
    vn = torch.as_tensor(np.array(welded.vertex_normals), dtype=torch.float32, device=dev)
    t = time.perf_counter()
    with _stage("UV atlas (xatlas)", progress) as bar:
        vmap, tfaces, uvs = uv_unwrap(np.asarray(welded.vertices), np.asarray(welded.faces), s.texture_size, s.uv_padding)
        bar.update()
    secs["uv_atlas"] = time.perf_counter() - t
    t = time.perf_counter()
    vcol = gaussian_colors_at(v, gf, vn, mode=s.color_mode, knn=s.color_knn).cpu().numpy()
    tv = v[torch.as_tensor(vmap, device=dev)]
    tvn = vn[torch.as_tensor(vmap, device=dev)]
    tf = torch.as_tensor(tfaces, device=dev)
    img, coverage = bake_texture(tv, tf, torch.as_tensor(uvs, dtype=torch.float32, device=dev), tvn, gf, s.texture_size,
                                 s.color_mode, s.color_knn, progress=progress)
    secs["texture"] = time.perf_counter() - t
    material = trimesh.visual.material.PBRMaterial(
        name="material_0", baseColorTexture=Image.fromarray(img), metallicFactor=0.0, roughnessFactor=1.0
    )
    visual = trimesh.visual.TextureVisuals(uv=uvs, material=material)
    mesh = trimesh.Trimesh(vertices=tv.cpu().numpy(), faces=tfaces, visual=visual, vertex_normals=tvn.cpu().numpy(), process=False)
    dist, _ = cKDTree(gf.means.double().cpu().numpy()).query(np.asarray(welded.vertices))
    stats = {
        "gaussians": float(gf.num), "grid_x": float(grid.dims[0]), "grid_y": float(grid.dims[1]), "grid_z": float(grid.dims[2]),
        "voxel": grid.voxel, "level": level, "density_peak": peak, "marching_cubes_faces": float(mc_faces),
        "faces": float(len(welded.faces)), "vertices": float(len(welded.vertices)), "texture_coverage": coverage,
        "watertight": float(welded.is_watertight), "components": float(welded.body_count),
        "degenerate_faces": float(degenerate_faces(welded).sum()),
        "surface_offset_mean": float(dist.mean()), "surface_offset_p95": float(np.quantile(dist, 0.95)),
        "surface_offset_max": float(dist.max()), "median_std": float(gf.min_std.median()) if gf.min_std is not None else float("nan"),
    }
    stats.update({f"seconds_{k}": float(v_) for k, v_ in secs.items()})
    stats["seconds_total"] = time.perf_counter() - t0
    return MeshResult(mesh, vcol, welded, grid, stats)


def summary_line(stats: Dict[str, float]) -> str:
    """One line for logs and the CLI: faces, watertight, components, surface offset, time."""
    return (f"{stats['faces']:.0f} faces, {stats['vertices']:.0f} vertices, "
            f"{'watertight' if stats['watertight'] else 'NOT watertight'}, {stats['components']:.0f} component(s), "
            f"{stats['degenerate_faces']:.0f} degenerate faces; surface offset to the Gaussian centres mean "
            f"{stats['surface_offset_mean']:.4g} (p95 {stats['surface_offset_p95']:.4g}; median Gaussian std "
            f"{stats['median_std']:.4g}); level {stats['level']:.4g}; {stats['seconds_total']:.1f} s")


# ----------------------------------------------------------------------------------------------- files
#: threestudio's z-up world -> glTF's y-up: (x, y, z) -> (x, z, -y), a proper rotation (-90 degrees about x)
Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def to_file_frame(points: np.ndarray, up_axis: str = "y") -> np.ndarray:
    """Points or normals ``[N, 3]`` from threestudio's frame to the files' (``up_axis="y"``: :data:`Z_UP_TO_Y_UP`)."""
    points = np.asarray(points, dtype=np.float64)
    return points @ Z_UP_TO_Y_UP.T if up_axis == "y" else points.copy()


def mesh_file_bytes(result: MeshResult, name: str = "model", formats: Sequence[str] = ("obj", "glb"), up_axis: str = "y",
                    settings: Optional[MeshSettings] = None) -> Dict[str, bytes]:
    """File name -> contents: ``name.obj`` + ``name.mtl`` + ``name.png`` (obj), ``name.glb``, ``name.ply`` (vertex
    colours), and always ``name.json`` (stats, settings, frame).  Positions and vertex normals in the frame of
    ``up_axis`` (``"y"``: glTF's +Y up, ``(x, y, z) -> (x, z, -y)``; ``"z"``: threestudio's frame)."""
    import io

    import trimesh

    if up_axis not in UP_AXES:
        raise ValueError(f"up_axis must be one of {UP_AXES}, got {up_axis!r}")
    files: Dict[str, bytes] = {}
    mesh = result.mesh
    verts = to_file_frame(mesh.vertices, up_axis)
    normals = to_file_frame(mesh.vertex_normals, up_axis)
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    if "obj" in formats:
        img = mesh.visual.material.baseColorTexture
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        simple = trimesh.visual.material.SimpleMaterial(image=img, name="material_0", diffuse=[255, 255, 255, 255], ambient=[255, 255, 255, 255], specular=[0, 0, 0, 255])
        m = trimesh.Trimesh(vertices=verts, faces=mesh.faces, vertex_normals=normals,
                            visual=trimesh.visual.TextureVisuals(uv=mesh.visual.uv, material=simple), process=False)
        text, tex = trimesh.exchange.obj.export_obj(m, include_normals=True, include_color=False, include_texture=True, return_texture=True, mtl_name=f"{name}.mtl")
        # rename the texture trimesh names after the material to <name>.png (in the MTL too)
        mtl = tex[f"{name}.mtl"].decode("utf-8")
        for key in list(tex):
            if key.lower().endswith(".png"):
                mtl = mtl.replace(key, f"{name}.png")
        header = f"# scoredistill gsplat-mesh-exporter: {'+Y up (glTF frame: threestudio (x, y, z) -> (x, z, -y))' if up_axis == 'y' else '+Z up (threestudio frame)'}\n"
        files[f"{name}.obj"] = (header + text).encode("utf-8")
        files[f"{name}.mtl"] = mtl.encode("utf-8")
        files[f"{name}.png"] = buf.getvalue()
    if "glb" in formats:
        g = trimesh.Trimesh(vertices=verts, faces=mesh.faces, vertex_normals=normals, visual=mesh.visual, process=False)
        files[f"{name}.glb"] = trimesh.exchange.gltf.export_glb(trimesh.Scene(g), include_normals=True)
    if "ply" in formats:
        w = result.welded
        vc = (np.clip(result.vertex_colors, 0, 1) * 255 + 0.5).astype(np.uint8)
        pm = trimesh.Trimesh(vertices=to_file_frame(w.vertices, up_axis), faces=w.faces,
                             vertex_normals=to_file_frame(w.vertex_normals, up_axis),
                             vertex_colors=np.concatenate([vc, np.full((len(vc), 1), 255, np.uint8)], 1), process=False)
        files[f"{name}.ply"] = trimesh.exchange.ply.export_ply(pm, encoding="binary", vertex_normal=True)
    report = {
        "stats": result.stats,
        "up_axis": up_axis,
        "frame": ("+Y up (glTF 2.0): threestudio (x, y, z) -> (x, z, -y)" if up_axis == "y" else "+Z up: threestudio's world frame, unchanged"),
        "files": sorted(files) + [f"{name}.json"],
        "settings": asdict(settings) if settings is not None else None,
    }
    files[f"{name}.json"] = (json.dumps(report, indent=2, sort_keys=True) + "\n").encode("utf-8")
    return files


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes) -> None:
    """Write and flush ``data`` to a new file (``O_EXCL``: never through an existing file or link)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_file_set(folder: str, files: Dict[str, bytes], name: str, extensions: Sequence[str] = SET_EXTENSIONS) -> List[str]:
    """Replace the file set ``<name>.<ext>`` (every ``ext`` of ``extensions``) in ``folder`` by ``files``, as a set.

    The new files are written into a hidden sibling folder ``folder/.<name>.new-*`` first; only when every one is
    on disk are the old set's files moved aside (into ``folder/.<name>.old-*``) and the new ones renamed in, and
    the old ones removed.  A failure while writing (full disk, ``KeyboardInterrupt``) leaves the old set as it was;
    a failure while renaming (no space is needed for renames) moves the old files back.  Old files of the set that
    the new one does not have (e.g. ``<name>.ply`` when ``ply`` is no longer exported) are removed with the rest,
    so the folder never mixes files of two exports.  Returns the paths written, in the order of ``files``.
    """
    os.makedirs(folder, exist_ok=True)
    for k in files:
        if os.path.basename(k) != k or not k.startswith(name + ".") or k.rsplit(".", 1)[-1] not in extensions:
            raise ValueError(f"{k!r} is not a file of the set {name}.<{'|'.join(extensions)}>")
    stage = tempfile.mkdtemp(prefix=f".{name}.new-", dir=folder)
    try:
        aside = tempfile.mkdtemp(prefix=f".{name}.old-", dir=folder)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    try:
        for k, data in files.items():
            _write_file(os.path.join(stage, k), bytes(data))
        _fsync_dir(stage)
        moved: List[str] = []
        placed: List[str] = []
        try:
            for ext in extensions:
                k = f"{name}.{ext}"
                if os.path.lexists(os.path.join(folder, k)):
                    os.rename(os.path.join(folder, k), os.path.join(aside, k))
                    moved.append(k)
            for k in files:
                os.rename(os.path.join(stage, k), os.path.join(folder, k))
                placed.append(k)
        except BaseException:
            for k in placed:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, k))
            for k in moved:
                with contextlib.suppress(OSError):
                    os.rename(os.path.join(aside, k), os.path.join(folder, k))
            raise
        _fsync_dir(folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
    return [os.path.join(folder, k) for k in files]


def write_mesh_files(result: MeshResult, folder: str, name: str = "model", formats: Sequence[str] = ("obj", "glb"),
                     up_axis: str = "y", settings: Optional[MeshSettings] = None) -> List[str]:
    """Write :func:`mesh_file_bytes` into ``folder`` as one set (:func:`write_file_set`); returns the paths."""
    files = mesh_file_bytes(result, name, formats, up_axis, settings)
    order = sorted(files, key=lambda k: (k.endswith(".obj"), k))
    return write_file_set(folder, {k: files[k] for k in order}, name)


def export_ply_to_mesh(ply_path: str, out_dir: str, name: str = "model", device: Optional[str] = None,
                       progress: Optional[bool] = None, **settings) -> Tuple[List[str], MeshResult]:
    """Python entry point: a 3DGS PLY (e.g. ``gsplat-ply-exporter``'s) -> textured mesh files in ``out_dir``.

    ``settings``: :class:`MeshSettings` fields (``resolution``, ``isosurface_threshold``, ``formats``, ...).
    Errors about the Gaussians name ``ply_path``.
    """
    from scoredistill.geometry.gaussian_ply import load_gaussians_ply

    s = MeshSettings.from_dict(settings)
    if not name or "/" in name or os.sep in name or name.startswith("."):
        raise ValueError(f"name must be a plain file stem (no folder, not starting with '.'), got {name!r}")
    params = load_gaussians_ply(ply_path)
    result = gaussians_to_mesh(params, s, device=device, progress=progress, source=ply_path)
    return write_mesh_files(result, out_dir, name, s.formats, s.up_axis, s), result


# ----------------------------------------------------------------------------------------------- metrics
def chamfer_distance(a: Union[Tensor, np.ndarray], b: Union[Tensor, np.ndarray]) -> Dict[str, float]:
    """Symmetric Chamfer distance between point sets ``a [P, 3]`` and ``b [Q, 3]`` (nearest neighbours, scipy KD-tree).

    Returns ``{"chamfer": (mean_a d(a, B) + mean_b d(b, A)) / 2, "a_to_b": ..., "b_to_a": ..., "hausdorff": max}``
    (Euclidean distances, not squared).
    """
    from scipy.spatial import cKDTree

    a = np.asarray(a.detach().cpu() if isinstance(a, Tensor) else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu() if isinstance(b, Tensor) else b, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("chamfer_distance needs two non-empty point sets")
    dab, _ = cKDTree(b).query(a)
    dba, _ = cKDTree(a).query(b)
    return {"chamfer": 0.5 * (float(dab.mean()) + float(dba.mean())), "a_to_b": float(dab.mean()), "b_to_a": float(dba.mean()),
            "hausdorff": float(max(dab.max(), dba.max()))}


def mesh_chamfer_distance(mesh, reference, n_samples: int = 100_000, seed: int = 0) -> Dict[str, float]:
    """Symmetric Chamfer distance between the surfaces of ``mesh`` and ``reference`` (each a ``trimesh.Trimesh``, a
    path loadable by trimesh, or for ``reference`` a ``[Q, 3]`` point array of surface samples), both sampled
    area-uniformly with ``n_samples`` points (seeded).  Also ``"size"``: the reference's bounding-box diagonal,
    and ``"chamfer_rel"`` = chamfer / size."""
    import trimesh

    from scoredistill.geometry.gaussian_init import sample_mesh_surface

    def points_of(m):
        if isinstance(m, str):
            m = trimesh.load(m, force="mesh")
        if isinstance(m, (np.ndarray, Tensor)):
            return np.asarray(m, dtype=np.float64)
        g = torch.Generator().manual_seed(seed)
        pts, _ = sample_mesh_surface(torch.as_tensor(np.asarray(m.vertices), dtype=torch.float32), torch.as_tensor(np.asarray(m.faces), dtype=torch.long), n_samples, generator=g)
        return pts.double().numpy()

    pa, pb = points_of(mesh), points_of(reference)
    out = chamfer_distance(pa, pb)
    size = float(np.linalg.norm(pb.max(0) - pb.min(0)))
    out["size"] = size
    out["chamfer_rel"] = out["chamfer"] / size if size > 0 else float("nan")
    return out


def gaussians_mesh_chamfer(params: Dict[str, Tensor], reference, n_samples: int = 100_000, seed: int = 0, device=None, **settings) -> Dict[str, float]:
    """Mesh the Gaussians (``settings``: :class:`MeshSettings` fields; no texture work is skipped) and return
    :func:`mesh_chamfer_distance` to ``reference`` plus the export's face count: one call per method for a
    ground-truth benchmark table (``chamfer``, ``chamfer_rel``, ``hausdorff``, ``faces``)."""
    result = gaussians_to_mesh(params, MeshSettings.from_dict(settings), device=device)
    out = mesh_chamfer_distance(result.welded, reference, n_samples=n_samples, seed=seed)
    out["faces"] = result.stats["faces"]
    return out
