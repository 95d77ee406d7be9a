"""Time and memory of the gsplat-mesh-exporter stages (``scoredistill.exporter.gaussian_mesh``).

    python benchmarks/bench_mesh_export.py [--gaussians 100000] [--resolution 256] [--device cpu|cuda] [--full]

Gaussians: 90% surface samples of a sphere of radius 0.5, 10% in the ball (3DGS nearest-neighbour scales,
opacity 0.5): the ball's Gaussians are large (std ~0.03), so most of the work is theirs.  Prints per-stage wall time and the peak resident memory of the process (CPU) or the peak CUDA memory;
``--full`` also runs cleanup, decimation, xatlas and the texture bake.
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from scoredistill.exporter import gaussian_mesh as M
from scoredistill.geometry import gaussians as G


def peak_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gaussians", type=int, default=100_000)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk-size", type=int, default=4_194_304)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--full", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n_surf = int(args.gaussians * 0.9)
    pts = torch.cat([G.sample_sphere(n_surf, 0.5, surface=True, generator=g), G.sample_sphere(args.gaussians - n_surf, 0.5, generator=g)])
    # 3DGS scale rule (sqrt of the mean squared distance to the 3 nearest neighbours) through a KD-tree, so the
    # peak memory measured below is the exporter's, not the O(chunk * N) brute-force neighbour search's
    from scipy.spatial import cKDTree

    d, _ = cKDTree(pts.numpy()).query(pts.numpy(), k=4)
    std = torch.as_tensor(np.sqrt((d[:, 1:] ** 2).mean(1)), dtype=torch.float32)
    params = G.params_from_points(pts, (pts + 0.5).clamp(0, 1), init_opacity=0.5, init_scale=1.0)
    params["scales"] = torch.log(std)[:, None].repeat(1, 3)
    params = {k: v.to(args.device) for k, v in params.items()}
    print(f"{args.gaussians} Gaussians, resolution {args.resolution}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"median std {float(params['scales'].exp().median()):.4f}")
    base = peak_mib(args.device)
    t = time.perf_counter()
    gf = M.gaussian_field(params)
    grid = M.make_grid(gf, "auto", args.resolution)
    dens = M.density_grid(gf, grid, args.chunk_size)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_d = time.perf_counter() - t
    print(f"density grid {grid.dims}: {t_d:.1f} s, peak memory {peak_mib(args.device):.0f} MiB (before: {base:.0f} MiB; grid alone "
          f"{np.prod(grid.dims) * 4 / 2**20:.0f} MiB)")
    # (Gaussian, node) pairs evaluated: each Gaussian's box is padded to a cube of its largest side
    origin = torch.as_tensor(grid.origin, dtype=torch.float32, device=gf.means.device)
    i0 = torch.ceil((gf.means - gf.extents - origin) / grid.voxel).clamp_min(0)
    i1 = torch.minimum(torch.floor((gf.means + gf.extents - origin) / grid.voxel), torch.tensor(grid.dims, device=i0.device) - 1)
    side = (i1 - i0 + 1).clamp_min(0).amax(1).double()
    big = gf.extents.amax(1) > 3 * float(gf.extents.amax(1).median())
    print(f"pairs: {float((side**3).sum()) / 1e6:.0f} M, of which {float((side[big]**3).sum()) / 1e6:.0f} M from the "
          f"{int(big.sum())} Gaussians with a box > 3x the median")
    t = time.perf_counter()
    verts, faces = M.extract_isosurface(dens, grid, 0.5)
    print(f"marching cubes: {time.perf_counter() - t:.1f} s, {len(faces)} faces")
    if args.full:
        res = M.gaussians_to_mesh(params, resolution=args.resolution, device=args.device)
        print("full pipeline stats", res.stats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
