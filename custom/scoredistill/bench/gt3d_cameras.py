"""Cameras of the ground-truth 3D benchmark: threestudio's own camera sampling with the configs' data settings.

The prior's training renders come from threestudio's ``RandomCameraIterableDataset`` (:func:`sample_training_cameras`),
the scores from its ``RandomCameraDataset`` val / test views (:func:`eval_cameras`), both under one of the two camera
settings of :data:`CAMERA_SETTINGS` (why ``eval`` is the default: :mod:`scoredistill.bench.gt3d_bench`).
"""
from __future__ import annotations

import sys
from typing import Dict

import torch

from ..testing import threestudio_cpu

#: the benchmark's render / latent size (the VAE factor 16 maps the guidances' 512² to 32² latents)
RENDER_SIZE = 32
#: threestudio's data settings of the configs (elevation, eval camera) and the two camera settings
DATA_CONFIGS = dict(elevation_range=[-10, 45], camera_distance_range=[1.5, 2.0], fovy_range=[40, 70],
                    eval_camera_distance=2.0, eval_fovy_deg=70.0, eval_elevation_deg=15.0)
CAMERA_SETTINGS = {
    "eval": dict(camera_distance_range=[2.0, 2.0], fovy_range=[70, 70], camera_perturb=0.0, center_perturb=0.0,
                 up_perturb=0.0),
    "configs": dict(camera_distance_range=[1.5, 2.0], fovy_range=[40, 70], camera_perturb=0.1, center_perturb=0.2,
                    up_perturb=0.02),
}


def import_threestudio():
    """threestudio (the repository's ``.threestudio`` or ``$THREESTUDIO_ROOT``) imported in this process; on a
    machine without CUDA through the CPU device patch and stand-ins of :mod:`scoredistill.testing.threestudio_cpu`.
    A threestudio this process already imported is used as it is (its data module is all the cameras need)."""
    if "threestudio.data.uncond" in sys.modules:  # e.g. the demo's, imported from the path it was given
        return sys.modules["threestudio"]
    return threestudio_cpu.import_threestudio()


def data_config(cameras: str, **extra) -> dict:
    if cameras not in CAMERA_SETTINGS:
        raise ValueError(f"--cameras must be one of {sorted(CAMERA_SETTINGS)}, got {cameras!r}")
    return {**DATA_CONFIGS, **CAMERA_SETTINGS[cameras], **extra}


def sample_training_cameras(n: int, cameras: str, seed: int, size: int = RENDER_SIZE) -> Dict[str, torch.Tensor]:
    """``n`` training cameras from threestudio's ``RandomCameraIterableDataset`` (its own sampling code, the
    configs' data settings): dict with ``c2w`` ``(n, 4, 4)``, ``fovy`` ``(n,)`` rad, ``elevation``/``azimuth`` deg."""
    import random

    import_threestudio()
    from threestudio.data.uncond import RandomCameraDataModuleConfig, RandomCameraIterableDataset
    from threestudio.utils.config import parse_structured

    cfg = parse_structured(RandomCameraDataModuleConfig, data_config(cameras, batch_size=n, width=size, height=size))
    state = torch.get_rng_state(), random.getstate()
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        b = RandomCameraIterableDataset(cfg).collate(None)
    finally:
        torch.set_rng_state(state[0])
        random.setstate(state[1])
    return {k: b[k] for k in ("c2w", "fovy", "elevation", "azimuth")}


def eval_cameras(split: str, n_views: int, cameras: str = "eval", size: int = RENDER_SIZE) -> Dict[str, torch.Tensor]:
    """threestudio's ``RandomCameraDataset`` cameras of ``split`` (``val``/``test``) with ``n_views`` views."""
    import_threestudio()
    from threestudio.data.uncond import RandomCameraDataModuleConfig, RandomCameraDataset
    from threestudio.utils.config import parse_structured

    cfg = parse_structured(RandomCameraDataModuleConfig, data_config(
        cameras, eval_width=size, eval_height=size, n_val_views=n_views, n_test_views=n_views))
    ds = RandomCameraDataset(cfg, split)
    return {"c2w": ds.c2w, "fovy": ds.fovy, "elevation": ds.elevation_deg, "azimuth": ds.azimuth_deg}
