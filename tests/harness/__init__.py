"""threestudio integration harness (tests only; what the benchmarks share with it lives in the pack's
:mod:`scoredistill.testing.threestudio_cpu`, re-exported here).

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
from typing import Optional, Sequence

from scoredistill.testing import threestudio_cpu as _tc
from scoredistill.testing.threestudio_cpu import gs_cpu_overrides, nerf_cpu_overrides, tiny_overrides  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
STUBS = _tc.STUBS  # the pack's one copy of the stand-ins (scoredistill/testing/cpu_stubs)
CACHE = _tc.cache_dir(REPO)


def threestudio_root() -> Optional[str]:
    """:func:`scoredistill.testing.threestudio_cpu.threestudio_root` of this checkout (``THREESTUDIO_ROOT``, else
    ``.threestudio/``, else ``None``)."""
    return _tc.threestudio_root(REPO)


def tiny_sd_path() -> str:
    return _tc.tiny_sd_path(REPO)


def tiny_sd_f8_path() -> str:
    return _tc.tiny_sd_f8_path(REPO)


def tiny_dpt_path() -> str:
    return _tc.tiny_dpt_path(REPO)


def tiny_clip_path() -> str:
    return _tc.tiny_clip_path(REPO)


def _install_cpu_launch():
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import cpu_launch

    cpu_launch.install()


def import_threestudio():
    """Import threestudio from ``THREESTUDIO_ROOT`` in this process (CPU device patch of the harness'
    ``cpu_launch.py``, stand-ins) and the pack."""
    return _tc.import_threestudio(REPO, install_cpu=_install_cpu_launch)


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


# CPU launch overrides (tiny_overrides, gs_cpu_overrides, nerf_cpu_overrides): scoredistill.testing.threestudio_cpu


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
