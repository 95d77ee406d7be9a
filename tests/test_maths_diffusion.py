"""Unit tests of scoredistill.maths.diffusion (no threestudio): values against independent formulas/diffusers."""
import math

import pytest
import torch

from scoredistill.maths import diffusion as D
from scoredistill.testing.exact_score_prior import sd_alphas_cumprod

AC = sd_alphas_cumprod().float()


def test_alphas_match_diffusers_ddim_scheduler():
    from diffusers import DDIMScheduler

    from scoredistill.testing.tiny_models import SD_SCHEDULER_CONFIG

    sch = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    assert torch.allclose(sch.alphas_cumprod.float(), AC, atol=1e-6)


@pytest.mark.parametrize("B", [1, 3])
def test_grad_to_loss_gradient_is_grad_over_batch(B):
    torch.manual_seed(0)
    latents = torch.randn(B, 4, 5, 5, requires_grad=True)
    grad = torch.randn(B, 4, 5, 5)
    loss = D.grad_to_loss(latents, grad)
    loss.backward()
    assert torch.allclose(latents.grad, grad / B, atol=1e-6)
    assert loss.item() == pytest.approx(0.5 * grad.pow(2).sum().item() / B, rel=1e-5)
    with pytest.raises(ValueError, match="grad shape"):
        D.grad_to_loss(latents, grad[:, :2])


def test_cfg_combine():
    c, u = torch.tensor([3.0]), torch.tensor([1.0])
    assert D.cfg_combine(c, u, 7.5).item() == pytest.approx(1 + 7.5 * 2)
    assert D.cfg_combine(c, u, 1.0).item() == 3.0
    assert D.cfg_combine(c, u, 0.0).item() == 1.0


def test_add_noise_matches_diffusers_and_tweedie_inverts_it():
    from diffusers import DDPMScheduler

    from scoredistill.testing.tiny_models import SD_SCHEDULER_CONFIG

    cfg = {k: v for k, v in SD_SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one", "steps_offset")}
    sch = DDPMScheduler(**cfg)
    torch.manual_seed(1)
    x0, eps = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    t = torch.tensor([0, 500, 999])
    ours = D.add_noise(x0, eps, AC, t)
    assert torch.allclose(ours, sch.add_noise(x0, eps, t), atol=1e-5)
    assert torch.allclose(D.tweedie_x0(ours, eps, AC, t), x0, atol=1e-3)
    # scalar timestep broadcast
    assert torch.allclose(D.add_noise(x0, eps, AC, 250), math.sqrt(AC[250]) * x0 + math.sqrt(1 - AC[250]) * eps, atol=1e-6)


def test_timestep_out_of_range_raises():
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match=r"timestep must be in \[0, 1000\)"):
        D.add_noise(x, x, AC, 1000)
    with pytest.raises(ValueError, match="timestep"):
        D.tweedie_x0(x, x, AC, torch.tensor([-1]))


def test_ddim_step_matches_diffusers_ddim_scheduler_step():
    from diffusers import DDIMScheduler

    from scoredistill.testing.tiny_models import SD_SCHEDULER_CONFIG

    sch = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    sch.set_timesteps(50)  # step 20, steps_offset 1: 981, 961, ...
    torch.manual_seed(2)
    x, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = int(sch.timesteps[10])
    ref = sch.step(eps, t, x, eta=0.0).prev_sample
    assert torch.allclose(D.ddim_step(x, eps, AC, t, t - 20), ref, atol=1e-5)


def test_ddim_step_equals_eq6_delta_form_and_round_trips():
    torch.manual_seed(3)
    x, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t0, t1 = 100, 180
    a0, a1 = AC[t0].item(), AC[t1].item()
    delta = math.sqrt((1 - a1) / a1) - math.sqrt((1 - a0) / a0)
    up = D.ddim_step(x, eps, AC, t0, t1)
    assert torch.allclose(up, math.sqrt(a1) * (x / math.sqrt(a0) + delta * eps), atol=1e-5)
    assert torch.allclose(D.ddim_delta(AC, t0, t1, x).squeeze(), torch.tensor(delta), atol=1e-6)
    # with the same noise prediction, down-step undoes up-step
    assert torch.allclose(D.ddim_step(up, eps, AC, t1, t0), x, atol=1e-5)
    # per-sample timesteps
    tt0, tt1 = torch.tensor([100, 300]), torch.tensor([180, 400])
    both = D.ddim_step(x, eps, AC, tt0, tt1)
    assert torch.allclose(both[1:], D.ddim_step(x[1:], eps[1:], AC, 300, 400), atol=1e-6)


def test_sds_weight_strategies():
    t = torch.tensor([10, 500])
    a = AC[t].view(-1, 1, 1, 1)
    assert torch.allclose(D.sds_weight(AC, t, "sds"), 1 - a)
    assert torch.allclose(D.sds_weight(AC, t, "uniform"), torch.ones_like(a))
    assert torch.allclose(D.sds_weight(AC, t, "fantasia3d"), a.sqrt() * (1 - a))
    with pytest.raises(ValueError, match="weighting_strategy must be one of"):
        D.sds_weight(AC, t, "bogus")


def test_timestep_helpers():
    assert D.step_range(0.02, 0.98) == (20, 980)
    assert D.step_range(0.0, 1.0) == (0, 999)
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
        D.step_range(-0.1, 0.5)
    with pytest.raises(ValueError, match="must be <= max_step_percent"):
        D.step_range(0.6, 0.5)
    g = torch.Generator().manual_seed(0)
    ts = D.sample_timesteps(2000, 20, 25, generator=g)
    assert ts.dtype == torch.long and set(ts.tolist()) == set(range(20, 26))
    assert D.linear_anneal(480, 300, 0, 100) == 480
    assert D.linear_anneal(480, 300, 50, 100) == 390
    assert D.linear_anneal(480, 300, 200, 100) == 300


def test_perp_neg_combine():
    torch.manual_seed(4)
    B = 2
    pos, unc = torch.randn(B, 4, 3, 3), torch.randn(B, 4, 3, 3)
    neg = torch.randn(2 * B, 4, 3, 3)
    # zero weights -> plain CFG
    assert torch.allclose(D.perp_neg_combine(pos, unc, neg, torch.zeros(B, 2), 7.5), D.cfg_combine(pos, unc, 7.5))
    p = D.perpendicular_component(neg[:B], pos)
    assert torch.allclose((p * pos).flatten(1).sum(-1), torch.zeros(B), atol=1e-4)
    w = torch.tensor([[-1.0, 0.0], [0.5, -2.0]])
    out = D.perp_neg_combine(pos, unc, neg, w, 3.0)
    e_pos = pos - unc
    ref = torch.stack([
        unc[b] + 3.0 * (e_pos[b] + sum(
            w[b, i] * D.perpendicular_component((neg[b * 2 + i] - unc[b])[None], e_pos[b][None])[0] for i in range(2)))
        for b in range(B)
    ])
    assert torch.allclose(out, ref, atol=1e-5)


def test_sds_grad_one_batched_call_and_value():
    calls = []

    def eps_fn(x, t, emb):
        calls.append(x.shape[0])
        return 0.1 * x + emb[:, 0, :1, None, None] * torch.ones_like(x)

    torch.manual_seed(5)
    lat, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([200, 700])
    cond, uncond = torch.ones(2, 77, 8), torch.zeros(2, 77, 8)
    g = D.sds_grad(eps_fn, lat, t, cond, uncond, AC, guidance_scale=100.0, noise=noise)
    assert calls == [4]
    x_t = D.add_noise(lat, noise, AC, t)
    e_c, e_u = 0.1 * x_t + 1.0, 0.1 * x_t
    ref = (1 - AC[t]).view(-1, 1, 1, 1) * (e_u + 100.0 * (e_c - e_u) - noise)
    assert torch.allclose(g, ref, atol=1e-5)
