"""Ground-truth 3D benchmark: every method distils a known scene through threestudio's ``launch.py`` and is scored
against the scene's true renders.

The "diffusion model" is the exact ground-truth prior of :mod:`scoredistill.testing.gt_prior3d`: its data are the
renders of the scenes of :mod:`scoredistill.bench.gt_scenes` from training cameras drawn by threestudio's own
``RandomCameraIterableDataset``, encoded by a near-invertible linear VAE, smoothed by a component std ``s``; the
prompt (through threestudio's prompt processor, view-dependent suffixes included) selects the scene and the
azimuth range of its renders, the empty / negative prompt the marginal over all scenes.  The folder is passed as
``pretrained_model_name_or_path`` to the configs' guidances and prompt processors: threestudio's unmodified
``launch.py`` runs the pack's configs (and threestudio's ``stable-diffusion-guidance`` in ``gs-sds``) on it with the
same code path as with Stable Diffusion.

Camera setting (``--cameras``).  ``eval`` (default): the configs' elevation range ([-10, 45]) and full azimuth, at
the configs' evaluation distance 2.0 and fovy 70 and without threestudio's camera / centre / up perturbations, for
the prior's renders and the runs alike.  ``configs``: the configs' full ranges (distance [1.5, 2], fovy [40, 70],
threestudio's perturbations).  Why the default: a finite mixture of renders covers the camera space only as
densely as its components, and score distillation can reconstruct at most what the posterior mean shows.
Measured (cube, 32², PSNR of the t = 20 posterior mean against the true render at fresh training cameras): with
threestudio's perturbations 15.0 dB (120 components) / 16.9 dB (480); without them, configs' distance / fovy
ranges 19.9 / 23.4 dB (120 / 480; 25.4 dB at 1500); ``eval`` 29.4 / 31.7 dB (120 / 480; 32.9 at 1500).  Five
nuisance dimensions (distance, fovy, three perturbations) are more than a few hundred renders can cover.

Learning rates (``--lr-scale``, default 10 on the Gaussian rows): the configs' learning rates are set for 2500-5000
steps; the benchmark's budget is a few hundred.  Measured: a photometric MSE fit of the cube at the configs' lrs
reaches 20.7 dB in 200 steps, ×5 30.2 dB, ×20 32.1 dB.  Every geometry lr (position lr_init / lr_final, scales,
quats, opacities, SH) is multiplied; NeRF rows keep their configs' lrs.

Metrics, on threestudio's test cameras (``RandomCameraDataset`` "test": evenly spaced azimuths at the eval
elevation 15°, distance and fovy; none of them is a training render of the prior) from the images launch.py
writes: PSNR and SSIM (torchmetrics), foreground-mask IoU (opacity > 0.5), saturation (mean chroma and mean
intensity of the foreground, render / ground truth), Janus score on ``janus`` (share of back views closer to
the ground-truth front than to the ground-truth back), for Gaussians the Chamfer distance between the opaque
(> 0.5) Gaussian centres and the true surface; PSNR on the validation views against step and against UNet
samples (exact counts); wall time.

Command (``--quick``: scene ``cube``, seed 0, the Gaussian rows)::

    python -m scoredistill.bench.gt3d_bench [--out outputs/gt3d] [--quick] [--rows ...] [--workers 2]

``--out`` defaults to the scratch folder ``outputs/gt3d``; the committed results in ``benchmarks/results/gt3d`` are
only replaced by naming that folder explicitly.  Every config's whole schedule on a GPU:
:mod:`scoredistill.bench.gt3d_gpu`.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..paths import CONFIGS, PACKAGE_DIR, SCENES as SCENE_DIR
from ..testing import threestudio_cpu
from . import gt_scenes

HERE = os.path.dirname(os.path.abspath(__file__))
#: the folder holding the package (custom/ in a checkout, site-packages in an install): launch.py's PYTHONPATH
PACK_PARENT = os.path.dirname(PACKAGE_DIR)
#: launch.py runs behind this wrapper, which imports the ground-truth prior's model classes for diffusers
GT_PRIOR_LAUNCH = os.path.join(os.path.dirname(HERE), "testing", "gt_prior_launch.py")

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
#: default results folder: scratch, never the committed benchmarks/results/gt3d
DEFAULT_OUT = os.path.join("outputs", "gt3d")
GS_PARAMS = ("means", "scales", "quats", "opacities", "sh0", "shN")


@dataclass
class Row:
    """A benchmark row: a config and its overrides; ``kind`` is ``gs``, ``nerf`` or ``edit``."""

    name: str
    config: str
    kind: str = "gs"
    overrides: List[str] = field(default_factory=list)
    scenes: Sequence[str] = gt_scenes.SCENES


ROWS = [
    Row("gs-sds (CFG 100)", "gs-sds.yaml", overrides=["system.guidance.guidance_scale=100"]),
    Row("gs-sds (CFG 7.5)", "gs-sds.yaml", overrides=["system.guidance.guidance_scale=7.5"]),
    Row("ge3d-gs", "ge3d-gs.yaml"),
    Row("lods-embedding-gs", "lods-embedding-gs.yaml"),
    Row("vdm-gs", "vdm-gs.yaml"),
    Row("uds-gs", "uds-gs.yaml"),
    Row("uds-edit-gs", "uds-edit-gs.yaml", kind="edit", scenes=("cube",)),
    Row("hifa", "hifa.yaml", kind="nerf", scenes=("cube",)),
    Row("ge3d-nerf", "ge3d-nerf.yaml", kind="nerf", scenes=("cube",)),
    Row("vdm-nerf", "vdm-nerf.yaml", kind="nerf", scenes=("cube",)),
    Row("lods-embedding-nerf", "lods-embedding-nerf.yaml", kind="nerf", scenes=("cube",)),
    Row("uds-nerf", "uds-nerf.yaml", kind="nerf", scenes=("cube",)),
]
ROW_BY_NAME = {r.name: r for r in ROWS}


# ------------------------------------------------------------------------------------------ threestudio in-process
def import_threestudio():
    """threestudio (the repository's ``.threestudio`` or ``$THREESTUDIO_ROOT``) imported in this process; on a
    machine without CUDA through the CPU device patch and stand-ins of :mod:`scoredistill.testing.threestudio_cpu`.
    A threestudio this process already imported is used as it is (its data module is all the cameras need)."""
    if "threestudio.data.uncond" in sys.modules:  # e.g. the demo's, imported from the path it was given
        return sys.modules["threestudio"]
    return threestudio_cpu.import_threestudio()


def threestudio_root() -> str:
    root = threestudio_cpu.threestudio_root()
    if root is None:
        raise RuntimeError("no threestudio work tree: set THREESTUDIO_ROOT to one, or make the checkout's "
                           ".threestudio/ as the README's test section says")
    return root


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


# ------------------------------------------------------------------------------------------ the prior
def scene_params(scene: str) -> Dict[str, torch.Tensor]:
    path = os.path.join(SCENE_DIR, f"{scene}.ply")
    if not os.path.isfile(path):
        gt_scenes.write_scene_ply(scene, SCENE_DIR)
    return gt_scenes.load_scene(path)


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
            params = {k: v.to(device) for k, v in scene_params(scene).items()}
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


# ------------------------------------------------------------------------------------------ the runs
def launch_overrides(row: Row, scene: str, seed: int, prior: str, steps: int, cameras: str, lr_scale: float,
                     exp_root: str, batch_size: int = 2, num_points: int = 1000, val_every: int = 50,
                     n_test_views: int = 17) -> List[str]:
    """launch.py overrides of one run (prior, prompt, cameras, sizes, budget, lrs)."""
    o = [
        f"exp_root_dir={exp_root}", f"seed={seed}", "name=run", "tag=t", "use_timestamp=false",
        f"system.guidance.pretrained_model_name_or_path={prior}",
        f"system.prompt_processor.pretrained_model_name_or_path={prior}",
        "system.prompt_processor.spawn=false", "system.guidance.half_precision_weights=false",
        f"system.prompt_processor.prompt={gt_scenes.PROMPTS[scene]}",
        "trainer.precision=32", f"trainer.max_steps={steps}", f"trainer.val_check_interval={val_every}",
        "trainer.num_sanity_val_steps=4",
        f"checkpoint.every_n_train_steps={steps}",
        f"data.batch_size={batch_size}",
        f"data.width={RENDER_SIZE}", f"data.height={RENDER_SIZE}",
        f"data.eval_width={RENDER_SIZE}", f"data.eval_height={RENDER_SIZE}",
        "data.n_val_views=4", f"data.n_test_views={n_test_views}",
    ]
    dc = data_config(cameras)
    for k in ("camera_distance_range", "fovy_range", "elevation_range"):
        o.append(f"data.{k}=[{dc[k][0]},{dc[k][1]}]")
    for k in ("camera_perturb", "center_perturb", "up_perturb", "eval_camera_distance", "eval_fovy_deg",
              "eval_elevation_deg"):
        o.append(f"data.{k}={dc[k]}")
    if row.kind in ("gs", "edit"):
        o += ["system.renderer.backend=auto", "system.background.random_aug=false"]
        if row.kind == "gs":
            o += ["system.geometry.init=sphere", f"system.geometry.num_points={num_points}",
                  "system.geometry.upsample_to=0"]
        else:
            src = "cube_recoloured"
            scene_params(src)
            o += [f"system.source_ply={os.path.join(SCENE_DIR, src + '.ply')}",
                  f"system.source_prompt={gt_scenes.PROMPTS[src]}"]
        lrs = {"means": 0.001, "scales": 0.005, "quats": 0.001, "opacities": 0.05, "sh0": 0.0025, "shN": 0.000125}
        groups = ", ".join(f"geometry.{k}: {{lr: {v * lr_scale:g}}}" for k, v in lrs.items())
        o.append(f"system.optimizer.params={{{groups}}}")  # group names hold dots: one dict override
        o += [f"system.position_lr.lr_init={0.001 * lr_scale:g}", f"system.position_lr.lr_final={0.00002 * lr_scale:g}"]
    else:
        if not torch.cuda.is_available():
            o += threestudio_cpu.nerf_cpu_overrides(tiny_mlp=True)
        if row.config == "hifa.yaml":
            # no DPT weights here: a tiny random DPT keeps the code path, its (meaningless) disparity term is off
            o += [f"system.disparity_model_name_or_path={threestudio_cpu.tiny_dpt_path()}", "system.loss.lambda_disparity=0"]
            if not torch.cuda.is_available():
                o += ["system.material.dir_encoding_config.otype=ProgressiveBandFrequency",
                      "system.material.dir_encoding_config.n_frequencies=2",
                      "system.material.mlp_network_config.otype=VanillaMLP",
                      "system.material.mlp_network_config.n_hidden_layers=1",
                      "system.material.mlp_network_config.n_neurons=16"]
    return o + list(row.overrides)


def run_one(row: Row, scene: str, seed: int, prior: str, out: str, steps: int, cameras: str, lr_scale: float,
            timeout: float = 1800) -> Dict:
    """Run one (row, scene, seed) through launch.py; returns ``{"trial", "seconds", "unet_samples", "log"}``."""
    root = threestudio_root()
    from scoredistill.paths import link

    link(root)
    exp_root = os.path.join(out, "runs", row.name.replace(" ", "_").replace("(", "").replace(")", ""), scene, f"seed{seed}")
    os.makedirs(exp_root, exist_ok=True)
    count_file = os.path.join(exp_root, "unet_count.json")
    launcher = [sys.executable] + ([] if torch.cuda.is_available() else [threestudio_cpu.CPU_LAUNCH])
    cmd = launcher + [GT_PRIOR_LAUNCH, "launch.py", "--config", os.path.join(CONFIGS, row.config), "--train", "--gpu", "0"]
    cmd += launch_overrides(row, scene, seed, prior, steps, cameras, lr_scale, exp_root)
    env = dict(os.environ)
    paths = [PACK_PARENT] + ([] if torch.cuda.is_available() else [threestudio_cpu.STUBS])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
                "SCOREDISTILL_GT_UNET_COUNT_FILE": count_file, "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")})
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.time() - t0
    with open(os.path.join(exp_root, "launch.log"), "w") as fh:
        fh.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{row.name} / {scene} / seed {seed}: launch.py exit {proc.returncode}:\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    trial = os.path.join(exp_root, "run", "t")
    samples = None
    if os.path.isfile(count_file):
        with open(count_file) as fh:
            samples = json.load(fh)["unet_samples"]
    info = {"trial": trial, "seconds": seconds, "unet_samples": samples}
    from scoredistill.atomic_io import atomic_write_json

    atomic_write_json(os.path.join(exp_root, "run_info.json"), info)
    return info


def _recorded_info(out: str, exp_root: str, row: str, scene: str, seed: int) -> Dict:
    """``run_info.json`` of a finished run, else its record in an earlier ``gt3d_results*.json`` of ``out``."""
    path = os.path.join(exp_root, "run_info.json")
    if os.path.isfile(path):
        return json.load(open(path))
    for res in sorted(glob.glob(os.path.join(out, "gt3d_results*.json"))):
        for r in json.load(open(res)):
            if (r["row"], r["scene"], r["seed"]) == (row, scene, seed) and "error" not in r:
                return {k: r[k] for k in ("trial", "seconds", "unet_samples")}
    raise RuntimeError(f"{exp_root}: no finished run recorded")


# ------------------------------------------------------------------------------------------ scoring
def _read_panels(path: str, size: Optional[int] = None):
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


def _step_images(trial: str, pattern: str) -> Dict[int, List[str]]:
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
            params = {k: v.to(self.device) for k, v in scene_params(scene).items()}
            rgb, alpha = gt_scenes.render_gaussians(params, c["c2w"].to(self.device), c["fovy"].to(self.device), size)
            self.cache[scene, split, size] = rgb.cpu(), alpha.cpu()
        return self.cache[scene, split, size]


def score_run(trial: str, scene: str, kind: str, gt: GroundTruth) -> Dict:
    """Metrics of one finished run (module docstring)."""
    tests = _step_images(trial, "it*-test/*.png")
    if not tests:
        raise RuntimeError(f"{trial}: no test images")
    final = max(tests)
    rgb, op = zip(*[_read_panels(p) for p in tests[final]])
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
    vals = _step_images(trial, "it*-[0-9]*.png")
    curve = []
    for step in sorted(vals):
        imgs = torch.stack([_read_panels(p)[0] for p in vals[step][: len(gt.cams["val"]["c2w"])]])
        g_val, _ = gt.get(scene, "val", imgs.shape[1])
        curve.append((step, psnr(imgs, g_val[: len(imgs)])))
    m["curve"] = curve
    m["initial_psnr"] = curve[0][1] if curve and curve[0][0] == 0 else float("nan")
    if kind in ("gs", "edit"):
        m["chamfer"] = chamfer_from_trial(trial, scene)
    return m


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


# ------------------------------------------------------------------------------------------ the table
def _slug(name: str) -> str:
    return name.replace(" ", "_").replace("(", "").replace(")", "")


def _mean_std(vals: List[float]) -> str:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "–"
    t = torch.tensor(vals, dtype=torch.float64)
    sd = float(t.std()) if len(vals) > 1 else 0.0
    return f"{float(t.mean()):.2f} ± {sd:.2f}"


def summarise(results: List[Dict]) -> List[Dict]:
    """One line per row: per-scene PSNR / SSIM / IoU / saturation means ± std over seeds, Janus, Chamfer, cost."""
    lines = []
    for row in ROWS:
        rs = [r for r in results if r["row"] == row.name and "error" not in r]
        errs = [r for r in results if r["row"] == row.name and "error" in r]
        if not rs and not errs:
            continue
        line = {"row": row.name, "config": row.config, "runs": len(rs), "failed": len(errs)}
        for scene in ("cube", "janus", "table"):
            sr = [r for r in rs if r["scene"] == scene]
            if sr:
                line[f"{scene}_psnr"] = _mean_std([r["psnr"] for r in sr])
                line[f"{scene}_initial_psnr"] = _mean_std([r["initial_psnr"] for r in sr])
        cube = [r for r in rs if r["scene"] == "cube"]
        line["cube_ssim"] = _mean_std([r["ssim"] for r in cube])
        line["iou"] = _mean_std([r["iou"] for r in rs])
        line["chroma"] = _mean_std([r["chroma_ratio"] for r in rs])
        line["intensity"] = _mean_std([r["intensity_ratio"] for r in rs])
        line["janus"] = _mean_std([r["janus"] for r in rs if r["scene"] == "janus"])
        line["chamfer_table"] = _mean_std([r.get("chamfer") for r in rs if r["scene"] == "table"])
        line["chamfer_cube"] = _mean_std([r.get("chamfer") for r in rs if r["scene"] == "cube"])
        line["unet_samples_per_step"] = _mean_std([r["unet_samples"] / r["steps"] for r in rs if r.get("unet_samples")])
        line["seconds"] = _mean_std([r["seconds"] for r in rs])
        lines.append(line)
    return lines


MD_COLUMNS = [("row", "method (config)"), ("cube_psnr", "cube PSNR ↑"), ("cube_initial_psnr", "cube initial"),
              ("cube_ssim", "cube SSIM ↑"), ("janus_psnr", "two-faced PSNR ↑"), ("janus", "Janus score ↓"),
              ("table_psnr", "table PSNR ↑"), ("chamfer_table", "table Chamfer ↓"), ("iou", "mask IoU ↑"),
              ("chroma", "chroma ratio (→1)"), ("intensity", "intensity ratio (→1)"),
              ("unet_samples_per_step", "UNet samples / step"), ("seconds", "wall s / run")]


#: the README's shorter table (``gt3d_readme.md``)
README_COLUMNS = [("row", "method (config)"), ("cube_psnr", "cube PSNR ↑"), ("janus_psnr", "two-faced PSNR ↑"),
                  ("janus", "Janus ↓"), ("table_psnr", "table PSNR ↑"), ("chamfer_table", "table Chamfer ↓"),
                  ("iou", "mask IoU ↑"), ("chroma", "chroma (→1)"), ("unet_samples_per_step", "UNet samples / step"),
                  ("seconds", "s / run")]


def _markdown(lines: List[Dict], columns) -> str:
    md = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for line in lines:
        cells = [f"{line['row']} (`{line['config']}`)" if k == "row" else str(line.get(k, "–")) for k, _ in columns]
        if line["failed"]:
            cells[0] += f" ({line['failed']} run(s) failed)"
        md.append("| " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"


def write_tables(out: str, results: List[Dict], meta: Dict) -> str:
    from scoredistill.atomic_io import atomic_write_json, atomic_write_text

    lines = summarise(results)
    keys = sorted({k for r in results for k in r if k != "curve"})
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in results:
        w.writerow({k: r.get(k) for k in keys})
    atomic_write_text(os.path.join(out, "gt3d_runs.csv"), buf.getvalue())
    text = _markdown(lines, MD_COLUMNS)
    atomic_write_text(os.path.join(out, "gt3d.md"), text)
    atomic_write_text(os.path.join(out, "gt3d_readme.md"), _markdown(lines, README_COLUMNS))
    atomic_write_json(os.path.join(out, "gt3d_meta.json"), meta, indent=2)
    atomic_write_json(os.path.join(out, "gt3d_results.json"), results, indent=1)
    return text


def write_pictures(out: str, results: List[Dict], gt: GroundTruth, views=(0, 4, 8, 12)) -> None:
    """``gt3d_grid.png`` (ground truth and each row's seed-0 result from 4 test views, per scene) and
    ``gt3d_curves.png`` (validation PSNR against step and against UNet samples, mean over seeds, cube)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenes = [s for s in gt_scenes.SCENES if any(r["scene"] == s for r in results)]
    rows = [r.name for r in ROWS if any(x["row"] == r.name and "error" not in x for x in results)]
    fig, axes = plt.subplots(len(rows) + 1, len(scenes), figsize=(2.6 * len(scenes), 0.75 * (len(rows) + 1) + 0.3),
                             squeeze=False)
    for j, scene in enumerate(scenes):
        g, _ = gt.get(scene, "test")
        strip = torch.cat([g[v] for v in views], 1)
        axes[0][j].imshow(strip.numpy())
        axes[0][j].set_title(scene, fontsize=8)
        for i, name in enumerate(rows):
            rs = [r for r in results if r["row"] == name and r["scene"] == scene and "error" not in r]
            ax = axes[i + 1][j]
            if rs:
                rs.sort(key=lambda r: r["seed"])
                tests = _step_images(rs[0]["trial"], "it*-test/*.png")
                imgs = tests[max(tests)]
                ax.imshow(torch.cat([_read_panels(imgs[v])[0] for v in views if v < len(imgs)], 1).numpy())
    for i, name in enumerate(["ground truth"] + rows):
        axes[i][0].set_ylabel(name, fontsize=6, rotation=0, ha="right", va="center")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
    fig.tight_layout(pad=0.2)
    fig.savefig(os.path.join(out, "gt3d_grid.png"), dpi=130)
    plt.close(fig)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in rows:
        rs = [r for r in results if r["row"] == name and r["scene"] == "cube" and "error" not in r and r["curve"]]
        if not rs:
            continue
        steps = [s for s, _ in rs[0]["curve"]]
        mean = [sum(r["curve"][k][1] for r in rs if len(r["curve"]) > k) / len(rs) for k in range(len(steps))]
        a1.plot(steps, mean, label=name)
        per = rs[0].get("unet_samples") and rs[0]["unet_samples"] / rs[0]["steps"]
        if per:
            a2.plot([s * per for s in steps], mean, label=name)
    a1.set_xlabel("step")
    a2.set_xlabel("UNet samples")
    a2.set_xscale("symlog")
    for a in (a1, a2):
        a.set_ylabel("PSNR on validation views (cube), dB")
        a.grid(alpha=0.3)
    a1.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gt3d_curves.png"), dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="results folder (default %(default)s, a scratch folder; the committed results are "
                         "benchmarks/results/gt3d)")
    ap.add_argument("--quick", action="store_true", help="scene cube, seed 0, the Gaussian rows")
    ap.add_argument("--rows", nargs="*", default=None, help=f"row names (default all): {[r.name for r in ROWS]}")
    ap.add_argument("--scenes", nargs="*", default=None)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--nerf-steps", type=int, default=80)
    ap.add_argument("--lr-scale", type=float, default=10.0, help="Gaussian rows' geometry lr multiplier (default %(default)s)")
    ap.add_argument("--views", type=int, default=480, help="prior components (training renders) per scene")
    ap.add_argument("--component-std", type=float, default=0.05)
    ap.add_argument("--cameras", choices=sorted(CAMERA_SETTINGS), default="eval")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reuse-prior", action="store_true", help="keep <out>/prior if built with the same settings")
    ap.add_argument("--report-only", action="store_true", help="re-score the runs already under --out")
    args = ap.parse_args(argv)
    for name in ("steps", "nerf_steps", "views", "workers"):
        if getattr(args, name) < 1:
            raise SystemExit(f"gt3d_bench: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr_scale <= 0 or args.component_std <= 0:
        raise SystemExit("gt3d_bench: --lr-scale and --component-std must be > 0")
    rows = ROWS if args.rows is None else [ROW_BY_NAME[n] for n in args.rows]
    if args.quick:
        rows = [r for r in rows if r.kind == "gs"] if args.rows is None else rows
        args.seeds, args.scenes = [0], ["cube"]
    args.out = os.path.abspath(args.out)  # launch.py runs in the threestudio tree
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    # generation rows: the three scenes; the edit row: the same plus its source (the recoloured cube, whose prompt
    # the edit needs).  Measured: with the recoloured cube in the generation prior's marginal, SDS CFG 7.5 on the
    # cube reached 13.35 +- 0.14 dB instead of 17.96 (seed 0) in 200 steps
    prior = os.path.join(args.out, "prior")
    prior_edit = os.path.join(args.out, "prior-edit")
    meta = {"steps": args.steps, "nerf_steps": args.nerf_steps, "lr_scale": args.lr_scale, "views": args.views,
            "component_std": args.component_std, "cameras": args.cameras, "seeds": args.seeds,
            "torch_threads": os.environ.get("OMP_NUM_THREADS", "1"), "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.is_available()}
    settings = {"views": args.views, "cameras": args.cameras, "component_std": args.component_std}
    for key, folder, scenes in (("prior", prior, gt_scenes.SCENES),
                                ("prior_edit", prior_edit, gt_scenes.SCENES + ("cube_recoloured",))):
        if key == "prior_edit" and not any(r.kind == "edit" for r in rows):
            continue
        pm = folder + "_meta.json"
        if args.report_only or (args.reuse_prior and os.path.isfile(pm) and json.load(open(pm))["settings"] == settings):
            meta[key] = json.load(open(pm)) if os.path.isfile(pm) else None
        else:
            from scoredistill.atomic_io import atomic_write_json

            meta[key] = build_scene_prior(folder, args.views, args.cameras, args.component_std, scenes=scenes)
            meta[key]["settings"] = settings
            atomic_write_json(pm, meta[key])
    jobs = [(row, scene, seed) for row in rows for scene in row.scenes
            if args.scenes is None or scene in args.scenes for seed in args.seeds]

    def work(job):
        row, scene, seed = job
        steps = args.nerf_steps if row.kind == "nerf" else args.steps
        rec = {"row": row.name, "scene": scene, "seed": seed, "steps": steps, "kind": row.kind}
        exp_root = os.path.join(args.out, "runs", _slug(row.name), scene, f"seed{seed}")
        try:
            if args.report_only:
                info = _recorded_info(args.out, exp_root, row.name, scene, seed)
            else:
                info = run_one(row, scene, seed, prior_edit if row.kind == "edit" else prior, args.out, steps, args.cameras,
                               args.lr_scale if row.kind != "nerf" else 1.0)
            rec.update(info)
        except Exception as exc:  # reported in the table, never hidden
            rec["error"] = str(exc)[-2000:]
        print(f"[{time.time() - t0:6.0f} s] {row.name} / {scene} / seed {seed}: "
              f"{'FAILED ' + rec['error'][-300:] if 'error' in rec else 'done in %.0f s' % rec['seconds']}", flush=True)
        return rec

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        recs = list(pool.map(work, jobs))
    gt = GroundTruth(n_test=17)
    for rec in recs:
        if "error" in rec:
            continue
        try:
            rec.update(score_run(rec["trial"], rec["scene"], rec["kind"], gt))
        except Exception as exc:
            rec["error"] = f"scoring: {exc}"
    meta["total_seconds"] = time.time() - t0
    old_meta = os.path.join(args.out, "gt3d_meta.json")
    if args.report_only and os.path.isfile(old_meta):  # keep the measured run's time; scoring is not a run
        meta["total_seconds"] = json.load(open(old_meta)).get("total_seconds")
        meta["rescored_seconds"] = time.time() - t0
    text = write_tables(args.out, recs, meta)
    write_pictures(args.out, recs, gt)
    print(text)
    print(f"gt3d_bench: {len(recs)} runs, {meta['total_seconds'] or float('nan'):.0f} s in all; tables and pictures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
