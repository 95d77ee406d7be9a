"""Integration: threestudio guidance ``vdm-guidance`` (tiny SD, threestudio's prompt processor, launch.py)."""
import copy
import glob
import os

import pytest
import torch

from harness import (
    gs_cpu_overrides,
    make_prompt_utils,
    nerf_cpu_overrides,
    run_launch,
    tiny_guidance_config,
    tiny_overrides,
)

pytestmark = pytest.mark.threestudio

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(os.path.dirname(HERE), "configs")


@pytest.fixture(scope="module")
def env(tiny_sd, threestudio_module, tmp_path_factory):
    return threestudio_module, make_prompt_utils(threestudio_module, tiny_sd, tmp_path_factory.mktemp("ts_cwd"))


def _cfg(tiny_sd, **kw):
    return tiny_guidance_config(tiny_sd, image_size=32, **kw)


def test_defaults_are_the_papers(env, tiny_sd):
    threestudio, _ = env
    g = threestudio.find("vdm-guidance")(_cfg(tiny_sd))
    assert g.cfg.guidance_scale == 7.5 and g.cfg.dca_cutoff == 300 and g.cfg.operator_lr == 0.01
    assert (g.min_step, g.max_step) == (0, 999)  # t ~ U(0, 1000)
    assert g.cfg.operator_input == "cfg" and g.cfg.operator_type == "ulite"
    assert g.cfg.cfg_form == "standard" and g.cfg.x_t_jacobian == "dropped"  # docs/vdm.md "Three choices"
    assert sum(p.numel() for p in g.parameters()) == 879_252
    assert all(not p.requires_grad for p in g.unet.parameters())


@pytest.mark.parametrize("operator_input,x_t_jacobian", [("cfg", "dropped"), ("cond", "dropped"), ("cfg", "sqrt_alpha_bar")])
def test_gradient_is_eq19_one_cfg_unet_call_no_unet_grad(env, tiny_sd, operator_input, x_t_jacobian):
    threestudio, prompt_utils = env
    g = threestudio.find("vdm-guidance")(
        _cfg(tiny_sd, operator_input=operator_input, operator_widths=[8, 16, 32], x_t_jacobian=x_t_jacobian)
    )
    B = 2
    t = torch.tensor([120, 700])
    g.sample_timesteps = lambda batch_size, generator=None: t  # fixed timesteps on both sides of the cut-off
    elev, azim, dist = torch.tensor([10.0, 20.0]), torch.tensor([0.0, 180.0]), torch.tensor([2.0, 2.0])
    lat = torch.randn(B, 16, 16, 4, requires_grad=True)
    psi_before = copy.deepcopy(g.mapping.model)
    torch.manual_seed(11)
    out = g(lat, prompt_utils, elev, azim, dist, rgb_as_latents=True)
    assert g.unet_calls == 1 and g.unet_samples == 2 * B  # one CFG call of batch 2B
    assert out["vdm_unet_calls"] == 1 and out["vdm_unet_samples"] == 2 * B
    assert g.mapping.num_updates == 1 and out["vdm_operator_updates"] == 1
    psi_grads = [p.grad.clone() for p in g.parameters()]  # left by the operator's own Eq. 17 backward
    out["loss_sds"].backward()
    assert all(p.grad is None for p in g.unet.parameters())  # no gradient into the diffusion UNet
    assert all(torch.equal(p.grad, q) for p, q in zip(g.parameters(), psi_grads))  # θ's loss does not reach ψ

    # independent Eq. 19
    torch.manual_seed(11)
    x = lat.detach().permute(0, 3, 1, 2)
    noise = torch.randn_like(x)
    abar = g.scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    x_t = (abar.sqrt() * x.double() + (1 - abar).sqrt() * noise.double()).float()
    cond, uncond = prompt_utils.get_text_embeddings(elev, azim, dist, True).chunk(2)
    with torch.no_grad():
        e_c = g.unet(x_t, t, encoder_hidden_states=cond).sample
        e_u = g.unet(x_t, t, encoder_hidden_states=uncond).sample
        e_cfg = e_u + 7.5 * (e_c - e_u)
        m = psi_before(e_cfg if operator_input == "cfg" else e_c)
    lam = torch.where(t.view(-1, 1, 1, 1) <= 300, 1 - abar, torch.ones_like(abar))
    jac = abar.sqrt() if x_t_jacobian == "sqrt_alpha_bar" else 1.0  # ∂x_t/∂x of Eq. 19, kept or dropped
    expected = (jac * (1 - abar) * (e_cfg.double() - lam * m.double())).float()
    assert torch.allclose(lat.grad.permute(0, 3, 1, 2) * B, expected, atol=1e-4, rtol=1e-4)
    assert float(out["vdm_lambda"]) == pytest.approx(float(lam.mean()), rel=1e-5)


def test_config_errors_before_loading(env):
    threestudio, _ = env
    bad = "/nonexistent/model"  # loading would raise OSError; validation must come first
    for kw, name in [
        (dict(operator_input="uncond"), "operator_input"),
        (dict(operator_type="mlp"), "operator_type"),
        (dict(dca_cutoff=2000), "dca_cutoff"),
        (dict(operator_lr=-1.0), "operator_lr"),
        (dict(cfg_form="x"), "cfg_form"),
        (dict(weighting_strategy="x"), "weighting_strategy"),
        (dict(operator_widths=[8]), "operator_widths"),
        (dict(operator_latent_size=0), "operator_latent_size"),
        (dict(guidance_scale=0.0), "guidance_scale"),
        (dict(x_t_jacobian="alpha"), "x_t_jacobian"),
    ]:
        with pytest.raises(ValueError, match=name):
            threestudio.find("vdm-guidance")(dict(pretrained_model_name_or_path=bad, **kw))


def test_ablation_operators_and_luciddreamer_weighting(env, tiny_sd):
    threestudio, prompt_utils = env
    g = threestudio.find("vdm-guidance")(
        _cfg(tiny_sd, operator_type="linear", learnable_noise=True, weighting_strategy="luciddreamer", dca=False)
    )
    names = {n for n, _ in g.mapping.model.named_parameters()}
    assert names == {"operator.weight", "observation_noise"}
    assert g.mapping.model.operator.weight.shape == (4, 16, 16)
    lat = torch.randn(2, 16, 16, 4, requires_grad=True)
    out = g(lat, prompt_utils, torch.zeros(2), torch.zeros(2), torch.full((2,), 2.0), rgb_as_latents=True)
    assert float(out["vdm_lambda"]) == 1.0  # DCA off
    out["loss_sds"].backward()
    assert torch.isfinite(lat.grad).all()


# ----------------------------------------------------------------------------- launch.py runs
def _ckpt_state(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["scoredistill_guidance_states"]["vdm-guidance"]


#: a small operator, checkpoints every 2 steps, on top of the tiny-SD CPU overrides
VDM_CPU = ("system.guidance.operator_widths=[8,16,32]", "checkpoint.every_n_train_steps=2")


def _train_then_resume(config, common, tmp_path):
    """Train 2 steps (the checkpoint holds 2 operator updates), resume to step 3 from it (the operator continues
    from the saved state: 3 updates).  Returns the first trial folder."""
    config = os.path.join(CONFIGS, config)
    trial = run_launch(config, common + ["trainer.max_steps=2", "trainer.val_check_interval=2"], exp_root=str(tmp_path / "out"))
    ckpt = os.path.join(trial, "ckpts", "last.ckpt")
    assert os.path.exists(ckpt)
    s2 = _ckpt_state(ckpt)
    assert s2["mapping"]["num_updates"] == 2
    trial2 = run_launch(config, common + ["trainer.max_steps=3", "trainer.val_check_interval=3", f"resume={ckpt}"],
                        exp_root=str(tmp_path / "out2"))
    assert "vdm-guidance: operator restored (2 updates)" in run_launch.last_output
    s3 = _ckpt_state(os.path.join(trial2, "ckpts", "last.ckpt"))
    assert s3["mapping"]["num_updates"] == 3
    return trial


@pytest.mark.slow
def test_vdm_gs_runs_end_to_end_and_resumes(tiny_sd, tmp_path):
    common = tiny_overrides(tiny_sd, *gs_cpu_overrides(num_points=300), *VDM_CPU, prompt="a red ball")
    trial = _train_then_resume("vdm-gs.yaml", common, tmp_path)
    assert glob.glob(os.path.join(trial, "save", "*test*.mp4")) or glob.glob(os.path.join(trial, "save", "it2-test", "*"))


@pytest.mark.slow
def test_vdm_nerf_trains_in_dreamfusion_system_and_resumes(tiny_sd, tmp_path):
    # tcnn-free NeRF (pure torch) and the pack's CPU-capable volume renderer
    common = tiny_overrides(tiny_sd, *nerf_cpu_overrides(), "data.batch_size=1", *VDM_CPU, prompt="a red ball")
    _train_then_resume("vdm-nerf.yaml", common, tmp_path)
