"""threestudio renderer ``gsplat-rasterizer``: renders ``gsplat-gaussian-splatting`` geometry.

Outputs like threestudio's renderers: ``comp_rgb [B,H,W,3]`` (background composited), ``comp_rgb_fg``,
``comp_rgb_bg``, ``opacity [B,H,W,1]``, ``depth [B,H,W,1]`` (alpha-normalised expected camera depth,
0 where nothing is hit) and ``gsplat_info`` (gsplat's ``info``/``meta`` dict, used for densification).
The background is threestudio's background module evaluated on the ray directions (``rays_d`` of the
batch, recomputed from the cameras if absent): ``comp_rgb = comp_rgb_fg + (1 - opacity) * bg``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from threestudio.models.renderers.base import Rasterizer

from scoredistill._registry import register
from scoredistill.renderer.gsplat_cameras import camera_ray_directions, threestudio_to_gsplat_cameras
from scoredistill.renderer.gsplat_render import RASTERIZE_MODES, rasterize


def check_rasterizer_config(c, prefix: str = "system.renderer") -> None:
    """Validate a ``gsplat-rasterizer`` config (every number finite); raises ``ValueError`` naming the setting."""
    def finite(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if c.backend not in ("auto", "cuda", "cpu"):
        raise ValueError(f"{prefix}.backend must be 'auto', 'cuda' or 'cpu', got {c.backend!r}")
    if c.rasterize_mode not in RASTERIZE_MODES:
        raise ValueError(f"{prefix}.rasterize_mode must be one of {RASTERIZE_MODES}, got {c.rasterize_mode!r}")
    if not (finite(c.near_plane) and finite(c.far_plane) and 0 < c.near_plane < c.far_plane):
        raise ValueError(
            f"{prefix} needs finite 0 < {prefix}.near_plane < {prefix}.far_plane, got {c.near_plane}, {c.far_plane}"
        )
    if not (finite(c.eps2d) and c.eps2d >= 0):
        raise ValueError(f"{prefix}.eps2d must be a finite number >= 0, got {c.eps2d!r}")
    if not (finite(c.radius_clip) and c.radius_clip >= 0):
        raise ValueError(f"{prefix}.radius_clip must be a finite number >= 0, got {c.radius_clip!r}")
    if not (isinstance(c.tile_size, int) and c.tile_size >= 1):
        raise ValueError(f"{prefix}.tile_size must be an integer >= 1, got {c.tile_size!r}")


@register("gsplat-rasterizer")
class GsplatRasterizer(Rasterizer):
    @dataclass
    class Config(Rasterizer.Config):
        #: auto (gsplat CUDA for CUDA tensors, pure-torch fallback on CPU) | cuda | cpu
        backend: str = "auto"
        near_plane: float = 0.01
        far_plane: float = 1e10
        eps2d: float = 0.3
        radius_clip: float = 0.0
        tile_size: int = 16
        #: classic | antialiased (Mip-Splatting style opacity compensation, gsplat's option)
        rasterize_mode: str = "classic"
        #: gsplat packed mode on CUDA (the CPU fallback is always non-packed)
        packed: bool = False
        absgrad: bool = False

    cfg: Config

    def configure(self, geometry, material, background) -> None:
        check_rasterizer_config(self.cfg)
        super().configure(geometry, material, background)

    def forward(self, c2w, fovy, height: int, width: int, rays_d=None, **kwargs):
        height, width = int(height), int(width)
        geo = self.geometry
        viewmats, Ks = threestudio_to_gsplat_cameras(c2w, fovy, width, height)
        p = geo.activated()
        n_cam = viewmats.shape[0]
        sh_degree = int(getattr(geo, "active_sh_degree", 0))
        if p["means"].shape[0] == 0:
            rgb_fg = torch.zeros(n_cam, height, width, 3, device=c2w.device)
            opacity = torch.zeros(n_cam, height, width, 1, device=c2w.device)
            depth = torch.zeros_like(opacity)
            info = {"means2d": None, "radii": None, "width": width, "height": height, "n_cameras": n_cam}
        else:
            render, opacity, info = rasterize(
                p["means"], p["quats"], p["scales"], p["opacities"], p["colors"], viewmats, Ks, width, height,
                backend=self.cfg.backend, packed=self.cfg.packed, absgrad=self.cfg.absgrad,
                near_plane=self.cfg.near_plane, far_plane=self.cfg.far_plane, radius_clip=self.cfg.radius_clip,
                eps2d=self.cfg.eps2d, sh_degree=sh_degree, tile_size=self.cfg.tile_size,
                render_mode="RGB+ED", rasterize_mode=self.cfg.rasterize_mode,
            )
            rgb_fg, depth = render[..., :3], render[..., 3:4]
        if rays_d is None or tuple(rays_d.shape[1:3]) != (height, width):
            rays_d = camera_ray_directions(c2w, fovy, width, height)
        bg = self.background(dirs=rays_d)
        comp_rgb = rgb_fg + (1.0 - opacity) * bg
        return {
            "comp_rgb": comp_rgb,
            "comp_rgb_fg": rgb_fg,
            "comp_rgb_bg": bg,
            "opacity": opacity,
            "depth": depth,
            "gsplat_info": info,
        }
