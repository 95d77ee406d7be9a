"""The GPU suite: one prepared run (``benchmarks/gpu_suite.sh``) that writes ONE results file (JSON).

Sections (each one's failure is recorded in the file and the suite goes on; the file is rewritten after every
section, so a run cut short still leaves what it measured):

``cuda_tests``
    the test suite's CUDA-only tests (``pytest -k cuda`` over the files that have them), outcome counts.
``render_compare``
    the pack's CPU rasterizer fallback (:func:`scoredistill.renderer.gsplat_render.rasterize_cpu`, on CPU
    tensors) against gsplat's CUDA ``rasterization``: max abs error of RGB, alpha, expected depth and of the
    gradients of every Gaussian parameter.  In ``tiny`` mode (no CUDA) the reference is the same fallback in
    float64 -- a plumbing check of the section, labelled as such in the file.
``render_speed``
    gsplat render forward (RGB + expected depth) + backward at 10k / 100k / 1M Gaussians, 512² (tiny: 300 at
    32² on the CPU fallback); median seconds over repeats after one warm-up.
``cost``
    :mod:`scoredistill.bench.cost_bench` with the SD 2.1-base UNet architecture (published config, random
    weights: the real model's FLOPs and memory) in fp16 at 512², each method as a ratio to SDS in the same run
    (tiny: the tiny UNet, fp32, 32², CPU).
``launch``
    every config in ``configs/`` through threestudio's unmodified ``launch.py`` at its own (paper) settings,
    with a random-weight SD 2.1-base pipeline (UNet, VAE and OpenCLIP-H text encoder at their published
    sizes; a small tokenizer), stopped after ``--launch-steps`` training steps by
    :mod:`scoredistill.bench.launch_probe`: seconds per iteration (median over the steps after the first two),
    peak VRAM, and ``estimated_total_min = s/it × trainer.max_steps / 60`` -- an EXTRAPOLATION from a few
    steps (it ignores validation/test renders, densification growth and later-step changes), labelled so in
    the file and in :func:`format_report`.  Tiny mode: ``--launch-configs`` (default ``ge3d-gs``) on the CPU
    with the test harness' tiny overrides.

Commands::

    python -m scoredistill.bench.gpu_suite --mode full --out benchmarks/results/gpu_suite.json   # on a GPU
    python -m scoredistill.bench.gpu_suite --mode tiny --out /tmp/gpu_suite_tiny.json            # CPU, CI
    python -m scoredistill.bench.gpu_suite --report benchmarks/results/gpu_suite.json           # tables
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from typing import Dict, List, Optional

import torch

#: the configs' paper-reported wall times (for the README table; not measured here)
PAPER_TIMES = {
    "ge3d-gs": "GE3D: 10–20 min on an A6000",
    "ge3d-nerf": "GE3D: 10–20 min on an A6000",
    "vdm-gs": "DreamMapping: ~15 min on an A100",
    "vdm-nerf": "DreamMapping: ~15 min on an A100",
    "lods-embedding-gs": "LODS-GS: 30 min on an A6000",
}
SKIP_CONFIGS = ("hifa-cpu-smoke",)  # a CPU smoke config, not a paper setting

#: Stable Diffusion 2.1-base VAE (stabilityai/stable-diffusion-2-1-base, vae/config.json)
SD21_BASE_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215,
)
#: Stable Diffusion 2.1 text encoder (OpenCLIP ViT-H/14 text tower, text_encoder/config.json), vocab excepted
SD21_TEXT_CONFIG = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
)


# ----------------------------------------------------------------------------------------------- helpers
def _write(path: str, result: Dict) -> None:
    from scoredistill.atomic_io import atomic_write_json

    atomic_write_json(path, result, indent=1, sort_keys=False, default=str)


def build_sd21_arch_pipeline(folder: str, device: str = "cpu", seed: int = 0) -> str:
    """A random-weight pipeline folder with Stable Diffusion 2.1-base's UNet, VAE and text encoder sizes (fp16).

    The tokenizer is the tiny test tokenizer (:mod:`scoredistill.testing.tiny_models`; no hub access): the
    text encoder's embedding table is therefore small, which changes nothing per step (threestudio caches the
    prompt embeddings).  Already-built folders are returned unchanged.
    """
    if os.path.exists(os.path.join(folder, "model_index.json")):
        return folder
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .cost_bench import SD21_BASE_UNET_CONFIG
    from ..testing.tiny_models import SD_SCHEDULER_CONFIG, write_tiny_clip_tokenizer_files

    torch.manual_seed(seed)
    tok_dir = os.path.join(folder, "_tokenizer_src")
    write_tiny_clip_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(vocab=os.path.join(tok_dir, "vocab.json"), merges=os.path.join(tok_dir, "merges.txt"),
                              model_max_length=77)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD21_BASE_UNET_CONFIG).half()
        vae = AutoencoderKL(**SD21_BASE_VAE_CONFIG).half()
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                            **SD21_TEXT_CONFIG)).half()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def _scene(n: int, seed: int = 0):
    from ..geometry import gaussian_init

    import math

    gen = torch.Generator().manual_seed(seed)
    pts = gaussian_init.sample_sphere(n, 0.5, generator=gen)
    # scale = the mean spacing of n points in the ball (no O(n²) nearest-neighbour search at 1M Gaussians)
    spacing = (4.0 / 3.0 * math.pi * 0.5**3 / n) ** (1.0 / 3.0)
    return gaussian_init.params_from_points(pts, torch.rand(n, 3, generator=gen), sh_degree=0, init_opacity=0.5, init_scale=spacing)


def _camera(res: int, device):
    from ..renderer.gsplat_cameras import threestudio_to_gsplat_cameras

    c2w = torch.eye(4)
    c2w[:3, :3] = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # on +x, looking at 0, z up
    c2w[0, 3] = 2.0
    return threestudio_to_gsplat_cameras(c2w[None].to(device), torch.tensor([0.8727], device=device), res, res)


def _render(params, res, device, backend, dtype=torch.float32):
    from ..geometry import gaussian_params
    from ..renderer.gsplat_render import rasterize

    leaves = {k: v.detach().to(device, dtype).requires_grad_(True) for k, v in params.items()}
    a = gaussian_params.activated(leaves)
    viewmats, Ks = _camera(res, device)
    rgbd, alpha, _ = rasterize(a["means"], a["quats"], a["scales"], a["opacities"], a["colors"],
                               viewmats.to(dtype), Ks.to(dtype), res, res, sh_degree=0, render_mode="RGB+ED",
                               backgrounds=torch.full((1, 3), 0.3, device=device, dtype=dtype), backend=backend)
    w = torch.linspace(0.5, 1.5, rgbd.numel(), device=device, dtype=dtype).view_as(rgbd)  # a generic loss
    ((rgbd * w).sum() + alpha.sum()).backward()
    grads = {k: v.grad.detach().double().cpu() for k, v in leaves.items()}
    return rgbd[..., :3].detach().double().cpu(), alpha.detach().double().cpu(), rgbd[..., 3:].detach().double().cpu(), grads


# ----------------------------------------------------------------------------------------------- sections
CUDA_TEST_FILES = ("tests/test_gsplat_render.py", "tests/test_guidance_memory.py", "tests/test_gsplat_threestudio.py")


def section_cuda_tests(repo: str, tiny: bool, work: str, timeout: float) -> Dict:
    # tiny mode: only the file without threestudio imports (the section's plumbing; its CUDA tests skip)
    files = [f for f in (CUDA_TEST_FILES[:1] if tiny else CUDA_TEST_FILES) if os.path.exists(os.path.join(repo, f))]
    xml = os.path.join(work, "cuda_tests_junit.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda", f"--junitxml={xml}", *files]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout)
    import xml.etree.ElementTree as ET

    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    cases = []
    if os.path.exists(xml):
        for case in ET.parse(xml).getroot().iter("testcase"):
            kind = "passed"
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    kind = "failed" if child.tag == "failure" else child.tag
                    reason = child.get("message", "")
                    break
            else:
                reason = ""
            counts[kind] += 1
            cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": kind, "reason": reason[:200]})
        os.remove(xml)
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "counts": counts, "cases": cases,
            "seconds": time.perf_counter() - t0, "output_tail": (proc.stdout + proc.stderr)[-2000:]}


def section_render_compare(tiny: bool) -> Dict:
    n, res = (300, 32) if tiny else (5000, 256)
    params = _scene(n, seed=1)
    if tiny:
        ref = _render(params, res, "cpu", "cpu", torch.float64)
        label = "CPU fallback float32 vs CPU fallback float64 (tiny mode: plumbing check, no CUDA)"
    else:
        ref = _render(params, res, "cuda", "cuda")
        label = "CPU fallback (CPU, float32) vs gsplat CUDA rasterization (float32)"
    cpu = _render(params, res, "cpu", "cpu")
    errs = {
        "rgb": (cpu[0] - ref[0]).abs().max().item(),
        "alpha": (cpu[1] - ref[1]).abs().max().item(),
        "depth": (cpu[2] - ref[2]).abs().max().item(),
    }
    for k in cpu[3]:
        if cpu[3][k].numel() == 0:
            continue  # e.g. no higher SH bands at degree 0
        d = (cpu[3][k] - ref[3][k]).abs().max().item()
        scale = ref[3][k].abs().max().item()
        errs[f"grad_{k}"] = d
        errs[f"grad_{k}_relative_to_max"] = d / scale if scale else None
    return {"comparison": label, "gaussians": n, "resolution": res, "max_abs_error": errs}


def section_render_speed(tiny: bool, repeats: int = 3) -> Dict:
    if tiny:
        repeats = 1
    counts, res, device = ([300], 32, "cpu") if tiny else ([10_000, 100_000, 1_000_000], 512, "cuda")
    rows = []
    for n in counts:
        params = _scene(n)
        times = []
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for r in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            _render(params, res, device, "auto")
            if device == "cuda":
                torch.cuda.synchronize()
            if r:
                times.append(time.perf_counter() - t0)
        rows.append({"gaussians": n, "resolution": res, "device": device, "fwd_bwd_seconds_median": statistics.median(times),
                     "peak_vram_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None})
    return {"rows": rows, "what": "forward (RGB + expected depth) + backward, parameters to gradients, median after 1 warm-up"}


def section_cost(tiny: bool) -> Dict:
    from .cost_bench import cost_specs, format_table, run

    if tiny:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = run(cost_specs(["SDS (CFG 100)", "GE3D"]), "tiny", 16, 1, steps=1, warmup=1, device="cpu", dtype="fp32", log=None)
        finally:
            torch.set_num_threads(n)
    else:
        result = run(cost_specs(), "sd21-arch", 512, 1, steps=3, warmup=1, device="cuda", dtype="fp16", log=None)
    result["table"] = format_table(result)
    return result


def _launch_overrides(repo: str, config: str, tiny: bool, sd_path: str, exp_root: str) -> List[str]:
    if not tiny:
        return [f"exp_root_dir={exp_root}", f"system.guidance.pretrained_model_name_or_path={sd_path}",
                f"system.prompt_processor.pretrained_model_name_or_path={sd_path}", "system.prompt_processor.spawn=false"]
    from ..testing.threestudio_cpu import gs_cpu_overrides, nerf_cpu_overrides, tiny_overrides

    extra = gs_cpu_overrides() if config.endswith("-gs") or config == "gs-sds" else nerf_cpu_overrides(tiny_mlp=True)
    return [f"exp_root_dir={exp_root}", *tiny_overrides(sd_path), *extra]


#: the Gaussian configs of the speed section (issue 26), in order of value
SPEED_CONFIGS = ["ge3d-gs", "lods-embedding-gs", "vdm-gs", "uds-gs", "uds-edit-gs", "gs-sds"]


def hubless_overrides(repo: str, config: str) -> List[str]:
    """What a machine without the model hub needs for a Gaussian config (as the gpu-kit's drive.py): the
    ``sphere`` init (Shap-E's comes from the hub), a prompt, and ``uds-edit-gs``'s source scene."""
    prompt = "system.prompt_processor.prompt=a DSLR photo of a hamburger"
    if config == "uds-edit-gs":
        return [f"system.source_ply={repo}/load/gt_scenes/cube.ply", "system.source_prompt=a DSLR photo of a cube", prompt]
    return ["system.geometry.init=sphere", prompt]


def section_launch(repo: str, tiny: bool, configs: Optional[List[str]], steps: int, deadline: float, work: str,
                   profile: bool = False, warmup: int = 2, extra_overrides=None, on_row=None,
                   per_config_timeout: float = 300.0) -> Dict:
    root = os.environ.get("THREESTUDIO_ROOT")
    if not root or not os.path.isfile(os.path.join(root, "launch.py")):
        raise RuntimeError("THREESTUDIO_ROOT must name a threestudio work tree (launch.py)")
    from ..paths import link

    link(root)
    names = configs or sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(repo, "configs", "*.yaml")))
    names = [c for c in names if c not in SKIP_CONFIGS]
    names = sorted(names, key=lambda c: (c not in PAPER_TIMES, names.index(c)))  # configs with paper times first
    if tiny:
        from ..testing.threestudio_cpu import tiny_sd_path

        sd_path, sd_desc = tiny_sd_path(repo), "tiny random SD (tests' tiny model), fp32, CPU"
    else:
        t0 = time.perf_counter()
        sd_path = build_sd21_arch_pipeline(os.path.join(work, "sd21-base-arch"), device="cuda")
        sd_desc = f"SD 2.1-base architecture, random weights, fp16 (built in {time.perf_counter() - t0:.0f} s)"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
               SCOREDISTILL_PROBE_STEPS=str(steps), SCOREDISTILL_PROBE_SKIP_TEST="1",
               SCOREDISTILL_PROBE_PROFILE="1" if profile else "0")
    pack = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [pack] + ([os.path.join(pack, "scoredistill", "testing", "cpu_stubs")] if tiny else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    rows = []
    for name in names:
        left = deadline - time.time()
        if left < 30:
            rows.append({"config": name, "status": "not run: suite time budget spent"})
            continue
        probe = os.path.join(work, f"probe_{name}.json")
        if os.path.exists(probe):
            os.remove(probe)
        runner = [os.path.join(pack, "scoredistill", "testing", "cpu_launch.py")] if tiny else []
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "launch_probe.py"), *runner, "launch.py", "--config",
               os.path.join(repo, "configs", name + ".yaml"), "--train", "--gpu", "0",
               *_launch_overrides(repo, name, tiny, sd_path, os.path.join(work, "outputs")),
               *(extra_overrides(repo, name) if extra_overrides else [])]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=root, env=dict(env, SCOREDISTILL_PROBE_OUT=probe), capture_output=True,
                                  text=True, timeout=min(left - 10, per_config_timeout))
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-1500:]
        except subprocess.TimeoutExpired as e:
            rc, tail = "timeout", str(e)[-500:]
        row = {"config": name, "wall_seconds": time.perf_counter() - t0, "returncode": rc}
        if os.path.exists(probe):
            with open(probe) as f:
                p = json.load(f)
            st = p["step_seconds"]
            plain = [st[i] for i in p.get("plain_steps", range(len(st))) if i < len(st)]
            measured = plain[warmup:] if len(plain) > warmup else plain[-1:]
            s_it = statistics.median(measured)
            row.update({
                "status": "ok" if rc == 0 else f"measured, then exit {rc}",
                "steps_measured": len(measured), "steps_run": len(st), "s_per_it": s_it,
                "peak_vram_gib": None if p["peak_allocated_bytes"] is None else p["peak_allocated_bytes"] / 2**30,
                "peak_reserved_gib": None if p["peak_reserved_bytes"] is None else p["peak_reserved_bytes"] / 2**30,
                "peak_rss_gib": None if p["peak_rss_bytes"] is None else p["peak_rss_bytes"] / 2**30,
                "max_steps": p["max_steps"], "device": p["device"],
                "estimated_total_min_EXTRAPOLATION": s_it * p["max_steps"] / 60.0,
            })
            for k in ("profile", "syncs", "kernels"):
                if k in p:
                    row[k] = p[k]
        else:
            row.update({"status": f"failed (exit {rc})", "output_tail": tail})
        if rc != 0:
            row["output_tail"] = tail
        rows.append(row)
        if on_row:
            on_row({"model": sd_desc, "steps_per_config": steps, "rows": list(rows), "partial": True})
    return {"model": sd_desc, "steps_per_config": steps, "rows": rows,
            "note": "estimated_total_min_EXTRAPOLATION = median s/it over the measured steps × trainer.max_steps; "
                    "an extrapolation from a few steps, not a measured run time"}


def section_speed(repo: str, tiny: bool, configs: Optional[List[str]], steps: int, deadline: float, work: str,
                  on_row=None) -> Dict:
    """Issue 26: each Gaussian config at its own settings through ``launch.py`` with the probe's profile mode
    (:mod:`scoredistill.bench.launch_probe`): s/it (median of the plain steps after 3 warm-up steps), peak
    memory, a per-step GPU-time profile (render, VAE, UNet, backward, optimizer, densify, other), the count of
    synchronising CUDA calls in one step (``set_sync_debug_mode("warn")``; CPU: :class:`SyncCounter`), and a
    ``torch.profiler`` step (GPU busy time, host gap, top operators).  Results are written after every config."""
    extra = None if tiny else hubless_overrides
    res = section_launch(repo, tiny, configs or (["uds-gs"] if tiny else SPEED_CONFIGS), steps, deadline, work,
                         profile=True, warmup=3, extra_overrides=extra, on_row=on_row,
                         per_config_timeout=400.0 if tiny else 150.0)
    res["note"] = ("s_per_it: median of the plain (uninstrumented) steps after 3 warm-up steps; the last 3 steps "
                   "are instrumented (profile, syncs, kernels). " + res.get("note", ""))
    return res


def section_parity(tiny: bool) -> Dict:
    """Issue 26: the fast / memory paths against the plain ones, and CPU against CUDA, in float32 with TF32 off
    (tiny SD, so it takes seconds): max |difference| / max |reference| of

    * ``unet_cpu_vs_device``: the tiny UNet's output on the CPU and on the device;
    * ``lods_eq8_grad_checkpointing``: LODS' Eq. 8 α-gradient with and without UNet activation checkpointing;
    * ``vae_encoder_grad_checkpointing``: the render gradient through the VAE encoder with and without;
    * ``step_if_finite_vs_step``: the device-side finite-step decision (capturable Adam on CUDA) against a plain
      ``Adam.step()`` over 5 steps.
    Tiny mode runs the same on the CPU (device = CPU: a plumbing check, labelled)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..guidance import memory
    from ..integrity.finite import finite_ok, make_capturable, step_if_finite

    dev = "cpu" if tiny else "cuda"
    from ..testing.tiny_models import build_tiny_stable_diffusion

    sd = build_tiny_stable_diffusion(os.path.join(os.environ.get("SCOREDISTILL_GPU_SUITE_WORK", "/tmp"), "tiny-sd-parity"))
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def rel(a, b):
        a, b = a.double().cpu(), b.double().cpu()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    out = {"device": dev, "comparison": "CPU vs CPU (plumbing check, tiny mode)" if tiny else "CPU vs CUDA, fp32, TF32 off"}
    try:
        unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet").eval().requires_grad_(False)
        vae = AutoencoderKL.from_pretrained(sd, subfolder="vae").eval().requires_grad_(False)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 8, 8, generator=g)
        e = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
        t = torch.tensor([100, 800])
        with torch.no_grad():
            ref = unet(x, t, encoder_hidden_states=e).sample
            unet.to(dev)
            got = unet(x.to(dev), t.to(dev), encoder_hidden_states=e.to(dev)).sample
        out["unet_cpu_vs_device"] = rel(got, ref)
        grads = []
        for on in (False, True):
            u = UNet2DConditionModel.from_pretrained(sd, subfolder="unet").eval().requires_grad_(False).to(dev)
            if on:
                memory.enable_activation_checkpointing(memory.unet_blocks(u))
            alpha = e.to(dev).clone().requires_grad_(True)
            loss = (u(x.to(dev), t.to(dev), encoder_hidden_states=alpha).sample - x.to(dev)).pow(2).mean()
            grads.append(torch.autograd.grad(loss, [alpha])[0])
        out["lods_eq8_grad_checkpointing"] = rel(grads[1], grads[0])
        grads = []
        for on in (False, True):
            v = AutoencoderKL.from_pretrained(sd, subfolder="vae").eval().requires_grad_(False).to(dev)
            if on:
                memory.enable_activation_checkpointing(memory.vae_encoder_blocks(v))
            img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(dev).requires_grad_(True)
            lat = v.encode(img * 2 - 1).latent_dist.mean
            grads.append(torch.autograd.grad(lat.pow(2).sum(), [img])[0])
        out["vae_encoder_grad_checkpointing"] = rel(grads[1], grads[0])
        p0 = torch.randn(1000, generator=g)
        a = torch.nn.Parameter(p0.clone().to(dev))
        b = torch.nn.Parameter(p0.clone().to(dev))
        oa = torch.optim.Adam([a], lr=0.01)
        ob = torch.optim.Adam([b], lr=0.01, **make_capturable(torch.optim.Adam, [b], {}))
        for i in range(5):
            gr = torch.randn(1000, generator=g).to(dev)
            a.grad, b.grad = gr.clone(), gr.clone()
            oa.step()
            step_if_finite(ob, finite_ok(None, [b.grad]))
        out["step_if_finite_vs_step"] = rel(b.detach(), a.detach())
        out["optimizer"] = "Adam(capturable=True) vs Adam()" if not tiny else "Adam() vs Adam()"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


# ----------------------------------------------------------------------------------------------- driver
def run_suite(mode: str, out: str, repo: str, budget_s: float, launch_configs=None, launch_steps=None,
              sections=None, log=print) -> Dict:
    """Run the sections; write the results file ``out`` after each one; return the results dict."""
    if mode not in ("tiny", "full"):
        raise ValueError(f"mode must be 'tiny' or 'full', got {mode!r}")
    tiny = mode == "tiny"
    if not tiny and not torch.cuda.is_available():
        raise ValueError("--mode full needs CUDA (use --mode tiny on the CPU)")
    start = time.time()
    deadline = start + budget_s
    import tempfile

    # scratch (the random SD 2.1-base pipeline: ~2.6 GB in fp16, trial folders, probe files): never the repo
    work = os.environ.get("SCOREDISTILL_GPU_SUITE_WORK") or tempfile.mkdtemp(prefix="scoredistill_gpu_suite_")
    os.makedirs(work, exist_ok=True)
    result = {"mode": mode, "started_unix": start, "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if not tiny else "cpu", "budget_s": budget_s, "sections": {}}
    plan = [
        ("cuda_tests", lambda: section_cuda_tests(repo, tiny, work, timeout=max(30, min(60 if tiny else 120, deadline - time.time())))),
        ("render_compare", lambda: section_render_compare(tiny)),
        ("render_speed", lambda: section_render_speed(tiny)),
        ("cost", lambda: section_cost(tiny)),
        ("launch", lambda: section_launch(repo, tiny, launch_configs or (["ge3d-gs"] if tiny else None),
                                          launch_steps or (3 if tiny else 6), deadline, work)),
        # issue 26 (only when named in --sections): parity first (seconds), then the per-config speed runs
        ("parity", lambda: section_parity(tiny)),
        ("speed", lambda: section_speed(repo, tiny, launch_configs, launch_steps or (6 if tiny else 12), deadline, work,
                                        on_row=lambda partial: _partial("speed", partial))),
    ]

    def _partial(name, partial):
        result["sections"][name] = partial
        result["elapsed_s"] = time.time() - start
        _write(out, result)

    for name, fn in plan:
        if (sections and name not in sections) or (not sections and name in ("parity", "speed")):
            continue
        t0 = time.perf_counter()
        if time.time() > deadline - 20:
            result["sections"][name] = {"error": "not run: suite time budget spent"}
        else:
            try:
                result["sections"][name] = fn()
            except Exception as e:  # recorded, the suite goes on
                result["sections"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        result["sections"][name]["section_seconds"] = time.perf_counter() - t0
        result["elapsed_s"] = time.time() - start
        _write(out, result)
        if log:
            log(f"[gpu_suite] {name}: {'error: ' + result['sections'][name]['error'] if 'error' in result['sections'][name] else 'done'}"
                f" ({result['sections'][name]['section_seconds']:.0f} s)")
    return result


def _f(v, spec=".2f"):
    return "n/a" if v is None else format(v, spec)


def format_report(result: Dict) -> str:
    """Markdown tables of a results file (the README's per-config table)."""
    secs = result["sections"]
    out = [f"GPU suite, mode {result['mode']}, device {result['device']}, torch {result['torch']}, "
           f"{result.get('elapsed_s', 0):.0f} s.", ""]
    la = secs.get("launch", {})
    if "rows" in la:
        out += [f"Per config ({la['model']}; {la['steps_per_config']} steps each):", "",
                "| config | peak VRAM, GiB | s/it | estimated total (EXTRAPOLATION: s/it × max_steps) | paper's reported time |",
                "|---|---|---|---|---|"]
        for r in la["rows"]:
            if "s_per_it" in r:
                out.append(f"| {r['config']} | {_f(r['peak_vram_gib'])} | {r['s_per_it']:.3f} | "
                           f"{r['estimated_total_min_EXTRAPOLATION']:.1f} min ({r['max_steps']} it) | {PAPER_TIMES.get(r['config'], '')} |")
            else:
                out.append(f"| {r['config']} | {r['status']} | | | {PAPER_TIMES.get(r['config'], '')} |")
        out.append("")
    sp = secs.get("speed", {})
    if "rows" in sp:
        out += [f"Speed per config (issue 26; {sp['model']}; {sp['steps_per_config']} steps each, s/it over the plain "
                "steps after 3 warm-up):", "",
                "| config | s/it | peak alloc GiB | peak reserved GiB | syncs in one step | GPU busy (kernel-interval union) / wall (host gap) |",
                "|---|---|---|---|---|---|"]
        for r in sp["rows"]:
            if "s_per_it" not in r:
                out.append(f"| {r['config']} | {r['status']} | | | | |")
                continue
            sy, kn = r.get("syncs", {}), r.get("kernels", {})
            busy = (f"{kn['gpu_busy_seconds']:.3f} / {kn['wall_seconds']:.3f} s ({kn['host_gap_seconds']:.3f})"
                    if kn else "n/a")
            out.append(f"| {r['config']} | {r['s_per_it']:.3f} | {_f(r['peak_vram_gib'])} | {_f(r['peak_reserved_gib'])} | "
                       f"{sy.get('count', 'n/a')} | {busy} |")
        out += ["", "Per-step GPU time by part (seconds; CUDA events, one step):", "",
                "| config | step | render | vae | unet | backward | optimizer | densify | other |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in sp["rows"]:
            pr = r.get("profile")
            if pr:
                pp = pr["parts_seconds"]
                out.append(f"| {r['config']} | {pr['gpu_step_seconds']:.4f} | " + " | ".join(
                    f"{pp[k]:.4f}" for k in ("render", "vae", "unet", "backward", "optimizer", "densify"))
                    + f" | {pr['other_seconds']:.4f} |")
        for r in sp["rows"]:
            if r.get("syncs", {}).get("sites"):
                out.append(f"- {r['config']} sync sites: " + ", ".join(f"{k} ×{v}" for k, v in list(r["syncs"]["sites"].items())[:8]))
        out.append("")
    pa = secs.get("parity", {})
    if "comparison" in pa:
        out += [f"Parity ({pa['comparison']}; max |diff| / max |ref|): " + ", ".join(
            f"{k} {_f(pa.get(k), '.2e')}" for k in ("unet_cpu_vs_device", "lods_eq8_grad_checkpointing",
                                                    "vae_encoder_grad_checkpointing", "step_if_finite_vs_step")), ""]
    for k in ("render_compare", "render_speed", "cost", "cuda_tests", "speed", "parity"):
        s = secs.get(k, {})
        if "error" in s:
            out += [f"{k}: {s['error']}", ""]
    if "max_abs_error" in secs.get("render_compare", {}):
        rc = secs["render_compare"]
        out += [f"{rc['comparison']}, {rc['gaussians']} Gaussians, {rc['resolution']}²: "
                + ", ".join(f"{k} {_f(v, '.2e')}" for k, v in rc["max_abs_error"].items()), ""]
    if "rows" in secs.get("render_speed", {}):
        out += ["| Gaussians | resolution | device | fwd+bwd s | peak VRAM MiB |", "|---|---|---|---|---|"]
        out += [f"| {r['gaussians']} | {r['resolution']} | {r['device']} | {r['fwd_bwd_seconds_median']:.4f} | {_f(r['peak_vram_mib'], '.0f')} |"
                for r in secs["render_speed"]["rows"]]
        out.append("")
    if "table" in secs.get("cost", {}):
        out += [secs["cost"]["table"], ""]
    if "counts" in secs.get("cuda_tests", {}):
        out += [f"CUDA-only tests: {secs['cuda_tests']['counts']}", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scoredistill.bench.gpu_suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["tiny", "full"], default="full")
    p.add_argument("--out", default="benchmarks/results/gpu_suite.json")
    p.add_argument("--repo", default=os.getcwd(), help="the scoredistill repository (configs/, tests/)")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget; later work is skipped, recorded")
    p.add_argument("--launch-configs", nargs="*", default=None)
    p.add_argument("--launch-steps", type=int, default=None)
    p.add_argument("--sections", nargs="*", default=None)
    p.add_argument("--report", metavar="RESULTS_JSON", help="print the tables of a results file and exit")
    a = p.parse_args(argv)
    if a.report:
        with open(a.report) as f:
            print(format_report(json.load(f)))
        return 0
    try:
        result = run_suite(a.mode, a.out, os.path.abspath(a.repo), a.budget_s, a.launch_configs, a.launch_steps, a.sections)
    except ValueError as e:
        p.error(str(e))
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
