"""Densification threshold: which ``grow_grad2d`` gives gsplat's statistic the densification rate that
LucidDreamer's ``densify_grad_threshold = 7.5e-4`` gives its own statistic (issue 14).

Both thresholds act on the same quantity: the mean, over the renders in a densification window in which a
Gaussian is visible (radius > 0), of the norm of its view-space (NDC) positional gradient.  They differ in
which renders enter the mean:

* **LucidDreamer** (``train.py``): renders ``C`` cameras per step (``C_batch_size``, 4 in its configs) in a
  loop, but after the loop ``viewspace_point_tensor`` / ``visibility_filter`` are those of the *last*
  camera, so ``add_densification_stats`` accumulates one of the C views per step (``xyz_gradient_accum +=
  ‖∇ mean2D‖``, ``denom += 1`` where visible).  Its guidance's ``SpecifyGradient`` gives every view its own
  gradient (no 1/C).
* **The pack** (``gsplat-system``, gsplat's ``DefaultStrategy``): one rasterisation of all C views; gsplat
  accumulates every visible (view, step) pair, after multiplying the per-view gradient by ``n_cameras`` (the
  pack's loss averages over views, so that undoes the 1/C) and by W/2, H/2 (pixel → NDC, as 3DGS).

So the per-view gradient is the same and both are means of it; gsplat's mean is over ~C times more
renders, hence less noisy.  With a threshold on a noisy mean, the noisier estimator sends more Gaussians
over the threshold when the threshold lies above most Gaussians' expected gradient (the usual regime: a
minority densifies per window).  :func:`measure` renders the same gradients through both rules (the pack's
CPU rasteriser, gsplat's own ``DefaultStrategy._update_state`` for the pack, a transcription of
LucidDreamer's ``add_densification_stats`` for the reference) and returns, for given reference
densification rates, the ratio ``τ_pack / τ_ref`` of the thresholds that densify the same fraction of
Gaussians.  Scale-free: the ratio depends on the rate, not on the gradient's magnitude.

Run ``python benchmarks/densify_threshold.py`` for the numbers; ``tests/test_densify_threshold.py`` runs a
smaller instance.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import torch
import torch.nn.functional as F

#: LucidDreamer's ``densify_grad_threshold`` (``arguments/__init__.py``), the pack's ``strategy.grow_grad2d``
LUCIDDREAMER_THRESHOLD = 7.5e-4


def _orbit_cameras(n: int, generator: torch.Generator, distance=(1.5, 2.0), elevation_deg=(-10.0, 45.0), fovy_deg=(40.0, 70.0)):
    """threestudio-style random cameras (c2w, OpenGL) looking at the origin, gs-sds.yaml's ranges."""
    u = torch.rand(n, 4, generator=generator)
    d = distance[0] + (distance[1] - distance[0]) * u[:, 0]
    el = torch.deg2rad(elevation_deg[0] + (elevation_deg[1] - elevation_deg[0]) * u[:, 1])
    az = 2 * math.pi * u[:, 2] - math.pi
    fovy = torch.deg2rad(fovy_deg[0] + (fovy_deg[1] - fovy_deg[0]) * u[:, 3])
    pos = torch.stack([d * torch.cos(el) * torch.cos(az), d * torch.cos(el) * torch.sin(az), d * torch.sin(el)], -1)
    fwd = F.normalize(-pos, dim=-1)
    up = torch.tensor([0.0, 0.0, 1.0]).expand_as(fwd)
    right = F.normalize(torch.cross(fwd, up, dim=-1), dim=-1)
    up = F.normalize(torch.cross(right, fwd, dim=-1), dim=-1)
    c2w = torch.eye(4).repeat(n, 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, up, -fwd, pos
    return c2w, fovy


def measure(
    n_gaussians: int = 2000,
    steps: int = 100,
    n_views: int = 4,
    size: int = 64,
    rates: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.2),
    seed: int = 0,
) -> Dict[str, object]:
    """Accumulate one densification window (``steps`` = ``refine_every``, 100 in gs-sds.yaml and
    LucidDreamer) of both statistics on the same gradients and match their thresholds by rate.

    Scene: ``n_gaussians`` isotropic Gaussians in a ball of radius 0.5 (scale 0.02, opacity 0.1, random
    colours: gs-sds.yaml's fallback initialisation), ``n_views`` random cameras per step.  Loss per step:
    ``mean_c <G_c, image_c>`` with ``G_c`` N(0, 1) noise drawn at 1/8 of the resolution and upsampled
    bilinearly (an SDS gradient arrives through the VAE encoder from the 1/8-resolution latents).

    Returns:
        ``{"rates": [...], "tau_ratio": [τ_pack/τ_ref per rate], "tau_ref": [...], "tau_pack": [...],
        "mean_count_pack": float, "mean_count_ref": float, "stat_ratio_mean": float}``;
        ``stat_ratio_mean`` is mean(gsplat statistic)/mean(LucidDreamer statistic) over Gaussians seen by both.
    """
    from gsplat.strategy import DefaultStrategy

    from ..renderer.gsplat_cameras import threestudio_to_gsplat_cameras
    from ..renderer.gsplat_render import rasterize_cpu

    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n_gaussians, 3, generator=g)
    means = F.normalize(u, dim=-1) * 0.5 * torch.rand(n_gaussians, 1, generator=g) ** (1 / 3)
    params = torch.nn.ParameterDict(
        {
            "means": torch.nn.Parameter(means),
            "quats": torch.nn.Parameter(F.normalize(torch.randn(n_gaussians, 4, generator=g), dim=-1)),
            "scales": torch.nn.Parameter(torch.full((n_gaussians, 3), math.log(0.02))),
            "opacities": torch.nn.Parameter(torch.full((n_gaussians,), math.log(0.1 / 0.9))),
            "colors": torch.nn.Parameter(torch.rand(n_gaussians, 3, generator=g)),
        }
    )
    strategy = DefaultStrategy(refine_scale2d_stop_iter=0)
    state = strategy.initialize_state(scene_scale=1.0)
    ref_accum = torch.zeros(n_gaussians)
    ref_denom = torch.zeros(n_gaussians)
    for _ in range(steps):
        c2w, fovy = _orbit_cameras(n_views, g)
        viewmats, Ks = threestudio_to_gsplat_cameras(c2w, fovy, size, size)
        img, _, info = rasterize_cpu(
            params["means"], params["quats"], torch.exp(params["scales"]), torch.sigmoid(params["opacities"]),
            params["colors"], viewmats, Ks, size, size,
        )
        info["means2d"].retain_grad()
        G = F.interpolate(torch.randn(n_views, 3, size // 8, size // 8, generator=g), (size, size), mode="bilinear", align_corners=False)
        loss = (G.permute(0, 2, 3, 1) * img).sum() / n_views  # the pack's losses average over the views
        loss.backward()
        with torch.no_grad():
            strategy._update_state(params, state, info, packed=False)  # gsplat: every visible (view, step)
            # LucidDreamer: only the last view's viewspace gradient (its own, no 1/C), in NDC like 3DGS
            grad = info["means2d"].grad[-1].clone() * n_views
            grad[:, 0] *= size / 2.0
            grad[:, 1] *= size / 2.0
            vis = (info["radii"][-1] > 0).all(dim=-1)
            ref_accum[vis] += grad[vis].norm(dim=-1)
            ref_denom[vis] += 1
        for p in params.values():
            p.grad = None
    pack = torch.nan_to_num(state["grad2d"] / state["count"], nan=0.0)
    ref = torch.nan_to_num(ref_accum / ref_denom, nan=0.0)
    both = (state["count"] > 0) & (ref_denom > 0)
    out = {"rates": list(rates), "tau_ref": [], "tau_pack": [], "tau_ratio": []}
    for r in rates:
        t_ref = float(torch.quantile(ref, 1.0 - r))
        t_pack = float(torch.quantile(pack, 1.0 - r))
        out["tau_ref"].append(t_ref)
        out["tau_pack"].append(t_pack)
        out["tau_ratio"].append(t_pack / t_ref)
    out["mean_count_pack"] = float(state["count"].mean())
    out["mean_count_ref"] = float(ref_denom.mean())
    out["stat_ratio_mean"] = float(pack[both].mean() / ref[both].mean())
    return out
