"""The finite-step guarantee (issue 13, finding 1) through threestudio's own launch.py, and resume refusals
(finding 5): a non-finite latent gradient / render / parameter gradient / loss skips the optimizer step
(parameters, Adam moments and the guidance's own state untouched), is logged and counted, and
``max_nonfinite_skips`` consecutive skips stop the run with a clear error.  Faults are injected by
``tests/harness/faults.py`` (``SCOREDISTILL_TEST_FAULTS``)."""
import json
import os

import pytest
import torch

from harness import gs_cpu_overrides, nerf_cpu_overrides, run_launch, tiny_overrides

pytestmark = pytest.mark.threestudio

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(os.path.dirname(HERE), "configs")
#: a small VDM operator on top of the tiny-SD CPU overrides
VDM_CPU = ("system.guidance.operator_widths=[8,16,32]",)


def _faults(**spec) -> dict:
    return {"SCOREDISTILL_TEST_FAULTS": json.dumps(spec)}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _assert_all_finite(ckpt: dict) -> int:
    n = 0
    for t in _tensors({k: ckpt[k] for k in ("state_dict", "optimizer_states", "scoredistill_guidance_states") if k in ckpt}):
        if t.is_floating_point():
            assert torch.isfinite(t).all(), "non-finite value written to last.ckpt"
            n += t.numel()
    return n


def _gs_vdm(tiny_sd, steps, *extra):
    return tiny_overrides(
        tiny_sd, *gs_cpu_overrides(num_points=200, batch_size=1), *VDM_CPU, *extra, prompt="a red ball", max_steps=steps
    )


@pytest.mark.slow
def test_inf_latent_gradient_is_skipped_and_last_ckpt_stays_finite(tiny_sd, tmp_path):
    """gsplat-system + vdm-guidance, 3 steps, +inf in the latent gradient at step 1: that step is skipped
    (logged, counted), the Gaussians' Adam took 2 steps, M_ψ 2 updates (the skipped step's update rolled
    back), and everything in last.ckpt is finite.  On main, nan_to_num made it 3.4e38 and NaN spread."""
    trial = run_launch(
        os.path.join(CONFIGS, "vdm-gs.yaml"), _gs_vdm(tiny_sd, 3), exp_root=str(tmp_path),
        env=_faults(latent_grad={"steps": [1], "value": "inf"}),
    )
    out = run_launch.last_output
    assert "optimizer step 1 skipped: non-finite parameter gradient, latent gradient (vdm-guidance), loss" in out
    assert out.count("skipped: non-finite") == 1
    ckpt = torch.load(os.path.join(trial, "ckpts", "last.ckpt"), map_location="cpu", weights_only=True)
    assert _assert_all_finite(ckpt) > 1000
    adam = ckpt["optimizer_states"][0]["state"]
    assert {float(s["step"]) for s in adam.values()} == {2.0}  # the skipped step touched no moment
    assert ckpt["scoredistill_guidance_states"]["vdm-guidance"]["mapping"]["num_updates"] == 2
    assert ckpt["scoredistill_run"]["guidance_type"] == "vdm-guidance"
    metrics = open(os.path.join(trial, "csv_logs", "version_0", "metrics.csv")).read().splitlines()
    header = metrics[0].split(",")
    assert "train/nonfinite_skips" in header and "train/param_grad_norm" in header
    skips = [r.split(",")[header.index("train/nonfinite_skips")] for r in metrics[1:]]
    assert max(float(v) for v in skips if v) == 1.0


@pytest.mark.slow
def test_consecutive_nonfinite_steps_stop_the_run_with_the_setting_named(tiny_sd, tmp_path):
    """A persistent NaN render (every step) with system.max_nonfinite_skips=2: the run stops at the 2nd skipped
    step with an error naming the setting (on main it trained on silently, exit 0)."""
    with pytest.raises(RuntimeError) as err:
        run_launch(
            os.path.join(CONFIGS, "vdm-gs.yaml"), _gs_vdm(tiny_sd, 4, "system.max_nonfinite_skips=2"),
            exp_root=str(tmp_path), env=_faults(render={"steps": "all", "value": "nan"}),
        )
    msg = str(err.value)
    assert "2 consecutive optimizer steps had non-finite values and were skipped" in msg
    assert "raise system.max_nonfinite_skips (now 2)" in msg
    assert "VDM operator update (Eq. 17)" in msg


@pytest.mark.slow
def test_dreamfusion_system_with_a_pack_guidance_skips_a_nan_parameter_gradient(tiny_sd, tmp_path):
    """threestudio's own dreamfusion-system (vdm-nerf.yaml) gets the guard from the pack guidance: a NaN
    parameter gradient at step 0 is skipped; with system.guidance.max_nonfinite_skips=1 it stops the run."""
    common = tiny_overrides(tiny_sd, *nerf_cpu_overrides(), "data.batch_size=1", *VDM_CPU, prompt="a red ball", max_steps=2)
    trial = run_launch(os.path.join(CONFIGS, "vdm-nerf.yaml"), common, exp_root=str(tmp_path / "a"),
                       env=_faults(param_grad={"steps": [0], "value": "nan"}))
    assert "optimizer step 0 skipped: non-finite parameter gradient" in run_launch.last_output
    ckpt = torch.load(os.path.join(trial, "ckpts", "last.ckpt"), map_location="cpu", weights_only=True)
    _assert_all_finite(ckpt)
    assert ckpt["scoredistill_guidance_states"]["vdm-guidance"]["mapping"]["num_updates"] == 1
    with pytest.raises(RuntimeError, match=r"raise system\.guidance\.max_nonfinite_skips \(now 1\)"):
        run_launch(os.path.join(CONFIGS, "vdm-nerf.yaml"), common + ["system.guidance.max_nonfinite_skips=1"],
                   exp_root=str(tmp_path / "b"), env=_faults(param_grad={"steps": [0], "value": "nan"}))


@pytest.mark.slow
def test_hifa_system_skips_a_minus_inf_latent_gradient(tiny_sd, tmp_path):
    """hifa-system (configs/hifa-cpu-smoke.yaml, hifa-guidance, DPT disparity term): -inf in the latent
    gradient at step 1 of 2 is skipped and last.ckpt stays finite."""
    from harness import tiny_dpt_path

    overrides = [
        "system.prompt_processor.prompt=a hamburger",
        f"system.prompt_processor.pretrained_model_name_or_path={tiny_sd}",
        f"system.guidance.pretrained_model_name_or_path={tiny_sd}",
        f"system.disparity_model_name_or_path={tiny_dpt_path()}",
        "system.prompt_processor.spawn=false", "trainer.max_steps=2", "trainer.val_check_interval=2",
    ]
    trial = run_launch(os.path.join(CONFIGS, "hifa-cpu-smoke.yaml"), overrides, exp_root=str(tmp_path),
                       env=_faults(latent_grad={"steps": [1], "value": "-inf"}))
    out = run_launch.last_output
    assert "optimizer step 1 skipped: non-finite parameter gradient, latent gradient (hifa-guidance)" in out
    assert out.count("skipped: non-finite") == 1
    ckpt = torch.load(os.path.join(trial, "ckpts", "last.ckpt"), map_location="cpu", weights_only=True)
    assert _assert_all_finite(ckpt) > 100
    assert {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()} == {1.0}


@pytest.mark.slow
def test_gsplat_system_with_threestudio_sd_guidance_skips_and_does_not_densify_the_skipped_step(tmp_path):
    """configs/gs-sds.yaml (threestudio's own stable-diffusion-guidance: the guard comes from gsplat-system),
    densifying after every step: a NaN parameter gradient at step 0 skips the step and its densification
    (the strategy's gradient statistics would be NaN); step 1 trains and densifies."""
    from harness import tiny_sd_f8_path

    sd = tiny_sd_f8_path()
    overrides = [
        f"system.guidance.pretrained_model_name_or_path={sd}", f"system.prompt_processor.pretrained_model_name_or_path={sd}",
        "system.prompt_processor.spawn=false", "system.guidance.half_precision_weights=false",
        "system.prompt_processor.prompt=a red ball", "trainer.precision=32",
        "data.width=32", "data.height=32", "data.eval_width=32", "data.eval_height=32",
        "data.batch_size=1", "data.n_val_views=1", "data.n_test_views=2",
        "trainer.max_steps=2", "trainer.val_check_interval=2",
        "system.geometry.init=sphere", "system.geometry.num_points=200", "system.geometry.upsample_to=0",
        "system.strategy.refine_start_iter=0", "system.strategy.refine_every=1", "system.strategy.grow_grad2d=0.0",
        "system.position_lr.max_steps=2",
    ]
    trial = run_launch(os.path.join(CONFIGS, "gs-sds.yaml"), overrides, exp_root=str(tmp_path),
                       env=_faults(param_grad={"steps": [0], "value": "nan"}))
    out = run_launch.last_output
    assert "optimizer step 0 skipped: non-finite parameter gradient" in out
    assert "step 0: densification" not in out and "step 1: densification 200 ->" in out
    ckpt = torch.load(os.path.join(trial, "ckpts", "last.ckpt"), map_location="cpu", weights_only=True)
    _assert_all_finite(ckpt)
