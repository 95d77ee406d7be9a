"""Issue 24 (reliability): one test per finding that was still open, each failing on the code before the fix
(the "before:" note of each test says how).  The mesh-exporter findings and ``weights_only`` in the 3D
benchmark are tested where they were fixed (tests/test_gaussian_mesh*.py, tests/test_gt3d_launch.py)."""
import csv
import fcntl
import io
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from scoredistill import cli
from scoredistill.geometry import gaussian_init, gaussian_ply
from scoredistill.suite import report, runner, spec, state

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from test_suite import calls, fake_suite  # noqa: E402


def _cli(args, tmp_path, timeout=60):
    """``scoredistill ...`` in a child process (a hang fails the test instead of hanging it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "custom"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "scoredistill.cli", *args], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(out, *needles):
    assert out.returncode == 2, out.stdout + out.stderr
    err = out.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


# ------------------------------------------------------------------------------ suite: paths confined
@pytest.mark.parametrize("where,override,setting", [
    ("suite", "tag=../../../../x", "suite.overrides[1]"),
    ("suite", "exp_root_dir=/tmp/elsewhere", "suite.overrides[1]"),
    ("config", "name=../../up", "suite.configs[0].overrides[0]"),
    ("config", "trial_dir=/tmp/t", "suite.configs[0].overrides[0]"),
    ("suite", "+use_timestamp=true", "suite.overrides[1]"),
])
def test_overrides_that_move_the_trial_out_of_output_dir_are_refused(tmp_path, where, override, setting):
    # before: accepted; the trial was written outside output_dir and the run was "failed: no test video" forever
    path = fake_suite(tmp_path, ["a cat"], configs=("a",), gpus=(0,), overrides=["trainer.max_steps=3"])
    import yaml

    data = yaml.safe_load(open(path))
    if where == "suite":
        data["overrides"].append(override)
    else:
        data["configs"][0]["overrides"] = [override]
    open(path, "w").write(yaml.safe_dump(data))
    key = override.split("=")[0].lstrip("+")
    with pytest.raises(spec.SuiteError, match=rf"^{__import__('re').escape(setting)}: .*overrides {key}, which the "
                                              "suite runner sets"):
        spec.load_suite(path)
    assert calls(tmp_path) == []


def test_a_run_folder_that_is_a_symlink_out_of_output_dir_is_refused(tmp_path):
    # before: the runner followed the link and wrote run.json, state.json, logs and the trial outside output_dir
    path = fake_suite(tmp_path, ["a cat"], configs=("a",), gpus=(0,))
    suite = spec.load_suite(path)
    r = suite.runs()[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    os.makedirs(os.path.dirname(r.run_dir))
    os.symlink(outside, r.run_dir)
    with pytest.raises(spec.SuiteError, match=r"^suite.output_dir: the folder of run a/.* resolves to .*outside"):
        suite.runs()
    assert os.listdir(outside) == []


# ------------------------------------------------------------------------------ suite: worker count
@pytest.mark.parametrize("gpus", [",", "abc", "0,,1", "-1", "0,0"])
def test_gpus_option_is_validated(tmp_path, gpus):
    # before: `--gpus ,` started 0 workers and hung for ever (ignoring SIGTERM); `--gpus abc` a ValueError traceback
    path = fake_suite(tmp_path, ["a cat"], configs=("a",), gpus=(0,))
    out = _cli(["suite", "run", path, "--gpus", gpus], tmp_path, timeout=30)
    _one_line_error(out, "scoredistill suite: --gpus: ", repr(gpus))
    assert calls(tmp_path) == []


def test_negative_gpu_in_the_suite_file_is_refused(tmp_path):
    path = fake_suite(tmp_path, ["a cat"], configs=("a",), gpus=(-1,))
    with pytest.raises(spec.SuiteError, match=r"^suite.gpus: expected a non-empty list of GPU indices >= 0"):
        runner.run_local(spec.load_suite(path), log=lambda *a: None)


# ------------------------------------------------------------------------------ suite: one lock per run
def test_a_run_held_by_another_runner_or_job_is_left_alone(tmp_path):
    # before: execute_run took no lock: a submitit job and a local runner launched the same run into one trial
    # folder, and the second removed the live folder under the first
    path = fake_suite(tmp_path, ["a cat"], configs=("a",), gpus=(0,))
    suite = spec.load_suite(path)
    runner.write_manifest(suite, suite.runs(), log=lambda *a: None)
    r = suite.runs()[0]
    os.makedirs(os.path.join(r.trial_dir, "save"))
    live = os.path.join(r.trial_dir, "save", "live-file")
    open(live, "w").write("the other job's output")
    with open(os.path.join(r.run_dir, ".run.lock"), "a") as held:  # what the other job's execute_run holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lines = []
        st = runner.execute_run(r, gpu="0")
        states = runner.run_local(suite, log=lines.append)
    assert calls(tmp_path) == [] and os.path.isfile(live)
    assert "left alone" in st["note"] and states[r.run_id]["status"] == "pending"
    assert sum("running under another runner or job" in ln for ln in lines) == 1
    # released: the run runs
    assert runner.run_local(suite, log=lambda *a: None)[r.run_id]["status"] == "done"


def test_submitit_runner_beside_a_local_runner_does_not_launch_the_run_twice(tmp_path):
    # before: the submitit path took no lock: the run was launched a second time into the same trial folder
    path = fake_suite(tmp_path, ["slow SLEEP8"], configs=("a",), gpus=(0,), slurm={"gpus_per_node": 0})
    suite = spec.load_suite(path)
    r = suite.runs()[0]
    runner.run_submitit(suite, cluster="local", wait=False, log=lambda *a: None)
    import time

    t0 = time.time()
    while not os.path.exists(os.path.join(r.run_dir, "fake-invocations")):
        assert time.time() - t0 < 120
        time.sleep(0.1)
    lines = []
    states = runner.run_local(suite, log=lines.append)  # while the submitit job runs the run
    assert any("running under another runner or job" in ln for ln in lines), lines
    assert states[r.run_id]["status"] in ("queued", "running")
    t0 = time.time()
    while json.load(open(os.path.join(r.run_dir, "state.json"))).get("status") != "done":
        assert time.time() - t0 < 120
        time.sleep(0.2)
    assert len(calls(tmp_path)) == 1 and state.read_state(r.run_dir)["attempt"] == 1


def test_submission_holds_the_runner_lock(tmp_path):
    # before: run_submitit took no lock, so two submissions (or one beside a local runner) raced
    path = fake_suite(tmp_path, ["a cat"], configs=("a",), gpus=(0,))
    suite = spec.load_suite(path)
    os.makedirs(suite.output_dir)
    with open(os.path.join(suite.output_dir, ".runner.lock"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RuntimeError, match="another suite runner holds .*.runner.lock"):
            runner.run_submitit(suite, cluster="debug", log=lambda *a: None)
    assert calls(tmp_path) == []


# ------------------------------------------------------------------------------ suite: per-run state errors
def test_a_non_json_state_file_fails_that_run_not_the_runner(tmp_path, capsys):
    # before: json.JSONDecodeError aborted the whole runner (and `suite status`, and the report)
    path = fake_suite(tmp_path, ["good one", "bad state"], configs=("a",), gpus=(0,))
    suite = spec.load_suite(path)
    bad = next(r for r in suite.runs() if r.prompt == "bad state")
    os.makedirs(bad.run_dir)
    open(os.path.join(bad.run_dir, "state.json"), "w").write("{not json")
    assert cli.main(["suite", "run", path]) == 1
    out = capsys.readouterr().out
    assert state.read_state(next(r for r in suite.runs() if r.prompt == "good one").run_dir)["status"] == "done"
    assert f"failed: {bad.run_id} ({os.path.join(bad.run_dir, 'state.json')} is not a readable JSON file" in out
    assert f"failed: {bad.run_id}" in out and os.path.join(bad.run_dir, "state.json") in out
    assert open(os.path.join(bad.run_dir, "state.json")).read() == "{not json"  # nothing written over it
    assert len(calls(tmp_path)) == 1
    assert cli.main(["suite", "status", suite.output_dir]) == 0
    rows = list(csv.DictReader(open(report.write_report(suite.output_dir, clip_models=[], log=lambda *a: None)["csv"])))
    assert {r["prompt"]: r["status"] for r in rows} == {"good one": "done", "bad state": "failed"}


# ------------------------------------------------------------------------------ suite: symbolic links
def test_a_trial_folder_that_is_a_symlink_is_replaced_not_followed(tmp_path):
    # before: "Cannot call rmtree on a symbolic link" aborted the runner
    path = fake_suite(tmp_path, ["a cat"], configs=("a",), gpus=(0,))
    suite = spec.load_suite(path)
    r = suite.runs()[0]
    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    os.makedirs(os.path.dirname(r.trial_dir))
    os.symlink(target, r.trial_dir)
    lines = []
    assert runner.run_local(suite, log=lines.append)[r.run_id]["status"] == "done"
    assert (target / "keep.txt").read_text() == "keep" and sorted(os.listdir(target)) == ["keep.txt"]
    assert not os.path.islink(r.trial_dir) and os.path.isfile(os.path.join(r.trial_dir, "save", "it2-test.mp4"))
    assert any("is a symbolic link" in ln and "removing the link, not its target" in ln for ln in lines)


def test_a_runner_lock_symlinked_elsewhere_is_refused_and_its_target_kept(tmp_path):
    # before: open(".runner.lock", "w") followed the link and truncated its target
    path = fake_suite(tmp_path, ["a cat"], configs=("a",), gpus=(0,))
    suite = spec.load_suite(path)
    os.makedirs(suite.output_dir)
    victim = tmp_path / "victim.txt"
    victim.write_text("important")
    os.symlink(victim, os.path.join(suite.output_dir, ".runner.lock"))
    out = _cli(["suite", "run", path], tmp_path)
    _one_line_error(out, "suite.output_dir: ", ".runner.lock is a symbolic link", "refusing to write through it")
    assert victim.read_text() == "important" and calls(tmp_path) == []


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_log_symlinked_elsewhere_fails_the_run_and_keeps_its_target(tmp_path, what):
    # before: open(log, "w") truncated the link's target and wrote launch.py's output into it (or into the
    # folder logs/ links to)
    path = fake_suite(tmp_path, ["a cat", "a dog"], configs=("a",), gpus=(0,))
    suite = spec.load_suite(path)
    cat = next(r for r in suite.runs() if r.prompt == "a cat")
    victim = tmp_path / "victim.txt"
    victim.write_text("important")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if what == "file":
        os.makedirs(os.path.join(cat.run_dir, "logs"))
        os.symlink(victim, os.path.join(cat.run_dir, "logs", "attempt-1.log"))
    else:
        os.makedirs(cat.run_dir)
        os.symlink(elsewhere, os.path.join(cat.run_dir, "logs"))
    states = runner.run_local(suite, log=lambda *a: None)
    assert victim.read_text() == "important" and os.listdir(elsewhere) == []
    assert states[cat.run_id]["status"] == "failed"
    assert ("attempt-1.log" if what == "file" else "logs") + " is a symbolic link" in states[cat.run_id]["reason"]
    assert states[next(r.run_id for r in suite.runs() if r.prompt == "a dog")]["status"] == "done"


# ------------------------------------------------------------------------------ suite: CSV, logged command
def test_csv_cells_that_would_be_formulas_are_escaped(tmp_path):
    # before: the prompt was written raw; a spreadsheet ran =HYPERLINK(...)
    prompts = ['=HYPERLINK("http://x.invalid","click")', "+1 cat", "-2 dogs", "@SUM(A1)", "a plain prompt"]
    rows = [{"run_id": f"a/{i}", "prompt": p, "clip_x": -0.25} for i, p in enumerate(prompts)]
    text = report.to_csv(rows, ["clip_x"])
    got = list(csv.DictReader(io.StringIO(text)))
    assert [r["prompt"] for r in got] == ["'" + p for p in prompts[:4]] + ["a plain prompt"]
    assert all(r["clip_x"] == "-0.25" for r in got)  # numbers stay numbers


def test_the_logged_command_is_shell_quoted(tmp_path):
    # before: " ".join(cmd): pasting the line ran the prompt's $(...) and split it into several arguments
    marker = tmp_path / "pwned"
    prompt = f"a cat $(touch {marker}) 'quoted' \"double\""
    path = fake_suite(tmp_path, [prompt], configs=("a",), gpus=(0,))
    suite = spec.load_suite(path)
    st = runner.run_local(suite, log=lambda *a: None)[suite.runs()[0].run_id]
    first = open(st["log"]).readline().rstrip("\n")
    prompt_arg = next(a for a in st["command"] if a.startswith("system.prompt_processor.prompt="))
    assert shlex.quote(prompt_arg) in first and shlex.quote(prompt_arg) != prompt_arg
    assert first.startswith("$ ")
    cd_part, cmd_part = first[2:].split(" && ", 1)
    assert shlex.split(cd_part) == ["cd", suite.threestudio_root]
    assert shlex.split(cmd_part) == st["command"]
    subprocess.run(["bash", "-c", "echo " + cmd_part], check=True, capture_output=True)  # as if pasted
    assert not marker.exists()


# ------------------------------------------------------------------------------ suite: one-line CLI errors
def test_malformed_suite_yaml_is_a_one_line_error(tmp_path):
    # before: a yaml.scanner.ScannerError traceback
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nprompts: [a, b\nconfigs: [pack:gs-sds]\n")
    _one_line_error(_cli(["suite", "run", str(path)], tmp_path), f"suite: {path} is not valid YAML (line ")


@pytest.mark.parametrize("out_dir", ["/dev/null/x", "READONLY/out"])
def test_an_unwritable_output_folder_is_a_one_line_error(tmp_path, out_dir):
    # before: NotADirectoryError / PermissionError tracebacks
    if out_dir.startswith("READONLY"):
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        ro = tmp_path / "READONLY"
        ro.mkdir()
        ro.chmod(0o555)
        out_dir = str(tmp_path / out_dir)
    path = fake_suite(tmp_path, ["a cat"], configs=("a",), gpus=(0,), output_dir=out_dir)
    _one_line_error(_cli(["suite", "run", path], tmp_path), f"suite.output_dir: cannot create {out_dir}")


# ------------------------------------------------------------------------------ PLY inputs
def _params(n=5, degree=0):
    g = torch.Generator().manual_seed(0)
    return {"means": torch.randn(n, 3, generator=g), "scales": torch.randn(n, 3, generator=g) - 3,
            "quats": torch.randn(n, 4, generator=g), "opacities": torch.randn(n, generator=g),
            "sh0": torch.randn(n, 1, 3, generator=g), "shN": torch.randn(n, (degree + 1) ** 2 - 1, 3, generator=g)}


@pytest.mark.parametrize("key,value,match", [
    ("scales", 100.0, r"scale_\* \(log-scales\) of 1 Gaussians outside \[-40, 20\] \(min .*, max 100\)"),
    ("scales", -200.0, r"scale_\* \(log-scales\) of 1 Gaussians outside \[-40, 20\]"),
    ("means", 3e38, r"x/y/z of 1 Gaussians beyond \+-1e\+06"),
])
def test_ply_values_out_of_range_are_refused_naming_the_file(tmp_path, key, value, match):
    # before: log-scale 100 -> OverflowError in `scoredistill mesh` (a crash mid-training as init_path);
    # means at 3e38 -> xatlas hung for over 10 minutes
    p = _params()
    p[key][2, 1] = value
    path = gaussian_ply.save_gaussians_ply(str(tmp_path / "extreme.ply"), p)
    with pytest.raises(ValueError, match=r"^system.geometry.init_path = '.*extreme.ply': the PLY holds values out "
                                         r"of range: " + match):
        gaussian_ply.load_gaussians_ply(path, setting="system.geometry.init_path")


@pytest.mark.threestudio
def test_an_extreme_ply_as_init_path_is_refused_when_the_geometry_is_built(threestudio_module, tmp_path):
    # before: accepted; the run crashed mid-training (exp(100) overflows float32)
    p = _params()
    p["scales"][4, 2] = 100.0
    path = gaussian_ply.save_gaussians_ply(str(tmp_path / "init.ply"), p)
    with pytest.raises(ValueError, match=r"^system.geometry.init_path = '.*init.ply': the PLY holds values out of "
                                         r"range: scale_\* \(log-scales\) of 1 Gaussians"):
        threestudio_module.find("gsplat-gaussian-splatting")({"init": "ply", "init_path": path})


def test_all_zero_rotation_is_refused(tmp_path):
    p = _params()
    p["quats"][1] = 0.0
    path = gaussian_ply.save_gaussians_ply(str(tmp_path / "q.ply"), p)
    with pytest.raises(ValueError, match=r"q.ply'?: the PLY holds values out of range: rot_\* of 1 Gaussians all zero"):
        gaussian_ply.load_gaussians_ply(path)


def test_f_rest_count_that_is_no_sh_degree_names_the_file(tmp_path):
    # before: "17 SH coefficients per channel is not a square number", without the file
    from plyfile import PlyData, PlyElement

    props = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(48)] + \
        ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    arr = np.zeros(2, dtype=[(p, "<f4") for p in props])
    arr["rot_0"] = 1
    path = str(tmp_path / "odd.ply")
    PlyData([PlyElement.describe(arr, "vertex")]).write(path)
    for fn in (lambda: gaussian_ply.load_gaussians_ply(path, setting="system.source_ply"),
               lambda: gaussian_ply.ply_sh_degree(path, setting="system.source_ply")):
        with pytest.raises(ValueError, match=r"^system.source_ply = '.*odd.ply': 48 f_rest_\* properties \(17 SH "
                                             r"coefficients per channel\) is not an SH degree 0..3"):
            fn()


def test_mesh_cli_refuses_an_extreme_ply_in_one_line(tmp_path):
    # before: OverflowError traceback
    p = _params()
    p["scales"][0, 0] = 100.0
    path = gaussian_ply.save_gaussians_ply(str(tmp_path / "big.ply"), p)
    _one_line_error(_cli(["mesh", path, str(tmp_path / "out")], tmp_path, timeout=300), "big.ply",
                    "log-scales) of 1 Gaussians outside [-40, 20]")
    assert not os.path.exists(tmp_path / "out" / "model.obj")


# ------------------------------------------------------------------------------ resume: finite parameters
def test_resume_refuses_a_checkpoint_with_nan_parameters_naming_the_tensor():
    # before: accepted; every step was skipped, the run exited 0 and wrote a PLY of NaNs
    from scoredistill.integrity.checkpointing import CHECKPOINT_KEY, check_resume_compatible

    class S:
        cfg = {}

    means = torch.zeros(10, 3)
    means[3, 1] = float("nan")
    ckpt = {"state_dict": {"geometry.params.means": means, "geometry.params.scales": torch.zeros(10, 3)},
            CHECKPOINT_KEY: {}, "optimizer_states": [{"state": {0: {"exp_avg": torch.full((2,), float("inf"))}}}]}
    with pytest.raises(ValueError) as e:
        check_resume_compatible(S(), ckpt, "/t/ckpts/last.ckpt")
    msg = str(e.value)
    assert msg.startswith("resume=/t/ckpts/last.ckpt: this checkpoint cannot be resumed")
    assert "state_dict['geometry.params.means']: 1 of 30 values" in msg
    assert "optimizer_states[0]['state'][0]['exp_avg']: 2 of 2 values" in msg and "scales" not in msg
    ckpt["state_dict"]["geometry.params.means"] = torch.zeros(10, 3)
    ckpt["optimizer_states"] = []
    check_resume_compatible(S(), ckpt, "/t/ckpts/last.ckpt")  # finite: accepted


# ------------------------------------------------------------------------------ launch.py settings
def _system_cfg(config, *overrides):
    from threestudio.utils.config import load_config

    return load_config(os.path.join(REPO, "configs", config), cli_args=list(overrides), n_gpus=0).system


@pytest.mark.threestudio
@pytest.mark.parametrize("override,match", [
    ("system.guidance_type=no-such-guidance",
     r"^system.guidance_type: 'no-such-guidance' is not a registered threestudio guidance; registered: .*vdm-guidance"),
    ("system.geometry_type=no-such-geometry", r"^system.geometry_type: 'no-such-geometry' is not a registered"),
    ("system.optimizer.args.lr=abc", r"^system.optimizer.args.lr must be a finite number > 0, got 'abc'"),
    ("system.optimizer.args.lr=-1", r"^system.optimizer.args.lr must be a finite number > 0, got -1"),
    ("system.optimizer.args.lr=0", r"^system.optimizer.args.lr must be a finite number > 0, got 0"),
    ("system.optimizer.name=NoSuchOpt", r"^system.optimizer.name must be a torch.optim optimizer"),
    ("system.loss.lambda_sds=-1", r"^system.loss.lambda_sds must be >= 0 \(a loss weight; 0 turns the term off\)"),
    ("system.loss.lambda_sparsity=[0,1.0,-2.0,100]", r"^system.loss.lambda_sparsity must be >= 0"),
    ("system.strategy.refine_start_iter=500 system.strategy.refine_stop_iter=10",
     r"^system.strategy.refine_start_iter \(500\) must be <= system.strategy.refine_stop_iter \(10\)"),
    ("system.strategy.reset_every=1 system.strategy.refine_every=100",
     r"^system.strategy.reset_every \(1\) must be >= system.strategy.refine_every \(100\)"),
])
def test_launch_settings_are_refused_in_configure_naming_the_setting(threestudio_module, monkeypatch, override, match):
    # before: KeyError / TypeError / torch's "Invalid learning rate" without the setting, or silently accepted
    monkeypatch.setattr(gaussian_init, "run_shap_e", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Shap-E ran first")))
    cfg = _system_cfg("vdm-gs.yaml", "system.prompt_processor.prompt=a red ball", *override.split())
    with pytest.raises(ValueError, match=match):
        threestudio_module.find("gsplat-system")(cfg)


@pytest.mark.threestudio
def test_densify_off_resets_off_and_group_lrs(threestudio_module):
    from scoredistill import validation as V
    from scoredistill.geometry.densify import check_strategy_schedule

    check_strategy_schedule({"type": "none", "refine_start_iter": 500, "refine_stop_iter": 10})
    check_strategy_schedule({"opacity_reset": False, "reset_every": 1, "refine_every": 100})
    V.check_loss_weights({"lambda_sds": 0.0, "lambda_opaque": [10000, 0.0, 1000.0, 10001]})
    with pytest.raises(ValueError, match=r"^system.optimizer.params.geometry.scales.lr must be a finite number > 0, got 0"):
        V.check_optimizer_settings({"name": "Adam", "args": {"lr": 1e-3}, "params": {"geometry.scales": {"lr": 0}}})


@pytest.mark.threestudio
def test_a_prompt_over_the_text_encoders_77_tokens_is_refused_before_sd_loads(threestudio_module, tiny_sd):
    # before: the tokenizer/text encoder failed in on_fit_start, after Stable Diffusion had loaded
    long_prompt = " ".join(["a"] * 70)  # 72 tokens alone; 77 + with ", overhead view"
    cfg = _system_cfg("vdm-gs.yaml", f"system.prompt_processor.prompt={long_prompt}",
                      f"system.prompt_processor.pretrained_model_name_or_path={tiny_sd}",
                      "system.guidance.pretrained_model_name_or_path=/nonexistent-sd", "system.geometry.init=sphere")
    with pytest.raises(ValueError, match=r"^system.prompt_processor.prompt is \d+ tokens in its view-dependent form "
                                         r"'a a .*, overhead view', start and end tokens included; the text encoder "
                                         r"of .* takes at most 77"):
        threestudio_module.find("gsplat-system")(cfg)
    ok = _system_cfg("vdm-gs.yaml", "system.prompt_processor.prompt=a red ball",
                     f"system.prompt_processor.pretrained_model_name_or_path={tiny_sd}", "system.geometry.init=sphere",
                     "system.geometry.num_points=8", "system.geometry.upsample_to=0")
    threestudio_module.find("gsplat-system")(ok)


class _Trainer:
    def __init__(self, **data):
        from threestudio.data.uncond import RandomCameraDataModule

        self.datamodule = RandomCameraDataModule({"batch_size": 2, "width": 32, "height": 32, **data})
        self.callbacks = []


@pytest.mark.threestudio
@pytest.mark.parametrize("data,match", [
    ({"batch_size": 0}, r"^data.batch_size must be an integer >= 1"),
    ({"batch_size": -1}, r"^data.batch_size must be an integer >= 1"),
    ({"width": 0, "height": 0}, r"^data.width must be an integer >= 1"),
    ({"height": 0}, r"^data.height must be an integer >= 1"),
    ({"fovy_range": [0, 0]}, r"^data.fovy_range must be \[lo, hi\], two finite numbers with lo <= hi in \(0, 180\)"),
    ({"fovy_range": [70, 40]}, r"^data.fovy_range must be"),
    ({"camera_distance_range": [0.0, 1.0]}, r"^data.camera_distance_range must be"),
    ({"eval_height": 0}, r"^data.eval_height must be an integer >= 1"),
    ({"width": [32, 64]}, r"^data.width has 2 entries but data.resolution_milestones gives 1 stages"),
])
def test_data_settings_are_refused_in_the_systems_setup_hook(threestudio_module, data, match):
    # before: accepted; they failed (or rendered NaN cameras) mid-training
    from scoredistill.validation import defer_config_snapshot

    with pytest.raises(ValueError, match=match):
        defer_config_snapshot(_Trainer(**data))
    assert defer_config_snapshot(_Trainer()) == 0  # valid: nothing refused


@pytest.mark.threestudio
def test_data_settings_are_refused_in_configure_under_launch_py(threestudio_module, monkeypatch):
    # launch.py makes `dm` and then the system: the system's configure finds it and checks data.* before Shap-E
    from threestudio.data.uncond import RandomCameraDataModule

    monkeypatch.setattr(gaussian_init, "run_shap_e", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Shap-E ran first")))
    cfg = _system_cfg("vdm-gs.yaml", "system.prompt_processor.prompt=a red ball")
    dm = RandomCameraDataModule({"batch_size": 0})  # noqa: F841  (what launch.py holds while building the system)
    with pytest.raises(ValueError, match=r"^data.batch_size must be an integer >= 1"):
        threestudio_module.find("gsplat-system")(cfg)


@pytest.mark.threestudio
@pytest.mark.slow
def test_data_batch_size_zero_through_launch_is_refused_before_sd_loads(tiny_sd, tmp_path):
    # before: the run started, loaded SD and failed mid-training
    from harness import gs_cpu_overrides, run_launch, tiny_overrides

    overrides = tiny_overrides(tiny_sd, *gs_cpu_overrides(num_points=50, batch_size=1), prompt="a red ball",
                               max_steps=1) + ["data.batch_size=0",
                                               "system.guidance.pretrained_model_name_or_path=/nonexistent-sd"]
    with pytest.raises(RuntimeError) as e:
        run_launch(os.path.join(REPO, "configs", "vdm-gs.yaml"), overrides, exp_root=str(tmp_path))
    msg = str(e.value)
    assert "ValueError: data.batch_size must be an integer >= 1 (or a list of them, one per data.resolution_milestones stage), got 0" in msg
    assert "nonexistent-sd" not in msg  # the guidance (SD) was never loaded
    assert not any(n.endswith(".ckpt") for _, _, f in os.walk(tmp_path) for n in f)
