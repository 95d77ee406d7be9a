"""Integration: threestudio guidance ``lods-guidance`` (scoredistill.guidance.lods_guidance) on the tiny SD with
threestudio's prompt processor, checkpoint hooks, and the three LODS configs through threestudio's launch.py."""
import os

import pytest
import torch

from harness import (
    REPO,
    gs_cpu_overrides,
    make_prompt_utils,
    nerf_cpu_overrides,
    run_launch,
    tiny_guidance_config,
    tiny_overrides,
)

pytestmark = pytest.mark.threestudio

CONFIGS = os.path.join(REPO, "configs")


@pytest.fixture(scope="module")
def env(tiny_sd, threestudio_module, tmp_path_factory):
    prompt_utils = make_prompt_utils(threestudio_module, tiny_sd, tmp_path_factory.mktemp("ts_cwd"), negative_prompt="blurry")
    return threestudio_module, prompt_utils


def _guidance(threestudio, tiny_sd, **kw):
    return threestudio.find("lods-guidance")(tiny_guidance_config(tiny_sd, image_size=16, **kw))


VIEW = (torch.tensor([10.0, 20.0]), torch.tensor([0.0, 120.0]), torch.tensor([2.0, 2.0]))


def test_defaults_are_the_papers(env, tiny_sd):
    threestudio, prompt_utils = env
    g = _guidance(threestudio, tiny_sd)
    assert g.cfg.guidance_scale == 1000.0 and g.cfg.variant == "embedding" and g.cfg.weighting_strategy == "sds"
    assert g.learner.lr == 1e-5
    assert g.max_step == 980
    g.update_step(0, 5000)
    assert g.max_step == 980
    g.update_step(0, 5001)
    assert g.max_step == 500


def test_embedding_guidance_grad_alpha_init_and_cost(env, tiny_sd):
    threestudio, prompt_utils = env
    g = _guidance(threestudio, tiny_sd, aux_lr=1e-2)
    assert g.parameters() == []  # α is created on first use
    seen = {}
    step = g.learner.step

    def spy(latents, t, cond, uncond, **kw):
        seen["uncond"] = uncond.clone()
        seen["alpha0"] = None if g.learner.alpha is None else g.learner.alpha.detach().clone()
        out = step(latents, t, cond, uncond, **kw)
        seen["grad"] = out["grad"]
        return out

    g.learner.step = spy
    lat = torch.randn(2, 8, 8, 4, requires_grad=True)
    out = g(lat, prompt_utils, *VIEW, rgb_as_latents=True)
    # α initialised from the prompt processor's unconditional (here: negative-prompt) embedding, then updated once
    torch.testing.assert_close(seen["uncond"][0], prompt_utils.uncond_text_embeddings[0].to(seen["uncond"]))
    alpha = g.parameters()[0]
    assert alpha.shape == (77, 32) and not torch.equal(alpha.detach(), seen["uncond"][0])
    assert out["lods_aux_steps"] == 1 and out["lods_aux_loss"] > 0
    assert (out["lods_unet_calls"], out["lods_unet_samples"], out["lods_unet_backward_samples"]) == (2, 6, 2)
    assert g.unet_calls == 2 and g.unet_samples == 6  # the base's counter agrees
    assert not any(k.startswith("loss_") and k != "loss_sds" for k in out)  # nothing for the system to weight
    out["loss_sds"].backward()
    assert alpha.grad is None  # no gradient from the 3D loss
    g_lat = torch.nn.functional.interpolate(lat.detach().permute(0, 3, 1, 2), (8, 8))
    assert g_lat.shape == seen["grad"].shape
    torch.testing.assert_close(lat.grad.permute(0, 3, 1, 2), seen["grad"] / 2)


def test_disabled_update_is_normalised_sds(env, tiny_sd):
    threestudio, prompt_utils = env
    g = _guidance(threestudio, tiny_sd, aux_update=False, guidance_scale=50.0)
    lat = torch.randn(2, 8, 8, 4)
    out = g(lat, prompt_utils, *VIEW, rgb_as_latents=True)
    assert "lods_aux_loss" not in out and out["lods_unet_calls"] == 1 and out["lods_unet_samples"] == 4
    torch.testing.assert_close(g.parameters()[0].detach(), prompt_utils.uncond_text_embeddings[0].float())


def test_lora_guidance_runs_on_the_tiny_unet_and_merged_cost(env, tiny_sd):
    threestudio, prompt_utils = env
    g = _guidance(threestudio, tiny_sd, variant="lora", aux_lr=1e-2, lora_rank=2)
    params = g.parameters()
    assert params and sum(p.numel() for p in params) > 0
    before = [p.detach().clone() for p in params]
    lat = torch.randn(2, 8, 8, 4, requires_grad=True)
    out = g(lat, prompt_utils, *VIEW, rgb_as_latents=True)
    assert (out["lods_unet_calls"], out["lods_unet_samples"], out["lods_unet_backward_samples"]) == (3, 6, 2)
    out["loss_sds"].backward()
    assert all(p.grad is None for p in params)
    assert any(not torch.equal(p, q) for p, q in zip(params, before))
    state = g.state_dict()
    assert state["alpha"] is None and sum(v.numel() for v in state["lora"]) == sum(p.numel() for p in params)
    g2 = _guidance(threestudio, tiny_sd, variant="lora", aux_lr=1e-2, lora_rank=2, merged_forward=True)
    g2.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(g2.parameters(), params))
    out = g2(lat.detach(), prompt_utils, *VIEW, rgb_as_latents=True)
    assert (out["lods_unet_calls"], out["lods_unet_samples"], out["lods_unet_backward_samples"]) == (2, 4, 2)


def test_checkpoint_hooks_attach_save_and_restore_exactly(env, tiny_sd, tmp_path):
    import pytorch_lightning as pl
    from threestudio.utils.base import Updateable

    from scoredistill.guidance.lods_guidance import CHECKPOINT_KEY

    KEY = "lods-guidance"
    threestudio, prompt_utils = env

    class System(pl.LightningModule, Updateable):
        def on_save_checkpoint(self, checkpoint):
            checkpoint["system_own"] = 1

    sys1 = System()
    g = _guidance(threestudio, tiny_sd, aux_lr=1e-2)
    sys1.guidance = g
    sys1.do_update_step(0, 0)  # what BaseSystem.on_train_batch_start does: the guidance finds its system
    assert g._checkpoint_system is sys1
    for _ in range(2):
        g(torch.randn(2, 8, 8, 4), prompt_utils, *VIEW, rgb_as_latents=True)
    ckpt = {}
    sys1.on_save_checkpoint(ckpt)
    assert ckpt["system_own"] == 1 and ckpt[CHECKPOINT_KEY][KEY]["aux_steps"] == 2
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)

    # guidance built before the restore (e.g. in configure): on_load_checkpoint restores it
    sys2 = System()
    g2 = _guidance(threestudio, tiny_sd, aux_lr=1e-2)
    sys2.guidance = g2
    g2.attach_checkpointing(sys2)
    sys2.on_load_checkpoint(torch.load(path, weights_only=True))
    assert torch.equal(g2.parameters()[0], g.parameters()[0]) and g2.learner.aux_steps == 2

    # guidance built after the restore (dreamfusion-system: on_fit_start): restored from trainer.ckpt_path
    from types import SimpleNamespace

    sys3 = System()
    sys3._trainer = SimpleNamespace(ckpt_path=str(path))
    g3 = _guidance(threestudio, tiny_sd, aux_lr=1e-2)
    sys3.guidance = g3
    sys3.do_update_step(0, 2)
    calls = {}
    step = g3.learner.step

    def spy(*a, **k):
        calls["alpha"] = g3.learner.alpha.detach().clone()
        return step(*a, **k)

    g3.learner.step = spy
    g3(torch.randn(2, 8, 8, 4), prompt_utils, *VIEW, rgb_as_latents=True)
    assert torch.equal(calls["alpha"], g.parameters()[0].detach())  # the step used the restored α
    assert g3.learner.aux_steps == 3
    torch.testing.assert_close(
        g3.learner.optimizer.state_dict()["state"][0]["step"], torch.tensor(3.0)
    )  # the Adam state continued


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(guidance_scale=0.0), "guidance_scale"),
        (dict(guidance_scale=-1000.0), "guidance_scale"),
        (dict(variant="vsd"), "variant must be one of"),
        (dict(variant="lora", lora_rank=0), "lora_rank must be an integer >= 1"),
        (dict(variant="lora", lora_scale=-1.0), "lora_scale"),
        (dict(aux_lr=-1.0), "aux_lr"),
        (dict(aux_optimizer="Nope"), "aux_optimizer"),
        (dict(aux_min_step_percent=0.9, aux_max_step_percent=0.1), "aux_min_step_percent"),
    ],
)
def test_bad_config_raises_before_loading(threestudio_module, kw, match, monkeypatch):
    import diffusers

    def boom(*a, **k):
        raise AssertionError("model loaded before validation")

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", boom)
    with pytest.raises(ValueError, match=match):
        threestudio_module.find("lods-guidance")(
            dict(pretrained_model_name_or_path="/nonexistent", half_precision_weights=False, **kw)
        )


# ---------------------------------------------------------------------------------------- launch.py
def _common(tiny_sd):
    return tiny_overrides(tiny_sd, max_steps=2)


GS_CPU = gs_cpu_overrides(num_points=256)

NERF_CPU = nerf_cpu_overrides(tiny_mlp=True)


def _ckpt(trial):
    from scoredistill.integrity.checkpointing import CHECKPOINT_KEY

    ckpt = torch.load(os.path.join(trial, "ckpts", "last.ckpt"), map_location="cpu", weights_only=True)
    assert not any(k.startswith("guidance") or ".unet." in k or "vae" in k for k in ckpt["state_dict"])
    return ckpt, ckpt[CHECKPOINT_KEY]["lods-guidance"]


@pytest.mark.slow
def test_lods_embedding_gs_trains_saves_and_resumes(tiny_sd, tmp_path):
    cfg = os.path.join(CONFIGS, "lods-embedding-gs.yaml")
    trial = run_launch(cfg, _common(tiny_sd) + GS_CPU, exp_root=str(tmp_path / "run1"))
    ckpt, state = _ckpt(trial)
    assert state["variant"] == "embedding" and state["aux_steps"] == 2
    assert state["alpha"].shape == (77, 32)
    assert os.path.isdir(os.path.join(trial, "save"))
    # resume: the guidance is built in on_fit_start (after Lightning restored the module) -> trainer.ckpt_path
    resumed = run_launch(
        cfg,
        _common(tiny_sd) + GS_CPU + [f"resume={os.path.join(trial, 'ckpts', 'last.ckpt')}", "trainer.max_steps=4",
                                     "trainer.val_check_interval=4"],
        exp_root=str(tmp_path / "run2"),
    )
    assert "restored embedding state (aux step 2)" in run_launch.last_output
    _, state2 = _ckpt(resumed)
    assert state2["aux_steps"] == 4
    assert state2["optimizer"]["state"][0]["step"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lods-embedding-nerf.yaml", "lods-lora-nerf.yaml"])
def test_lods_nerf_configs_train_on_cpu_with_pure_torch_parts(tiny_sd, tmp_path, name):
    extra = ["system.guidance.lora_rank=2"] if "lora" in name else []
    # the config's [256, 512] schedule (batch_size [1, 1]) becomes one 32² resolution here: one batch size with it
    extra += ["data.batch_size=1"]
    trial = run_launch(os.path.join(CONFIGS, name), _common(tiny_sd) + NERF_CPU + extra, exp_root=str(tmp_path))
    _, state = _ckpt(trial)
    assert state["aux_steps"] == 2
    if "lora" in name:
        assert state["variant"] == "lora" and len(state["lora"]) > 0


# ---------------------------------------------------------------------------------------- CFG infinity (issue 14)
def test_cfg_infinity_from_a_config_is_the_limit_of_eq7(env, tiny_sd):
    """The paper's 2D setting (A.1: CFG "infinity") from a config: ``guidance_scale: .inf`` (YAML) or
    ``guidance_scale=inf`` (command line) passes the shared base's check for ``lods-guidance`` only, and its
    gradient is Eq. 7's s → ∞ limit (equal to s = 1e12 with the same noise and timestep)."""
    from omegaconf import OmegaConf

    threestudio, prompt_utils = env
    yaml_value = OmegaConf.create("guidance_scale: .inf").guidance_scale  # YAML
    cli_value = OmegaConf.from_dotlist(["guidance_scale=inf"]).guidance_scale  # command line: the string "inf"
    assert yaml_value == float("inf") and cli_value == "inf"
    assert _guidance(threestudio, tiny_sd, guidance_scale=cli_value).cfg.guidance_scale == float("inf")
    lat = torch.randn(2, 8, 8, 4, generator=torch.Generator().manual_seed(0))
    grads = {}
    for s in (yaml_value, 1e12):
        g = _guidance(threestudio, tiny_sd, guidance_scale=s, aux_update=False)
        assert g.cfg.guidance_scale == s
        torch.manual_seed(3)
        x = lat.clone().requires_grad_(True)
        out = g(x, prompt_utils, *VIEW, rgb_as_latents=True)
        out["loss_sds"].backward()
        grads[s] = x.grad
    assert torch.isfinite(grads[float("inf")]).all() and grads[float("inf")].abs().sum() > 0
    torch.testing.assert_close(grads[float("inf")], grads[1e12], rtol=1e-5, atol=1e-7)


def test_cfg_infinity_still_refused_by_guidances_without_the_limit(threestudio_module, monkeypatch):
    import diffusers

    def boom(*a, **k):
        raise AssertionError("model loaded before validation")

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", boom)
    for name in ("hifa-guidance", "vdm-guidance"):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number > 0"):
            threestudio_module.find(name)(
                dict(pretrained_model_name_or_path="/nonexistent", half_precision_weights=False, guidance_scale=float("inf"))
            )
    with pytest.raises(ValueError, match="guidance_scale"):
        threestudio_module.find("lods-guidance")(
            dict(pretrained_model_name_or_path="/nonexistent", half_precision_weights=False, guidance_scale=float("nan"))
        )
