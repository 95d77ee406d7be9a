"""Cost benchmark: UNet work, wall time and peak memory per optimisation step of each guidance, as a ratio to SDS.

One optimisation step = the guidance's update on a batch of latents (``method.grad``, including whatever the
method learns alongside: LODS's embedding / LoRA, VDM's operator) + the backward of
:func:`scoredistill.maths.diffusion.grad_to_loss` into the latents + an Adam step on them -- what a threestudio
step costs on top of rendering and VAE encoding (identical for every method, so left out).

Measured per method, after ``--warmup`` steps, over ``--steps`` steps:

* UNet forward sample-evaluations and UNet backward passes (in samples) per step, exact, counted by
  :class:`~scoredistill.bench.counting.CountingUNet`;
* wall time per step (``time.perf_counter``; CUDA synchronised);
* peak memory above the level before the measured steps: on CUDA ``torch.cuda.max_memory_allocated``; on the
  CPU the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before the steps).

Models (``--model``): ``tiny`` (the random tiny Stable Diffusion UNet of
:func:`scoredistill.testing.tiny_models.build_tiny_stable_diffusion`, latents at half the image resolution),
``sd21-arch`` (Stable Diffusion 2.1-base's published UNet config with random weights -- the real model's FLOPs
and memory; latents at 1/8 of the image resolution; meant for a GPU: ``--device cuda --dtype fp16
--resolution 512``) or a path/name of a diffusers pipeline folder (``from_pretrained(..., subfolder="unet")``).

Command (prints the table, writes ``cost_<model>.csv`` / ``.md``)::

    python -m scoredistill.bench.cost_bench --model tiny --resolution 64 --batch 1 --out benchmarks/results
"""
from __future__ import annotations

import argparse
import csv
import gc
import os
import re
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .counting import CountingUNet
from .methods import DistillContext, MethodSpec, MethodUnavailable, default_specs, make_method

#: Stable Diffusion 2.1-base UNet (stabilityai/stable-diffusion-2-1-base, unet/config.json), for random init
SD21_BASE_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    dual_cross_attention=False,
    only_cross_attention=False,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_tiny_sd_folder() -> str:
    """Where the tiny pipeline is built (shared with the tests' cache): ``$SCOREDISTILL_TEST_CACHE/tiny-sd`` or
    ``.tiny-models/tiny-sd`` in the current folder."""
    root = os.environ.get("SCOREDISTILL_TEST_CACHE", os.path.join(os.getcwd(), ".tiny-models"))
    return os.path.join(root, "tiny-sd")


def unet_factory(model: str, device: str, dtype: torch.dtype):
    """``(make_unet() -> fresh frozen UNet, vae_scale_factor, description)`` for ``--model``.

    A fresh UNet per method keeps LoRA adapters (LODS) from leaking into the next method's measurement.
    """
    from diffusers import UNet2DConditionModel

    if model == "sd21-arch":
        def make():
            torch.manual_seed(0)
            with torch.device(device):  # random init on the device: seconds instead of ~20 s of CPU init per method
                return UNet2DConditionModel(**SD21_BASE_UNET_CONFIG)
        factor, desc = 8, "SD 2.1-base UNet architecture (published config, random weights)"
    else:
        path = model
        if model == "tiny":
            from scoredistill.testing.tiny_models import build_tiny_stable_diffusion

            path = build_tiny_stable_diffusion(default_tiny_sd_folder())
            factor, desc = 2, "tiny random SD UNet (scoredistill.testing.tiny_models, channels 32/64)"
        else:
            factor, desc = 8, f"UNet of {model}"

        def make():
            return UNet2DConditionModel.from_pretrained(path, subfolder="unet")

    def make_unet():
        unet = make().to(device=device, dtype=dtype)
        unet.requires_grad_(False)
        unet.eval()
        return unet

    return make_unet, factor, desc


# ----------------------------------------------------------------------------- memory probes
class _CPUPeak:
    """Peak resident set above the level at :meth:`start` (Linux ``/proc``); ``None`` when unavailable."""

    @staticmethod
    def _read(key: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                m = re.search(key + r":\s+(\d+)\s+kB", f.read())
            return int(m.group(1)) * 1024 if m else None
        except OSError:
            return None

    def start(self) -> None:
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.ok = True
        except OSError:
            self.ok = False
        self.base = self._read("VmRSS")

    def peak_bytes(self) -> Optional[int]:
        hwm = self._read("VmHWM")
        if not self.ok or hwm is None or self.base is None:
            return None
        return max(0, hwm - self.base)


class _CUDAPeak:
    def __init__(self, device):
        self.device = device

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def peak_bytes(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.base


# ----------------------------------------------------------------------------- measurement
def measure_method(spec: MethodSpec, make_unet: Callable, latent_hw: int, batch: int, steps: int, warmup: int,
                   device: str, dtype: torch.dtype, total_steps: int = 10000, seed: int = 0) -> Dict:
    """Run ``warmup + steps`` optimisation steps of one method; returns its per-step cost.

    Raises:
        MethodUnavailable: the method cannot run (module missing, variant not applicable).
    """
    from scoredistill.maths.diffusion import grad_to_loss
    from scoredistill.testing.tiny_models import SD_SCHEDULER_CONFIG
    from diffusers import DDIMScheduler

    torch.manual_seed(seed)
    unet = CountingUNet(make_unet())
    E = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, 77, E, generator=g).to(device=device, dtype=dtype)
    uncond = torch.randn(1, 77, E, generator=g).to(device=device, dtype=dtype)
    abar = DDIMScheduler(**SD_SCHEDULER_CONFIG).alphas_cumprod.to(device)
    ctx = DistillContext(unet, abar, cond, uncond, total_steps=total_steps, uses_real_unet=True)
    options = dict(spec.options)
    if spec.name == "vdm":
        options.setdefault("latent_shape", (4, latent_hw, latent_hw))
    method = make_method(spec.name, ctx, **options)
    # the rendered latents: fp32 leaf, as threestudio's renders are fp32
    x = torch.randn(batch, 4, latent_hw, latent_hw, generator=g).to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=1e-2)
    cuda = device.startswith("cuda")
    probe = _CUDAPeak(device) if cuda else _CPUPeak()

    def one_step(step):
        grad = method.grad(x, step)
        opt.zero_grad(set_to_none=True)
        grad_to_loss(x, grad.to(x.dtype)).backward()
        opt.step()

    for i in range(warmup):
        one_step(i)
    if cuda:
        torch.cuda.synchronize(device)
    probe.start()
    before = unet.snapshot()
    t0 = time.perf_counter()
    for i in range(steps):
        one_step(warmup + i)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - t0) / steps
    cost = (unet.snapshot() - before).per(steps)
    peak = probe.peak_bytes()
    del method, unet, ctx, opt, x
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {
        "method": spec.label, "unet_calls": cost["calls"], "unet_samples": cost["samples"],
        "unet_backward_samples": cost["backward_samples"], "seconds": seconds,
        "peak_mib": None if peak is None else peak / 2**20,
    }


def run(specs: Sequence[MethodSpec], model: str = "tiny", resolution: int = 64, batch: int = 1, steps: int = 3,
        warmup: int = 1, device: str = "cpu", dtype: str = "fp32", log=print) -> Dict:
    """Measure every spec; returns ``{"rows": [...], "unavailable": {label: reason}, "setup": {...}}``.

    Raises:
        ValueError: bad settings (before any model is built).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if resolution < 8 or batch < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"need resolution >= 8, batch >= 1, steps >= 1, warmup >= 0; got {resolution}, {batch}, {steps}, {warmup}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if dtype == "fp16" and not device.startswith("cuda"):
        raise ValueError("dtype fp16 needs a CUDA device (CPU kernels for fp16 convolutions are not generally available)")
    make_unet, factor, desc = unet_factory(model, device, DTYPES[dtype])
    if resolution % factor:
        raise ValueError(f"resolution must be a multiple of the VAE factor {factor}, got {resolution}")
    latent_hw = resolution // factor
    rows, unavailable = [], {}
    for spec in specs:
        try:
            r = measure_method(spec, make_unet, latent_hw, batch, steps, warmup, device, DTYPES[dtype])
        except MethodUnavailable as e:
            unavailable[spec.label] = str(e)
            if log:
                log(f"[cost] {spec.label}: not run ({e})")
            continue
        rows.append(r)
        if log:
            log(f"[cost] {spec.label}: {r['unet_samples']:.0f} UNet samples, {r['unet_backward_samples']:.0f} backward, "
                f"{r['seconds'] * 1e3:.1f} ms/step")
    base = next((r for r in rows if r["method"].startswith("SDS (CFG 100)")), rows[0] if rows else None)
    for r in rows:
        for k in ("unet_samples", "seconds", "peak_mib"):
            b = None if base is None else base[k]
            r[k + "_ratio"] = (r[k] / b) if (b and r[k] is not None) else None
    setup = {"model": desc, "resolution": resolution, "latent": f"{latent_hw}x{latent_hw}", "batch": batch,
             "steps": steps, "warmup": warmup, "device": device, "dtype": dtype,
             "torch": torch.__version__, "threads": torch.get_num_threads()}
    return {"rows": rows, "unavailable": unavailable, "setup": setup}


def _fmt(v, spec=".2f"):
    return "n/a" if v is None else format(v, spec)


def format_table(result: Dict) -> str:
    s = result["setup"]
    lines = [
        "| method | UNet calls / step | UNet sample-evals / step (× SDS) | UNet backward samples / step | "
        "time / step (× SDS) | peak memory above start, MiB (× SDS) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['unet_calls']:.0f} | {r['unet_samples']:.0f} ({_fmt(r['unet_samples_ratio'])}) | "
            f"{r['unet_backward_samples']:.0f} | {r['seconds'] * 1e3:.1f} ms ({_fmt(r['seconds_ratio'])}) | "
            f"{_fmt(r['peak_mib'], '.1f')} ({_fmt(r['peak_mib_ratio'])}) |"
        )
    for label, why in result["unavailable"].items():
        lines.append(f"| {label} | not run: {why} | | | | |")
    lines.append("")
    lines.append(
        f"{s['model']}; image {s['resolution']}² → latents {s['latent']}, batch {s['batch']}, {s['dtype']} on "
        f"{s['device']} ({s['threads']} threads), torch {s['torch']}; mean over {s['steps']} steps after "
        f"{s['warmup']} warm-up step(s); ratios to SDS (CFG 100) in the same run."
    )
    return "\n".join(lines)


def write_csv(result: Dict, path: str) -> None:
    rows = result["rows"]
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)


def cost_specs(names: Optional[Sequence[str]] = None) -> List[MethodSpec]:
    """The cost rows: SDS (CFG 100, the ratio's base), then every method once (cost does not depend on CFG)."""
    specs, seen = [], set()
    for s in default_specs():
        if s.label in ("SDS (CFG 7.5)", "LODS (embedding, NeRF setting)", "UDS (printed sign)"):
            continue  # same cost as another row
        if names and s.label not in names and s.name not in names:
            continue
        if s.label.startswith("LODS (embedding"):
            s = MethodSpec("LODS (embedding)", s.name, s.options, s.note)
        specs.append(s)
        seen.add(s.label)
    if not specs:
        raise ValueError(f"--methods must name some of {[s.label for s in default_specs()]}, got {list(names or [])}")
    return specs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scoredistill.bench.cost_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny | sd21-arch | a diffusers pipeline folder or hub name")
    p.add_argument("--resolution", type=int, default=64, help="image resolution (latents: /2 tiny, /8 SD)")
    p.add_argument("--batch", type=int, default=1, help="views per step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--methods", nargs="*")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        specs = cost_specs(a.methods)
        result = run(specs, a.model, a.resolution, a.batch, a.steps, a.warmup, a.device, a.dtype)
    except ValueError as e:
        p.error(str(e))
    table = format_table(result)
    print(table)
    os.makedirs(a.out, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(a.model.rstrip("/")))
    name = f"cost_{tag}_{a.device.split(':')[0]}_{a.resolution}_b{a.batch}"
    with open(os.path.join(a.out, name + ".md"), "w") as f:
        f.write(table + "\n")
    write_csv(result, os.path.join(a.out, name + ".csv"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
