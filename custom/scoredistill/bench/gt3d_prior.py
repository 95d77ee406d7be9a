"""The ground-truth prior of the 3D benchmark: the scenes' renders from threestudio's training cameras, encoded into
the exact prior folder of :mod:`scoredistill.testing.gt_prior3d` that the configs load as their diffusion model."""
from __future__ import annotations

import time
from typing import Dict, Optional, Sequence

import torch

from . import gt_scenes
from .gt3d_cameras import RENDER_SIZE, sample_training_cameras


def build_scene_prior(folder: str, n_views: int = 480, cameras: str = "eval", component_std: float = 0.05,
                      azimuth_offset_deg: float = 0.0, seed: int = 1234, log=print,
                      scenes: Sequence[str] = gt_scenes.SCENES, size: int = RENDER_SIZE,
                      device: str = "cpu", memo: Optional[Dict] = None) -> Dict[str, float]:
    """Build the prior folder over ``scenes`` (default ``cube``, ``janus``, ``table``; the edit row adds
    ``cube_recoloured``, its source) from
    ``n_views`` training renders each; returns ``{"vae_psnr": dB, "seconds": s}``.  ``azimuth_offset_deg``
    builds a prior with a wrong camera convention (the negative control: renders labelled with azimuth +
    offset, e.g. 180 = mirrored).  ``size``: render resolution of the prior's training renders (the configs' 512
    on a GPU; the latents are always ``512 / f`` pixels, :func:`~scoredistill.testing.gt_prior3d.encode_renders`);
    ``device``: where they are rendered and encoded (``cuda``: gsplat); ``memo``: a dict reused across calls, so a
    scene's renders (same cameras: same seed and position in ``scenes``) are made once for several priors."""
    from scoredistill.testing import gt_prior3d as gp

    t0 = time.time()
    vae = gp.GroundTruthVAE().to(device)
    scenes = list(scenes)
    memo = {} if memo is None else memo
    lat, who, ele, azi, psnrs = [], [], [], [], []
    for i, scene in enumerate(scenes):
        key = (scene, n_views, cameras, seed + i, size)
        if key not in memo:
            cams = sample_training_cameras(n_views, cameras, seed + i, size)
            params = {k: v.to(device) for k, v in gt_scenes.scene_params(scene).items()}
            rgb, _ = gt_scenes.render_gaussians(params, cams["c2w"].to(device), cams["fovy"].to(device), size)
            memo[key] = (cams, gp.encode_renders(vae, rgb).cpu(), gp.vae_reconstruction_psnr(vae, rgb))
            del rgb
        cams, z, p = memo[key]
        lat.append(z)
        psnrs.append(p)
        who += [i] * n_views
        ele += cams["elevation"].tolist()
        azi += (cams["azimuth"] + azimuth_offset_deg).tolist()
    gp.build_gt_prior(folder, [gt_scenes.PROMPTS[s] for s in scenes], torch.cat(lat), who, ele, azi,
                      component_std=component_std)
    out = {"vae_psnr": sum(psnrs) / len(psnrs), "seconds": time.time() - t0}
    log(f"prior: {len(scenes)} scenes x {n_views} renders, VAE reconstruction PSNR {out['vae_psnr']:.2f} dB, "
        f"{out['seconds']:.0f} s")
    return out
