"""``kernel-smoothed-volume-renderer``: a coarse-to-fine NeRF volume renderer with HiFA's kernel smoothing.

HiFA (Zhu et al., ICLR 2024), Sec. 4.2 "Kernel smoothing for coarse-to-fine importance sampling": the
coarse-stage weights along each ray are smoothed with a kernel (boxcar ``[1, 1, 1]`` by default,
trapezoidal ``[0.125, 0.75, 0.125]`` as an option) before inverse-CDF importance resampling, so that
the fine stage samples the whole neighbourhood of a density peak.  Ray ends are not wrapped
(:func:`scoredistill.maths.hifa.kernel_smooth`).

Works with any threestudio implicit geometry that outputs ``density`` (``implicit-volume`` ...), any
material and background.  Everything is batched per ray (``(n_rays, n_samples)`` tensors) and written in
torch plus nerfacc's batched ``render_weight_from_density``, so it runs on CPU as well as CUDA (nerfacc's
packed / sampling kernels are CUDA-only).

Per ray: ``near, far`` from the ray/bounding-box (``[-radius, radius]³``) intersection; ``N_c``
coarse samples (stratified in training, bin centres otherwise); coarse weights (no gradient) → kernel
smoothing → ``N_f`` fine samples by inverse CDF; the union (``N_c + N_f`` points, sorted) is shaded,
each point owning the interval between the midpoints to its neighbours.

Outputs are named like threestudio's ``nerf-volume-renderer``: ``comp_rgb``, ``comp_rgb_fg``,
``comp_rgb_bg``, ``opacity``, ``depth``, ``z_variance`` (HiFA Eq. 7 masked at opacity > 0.5, threestudio's
convention for its systems), ``z_variance_unmasked`` (Eq. 7 on every ray: ``hifa-system`` applies its own
mask to it, once), ``comp_normal`` (if the geometry outputs normals), and in training the per-point ``weights``,
``t_points``, ``t_intervals``, ``t_dirs``, ``ray_indices``, ``points`` and geometry outputs
(flattened, ``(n_rays · n_samples, ·)``), so threestudio's systems' regularisers work unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import nerfacc
import torch
import torch.nn.functional as F

from threestudio.models.renderers.base import VolumeRenderer

from .._registry import register
from ..settings import check_range, parse_settings, run_qualified
from ..maths.hifa import KS_PADDINGS, kernel_smooth, ray_depth_statistics, resolve_kernel, sample_pdf


def ray_aabb_near_far(rays_o: torch.Tensor, rays_d: torch.Tensor, bbox: torch.Tensor, near_plane: float, far_plane: float):
    """Slab-method ray/AABB intersection in torch: ``near, far`` (R,) and ``hit`` (R,) bool.

    Rays that miss the box get ``near = far`` (zero-length intervals, hence zero weights).
    """
    d = torch.where(rays_d.abs() < 1e-12, torch.full_like(rays_d, 1e-12), rays_d)
    t0 = (bbox[0] - rays_o) / d
    t1 = (bbox[1] - rays_o) / d
    t_near = torch.minimum(t0, t1).amax(-1).clamp(min=near_plane)
    t_far = torch.maximum(t0, t1).amin(-1).clamp(max=far_plane)
    hit = t_far > t_near
    t_near = torch.where(hit, t_near, torch.full_like(t_near, max(near_plane, 0.0)))
    t_far = torch.where(hit, t_far, t_near)
    return t_near, t_far, hit


@register("kernel-smoothed-volume-renderer")
class KernelSmoothedVolumeRenderer(VolumeRenderer):
    @dataclass
    class Config(VolumeRenderer.Config):
        #: coarse samples per ray (uniform / stratified) -- HiFA's reference code: 128
        num_samples_per_ray: int = 128
        #: fine samples per ray drawn from the smoothed coarse PDF -- reference code: 64
        num_samples_per_ray_importance: int = 64
        #: "boxcar" ([1,1,1], the paper) | "trapezoidal" ([0.125,0.75,0.125]) | "none" | odd-length list
        kernel_smoothing: Any = "boxcar"
        #: how samples beyond the ray ends enter the kernel: "zero" | "replicate" (never wrapped)
        kernel_padding: str = "zero"
        #: stratified coarse samples and random u for the inverse CDF in training
        randomized: bool = True
        near_plane: float = 0.0
        far_plane: float = 1e10
        #: rays per chunk in evaluation (training renders all rays at once)
        eval_chunk_size: int = 8192
        #: the ``z_variance`` output is masked where opacity > this (threestudio's systems read it);
        #: ``hifa-system`` masks ``z_variance_unmasked`` itself with system.z_variance_opacity_threshold
        z_variance_opacity_threshold: float = 0.5
        return_comp_normal: bool = False
        return_normal_perturb: bool = False

    cfg: Config

    @classmethod
    def validate_settings(cls, cfg, prefix: str = "system.renderer") -> "KernelSmoothedVolumeRenderer.Config":
        """The parsed config, checked: at least 2 coarse and 0 fine samples per ray, a known kernel and padding,
        ``far_plane > near_plane >= 0``, ``eval_chunk_size >= 1``; a ``ValueError`` names ``{prefix}.<setting>``."""
        c = parse_settings(cls.Config, cfg, prefix)
        check_range(c.num_samples_per_ray, f"{prefix}.num_samples_per_ray", 2, integer=True)
        check_range(c.num_samples_per_ray_importance, f"{prefix}.num_samples_per_ray_importance", 0, integer=True)
        run_qualified(lambda: cls.kernel_of(c), prefix, cls.Config)
        if c.kernel_padding not in KS_PADDINGS:
            raise ValueError(f"{prefix}.kernel_padding must be one of {KS_PADDINGS}, got {c.kernel_padding!r}")
        if not (c.far_plane > c.near_plane >= 0.0):
            raise ValueError(f"{prefix}: need far_plane > near_plane >= 0, got near_plane={c.near_plane}, "
                             f"far_plane={c.far_plane}")
        check_range(c.eval_chunk_size, f"{prefix}.eval_chunk_size", 1, integer=True)
        return c

    @staticmethod
    def kernel_of(cfg) -> Optional[Tuple[float, ...]]:
        """The smoothing kernel of ``cfg.kernel_smoothing`` (HiFA's kernels, ``resolve_kernel``)."""
        kernel = cfg.kernel_smoothing
        if not isinstance(kernel, (str, type(None))):
            kernel = list(kernel)
        return resolve_kernel(kernel)  # raises ValueError on a bad kernel

    def configure(self, geometry, material, background) -> None:
        cfg = self.validate_settings(self.cfg)
        self.kernel = self.kernel_of(cfg)
        super().configure(geometry, material, background)
        self.randomized = self.cfg.randomized

    # ------------------------------------------------------------------ sampling
    def _geometry_at(self, positions: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.geometry(positions, output_normal=self.material.requires_normal)

    def sample_along_rays(self, rays_o: torch.Tensor, rays_d: torch.Tensor):
        """Coarse + kernel-smoothed fine samples.  Returns a dict with ``t`` (R, S) sorted sample depths,
        ``t_starts``/``t_ends`` (R, S), ``geo`` (per-point geometry outputs, (R, S, ·)), ``hit`` (R,),
        and the coarse ``edges``/``coarse_weights``/``smoothed_weights`` (for inspection and tests)."""
        R = rays_o.shape[0]
        Nc, Nf = self.cfg.num_samples_per_ray, self.cfg.num_samples_per_ray_importance
        near, far, hit = ray_aabb_near_far(rays_o, rays_d, self.bbox, self.cfg.near_plane, self.cfg.far_plane)
        s = torch.linspace(0.0, 1.0, Nc + 1, device=rays_o.device, dtype=rays_o.dtype)
        edges = near[:, None] + (far - near)[:, None] * s[None, :]  # (R, Nc+1)
        u = torch.rand((R, Nc), device=rays_o.device, dtype=rays_o.dtype) if self.randomized else 0.5
        t_c = edges[:, :-1] + (edges[:, 1:] - edges[:, :-1]) * u  # (R, Nc)

        def geo_eval(t):
            pos = rays_o[:, None, :] + rays_d[:, None, :] * t[..., None]
            out = self._geometry_at(pos.reshape(-1, 3))
            return {k: v.reshape(R, t.shape[1], *v.shape[1:]) for k, v in out.items() if torch.is_tensor(v)}

        geo_c = geo_eval(t_c)
        with torch.no_grad():
            w_c, _, _ = nerfacc.render_weight_from_density(edges[:, :-1], edges[:, 1:], geo_c["density"][..., 0].detach())
            w_s = kernel_smooth(w_c, self.kernel, self.cfg.kernel_padding) if self.kernel is not None else w_c
        if Nf > 0:
            t_f = sample_pdf(edges, w_s, Nf, deterministic=not self.randomized)
            geo_f = geo_eval(t_f)
            t_all = torch.cat([t_c, t_f], 1)
            t_sorted, order = torch.sort(t_all, 1)
            geo = {}
            for k in geo_c:
                v = torch.cat([geo_c[k], geo_f[k]], 1)
                idx = order.reshape(R, -1, *([1] * (v.dim() - 2))).expand_as(v)
                geo[k] = torch.gather(v, 1, idx)
        else:
            t_sorted, geo = t_c, geo_c
        mids = 0.5 * (t_sorted[:, 1:] + t_sorted[:, :-1])
        t_starts = torch.cat([near[:, None], mids], 1)
        t_ends = torch.cat([mids, far[:, None]], 1)
        return {
            "t": t_sorted,
            "t_starts": t_starts,
            "t_ends": t_ends,
            "geo": geo,
            "hit": hit,
            "edges": edges,
            "coarse_weights": w_c,
            "smoothed_weights": w_s,
        }

    # ------------------------------------------------------------------ rendering
    def _render_rays(self, rays_o, rays_d, light_positions, keep_points: bool, **kwargs) -> Dict[str, torch.Tensor]:
        R = rays_o.shape[0]
        smp = self.sample_along_rays(rays_o, rays_d)
        t, geo = smp["t"], smp["geo"]
        S = t.shape[1]
        weights, _, _ = nerfacc.render_weight_from_density(smp["t_starts"], smp["t_ends"], geo["density"][..., 0])
        positions = rays_o[:, None, :] + rays_d[:, None, :] * t[..., None]
        dirs = rays_d[:, None, :].expand(R, S, 3)
        lights = light_positions[:, None, :].expand(R, S, 3)
        flat_geo = {k: v.reshape(R * S, *v.shape[2:]) for k, v in geo.items()}
        rgb = self.material(
            viewdirs=dirs.reshape(-1, 3),
            positions=positions.reshape(-1, 3),
            light_positions=lights.reshape(-1, 3),
            **flat_geo,
            **kwargs,
        ).reshape(R, S, -1)
        opacity, _, z_var = ray_depth_statistics(weights, t)
        out = {
            "comp_rgb_fg": (weights[..., None] * rgb).sum(1),
            "opacity": opacity[:, None],
            "depth": (weights * t).sum(1, keepdim=True),
            "z_variance": (z_var * (opacity > self.cfg.z_variance_opacity_threshold).to(z_var.dtype))[:, None],
            "z_variance_unmasked": z_var[:, None],
        }
        if "normal" in geo:
            n = F.normalize((weights[..., None] * geo["normal"]).sum(1), dim=-1)
            out["comp_normal"] = (n + 1.0) / 2.0 * opacity[:, None]
        if keep_points:
            out.update(
                {
                    "weights": weights.reshape(-1, 1),
                    "t_points": t.reshape(-1, 1),
                    "t_intervals": (smp["t_ends"] - smp["t_starts"]).reshape(-1, 1),
                    "t_dirs": dirs.reshape(-1, 3),
                    "ray_indices": torch.arange(R, device=t.device)[:, None].expand(R, S).reshape(-1),
                    "points": positions.reshape(-1, 3),
                    **flat_geo,
                }
            )
            if self.cfg.return_normal_perturb and "normal" in geo:
                out["normal_perturb"] = self._geometry_at(
                    out["points"] + torch.randn_like(out["points"]) * 1e-2
                )["normal"]
        return out

    def forward(self, rays_o, rays_d, light_positions, bg_color: Optional[torch.Tensor] = None, **kwargs) -> Dict[str, Any]:
        """Render ``rays_o, rays_d (B, H, W, 3)`` with ``light_positions (B, 3)``; see the module docstring."""
        B, H, W = rays_o.shape[:3]
        o = rays_o.reshape(-1, 3)
        d = rays_d.reshape(-1, 3)
        lp = light_positions.reshape(-1, 1, 1, 3).expand(-1, H, W, -1).reshape(-1, 3)
        if self.training:
            ray_out = self._render_rays(o, d, lp, keep_points=True, **kwargs)
        else:
            chunks = []
            for i in range(0, o.shape[0], self.cfg.eval_chunk_size):
                sl = slice(i, i + self.cfg.eval_chunk_size)
                chunks.append(self._render_rays(o[sl], d[sl], lp[sl], keep_points=False, **kwargs))
            ray_out = {k: torch.cat([c[k] for c in chunks], 0) for k in chunks[0]}
        comp_rgb_bg = self.background(dirs=rays_d)
        if bg_color is None:
            bg_color = comp_rgb_bg
        elif bg_color.shape[:-1] == (B,):
            bg_color = bg_color.reshape(B, 1, 1, -1).expand(-1, H, W, -1)
        if bg_color.shape[:-1] == (B, H, W):
            bg_color = bg_color.reshape(B * H * W, -1)
        opacity = ray_out["opacity"]
        comp_rgb = ray_out["comp_rgb_fg"] + bg_color * (1.0 - opacity)
        out = {
            "comp_rgb": comp_rgb.view(B, H, W, -1),
            "comp_rgb_fg": ray_out["comp_rgb_fg"].view(B, H, W, -1),
            "comp_rgb_bg": comp_rgb_bg.view(B, H, W, -1),
            "opacity": opacity.view(B, H, W, 1),
            "depth": ray_out["depth"].view(B, H, W, 1),
            "z_variance": ray_out["z_variance"].view(B, H, W, 1),
            "z_variance_unmasked": ray_out["z_variance_unmasked"].view(B, H, W, 1),
        }
        if "comp_normal" in ray_out and (self.cfg.return_comp_normal or not self.training):
            out["comp_normal"] = ray_out["comp_normal"].view(B, H, W, 3)
        if self.training:
            per_ray = {"comp_rgb_fg", "opacity", "depth", "z_variance", "z_variance_unmasked", "comp_normal"}
            out.update({k: v for k, v in ray_out.items() if k not in per_ray})
        return out

    def train(self, mode: bool = True):
        self.randomized = mode and self.cfg.randomized
        return super().train(mode=mode)

    def eval(self):
        self.randomized = False
        return super().eval()
