"""Integration: the pack loads in threestudio's launch.py next to all of threestudio's modules."""
import json
import os
import subprocess
import sys

import pytest

import scoredistill
from harness import HERE, STUBS, link_pack, threestudio_root

pytestmark = pytest.mark.threestudio

# threestudio-3dgs registers these; the pack must never take them (../shared/METHODS.md section 6)
THREESTUDIO_3DGS_NAMES = {"gaussian-splatting", "diff-gaussian-rasterizer", "gaussian-splatting-system", "gaussian-mesh-exporter"}

_PROBE = r"""
import json, os, sys
sys.path.insert(0, {here!r})
import cpu_launch
cpu_launch.install()
sys.argv = ["launch.py"]
sys.path.insert(0, os.getcwd())
import launch
import threestudio
builtin = set(threestudio.__modules__)
ok = launch.load_custom_modules()
import scoredistill
names = dict(scoredistill.REGISTERED_NAMES)
found = {{n: threestudio.find(n).__module__ + "." + threestudio.find(n).__qualname__ for n in names}}
# a second, normal import path must not double-register (launch.py loaded it as custom/scoredistill)
scoredistill.register_with_threestudio()
print("RESULT" + json.dumps({{"builtin": sorted(builtin), "names": names, "found": found}}))
"""


def test_pack_loads_in_launch_py_without_import_failure():
    root = threestudio_root()
    link_pack(root)
    env = dict(os.environ, PYTHONPATH=STUBS, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(here=HERE)], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "IMPORT FAILED" not in out, out[-6000:]
    assert "custom/scoredistill" in out  # launch.py reported importing the pack
    result = json.loads(out.split("RESULT", 1)[1].splitlines()[0])
    names = result["names"]
    assert names, "the pack registered nothing"
    assert not set(names) & set(result["builtin"]), "a pack name collides with threestudio"
    assert not set(names) & THREESTUDIO_3DGS_NAMES, "a pack name collides with threestudio-3dgs"
    for name, ident in names.items():
        assert result["found"][name].endswith(ident), (name, result["found"][name], ident)


# The runtime never imports the tooling (docs/architecture.md): after launch.py's own loading of custom/ and a
# normal `import scoredistill`, no benchmark, suite, test-model, demo, CLI or test-suite module is loaded.  The
# probe runs behind the harness' CPU launcher as __main__ (by path), so the launcher itself is no imported module.
_TOOLING_PROBE = r"""
import json, os, re, sys
sys.path.insert(0, os.getcwd())
sys.argv = ["launch.py"]
import launch
ok = launch.load_custom_modules()
import scoredistill
tooling = re.compile(r"scoredistill\.(bench|suite|testing|demo|cli)(\.|$)")
tests_dir = os.path.realpath({tests!r}) + os.sep
loaded = sorted(n for n, m in list(sys.modules.items())
                if tooling.match(n) or (n not in ("__main__", "__mp_main__") and
                                        os.path.realpath(str(getattr(m, "__file__", None) or "")).startswith(tests_dir)))
print("RESULT" + json.dumps({{"file": scoredistill.__file__, "names": sorted(scoredistill.REGISTERED_NAMES),
                             "loaded": loaded}}))
"""


def test_loading_the_pack_imports_no_tooling_and_no_test_module(tmp_path):
    root = threestudio_root()
    link_pack(root)
    probe = tmp_path / "probe.py"
    probe.write_text(_TOOLING_PROBE.format(tests=os.path.dirname(HERE)))
    pack = os.path.dirname(os.path.dirname(os.path.abspath(scoredistill.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([STUBS, pack]), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "cpu_launch.py"), str(probe)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "IMPORT FAILED" not in out, out[-6000:]
    result = json.loads(out.split("RESULT", 1)[1].splitlines()[0])
    assert os.path.realpath(result["file"]).startswith(os.path.realpath(pack)), result["file"]  # this checkout's pack
    assert "gsplat-system" in result["names"]  # the pack did register
    assert result["loaded"] == [], result["loaded"]
