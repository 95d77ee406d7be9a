"""Prompt suites through threestudio's real, unmodified launch.py on the CPU with the tiny SD (via
tests/harness/cpu_launch.py behind the suite's UNet-counting launcher): 2 prompts x 2 configs x 1 seed on 2
local workers, the runner killed mid-way and restarted, the report (tiny CLIP) and its gallery in headless
Chromium; and the submitit local executor with a run that fails, reported with its log."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from harness import HERE as HARNESS, REPO, STUBS, gs_cpu_overrides, link_pack, threestudio_root, tiny_clip_path, \
    tiny_overrides
from scoredistill.suite import report, runner, spec, state
from test_suite import check_gallery_dom, chromium, dump_dom

pytestmark = [pytest.mark.threestudio, pytest.mark.slow]

#: UNet forward samples per rendered view per step (the README's cost table: UDS with Tweedie x0 evaluates
#: [x_t cond, x_t uncond] plus one more unconditional sample; VDM one CFG pair)
SAMPLES_PER_VIEW = {"uds": 3, "vdm": 2}
STEPS, BATCH = 2, 2


def cpu_suite(tmp_path, tiny_sd, prompts, configs, gpus=(0, 1), **extra):
    link_pack(threestudio_root())
    data = {
        "name": "cpu", "output_dir": str(tmp_path / "out"), "threestudio_root": threestudio_root(),
        "prompts": list(prompts), "configs": configs, "seeds": [0], "gpus": list(gpus),
        "launcher": ["{python}", "{count_launch}", os.path.join(HARNESS, "cpu_launch.py"), "launch.py"],
        "env": {"PYTHONPATH": os.pathsep.join([STUBS, os.path.join(REPO, "custom")]), "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
        "overrides": tiny_overrides(tiny_sd, prompt=None, image_size=16, max_steps=STEPS)
        + gs_cpu_overrides(batch_size=BATCH),
    }
    data.update(extra)
    import yaml

    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _start_runner(path, log):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "custom"), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-m", "scoredistill.cli", "suite", "run", path], env=env,
                            stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)


def test_two_prompts_two_configs_on_two_workers_killed_and_resumed_then_reported(tmp_path, tiny_sd):
    path = cpu_suite(tmp_path, tiny_sd, ["a hamburger", "a DSLR photo of a corgi"],
                     [{"name": "uds", "config": "pack:uds-gs"}, {"name": "vdm", "config": "pack:vdm-gs"}])
    suite = spec.load_suite(path)
    runs = suite.runs()
    assert len(runs) == 4
    log = tmp_path / "runner.log"
    proc = _start_runner(path, log)
    t0 = time.time()
    while True:  # kill the runner (and its launch.py processes) once a run finished and another one is running
        sts = {r.run_id: state.read_state(r.run_dir) for r in runs}
        done = {k for k, s in sts.items() if s.get("status") == "done"}
        running = {k for k, s in sts.items() if s.get("status") == "running"}
        assert proc.poll() is None, log.read_text()[-4000:]
        if done and running:
            break
        assert time.time() - t0 < 600, log.read_text()[-4000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    time.sleep(1.0)
    sts = {r.run_id: state.read_state(r.run_dir) for r in runs}
    done = {k for k, s in sts.items() if s.get("status") == "done"}
    assert 1 <= len(done) <= 3
    before = {k: json.dumps(sts[k], sort_keys=True) for k in done}
    proc = _start_runner(path, log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-6000:]
    text = log.read_text()
    assert f"4 runs, {len(done)} finished, {4 - len(done)} to run on 2 worker(s)" in text
    second = text.split("[suite] cpu: ")[2]  # the restarted runner's output
    restarted = [ln.split()[2] for ln in second.splitlines() if ln.startswith("[suite] start")]
    # the finished runs are not started again (their state untouched); each unfinished one is, once
    assert sorted(restarted) == sorted(r.run_id for r in runs if r.run_id not in done)
    for r in runs:
        st = state.read_state(r.run_dir)
        assert st["status"] == "done" and st["exit_code"] == 0, (r.run_id, st)
        if r.run_id in done:
            assert json.dumps(st, sort_keys=True) == before[r.run_id]
        else:
            assert st["attempt"] == sts[r.run_id].get("attempt", 0) + 1
        assert os.path.isfile(st["video"]) and st["video"].startswith(r.trial_dir)
        # exact UNet cost of the run, counted by the launcher: samples/view x views x steps
        assert st["unet"]["unet_samples"] == SAMPLES_PER_VIEW[r.method] * BATCH * STEPS
        assert f"prompt: {r.prompt}" in open(os.path.join(r.trial_dir, "configs", "parsed.yaml")).read()

    # report with the tiny CLIP: scores equal the pack's clip_score of each run
    from scoredistill.bench import clip_score

    clip = tiny_clip_path()
    paths = report.write_report(suite.output_dir, clip_models=[clip], log=lambda *a: None)
    col = "clip_" + report.model_key(clip)
    rows = list(csv.DictReader(open(paths["csv"])))
    assert len(rows) == 4
    for row in rows:
        ref = clip_score.evaluate(row["trial_dir"], model_name=clip)
        assert ref["prompt"] == row["prompt"] and ref["num_images"] == 2
        assert float(row[col]) == pytest.approx(ref["clip_score_mean"], abs=1e-5)
        assert int(row["unet_samples"]) == SAMPLES_PER_VIEW[row["method"]] * BATCH * STEPS
        assert float(row["wall_time_s"]) > 0
    md = open(paths["markdown"]).read()
    for m in ("uds", "vdm"):
        vals = [float(r[col]) for r in rows if r["method"] == m]
        assert f"| {m} | 2 / 2 | 0 | [{vals[0]:.2f}, {vals[1]:.2f}] (n = 2) |" in md  # n < 3: no CI
    if chromium():  # the real gallery (test videos written by threestudio) in headless Chromium
        dom = dump_dom(paths["html"], tmp_path, f"#sort={col}:desc")
        check_gallery_dom(dom, paths, col, n_done=4, n_runs=4)


def test_submitit_local_executor_runs_threestudio_and_reports_a_failing_run_with_its_log(tmp_path, tiny_sd):
    path = cpu_suite(tmp_path, tiny_sd, ["a hamburger"],
                     [{"name": "vdm", "config": "pack:vdm-gs"},
                      {"name": "broken", "config": "pack:vdm-gs",
                       "overrides": [f"system.guidance.pretrained_model_name_or_path={tmp_path}/no-such-model"]}],
                     slurm={"local_timeout_min": 20, "gpus_per_node": 0})
    suite = spec.load_suite(path)
    states = runner.run_submitit(suite, cluster="local", wait=True, log=lambda *a: None)
    good, bad = sorted(suite.runs(), key=lambda r: r.method != "vdm")
    st = states[good.run_id]
    assert st["status"] == "done" and st["cluster"] == "local" and st["job_id"], st
    assert st["unet"]["unet_samples"] == SAMPLES_PER_VIEW["vdm"] * BATCH * STEPS
    assert os.path.isfile(os.path.join(suite.output_dir, "submitit", st["job_id"], f"{st['job_id']}_0_log.out"))
    fb = states[bad.run_id]
    assert fb["status"] == "failed" and fb["exit_code"] not in (0, None)
    assert "no-such-model" in open(fb["log"]).read()
    # reported with its log path: the runner's summary, the CSV and the gallery
    assert f"log: {fb['log']}" in runner.summarize(states)
    paths = report.write_report(suite.output_dir, clip_models=[], log=lambda *a: None)
    rows = {r["run_id"]: r for r in csv.DictReader(open(paths["csv"]))}
    assert rows[bad.run_id]["status"] == "failed" and rows[bad.run_id]["log"] == fb["log"]
    assert os.path.relpath(fb["log"], os.path.dirname(paths["html"])) in open(paths["html"]).read()
