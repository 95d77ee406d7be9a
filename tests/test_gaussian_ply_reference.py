"""The 3DGS PLY as the reference implementation (Kerbl et al. 2023) and common splat viewers lay it out.

The file is built here byte by byte from the layout specification, without plyfile and without our writer:

* header ``ply`` / ``format binary_little_endian 1.0`` / ``element vertex N`` / one ``property float <name>``
  per attribute / ``end_header``, then ``N`` records of little-endian float32 in header order;
* order ``x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 f_rest_0 .. f_rest_{3(K-1)-1} opacity scale_0..2 rot_0..3``;
* ``f_dc_c`` = DC coefficient of colour channel ``c``; ``f_rest`` channel-major:
  ``f_rest_{c (K-1) + j}`` = coefficient of SH basis ``j + 1`` for channel ``c`` (all of R, then G, then B);
* ``opacity`` = logit of the opacity, ``scale_i`` = log standard deviation, ``rot_0..3`` = quaternion
  ``(w, x, y, z)``, stored unnormalised; normals zero.

Then the meaning of the imported values is checked by rendering: colour = ``max(SH(dir) + 0.5, 0)`` with the
real SH basis of the reference code (signs and band order written out below from the SH definitions),
``dir = mean - camera centre``.
"""
import math
import struct

import numpy as np
import pytest
import torch

from scoredistill.geometry import gaussian_init, gaussian_params, gaussian_ply, spherical_harmonics
from scoredistill.renderer.gsplat_cameras import threestudio_to_gsplat_cameras
from scoredistill.renderer.gsplat_render import rasterize_cpu


def _names(k):
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
            + [f"f_rest_{i}" for i in range(3 * (k - 1))]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def _reference_ply_bytes(xyz, sh, opacity_logit, log_scale, quat_wxyz):
    """Bytes of a 3DGS PLY; ``sh[n][b][c]`` = coefficient of SH basis ``b`` (0 = DC) for channel ``c``."""
    n, k = len(xyz), len(sh[0])
    header = "ply\nformat binary_little_endian 1.0\n" + f"element vertex {n}\n"
    header += "".join(f"property float {name}\n" for name in _names(k)) + "end_header\n"
    body = b""
    for i in range(n):
        rest = [sh[i][j + 1][c] for c in range(3) for j in range(k - 1)]  # channel-major
        row = list(xyz[i]) + [0.0, 0.0, 0.0] + [sh[i][0][c] for c in range(3)] + rest
        row += [opacity_logit[i]] + list(log_scale[i]) + list(quat_wxyz[i])
        body += struct.pack("<" + "f" * len(row), *row)
    return header.encode("ascii") + body


def _distinct_scene(n=3, degree=3):
    k = (degree + 1) ** 2
    xyz = [[0.5 * i, -0.25 * i, 1.0 + i] for i in range(n)]
    sh = [[[i * 1000.0 + b * 10.0 + c for c in range(3)] for b in range(k)] for i in range(n)]
    opac = [-2.0 + i for i in range(n)]
    scale = [[-3.0 - i, -4.0, -5.5] for i in range(n)]
    quat = [[2.0, 0.5 * i, -1.0, 0.25] for i in range(n)]
    return xyz, sh, opac, scale, quat


@pytest.mark.parametrize("degree", [0, 1, 3])
def test_import_of_a_reference_layout_ply(tmp_path, degree):
    xyz, sh, opac, scale, quat = _distinct_scene(degree=degree)
    path = tmp_path / "ref.ply"
    path.write_bytes(_reference_ply_bytes(xyz, sh, opac, scale, quat))
    p = gaussian_ply.load_gaussians_ply(str(path))
    k = (degree + 1) ** 2
    assert p["shN"].shape == (3, k - 1, 3)
    for i in range(3):
        assert p["means"][i].tolist() == xyz[i]
        assert p["opacities"][i].item() == opac[i]
        assert p["scales"][i].tolist() == scale[i]
        assert p["quats"][i].tolist() == quat[i]  # w first, not normalised on import
        assert p["sh0"][i, 0].tolist() == sh[i][0]
        for j in range(k - 1):
            assert p["shN"][i, j].tolist() == sh[i][j + 1], (i, j)
    # the point-cloud reader takes the colours of the DC terms: SH_C0 * f_dc + 0.5
    _, cols = gaussian_init.load_point_cloud(str(path))
    assert torch.allclose(cols, (torch.tensor([s[0] for s in sh]) * spherical_harmonics.SH_C0 + 0.5).clamp(0, 1))


@pytest.mark.parametrize("degree", [0, 3])
def test_export_is_byte_identical_to_the_reference_layout(tmp_path, degree):
    xyz, sh, opac, scale, quat = _distinct_scene(degree=degree)
    t = torch.tensor
    params = {
        "means": t(xyz), "opacities": t(opac), "scales": t(scale), "quats": t(quat),
        "sh0": t([s[:1] for s in sh]), "shN": t([s[1:] for s in sh]).reshape(3, -1, 3),
    }
    out = gaussian_ply.save_gaussians_ply(str(tmp_path / "ours.ply"), params)
    assert open(out, "rb").read() == _reference_ply_bytes(xyz, sh, opac, scale, quat)


def test_imported_rotation_and_scale_follow_3dgs():
    """``rot = (w, x, y, z)`` unnormalised and log scales: 90 deg about +z turns the long x axis into y."""
    from gsplat.cuda._torch_impl import _quat_scale_to_covar_preci

    h = math.sqrt(0.5)
    raw = {"quats": torch.tensor([[2 * h, 0.0, 0.0, 2 * h]]), "scales": torch.log(torch.tensor([[0.3, 0.01, 0.02]]))}
    a = gaussian_params.activated({**raw, "means": torch.zeros(1, 3), "opacities": torch.zeros(1),
                     "sh0": torch.zeros(1, 1, 3), "shN": torch.zeros(1, 0, 3)})
    cov, _ = _quat_scale_to_covar_preci(a["quats"], a["scales"], compute_covar=True, compute_preci=False)
    assert torch.allclose(cov[0], torch.diag(torch.tensor([0.01**2, 0.3**2, 0.02**2])), atol=1e-7)


def _reference_sh(dirs, coeffs):
    """Real SH colour of the reference 3DGS code for unit ``dirs [3]``, ``coeffs [K, 3]`` (K = 1, 4, 9, 16)."""
    x, y, z = dirs.tolist()
    c0 = 0.28209479177387814
    c1 = 0.4886025119029199
    c2 = [1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396]
    c3 = [-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
          -0.4570457994644658, 1.445305721320277, -0.5900435899266435]
    xx, yy, zz = x * x, y * y, z * z
    basis = [c0, -c1 * y, c1 * z, -c1 * x,
             c2[0] * x * y, c2[1] * y * z, c2[2] * (2 * zz - xx - yy), c2[3] * x * z, c2[4] * (xx - yy),
             c3[0] * y * (3 * xx - yy), c3[1] * x * y * z, c3[2] * y * (4 * zz - xx - yy),
             c3[3] * z * (2 * zz - 3 * xx - 3 * yy), c3[4] * x * (4 * zz - xx - yy), c3[5] * z * (xx - yy),
             c3[6] * x * (xx - 3 * yy)]
    return (torch.tensor(basis[: coeffs.shape[0]], dtype=torch.float64)[:, None] * coeffs.double()).sum(0)


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_rendered_colour_of_an_imported_gaussian_is_the_3dgs_sh_colour(tmp_path, degree):
    """One large opaque Gaussian at the origin seen by a threestudio camera; the centre pixel (odd image,
    pixel centre on the projected mean, so sigma = 0 and alpha = 0.999) shows 0.999 * max(SH(dir) + 0.5, 0)."""
    g = torch.Generator().manual_seed(0)
    sh = (torch.rand(16, 3, generator=g) - 0.5) * 0.8
    path = tmp_path / "one.ply"
    k = (degree + 1) ** 2
    path.write_bytes(_reference_ply_bytes([[0.0, 0.0, 0.0]], [sh[:k].tolist()], [8.0], [[-1.0, -1.0, -1.0]], [[1.0, 0, 0, 0]]))
    p = gaussian_ply.load_gaussians_ply(str(path))
    a = gaussian_params.activated(p)
    elev, azim, dist = math.radians(30.0), math.radians(40.0), 2.0
    pos = torch.tensor([dist * math.cos(elev) * math.cos(azim), dist * math.cos(elev) * math.sin(azim), dist * math.sin(elev)])
    look = -pos / pos.norm()
    right = torch.nn.functional.normalize(torch.linalg.cross(look, torch.tensor([0.0, 0.0, 1.0])), dim=0)
    up = torch.linalg.cross(right, look)
    c2w = torch.eye(4)
    c2w[:3, :3] = torch.stack([right, up, -look], dim=1)
    c2w[:3, 3] = pos
    viewmats, Ks = threestudio_to_gsplat_cameras(c2w[None], math.radians(50.0), 15, 15)
    rgb, alpha, _ = rasterize_cpu(a["means"], a["quats"], a["scales"], a["opacities"], a["colors"], viewmats, Ks, 15, 15, sh_degree=degree)
    direction = -pos / pos.norm()  # mean - camera centre
    expect = 0.999 * torch.clamp_min(_reference_sh(direction, sh[:k]) + 0.5, 0.0)
    assert alpha[0, 7, 7, 0].item() == pytest.approx(0.999, abs=1e-6)
    assert torch.allclose(rgb[0, 7, 7].double(), expect, atol=2e-6), (rgb[0, 7, 7], expect)
