"""Prompt suites (scoredistill.suite) with a stand-in launch.py (tests/suite_fake_launch.py): suite files,
the local GPU pool, resuming after a killed runner, failures with their logs, submitit's local executor
with a requeue on timeout, the report (CSV, markdown CIs, CLIP on the tiny CLIP) and the HTML gallery in
headless Chromium.  The same paths with threestudio's real launch.py: tests/test_suite_threestudio.py."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from scoredistill import cli
from scoredistill.suite import report, runner, spec, state

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE = os.path.join(HERE, "suite_fake_launch.py")
REPO = os.path.dirname(HERE)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return ""


def dump_dom(html_path: str, tmp_path, fragment: str = "") -> str:
    """The DOM of ``html_path`` after its scripts ran, from headless Chromium (fresh profile, no network)."""
    profile = tmp_path / f"chromium-profile-{time.monotonic_ns()}"
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--virtual-time-budget=10000", "--dump-dom", "file://" + html_path + fragment]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def needs_chromium():
    return pytest.mark.skipif(not chromium(), reason="needs Debian's chromium (apt-get install -y chromium)")


def fake_suite(tmp_path, prompts, configs=("a", "b"), gpus=(0, 1), **extra):
    ts = tmp_path / "threestudio"
    ts.mkdir(exist_ok=True)
    (ts / "launch.py").write_text("# stand-in; the suite runs tests/suite_fake_launch.py\n")
    cfgs = []
    for c in configs:
        p = tmp_path / f"{c}.yaml"
        p.write_text("name: x\n")
        cfgs.append({"name": c, "config": str(p)})
    data = {"name": "fake", "output_dir": str(tmp_path / "out"), "threestudio_root": str(ts), "prompts": list(prompts),
            "configs": cfgs, "seeds": [0], "gpus": list(gpus), "launcher": ["{python}", FAKE],
            "env": {"FAKE_LAUNCH_LOG": str(tmp_path / "calls.log")}}
    data.update(extra)
    import yaml

    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def calls(tmp_path):
    p = tmp_path / "calls.log"
    if not p.exists():
        return []
    return [ln.split() for ln in p.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------- suite files
def test_suite_file_expands_prompts_configs_seeds_into_launch_commands(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\na hamburger\n\na: b\n")
    ts = tmp_path / "ts"
    (ts / "configs").mkdir(parents=True)
    (ts / "launch.py").write_text("")
    (ts / "configs" / "dreamfusion-sd.yaml").write_text("name: d\n")
    s = spec.load_suite({"prompts": "p.txt", "threestudio_root": str(ts), "seeds": [0, 7],
                         "configs": ["pack:gs-sds", {"name": "df", "config": "threestudio:configs/dreamfusion-sd.yaml",
                                                     "overrides": ["trainer.max_steps=3"]}],
                         "overrides": ["trainer.max_steps=9", "data.width=32"]}, base_dir=str(tmp_path))
    assert [p.text for p in s.prompts] == ["a hamburger", "a: b"]
    runs = s.runs()
    assert len(runs) == 2 * 2 * 2
    assert {r.method for r in runs} == {"gs-sds", "df"}
    assert runs[0].config == os.path.join(REPO, "configs", "gs-sds.yaml")
    r = next(r for r in runs if r.method == "df" and r.prompt == "a: b" and r.seed == 7)
    cmd = r.command()
    assert cmd[:3] == [sys.executable, spec.COUNT_LAUNCH, "launch.py"]
    assert cmd[3:8] == ["--config", str(ts / "configs" / "dreamfusion-sd.yaml"), "--train", "--gpu", "0"]
    assert f"exp_root_dir={r.run_dir}" in cmd and "use_timestamp=false" in cmd and "seed=7" in cmd
    assert r.trial_dir == os.path.join(r.run_dir, "df", r.run_id.split("/")[1])
    # the config's overrides come after the suite's (a later override wins in OmegaConf.from_cli)
    assert cmd.index("trainer.max_steps=3") > cmd.index("trainer.max_steps=9")
    # the prompt survives OmegaConf's command-line parsing exactly
    from omegaconf import OmegaConf

    (ov,) = [a for a in cmd if a.startswith("system.prompt_processor.prompt=")]
    assert OmegaConf.from_cli([ov]).system.prompt_processor.prompt == "a: b"
    assert len({r.run_dir for r in runs}) == len(runs)


@pytest.mark.parametrize("value", ["null", "123", "yes", "a: b", "[x] y", "Zombie JOKER, head, 8K, HDR.", "it's"])
def test_prompt_overrides_round_trip_through_omegaconf(value):
    from omegaconf import OmegaConf

    ov = spec.safe_override("system.prompt_processor.prompt", value)
    assert OmegaConf.from_cli([ov]).system.prompt_processor.prompt == value


def test_prompt_files_json_yaml_and_t3bench(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(["a cat", {"prompt": "a dog", "source": "paper X, Fig. 1"}]))
    (tmp_path / "p.yaml").write_text("prompts:\n  - prompt: a cow\n    source: Y\n  - a pig\n")
    (tmp_path / "prompt_single.txt").write_text("A cactus with pink flowers\nA rainbow-colored umbrella\n"
                                                "A tattered old explorer\u2019s map\n")
    assert [(p.text, p.source) for p in spec.read_prompt_file(str(tmp_path / "p.json"))] == \
        [("a cat", None), ("a dog", "paper X, Fig. 1")]
    assert [(p.text, p.source) for p in spec.read_prompt_file(str(tmp_path / "p.yaml"))] == [("a cow", "Y"), ("a pig", None)]
    t3 = spec.load_t3bench(str(tmp_path / "prompt_single.txt"), limit=2)
    assert [(p.text, p.source) for p in t3] == [("A cactus with pink flowers", "T3Bench prompt_single.txt"),
                                                ("A rainbow-colored umbrella", "T3Bench prompt_single.txt")]
    ts = tmp_path / "ts"
    ts.mkdir()
    (ts / "launch.py").write_text("")
    s = spec.load_suite({"prompts": {"t3bench": "prompt_single.txt"}, "threestudio_root": str(ts),
                         "configs": ["pack:vdm-gs"]}, base_dir=str(tmp_path))
    assert len(s.prompts) == 3 and s.prompts[2].text == "A tattered old explorer\u2019s map"


@pytest.mark.parametrize("patch, message", [
    ({"configs": []}, "suite.configs: required"),
    ({"configs": ["pack:no-such-config"]}, "suite.configs[0].config: config 'pack:no-such-config' not found"),
    ({"configs": ["pack:gs-sds", "pack:gs-sds"]}, "suite.configs: two configs share a name"),
    ({"configs": [{"config": "pack:gs-sds", "name": "a/b"}]}, "suite.configs[0].name"),
    ({"configs": [{"config": "pack:gs-sds", "overide": []}]}, "suite.configs[0]: unknown setting(s) ['overide']"),
    ({"seeds": [0, 0]}, "suite.seeds: duplicate"),
    ({"seeds": "0"}, "suite.seeds: expected a non-empty list of integers"),
    ({"gpus": []}, "suite.gpus: expected a non-empty list of integers"),
    ({"prompts": []}, "suite.prompts: empty list"),
    ({"prompts": ["a", "a"]}, "suite.prompts: duplicate prompts ['a']"),
    ({"prompts": ["${x}"]}, "suite.prompts: '${x}' contains '${'"),
    ({"prompts": {"limit": 0, "file": "x"}}, "suite.prompts.limit: expected an integer >= 1"),
    ({"launcher": []}, "suite.launcher: empty"),
    ({"mode": "--export"}, "suite.mode: expected --train or --test"),
    ({"gpu": [0]}, "suite: unknown setting(s) ['gpu']"),
    ({"threestudio_root": "/nonexistent"}, "suite.threestudio_root: /nonexistent has no launch.py"),
])
def test_suite_errors_name_the_setting(tmp_path, patch, message):
    ts = tmp_path / "ts"
    ts.mkdir()
    (ts / "launch.py").write_text("")
    data = {"prompts": ["a"], "configs": ["pack:gs-sds"], "threestudio_root": str(ts)}
    data.update(patch)
    with pytest.raises(spec.SuiteError) as e:
        spec.load_suite(data, base_dir=str(tmp_path)).runs()
    assert message in str(e.value)


def test_shipped_paper_suites_load_with_a_source_per_prompt(tmp_path):
    ts = tmp_path / "ts"
    ts.mkdir()
    (ts / "launch.py").write_text("")
    folder = os.path.join(REPO, "load", "suites")
    prompts = spec.read_prompt_file(os.path.join(folder, "paper-prompts.yaml"))
    assert len(prompts) >= 40 and all(p.source for p in prompts)
    papers = {p.source.split(",")[0] for p in prompts}
    assert papers == {"GE3D", "LODS", "DreamMapping", "UDS", "HiFA"}
    (tmp_path / "prompt_single.txt").write_text("A cactus with pink flowers\nA rainbow-colored umbrella\n")
    import yaml

    names = sorted(n for n in os.listdir(folder) if n.startswith("suite-"))
    assert names == ["suite-papers-gs.yaml", "suite-t3bench-single.yaml"]
    for name in names:
        data = yaml.safe_load(open(os.path.join(folder, name)))
        data["threestudio_root"] = str(ts)
        if "t3bench" in name:  # the user downloads T3Bench's file; a two-line stand-in here
            data["prompts"]["t3bench"] = str(tmp_path / "prompt_single.txt")
        s = spec.load_suite(data, base_dir=folder)
        assert s.runs() and all(p.source for p in s.prompts)
        assert len(s.runs()) == len(s.prompts) * len(s.configs) * len(s.seeds)
    s = spec.load_suite(dict(yaml.safe_load(open(os.path.join(folder, "suite-papers-gs.yaml"))), threestudio_root=str(ts)),
                        base_dir=folder)
    assert len(s.prompts) == len(prompts) and s.output_dir == os.path.join(REPO, "outputs", "suites", "papers-gs")


# ------------------------------------------------------------------------------------------------- local pool
def test_local_pool_runs_each_combination_once_one_run_per_gpu(tmp_path):
    path = fake_suite(tmp_path, ["p one SLEEP1", "p two SLEEP1"])
    assert cli.main(["suite", "run", path]) == 0
    c = calls(tmp_path)
    assert len(c) == 4 and {x[1] for x in c} == {"0", "1"}
    for g in ("0", "1"):  # never two runs at once on one GPU
        iv = sorted((float(x[2]), float(x[3])) for x in c if x[1] == g)
        assert all(a[1] <= b[0] for a, b in zip(iv, iv[1:]))
    suite = spec.load_suite(path)
    for r in suite.runs():
        st = state.read_state(r.run_dir)
        assert st["status"] == "done" and st["exit_code"] == 0 and st["attempt"] == 1
        assert st["video"] == os.path.join(r.trial_dir, "save", "it2-test.mp4") and st["wall_time_s"] > 0
        assert os.path.isfile(st["log"]) and "fake launch.py" in open(st["log"]).read()
    # a second start finds everything finished and runs nothing
    assert cli.main(["suite", "run", path]) == 0
    assert len(calls(tmp_path)) == 4
    # changed arguments do not rerun a finished run, which keeps the record of what it ran with
    import yaml

    data = yaml.safe_load(open(path))
    data["overrides"] = ["trainer.max_steps=7"]
    open(path, "w").write(yaml.safe_dump(data))
    lines = []
    runner.run_local(spec.load_suite(path), log=lines.append)
    assert len(calls(tmp_path)) == 4 and sum("finished with other launch.py arguments" in ln for ln in lines) == 4
    r = suite.runs()[0]
    assert "trainer.max_steps=7" not in json.load(open(os.path.join(r.run_dir, "run.json")))["args"]


def test_failed_run_is_reported_with_its_log_and_rerun_next_time(tmp_path, capsys):
    path = fake_suite(tmp_path, ["fine", "will FAIL", "exits 0 but NOVIDEO"], configs=("a",), gpus=(0,))
    assert cli.main(["suite", "run", path]) == 1
    out = capsys.readouterr().out
    suite = spec.load_suite(path)
    by_prompt = {r.prompt: r for r in suite.runs()}
    fail, novid = state.read_state(by_prompt["will FAIL"].run_dir), state.read_state(by_prompt["exits 0 but NOVIDEO"].run_dir)
    assert fail["status"] == "failed" and fail["exit_code"] == 3 and fail["reason"] == "launch.py exited with code 3"
    assert "RuntimeError: fake failure" in open(fail["log"]).read()
    assert f"log: {fail['log']}" in out and "failed: a/will_fail" in out
    assert novid["status"] == "failed" and novid["exit_code"] == 0 and "no test video" in novid["reason"]
    assert cli.main(["suite", "status", suite.output_dir]) == 0
    assert f"log: {fail['log']}" in capsys.readouterr().out
    # the next start reruns only the two unfinished runs (attempt 2, a new log)
    assert cli.main(["suite", "run", path]) == 1
    again = [x[0] for x in calls(tmp_path)[3:]]
    assert sorted(again) == sorted(os.path.basename(by_prompt[p].run_dir) for p in ("will FAIL", "exits 0 but NOVIDEO"))
    st = state.read_state(by_prompt["will FAIL"].run_dir)
    assert st["attempt"] == 2 and st["log"].endswith("attempt-2.log") and os.path.isfile(fail["log"])
    # the report lists the failure with its log
    paths = report.write_report(suite.output_dir, clip_models=[], log=lambda *a: None)
    rows = list(csv.DictReader(open(paths["csv"])))
    row = next(r for r in rows if r["prompt"] == "will FAIL")
    assert row["status"] == "failed" and row["log"] == st["log"] and row["exit_code"] == "3"
    html = open(paths["html"]).read()
    assert os.path.relpath(st["log"], os.path.dirname(paths["html"])) in html


def _start_runner(path, tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "custom"), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-m", "scoredistill.cli", "suite", "run", path], env=env,
                            stdout=open(tmp_path / "runner.log", "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for(pred, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


@pytest.mark.parametrize("sig, group", [(signal.SIGKILL, True), (signal.SIGTERM, True), (signal.SIGKILL, False)],
                         ids=["SIGKILL-runner-and-runs", "SIGTERM-runner", "SIGKILL-runner-only"])
def test_killed_runner_restarts_only_the_unfinished_runs(tmp_path, sig, group):
    path = fake_suite(tmp_path, ["quick", "slow SLEEPONCE60"], configs=("a",), gpus=(0, 1))
    suite = spec.load_suite(path)
    quick, slow = sorted(suite.runs(), key=lambda r: r.prompt != "quick")
    proc = _start_runner(path, tmp_path)
    _wait_for(lambda: state.read_state(quick.run_dir).get("status") == "done"
              and state.read_state(slow.run_dir).get("status") == "running")
    child = state.read_state(slow.run_dir)["pid"]
    # SIGKILL of the group: the runner and its launch.py (a node going down); SIGTERM: the runner ends its runs;
    # SIGKILL of the runner alone: its launch.py lives on, orphaned, and the next runner must end it first
    (os.killpg if group else os.kill)(proc.pid, sig)
    proc.wait(timeout=60)
    gone = lambda: not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z"  # noqa
    if group:
        _wait_for(gone)
    else:
        time.sleep(0.5)
        assert not gone()  # still sleeping
    st = state.read_state(slow.run_dir)
    assert st["status"] == ("running" if sig == signal.SIGKILL else "killed")
    done_before = json.load(open(os.path.join(quick.run_dir, "state.json")))
    assert len(calls(tmp_path)) == 1  # only the quick run ended
    proc = _start_runner(path, tmp_path)
    assert proc.wait(timeout=120) == 0, (tmp_path / "runner.log").read_text()
    text = (tmp_path / "runner.log").read_text()
    assert "2 runs, 1 finished, 1 to run" in text
    assert ("ending the launch.py left by a killed runner" in text) == (not group)
    assert gone()
    assert [x[0] for x in calls(tmp_path)] == [os.path.basename(quick.run_dir), os.path.basename(slow.run_dir)]
    assert json.load(open(os.path.join(quick.run_dir, "state.json"))) == done_before  # untouched
    st = state.read_state(slow.run_dir)
    assert st["status"] == "done" and st["attempt"] == 2


def test_a_second_runner_on_the_same_outputs_is_refused(tmp_path):
    path = fake_suite(tmp_path, ["slow SLEEP30"], configs=("a",), gpus=(0,))
    proc = _start_runner(path, tmp_path)
    try:
        suite = spec.load_suite(path)
        _wait_for(lambda: state.read_state(suite.runs()[0].run_dir).get("status") == "running")
        with pytest.raises(RuntimeError, match="another suite runner holds"):
            runner.run_local(suite)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ------------------------------------------------------------------------------------------------- submitit
def test_submitit_local_executor_runs_the_array_and_requeues_on_timeout(tmp_path):
    """A job that reaches its time limit gets submitit's timeout signal: RunJob.checkpoint ends launch.py,
    marks the run ``preempted`` and requeues it; the requeued job finishes it (attempt 2)."""
    path = fake_suite(tmp_path, ["quick", "slow SLEEPONCE120"], configs=("a",), gpus=(0,),
                      slurm={"local_timeout_min": 0.25, "local_signal_delay_s": 9, "gpus_per_node": 0, "slurm_partition": "unused"})
    suite = spec.load_suite(path)
    states = runner.run_submitit(suite, cluster="local", wait=True, log=lambda *a: None)
    quick, slow = sorted(suite.runs(), key=lambda r: r.prompt != "quick")
    assert states[quick.run_id]["status"] == "done" and states[quick.run_id]["attempt"] == 1
    st = states[slow.run_id]
    assert st["status"] == "done" and st["attempt"] == 2 and st["cluster"] == "local" and st["job_id"]
    assert os.path.isfile(os.path.join(slow.run_dir, "logs", "attempt-1.log"))
    # per-job submitit logs next to the outputs
    folder = os.path.join(suite.output_dir, "submitit")
    jobs = sorted(d for d in os.listdir(folder) if d != "%j")
    assert jobs == sorted([quick_id := states[quick.run_id]["job_id"], st["job_id"]]) and quick_id != st["job_id"]
    for j in jobs:
        assert os.path.isfile(os.path.join(folder, j, f"{j}_0_log.out"))
    assert "timed-out" in open(os.path.join(folder, st["job_id"], f"{st['job_id']}_0_log.err")).read()
    # nothing is resubmitted next time
    assert runner.run_submitit(suite, cluster="local", wait=True, log=lambda *a: None)[slow.run_id]["attempt"] == 2
    assert len(calls(tmp_path)) == 2  # quick once; slow once to the end (its first attempt was cut off)


# ------------------------------------------------------------------------------------------------- report
def test_t_interval_matches_the_student_t_formula():
    mean, hw = report.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and hw == pytest.approx(4.302652729696 / 3 ** 0.5, rel=1e-9)  # t_{0.975, 2} (tables: 4.303)
    assert report.t_interval([5.0]) == (5.0, None) and report.t_interval([]) == (None, None)


@pytest.fixture(scope="module")
def tiny_clip():
    from harness import tiny_clip_path

    return tiny_clip_path()


def test_report_csv_markdown_and_gallery(tmp_path, tiny_clip):
    path = fake_suite(tmp_path, ["a cat", "a dog", "a FAIL"], configs=("a", "b"))
    cli.main(["suite", "run", path])
    suite = spec.load_suite(path)
    assert cli.main(["suite", "report", suite.output_dir, "--clip-model", tiny_clip]) == 0
    out = os.path.join(suite.output_dir, "report")
    rows = list(csv.DictReader(open(os.path.join(out, "runs.csv"))))
    assert len(rows) == 6
    col = "clip_" + report.model_key(tiny_clip)
    from scoredistill.bench import clip_score

    for r in rows:
        if r["status"] == "done":  # the pack's clip_score of the run, computed independently
            ref = clip_score.evaluate(r["trial_dir"], model_name=tiny_clip)
            assert float(r[col]) == pytest.approx(ref["clip_score_mean"], abs=1e-5)
            assert r["unet_samples"] == ""  # the stand-in launcher does not count
        else:
            assert r[col] == "" and r["status"] == "failed"
    md = open(os.path.join(out, "summary.md")).read()
    for m in ("a", "b"):
        vals = [float(r[col]) for r in rows if r["method"] == m and r["status"] == "done"]
        assert len(vals) == 2  # n < 3: the values themselves, no confidence interval
        assert f"| {m} | 2 / 3 | 1 | [{vals[0]:.2f}, {vals[1]:.2f}] (n = 2) |" in md
    # cached scores are reused (same numbers, no recompute needed)
    assert os.path.isfile(os.path.join(rows[0]["trial_dir"], "..", "..", f"clip-{report.model_key(tiny_clip)}.json"))


@needs_chromium()
def test_gallery_opens_in_headless_chromium_with_media_and_sorting(tmp_path, tiny_clip):
    path = fake_suite(tmp_path, ["a cat", "a dog", "a FAIL"], configs=("a", "b"))
    cli.main(["suite", "run", path])
    suite = spec.load_suite(path)
    paths = report.write_report(suite.output_dir, clip_models=[tiny_clip], log=lambda *a: None)
    col = "clip_" + report.model_key(tiny_clip)
    dom = dump_dom(paths["html"], tmp_path, f"#sort={col}:desc")
    check_gallery_dom(dom, paths, col, n_done=4, n_runs=6)


def check_gallery_dom(dom, paths, col, n_done, n_runs):
    """The table rows are there and sorted by ``col`` (descending, empty last), every video and image loaded
    (with its pixel width), and the failed runs link their logs."""
    import re

    rows = json.load(open(paths["json"]))["runs"]
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-ready="1"' in body
    n_media = 2 * n_done  # a video and the first test view per finished run
    assert f'data-media-total="{n_media}"' in body and f'data-media-loaded="{n_media}"' in body
    assert 'data-media-failed="0"' in body
    assert len(re.findall(r'<video[^>]*data-state="loaded"[^>]*data-w="[1-9]', dom)) == n_done
    assert len(re.findall(r'<img[^>]*data-state="loaded"[^>]*data-w="[1-9]', dom)) == n_done
    order = re.findall(r'<tr data-run="([^"]+)"', dom)
    assert len(order) == n_runs
    scores = {r["run_id"]: r[col] for r in rows}
    expected = sorted(scores, key=lambda k: (scores[k] is None, -(scores[k] or 0)))
    assert order == expected
    assert f'data-sorted-by="{col}:desc"' in dom
    for r in rows:
        if r["status"] != "done":
            assert os.path.relpath(r["log"], os.path.dirname(paths["html"])) in dom


PAPERS = {"GE3D": "ge3d-text-to-3d-by-2d-editing.txt", "LODS": "lods-learn-to-optimize-denoising-scores.txt",
          "DreamMapping": "dreammapping-vdm.txt", "UDS": "uds-rethinking-sds.txt", "HiFA": "hifa.txt"}
PAPER_DIR = os.environ.get("SCOREDISTILL_PAPERS", "/work/shared/papers")


@pytest.mark.skipif(not os.path.isdir(PAPER_DIR), reason=f"needs the papers' text in {PAPER_DIR} ($SCOREDISTILL_PAPERS)")
def test_every_shipped_paper_prompt_is_printed_in_the_paper_it_cites():
    import re

    for p in spec.read_prompt_file(os.path.join(REPO, "load", "suites", "paper-prompts.yaml")):
        paper = p.source.split(",")[0]
        text = open(os.path.join(PAPER_DIR, PAPERS[paper]), encoding="utf-8").read().replace("**", "")
        text = re.sub(r"[ \t]+", " ", text)
        assert p.text in text, (p.text, p.source)


def test_gpu_ids_map_through_the_runners_own_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert runner._visible_gpu(3) == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 6")
    assert [runner._visible_gpu(i) for i in (0, 1)] == ["4", "6"]
    with pytest.raises(ValueError, match="suite.gpus: GPU index 2 but CUDA_VISIBLE_DEVICES=4,6"):
        runner._visible_gpu(2)


def _fake_slurm(tmp_path, sacct_state="RUNNING"):
    """``srun``/``sbatch``/``sacct``/``scancel`` stand-ins on PATH: sbatch records the script it is given and
    answers with job 4242; sacct reports every array task in ``sacct_state``."""
    bin_dir = tmp_path / "fake-slurm-bin"
    bin_dir.mkdir(exist_ok=True)
    scripts = {
        "srun": "#!/bin/sh\nexit 0\n",
        "scancel": "#!/bin/sh\nexit 0\n",
        "sbatch": f"#!/bin/sh\ncat \"$1\" > {tmp_path}/sbatch-$(date +%s%N).sh\necho 'Submitted batch job 4242'\n",
        "sacct": "#!/bin/sh\necho 'JobID|State|NodeList'\n"
                 f"for i in 0 1 2 3; do echo \"4242_$i|{sacct_state}|node1\"; done\n",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return str(bin_dir)


def test_slurm_path_submits_one_job_array_with_the_suite_parameters_and_not_twice(tmp_path, monkeypatch):
    import glob

    monkeypatch.setenv("PATH", _fake_slurm(tmp_path) + os.pathsep + os.environ["PATH"])
    path = fake_suite(tmp_path, ["p one", "p two"], configs=("a",),
                      slurm={"timeout_min": 30.5, "slurm_partition": "gpu", "slurm_array_parallelism": 1,
                             "local_signal_delay_s": 3})
    suite = spec.load_suite(path)
    states = runner.run_submitit(suite, cluster="slurm", wait=False, log=lambda *a: None)
    assert sorted(s["job_id"] for s in states.values()) == ["4242_0", "4242_1"]
    assert all(s["status"] == "queued" and s["cluster"] == "slurm" for s in states.values())
    (script,) = [open(p).read() for p in glob.glob(str(tmp_path / "sbatch-*.sh"))]  # one sbatch: one array
    for line in ("#SBATCH --array=0-1%1", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --time=31", "#SBATCH --signal=USR2@", "#SBATCH --job-name=suite-fake"):
        assert line in script, script
    out = os.path.join(suite.output_dir, "submitit")
    assert f"#SBATCH --output={out}/%A_%a/%A_%a_0_log.out" in script  # per-job logs next to the outputs
    assert "signal_delay" not in script and "local_" not in script
    # the jobs are still queued/running in SLURM: a second `suite run` submits nothing
    runner.run_submitit(suite, cluster="slurm", wait=False, log=lambda *a: None)
    assert len(glob.glob(str(tmp_path / "sbatch-*.sh"))) == 1
    # ... and once SLURM says the jobs ended without finishing the runs (a node failure), they are resubmitted
    _fake_slurm(tmp_path, sacct_state="NODE_FAIL")
    runner.run_submitit(suite, cluster="slurm", wait=False, log=lambda *a: None)
    assert len(glob.glob(str(tmp_path / "sbatch-*.sh"))) == 2
