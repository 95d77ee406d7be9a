"""The GPU command of the ground-truth 3D benchmark (scoredistill.bench.gt3d_gpu) without launching anything:
every config is classified and gets its overrides, the wall budget kills a process group, bad arguments fail
with a one-line message, statuses and the table say what happened.  The command itself at CPU scale:
tests/test_gt3d_launch.py."""
import os
import sys
import time

import pytest

from scoredistill.bench import gt3d_gpu as g


def test_every_config_but_the_cpu_smoke_one_is_run_and_classified():
    names = g.config_names()
    assert "hifa-cpu-smoke" not in names and len(names) == 13
    kinds = {n: g.config_kind(n) for n in names}
    assert kinds["uds-edit-gs"] == "gs-edit" and kinds["uds-edit-nerf"] == "nerf-edit"
    assert {n for n, k in kinds.items() if k == "gs"} == {"gs-sds", "ge3d-gs", "vdm-gs", "uds-gs", "lods-embedding-gs"}
    assert {n for n, k in kinds.items() if k == "nerf"} == {"hifa", "ge3d-nerf", "vdm-nerf", "uds-nerf",
                                                           "lods-embedding-nerf", "lods-lora-nerf"}


def test_max_time_is_lightnings_dd_hh_mm_ss():
    assert g.max_time_arg(3725.9) == "00:01:02:05"
    assert g.max_time_arg(0.2) == "00:00:00:01"
    from datetime import timedelta

    d, h, m, s = map(int, g.max_time_arg(4000).split(":"))
    assert timedelta(days=d, hours=h, minutes=m, seconds=s).total_seconds() == 4000


def test_gpu_scale_keeps_the_configs_own_settings():
    """At GPU scale nothing of resolution, batch, steps, precision, lrs or Gaussian growth is overridden."""
    for name in g.config_names():
        kind = g.config_kind(name)
        o = g.run_overrides(name, kind, "cube", 0, "/p", "/e", 100, "gpu", True, source_ckpt="/c.ckpt",
                            source_scene="cube_recoloured")
        keys = [x.split("=")[0] for x in o]
        for own in ("trainer.max_steps", "data.width", "data.height", "data.batch_size", "trainer.precision",
                    "system.geometry.upsample_to", "system.geometry.num_points", "system.optimizer.params",
                    "trainer.val_check_interval"):
            assert own not in keys, (name, own)
        assert "trainer.max_time=00:00:01:40" in o and "system.guidance.half_precision_weights=false" in o
        if kind.startswith("nerf"):
            assert "system.geometry.pos_encoding_config.otype=ProgressiveBandFrequency" in o
            assert not any(x.startswith("system.renderer_type=") for x in o)  # threestudio's nerf-volume-renderer
        if kind == "nerf-edit":
            assert "system.source_checkpoint=/c.ckpt" in o


def test_cpu_scale_shrinks_sizes_and_steps():
    o = g.run_overrides("vdm-gs", "gs", "cube", 0, "/p", "/e", 10, "cpu", False, cpu_steps=7)
    assert {"trainer.max_steps=7", "data.width=32", "system.geometry.num_points=300", "trainer.precision=32"} <= set(o)


def test_launch_kills_the_process_group_at_the_deadline(tmp_path, monkeypatch):
    (tmp_path / "launch.py").write_text("import subprocess, sys, time\n"
                                        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                                        "print('started', flush=True)\ntime.sleep(60)\n")
    monkeypatch.setattr(g.torch.cuda, "is_available", lambda: True)  # no cpu_launch wrapper: run the fake directly
    t = time.time()
    r = g.launch([], str(tmp_path), str(tmp_path / "log.txt"), time.time() + 3)
    assert r["killed"] and time.time() - t < 20
    assert "started" in (tmp_path / "log.txt").read_text()


@pytest.mark.parametrize("argv, msg", [
    (["--budget", "0"], "--budget must be > 0"),
    (["--configs", "nope"], "--configs: unknown config 'nope'"),
    (["--views", "0"], "--views must be >= 1"),
    (["--max-train-seconds", "-1"], "--max-train-seconds must be > 0"),
])
def test_bad_arguments_fail_with_one_line(argv, msg, tmp_path):
    with pytest.raises(SystemExit) as e:
        g.parse_args(["--out", str(tmp_path)] + argv)
    assert msg in str(e.value)


def test_status_lines_say_what_happened():
    assert g.status_of({"killed": True, "steps_done": 12}) == "killed at the wall budget after 12 steps"
    assert g.status_of({"rc": 1, "error": "ValueError: x"}) == "failed (exit 1): ValueError: x"
    assert g.status_of({"rc": 0, "stop_reason": "max_steps", "test_done": True}) == "finished the whole schedule"
    s = g.status_of({"rc": 0, "stop_reason": "max_time", "steps_done": 250, "max_steps": 1000, "fraction": 0.25})
    assert "at step 250 of 1000 (25.0 % of the schedule)" in s


def test_probe_summary():
    p = {"step_seconds": [1.0, 0.1, 0.3], "train_end_step": 3, "max_steps": 12, "stop_reason": "max_time",
         "test_done": True, "peak_allocated_bytes": 2**31, "gaussians": [[0, 10], [3, 14]]}
    s = g.summarise_probe(p)
    assert s["s_per_it_median"] == 0.3 and s["fraction"] == 0.25 and s["peak_allocated_gib"] == 2.0
    assert abs(s["s_per_it_mean"] - 1.4 / 3) < 1e-12


def test_default_out_is_a_scratch_folder_for_both_commands():
    from scoredistill.bench import gt3d_bench as b
    from scoredistill.bench import gt3d_scoring

    assert b.DEFAULT_OUT == os.path.join("outputs", "gt3d") and g.DEFAULT_OUT.startswith("outputs")
    src = open(b.__file__).read()
    assert "--lr-scale``, default 10" in src
    # the checkpoint fallback of the Chamfer metric loads with weights_only=True (it moved to the scoring module)
    scoring = open(gt3d_scoring.__file__).read()
    assert "weights_only=False" not in src + scoring and "weights_only=True" in scoring


def test_probe_stops_training_at_the_wall_deadline_and_records_it(tmp_path):
    """The recording callback sets ``trainer.should_stop`` once the absolute training deadline has passed, and the
    record says why training ended, the Gaussian count and the steps."""
    import json
    from types import SimpleNamespace

    import torch

    from scoredistill.bench import gt3d_probe as p

    out = str(tmp_path / "probe.json")
    module = SimpleNamespace(geometry=SimpleNamespace(params={"means": torch.zeros(7, 3)}))
    for until, stop, reason in ((time.time() - 1, True, "wall_deadline"), (time.time() + 3600, False, "other")):
        cb = p.make_callback(out, every=1, until=until)
        trainer = SimpleNamespace(global_step=0, max_steps=100, should_stop=False, callbacks=[])
        cb.on_train_start(trainer, module)
        cb.on_train_batch_start(trainer, module, None, 0)
        trainer.global_step = 1
        cb.on_train_batch_end(trainer, module, None, None, 0)
        assert trainer.should_stop is stop
        cb.on_train_end(trainer, module)
        rec = json.load(open(out))
        assert rec["stop_reason"] == reason and rec["train_end_step"] == 1 and rec["max_steps"] == 100
        assert rec["gaussians"] == [[0, 7], [1, 7]] and len(rec["step_seconds"]) == 1
    assert "training deadline" in g.status_of({"rc": 0, "stop_reason": "wall_deadline", "steps_done": 1,
                                                "max_steps": 100, "fraction": 0.01})


# ------------------------------------------------------------------- issue 27 follow-up (the first GPU run, 2026-12-04)
@pytest.mark.parametrize("name", g.config_names() + ["hifa-cpu-smoke"])
def test_every_configs_resolution_schedule_is_one_threestudio_accepts(name, threestudio_module):
    """lods-embedding-nerf / lods-lora-nerf failed at start on the GPU: ``width: [256, 512]`` with a scalar
    ``batch_size`` trips threestudio's ``len(heights) == len(widths) == len(batch_sizes)``.  Every config's data
    section, at the GPU scale's overrides and at the CPU scale's, builds threestudio's own training dataset, and the
    CPU scale keeps the schedule's length and milestones."""
    from omegaconf import OmegaConf

    from threestudio.data.uncond import RandomCameraDataModuleConfig, RandomCameraIterableDataset
    from threestudio.utils.config import parse_structured

    base = OmegaConf.load(os.path.join(g.CONFIGS, name + ".yaml"))
    kind = g.config_kind(name)
    for scale in ("gpu", "cpu"):
        o = g.run_overrides(name, kind, "cube", 0, "/p", "/e", 100, scale, scale == "gpu", source_ckpt="/c.ckpt",
                            source_scene="cube_recoloured")
        cfg = OmegaConf.merge(base, OmegaConf.from_dotlist([x for x in o if x.startswith("data.")]))
        data = parse_structured(RandomCameraDataModuleConfig, cfg.data)
        ds = RandomCameraIterableDataset(data)  # threestudio's assertion
        assert len(ds.heights) == len(ds.widths) == len(ds.batch_sizes) == len(g.data_schedule(name)["width"])
        if scale == "cpu":
            assert set(ds.widths) == {g.CPU_SCALE["size"]}
            assert list(cfg.data.get("resolution_milestones", [])) == list(base.data.get("resolution_milestones", []))


def test_lods_nerf_configs_keep_their_multi_resolution_schedule():
    for name in ("lods-embedding-nerf", "lods-lora-nerf"):
        assert g.data_schedule(name) == {"width": [256, 512], "height": [256, 512], "batch_size": [1, 1]}
        o = g.run_overrides(name, "nerf", "cube", 0, "/p", "/e", 10, "cpu", False)
        assert "data.width=[32,32]" in o and "data.batch_size=[1,1]" in o


def test_figures_are_drawn_with_a_stand_in_ipython_that_lacks_its_attributes(tmp_path):
    """The GPU machine's IPython stand-in (no ``get_ipython``, no ``version_info``) broke pyplot, so neither the grid
    nor the curves were written; the figures no longer go through pyplot.  Run in a fresh interpreter: removing
    matplotlib from this process's ``sys.modules`` left a second copy of it behind that broke later figures."""
    import subprocess
    import textwrap

    script = textwrap.dedent(f"""
        import sys, types
        import torch
        from PIL import Image
        assert not any(m == "matplotlib" or m.startswith("matplotlib.") for m in sys.modules)
        sys.modules["IPython"] = types.ModuleType("IPython")
        from scoredistill.bench import gt3d_gpu as g
        tmp = {str(tmp_path)!r}
        results = [{{"config": "a", "curve": [(0, 10.0), (5, 12.5)], "unet_samples": 20, "steps_done": 5}},
                   {{"config": "b", "curve": [(0, 9.0), (5, 11.0)]}}]
        g.write_curves(tmp + "/curves.png", results)
        import os
        trial = os.path.join(tmp, "trial", "save", "it5-test")
        os.makedirs(trial)
        for i in range(120):
            Image.fromarray((torch.full((16, 32, 3), i / 120.0) * 255).byte().numpy()).save(f"{{trial}}/{{i}}.png")
        g.write_grid(tmp + "/grid.png", [{{"config": "a", "trial": os.path.join(tmp, "trial"), "steps_done": 5,
                                          "max_steps": 9}}], None, "cube")
        assert "matplotlib.pyplot" not in sys.modules and sys.modules["IPython"].__name__ == "IPython"  # put back
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from PIL import Image

    for f in ("curves.png", "grid.png"):
        im = Image.open(tmp_path / f)
        assert im.size[0] > 300 and im.size[1] > 100


def test_each_run_trains_for_its_own_window_from_its_first_step(tmp_path):
    """13 processes starting at once took 60-105 s to their first step, so an absolute training deadline left most
    Gaussian configs one step.  The probe's window counts from the run's own first training step (a slow start-up
    does not shorten it); the absolute deadline still bounds it."""
    import json
    from types import SimpleNamespace

    from scoredistill.bench import gt3d_probe as p

    out = str(tmp_path / "probe.json")
    module = SimpleNamespace()

    def steps(cb, n, pause=0.0):
        trainer = SimpleNamespace(global_step=0, max_steps=100, should_stop=False, callbacks=[])
        cb.on_train_start(trainer, module)
        for i in range(n):
            cb.on_train_batch_start(trainer, module, None, i)
            time.sleep(pause)
            trainer.global_step = i + 1
            cb.on_train_batch_end(trainer, module, None, None, i)
            if trainer.should_stop:
                break
        cb.on_train_end(trainer, module)
        return trainer.global_step, json.load(open(out))

    cb = p.make_callback(out, every=1, until=time.time() + 3600, window=0.3)
    time.sleep(0.5)  # a start-up longer than the window: the window has not started
    done, rec = steps(cb, 100, pause=0.02)
    assert 5 <= done < 100 and rec["stop_reason"] == "wall_deadline"
    assert abs(rec["train_until"] - rec["t_first_step"] - 0.3) < 1e-6
    cb = p.make_callback(out, every=1, until=time.time() - 1, window=3600)  # the absolute bound still holds
    done, rec = steps(cb, 100)
    assert done == 1 and rec["stop_reason"] == "wall_deadline"


def test_gpu_budget_is_refused_when_a_config_would_get_too_few_steps_and_the_plan_is_an_estimate(tmp_path):
    with pytest.raises(SystemExit) as e:  # the first GPU run's budget
        g.parse_args(["--out", str(tmp_path), "--scale", "gpu", "--budget", "270"])
    msg = str(e.value)
    assert "\n" not in msg and "fewer than --min-steps 50" in msg and "raise --budget to >=" in msg
    need = int(msg.split(">= ")[1].split(" s")[0])
    a = g.parse_args(["--out", str(tmp_path), "--scale", "gpu", "--budget", str(need)])
    p = a.plan
    assert min(r["steps_in_window"] for r in p["rows"].values()) >= 50
    r = p["rows"]["hifa"]  # measured 0.720 s/it x 10000 steps
    assert r["s_per_it"] == 0.720 and r["max_steps"] == 10000 and abs(r["whole_schedule_min"] - 120.0) < 1e-9
    assert p["rows"]["uds-gs"]["note"] == "1 step only: upper bound"
    txt = g.plan_text(p)
    assert txt.startswith("ESTIMATE") and "not a measurement" in txt and "uds-edit-gs" in txt
    with pytest.raises(SystemExit, match="--min-steps must be >= 1"):
        g.parse_args(["--out", str(tmp_path), "--scale", "gpu", "--min-steps", "0"])
    # the CPU scale (CI) has no GPU estimate to refuse with
    assert g.parse_args(["--out", str(tmp_path), "--scale", "cpu", "--budget", "60"]).plan is None


def test_a_prior_already_in_work_is_reused(tmp_path, monkeypatch):
    calls = []

    def fake(folder, *a, **k):
        calls.append(folder)
        os.makedirs(folder, exist_ok=True)
        return {"vae_psnr": 30.0, "seconds": 1.0}

    monkeypatch.setattr(g.gt3d_prior, "build_scene_prior", fake)
    args = g.parse_args(["--out", str(tmp_path / "o"), "--scale", "cpu", "--work", str(tmp_path / "w")])
    g.Bench(args).build_priors(["gs", "gs-edit"])
    b = g.Bench(args)
    b.prior_info = {}
    assert b.build_priors(["gs", "gs-edit"]) == {"prior": str(tmp_path / "w" / "prior"),
                                                 "prior-edit": str(tmp_path / "w" / "prior-edit")}
    assert len(calls) == 2 and b.prior_info["prior"]["reused"] is True
    args.views = 7  # another prior: rebuilt
    b.build_priors(["gs"])
    assert len(calls) == 3
