"""Integration: the shared guidance base (scoredistill.guidance.base) on the tiny SD with threestudio's prompt processor."""
import pytest
import torch

from harness import make_prompt_utils, tiny_guidance_config

pytestmark = pytest.mark.threestudio


@pytest.fixture(scope="module")
def base_env(tiny_sd, threestudio_module, tmp_path_factory):
    prompt_utils = make_prompt_utils(threestudio_module, tiny_sd, tmp_path_factory.mktemp("ts_cwd"), negative_prompt="blurry")
    return threestudio_module, prompt_utils


def _make_subclass():
    from scoredistill.maths.diffusion import add_noise, sds_weight
    from scoredistill.guidance.base import ScoreDistillationGuidance

    class TrivialSDS(ScoreDistillationGuidance):
        def compute_grad(self, latents, prompt_utils, elevation, azimuth, camera_distances, **kwargs):
            B = latents.shape[0]
            t = self.sample_timesteps(B)
            noise = torch.randn_like(latents)
            with torch.no_grad():
                x_t = add_noise(latents, noise, self.alphas_cumprod, t)
                pred = self.predict_noise_cfg(x_t, t, prompt_utils, elevation, azimuth, camera_distances)["noise_pred"]
            grad = sds_weight(self.alphas_cumprod, t, self.cfg.weighting_strategy, like=latents) * (pred - noise)
            self.last_grad = grad
            return {"grad": grad, "t_mean": t.float().mean()}

    return TrivialSDS


def _cfg(tiny_sd, **kw):
    return tiny_guidance_config(tiny_sd, image_size=32, **{"guidance_scale": 7.5, **kw})


def test_base_loads_counts_and_loss_gradient_equals_grad(base_env, tiny_sd):
    threestudio, prompt_utils = base_env
    guidance = _make_subclass()(_cfg(tiny_sd))
    assert guidance.num_train_timesteps == 1000
    assert guidance.alphas_cumprod.shape == (1000,)
    assert guidance.vae_scale_factor == 2 and guidance.latent_size == 16
    assert (guidance.min_step, guidance.max_step) == (20, 980)
    B = 2
    rgb = torch.rand(B, 24, 24, 3, requires_grad=True)
    elev, azim, dist = torch.tensor([10.0, 70.0]), torch.tensor([0.0, 180.0]), torch.tensor([2.0, 2.0])
    # latents path with gradient: check d loss_sds / d latents = grad / B through the render
    latents = guidance.get_latents(rgb)
    assert latents.shape == (B, 4, 16, 16)
    out = guidance(rgb, prompt_utils, elev, azim, dist)
    assert set(out) >= {"loss_sds", "grad_norm", "min_step", "max_step", "t_mean"}
    assert guidance.unet_calls == 1 and guidance.unet_samples == 2 * B  # one batched CFG call
    grad = guidance.last_grad
    assert torch.allclose(out["grad_norm"], grad.norm())
    # rgb_as_latents: the loss gradient w.r.t. the (resized) latents is exactly grad / B
    lat = torch.randn(B, 16, 16, 4, requires_grad=True)
    out = guidance(lat, prompt_utils, elev, azim, dist, rgb_as_latents=True)
    out["loss_sds"].backward()
    g = guidance.last_grad.permute(0, 2, 3, 1) / B
    assert torch.allclose(lat.grad, g, atol=1e-6)
    # B = 1: exactly grad
    lat1 = torch.randn(1, 16, 16, 4, requires_grad=True)
    out = guidance(lat1, prompt_utils, elev[:1], azim[:1], dist[:1], rgb_as_latents=True)
    out["loss_sds"].backward()
    assert torch.allclose(lat1.grad, guidance.last_grad.permute(0, 2, 3, 1), atol=1e-6)


def test_text_embeddings_view_dependent_and_negative(base_env, tiny_sd):
    threestudio, prompt_utils = base_env
    guidance = _make_subclass()(_cfg(tiny_sd))
    elev, azim, dist = torch.tensor([10.0, 10.0, 70.0]), torch.tensor([0.0, 180.0, 0.0]), torch.full((3,), 2.0)
    cond, uncond = guidance.get_text_embeddings(prompt_utils, elev, azim, dist)
    assert cond.shape == uncond.shape == (3, 77, 32)
    idx = prompt_utils.direction2idx
    assert torch.allclose(cond[0], prompt_utils.text_embeddings_vd[idx["front"]])
    assert torch.allclose(cond[1], prompt_utils.text_embeddings_vd[idx["back"]])
    assert torch.allclose(cond[2], prompt_utils.text_embeddings_vd[idx["overhead"]])
    assert torch.allclose(uncond[0], prompt_utils.uncond_text_embeddings)  # the negative prompt's embedding


def test_perp_neg_one_call_of_4B(tiny_sd, threestudio_module, tmp_path):
    prompt_utils = make_prompt_utils(threestudio_module, tiny_sd, tmp_path, use_perp_neg=True)
    guidance = _make_subclass()(_cfg(tiny_sd))
    B = 2
    rgb = torch.rand(B, 16, 16, 3)
    guidance(rgb, prompt_utils, torch.tensor([10.0, 10.0]), torch.tensor([30.0, 120.0]), torch.full((B,), 2.0))
    assert guidance.unet_calls == 1 and guidance.unet_samples == 4 * B


def test_update_step_schedules(base_env, tiny_sd):
    guidance = _make_subclass()(_cfg(tiny_sd, max_step_percent=[0, 0.98, 0.5, 100], grad_clip=[0, 2.0, 8.0, 100]))
    assert guidance.max_step == 980
    guidance.update_step(0, 50)
    assert guidance.max_step == int(1000 * 0.74)
    assert guidance.grad_clip_val == pytest.approx(5.0)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(guidance_scale=0.0), "guidance_scale must be a finite number > 0"),
        (dict(weighting_strategy="x"), "weighting_strategy must be one of"),
        (dict(min_step_percent=0.5, max_step_percent=0.4), "min_step_percent .* must be <= max_step_percent"),
        (dict(max_step_percent=1.5), r"max_step_percent must be in \[0, 1\]"),
        (dict(image_size=30), "image_size must be a positive multiple of 8"),
        (dict(trainer_max_steps=0), "trainer_max_steps must be an integer >= 1"),
        (dict(grad_clip=-1.0), "grad_clip must be > 0"),
    ],
)
def test_bad_config_raises_before_loading(threestudio_module, kw, match, monkeypatch):
    import diffusers

    def boom(*a, **k):
        raise AssertionError("model loaded before validation")

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", boom)
    with pytest.raises(ValueError, match=match):
        _make_subclass()(dict(pretrained_model_name_or_path="/nonexistent", half_precision_weights=False, **kw))
