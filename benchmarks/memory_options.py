"""Effect of the guidance base's memory / speed options on the tiny SD on the CPU (README "Memory and speed options").

    cd <repo> && PYTHONPATH=$PWD/custom THREESTUDIO_ROOT=$PWD/.threestudio python benchmarks/memory_options.py

Per option: mean time of one guidance step (plain SDS through the base: VAE encode with grad, one CFG UNet call
of batch 2B, loss backward) as a ratio to the default in the same run, peak resident memory above the level
before the steps (VmHWM), and the max change of the latent gradient against the default (fixed t and noise).
A tiny model on 2 shared CPU cores says little about a GPU: these are the options' CPU effects only.
"""
import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

OPTIONS = {
    "default": {},
    "enable_memory_efficient_attention (sdpa)": dict(enable_memory_efficient_attention=True, memory_efficient_attention_backend="sdpa"),
    "enable_attention_slicing (1)": dict(enable_attention_slicing=True),
    "enable_channels_last_format": dict(enable_channels_last_format=True),
    "token_merging (ratio 0.5)": dict(token_merging=True, token_merging_params={"ratio": 0.5, "use_rand": False}),
    "compile_unet (aot_eager)": dict(compile_unet=True, compile_unet_params={"backend": "aot_eager"}),
    "compile_unet (inductor)": dict(compile_unet=True),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[])
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from harness import import_threestudio, make_prompt_utils, tiny_guidance_config, tiny_sd_path

    from scoredistill.bench.cost_bench import _CPUPeak
    from scoredistill.maths.diffusion import add_noise, sds_weight
    ts = import_threestudio()
    from scoredistill.guidance.base import ScoreDistillationGuidance

    class FixedSDS(ScoreDistillationGuidance):
        def compute_grad(self, latents, prompt_utils, elevation, azimuth, camera_distances, **kwargs):
            g = torch.Generator().manual_seed(1)
            t = torch.full((latents.shape[0],), 500, dtype=torch.long)
            noise = torch.randn(latents.shape, generator=g)
            with torch.no_grad():
                x_t = add_noise(latents, noise, self.alphas_cumprod, t)
                pred = self.predict_noise_cfg(x_t, t, prompt_utils, elevation, azimuth, camera_distances)["noise_pred"]
            self.last_grad = sds_weight(self.alphas_cumprod, t, "sds", like=latents) * (pred - noise)
            return {"grad": self.last_grad}

    sd = tiny_sd_path()
    pu = make_prompt_utils(ts, sd, tempfile.mkdtemp())
    B = a.batch
    elev, azim, dist = torch.full((B,), 10.0), torch.linspace(0, 180, B), torch.full((B,), 2.0)
    rgb = torch.rand(B, a.image_size, a.image_size, 3, generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, 1 thread, tiny SD, image {a.image_size}² (latents {a.image_size // 2}²), "
          f"batch {B}, mean of {a.steps} steps after 1 warm-up")
    print("| option | step time (× default) | peak RSS above start, MiB | max abs change of the latent gradient (relative to its max) |")
    print("|---|---|---|---|")
    ref = base_t = None
    for name, opts in OPTIONS.items():
        if any(s in name for s in a.skip):
            continue
        g = FixedSDS(tiny_guidance_config(sd, image_size=a.image_size, **opts))

        def step():
            torch.manual_seed(0)
            x = rgb.clone().requires_grad_(True)
            g(x, pu, elev, azim, dist)["loss_sds"].backward()

        t0 = time.perf_counter()
        step()  # warm-up (compiles, for compile_unet)
        first = time.perf_counter() - t0
        probe = _CPUPeak()
        probe.start()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        sec = (time.perf_counter() - t0) / a.steps
        peak = probe.peak_bytes()
        grad = g.last_grad.detach().clone()
        if ref is None:
            ref, base_t = grad, sec
        d = (grad - ref).abs().max().item()
        extra = f" (first step {first:.1f} s)" if "compile" in name else ""
        print(f"| {name} | {sec * 1e3:.1f} ms ({sec / base_t:.2f}){extra} | {'n/a' if peak is None else f'{peak / 2**20:.1f}'} "
              f"| {d:.2e} ({d / ref.abs().max().item():.1e}) |", flush=True)


if __name__ == "__main__":
    main()
