"""2D playground: optimise a latent (or an image through the VAE) directly with one of the pack's guidances.

As in LODS's 2D experiments (``x = θ``, no renderer) and threestudio's 2D playground notebook: parameters are
a batch of SD latents ``(B, 4, h, w)`` (``--mode latent``, initialised ``N(0, I)``) or RGB images
``(B, 3, H, W)`` in ``[0, 1]`` encoded by the VAE at every step (``--mode image``, initialised 0.5 grey plus a
little noise), optimised with Adam on the guidance's loss (:func:`scoredistill.maths.diffusion.grad_to_loss`).

Models (``--model``):

* a diffusers Stable Diffusion pipeline folder or hub name (real weights when available): UNet, VAE, CLIP text
  encoder and tokenizer through ``from_pretrained``; the prompt is encoded by the pipeline's text encoder, the
  unconditional embedding is that of ``--negative-prompt`` (default ``""``);
* ``tiny``: the random tiny pipeline of :mod:`scoredistill.testing.tiny_models` (smoke runs; images are noise);
* ``exact``: the exact-score Gaussian-mixture prior (:mod:`scoredistill.testing.exact_score_prior`), latent mode
  only; ``--prompt`` is the index of a prompt of the mixture; its embedding is ``prior.embedding(i)``.

Writes to ``--out``: ``final.png`` (the decoded result; for the prior, the first three latent channels),
``progress.png`` (decoded snapshots over the run), ``curves.png`` (matplotlib: update norm, latent RMS norm and,
for the prior, the distance to the prompted mixture), ``history.json`` and ``latents.pt``.

Command::

    python -m scoredistill.bench.playground --model tiny --method ge3d --prompt "a hamburger" --steps 50 --out out/pg
    python -m scoredistill.bench.playground --model stabilityai/stable-diffusion-2-1-base --method lods \\
        --set guidance_scale=inf lr=1e-4 --lr 0.03 --steps 6000 --resolution 512 --device cuda --out out/pg
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

import torch

from .counting import CountingUNet
from .methods import METHODS, DistillContext, make_method

MODES = ("latent", "image")


def parse_options(items: Optional[List[str]]) -> Dict:
    """``["k=v", ...]`` → dict, values parsed as YAML (``1e-4`` → float, ``inf`` → float('inf'), ``[1,2]`` → list).

    Raises:
        ValueError: an item without ``=``.
    """
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = int(v) if v.strip().lstrip("+-").isdigit() else float(v)  # 1e-4 and inf, which YAML reads as strings
        except ValueError:
            out[k] = yaml.safe_load(v)
    return out


class _Pipeline:
    """UNet + VAE + embeddings from a diffusers Stable Diffusion folder (or hub name)."""

    def __init__(self, path: str, prompt: str, negative_prompt: str, device: str, dtype: torch.dtype):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").to(device, dtype).requires_grad_(False)
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae").to(device, dtype).requires_grad_(False)
        tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        enc = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").to(device, dtype).requires_grad_(False)
        with torch.no_grad():
            ids = tok([prompt, negative_prompt], padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids.to(device)
            emb = enc(ids)[0]
        self.cond, self.uncond = emb[:1], emb[1:]
        self.alphas_cumprod = DDIMScheduler.from_pretrained(path, subfolder="scheduler").alphas_cumprod.to(device)
        self.scale = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.dtype = dtype

    def encode(self, img01: torch.Tensor) -> torch.Tensor:
        post = self.vae.encode((img01 * 2 - 1).to(self.dtype)).latent_dist
        return (post.sample() * self.scale).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        img = self.vae.decode((latents / self.scale).to(self.dtype)).sample
        return ((img.float() + 1) / 2).clamp(0, 1)


def _to_image_grid(imgs: torch.Tensor):
    """``(B, 3, H, W)`` in [0, 1] → uint8 ``(H, B*W, 3)`` numpy array."""
    x = (imgs.detach().clamp(0, 1) * 255).round().byte().cpu()
    return torch.cat(list(x), dim=-1).permute(1, 2, 0).numpy()


def _latent_preview(latents: torch.Tensor) -> torch.Tensor:
    """First three latent channels mapped to [0, 1] with a fixed range (±3 std)."""
    x = latents[:, :3].detach().float()
    if x.shape[1] < 3:
        x = torch.cat([x, x[:, :1].expand(-1, 3 - x.shape[1], -1, -1)], 1)
    return ((x / 3 + 1) / 2).clamp(0, 1)


def run(method: str = "sds", model: str = "tiny", prompt: str = "a photograph of an astronaut riding a horse",
        negative_prompt: str = "", mode: str = "latent", steps: int = 100, lr: float = 0.03, batch: int = 1,
        resolution: int = 64, seed: int = 0, options: Optional[Dict] = None, out: str = "playground",
        device: str = "cpu", dtype: str = "fp32", snapshots: int = 6, log_every: int = 10) -> Dict:
    """Run the playground; returns the history dict (also written to ``out/history.json``).

    Raises:
        ValueError: bad settings (before any model loads).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if model == "exact" and mode != "latent":
        raise ValueError("mode 'image' needs a VAE; the exact-score prior has none (use --mode latent)")
    if steps < 1 or lr <= 0 or batch < 1 or snapshots < 1 or log_every < 1:
        raise ValueError(f"need steps >= 1, lr > 0, batch >= 1, snapshots >= 1, log_every >= 1; got "
                         f"{steps}, {lr}, {batch}, {snapshots}, {log_every}")
    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"dtype must be fp32 or fp16, got {dtype!r}")
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    options = dict(options or {})
    torch.manual_seed(seed)
    os.makedirs(out, exist_ok=True)

    prior, pipe = None, None
    if model == "exact":
        from scoredistill.testing.exact_score_prior import ExactScorePrior

        try:
            prompt_idx = int(prompt)
        except ValueError:
            raise ValueError(f"with --model exact, --prompt is a prompt index (0 or 1), got {prompt!r}") from None
        prior = ExactScorePrior.random(num_prompts=2, num_components=4, latent_shape=(4, 8, 8), seed=0).to(device)
        if not 0 <= prompt_idx < prior.num_prompts:
            raise ValueError(f"with --model exact, --prompt must be in [0, {prior.num_prompts - 1}], got {prompt_idx}")
        unet = CountingUNet(prior)
        cond, uncond, abar = prior.embedding(prompt_idx), prior.embedding(None), prior.alphas_cumprod.float()
        latent_shape = prior.latent_shape
    else:
        path = model
        if model == "tiny":
            from scoredistill.testing.tiny_models import build_tiny_stable_diffusion

            from .cost_bench import default_tiny_sd_folder

            path = build_tiny_stable_diffusion(default_tiny_sd_folder())
        pipe = _Pipeline(path, prompt, negative_prompt, device, torch_dtype)
        if resolution % pipe.factor:
            raise ValueError(f"resolution must be a multiple of the VAE factor {pipe.factor}, got {resolution}")
        unet = CountingUNet(pipe.unet)
        cond, uncond, abar = pipe.cond, pipe.uncond, pipe.alphas_cumprod
        latent_shape = (4, resolution // pipe.factor, resolution // pipe.factor)
    ctx = DistillContext(unet, abar, cond, uncond, total_steps=steps, uses_real_unet=prior is None)
    if method == "vdm":
        options.setdefault("latent_shape", latent_shape)
    guide = make_method(method, ctx, **options)

    g = torch.Generator().manual_seed(seed)
    if mode == "latent":
        param = torch.randn(batch, *latent_shape, generator=g).to(device).requires_grad_(True)
        get_latents = lambda: param  # noqa: E731
    else:
        param = (0.5 + 0.05 * torch.randn(batch, 3, resolution, resolution, generator=g)).to(device).requires_grad_(True)
        get_latents = lambda: pipe.encode(param.clamp(0, 1))  # noqa: E731
    opt = torch.optim.Adam([param], lr=lr)
    from scoredistill.maths.diffusion import grad_to_loss

    def preview():
        lat = get_latents().detach()
        if pipe is not None:
            return param.detach().clamp(0, 1) if mode == "image" else pipe.decode(lat)
        return _latent_preview(lat)

    hist = {"step": [], "grad_norm": [], "latent_rms": [], "fidelity": []}
    snap_steps = sorted({int(round(i * steps / snapshots)) for i in range(snapshots + 1)})
    snaps = []
    for step in range(steps + 1):
        if step in snap_steps:
            snaps.append(preview())
        if step == steps:
            break
        latents = get_latents()
        grad = guide.grad(latents, step)
        opt.zero_grad(set_to_none=True)
        grad_to_loss(latents, grad.to(latents.dtype)).backward()
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            hist["step"].append(step)
            hist["grad_norm"].append(float(grad.float().reshape(batch, -1).norm(dim=-1).mean()))
            hist["latent_rms"].append(float(latents.detach().float().pow(2).mean().sqrt()))
            if prior is not None:
                hist["fidelity"].append(float(prior.distance_to_prompt(latents.detach(), prompt_idx).mean()))
    cost = unet.snapshot().per(steps)
    hist.update({"method": method, "options": {k: (str(v) if v == float("inf") else v) for k, v in options.items() if k != "latent_shape"},
                 "model": model, "prompt": prompt, "mode": mode, "steps": steps, "lr": lr,
                 "unet_samples_per_step": cost["samples"], "unet_backward_samples_per_step": cost["backward_samples"]})
    _save(out, hist, snaps, snap_steps, get_latents().detach())
    return hist


def _save(out: str, hist: Dict, snaps: List[torch.Tensor], snap_steps: List[int], latents: torch.Tensor) -> None:
    import imageio.v2 as imageio
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imageio.imwrite(os.path.join(out, "final.png"), _to_image_grid(snaps[-1]))
    rows = [_to_image_grid(s[:1]) for s in snaps]
    import numpy as np

    imageio.imwrite(os.path.join(out, "progress.png"), np.concatenate(rows, axis=1))
    keys = ["grad_norm", "latent_rms"] + (["fidelity"] if hist["fidelity"] else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6))
    titles = {"grad_norm": "guidance update norm (per view)", "latent_rms": "latent RMS norm",
              "fidelity": "RMS distance to the prompted mixture"}
    for ax, k in zip(axes, keys):
        ax.plot(hist["step"], hist[k])
        ax.set(title=titles[k], xlabel="step")
    fig.suptitle(f"{hist['method']} on {hist['model']}: {hist['prompt']!r} (snapshots at steps {snap_steps})", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    plt.close(fig)
    with open(os.path.join(out, "history.json"), "w") as f:
        json.dump(hist, f, indent=1)
    torch.save(latents.cpu(), os.path.join(out, "latents.pt"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scoredistill.bench.playground", description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="sds", choices=sorted(METHODS))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="method options, e.g. guidance_scale=7.5 variant=lora recon_sign=printed")
    p.add_argument("--model", default="tiny", help="tiny | exact | a diffusers SD pipeline folder or hub name")
    p.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--mode", default="latent", choices=MODES)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"))
    p.add_argument("--out", default="playground")
    a = p.parse_args(argv)
    try:
        hist = run(a.method, a.model, a.prompt, a.negative_prompt, a.mode, a.steps, a.lr, a.batch, a.resolution,
                   a.seed, parse_options(a.set), a.out, a.device, a.dtype)
    except ValueError as e:
        p.error(str(e))
    print(f"{a.method}: {a.steps} steps, {hist['unet_samples_per_step']:.0f} UNet samples/step -> {a.out}/final.png, "
          f"{a.out}/curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
