"""``scoredistill demo`` (issue 28, item 7): the first run without a GPU or weights.

The real command, as a newcomer runs it after the README's install: threestudio's launch.py distils the
ground-truth cube with the pack's ``vdm-gs`` config on the CPU; the video, the PLY, the GLB and the page are
there and what they say they are.  Plus: help with defaults, bad settings refused early in one line.
"""
import json
import os
import subprocess
import sys

import pytest

from scoredistill import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_help_lists_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--threestudio PATH", "(default: outputs/demo)", "(default: vdm-gs)", "(default: cube)",
                     "training steps (default: 200)", "components; default: 100)", "32²; default: 128)", "frames; default: 30)",
                     "(default: 96)", "(default: 10.0", "tested at commit 28d9d80"):
        assert expected in text, expected
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be an integer in [1, 100000], got 0"),
    (["--views", "3"], "--views must be an integer in [8, 100000], got 3"),
    (["--lr-scale", "nan"], "--lr-scale must be a finite number > 0, got nan"),
    (["--video-size", "4"], "--video-size must be an integer in [16, 2048], got 4"),
])
def test_demo_refuses_bad_settings_in_one_line(tmp_path, capsys, args, message):
    assert cli.main(["demo", "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"scoredistill demo: {message}"]
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_demo_without_threestudio_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("THREESTUDIO_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--threestudio", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a threestudio work tree" in err[0]
    assert "git clone https://github.com/threestudio-project/threestudio" in err[0] and "checkout 28d9d80" in err[0]


@pytest.mark.threestudio
@pytest.mark.slow
def test_demo_distils_the_cube_through_launch_py_and_writes_video_ply_glb_page(tmp_path):
    """The default demo, run as the README says (a subprocess, the package's own CPU launcher, nothing from
    tests/ on its path)."""
    import imageio.v3 as iio
    import numpy as np
    import torch
    import trimesh

    from harness import threestudio_root
    from scoredistill.geometry.gaussian_ply import load_gaussians_ply

    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.path.join(REPO, "custom")
    proc = subprocess.run([sys.executable, "-m", "scoredistill.cli", "demo", "--threestudio", threestudio_root(),
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads((out / "demo.json").read_text())
    # launch.py ran the pack's config through the package's CPU launcher, nothing from tests/
    assert info["command"][1:4] == ["-m", "scoredistill.demo.cpu_launch", "launch.py"]
    assert info["command"][info["command"].index("--config") + 1] == os.path.join(REPO, "configs", "vdm-gs.yaml")
    assert not any("tests" + os.sep + "harness" in c for c in info["command"])
    assert "demo:" in proc.stderr and "launch.py --train" in proc.stderr  # tqdm progress: stages and steps
    # the video: 30 test views at 128 px (RGB panel first)
    frames = iio.imread(out / "video.mp4")
    assert frames.shape[0] == 30 and frames.shape[1] == 128
    # the PLY: the run's Gaussians, finite
    g = load_gaussians_ply(str(out / "gaussians.ply"))
    assert g["means"].shape[0] > 100 and all(torch.isfinite(v).all() for v in g.values())
    # the GLB: a textured mesh trimesh reads
    scene = trimesh.load(out / "mesh" / "model.glb")
    mesh = scene.dump(concatenate=True) if isinstance(scene, trimesh.Scene) else scene
    assert len(mesh.faces) == info["faces"] > 0
    # the page shows them; the run reconstructed the cube beyond the initial sphere (~9.7 dB at 32 px)
    page = (out / "index.html").read_text()
    for ref in ("src='video.mp4'", "href='gaussians.ply'", "href='mesh/model.glb'", "test/0.png"):
        assert ref in page, ref
    assert np.isfinite(info["psnr"]) and info["psnr"] > 12.0, info["psnr"]
    assert f"{info['psnr']:.2f} dB" in page
    # the interactive 3D view of the Gaussians, when the npm viewer is installed (CI installs it)
    from scoredistill import splat_viewer
    from test_suite import chromium

    if splat_viewer.find_viewer() is not None:
        vpage = out / "gaussians-3d.html"
        assert info["files"]["viewer"] == str(vpage) and "href='gaussians-3d.html'" in page
        if chromium():
            import re

            dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--use-angle=swiftshader",
                                  "--enable-unsafe-swiftshader", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}",
                                  "--virtual-time-budget=20000", "--dump-dom", "file://" + str(vpage)],
                                 capture_output=True, text=True, timeout=180).stdout
            body = re.search(r"<body([^>]*)>", dom).group(1)
            assert 'data-ready="1"' in body and f'data-splat-count="{g["means"].shape[0]}"' in body, body
    print(f"demo: {info['total']:.0f} s (prior {info['t_prior']:.0f}, launch {info['t_launch']:.0f}, mesh "
          f"{info['t_mesh']:.0f}), PSNR {info['psnr']:.2f} dB", file=sys.stderr)


def test_cpu_launcher_serves_stand_ins_only_for_packages_that_are_not_installed(tmp_path, monkeypatch):
    """The package's CPU launcher (not tests/harness): its stand-ins come after every real finder, so an
    installed package always wins; names outside the stand-in set are never served."""
    from scoredistill.demo import cpu_launch

    finder = cpu_launch.StubFinder()
    spec = finder.find_spec("tinycudann", None)
    assert spec is not None and spec.origin.startswith(cpu_launch.STUBS)
    assert finder.find_spec("numpy", None) is None
    # a real "nvdiffrast" on the path wins over the stand-in
    (tmp_path / "nvdiffrast").mkdir()
    (tmp_path / "nvdiffrast" / "__init__.py").write_text("REAL = True\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from scoredistill.demo import cpu_launch; "
            "cpu_launch.install_import_hooks(); import nvdiffrast, tinycudann; "
            "print(getattr(nvdiffrast, 'REAL', False), tinycudann.__file__.startswith(cpu_launch.STUBS))")
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "custom"))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]
