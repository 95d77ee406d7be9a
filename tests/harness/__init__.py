"""threestudio integration harness (tests only).

* :func:`threestudio_root` -- the work tree named by ``THREESTUDIO_ROOT`` (or ``None``).
* :func:`import_threestudio` -- import threestudio in-process on the CPU (stand-ins + device patch).
* :func:`tiny_sd_path` -- a precomputed tiny Stable Diffusion folder (built once, cached).
* :func:`run_launch` -- run threestudio's own ``launch.py`` (unmodified) through ``cpu_launch.py`` in a
  subprocess with a config and overrides; returns the trial folder, raises with the output on failure.
* launch overrides for CPU runs with the tiny SD: :func:`tiny_overrides` (guidance + prompt processor +
  small renders), :func:`gs_cpu_overrides` (small Gaussian init), :func:`nerf_cpu_overrides` (pure-torch
  NeRF and the pack's CPU volume renderer).
* fault injection for launch tests: ``run_launch(..., env={"SCOREDISTILL_TEST_FAULTS": json.dumps(spec)})``
  (non-finite latent gradient / render / parameter gradient at chosen steps; see ``faults.py``).
* in-process helpers: :func:`make_prompt_utils` (threestudio's SD prompt processor on the tiny SD),
  :func:`tiny_guidance_config` (a guidance config dict for the tiny SD on CPU), :func:`one_intraop_thread`
  and :func:`one_thread_fixture` (tiny models run fastest with one torch intra-op thread on a shared CPU).
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from contextlib import contextmanager
from typing import List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
STUBS = os.path.join(HERE, "stubs")
CACHE = os.environ.get("SCOREDISTILL_TEST_CACHE", os.path.join(REPO, ".tiny-models"))


def threestudio_root() -> Optional[str]:
    """The threestudio work tree for the integration tests: ``THREESTUDIO_ROOT`` if set, else the repository's
    ``.threestudio/`` (made by ``tests/harness/prepare_threestudio.py``) if present, else ``None``.

    Raises ``RuntimeError`` if ``THREESTUDIO_ROOT`` is set but holds no ``launch.py`` (a typo must not silently
    skip the integration tests)."""
    root = os.environ.get("THREESTUDIO_ROOT")
    if root:
        if not os.path.isfile(os.path.join(root, "launch.py")):
            raise RuntimeError(f"THREESTUDIO_ROOT={root} is not a threestudio work tree (no launch.py)")
        return os.path.abspath(root)
    local = os.path.join(REPO, ".threestudio")
    if os.path.isfile(os.path.join(local, "launch.py")):
        return local
    return None


def tiny_sd_path() -> str:
    from scoredistill.testing.tiny_models import build_tiny_stable_diffusion

    return build_tiny_stable_diffusion(os.path.join(CACHE, "tiny-sd"))


def tiny_sd_f8_path() -> str:
    """Tiny SD with Stable Diffusion's x8 VAE (512x512 renders -> 64x64 latents), for threestudio's own
    ``stable-diffusion-guidance``, which always resizes to 512 and decodes at 64x64 latents."""
    from scoredistill.testing.tiny_models import build_tiny_stable_diffusion

    return build_tiny_stable_diffusion(os.path.join(CACHE, "tiny-sd-vae8"), vae_scale_factor=8)


def tiny_dpt_path() -> str:
    from scoredistill.testing.tiny_models import build_tiny_dpt

    return build_tiny_dpt(os.path.join(CACHE, "tiny-dpt"))


def tiny_clip_path() -> str:
    from scoredistill.testing.tiny_models import build_tiny_clip

    return build_tiny_clip(os.path.join(CACHE, "tiny-clip"))


def import_threestudio():
    """Import threestudio from ``THREESTUDIO_ROOT`` in this process (CPU device, stand-ins) and the pack."""
    root = threestudio_root()
    if root is None:
        raise RuntimeError("THREESTUDIO_ROOT is not set to a threestudio work tree")
    if STUBS not in sys.path:
        # transformers caches whether torchvision is importable (lru_cache): settle it before the stand-in is on
        # sys.path, so its image processors (DPT, CLIP) keep their PIL backend in this process whatever the
        # test order -- the stand-in has no real ops
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()
        sys.path.insert(0, STUBS)
    if root not in sys.path:
        sys.path.insert(0, root)
    if "threestudio" not in sys.modules:
        sys.path.insert(0, HERE)
        import cpu_launch

        cpu_launch.install()
    import threestudio

    import scoredistill

    scoredistill.register_with_threestudio()  # idempotent; no-op if already registered
    return threestudio


def link_pack(root: str) -> str:
    from scoredistill.cli import link

    return link(root)


def run_launch(
    config: str,
    overrides: Sequence[str] = (),
    mode: str = "--train",
    exp_root: Optional[str] = None,
    timeout: float = 900,
    env: Optional[dict] = None,
    gpu: str = "0",
) -> str:
    """Run ``python launch.py --config CONFIG MODE OVERRIDES...`` on the CPU in THREESTUDIO_ROOT.

    The pack is linked into ``custom/`` first.  ``exp_root`` defaults to ``<cache>/outputs``.  Returns the
    trial folder (``exp_root/name/tag``) -- the newest if several.  Raises ``RuntimeError`` with the tail of
    the output if launch.py fails or prints ``IMPORT FAILED``.  ``gpu="0,1"``: launch.py's ``--gpu 0,1`` (multi-GPU)
    path, run as 2 CPU processes under Lightning DDP on the gloo backend (see ``cpu_launch.py``).
    """
    root = threestudio_root()
    if root is None:
        raise RuntimeError("THREESTUDIO_ROOT is not set to a threestudio work tree")
    link_pack(root)
    exp_root = exp_root or os.path.join(CACHE, "outputs")
    cmd = [
        sys.executable,
        os.path.join(HERE, "cpu_launch.py"),
        "launch.py",
        "--config",
        os.path.abspath(config),
        mode,
        "--gpu",
        gpu,
        f"exp_root_dir={exp_root}",
        *overrides,
    ]
    run_env = dict(os.environ)
    run_env["PYTHONPATH"] = os.pathsep.join([STUBS, run_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    run_env.setdefault("HF_HUB_OFFLINE", "1")
    run_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_env.setdefault("WANDB_MODE", "disabled")
    # --gpu 0,1: launch.py's multi-GPU path, run as that many CPU DDP processes (gloo) by cpu_launch.py
    run_env["SCOREDISTILL_CPU_DEVICES"] = str(len(gpu.split(",")))
    if env:
        run_env.update(env)
    proc = subprocess.run(cmd, cwd=root, env=run_env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 or "IMPORT FAILED" in output:
        raise RuntimeError(f"launch.py failed (exit {proc.returncode}):\n{output[-8000:]}")
    trials = sorted(glob.glob(os.path.join(exp_root, "*", "*")), key=os.path.getmtime)
    if not trials:
        raise RuntimeError(f"launch.py wrote no trial folder under {exp_root}:\n{output[-4000:]}")
    run_launch.last_output = output
    return trials[-1]


# ------------------------------------------------------------------------------------------ CPU launch overrides
def tiny_overrides(
    tiny_sd: str,
    *extra: str,
    prompt: Optional[str] = "a hamburger",
    image_size: int = 32,
    render_size: int = 32,
    max_steps: Optional[int] = None,
) -> List[str]:
    """launch.py overrides for any pack config on the CPU with the tiny SD at ``tiny_sd``.

    Guidance and prompt processor load the tiny SD (no spawned process, fp32 weights and trainer precision),
    the guidance resizes renders to ``image_size``, the data renders ``render_size``² views (1 validation,
    2 test views); ``prompt=None`` leaves the config's prompt; ``max_steps`` also sets
    ``trainer.val_check_interval`` (validate once, at the end).  ``extra`` overrides are appended (a later
    override of the same key wins).
    """
    out = [
        f"system.guidance.pretrained_model_name_or_path={tiny_sd}",
        f"system.prompt_processor.pretrained_model_name_or_path={tiny_sd}",
        "system.prompt_processor.spawn=false",
        "system.guidance.half_precision_weights=false",
        f"system.guidance.image_size={image_size}",
        "trainer.precision=32",
        f"data.width={render_size}",
        f"data.height={render_size}",
        f"data.eval_width={render_size}",
        f"data.eval_height={render_size}",
        "data.n_val_views=1",
        "data.n_test_views=2",
    ]
    if prompt is not None:
        out.append(f"system.prompt_processor.prompt={prompt}")
    if max_steps is not None:
        out += [f"trainer.max_steps={max_steps}", f"trainer.val_check_interval={max_steps}"]
    return out + list(extra)


def gs_cpu_overrides(num_points: int = 300, batch_size: int = 2) -> List[str]:
    """Gaussian-splatting configs (``gsplat-system``) made small: a sphere of ``num_points`` Gaussians, no upsampling."""
    return [
        f"data.batch_size={batch_size}",
        "system.geometry.init=sphere",
        f"system.geometry.num_points={num_points}",
        "system.geometry.upsample_to=0",
    ]


def nerf_cpu_overrides(tiny_mlp: bool = False) -> List[str]:
    """NeRF configs (``implicit-volume``) made CPU-runnable: pure-torch encodings (no tiny-cuda-nn) and the pack's
    ``kernel-smoothed-volume-renderer`` (threestudio's ``nerf-volume-renderer`` needs CUDA), few samples per
    ray.  ``tiny_mlp``: also a 1-hidden-layer 16-neuron torch MLP (for configs asking for tcnn MLPs)."""
    out = [
        "system.geometry.pos_encoding_config.otype=ProgressiveBandFrequency",
        "system.geometry.pos_encoding_config.n_frequencies=4",
        "system.background.dir_encoding_config.otype=ProgressiveBandFrequency",
        "system.background.dir_encoding_config.n_frequencies=2",
        "system.renderer_type=kernel-smoothed-volume-renderer",
        "system.renderer.num_samples_per_ray=16",
        "system.renderer.num_samples_per_ray_importance=8",
    ]
    if tiny_mlp:
        out += [
            "system.geometry.mlp_network_config.otype=VanillaMLP",
            "system.geometry.mlp_network_config.activation=ReLU",
            "system.geometry.mlp_network_config.output_activation=none",
            "system.geometry.mlp_network_config.n_neurons=16",
            "system.geometry.mlp_network_config.n_hidden_layers=1",
        ]
    return out


# ------------------------------------------------------------------------------------------ in-process helpers
def make_prompt_utils(threestudio, tiny_sd: str, cache_dir: str, prompt: str = "a hamburger", **cfg):
    """``PromptProcessorOutput`` of threestudio's ``stable-diffusion-prompt-processor`` on the tiny SD (in this
    process; its embedding cache goes under ``cache_dir``/.threestudio_cache).  ``cfg``: more processor
    settings (e.g. ``negative_prompt``)."""
    config = {"prompt": prompt, "pretrained_model_name_or_path": tiny_sd, "spawn": False, **cfg}
    cwd = os.getcwd()
    os.chdir(cache_dir)
    try:
        return threestudio.find("stable-diffusion-prompt-processor")(config)()
    finally:
        os.chdir(cwd)


def tiny_guidance_config(tiny_sd: str, image_size: int = 32, **cfg) -> dict:
    """A guidance config dict for the tiny SD on the CPU (fp32 weights, renders resized to ``image_size``)."""
    return {"pretrained_model_name_or_path": tiny_sd, "half_precision_weights": False, "image_size": image_size, **cfg}


@contextmanager
def one_intraop_thread():
    """Run the block with one torch intra-op thread (restored after): tiny tensors / models are fastest
    single-threaded, and OpenMP threads spin-wait on a loaded shared CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def one_thread_fixture(scope: str = "module"):
    """An autouse pytest fixture applying :func:`one_intraop_thread` to every test of the module that assigns it
    (``_one_thread = one_thread_fixture()``)."""
    import pytest

    @pytest.fixture(autouse=True, scope=scope)
    def _one_intraop_thread():
        with one_intraop_thread():
            yield

    return _one_intraop_thread
