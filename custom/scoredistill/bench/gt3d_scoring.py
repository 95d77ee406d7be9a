"""Scoring of the ground-truth 3D benchmark: a finished run against its scene's true renders.

Metrics, on threestudio's test cameras (``RandomCameraDataset`` "test": evenly spaced azimuths at the eval
elevation 15°, distance and fovy; none of them is a training render of the prior) from the images launch.py
writes: PSNR and SSIM (torchmetrics), foreground-mask IoU (opacity > 0.5), saturation (mean chroma and mean
intensity of the foreground, render / ground truth), Janus score on ``janus`` (share of back views closer to
the ground-truth front than to the ground-truth back), for Gaussians the Chamfer distance between the opaque
(> 0.5) Gaussian centres and the true surface; PSNR on the validation views against step and against UNet
samples (exact counts); wall time.
"""
from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional, Tuple

import torch

from . import gt_scenes
from .gt3d_cameras import RENDER_SIZE, eval_cameras


def read_panels(path: str, size: Optional[int] = None):
    """``(rgb (S, S, 3), opacity (S, S, 1))`` of a threestudio validation / test image (panels side by side: the
    RGB first, the opacity last); ``S`` = ``size`` or the image's height."""
    import imageio.v2 as imageio

    img = torch.from_numpy(imageio.imread(path)).float() / 255.0
    if img.dim() == 2:
        img = img[..., None].expand(-1, -1, 3)
    size = size or img.shape[0]
    rgb = img[:size, :size, :3]
    opacity = img[:size, -size:, 0:1]
    return rgb, opacity


def step_images(trial: str, pattern: str) -> Dict[int, List[str]]:
    out: Dict[int, List[str]] = {}
    for p in glob.glob(os.path.join(trial, "save", pattern)):
        name = os.path.basename(p) if "test" not in pattern else os.path.basename(os.path.dirname(p))
        step = int(name.split("-")[0][2:])
        out.setdefault(step, []).append(p)
    return {k: sorted(v, key=lambda s: int(os.path.splitext(os.path.basename(s))[0].split("-")[-1])) for k, v in out.items()}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    from torchmetrics.functional import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(a, b, data_range=1.0))


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    from torchmetrics.functional import structural_similarity_index_measure

    return float(structural_similarity_index_measure(a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2), data_range=1.0))


def _chroma_intensity(rgb: torch.Tensor, mask: torch.Tensor):
    m = mask[..., 0] > 0.5
    if not bool(m.any()):
        return 0.0, 0.0
    px = rgb[m]
    return float((px.max(-1).values - px.min(-1).values).mean()), float(px.mean())


class GroundTruth:
    """Ground-truth renders of every scene at threestudio's val / test cameras (cached per process)."""

    def __init__(self, n_test: int = 16, n_val: int = 4, cameras: str = "eval", device: str = "cpu"):
        self.cams = {"test": eval_cameras("test", n_test, cameras), "val": eval_cameras("val", n_val, cameras)}
        self.cache = {}
        self.device = device

    def get(self, scene: str, split: str, size: int = RENDER_SIZE):
        """``(rgb (n, size, size, 3), alpha (n, size, size, 1))`` on the CPU."""
        if (scene, split, size) not in self.cache:
            c = self.cams[split]
            params = {k: v.to(self.device) for k, v in gt_scenes.scene_params(scene).items()}
            rgb, alpha = gt_scenes.render_gaussians(params, c["c2w"].to(self.device), c["fovy"].to(self.device), size)
            self.cache[scene, split, size] = rgb.cpu(), alpha.cpu()
        return self.cache[scene, split, size]


def score_run(trial: str, scene: str, kind: str, gt: GroundTruth) -> Dict:
    """Metrics of one finished run (the module docstring)."""
    tests = step_images(trial, "it*-test/*.png")
    if not tests:
        raise RuntimeError(f"{trial}: no test images")
    final = max(tests)
    rgb, op = zip(*[read_panels(p) for p in tests[final]])
    rgb, op = torch.stack(rgb), torch.stack(op)
    g_rgb, g_a = gt.get(scene, "test", rgb.shape[1])
    n = min(len(rgb), len(g_rgb))
    rgb, op, g_rgb, g_a = rgb[:n], op[:n], g_rgb[:n], g_a[:n]
    inter = ((op > 0.5) & (g_a > 0.5)).sum().item()
    union = ((op > 0.5) | (g_a > 0.5)).sum().item()
    ch_r, in_r = _chroma_intensity(rgb, op)
    ch_g, in_g = _chroma_intensity(g_rgb, g_a)
    m = {"psnr": psnr(rgb, g_rgb), "ssim": ssim(rgb, g_rgb), "iou": inter / max(union, 1),
         "chroma_ratio": ch_r / max(ch_g, 1e-6), "intensity_ratio": in_r / max(in_g, 1e-6), "final_step": final}
    if scene == "janus":
        az = gt.cams["test"]["azimuth"][:n]
        wrapped = (az + 180.0) % 360.0 - 180.0
        back = [i for i in range(n) if abs(wrapped[i]) > 135.0]
        hits = 0
        for i in back:
            j = int(torch.argmin((((az - (az[i] + 180.0)) + 180.0) % 360.0 - 180.0).abs()))
            d_front = ((rgb[i] - g_rgb[j]) ** 2).mean()
            d_back = ((rgb[i] - g_rgb[i]) ** 2).mean()
            hits += int(d_front < d_back)
        m["janus"] = hits / max(len(back), 1)
    curve = validation_curve(trial, scene, gt)
    m["curve"] = curve
    m["initial_psnr"] = curve[0][1] if curve and curve[0][0] == 0 else float("nan")
    if kind in ("gs", "edit"):
        m["chamfer"] = chamfer_from_trial(trial, scene)
    return m


def validation_curve(trial: str, scene: str, gt: GroundTruth) -> List[Tuple[int, float]]:
    """``[(step, PSNR)]`` of the run's validation images (``save/it<step>-<view>.png``, the first ``n_val`` views of
    each step) against the ground truth at ``gt``'s val cameras, in step order."""
    vals = step_images(trial, "it*-[0-9]*.png")
    curve = []
    for step in sorted(vals):
        imgs = torch.stack([read_panels(p)[0] for p in vals[step][: len(gt.cams["val"]["c2w"])]])
        g_val, _ = gt.get(scene, "val", imgs.shape[1])
        curve.append((step, psnr(imgs, g_val[: len(imgs)])))
    return curve


def _final_gaussians(trial: str):
    """``(means, opacity logits)`` of a finished Gaussian run: the PLY the system writes at the end of training
    (``save/it<N>-export/*.ply``, the highest ``N``), else the last checkpoint (loaded with ``weights_only=True``);
    ``None`` if neither is there."""
    plys = glob.glob(os.path.join(trial, "save", "it*-export", "*.ply"))
    if plys:
        from scoredistill.geometry.gaussian_ply import load_gaussians_ply

        ply = max(plys, key=lambda p: int(os.path.basename(os.path.dirname(p)).split("-")[0][2:]))
        g = load_gaussians_ply(ply)
        return g["means"], g["opacities"]
    ckpts = sorted(glob.glob(os.path.join(trial, "ckpts", "*.ckpt")), key=os.path.getmtime)
    if not ckpts:
        return None
    sd = torch.load(ckpts[-1], map_location="cpu", weights_only=True)["state_dict"]
    means = next(v for k, v in sd.items() if k.endswith("geometry.means") or k.endswith("geometry.params.means"))
    opac = next(v for k, v in sd.items() if k.endswith("geometry.opacities") or k.endswith("geometry.params.opacities"))
    return means, opac


def chamfer_from_trial(trial: str, scene: str) -> float:
    """Symmetric mean nearest-neighbour distance between opaque (> 0.5) Gaussian centres of the final Gaussians
    (:func:`_final_gaussians`) and the scene's true surface (world units); NaN if there are none."""
    final = _final_gaussians(trial)
    if final is None:
        return float("nan")
    means, opac = final
    pts = means[torch.sigmoid(opac.reshape(-1)) > 0.5].float()
    surf, _ = gt_scenes.surface_points(scene, 4000, seed=7)
    if len(pts) == 0:
        return float("nan")
    d = torch.cdist(pts, surf)
    return float(0.5 * (d.min(1).values.mean() + d.min(0).values.mean()))
