"""A non-editable install works without the test suite beside it (issue 25): a fresh virtual environment
(``--system-site-packages`` for the dependencies), the wheel of a copy of the repository WITHOUT ``tests/``
installed into it (``pip install --no-deps``), then, from another folder: ``scoredistill --help``, ``scoredistill mesh`` on the cube's PLY,
and the ground-truth benchmark's ``--quick`` run in its smallest form (one row, 3 steps, 16 prior renders) in a
threestudio tree of its own (the checkout's ``.threestudio`` is linked to this checkout's package)."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from harness import REPO, threestudio_root

pytestmark = [pytest.mark.slow, pytest.mark.threestudio]


def _copy_without_tests(dest):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for f in files:
        if f and not f.startswith("tests/") and os.path.isfile(os.path.join(REPO, f)):
            os.makedirs(os.path.dirname(os.path.join(dest, f)) or dest, exist_ok=True)
            shutil.copy2(os.path.join(REPO, f), os.path.join(dest, f))
    assert not os.path.exists(os.path.join(dest, "tests"))


def _own_threestudio_tree(src, dest):
    """A threestudio work tree sharing ``src``'s files (links) with an empty ``custom/``."""
    os.makedirs(dest)
    for name in os.listdir(src):
        if name == "custom":
            os.makedirs(os.path.join(dest, name))
        else:
            os.symlink(os.path.join(src, name), os.path.join(dest, name))
    return dest


def test_a_wheel_install_runs_help_mesh_and_the_quick_benchmark_without_tests(tmp_path):
    src, venv, run = tmp_path / "src", tmp_path / "venv", tmp_path / "elsewhere"
    t0, seconds = time.time(), {}
    _copy_without_tests(str(src))
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py, exe = str(venv / "bin" / "python"), str(venv / "bin" / "scoredistill")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "THREESTUDIO_ROOT")}
    env.update(HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # the wheel is built with this interpreter's setuptools (a new venv of Python 3.11 carries an old one without
    # bdist_wheel; no build isolation: no download), then installed into the venv as a user would
    wheels = tmp_path / "wheels"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                        str(src)], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    wheel = [str(wheels / w) for w in os.listdir(wheels) if w.startswith("scoredistill-")]
    p = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", *wheel], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    seconds["copy, venv, wheel, install"] = time.time() - t0
    shutil.rmtree(src)  # nothing of the checkout's copy is used after the install
    os.makedirs(run)

    def call(args, **kw):
        t = time.time()
        p = subprocess.run(args, cwd=run, env={**env, **kw}, capture_output=True, text=True, timeout=900)
        seconds[" ".join(os.path.basename(a) for a in args[:3])] = time.time() - t
        assert p.returncode == 0, (args, (p.stdout + p.stderr)[-6000:])
        return p.stdout + p.stderr

    where = call([py, "-c", "import scoredistill, scoredistill.paths as p; print(scoredistill.__file__); "
                            "print(p.CHECKOUT); print(p.CONFIGS)"]).split()
    assert where[0].startswith(str(venv)) and where[1] == "None" and os.path.isfile(os.path.join(where[2], "gs-sds.yaml"))
    assert "mesh" in call([exe, "--help"])
    call([exe, "mesh", os.path.join(REPO, "load", "gt_scenes", "cube.ply"), str(run / "mesh"), "--resolution", "16",
          "--texture-size", "16", "--decimate-target", "200", "--formats", "obj"])  # small: the command, not quality
    assert sorted(os.listdir(run / "mesh")) == ["model.json", "model.mtl", "model.obj", "model.png"]  # model.json: the mesh checks (watertight, components, offset)
    root = _own_threestudio_tree(threestudio_root(), str(tmp_path / "threestudio"))
    out = run / "gt3d"
    call([py, "-m", "scoredistill.bench.gt3d_bench", "--quick", "--rows", "gs-sds (CFG 7.5)", "--steps", "3",
          "--views", "16", "--workers", "1", "--out", str(out)], THREESTUDIO_ROOT=root)
    assert os.path.realpath(os.path.join(root, "custom", "scoredistill")) == os.path.dirname(where[0])
    results = [json.load(open(os.path.join(out, f))) for f in os.listdir(out) if f.startswith("gt3d_results")]
    rows = [r for res in results for r in res]
    assert [(r["row"], r["scene"], r["seed"]) for r in rows] == [("gs-sds (CFG 7.5)", "cube", 0)], rows
    assert "error" not in rows[0] and rows[0]["unet_samples"] > 0, rows[0]
    print({k: round(v, 1) for k, v in seconds.items()}, file=sys.stderr)
