"""Mesh files that behave in every viewer (issue 28) and exports that cannot be half replaced or hang (issue 24):
glTF +Y up read from the GLB's own node/accessor data, vertex normals in GLB/OBJ/PLY, no degenerate faces and one
closed component on the three benchmark scenes, the surface offset to the Gaussians bounded for sparse and dense
scenes alike, the JSON report, the file set replaced as a set under a full disk, extreme PLY values refused
with one line, the CLI's help texts, and the Khronos glTF validator on an exported GLB."""
import errno
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from scoredistill.exporter import gaussian_mesh as M
from scoredistill.geometry import gaussian_init, gaussian_ply

from harness import one_thread_fixture

_one_thread = one_thread_fixture()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENES = os.path.join(REPO, "load", "gt_scenes")
FAST = dict(resolution=64, texture_size=128, decimate_target=3000, color_knn=8)
CENTER = (0.2, -0.3, 0.7)  # threestudio frame (z up)


def sphere_gaussians(n=4000, radius=0.3, scale=0.02, center=CENTER, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = gaussian_init.sample_sphere(n, 1.0, surface=True, generator=g)
    return gaussian_init.params_from_points(d * radius + torch.tensor(center), (d + 1) / 2, init_opacity=0.5, init_scale=scale)


def read_glb(path):
    """(json, binary chunk) of a GLB (glTF 2.0 binary container, spec Sec. 4.4)."""
    data = open(path, "rb").read()
    magic, version, length = struct.unpack_from("<III", data, 0)
    assert magic == 0x46546C67 and version == 2 and length == len(data)
    jlen, jtype = struct.unpack_from("<II", data, 12)
    assert jtype == 0x4E4F534A
    doc = json.loads(data[20 : 20 + jlen])
    blen, btype = struct.unpack_from("<II", data, 20 + jlen)
    return doc, data[28 + jlen : 28 + jlen + blen]


def accessor_array(doc, binary, index):
    acc = doc["accessors"][index]
    view = doc["bufferViews"][acc["bufferView"]]
    ncomp = {"SCALAR": 1, "VEC2": 2, "VEC3": 3}[acc["type"]]
    dtype = {5126: np.float32, 5125: np.uint32, 5123: np.uint16}[acc["componentType"]]
    start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
    return np.frombuffer(binary, dtype=dtype, count=acc["count"] * ncomp, offset=start).reshape(acc["count"], ncomp)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh")
    params = sphere_gaussians()
    result = M.gaussians_to_mesh(params, progress=False, **FAST)
    paths = M.write_mesh_files(result, str(out), "model", ["obj", "glb", "ply"])
    return params, result, out, paths


# ---------------------------------------------------------------------------------------------- frame and normals
def test_glb_is_y_up_from_its_nodes_and_accessors_with_unit_outward_normals(export):
    _, result, out, _ = export
    doc, binary = read_glb(str(out / "model.glb"))
    # no node transform re-orients the mesh: the POSITION data themselves are +Y up
    for node in doc.get("nodes", []):
        assert "rotation" not in node and "scale" not in node
        if "matrix" in node:
            assert np.allclose(np.asarray(node["matrix"]).reshape(4, 4), np.eye(4))
    prim = doc["meshes"][0]["primitives"][0]
    assert {"POSITION", "NORMAL", "TEXCOORD_0"} <= set(prim["attributes"])
    pos = accessor_array(doc, binary, prim["attributes"]["POSITION"]).astype(np.float64)
    nrm = accessor_array(doc, binary, prim["attributes"]["NORMAL"]).astype(np.float64)
    acc = doc["accessors"][prim["attributes"]["POSITION"]]
    centre = (np.asarray(acc["min"]) + np.asarray(acc["max"])) / 2
    # threestudio (x, y, z) = (0.2, -0.3, 0.7) -> glTF (x, z, -y) = (0.2, 0.7, 0.3): the height is on +Y
    assert np.allclose(centre, [0.2, 0.7, 0.3], atol=0.02), centre
    assert len(nrm) == len(pos)
    assert np.allclose(np.linalg.norm(nrm, axis=1), 1.0, atol=1e-3)
    outward = ((pos - [0.2, 0.7, 0.3]) * nrm).sum(1) / np.linalg.norm(pos - [0.2, 0.7, 0.3], axis=1)
    # smooth vertex normals of a sphere point outwards (a few tilt at the dimples the fill leaves where the shell of
    # 4,000 Gaussians is thin on this 64^3 grid)
    assert np.quantile(outward, 0.02) > 0.8 and outward.min() > -0.2, (np.quantile(outward, 0.02), outward.min())


def test_obj_and_ply_in_the_same_frame_with_normals_and_up_axis_z_option(export, tmp_path):
    import trimesh

    _, result, out, _ = export
    text = (out / "model.obj").read_text()
    assert text.startswith("# scoredistill gsplat-mesh-exporter: +Y up")
    vn = np.array([[float(x) for x in line.split()[1:]] for line in text.splitlines() if line.startswith("vn ")])
    v = np.array([[float(x) for x in line.split()[1:4]] for line in text.splitlines() if line.startswith("v ")])
    assert len(vn) == len(v) and np.allclose(np.linalg.norm(vn, axis=1), 1.0, atol=1e-3)
    face = next(line for line in text.splitlines() if line.startswith("f "))
    assert all(len(c.split("/")) == 3 and c.split("/")[2] for c in face.split()[1:])  # v/vt/vn
    assert np.allclose((v.min(0) + v.max(0)) / 2, [0.2, 0.7, 0.3], atol=0.02)
    ply = trimesh.load(str(out / "model.ply"), force="mesh")
    assert np.allclose((ply.vertices.min(0) + ply.vertices.max(0)) / 2, [0.2, 0.7, 0.3], atol=0.02)
    # up_axis="z": threestudio's frame, unchanged
    M.write_mesh_files(result, str(tmp_path), "z", ["obj", "glb"], up_axis="z")
    glb = trimesh.load(str(tmp_path / "z.glb"), force="mesh")
    assert np.allclose((glb.vertices.min(0) + glb.vertices.max(0)) / 2, CENTER, atol=0.02)
    assert "+Z up" in (tmp_path / "z.obj").read_text().splitlines()[0]
    with pytest.raises(ValueError, match=r"up_axis must be one of \('y', 'z'\)"):
        M.MeshSettings(up_axis="x").check("system.exporter.")


def test_json_report_beside_the_files(export):
    _, result, out, paths = export
    assert sorted(os.path.basename(p) for p in paths) == ["model.glb", "model.json", "model.mtl", "model.obj", "model.ply", "model.png"]
    report = json.loads((out / "model.json").read_text())
    assert report["up_axis"] == "y" and "(x, z, -y)" in report["frame"]
    st = report["stats"]
    assert st["watertight"] == 1.0 and st["components"] == 1.0 and st["degenerate_faces"] == 0.0
    assert st == pytest.approx(result.stats)
    # the offset is the distance of the vertices to the nearest centre: on the sphere of centres it is |r - 0.3|
    r = np.linalg.norm(np.asarray(result.welded.vertices) - CENTER, axis=1)
    assert st["surface_offset_mean"] == pytest.approx(np.abs(r - 0.3).mean(), abs=0.004)


# ---------------------------------------------------------------------------------------------- benchmark scenes
@pytest.mark.parametrize("scene", ["cube", "janus", "table"])
def test_benchmark_scene_mesh_is_one_closed_component_without_degenerate_faces(scene):
    """At the default grid (256^3) main kept a hidden inner shell on the two-faced ball (the shell's density dips
    under the level, so the cavity looked open: not watertight, also with 20k faces) and, at 100k faces, a
    zero-area face on the cube.  20k faces and a small texture keep the test short."""
    params = gaussian_ply.load_gaussians_ply(os.path.join(SCENES, f"{scene}.ply"))
    res = M.gaussians_to_mesh(params, decimate_target=20000, texture_size=64, color_knn=4, progress=False)
    w = res.welded
    assert w.is_watertight and w.body_count == 1, (scene, res.stats)
    assert int((~w.nondegenerate_faces()).sum()) == 0 and float(w.area_faces.min()) > 0
    assert res.stats["degenerate_faces"] == 0 and res.stats["components"] == 1 and res.stats["watertight"] == 1
    assert w.volume > 0  # outward


def test_cavity_fill_closes_a_shell_whose_density_dips_just_under_the_level():
    # a density grid with a closed shell at 1.0 except one voxel of 0.49999 (a gap at level 0.5), an empty cavity
    # and an inner shell inside it: the fill must close the gap for the fill and keep only the outer surface
    n = 24
    vol = np.zeros((n, n, n), dtype=np.float32)
    vol[4:20, 4:20, 4:20] = 1.0
    vol[6:18, 6:18, 6:18] = 0.0  # cavity
    vol[10:14, 10:14, 10:14] = 1.0  # inner shell's solid
    vol[4, 12, 12] = 0.49999  # the gap
    filled, count = M.fill_cavities(vol, 0.5, 0.75)
    assert count > 0 and filled[12, 12, 12] >= 0.5 and filled[7, 7, 7] >= 0.5
    grid = M.Grid(np.zeros(3), 1.0, (n, n, n))
    import trimesh

    v, f = M.extract_isosurface(torch.as_tensor(vol), grid, 0.5, True, 0.75)
    assert trimesh.Trimesh(v, f).body_count == 1


# ---------------------------------------------------------------------------------------------- surface offset
def cube_gaussians(n, std):
    from scoredistill.bench import gt_scenes

    pts, rgb = gt_scenes.surface_points("cube", n)
    return gaussian_init.params_from_points(pts, rgb, init_opacity=0.95, init_scale=std)


def test_surface_offset_is_bounded_for_sparse_and_dense_scenes():
    """The surface sits at the Gaussians whatever their number: 3k and 30k Gaussians of the same std on the cube
    (10x more overlap) give the same offset, about 1.7 std (level at a quarter of the density at the centres;
    measured 1.59 and 1.65 std; main: 2.67 std for the dense one, 2.0 for the sparse one).  With a
    fixed level 0.5 the dense cube came out at +-0.64 for centres at +-0.55 (~3 std, the cutoff)."""
    from scipy.spatial import cKDTree

    std = 0.036
    out = {}
    for n in (30000, 3000):
        params = cube_gaussians(n, std)
        res = M.gaussians_to_mesh(params, resolution=96, texture_size=64, decimate_target=5000, color_knn=4, progress=False)
        dist, _ = cKDTree(params["means"].numpy()).query(np.asarray(res.welded.vertices))
        out[n] = float(dist.mean())
        print(n, "offset / std: mean", dist.mean() / std, "p95", np.quantile(dist, 0.95) / std)
        assert dist.mean() < 1.9 * std and np.quantile(dist, 0.95) < 2.3 * std, (n, dist.mean() / std, np.quantile(dist, 0.95) / std)
        assert res.stats["surface_offset_mean"] == pytest.approx(dist.mean())
        assert res.welded.is_watertight and res.welded.body_count == 1
    assert abs(out[30000] - out[3000]) < 0.4 * std, out


# ---------------------------------------------------------------------------------------------- set-atomic files
def test_full_disk_during_export_leaves_the_previous_set_untouched(export, tmp_path, monkeypatch):
    _, result, _, _ = export
    folder = tmp_path / "out"
    M.write_mesh_files(result, str(folder), "model", ["obj", "glb", "ply"])
    (folder / "gaussians.ply").write_bytes(b"not ours")  # another file in the folder
    before = {p: (folder / p).read_bytes() for p in os.listdir(folder)}
    calls = {"n": 0}
    real_fsync = os.fsync

    def full_disk(fd):  # the third file written hits a full disk
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    # the next export: other geometry (every file's bytes differ from the first set's)
    mesh2, welded2 = result.mesh.copy(), result.welded.copy()
    mesh2.vertices = mesh2.vertices + 0.125
    welded2.vertices = welded2.vertices + 0.125
    res2 = M.MeshResult(mesh2, result.vertex_colors, welded2, result.grid, dict(result.stats, faces=1.0))
    with pytest.raises(OSError, match="No space left"):
        M.write_mesh_files(res2, str(folder), "model", ["obj", "glb", "ply"])
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert {p: (folder / p).read_bytes() for p in os.listdir(folder)} == before  # no mix, no temporaries
    # a rename failing in the swap (the 9th: all 6 old files moved aside, 2 of the new ones in place) puts the
    # old files back
    real_rename, real_replace = os.rename, os.replace
    n = {"k": 0}

    def flaky(real):
        def move(a, b):
            n["k"] += 1
            if n["k"] == 9:
                raise OSError(errno.EIO, "I/O error")
            return real(a, b)
        return move

    monkeypatch.setattr(os, "rename", flaky(real_rename))
    monkeypatch.setattr(os, "replace", flaky(real_replace))
    with pytest.raises(OSError, match="I/O error"):
        M.write_mesh_files(res2, str(folder), "model", ["obj", "glb", "ply"])
    monkeypatch.setattr(os, "rename", real_rename)
    monkeypatch.setattr(os, "replace", real_replace)
    assert {p: (folder / p).read_bytes() for p in os.listdir(folder)} == before
    # a new set without ply/obj removes the old set's other files, never the folder's other files
    M.write_mesh_files(res2, str(folder), "model", ["glb"])
    assert sorted(os.listdir(folder)) == ["gaussians.ply", "model.glb", "model.json"]
    assert json.loads((folder / "model.json").read_text())["stats"]["faces"] == 1.0


# ---------------------------------------------------------------------------------------------- extreme inputs
@pytest.mark.parametrize("field,value", [("scales", 100.0), ("scales", -100.0), ("means", 3e38)])
def test_extreme_finite_values_are_refused_in_one_line(tmp_path, capsys, field, value):
    """From a PLY (the loader's range check or the exporter's, whichever comes first) and in memory (the exporter's,
    as the threestudio exporter calls it): one line naming the input, nothing written, no hang."""
    import re

    from scoredistill.cli import main

    params = sphere_gaussians(n=500)
    params[field][7, 0] = value
    ply = gaussian_ply.save_gaussians_ply(str(tmp_path / "g.ply"), params)
    assert main(["mesh", ply, str(tmp_path / "out"), "--resolution", "32", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scoredistill mesh: ") and ply in err and "\n" not in err, err
    assert re.search(r"scale|std" if field == "scales" else r"mean|x/y/z", err), err
    assert not os.path.exists(tmp_path / "out")
    # the exporter's own check (threestudio's in-memory Gaussians never pass the PLY loader)
    match = (r"the model: 1 visible Gaussian\(s\) have a std outside \[1e-12, 10000\] \(e\.g\. Gaussian 7 with log-scales \[" if field == "scales"
             else r"the model: 1 visible Gaussian\(s\) have a mean beyond \+-100000 \(e\.g\. Gaussian 7 at \[3e\+38")
    with pytest.raises(M.MeshExportError, match=match):
        M.gaussians_to_mesh(params, resolution=32, progress=False)


# ---------------------------------------------------------------------------------------------- help texts
def test_help_texts_list_defaults_and_meanings(capsys):
    from scoredistill.cli import main

    def helptext(*argv):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--help"])
        assert e.value.code == 0
        return " ".join(capsys.readouterr().out.split())

    top = helptext()
    assert "``" not in top and "link THREESTUDIO_ROOT" in top and "mesh GAUSSIANS.ply OUT_DIR" in top
    mesh = helptext("mesh")
    for needle in ["--resolution RESOLUTION grid nodes along the longest side", "(default: 256)", "(default: auto)",
                   "{dc,normal_sh}", "--bounds", "--min-opacity", "(default: 0.005)", "--smooth-iterations",
                   "--fill-interior, --no-fill-interior", "NAME.glb", "NAME.json", "NAME.obj, NAME.mtl, NAME.png",
                   "(default: 30000)", "(default: 1024)", "(default: obj,glb)", "{y,z}", "(default: y)"]:
        assert needle in mesh, needle
    assert "isosurface-threshold" in mesh and "median density" in mesh
    assert "(default: False)" in helptext("link") or "--copy" in helptext("link")
    assert "(default: cpu)" in helptext("suite", "report") and "(default: first)" in helptext("suite", "report")


# ---------------------------------------------------------------------------------------------- Khronos validator
def _validator_prefix():
    return os.environ.get("SCOREDISTILL_NPM_PREFIX", os.path.expanduser("~/.cache/scoredistill-npm"))


def test_khronos_gltf_validator_reports_no_errors_or_warnings(export):
    module = os.path.join(_validator_prefix(), "node_modules", "gltf-validator")
    node = shutil.which("node")
    if node is None or not os.path.isdir(module):
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs the Khronos glTF validator: node ({node}) and npm gltf-validator under {module} (.ci/run installs it)")
        pytest.skip(f"the Khronos glTF validator is not installed (npm install --prefix {_validator_prefix()} gltf-validator)")
    _, _, out, _ = export
    script = (
        "const v = require(process.argv[1]); const fs = require('fs');"
        "v.validateBytes(new Uint8Array(fs.readFileSync(process.argv[2]))).then(r => {"
        "console.log(JSON.stringify({errors: r.issues.numErrors, warnings: r.issues.numWarnings, messages: r.issues.messages}));"
        "}).catch(e => { console.error(e); process.exit(1); });"
    )
    run = subprocess.run([node, "-e", script, module, str(out / "model.glb")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["errors"] == 0 and report["warnings"] == 0, report["messages"]
