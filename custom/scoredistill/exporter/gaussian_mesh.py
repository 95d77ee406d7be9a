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

The mesh stays in the Gaussians' (threestudio's, z-up) world frame; files (:func:`write_mesh_files`): OBJ + MTL
+ PNG, GLB (texture embedded), optional vertex-coloured PLY, each written to a temporary file and renamed.

Also: :func:`chamfer_distance` / :func:`mesh_chamfer_distance` (symmetric Chamfer distance, used by the tests and
the ground-truth benchmark).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from scoredistill.atomic_io import atomic_write_bytes as _atomic_write_bytes
from scoredistill.geometry.gaussians import SH_C0, sh_degree_from_bases

COLOR_MODES = ("dc", "normal_sh")
FORMATS = ("obj", "glb", "ply")


class MeshExportError(ValueError):
    """The Gaussians cannot be meshed with the given settings (empty / transparent model, grid too small)."""


# ----------------------------------------------------------------------------------------------- settings
@dataclass
class MeshSettings:
    """Settings of the Gaussian -> mesh export (the exporter's config keys, same names)."""

    #: voxels along the longest side of the bounds (other sides: same voxel size)
    resolution: int = 256
    #: "auto" (support of the visible Gaussians), a radius r (cube [-r, r]^3), or [[xmin,ymin,zmin],[xmax,ymax,zmax]]
    bounds: Union[str, float, List[List[float]]] = "auto"
    #: explicit bounds crop the scene (surface closed on the boundary) instead of raising when they cut it
    crop_to_bounds: bool = False
    #: iso-level of the opacity-weighted density (a lone Gaussian of opacity o reaches o at its centre)
    isosurface_threshold: float = 0.5
    #: Gaussians below this opacity are ignored (DreamGaussian: 0.005)
    min_opacity: float = 0.005
    #: truncation of every Gaussian at this Mahalanobis radius
    cutoff_sigma: float = 3.0
    #: (Gaussian, voxel) pairs evaluated at once; bounds the extra memory (~100 bytes a pair, from a measured peak)
    chunk_size: int = 4_194_304
    #: fill voxels enclosed by the surface so hollow shells of Gaussians give one outer surface
    fill_interior: bool = True
    #: drop connected components with fewer faces than this fraction of the largest one
    min_component_fraction: float = 0.05
    #: Taubin smoothing iterations after marching cubes (0 = off)
    smooth_iterations: int = 0
    #: quadric decimation to at most this many faces (0 = off)
    decimate_target: int = 100_000
    #: texture width = height in texels
    texture_size: int = 1024
    #: "dc" (view independent, SH degree 0) | "normal_sh" (full SH seen along the surface normal)
    color_mode: str = "dc"
    #: Gaussians (nearest centres) averaged per surface point
    color_knn: int = 16
    #: xatlas chart padding in texels
    uv_padding: int = 2
    #: files to write: any of obj (OBJ + MTL + PNG), glb, ply (vertex colours)
    formats: List[str] = field(default_factory=lambda: ["obj", "glb"])

    def check(self, prefix: str = "") -> "MeshSettings":
        """Raise ``ValueError`` naming ``prefix + key`` and its allowed range for a bad value; returns self."""

        def bad(key, allowed, value):
            raise ValueError(f"{prefix}{key} must be {allowed}, got {value!r}")

        if not isinstance(self.resolution, int) or not 8 <= self.resolution <= 2048:
            bad("resolution", "an integer in 8..2048", self.resolution)
        self.bounds = _parse_bounds(self.bounds, prefix + "bounds")
        if not (isinstance(self.isosurface_threshold, (int, float)) and math.isfinite(self.isosurface_threshold) and self.isosurface_threshold > 0):
            bad("isosurface_threshold", "a finite number > 0", self.isosurface_threshold)
        if not 0.0 <= self.min_opacity < 1.0:
            bad("min_opacity", "in [0, 1)", self.min_opacity)
        if not (math.isfinite(self.cutoff_sigma) and 1.0 <= self.cutoff_sigma <= 10.0):
            bad("cutoff_sigma", "in [1, 10]", self.cutoff_sigma)
        if not isinstance(self.chunk_size, int) or self.chunk_size < 4096:
            bad("chunk_size", "an integer >= 4096", self.chunk_size)
        if not 0.0 <= self.min_component_fraction <= 1.0:
            bad("min_component_fraction", "in [0, 1]", self.min_component_fraction)
        if not isinstance(self.smooth_iterations, int) or self.smooth_iterations < 0:
            bad("smooth_iterations", "an integer >= 0", self.smooth_iterations)
        if not isinstance(self.decimate_target, int) or (self.decimate_target != 0 and self.decimate_target < 4):
            bad("decimate_target", "0 (off) or an integer >= 4", self.decimate_target)
        if not isinstance(self.texture_size, int) or not 16 <= self.texture_size <= 8192:
            bad("texture_size", "an integer in 16..8192", self.texture_size)
        if self.color_mode not in COLOR_MODES:
            bad("color_mode", f"one of {COLOR_MODES}", self.color_mode)
        if not isinstance(self.color_knn, int) or not 1 <= self.color_knn <= 256:
            bad("color_knn", "an integer in 1..256", self.color_knn)
        if not isinstance(self.uv_padding, int) or not 0 <= self.uv_padding <= 64:
            bad("uv_padding", "an integer in 0..64", self.uv_padding)
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
    if isinstance(bounds, (int, float)) and not isinstance(bounds, bool):
        if not (math.isfinite(bounds) and bounds > 0):
            raise ValueError(f"{name} as a radius must be a finite number > 0, got {bounds!r}")
        return float(bounds)
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

    @property
    def num(self) -> int:
        return int(self.means.shape[0])


def gaussian_field(params: Dict[str, Tensor], min_opacity: float = 0.005, cutoff_sigma: float = 3.0, device=None) -> GaussianField:
    """Activate raw parameters (``means, scales`` log std, ``quats`` wxyz, ``opacities`` logits, ``sh0, shN``) and keep
    the Gaussians with opacity >= ``min_opacity``.

    Raises:
        MeshExportError: no Gaussians, non-finite parameters, or every Gaussian below ``min_opacity``.
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
    means = p["means"][keep]
    scales = torch.exp(p["scales"][keep])
    quats = F.normalize(p["quats"][keep], dim=-1)
    covars, precis = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=True, triu=False)
    ext = cutoff_sigma * torch.sqrt(torch.diagonal(covars, dim1=-2, dim2=-1).clamp_min(0))
    sh = torch.cat([p["sh0"][keep], p["shN"][keep]], dim=1)
    return GaussianField(means, precis, ext, opac[keep], sh, float(cutoff_sigma))


def density_at(points: Tensor, gf: GaussianField) -> Tensor:
    """Brute-force truncated density ``D(x)`` at ``points [P, 3]`` (reference for tests; O(P N) memory)."""
    d = points[:, None, :] - gf.means[None]  # [P, N, 3]
    m2 = torch.einsum("pni,nij,pnj->pn", d, gf.precisions, d)
    w = gf.opacities[None] * torch.exp(-0.5 * m2) * (m2 <= gf.cutoff_sigma**2)
    return w.sum(1)


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


def density_grid(gf: GaussianField, grid: Grid, chunk_size: int = 4_194_304, values: Optional[Tensor] = None) -> Tensor:
    """Truncated density ``D`` at every node of ``grid``, shape ``grid.dims`` (float32, on ``gf``'s device).

    Every Gaussian adds ``o exp(-m^2/2)`` (``m`` its Mahalanobis distance, ``m <= cutoff_sigma``) to the nodes
    of its cutoff ellipsoid's bounding box.  Gaussians are grouped by box size and processed in chunks of at
    most ``chunk_size`` (Gaussian, node) pairs; a box larger than a chunk is split into slabs.
    ``values [N, C]``: also accumulate ``sum_i w_i values_i`` (returned as ``[C+1, *dims]``, density first).
    """
    dev = gf.means.device
    dims = torch.tensor(grid.dims, device=dev)
    origin = torch.as_tensor(grid.origin, dtype=torch.float32, device=dev)
    c2 = gf.cutoff_sigma**2
    nch = 1 + (0 if values is None else values.shape[1])
    out = torch.zeros((nch, int(np.prod(grid.dims))), dtype=torch.float32, device=dev)
    i0 = torch.ceil((gf.means - gf.extents - origin) / grid.voxel).long().clamp_min(0)
    i1 = torch.floor((gf.means + gf.extents - origin) / grid.voxel).long()
    i1 = torch.minimum(i1, dims - 1)
    side = i1 - i0 + 1  # [N, 3]
    inside = (side > 0).all(1)
    sel = torch.nonzero(inside).squeeze(1)
    if sel.numel() == 0:
        return out.reshape(nch, *grid.dims)[0] if values is None else out.reshape(nch, *grid.dims)
    s = side[sel].amax(1)
    order = torch.argsort(s)
    sel, s = sel[order], s[order]
    uniq, counts = torch.unique_consecutive(s, return_counts=True)
    dy, dz = grid.dims[1], grid.dims[2]
    base_flat = (i0[:, 0] * dy + i0[:, 1]) * dz + i0[:, 2]
    base_d = origin + grid.voxel * i0.float() - gf.means  # offset of each box's first node from the centre
    start = 0
    for sv, cnt in zip(uniq.tolist(), counts.tolist()):
        ids = sel[start : start + cnt]
        start += cnt
        ar = torch.arange(sv, device=dev)
        if sv**3 <= chunk_size:
            offs = torch.stack(torch.meshgrid(ar, ar, ar, indexing="ij"), -1).reshape(-1, 3)  # [s^3, 3]
            per = max(1, chunk_size // sv**3)
            for b in range(0, ids.numel(), per):
                _splat(out, gf, ids[b : b + per], offs, side, base_flat, base_d, grid, c2, values)
        else:  # huge boxes: one Gaussian at a time, in x-slabs
            slab = max(1, chunk_size // sv**2)
            for g in ids.tolist():
                gi = torch.tensor([g], device=dev)
                for x0 in range(0, sv, slab):
                    ax = torch.arange(x0, min(sv, x0 + slab), device=dev)
                    offs = torch.stack(torch.meshgrid(ax, ar, ar, indexing="ij"), -1).reshape(-1, 3)
                    _splat(out, gf, gi, offs, side, base_flat, base_d, grid, c2, values)
    out = out.reshape(nch, *grid.dims)
    return out[0] if values is None else out


def _splat(out, gf, ids, offs, side, base_flat, base_d, grid, c2, values):
    """Add the Gaussians ``ids`` to the nodes ``i0 + offs`` of their boxes (``offs [M, 3]``, shared by the chunk)."""
    dy, dz = grid.dims[1], grid.dims[2]
    sd = side[ids]  # [B, 3]
    valid = (offs[None, :, 0] < sd[:, 0:1]) & (offs[None, :, 1] < sd[:, 1:2]) & (offs[None, :, 2] < sd[:, 2:3])
    o = offs.float() * grid.voxel  # [M, 3]
    bd = base_d[ids]  # [B, 3]
    d0 = bd[:, 0:1] + o[None, :, 0]
    d1 = bd[:, 1:2] + o[None, :, 1]
    d2 = bd[:, 2:3] + o[None, :, 2]
    P = gf.precisions[ids]  # [B, 3, 3], symmetric
    m2 = (P[:, 0, 0, None] * d0 * d0 + P[:, 1, 1, None] * d1 * d1 + P[:, 2, 2, None] * d2 * d2
          + 2.0 * (P[:, 0, 1, None] * d0 * d1 + P[:, 0, 2, None] * d0 * d2 + P[:, 1, 2, None] * d1 * d2))
    valid &= m2 <= c2
    w = torch.where(valid, gf.opacities[ids][:, None] * torch.exp(-0.5 * m2), torch.zeros((), device=m2.device))
    off_flat = (offs[:, 0] * dy + offs[:, 1]) * dz + offs[:, 2]
    flat = (base_flat[ids][:, None] + off_flat[None]).masked_fill(~valid, 0).reshape(-1)
    out[0].index_add_(0, flat, w.reshape(-1))
    if values is not None:
        v = values[ids]  # [B, C]
        for c in range(v.shape[1]):
            out[1 + c].index_add_(0, flat, (w * v[:, c : c + 1]).reshape(-1))


# ----------------------------------------------------------------------------------------------- surface
def extract_isosurface(density: Tensor, grid: Grid, level: float, fill_interior: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Marching cubes (PyMCubes) of ``density`` at ``level``; vertices ``[V, 3]`` in world coordinates, faces ``[F, 3]``.

    ``fill_interior``: voxels below ``level`` that are not connected (6-neighbourhood) to the grid's outside are
    raised above it first (``scipy.ndimage.binary_fill_holes``), leaving only the outer surface.
    """
    import mcubes
    from scipy import ndimage

    vol = density.detach().float().cpu().numpy()
    if fill_interior:
        occ = vol >= level
        cavity = ndimage.binary_fill_holes(occ) & ~occ
        if cavity.any():
            vol = vol.copy()
            vol[cavity] = 2.0 * level
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

    mesh = trimesh.Trimesh(vertices=verts, faces=faces, process=True, validate=True)
    if min_component_fraction > 0 and len(mesh.faces):
        parts = mesh.split(only_watertight=False)
        if len(parts) > 1:
            biggest = max(len(p.faces) for p in parts)
            parts = [p for p in parts if len(p.faces) >= min_component_fraction * biggest]
            mesh = trimesh.util.concatenate(parts)
    if smooth_iterations > 0:
        trimesh.smoothing.filter_taubin(mesh, iterations=int(smooth_iterations))
    if decimate_target and len(mesh.faces) > decimate_target:
        mesh = mesh.simplify_quadric_decimation(face_count=int(decimate_target))
        mesh = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, process=True, validate=True)
    mesh.fix_normals()
    return mesh


# ----------------------------------------------------------------------------------------------- colour
def gaussian_colors_at(points: Tensor, gf: GaussianField, normals: Optional[Tensor] = None, mode: str = "dc", knn: int = 16, chunk: int = 65536) -> Tensor:
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
    for s in range(0, points.shape[0], chunk):
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


def bake_texture(verts: Tensor, faces: Tensor, uvs: Tensor, vnormals: Tensor, gf: GaussianField, size: int, mode: str = "dc", knn: int = 16) -> Tuple[np.ndarray, float]:
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
    cols = gaussian_colors_at(pts, gf, nrm, mode=mode, knn=knn)
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


def gaussians_to_mesh(params: Dict[str, Tensor], settings: Optional[MeshSettings] = None, device=None, prefix: str = "", **overrides) -> MeshResult:
    """The whole pipeline on raw Gaussian parameters (see the module docstring).

    Raises:
        ValueError: bad settings (named ``prefix + key``).
        MeshExportError: empty / fully transparent model, grid cutting the scene, no surface at the level.
    """
    import trimesh
    from PIL import Image

    s = settings if settings is not None else MeshSettings()
    if overrides:
        s = MeshSettings.from_dict({**asdict(s), **overrides}, prefix)
    s.check(prefix)
    gf = gaussian_field(params, s.min_opacity, s.cutoff_sigma, device=device)
    grid = make_grid(gf, s.bounds, s.resolution)
    check_grid_fits_memory(grid, gf.means.device, prefix + "resolution")
    dens = density_grid(gf, grid, s.chunk_size)
    if s.bounds != "auto":
        if s.crop_to_bounds:
            for sl in ((0,), (-1,), (slice(None), 0), (slice(None), -1), (slice(None), slice(None), 0), (slice(None), slice(None), -1)):
                dens[sl] = 0.0  # closes the surface where the bounds cut it
        else:
            check_grid_holds_scene(dens, s.isosurface_threshold, prefix + "bounds")
    peak = float(dens.max())
    if peak < s.isosurface_threshold:
        raise MeshExportError(
            f"no surface: the density peaks at {peak:.3g} < {prefix}isosurface_threshold={s.isosurface_threshold} "
            f"({gf.num} visible Gaussians on a {grid.dims} grid); lower {prefix}isosurface_threshold"
            + ("" if s.bounds == "auto" else f" or check {prefix}bounds")
        )
    verts, faces = extract_isosurface(dens, grid, s.isosurface_threshold, s.fill_interior)
    del dens
    if len(faces) == 0:
        raise MeshExportError(f"marching cubes found no triangles at {prefix}isosurface_threshold={s.isosurface_threshold}")
    mc_faces = len(faces)
    welded = clean_mesh(verts, faces, s.min_component_fraction, s.smooth_iterations, s.decimate_target)
    dev = gf.means.device
    v = torch.as_tensor(np.array(welded.vertices), dtype=torch.float32, device=dev)
    vn = torch.as_tensor(np.array(welded.vertex_normals), dtype=torch.float32, device=dev)
    vcol = gaussian_colors_at(v, gf, vn, mode=s.color_mode, knn=s.color_knn).cpu().numpy()
    vmap, tfaces, uvs = uv_unwrap(np.asarray(welded.vertices), np.asarray(welded.faces), s.texture_size, s.uv_padding)
    tv = v[torch.as_tensor(vmap, device=dev)]
    tvn = vn[torch.as_tensor(vmap, device=dev)]
    tf = torch.as_tensor(tfaces, device=dev)
    img, coverage = bake_texture(tv, tf, torch.as_tensor(uvs, dtype=torch.float32, device=dev), tvn, gf, s.texture_size, s.color_mode, s.color_knn)
    material = trimesh.visual.material.PBRMaterial(
        name="material_0", baseColorTexture=Image.fromarray(img), metallicFactor=0.0, roughnessFactor=1.0
    )
    visual = trimesh.visual.TextureVisuals(uv=uvs, material=material)
    mesh = trimesh.Trimesh(vertices=tv.cpu().numpy(), faces=tfaces, visual=visual, process=False)
    stats = {
        "gaussians": float(gf.num), "grid_x": float(grid.dims[0]), "grid_y": float(grid.dims[1]), "grid_z": float(grid.dims[2]),
        "voxel": grid.voxel, "density_peak": peak, "marching_cubes_faces": float(mc_faces),
        "faces": float(len(welded.faces)), "vertices": float(len(welded.vertices)), "texture_coverage": coverage,
        "watertight": float(welded.is_watertight),
    }
    return MeshResult(mesh, vcol, welded, grid, stats)


# ----------------------------------------------------------------------------------------------- files
def mesh_file_bytes(result: MeshResult, name: str = "model", formats: Sequence[str] = ("obj", "glb")) -> Dict[str, bytes]:
    """File name -> contents: ``name.obj`` + ``name.mtl`` + ``name.png`` (obj), ``name.glb``, ``name.ply`` (vertex colours)."""
    import io

    import trimesh

    files: Dict[str, bytes] = {}
    mesh = result.mesh
    if "obj" in formats:
        img = mesh.visual.material.baseColorTexture
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        simple = trimesh.visual.material.SimpleMaterial(image=img, name="material_0", diffuse=[255, 255, 255, 255], ambient=[255, 255, 255, 255], specular=[0, 0, 0, 255])
        m = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, visual=trimesh.visual.TextureVisuals(uv=mesh.visual.uv, material=simple), process=False)
        text, tex = trimesh.exchange.obj.export_obj(m, include_normals=False, include_color=False, include_texture=True, return_texture=True, mtl_name=f"{name}.mtl")
        # rename the texture trimesh names after the material to <name>.png (in the MTL too)
        mtl = tex[f"{name}.mtl"].decode("utf-8")
        for key in list(tex):
            if key.lower().endswith(".png"):
                mtl = mtl.replace(key, f"{name}.png")
        files[f"{name}.obj"] = text.encode("utf-8")
        files[f"{name}.mtl"] = mtl.encode("utf-8")
        files[f"{name}.png"] = buf.getvalue()
    if "glb" in formats:
        files[f"{name}.glb"] = trimesh.exchange.gltf.export_glb(trimesh.Scene(mesh))
    if "ply" in formats:
        w = result.welded
        vc = (np.clip(result.vertex_colors, 0, 1) * 255 + 0.5).astype(np.uint8)
        pm = trimesh.Trimesh(vertices=w.vertices, faces=w.faces, vertex_colors=np.concatenate([vc, np.full((len(vc), 1), 255, np.uint8)], 1), process=False)
        files[f"{name}.ply"] = trimesh.exchange.ply.export_ply(pm, encoding="binary")
    return files


def write_mesh_files(result: MeshResult, folder: str, name: str = "model", formats: Sequence[str] = ("obj", "glb")) -> List[str]:
    """Write :func:`mesh_file_bytes` into ``folder``, each file atomically (temporary file + rename); returns the paths.
    The PNG and MTL are written before the OBJ that references them."""
    files = mesh_file_bytes(result, name, formats)
    order = sorted(files, key=lambda k: (k.endswith(".obj"), k))
    return [_atomic_write_bytes(os.path.join(folder, k), files[k]) for k in order]


def export_ply_to_mesh(ply_path: str, out_dir: str, name: str = "model", device: Optional[str] = None, **settings) -> Tuple[List[str], MeshResult]:
    """Python entry point: a 3DGS PLY (e.g. ``gsplat-ply-exporter``'s) -> textured mesh files in ``out_dir``.

    ``settings``: :class:`MeshSettings` fields (``resolution``, ``isosurface_threshold``, ``formats``, ...).
    """
    from scoredistill.geometry.gaussians import load_gaussians_ply

    s = MeshSettings.from_dict(settings)
    params = load_gaussians_ply(ply_path)
    result = gaussians_to_mesh(params, s, device=device)
    return write_mesh_files(result, out_dir, name, s.formats), result


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

    from scoredistill.geometry.gaussians import sample_mesh_surface

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
