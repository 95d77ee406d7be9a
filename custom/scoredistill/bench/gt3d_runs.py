"""The runs of the ground-truth 3D benchmark: its rows (a config and its overrides) and one run of a row through
threestudio's unmodified ``launch.py`` (behind :mod:`scoredistill.testing.gt_prior_launch`; on a machine without CUDA
through the CPU launcher of :mod:`scoredistill.testing.threestudio_cpu`).

Learning rates (``lr_scale``) and camera settings: :mod:`scoredistill.bench.gt3d_bench`.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch

from ..paths import CONFIGS, PACKAGE_DIR, SCENES as SCENE_DIR
from ..testing import threestudio_cpu
from . import gt_scenes
from .gt3d_cameras import RENDER_SIZE, data_config

HERE = os.path.dirname(os.path.abspath(__file__))
#: the folder holding the package (custom/ in a checkout, site-packages in an install): launch.py's PYTHONPATH
PACK_PARENT = os.path.dirname(PACKAGE_DIR)
#: launch.py runs behind this wrapper, which imports the ground-truth prior's model classes for diffusers
GT_PRIOR_LAUNCH = os.path.join(os.path.dirname(HERE), "testing", "gt_prior_launch.py")


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


def threestudio_root() -> str:
    root = threestudio_cpu.threestudio_root()
    if root is None:
        raise RuntimeError("no threestudio work tree: set THREESTUDIO_ROOT to one, or make the checkout's "
                           ".threestudio/ as the README's test section says")
    return root


def run_slug(name: str) -> str:
    """A row's name as a folder name (``gs-sds (CFG 7.5)`` -> ``gs-sds_CFG_7.5``)."""
    return name.replace(" ", "_").replace("(", "").replace(")", "")


def run_folder(out: str, row_name: str, scene: str, seed: int) -> str:
    """``<out>/runs/<row slug>/<scene>/seed<seed>``: launch.py's ``exp_root_dir`` of one run."""
    return os.path.join(out, "runs", run_slug(row_name), scene, f"seed{seed}")


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
            gt_scenes.scene_params(src)
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
    exp_root = run_folder(out, row.name, scene, seed)
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


def recorded_info(out: str, exp_root: str, row: str, scene: str, seed: int) -> Dict:
    """``run_info.json`` of a finished run, else its record in an earlier ``gt3d_results*.json`` of ``out``."""
    path = os.path.join(exp_root, "run_info.json")
    if os.path.isfile(path):
        return json.load(open(path))
    for res in sorted(glob.glob(os.path.join(out, "gt3d_results*.json"))):
        for r in json.load(open(res)):
            if (r["row"], r["scene"], r["seed"]) == (row, scene, seed) and "error" not in r:
                return {k: r[k] for k in ("trial", "seconds", "unet_samples")}
    raise RuntimeError(f"{exp_root}: no finished run recorded")
