"""Time, surface offset and checks of the whole ``scoredistill mesh`` pipeline (``gsplat-mesh-exporter``) on Gaussians
of the ground-truth benchmark scenes, at the exporter's defaults (256^3 grid, 100k faces, 1024^2 texture, GLB+OBJ).

    python benchmarks/bench_mesh_export.py [--gaussians 20000,100000] [--std 0.0362|nn] [--device cpu|cuda]
        [--scenes cube,janus,table] [--threads 0] [--out outputs/bench_mesh_export]

``--gaussians N``: N Gaussians on the cube of ``load/gt_scenes`` (``gt_scenes.surface_points``), isotropic std
``--std`` (default 0.0362, the 3,000-Gaussian cube's median: a dense scene, N / 3000 times the overlap, as a model
densified without shrinking) or ``nn`` (the 3DGS nearest-neighbour rule: sparse, std shrinking with N).
``--scenes``: the committed benchmark PLYs.  Prints, per scene: the stage times (density grid, fill + marching
cubes, cleanup, xatlas, texture, writing the files), total seconds, watertight, components, degenerate faces and
the surface offset (vertices to the nearest Gaussian centre; the surface of a layer of Gaussians of std s sits
about 1.2 s outside their centres at the default level).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from scoredistill.exporter import gaussian_mesh as M
from scoredistill.geometry import gaussian_init, gaussian_ply


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--gaussians", default="20000,100000", help="comma-separated Gaussian counts on the cube ('' = none)")
    ap.add_argument("--std", default="0.0362", help="std of the cube's Gaussians, or 'nn' (3DGS nearest-neighbour rule)")
    ap.add_argument("--scenes", default="", help="comma-separated scenes of load/gt_scenes (e.g. cube,janus,table)")
    ap.add_argument("--device", default="cpu", help="torch device of the density grid and texture")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", default=os.path.join("outputs", "bench_mesh_export"), help="folder of the written meshes")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from scoredistill.bench import gt_scenes

    jobs = []
    for n in [int(x) for x in args.gaussians.split(",") if x]:
        pts, rgb = gt_scenes.surface_points("cube", n)
        std = None if args.std == "nn" else float(args.std)
        jobs.append((f"cube-{n}-std{args.std}", gaussian_init.params_from_points(pts, rgb, init_opacity=0.95, init_scale=std)))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for s in [x for x in args.scenes.split(",") if x]:
        jobs.append((s, gaussian_ply.load_gaussians_ply(os.path.join(repo, "load", "gt_scenes", f"{s}.ply"))))
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load average "
          f"{os.getloadavg()[0]:.1f}")
    for name, params in jobs:
        params = {k: v.to(args.device) for k, v in params.items()}
        t = time.perf_counter()
        res = M.gaussians_to_mesh(params, device=args.device, progress=True)
        t_write = time.perf_counter()
        M.write_mesh_files(res, os.path.join(args.out, name), "model", ["obj", "glb"])
        st = res.stats
        total = time.perf_counter() - t
        print(f"{name}: {st['gaussians']:.0f} visible Gaussians, median std {st['median_std']:.4f}; total {total:.1f} s = "
              f"density {st['seconds_density']:.1f} + fill/marching cubes {st['seconds_marching_cubes']:.1f} + cleanup "
              f"{st['seconds_cleanup']:.1f} + xatlas {st['seconds_uv_atlas']:.1f} + texture {st['seconds_texture']:.1f} + "
              f"files {time.perf_counter() - t_write:.1f}", flush=True)
        print(f"  {M.summary_line(st)}; offset/std {st['surface_offset_mean'] / st['median_std']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
