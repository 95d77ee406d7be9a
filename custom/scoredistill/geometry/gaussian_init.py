"""Initial 3D Gaussians: from points (the 3DGS rule), and the point sources of the papers' initialisations.

Plain functions over tensors; nothing here imports threestudio.

:func:`params_from_points` turns ``[N, 3]`` points (and colours) into raw parameters (layout in
:mod:`scoredistill.geometry.gaussian_params`) as 3DGS does (Kerbl et al. 2023, "3D Gaussian Splatting", Sec. 5).
The points come from a PLY point cloud (:func:`load_point_cloud`), a mesh surface (:func:`load_mesh`,
:func:`sample_mesh_surface`), a sphere or box (:func:`sample_sphere`, :func:`sample_box`) or a Shap-E mesh
(:func:`run_shap_e`, :func:`shap_e_mesh_to_points`), placed in threestudio's frame (:func:`apply_init_transform`) and
grown to the papers' counts (:func:`upsample_points`).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from scoredistill.geometry.gaussian_ply import check_finite_values, describe_source, read_ply
from scoredistill.geometry.spherical_harmonics import num_sh_bases, rgb_to_sh0, sh0_to_rgb


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
    ply = read_ply(path, setting)
    if "vertex" not in [e.name for e in ply.elements]:
        raise ValueError(f"{describe_source(path, setting)}: PLY has no vertex element")
    v = ply["vertex"]
    names = v.data.dtype.names
    if not all(p in names for p in ("x", "y", "z")):
        raise ValueError(f"{describe_source(path, setting)}: PLY vertices have no x, y, z")
    if len(v.data) == 0:
        raise ValueError(f"{describe_source(path, setting)}: the point cloud has no points")
    pts = torch.from_numpy(np.stack([np.asarray(v[p], dtype=np.float32) for p in "xyz"], 1))
    colors = None
    if all(p in names for p in ("red", "green", "blue")):
        colors = torch.from_numpy(_as_unit_colors(np.stack([np.asarray(v[p]) for p in ("red", "green", "blue")], 1)))
    elif all(p in names for p in ("f_dc_0", "f_dc_1", "f_dc_2")):
        dc = torch.from_numpy(np.stack([np.asarray(v[f"f_dc_{i}"], dtype=np.float32) for i in range(3)], 1))
        colors = sh0_to_rgb(dc).clamp(0, 1)
    check_finite_values(path, setting, {"x/y/z": pts, **({"colours": colors} if colors is not None else {})})
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
