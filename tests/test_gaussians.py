"""Gaussian parameters: PLY round trip, initialisers (point cloud, mesh, shapes, Shap-E output), activations."""
import math
import os

import numpy as np
import pytest
import torch

from scoredistill.geometry import gaussian_init, gaussian_params, gaussian_ply, spherical_harmonics


def _random_params(n=37, degree=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = (degree + 1) ** 2
    return {
        "means": torch.randn(n, 3, generator=g),
        "scales": torch.randn(n, 3, generator=g) - 3,
        "quats": torch.randn(n, 4, generator=g),
        "opacities": torch.randn(n, generator=g),
        "sh0": torch.randn(n, 1, 3, generator=g),
        "shN": torch.randn(n, k - 1, 3, generator=g),
    }


@pytest.mark.parametrize("degree", [0, 1, 3])
def test_ply_round_trip_is_bit_exact(tmp_path, degree):
    params = _random_params(degree=degree)
    path = gaussian_ply.save_gaussians_ply(str(tmp_path / "g.ply"), params)
    back = gaussian_ply.load_gaussians_ply(path)
    for k in gaussian_params.PARAM_KEYS:
        assert back[k].dtype == torch.float32
        assert back[k].shape == params[k].shape, k
        assert torch.equal(back[k], params[k]), k
    # no temporary files left behind by the atomic write
    assert os.listdir(tmp_path) == ["g.ply"]


def test_ply_layout_is_the_standard_3dgs_one(tmp_path):
    from plyfile import PlyData

    params = _random_params(n=5, degree=1)
    path = gaussian_ply.save_gaussians_ply(str(tmp_path / "g.ply"), params)
    v = PlyData.read(path)["vertex"]
    names = list(v.data.dtype.names)
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[9:18] == [f"f_rest_{i}" for i in range(9)]
    assert names[18:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    # f_rest is channel-major: f_rest_{c * (K-1) + j} = shN[:, j, c]
    assert np.float32(v["f_rest_4"][2]) == params["shN"][2, 1, 1].item()  # c=1, j=1 -> 1*3+1
    assert np.float32(v["f_rest_6"][3]) == params["shN"][3, 0, 2].item()  # c=2, j=0 -> 6
    assert np.all(np.asarray(v["nx"]) == 0)


def test_ply_load_changes_sh_degree_and_rejects_other_plys(tmp_path):
    params = _random_params(n=4, degree=1)
    path = gaussian_ply.save_gaussians_ply(str(tmp_path / "g.ply"), params)
    up = gaussian_ply.load_gaussians_ply(path, sh_degree=2)
    assert up["shN"].shape == (4, 8, 3)
    assert torch.equal(up["shN"][:, :3], params["shN"]) and not up["shN"][:, 3:].any()
    with pytest.raises(ValueError, match="SH degree 1 .* sh_degree is 0"):
        gaussian_ply.load_gaussians_ply(path, sh_degree=0)  # bands are never dropped silently (3DGS's loader asserts)
    down = gaussian_ply.load_gaussians_ply(path, sh_degree=0, drop_sh_bands=True)
    assert down["shN"].shape == (4, 0, 3)
    pc = tmp_path / "pc.ply"
    _write_point_cloud(pc, np.zeros((3, 3), np.float32), None)
    with pytest.raises(ValueError, match="not a 3D Gaussian PLY"):
        gaussian_ply.load_gaussians_ply(str(pc))


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "g.ply"
    path.write_bytes(b"old")

    def boom(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        gaussian_ply.write_ply_atomic(str(path), boom)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["g.ply"]


def test_activations_and_sh_dc_colour():
    p = _random_params(n=6, degree=1)
    a = gaussian_params.activated(p)
    assert torch.allclose(a["scales"], p["scales"].exp())
    assert torch.allclose(a["quats"].norm(dim=-1), torch.ones(6))
    assert torch.allclose(a["opacities"], torch.sigmoid(p["opacities"]))
    assert a["colors"].shape == (6, 4, 3)
    rgb = torch.tensor([[0.0, 0.25, 1.0]])
    assert torch.allclose(spherical_harmonics.sh0_to_rgb(spherical_harmonics.rgb_to_sh0(rgb)), rgb, atol=1e-7)
    assert spherical_harmonics.rgb_to_sh0(torch.tensor(0.5)).item() == 0.0
    assert [spherical_harmonics.active_sh_degree_at(s, 3, 1000) for s in (0, 999, 1000, 2500, 10**6)] == [0, 0, 1, 2, 3]
    assert spherical_harmonics.active_sh_degree_at(0, 2, 0) == 2
    with pytest.raises(ValueError, match="sh_degree must be in 0..3"):
        spherical_harmonics.num_sh_bases(4)


def test_params_from_points_follows_3dgs_init():
    pts = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0]])
    cols = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0.5]])
    p = gaussian_init.params_from_points(pts, cols, sh_degree=1, init_opacity=0.1)
    # scale = sqrt(mean of the 3 smallest squared distances to other points)
    d2 = torch.cdist(pts, pts).pow(2) + torch.eye(4) * 1e9
    expect = d2.sort(dim=1).values[:, :3].mean(1).sqrt().log()
    assert torch.allclose(p["scales"], expect[:, None].expand(4, 3))
    assert torch.allclose(torch.sigmoid(p["opacities"]), torch.full((4,), 0.1))
    assert torch.equal(p["quats"], torch.tensor([[1.0, 0, 0, 0]]).expand(4, 4))
    assert torch.allclose(spherical_harmonics.sh0_to_rgb(p["sh0"][:, 0]), cols, atol=1e-6)
    assert p["shN"].shape == (4, 3, 3) and not p["shN"].any()
    with pytest.raises(ValueError, match="init_opacity must be in"):
        gaussian_init.params_from_points(pts, init_opacity=1.0)
    with pytest.raises(ValueError, match="points must have shape"):
        gaussian_init.params_from_points(torch.zeros(3, 2))


def _write_point_cloud(path, pts, colors_u8):
    from plyfile import PlyData, PlyElement

    dtype = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if colors_u8 is not None:
        dtype += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    arr = np.empty(len(pts), dtype=dtype)
    arr["x"], arr["y"], arr["z"] = pts[:, 0], pts[:, 1], pts[:, 2]
    if colors_u8 is not None:
        arr["red"], arr["green"], arr["blue"] = colors_u8[:, 0], colors_u8[:, 1], colors_u8[:, 2]
    PlyData([PlyElement.describe(arr, "vertex")]).write(str(path))


def test_point_cloud_ply_init(tmp_path):
    pts = np.random.RandomState(0).randn(20, 3).astype(np.float32)
    cols = np.random.RandomState(1).randint(0, 256, (20, 3)).astype(np.uint8)
    _write_point_cloud(tmp_path / "pc.ply", pts, cols)
    p, c = gaussian_init.load_point_cloud(str(tmp_path / "pc.ply"))
    assert torch.equal(p, torch.from_numpy(pts))
    assert torch.allclose(c, torch.from_numpy(cols.astype(np.float32) / 255.0))
    _write_point_cloud(tmp_path / "pc2.ply", pts, None)
    assert gaussian_init.load_point_cloud(str(tmp_path / "pc2.ply"))[1] is None


def _triangle_obj(path):
    # two triangles forming the unit square in z=0 (area 1), vertex colours red/green/blue/white
    path.write_text(
        "v 0 0 0 1 0 0\nv 1 0 0 0 1 0\nv 1 1 0 0 0 1\nv 0 1 0 1 1 1\n"
        "f 1 2 3\nf 1 3 4\n"
    )


def test_mesh_obj_surface_sampling_with_colours(tmp_path):
    _triangle_obj(tmp_path / "sq.obj")
    verts, faces, vcol = gaussian_init.load_mesh(str(tmp_path / "sq.obj"))
    assert verts.shape == (4, 3) and faces.shape == (2, 3)
    assert vcol is not None and torch.allclose(vcol[0], torch.tensor([1.0, 0, 0]), atol=1 / 255)
    gen = torch.Generator().manual_seed(0)
    pts, cols = gaussian_init.sample_mesh_surface(verts, faces, 4000, vcol, generator=gen)
    assert pts.shape == (4000, 3) and cols.shape == (4000, 3)
    assert torch.all(pts[:, 2] == 0) and pts[:, :2].min() >= 0 and pts[:, :2].max() <= 1
    # uniform over the square: mean ~ (0.5, 0.5), each triangle gets ~ half of the samples
    assert torch.allclose(pts[:, :2].mean(0), torch.tensor([0.5, 0.5]), atol=0.03)
    below = (pts[:, 1] <= pts[:, 0]).float().mean()
    assert abs(below.item() - 0.5) < 0.04
    # colours are the barycentric interpolation: check against a direct evaluation at the sample positions
    # (on triangle 1,2,3 = (0,0),(1,0),(1,1): w1 = 1-x, w2 = x-y, w3 = y)
    m = pts[:, 1] < pts[:, 0] - 1e-4
    x, y = pts[m, 0], pts[m, 1]
    expect = (1 - x)[:, None] * vcol[0] + (x - y)[:, None] * vcol[1] + y[:, None] * vcol[2]
    assert torch.allclose(cols[m], expect, atol=1e-5)


def test_mesh_ply_sampling_and_zero_area(tmp_path):
    import trimesh

    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.7)
    mesh.visual.vertex_colors = np.tile(np.array([[0, 255, 0, 255]], np.uint8), (len(mesh.vertices), 1))
    mesh.export(tmp_path / "s.ply")
    verts, faces, vcol = gaussian_init.load_mesh(str(tmp_path / "s.ply"))
    pts, cols = gaussian_init.sample_mesh_surface(verts, faces, 500, vcol, generator=torch.Generator().manual_seed(1))
    r = pts.norm(dim=-1)
    assert r.max() <= 0.7 + 1e-5 and r.min() > 0.65  # on the (inscribed) icosphere surface
    assert torch.allclose(cols, torch.tensor([0.0, 1.0, 0.0]).expand(500, 3))
    with pytest.raises(ValueError, match="zero surface area"):
        gaussian_init.sample_mesh_surface(torch.zeros(3, 3), torch.tensor([[0, 1, 2]]), 10)


def test_sphere_and_box_initialisers():
    gen = torch.Generator().manual_seed(0)
    ball = gaussian_init.sample_sphere(5000, 0.8, generator=gen)
    r = ball.norm(dim=-1)
    assert r.max() <= 0.8 + 1e-6
    # uniform in the ball: P(r < R/2) = 1/8
    assert abs((r < 0.4).float().mean().item() - 0.125) < 0.02
    shell = gaussian_init.sample_sphere(100, 0.8, surface=True, generator=gen)
    assert torch.allclose(shell.norm(dim=-1), torch.full((100,), 0.8), atol=1e-6)
    box = gaussian_init.sample_box(5000, 0.3, generator=gen)
    assert box.abs().max() <= 0.3 and box.abs().max() > 0.29
    assert torch.allclose(box.mean(0), torch.zeros(3), atol=0.02)
    with pytest.raises(ValueError, match="radius > 0"):
        gaussian_init.sample_sphere(10, 0.0)


def test_upsampling_keeps_originals_and_grows_near_them():
    gen = torch.Generator().manual_seed(0)
    pts = torch.tensor([[0.0, 0, 0], [10.0, 0, 0]])
    cols = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    up, upc = gaussian_init.upsample_points(pts, cols, 1000, jitter=0.1, color_jitter=0.0, generator=gen)
    assert up.shape == (1000, 3) and torch.equal(up[:2], pts)
    near0 = (up[2:] - pts[0]).norm(dim=-1) < 1.0
    near1 = (up[2:] - pts[1]).norm(dim=-1) < 1.0
    assert torch.all(near0 ^ near1)
    assert torch.equal(upc[2:][near0], cols[0].expand(int(near0.sum()), 3))
    std = (up[2:][near0] - pts[0]).std()
    assert abs(std.item() - 0.1) < 0.02
    same, _ = gaussian_init.upsample_points(pts, None, 2, 0.1)
    assert same is pts


def test_shap_e_mesh_output_conversion():
    """diffusers ShapEPipeline(output_type="mesh") -> MeshDecoderOutput(verts, faces, vertex_channels R/G/B)."""
    from types import SimpleNamespace as MeshDecoderOutput  # same attribute names, without importing diffusers

    verts = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    faces = torch.tensor([[0, 1, 2], [0, 1, 3]])
    channels = {"R": torch.tensor([1.0, 1.0, 1.0, 0.0]), "G": torch.zeros(4), "B": torch.tensor([0.0, 0.0, 0.0, 1.0])}
    out = MeshDecoderOutput(verts=verts, faces=faces, vertex_channels=channels)
    pts, cols = gaussian_init.shap_e_mesh_to_points(out.verts, out.faces, out.vertex_channels, 2000, generator=torch.Generator().manual_seed(0))
    assert pts.shape == (2000, 3) and cols.shape == (2000, 3)
    on_z0 = pts[:, 2].abs() < 1e-7  # face 0 lies in z=0 and is pure red
    assert on_z0.any() and (~on_z0).any()
    assert torch.allclose(cols[on_z0], torch.tensor([1.0, 0, 0]).expand(int(on_z0.sum()), 3))
    # face 1 (y=0): blue weight equals the barycentric weight of vertex 3 = z
    off = ~on_z0
    assert torch.allclose(cols[off, 2], pts[off, 2], atol=1e-5)
    params = gaussian_init.params_from_points(*gaussian_init.upsample_points(pts, cols, 3000, 0.01, 0.02), sh_degree=0)
    assert params["means"].shape == (3000, 3)


def test_init_transform_swaps_y_up_to_z_up():
    p = torch.tensor([[0.0, 1.0, 0.0]])  # "up" in a y-up frame
    assert torch.allclose(gaussian_init.apply_init_transform(p, swap_yz=True), torch.tensor([[0.0, 0.0, 1.0]]))
    q = gaussian_init.apply_init_transform(torch.tensor([[1.0, 0.0, 0.0]]), scale=2.0, rotation_deg_z=90.0, offset=(0, 0, 1.0))
    assert torch.allclose(q, torch.tensor([[0.0, 2.0, 1.0]]), atol=1e-6)
