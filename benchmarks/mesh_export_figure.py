"""Figure for the README: Gaussians on ``load/shapes/octahedron.obj`` -> ``scoredistill mesh`` -> the written OBJ
(+ MTL + PNG) loaded back with trimesh and rendered by a small software rasterizer (z-buffer, perspective-correct
UVs, the PNG texture, headlight Lambert shading), next to the Gaussians rendered by the pack's CPU rasterizer from
the same cameras.

    python benchmarks/mesh_export_figure.py [--out docs/images/mesh-export.png] [--keep DIR]

Prints the export's numbers (Chamfer distance to the octahedron, mean texture colour error) used in docs/gaussians.md.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile

import numpy as np
import torch

from scoredistill.exporter import gaussian_mesh as M
from scoredistill.geometry import gaussian_init, gaussian_params, gaussian_ply
from scoredistill.renderer.gsplat_cameras import project_points, threestudio_to_gsplat_cameras
from scoredistill.renderer.gsplat_render import rasterize_cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def look_at_c2w(azimuth_deg: float, elevation_deg: float, distance: float) -> torch.Tensor:
    """threestudio camera-to-world (OpenGL: x right, y up, looking down -z), z-up world, looking at the origin."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    eye = torch.tensor([distance * math.cos(el) * math.cos(az), distance * math.cos(el) * math.sin(az), distance * math.sin(el)])
    fwd = -eye / eye.norm()
    right = torch.linalg.cross(fwd, torch.tensor([0.0, 0.0, 1.0]))
    right = right / right.norm()
    up = torch.linalg.cross(right, fwd)
    c2w = torch.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -fwd, eye
    return c2w


def render_textured_mesh(mesh, viewmat, K, size, bg=1.0):
    """Software rasterizer for a trimesh with TextureVisuals: returns ``[size, size, 3]`` in [0, 1]."""
    import trimesh

    v = torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32)
    f = torch.as_tensor(np.asarray(mesh.faces), dtype=torch.long)
    uv = torch.as_tensor(np.asarray(mesh.visual.uv), dtype=torch.float32)
    pix, depth = project_points(v, viewmat[None], K[None])
    pix, depth = pix[0].double(), depth[0].double()
    tri, tz = pix[f], depth[f]  # [F,3,2], [F,3]
    lo = torch.floor(tri.amin(1) - 0.5).long().clamp(0, size - 1)
    hi = torch.ceil(tri.amax(1) - 0.5).long().clamp(0, size - 1)
    ext = (hi - lo + 1).amax(1).clamp_min(1)
    zbuf = torch.full((size * size,), float("inf"), dtype=torch.float64)
    cand = []
    for e in torch.unique(ext).tolist():
        ids = torch.nonzero(ext == e).squeeze(1)
        ar = torch.arange(e)
        offs = torch.stack(torch.meshgrid(ar, ar, indexing="ij"), -1).reshape(-1, 2)
        p = lo[ids][:, None] + offs[None]
        ok = (p <= hi[ids][:, None]).all(-1)
        c = p.double() + 0.5
        a, b, cc = tri[ids, 0][:, None], tri[ids, 1][:, None], tri[ids, 2][:, None]
        area = (b[..., 0] - a[..., 0]) * (cc[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (cc[..., 0] - a[..., 0])
        w0 = ((b[..., 0] - c[..., 0]) * (cc[..., 1] - c[..., 1]) - (b[..., 1] - c[..., 1]) * (cc[..., 0] - c[..., 0])) / area
        w1 = ((cc[..., 0] - c[..., 0]) * (a[..., 1] - c[..., 1]) - (cc[..., 1] - c[..., 1]) * (a[..., 0] - c[..., 0])) / area
        w2 = 1 - w0 - w1
        ok &= (w0 >= 0) & (w1 >= 0) & (w2 >= 0) & (area.abs() > 1e-12)
        # perspective-correct weights
        iz = torch.stack([w0 / tz[ids, 0][:, None], w1 / tz[ids, 1][:, None], w2 / tz[ids, 2][:, None]], -1)
        z = 1.0 / iz.sum(-1)
        bw = iz * z[..., None]
        flat = p[..., 1] * size + p[..., 0]
        sel = ok & (z > 0)
        cand.append((flat[sel], ids[:, None].expand_as(sel)[sel], bw[sel], z[sel]))
    flat = torch.cat([c[0] for c in cand]); fid = torch.cat([c[1] for c in cand])
    bw = torch.cat([c[2] for c in cand]); z = torch.cat([c[3] for c in cand])
    zbuf.scatter_reduce_(0, flat, z, reduce="amin")
    win = z <= zbuf[flat]
    flat, fid, bw = flat[win], fid[win], bw[win]
    uvp = (uv[f[fid]].double() * bw[..., None]).sum(1).numpy()
    col = trimesh.visual.color.uv_to_color(uvp, mesh.visual.material.image)[:, :3] / 255.0
    fn = torch.as_tensor(np.array(mesh.face_normals), dtype=torch.float64)[fid]
    cam_dir = torch.as_tensor(np.linalg.inv(viewmat.double().numpy())[:3, 3]) - (v[f[fid]].double() * bw[..., None]).sum(1)
    lam = (fn * torch.nn.functional.normalize(cam_dir, dim=-1)).sum(-1).clamp_min(0).numpy()
    out = np.full((size * size, 3), bg, dtype=np.float64)
    out[flat.numpy()] = col * (0.45 + 0.55 * lam[:, None])
    return out.reshape(size, size, 3)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "images", "mesh-export.png"))
    ap.add_argument("--keep", default=None, help="keep the exported files in this folder")
    ap.add_argument("--size", type=int, default=200)
    args = ap.parse_args()
    torch.manual_seed(0)
    verts, faces, vcol = gaussian_init.load_mesh(os.path.join(REPO, "load", "shapes", "octahedron.obj"))
    pts, cols = gaussian_init.sample_mesh_surface(verts, faces, 20000, vcol, generator=torch.Generator().manual_seed(0))
    params = gaussian_init.params_from_points(pts, cols, init_opacity=0.8, init_scale=0.01)
    folder = args.keep or tempfile.mkdtemp(prefix="mesh-figure-")
    ply = gaussian_ply.save_gaussians_ply(os.path.join(folder, "gaussians.ply"), params)
    # the CLI's call: scoredistill mesh gaussians.ply <folder> --resolution 192 --texture-size 512 --decimate-target 20000
    # up_axis="z": the mesh is drawn from the cameras of the Gaussians, in their (threestudio) frame
    paths, result = M.export_ply_to_mesh(ply, folder, "model", resolution=192, texture_size=512, decimate_target=20000, up_axis="z")
    print("wrote", *paths)
    print("stats", {k: round(v, 4) for k, v in result.stats.items()})
    import trimesh
    from PIL import Image
    from scipy.spatial import cKDTree

    mesh = trimesh.load(os.path.join(folder, "model.obj"), force="mesh")
    cd = M.mesh_chamfer_distance(mesh, trimesh.Trimesh(verts.numpy(), faces.numpy(), process=False), n_samples=100000)
    print("chamfer vs octahedron (diameter 1.0):", {k: round(v, 5) for k, v in cd.items()})
    uvc = trimesh.visual.color.uv_to_color(mesh.visual.uv, mesh.visual.material.image)[:, :3] / 255.0
    tp, tc = gaussian_init.sample_mesh_surface(verts, faces, 400000, vcol, generator=torch.Generator().manual_seed(1))
    _, nn = cKDTree(tp.numpy()).query(np.asarray(mesh.vertices))
    print("mean abs texture colour error at the vertices:", round(float(np.abs(uvc - tc.numpy()[nn]).mean()), 4))
    size = args.size
    panels = []
    for az, el in ((30.0, 25.0), (210.0, -20.0)):
        c2w = look_at_c2w(az, el, 2.2)
        viewmats, Ks = threestudio_to_gsplat_cameras(c2w[None], math.radians(40.0), size, size)
        a = gaussian_params.activated(params)
        rgb, alpha, _ = rasterize_cpu(a["means"], a["quats"], a["scales"], a["opacities"], a["colors"], viewmats, Ks, size, size, sh_degree=0)
        gs = (rgb[0] + (1 - alpha[0]) * 1.0).clamp(0, 1).numpy()
        panels.append((gs, render_textured_mesh(mesh, viewmats[0], Ks[0], size)))
    row = np.concatenate([np.concatenate([g, m], 1) for g, m in panels], 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Image.fromarray((row * 255 + 0.5).astype(np.uint8)).save(args.out, optimize=True)
    print("figure", args.out, os.path.getsize(args.out), "bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
