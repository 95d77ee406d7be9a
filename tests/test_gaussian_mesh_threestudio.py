"""``gsplat-mesh-exporter`` under threestudio: ``launch.py --export system.exporter_type=gsplat-mesh-exporter`` on the
CPU writes the textured mesh of the Gaussians (here initialised on ``load/shapes/octahedron.obj``); in-process
config errors and the ``save_via_file`` path."""
import os

import numpy as np
import pytest
import torch

from harness import run_launch

pytestmark = [pytest.mark.threestudio]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "gs-sds.yaml")
OCTAHEDRON = os.path.join(REPO, "load", "shapes", "octahedron.obj")


def test_launch_export_writes_textured_mesh(tmp_path):
    import trimesh
    from scipy.spatial import cKDTree

    from scoredistill.exporter.gaussian_mesh import mesh_chamfer_distance
    from scoredistill.geometry import gaussian_init

    exp_root = str(tmp_path / "out")
    overrides = [
        "system.prompt_processor.prompt=an octahedron", "data.width=32", "data.height=32", "data.eval_width=32",
        "data.eval_height=32", "data.n_test_views=2",
        "system.geometry.init=mesh", f"system.geometry.init_path={OCTAHEDRON}", "system.geometry.num_points=6000",
        "system.geometry.upsample_to=0", "system.geometry.init_opacity=0.5", "system.geometry.init_scale=0.015",
        "system.exporter_type=gsplat-mesh-exporter", "system.exporter.resolution=48", "system.exporter.texture_size=128",
        "system.exporter.decimate_target=2000", "system.exporter.color_knn=8", "system.exporter.formats=[obj,glb,ply]",
        "system.exporter.up_axis=z",
    ]
    trial = run_launch(CONFIG, overrides, mode="--export", exp_root=exp_root)
    folder = os.path.join(trial, "save", "it0-export")
    # next to the 3DGS PLY that gs-sds.yaml's exporter.save_name (gaussians.ply) would name: not overwritten
    assert sorted(os.listdir(folder)) == ["model.glb", "model.json", "model.mtl", "model.obj", "model.ply", "model.png"]
    assert "gsplat-mesh-exporter:" in run_launch.last_output
    mesh = trimesh.load(os.path.join(folder, "model.obj"), force="mesh")
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals)
    glb = trimesh.load(os.path.join(folder, "model.glb"), force="mesh")
    assert len(glb.faces) == len(mesh.faces) <= 2000
    verts, faces, vcol = gaussian_init.load_mesh(OCTAHEDRON)
    cd = mesh_chamfer_distance(mesh, trimesh.Trimesh(verts.numpy(), faces.numpy(), process=False), n_samples=20000)
    assert cd["chamfer"] < 0.04, cd  # octahedron diameter 1.0 (48^3 grid); measured 0.027 in-process
    # texture colour at the mesh's vertices vs the octahedron's colour at the nearest true surface point
    uv_col = trimesh.visual.color.uv_to_color(mesh.visual.uv, mesh.visual.material.image)[:, :3] / 255.0
    true_pts, true_cols = gaussian_init.sample_mesh_surface(verts, faces, 100000, vcol, generator=torch.Generator().manual_seed(0))
    _, nn = cKDTree(true_pts.numpy()).query(np.asarray(mesh.vertices))
    assert np.abs(uv_col - true_cols.numpy()[nn]).mean() < 0.04  # measured 0.020 in-process, same Gaussians


def test_exporter_config_errors_and_save_via_file(threestudio_module, tmp_path):
    import trimesh

    geometry = threestudio_module.find("gsplat-gaussian-splatting")(
        {"init": "sphere", "num_points": 3000, "init_radius": 0.4, "init_sphere_surface": True, "init_opacity": 0.5, "init_scale": 0.03}
    )
    exporter_cls = threestudio_module.find("gsplat-mesh-exporter")
    for cfg, match in [
        ({"resolution": 4}, r"system\.exporter\.resolution must be an integer in \[8, 2048\]"),
        ({"color_mode": "view"}, r"system\.exporter\.color_mode must be one of"),
        ({"bounds": [[0, 0, 0], [1, 1]]}, r"system\.exporter\.bounds must be"),
        ({"formats": ["fbx"]}, r"system\.exporter\.formats must be"),
        ({"mesh_name": "a/b"}, r"system\.exporter\.mesh_name must be a plain file stem"),
        ({"mesh_name": "model.obj"}, r"system\.exporter\.mesh_name must be a plain file stem"),
    ]:
        with pytest.raises(ValueError, match=match):
            exporter_cls(cfg, geometry=geometry, material=None, background=None)
    with pytest.raises(ValueError, match="needs a Gaussian geometry"):
        exporter_cls({}, geometry=torch.nn.Linear(1, 1), material=None, background=None)
    exporter = exporter_cls(
        {"save_via_file": True, "resolution": 40, "texture_size": 64, "decimate_target": 1000, "color_knn": 4, "bounds": 0.6},
        geometry=geometry, material=None, background=None,
    )
    outs = exporter()
    assert [o.save_name for o in outs] == ["model.glb", "model.json", "model.mtl", "model.png", "model.obj"]
    assert all(o.save_type == "file" and os.path.isfile(o.params["src_path"]) for o in outs)
    m = trimesh.load([o.params["src_path"] for o in outs if o.save_name == "model.obj"][0], force="mesh")
    r = np.linalg.norm(m.vertices, axis=1)
    assert 0.4 < r.mean() < 0.5 and r.std() < 0.01
