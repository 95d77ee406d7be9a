"""``scoredistill demo``: the pack's first run on a laptop, without a GPU and without weights.

One command distils a known scene through threestudio's own, unmodified ``launch.py`` with one of the pack's
Gaussian configs on the CPU, and writes what a real run writes, plus a page to open:

1. **prior**: the exact ground-truth 3D prior (:mod:`scoredistill.testing.gt_prior3d`, as in
   :mod:`scoredistill.bench.gt3d_bench`): renders of the scene (:mod:`scoredistill.bench.gt_scenes`: ``cube``,
   ``janus``, ``table``) from threestudio's own training cameras, a near-invertible linear VAE, a Gaussian
   mixture whose score is exact.  Its folder stands in for Stable Diffusion as the configs'
   ``pretrained_model_name_or_path``: the guidance and the prompt processor load it through the same code path.
2. **distil**: ``launch.py --config configs/<method>.yaml --train`` on the CPU (:mod:`.cpu_launch`: threestudio's
   CUDA device and GPU trainer redirected to the CPU; stand-ins for CUDA-only imports), 32² training renders,
   1000 Gaussians from threestudio's sphere init, the benchmark's camera setting and learning rates
   (``gt3d_runs.launch_overrides``); test views rendered at ``--video-size``.
3. **export**: the run's test video and Gaussians PLY (gsplat-ply-exporter), a textured mesh (OBJ + GLB) from the
   PLY (:func:`scoredistill.exporter.gaussian_mesh.export_ply_to_mesh`), the PSNR of the test views against the
   scene's true renders, and ``index.html`` showing them.

Files in ``--out`` (default ``outputs/demo``): ``index.html``, ``video.mp4``, ``gaussians.ply``, ``mesh/model.glb``
(+ ``model.obj``, ``.mtl``, ``.png``), ``test/*.png`` (the test views), ``demo.json`` (settings, timings, PSNR),
``launch.log``, ``prior/``, ``run/`` (the threestudio trial folder).

For real prompts, swap the prior for Stable Diffusion and run on a GPU: the same config with
``system.guidance.pretrained_model_name_or_path`` / ``system.prompt_processor.pretrained_model_name_or_path`` left at
their defaults (README, "The main job").
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # .../custom
#: the pack's Gaussian configs the demo can run (the ground-truth benchmark's Gaussian rows, gt3d_runs.ROWS)
METHODS = ("vdm-gs", "gs-sds", "lods-embedding-gs", "uds-gs", "ge3d-gs")
SCENES = ("cube", "janus", "table")
#: threestudio commit the pack is tested against (a clone of it works as --threestudio)
THREESTUDIO_COMMIT = "28d9d80d9d00f308244adfcf3be8b17ca0cb6465"
DEFAULTS = dict(method="vdm-gs", scene="cube", steps=200, views=100, seed=0, video_size=128, test_views=30,
                mesh_resolution=96, lr_scale=10.0, out=os.path.join("outputs", "demo"))
#: Python modules threestudio imports at start-up (``pip install -r tests/requirements-threestudio.txt``)
THREESTUDIO_IMPORTS = ("cv2", "einops", "igl", "envlight", "imageio_ffmpeg", "tensorboard", "wandb", "mcubes",
                       "xatlas", "IPython", "sentencepiece")


class DemoError(RuntimeError):
    """A bad setting or a missing prerequisite; the message is one line naming it and what to do."""


THREESTUDIO_URL = "https://github.com/threestudio-project/threestudio"
#: where the demo clones the pinned threestudio when no work tree is given or found
CLONE_DIR = os.path.join("~", ".cache", "scoredistill", f"threestudio-{THREESTUDIO_COMMIT[:7]}")


def _is_threestudio(path: Optional[str]) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "launch.py")) and os.path.isdir(os.path.join(path, "custom"))


def find_threestudio(path: Optional[str], clone: bool = True, log=print) -> str:
    """The threestudio work tree: ``path``; else ``$THREESTUDIO_ROOT``, ``./.threestudio``, ``./threestudio``, the
    demo's pinned clone in ``~/.cache/scoredistill``; else (``clone``) a fresh clone of the pinned commit there."""
    if path:
        if _is_threestudio(path):
            return os.path.abspath(path)
        raise DemoError(f"--threestudio {path} is not a threestudio work tree (needs launch.py and custom/): get one "
                        f"with `git clone {THREESTUDIO_URL} && git -C threestudio checkout {THREESTUDIO_COMMIT[:7]}`")
    clone_dir = os.path.expanduser(CLONE_DIR)
    for c in (os.environ.get("THREESTUDIO_ROOT"), ".threestudio", "threestudio", clone_dir):
        if _is_threestudio(c):
            return os.path.abspath(c)
    if not clone:
        raise DemoError("no threestudio work tree: pass --threestudio PATH")
    git = shutil.which("git")
    if git is None:
        raise DemoError(f"no threestudio work tree and no git to clone one: pass --threestudio PATH (a clone of "
                        f"{THREESTUDIO_URL} at {THREESTUDIO_COMMIT[:7]})")
    log(f"cloning threestudio {THREESTUDIO_COMMIT[:7]} into {clone_dir} (once)")
    tmp = clone_dir + ".partial"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    for cmd in ([git, "clone", "-q", "--filter=blob:none", "--no-checkout", THREESTUDIO_URL, tmp],
                [git, "-C", tmp, "checkout", "-q", THREESTUDIO_COMMIT]):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            proc = None
        if proc is None or proc.returncode != 0:
            why = "timed out" if proc is None else (proc.stderr.strip().splitlines() or ["failed"])[-1]
            raise DemoError(f"cloning threestudio failed ({why}): pass --threestudio PATH (a clone of "
                            f"{THREESTUDIO_URL} at {THREESTUDIO_COMMIT[:7]})")
    os.replace(tmp, clone_dir)
    return clone_dir


def check_settings(a) -> None:
    """Every setting checked before anything heavy loads (one-line :class:`DemoError`)."""
    if a.method not in METHODS:
        raise DemoError(f"--method must be one of {', '.join(METHODS)}, got {a.method!r}")
    if a.scene not in SCENES:
        raise DemoError(f"--scene must be one of {', '.join(SCENES)}, got {a.scene!r}")
    for name, lo, hi in (("steps", 1, 100_000), ("views", 8, 100_000), ("video_size", 16, 2048),
                         ("test_views", 2, 1000), ("mesh_resolution", 16, 512)):
        v = getattr(a, name)
        if not lo <= v <= hi:
            raise DemoError(f"--{name.replace('_', '-')} must be an integer in [{lo}, {hi}], got {v}")
    if not (a.lr_scale > 0 and a.lr_scale < float("inf")):
        raise DemoError(f"--lr-scale must be a finite number > 0, got {a.lr_scale}")
    missing = [m for m in THREESTUDIO_IMPORTS if _find_spec(m) is None]
    if missing:
        raise DemoError(f"threestudio needs Python packages that are not installed ({', '.join(missing)}): "
                        "pip install -r tests/requirements-threestudio.txt")
    out = os.path.abspath(a.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise DemoError(f"--out {a.out} exists and is not a folder")
    parent = out
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise DemoError(f"--out {a.out}: {parent} is not writable")


def _find_spec(name: str):
    import importlib.util

    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def import_threestudio(root: str):
    """threestudio from ``root`` imported in this process on the CPU (stand-ins for CUDA-only packages)."""
    from . import cpu_launch

    import warnings

    cpu_launch.install_import_hooks()
    if root not in sys.path:
        sys.path.insert(0, root)
    with warnings.catch_warnings():  # threestudio's deprecation warnings are not the user's business here
        warnings.simplefilter("ignore")
        import threestudio
        import threestudio.data.uncond  # noqa: F401

    return threestudio


def _cameras(dataset_split: str, n: int, size: int, seed: int = 0):
    """threestudio's own cameras with the benchmark's ``eval`` camera setting (threestudio already imported):
    ``"train"`` (``n`` random views of ``RandomCameraIterableDataset``), ``"test"`` (its test views)."""
    from ..bench import gt3d_cameras

    if dataset_split == "train":
        return gt3d_cameras.sample_training_cameras(n, "eval", seed, size)
    return gt3d_cameras.eval_cameras("test", n, "eval", size)


def build_prior(folder: str, scene: str, views: int, seed: int = 1234) -> Dict[str, float]:
    """The ground-truth prior of one scene from ``views`` training renders (as ``gt3d_prior.build_scene_prior``)."""
    from ..bench import gt_scenes
    from ..bench.gt3d_cameras import RENDER_SIZE
    from ..testing import gt_prior3d as gp

    vae = gp.GroundTruthVAE()
    cams = _cameras("train", views, RENDER_SIZE, seed)
    rgb, _ = gt_scenes.render_gaussians(gt_scenes.scene_params(scene), cams["c2w"], cams["fovy"], RENDER_SIZE)
    gp.build_gt_prior(folder, [gt_scenes.PROMPTS[scene]], gp.encode_renders(vae, rgb), [0] * views,
                      cams["elevation"].tolist(), cams["azimuth"].tolist(), component_std=0.05)
    return {"vae_psnr": float(gp.vae_reconstruction_psnr(vae, rgb)), "renders": views, "prompt": gt_scenes.PROMPTS[scene]}


def launch_command(a, prior: str, exp_root: str) -> List[str]:
    """``python -m scoredistill.demo.cpu_launch launch.py --config ... --train --gpu 0 <overrides>``."""
    from ..bench import gt3d_runs
    from ..paths import CONFIGS

    row = gt3d_runs.ROW_BY_NAME["gs-sds (CFG 7.5)" if a.method == "gs-sds" else a.method]
    overrides = gt3d_runs.launch_overrides(row, a.scene, a.seed, prior, a.steps, "eval", a.lr_scale, exp_root,
                                           val_every=a.steps, n_test_views=a.test_views)
    overrides += [f"data.eval_width={a.video_size}", f"data.eval_height={a.video_size}", "data.n_val_views=1",
                  "trainer.num_sanity_val_steps=0"]
    config = os.path.join(CONFIGS, row.config)
    return [sys.executable, "-m", "scoredistill.demo.cpu_launch", "launch.py", "--config", config, "--train",
            "--gpu", "0"] + overrides


def run_launch(cmd: List[str], root: str, log_path: str, steps: int, progress=None, timeout: float = 3600) -> float:
    """Run launch.py (output to ``log_path``), advancing ``progress`` (a tqdm bar) with the trainer's step."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("WANDB_MODE", "disabled")
    # 32² renders and a tiny prior: one intra-op thread is fastest, and does not fight other work for the cores
    env.setdefault("OMP_NUM_THREADS", "1")
    progress_file = log_path + ".progress"
    env["SCOREDISTILL_PROGRESS_FILE"] = progress_file
    if os.path.exists(progress_file):
        os.remove(progress_file)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        done = 0
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                if time.time() - t0 > timeout:
                    proc.kill()
                    proc.wait()
                    raise DemoError(f"launch.py ran over {timeout:.0f} s; log: {log_path}")
                try:
                    with open(progress_file) as f:
                        step = int(f.read().split()[0])
                except (OSError, ValueError, IndexError):
                    continue
                if progress is not None and step > done:
                    progress.update(step - done)
                    done = step
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = [ln for ln in f.read().splitlines() if ln.strip()][-1:]
        raise DemoError(f"launch.py failed (exit {proc.returncode}): {tail[0] if tail else ''}; log: {log_path}")
    if progress is not None and steps > done:
        progress.update(steps - done)
    return time.time() - t0


def test_psnr(trial: str, scene: str, size: int, n_views: int) -> Dict[str, float]:
    """PSNR (dB) of the run's last test views (RGB panel; every third) against the scene's true renders at the same
    cameras, at the benchmark's 32² (test views area-downsampled from ``size``; the true renders at 32² keep this
    cheap)."""
    import numpy as np
    import torch
    from PIL import Image

    from ..bench import gt_scenes
    from ..bench.gt3d_cameras import RENDER_SIZE
    from ..bench.gt3d_scoring import psnr

    tests = [d for d in glob.glob(os.path.join(trial, "save", "it*-test")) if os.path.isdir(d)]
    folder = max(tests, key=lambda d: int(os.path.basename(d)[2:-5]))
    files = sorted(glob.glob(os.path.join(folder, "*.png")), key=lambda f: int(os.path.basename(f)[:-4]))
    rgb = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)[:, :size] / 255.0)
                       for f in files])
    r = RENDER_SIZE
    if size != r:
        rgb = torch.nn.functional.interpolate(rgb.permute(0, 3, 1, 2), size=(r, r), mode="area").permute(0, 2, 3, 1)
    cams = _cameras("test", n_views, r)
    idx = list(range(0, min(len(rgb), len(cams["c2w"])), 3))  # every third view: the true renders cost CPU time
    gt, _ = gt_scenes.render_gaussians(gt_scenes.scene_params(scene), cams["c2w"][idx], cams["fovy"][idx], r)
    return {"psnr": psnr(rgb[idx], gt.float()), "views": len(idx), "test_folder": folder}


_PAGE = """<!DOCTYPE html><html><head><meta charset='utf-8'><title>scoredistill demo</title><style>
body{{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:60em}} video{{width:512px;image-rendering:pixelated}}
.views img{{height:96px;margin:2px}} td,th{{text-align:left;padding:.2em .6em}} code{{background:#f4f4f4}}
</style></head><body>
<h1>scoredistill demo: {method} distils the {scene}</h1>
<p>threestudio's <code>launch.py</code> ran <code>configs/{config}</code> on the CPU for {steps} steps with the exact
ground-truth prior of the {scene} (prompt <i>{prompt}</i>) in place of Stable Diffusion.</p>
<div style='display:flex;gap:2em;align-items:flex-start'>
<div><h2>Test video</h2><video id='video' src='video.mp4' controls autoplay muted loop></video></div>
<div><h2>Files</h2><table>
<tr><th>Gaussians (3DGS PLY)</th><td><a href='gaussians.ply'>gaussians.ply</a></td></tr>
<tr><th>Interactive 3D view</th><td id='viewer'>{viewer}</td></tr>
<tr><th>Textured mesh</th><td><a href='mesh/model.glb'>model.glb</a> · <a href='mesh/model.obj'>model.obj</a></td></tr>
<tr><th>threestudio trial</th><td><a href='{trial}'>{trial}</a></td></tr>
<tr><th>launch.py log</th><td><a href='launch.log'>launch.log</a></td></tr>
</table>
<h2>Numbers</h2><table>
<tr><th>PSNR of the test views vs the true {scene} (32²)</th><td id='psnr'>{psnr:.2f} dB ({views} views)</td></tr>
<tr><th>Mesh</th><td>{faces} faces, {vertices} vertices</td></tr>
<tr><th>Wall time</th><td>{total:.0f} s (prior {t_prior:.0f} s, launch.py {t_launch:.0f} s, mesh {t_mesh:.0f} s)</td></tr>
</table></div></div>
<h2>Test views</h2><div class='views'>{images}</div>
<p>Next: the same config with Stable Diffusion on a GPU, see the README's "The main job".</p>
</body></html>
"""


def write_page(out: str, info: Dict) -> str:
    import html

    images = "".join(f"<img src='test/{html.escape(os.path.basename(p))}' alt='test view'>" for p in info["test_images"])
    from .. import splat_viewer

    viewer = ("<a href='gaussians-3d.html'>gaussians-3d.html</a> (the Gaussians in gaussian-splats-3d, video beside)"
              if info.get("viewer_page") else "not written: " + html.escape(splat_viewer.INSTALL_HINT))
    page = _PAGE.format(images=images, viewer=viewer, **{k: (html.escape(v) if isinstance(v, str) else v)
                                                          for k, v in info.items() if k != "test_images"})
    from ..atomic_io import atomic_write_text

    path = os.path.join(out, "index.html")
    atomic_write_text(path, page)
    return path


def run_demo(a, log=print) -> Dict:
    """The demo (module docstring); returns the summary written to ``demo.json``."""
    from tqdm.auto import tqdm

    check_settings(a)
    root = find_threestudio(a.threestudio, log=log)
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    from ..atomic_io import atomic_write_json
    from ..paths import link

    try:
        link(root)
    except FileExistsError as e:  # a copy or another checkout of the pack already there: launch.py uses that one
        log(f"note: {e}")
    t_start = time.time()
    stages = tqdm(total=4, desc="demo", unit="stage", position=0, leave=True)
    try:
        stages.set_postfix_str("ground-truth prior")
        t0 = time.time()
        try:
            import_threestudio(root)
        except ImportError as e:
            raise DemoError(f"threestudio in {root} cannot be imported ({e}): "
                            "pip install -r tests/requirements-threestudio.txt") from e
        prior_dir = os.path.join(out, "prior")
        key = {"scene": a.scene, "views": a.views, "component_std": 0.05, "version": 1}
        stamp = os.path.join(out, "prior.json")
        old = None
        if os.path.isfile(stamp):
            with open(stamp) as f:
                old = json.load(f)
        if old is not None and old.get("key") == key and os.path.isfile(os.path.join(prior_dir, "model_index.json")):
            prior = old["prior"]  # the same prior as last time: reused
        else:
            if os.path.isdir(prior_dir):
                shutil.rmtree(prior_dir)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prior = build_prior(prior_dir, a.scene, a.views)
            atomic_write_json(stamp, {"key": key, "prior": prior})
        t_prior = time.time() - t0
        stages.update(1)

        stages.set_postfix_str("launch.py")
        exp_root = os.path.join(out, "run")
        if os.path.isdir(exp_root):
            shutil.rmtree(exp_root)
        cmd = launch_command(a, prior_dir, exp_root)
        with tqdm(total=a.steps, desc="launch.py --train", unit="step", position=1, leave=False) as bar:
            t_launch = run_launch(cmd, root, os.path.join(out, "launch.log"), a.steps, bar)
        trial = os.path.join(exp_root, "run", "t")
        stages.update(1)

        stages.set_postfix_str("mesh")
        t0 = time.time()
        from ..suite.state import find_test_video

        video = find_test_video(trial)
        plys = sorted(glob.glob(os.path.join(trial, "save", "**", "*.ply"), recursive=True), key=os.path.getmtime)
        if video is None or not plys:
            raise DemoError(f"launch.py finished without a test video or a PLY in {trial}; log: {out}/launch.log")
        shutil.copyfile(video, os.path.join(out, "video.mp4"))
        shutil.copyfile(plys[-1], os.path.join(out, "gaussians.ply"))
        from ..exporter.gaussian_mesh import export_ply_to_mesh

        mesh_dir = os.path.join(out, "mesh")
        _, mesh = export_ply_to_mesh(os.path.join(out, "gaussians.ply"), mesh_dir, resolution=a.mesh_resolution,
                                     texture_size=256, formats=["obj", "glb"])
        t_mesh = time.time() - t0
        from .. import splat_viewer

        versions = splat_viewer.vendor(os.path.join(out, "viewer"))
        viewer_page = None
        if versions is not None:
            viewer_page = splat_viewer.write_page(os.path.join(out, "gaussians-3d.html"),
                                                  os.path.join(out, "gaussians.ply"), os.path.join(out, "viewer"),
                                                  f"scoredistill demo: {a.method} on the {a.scene}",
                                                  os.path.join(out, "video.mp4"), versions)
        stages.update(1)

        stages.set_postfix_str("page")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            score = test_psnr(trial, a.scene, a.video_size, a.test_views)
        test_dir = os.path.join(out, "test")
        if os.path.isdir(test_dir):
            shutil.rmtree(test_dir)
        os.makedirs(test_dir)
        images = sorted(glob.glob(os.path.join(score["test_folder"], "*.png")),
                        key=lambda f: int(os.path.basename(f)[:-4]))
        for f in images:
            shutil.copyfile(f, os.path.join(test_dir, os.path.basename(f)))
        from ..bench.gt3d_runs import ROW_BY_NAME

        info = {"method": a.method, "scene": a.scene, "steps": a.steps, "prompt": prior["prompt"],
                "config": ROW_BY_NAME["gs-sds (CFG 7.5)" if a.method == "gs-sds" else a.method].config,
                "trial": os.path.relpath(trial, out), "psnr": score["psnr"], "views": score["views"],
                "faces": int(mesh.stats["faces"]), "vertices": int(mesh.stats["vertices"]),
                "t_prior": t_prior, "t_launch": t_launch, "t_mesh": t_mesh, "total": time.time() - t_start,
                "test_images": images, "viewer_page": viewer_page}
        page = write_page(out, info)
        stages.update(1)
    finally:
        stages.close()
    from .. import splat_viewer

    info.update({"threestudio": root, "command": cmd, "vae_psnr": prior["vae_psnr"], "prior_renders": a.views,
                 "seed": a.seed, "video_size": a.video_size, "lr_scale": a.lr_scale, "total": time.time() - t_start,
                 "files": {"page": page, "video": os.path.join(out, "video.mp4"),
                           "ply": os.path.join(out, "gaussians.ply"), "glb": os.path.join(mesh_dir, "model.glb"),
                           "obj": os.path.join(mesh_dir, "model.obj"), "viewer": viewer_page}})
    info["test_images"] = [os.path.join(test_dir, os.path.basename(p)) for p in images]
    atomic_write_json(os.path.join(out, "demo.json"), info)
    log(f"demo: {a.method} on the {a.scene}, {a.steps} steps: test-view PSNR {info['psnr']:.2f} dB vs the true scene; "
        f"{info['total']:.0f} s in all (prior {t_prior:.0f} s, launch.py {t_launch:.0f} s, mesh {t_mesh:.0f} s)")
    for k in ("page", "video", "ply", "glb", "viewer"):
        log(f"{k}: {info['files'][k] or 'not written (' + splat_viewer.INSTALL_HINT + ')'}")
    return info


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--threestudio", default=None, metavar="PATH",
                   help="threestudio work tree (a clone of threestudio-project/threestudio, tested at commit "
                        f"{THREESTUDIO_COMMIT[:7]}); default: $THREESTUDIO_ROOT, else ./.threestudio, else "
                        f"./threestudio, else a clone of that commit made once in {CLONE_DIR} (needs git and GitHub)")
    p.add_argument("--out", default=d["out"], help="output folder (default: %(default)s)")
    p.add_argument("--method", default=d["method"], choices=METHODS,
                   help="the pack config to run, configs/<method>.yaml (default: %(default)s)")
    p.add_argument("--scene", default=d["scene"], choices=SCENES,
                   help="the ground-truth scene: a six-coloured cube, a two-faced ball, a table (default: %(default)s)")
    p.add_argument("--steps", type=int, default=d["steps"], help="training steps (default: %(default)s)")
    p.add_argument("--views", type=int, default=d["views"],
                   help="training renders in the ground-truth prior (mixture components; default: %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"], help="launch.py seed (default: %(default)s)")
    p.add_argument("--video-size", type=int, default=d["video_size"],
                   help="test views and video resolution in pixels (training renders stay 32²; default: %(default)s)")
    p.add_argument("--test-views", type=int, default=d["test_views"],
                   help="test views (video frames; default: %(default)s)")
    p.add_argument("--mesh-resolution", type=int, default=d["mesh_resolution"],
                   help="density grid resolution of the mesh export (default: %(default)s)")
    p.add_argument("--lr-scale", type=float, default=d["lr_scale"],
                   help="multiplier of the config's Gaussian learning rates, set for 2500-5000 steps "
                        "(default: %(default)s, as the ground-truth 3D benchmark)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="scoredistill demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args) -> int:
    try:
        run_demo(args)
    except DemoError as e:
        print(f"scoredistill demo: {e}", file=sys.stderr)
        return 2
    return 0
