"""threestudio renderer ``gsplat-rasterizer``: renders ``gsplat-gaussian-splatting`` geometry.

Outputs like threestudio's renderers: ``comp_rgb [B,H,W,3]`` (background composited), ``comp_rgb_fg``,
``comp_rgb_bg``, ``opacity [B,H,W,1]``, ``depth [B,H,W,1]`` (alpha-normalised expected camera depth,
0 where nothing is hit) and ``gsplat_info`` (gsplat's ``info``/``meta`` dict, used for densification).
The background is threestudio's background module evaluated on the ray directions (``rays_d`` of the
batch, recomputed from the cameras if absent): ``comp_rgb = comp_rgb_fg + (1 - opacity) * bg``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from threestudio.models.renderers.base import Rasterizer

from scoredistill._registry import register
from scoredistill.renderer.gsplat_cameras import camera_ray_directions, threestudio_to_gsplat_cameras
from scoredistill.renderer.gsplat_render import RASTERIZE_MODES, rasterize
from scoredistill.settings import check_range, in_range, parse_settings


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

    @classmethod
    def validate_settings(cls, cfg, prefix: str = "system.renderer") -> "GsplatRasterizer.Config":
        """Parse and check a ``gsplat-rasterizer`` config (every number finite); returns the parsed ``Config``.

        Raises:
            ValueError: naming the full dotted setting (``{prefix}.eps2d``, ...) and its allowed range.
        """
        c = parse_settings(cls.Config, cfg, prefix)
        if c.backend not in ("auto", "cuda", "cpu"):
            raise ValueError(f"{prefix}.backend must be 'auto', 'cuda' or 'cpu', got {c.backend!r}")
        if c.rasterize_mode not in RASTERIZE_MODES:
            raise ValueError(f"{prefix}.rasterize_mode must be one of {RASTERIZE_MODES}, got {c.rasterize_mode!r}")
        if not (in_range(c.near_plane, 0, open_low=True) and in_range(c.far_plane) and c.near_plane < c.far_plane):
            raise ValueError(
                f"{prefix} needs finite 0 < {prefix}.near_plane < {prefix}.far_plane, got {c.near_plane}, {c.far_plane}"
            )
        check_range(c.eps2d, f"{prefix}.eps2d", 0)
        check_range(c.radius_clip, f"{prefix}.radius_clip", 0)
        check_range(c.tile_size, f"{prefix}.tile_size", 1, integer=True)
        return c

    def configure(self, geometry, material, background) -> None:
        self.validate_settings(self.cfg)
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
