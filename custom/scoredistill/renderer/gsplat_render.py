"""Gaussian rasterization: ``gsplat.rasterization`` on CUDA, a pure-torch fallback with gsplat's rules on CPU.

Plain torch + gsplat, no threestudio import.

gsplat 1.5.3 has no CPU path (its projection, tile intersection, SH and compositing call CUDA kernels).
:func:`rasterize_cpu` is a test/CPU-smoke path that reproduces gsplat's *classic* 3DGS rasterization
(Kerbl et al. 2023, Eq. 2-3 and the EWA projection of Zwicker et al. 2002) with gsplat's own pure-torch
helpers from ``gsplat.cuda._torch_impl`` (private in 1.5.x; world->camera transform, perspective
projection with the frustum clamp of the Jacobian, covariances from quaternions/scales, SH evaluation)
and gsplat's CUDA compositing rules written out in torch (autograd gives the backward pass):

* 2D covariance blurred by ``eps2d`` (0.3 px), conic = its inverse, culled when ``det <= 0``;
* culled when depth is outside ``[near_plane, far_plane]``, when opacity < 1/255, when the
  opacity-aware radius ``ceil(min(3.33, sqrt(2 ln(255 o))) * sqrt(Sigma_ii))`` is ``<= radius_clip``
  on both axes, or when the radius box misses the image;
* a Gaussian is composited in the 16x16 tiles its radius box overlaps, in increasing camera depth;
* per pixel (centre at ``+0.5``): ``sigma = 0.5 (a dx^2 + c dy^2) + b dx dy``,
  ``alpha = min(0.999, o exp(-sigma))``; skipped when ``sigma < 0`` or ``alpha < 1/255``; the pixel stops
  (exclusively) at the first Gaussian with ``T (1 - alpha) <= 1e-4``;
  ``C = sum_i c_i alpha_i T_i + T_final * background``, rendered alpha ``1 - T_final``;
* SH colours ``max(SH(mean - camera_centre) + 0.5, 0)``; ``RGB+ED`` appends the alpha-normalised
  expected depth ``sum_i z_i alpha_i T_i / max(alpha, 1e-10)``; ``antialiased`` multiplies the
  opacity by ``sqrt(det(Sigma) / det(Sigma + eps2d I))``.

The ``meta`` dict mirrors gsplat's non-packed ``info`` (``means2d [C, N, 2]`` with gradient, ``radii
[C, N, 2]``, ``depths``, ``conics``, ``width``, ``height``, ``n_cameras``, ``gaussian_ids = None``), so
``gsplat.strategy.DefaultStrategy`` densifies from it unchanged.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ..sync import cpu_path

ALPHA_THRESHOLD = 1.0 / 255.0
TRANSMITTANCE_MIN = 1e-4
MAX_ALPHA = 0.999
RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
RASTERIZE_MODES = ("classic", "antialiased")


def _torch_impl():
    from gsplat.cuda import _torch_impl  # private helpers of gsplat 1.5.x (pure torch)

    return _torch_impl


def project_gaussians_cpu(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    antialiased: bool = False,
) -> Dict[str, Tensor]:
    """EWA projection with gsplat's culling rules (see module docstring).

    Shapes: means ``[N,3]``, quats ``[N,4]`` (any norm), scales ``[N,3]`` (> 0), opacities ``[N]`` in
    [0, 1], viewmats ``[C,4,4]``, Ks ``[C,3,3]``.  Returns ``radii [C,N,2]`` (int32, 0 = culled),
    ``means2d [C,N,2]``, ``depths [C,N]``, ``conics [C,N,3]``, ``opacities [C,N]`` (compensated when
    antialiased).
    """
    ti = _torch_impl()
    covars, _ = ti._quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False)
    means_c, covars_c = ti._world_to_cam(means, covars, viewmats)
    means2d, cov2d = ti._persp_proj(means_c, covars_c, Ks, width, height)
    det_orig = cov2d[..., 0, 0] * cov2d[..., 1, 1] - cov2d[..., 0, 1] * cov2d[..., 1, 0]
    cov2d = cov2d + torch.eye(2, dtype=means.dtype, device=means.device) * eps2d
    det = cov2d[..., 0, 0] * cov2d[..., 1, 1] - cov2d[..., 0, 1] * cov2d[..., 1, 0]
    valid = det > 0
    det_safe = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack(
        [cov2d[..., 1, 1] / det_safe, -cov2d[..., 0, 1] / det_safe, cov2d[..., 0, 0] / det_safe], dim=-1
    )
    depths = means_c[..., 2]
    opac = opacities[None].expand(depths.shape)
    if antialiased:
        comp = torch.sqrt(torch.clamp(det_orig / det_safe, min=0.0))
        opac = opac * comp
    with torch.no_grad():
        valid = valid & (depths >= near_plane) & (depths <= far_plane) & (opac >= ALPHA_THRESHOLD)
        extend = torch.clamp(torch.sqrt(2.0 * torch.log(opac.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD)), max=3.33)
        rx = torch.ceil(extend * torch.sqrt(cov2d[..., 0, 0].clamp_min(0)))
        ry = torch.ceil(extend * torch.sqrt(cov2d[..., 1, 1].clamp_min(0)))
        valid = valid & ~((rx <= radius_clip) & (ry <= radius_clip))
        mx, my = means2d[..., 0], means2d[..., 1]
        outside = (mx + rx <= 0) | (mx - rx >= width) | (my + ry <= 0) | (my - ry >= height)
        valid = valid & ~outside
        radii = torch.stack([rx, ry], dim=-1) * valid[..., None]
        radii = radii.to(torch.int32)
    return {"radii": radii, "means2d": means2d, "depths": depths, "conics": conics, "opacities": opac}


def composite_cpu(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    colors: Tensor,
    depths: Tensor,
    radii: Tensor,
    width: int,
    height: int,
    tile_size: int = 16,
    backgrounds: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Tiled front-to-back alpha compositing with gsplat's CUDA rules, in torch (differentiable).

    Shapes: means2d ``[C,N,2]``, conics ``[C,N,3]``, opacities ``[C,N]``, colors ``[C,N,D]``,
    depths ``[C,N]``, radii ``[C,N,2]``, backgrounds ``[C,D]`` or None.
    Returns ``colors [C,H,W,D]`` and ``alphas [C,H,W,1]``.
    """
    n_cam, _, d = colors.shape
    tw = math.ceil(width / tile_size)
    th = math.ceil(height / tile_size)
    dev, dt = means2d.device, means2d.dtype
    ly, lx = torch.meshgrid(torch.arange(tile_size, device=dev), torch.arange(tile_size, device=dev), indexing="ij")
    local = torch.stack([lx.reshape(-1), ly.reshape(-1)], dim=-1).to(dt)  # [P, 2] (x, y)
    out_rgb, out_alpha = [], []
    for c in range(n_cam):
        with torch.no_grad():
            vis = (radii[c] > 0).all(dim=-1)
            ids = torch.nonzero(vis).squeeze(-1)
            order = torch.sort(depths[c, ids], stable=True).indices
            ids = ids[order]
            m = means2d[c, ids].detach()
            r = radii[c, ids].to(dt)
            tmin = torch.stack(
                [torch.floor(m[:, 0] / tile_size - r[:, 0] / tile_size).clamp(0, tw),
                 torch.floor(m[:, 1] / tile_size - r[:, 1] / tile_size).clamp(0, th)], dim=-1)
            tmax = torch.stack(
                [torch.ceil(m[:, 0] / tile_size + r[:, 0] / tile_size).clamp(0, tw),
                 torch.ceil(m[:, 1] / tile_size + r[:, 1] / tile_size).clamp(0, th)], dim=-1)
        mc, cc, oc, colc = means2d[c, ids], conics[c, ids], opacities[c, ids], colors[c, ids]
        tiles_rgb, tiles_t = [], []
        for ty in range(th):
            for tx in range(tw):
                sel = (tmin[:, 0] <= tx) & (tx < tmax[:, 0]) & (tmin[:, 1] <= ty) & (ty < tmax[:, 1])
                g = torch.nonzero(sel).squeeze(-1)
                p = local + torch.tensor([tx * tile_size + 0.5, ty * tile_size + 0.5], dtype=dt, device=dev)
                if g.numel() == 0:
                    tiles_rgb.append(torch.zeros(p.shape[0], d, dtype=dt, device=dev))
                    tiles_t.append(torch.ones(p.shape[0], dtype=dt, device=dev))
                    continue
                delta = mc[g][None, :, :] - p[:, None, :]  # [P, G, 2]
                cg = cc[g]
                sigma = 0.5 * (cg[None, :, 0] * delta[..., 0] ** 2 + cg[None, :, 2] * delta[..., 1] ** 2) + cg[
                    None, :, 1
                ] * delta[..., 0] * delta[..., 1]
                alpha = torch.clamp_max(oc[g][None, :] * torch.exp(-sigma), MAX_ALPHA)
                keep = (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)
                alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
                with torch.no_grad():
                    t_after = torch.cumprod(1.0 - alpha, dim=1)
                    alive = t_after > TRANSMITTANCE_MIN  # exclusive stop: a prefix per pixel
                alpha = torch.where(alive, alpha, torch.zeros_like(alpha))
                one_minus = 1.0 - alpha
                t_incl = torch.cumprod(one_minus, dim=1)
                t_excl = torch.cat([torch.ones_like(t_incl[:, :1]), t_incl[:, :-1]], dim=1)
                w = alpha * t_excl  # [P, G]
                cg_col = colc[g]
                if bool(torch.isfinite(cg_col).all()):
                    tiles_rgb.append(w @ cg_col)
                else:
                    # gsplat's kernel reads a colour only where its Gaussian contributes (alpha >= 1/255): a
                    # non-finite colour must not reach the tile's other pixels through 0 * NaN in the matmul
                    contrib = (w != 0)[:, :, None]
                    tiles_rgb.append(torch.where(contrib, w[:, :, None] * cg_col[None], torch.zeros((), dtype=dt, device=dev)).sum(1))
                tiles_t.append(t_incl[:, -1])
        rgb = torch.stack(tiles_rgb).reshape(th, tw, tile_size, tile_size, d)
        rgb = rgb.permute(0, 2, 1, 3, 4).reshape(th * tile_size, tw * tile_size, d)[:height, :width]
        t = torch.stack(tiles_t).reshape(th, tw, tile_size, tile_size)
        t = t.permute(0, 2, 1, 3).reshape(th * tile_size, tw * tile_size)[:height, :width]
        if backgrounds is not None:
            rgb = rgb + t[..., None] * backgrounds[c]
        out_rgb.append(rgb)
        out_alpha.append((1.0 - t)[..., None])
    return torch.stack(out_rgb), torch.stack(out_alpha)


def _check_modes(render_mode: str, rasterize_mode: str) -> None:
    if render_mode not in RENDER_MODES:
        raise ValueError(f"render_mode must be one of {RENDER_MODES}, got {render_mode!r}")
    if rasterize_mode not in RASTERIZE_MODES:
        raise ValueError(f"rasterize_mode must be one of {RASTERIZE_MODES}, got {rasterize_mode!r}")


def rasterize_cpu(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: Optional[int] = None,
    tile_size: int = 16,
    backgrounds: Optional[Tensor] = None,
    render_mode: str = "RGB",
    rasterize_mode: str = "classic",
) -> Tuple[Tensor, Tensor, Dict]:
    """Pure-torch counterpart of ``gsplat.rasterization(..., packed=False)`` for one batch of cameras.

    Arguments and outputs as gsplat's (no batch dims): colors ``[N, D]`` post-activation, or SH
    coefficients ``[N, K, 3]`` with ``sh_degree``; returns ``render_colors [C,H,W,D']``,
    ``render_alphas [C,H,W,1]`` and ``meta``.
    """
    _check_modes(render_mode, rasterize_mode)
    n_cam = viewmats.shape[0]
    proj = project_gaussians_cpu(
        means, quats, scales, opacities, viewmats, Ks, width, height,
        near_plane=near_plane, far_plane=far_plane, radius_clip=radius_clip, eps2d=eps2d,
        antialiased=rasterize_mode == "antialiased",
    )
    if sh_degree is None:
        cols = colors[None].expand(n_cam, *colors.shape) if colors.dim() == 2 else colors
    else:
        if (sh_degree + 1) ** 2 > colors.shape[-2]:
            raise ValueError(f"sh_degree {sh_degree} needs {(sh_degree + 1) ** 2} SH coefficients, got {colors.shape[-2]}")
        campos = torch.linalg.inv(viewmats)[:, :3, 3]  # [C, 3]
        dirs = means[None] - campos[:, None]  # [C, N, 3]
        shs = colors[None].expand(n_cam, *colors.shape)
        cols = _torch_impl()._spherical_harmonics(sh_degree, dirs, shs)
        cols = torch.clamp_min(cols + 0.5, 0.0)
    bgs = backgrounds
    if render_mode in ("RGB+D", "RGB+ED"):
        cols = torch.cat([cols, proj["depths"][..., None]], dim=-1)
        if bgs is not None:
            bgs = torch.cat([bgs, torch.zeros_like(bgs[..., :1])], dim=-1)
    elif render_mode in ("D", "ED"):
        cols = proj["depths"][..., None]
        if bgs is not None:
            bgs = torch.zeros_like(bgs[..., :1])
    render_colors, render_alphas = composite_cpu(
        proj["means2d"], proj["conics"], proj["opacities"], cols, proj["depths"], proj["radii"],
        width, height, tile_size=tile_size, backgrounds=bgs,
    )
    if render_mode in ("ED", "RGB+ED"):
        render_colors = torch.cat(
            [render_colors[..., :-1], render_colors[..., -1:] / render_alphas.clamp(min=1e-10)], dim=-1
        )
    meta = dict(proj)
    meta.update(
        {"width": width, "height": height, "n_cameras": n_cam, "tile_size": tile_size,
         "gaussian_ids": None, "camera_ids": None, "batch_ids": None, "backend": "cpu"}
    )
    return render_colors, render_alphas, meta


def _on_cuda(t: Tensor) -> bool:
    """Device test of :func:`rasterize`'s dispatch (one place, so the gsplat call contract test can drive the CUDA
    branch with CPU tensors and a stand-in ``gsplat.rasterization``)."""
    return bool(t.is_cuda)


def rasterize(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    backend: str = "auto",
    packed: bool = False,
    absgrad: bool = False,
    **kwargs,
) -> Tuple[Tensor, Tensor, Dict]:
    """Dispatch: ``gsplat.rasterization`` for CUDA tensors, :func:`rasterize_cpu` otherwise.

    Args:
        backend: ``"auto"`` (CUDA tensors -> gsplat, else CPU fallback), ``"cuda"`` or ``"cpu"``.
        packed, absgrad: passed to gsplat on CUDA (the CPU path is always non-packed, no absgrad).
        kwargs: near_plane, far_plane, radius_clip, eps2d, sh_degree, tile_size, backgrounds,
            render_mode, rasterize_mode.

    Raises:
        ValueError: unknown backend, or ``"cuda"`` with CPU tensors.
    """
    if backend not in ("auto", "cuda", "cpu"):
        raise ValueError(f"backend must be 'auto', 'cuda' or 'cpu', got {backend!r}")
    use_cuda = backend == "cuda" or (backend == "auto" and _on_cuda(means))
    if use_cuda:
        if not _on_cuda(means):
            raise ValueError("backend='cuda' needs the Gaussians on a CUDA device")
        import gsplat

        _check_modes(kwargs.get("render_mode", "RGB"), kwargs.get("rasterize_mode", "classic"))
        colors_out, alphas, meta = gsplat.rasterization(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height,
            packed=packed, absgrad=absgrad, **kwargs,
        )
        meta["backend"] = "cuda"
        return colors_out, alphas, meta
    if means.device.type != "cpu":
        return rasterize_cpu(means, quats, scales, opacities, colors, viewmats, Ks, width, height, **kwargs)
    with cpu_path():  # the CPU fallback runs on CPU tensors only: a GPU run takes gsplat's kernels above
        return rasterize_cpu(means, quats, scales, opacities, colors, viewmats, Ks, width, height, **kwargs)
