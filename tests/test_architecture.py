"""The two wings of the pack (docs/architecture.md): the runtime that threestudio loads never imports the tooling,
the tooling never imports the test suite, and no import cycle joins the command line and the suite runner.

Static checks over the source of ``custom/scoredistill`` (fast, no torch); the loaded-modules check after
threestudio's own loading is in ``test_threestudio_loading.py``."""
import ast
import json
import os
import re

import pytest

PACK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "custom", "scoredistill")
RUNTIME = ("guidance", "maths", "integrity", "sync", "geometry", "renderer", "system", "exporter", "distributed",
           "validation", "settings", "atomic_io", "_registry", "__init__", "paths")
TOOLING = ("bench", "suite", "testing", "demo", "cli")


def _files(part):
    path = os.path.join(PACK, part)
    if os.path.isdir(path):
        for d, _, names in os.walk(path):
            for n in sorted(names):
                if n.endswith(".py") and "cpu_stubs" not in d:
                    yield os.path.join(d, n)
    elif os.path.isfile(path + ".py"):
        yield path + ".py"


def _imported_parts(path):
    """Top-level parts of the pack (``bench``, ``guidance``, ...) that ``path`` imports, statically or through
    ``importlib.import_module`` with a literal / f-string module name."""
    rel = os.path.relpath(path, PACK).replace(os.sep, "/")
    here = rel.split("/")[:-1]
    src = open(path).read()
    parts = set()
    for node in ast.walk(ast.parse(src)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = ["scoredistill"] + here[: len(here) - (node.level - 1)]
                if node.module:
                    names = [".".join(base + node.module.split("."))]
                else:
                    names = [".".join(base + [a.name]) for a in node.names]
            else:
                names = [node.module or ""]
        for n in names:
            if n.startswith("scoredistill."):
                parts.add(n.split(".")[1])
    for m in re.finditer(r"import_module\(\s*f?[\"']([^\"']+)[\"']", src):
        for p in TOOLING:
            if re.search(rf"(^|[.}}]){p}(\.|$)", m.group(1)):
                parts.add(p)
    return parts


@pytest.mark.parametrize("part", RUNTIME)
def test_the_runtime_imports_no_tooling(part):
    bad = {os.path.relpath(f, PACK): sorted(_imported_parts(f) & set(TOOLING)) for f in _files(part)}
    assert {k: v for k, v in bad.items() if v} == {}


def test_no_cycle_between_the_command_line_and_the_suite_runner():
    cli = _imported_parts(os.path.join(PACK, "cli.py"))
    suite = {f: _imported_parts(f) for f in _files("suite")}
    assert "suite" in cli  # the command line does run suites ...
    assert {os.path.relpath(f, PACK): "cli" for f, parts in suite.items() if "cli" in parts} == {}  # ... not back


def test_no_pack_file_reaches_into_the_test_suite():
    pattern = re.compile(r"""from harness import|import harness|["']tests["']|tests/harness""")
    hits = set()
    for d, _, names in os.walk(PACK):
        for n in names:
            if n.endswith((".py", ".md")):
                p = os.path.join(d, n)
                if pattern.search(open(p).read()):
                    hits.add(os.path.relpath(p, PACK).replace(os.sep, "/"))
    assert hits == set()


def test_guidances_and_run_integrity_find_no_system_through_the_call_stack():
    """Run integrity is attached by explicit relations (scoredistill.integrity): the system calls it, or the
    guidance attaches to the module holding it; no frame of a caller is read (guidance/base.py and
    checkpointing.py walked the frames for ``self`` before)."""
    pattern = re.compile(r"currentframe|_getframe|\bf_back\b|f_locals")
    hits = {os.path.relpath(f, PACK): sorted(set(pattern.findall(open(f).read())))
            for part in ("guidance", "integrity") for f in _files(part)}
    assert {k: v for k, v in hits.items() if v} == {}


def test_the_launch_wrapper_imports_exactly_the_pack_modules_a_model_folder_names(tmp_path):
    from scoredistill.testing.gt_prior_launch import pack_modules_named

    prior = tmp_path / "prior"
    prior.mkdir()
    (prior / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "unet": ["scoredistill.testing.gt_prior3d", "GroundTruthUNet"],
        "vae": ["scoredistill.testing.gt_prior3d", "GroundTruthVAE"]}))
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    argv = ["--config", "x.yaml", f"system.guidance.pretrained_model_name_or_path={prior}",
            f"system.prompt_processor.pretrained_model_name_or_path={sd}", f"system.other_path={prior}",
            "system.guidance.pretrained_model_name_or_path=/no/such/folder"]
    assert pack_modules_named(argv) == ["scoredistill.testing.gt_prior3d"]
    assert pack_modules_named(argv[3:]) == []


def test_the_cpu_launcher_imports_the_prior_module_a_model_folder_names(tmp_path):
    """``scoredistill demo --method gs-sds`` runs threestudio's own guidance on the ground-truth prior through the
    CPU launcher; diffusers finds the prior's classes only in an imported module, and the runtime no longer imports
    it (this failed with "scoredistill.testing.gt_prior3d ... has not been imported")."""
    import subprocess
    import sys

    prior = tmp_path / "prior"
    prior.mkdir()
    (prior / "model_index.json").write_text(json.dumps({"unet": ["scoredistill.testing.gt_prior3d", "GroundTruthUNet"]}))
    root = tmp_path / "ts"
    root.mkdir()
    (root / "launch.py").write_text("import sys\nprint('LOADED', 'scoredistill.testing.gt_prior3d' in sys.modules)\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(PACK))
    for folder, expected in ((prior, "LOADED True"), (tmp_path, "LOADED False")):
        p = subprocess.run([sys.executable, os.path.join(PACK, "testing", "cpu_launch.py"), "launch.py",
                            f"system.guidance.pretrained_model_name_or_path={folder}"], cwd=root, env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 and expected in p.stdout, p.stdout + p.stderr
