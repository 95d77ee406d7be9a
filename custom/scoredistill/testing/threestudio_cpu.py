"""threestudio on a machine without CUDA, and tiny models to run it on: what the benchmarks' CPU scale, the demo and
the test suite share (tooling; the runtime never imports it).

* :func:`threestudio_root` -- the threestudio work tree: ``THREESTUDIO_ROOT``, else ``<repo>/.threestudio``.
* :func:`import_threestudio` -- import threestudio in this process with the CPU device patch and the stand-ins of
  :data:`STUBS` (``cpu_stubs/``, the one copy), then register the pack.
* :data:`CPU_LAUNCH` -- the CPU launcher run by path in front of ``launch.py`` (:mod:`.cpu_launch`).
* tiny random-weight models, built once under :func:`cache_dir`: :func:`tiny_sd_path`, :func:`tiny_sd_f8_path`,
  :func:`tiny_dpt_path`, :func:`tiny_clip_path`.
* launch overrides for CPU runs: :func:`tiny_overrides` (guidance + prompt processor on the tiny SD, small renders),
  :func:`gs_cpu_overrides` (small Gaussian init), :func:`nerf_cpu_overrides` (pure-torch NeRF and the pack's CPU
  volume renderer).

``repo`` arguments default to the checkout holding the package (:data:`scoredistill.paths.CHECKOUT`), else the
current folder (a non-editable install).
"""
from __future__ import annotations

import os
import sys
from typing import Callable, List, Optional

from ..paths import CHECKOUT

HERE = os.path.dirname(os.path.abspath(__file__))
STUBS = os.path.join(HERE, "cpu_stubs")
CPU_LAUNCH = os.path.join(HERE, "cpu_launch.py")


def _repo(repo: Optional[str]) -> str:
    return os.path.abspath(repo or CHECKOUT or os.getcwd())


def cache_dir(repo: Optional[str] = None) -> str:
    """Where tiny models are built: ``SCOREDISTILL_TEST_CACHE``, else ``<repo>/.tiny-models``."""
    return os.environ.get("SCOREDISTILL_TEST_CACHE", os.path.join(_repo(repo), ".tiny-models"))


def threestudio_root(repo: Optional[str] = None) -> Optional[str]:
    """The threestudio work tree: ``THREESTUDIO_ROOT`` if set, else ``<repo>/.threestudio/`` (made by
    the README's test section in a checkout) if present, else ``None``.

    Raises ``RuntimeError`` if ``THREESTUDIO_ROOT`` is set but holds no ``launch.py`` (a typo must not silently
    skip the integration tests)."""
    root = os.environ.get("THREESTUDIO_ROOT")
    if root:
        if not os.path.isfile(os.path.join(root, "launch.py")):
            raise RuntimeError(f"THREESTUDIO_ROOT={root} is not a threestudio work tree (no launch.py)")
        return os.path.abspath(root)
    local = os.path.join(_repo(repo), ".threestudio")
    if os.path.isfile(os.path.join(local, "launch.py")):
        return local
    return None


def tiny_sd_path(repo: Optional[str] = None) -> str:
    from .tiny_models import build_tiny_stable_diffusion

    return build_tiny_stable_diffusion(os.path.join(cache_dir(repo), "tiny-sd"))


def tiny_sd_f8_path(repo: Optional[str] = None) -> str:
    """Tiny SD with Stable Diffusion's x8 VAE (512x512 renders -> 64x64 latents), for threestudio's own
    ``stable-diffusion-guidance``, which always resizes to 512 and decodes at 64x64 latents."""
    from .tiny_models import build_tiny_stable_diffusion

    return build_tiny_stable_diffusion(os.path.join(cache_dir(repo), "tiny-sd-vae8"), vae_scale_factor=8)


def tiny_dpt_path(repo: Optional[str] = None) -> str:
    from .tiny_models import build_tiny_dpt

    return build_tiny_dpt(os.path.join(cache_dir(repo), "tiny-dpt"))


def tiny_clip_path(repo: Optional[str] = None) -> str:
    from .tiny_models import build_tiny_clip

    return build_tiny_clip(os.path.join(cache_dir(repo), "tiny-clip"))


def _default_cpu_install() -> None:
    from . import cpu_launch

    cpu_launch.install()


def import_threestudio(repo: Optional[str] = None, install_cpu: Optional[Callable[[], None]] = None):
    """Import threestudio from :func:`threestudio_root` in this process (CPU device patch, stand-ins) and register
    the pack.  ``install_cpu``: the CPU patch to install before threestudio's first import (default
    :func:`scoredistill.testing.cpu_launch.install`).

    Raises:
        RuntimeError: no threestudio work tree.
    """
    root = threestudio_root(repo)
    if root is None:
        raise RuntimeError("THREESTUDIO_ROOT is not set to a threestudio work tree")
    if STUBS not in sys.path:
        # transformers caches whether torchvision is importable (lru_cache): settle it before the stand-in is on
        # sys.path, so its image processors (DPT, CLIP) keep their PIL backend in this process whatever the
        # order of imports -- the stand-in has no real ops
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()
        sys.path.insert(0, STUBS)
    if root not in sys.path:
        sys.path.insert(0, root)
    if "threestudio" not in sys.modules:
        (install_cpu or _default_cpu_install)()
    import threestudio

    import scoredistill

    scoredistill.register_with_threestudio()  # idempotent; no-op if already registered
    return threestudio


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
