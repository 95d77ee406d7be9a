"""Render forward+backward time of the Gaussian rasterizer vs Gaussian count and resolution.

    python benchmarks/bench_render.py                       # CPU fallback (default sizes)
    python benchmarks/bench_render.py --device cuda         # gsplat CUDA rasterization
    python benchmarks/bench_render.py --counts 1000 10000 --resolutions 64 128 --repeats 3

Gaussians are drawn in a ball of radius 0.5 (3DGS nearest-neighbour scales, opacity 0.5, SH degree 0), one
threestudio camera at distance 2, fovy 50 deg.  Prints one row per (count, resolution): median seconds of
forward (RGB + expected depth) + backward of ``rgb.sum() + alpha.sum()``, wall-clock and
process CPU time (all threads; on a shared machine the CPU time is the more stable number).
"""
import argparse
import statistics
import time

import torch

from scoredistill.geometry import gaussian_init, gaussian_params
from scoredistill.renderer.gsplat_cameras import threestudio_to_gsplat_cameras
from scoredistill.renderer.gsplat_render import rasterize


def bench(n, res, device, repeats, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pts = gaussian_init.sample_sphere(n, 0.5, generator=gen)
    p = gaussian_init.params_from_points(pts, torch.rand(n, 3, generator=gen), sh_degree=0, init_opacity=0.5)
    params = {k: v.to(device).requires_grad_(True) for k, v in p.items()}
    c2w = torch.eye(4)
    c2w[:3, :3] = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # camera on +x looking at origin, z up
    c2w[0, 3] = 2.0
    viewmats, Ks = threestudio_to_gsplat_cameras(c2w[None].to(device), torch.tensor([0.8727], device=device), res, res)
    times, cpu_times = [], []
    for r in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        a = gaussian_params.activated(params)
        rgb, alpha, _ = rasterize(a["means"], a["quats"], a["scales"], a["opacities"], a["colors"], viewmats, Ks, res, res,
                                  sh_degree=0, render_mode="RGB+ED")
        (rgb.sum() + alpha.sum()).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if r > 0:  # first run is warm-up
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        for v in params.values():
            v.grad = None
    return statistics.median(times), statistics.median(cpu_times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'gaussians':>10} {'resolution':>10} {'wall s':>10} {'cpu s':>10}")
    for n in args.counts:
        for res in args.resolutions:
            t, c = bench(n, res, args.device, args.repeats)
            print(f"{n:>10} {res:>10} {t:>10.3f} {c:>10.3f}", flush=True)


if __name__ == "__main__":
    main()
