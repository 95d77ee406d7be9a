"""LODS maths (scoredistill.maths.lods): Eq. 7-10 against independent computations, the update rule of the
learnable part, checkpoint round trips, UNet-call accounting, LoRA on the tiny UNet, and setting errors.
No threestudio needed."""
import io
import math

import pytest
import torch

from harness import one_thread_fixture
from scoredistill.maths.diffusion import add_noise, grad_to_loss, sds_grad
from scoredistill.maths.lods import (
    DEFAULT_LR,
    LODSLearner,
    denoising_loss,
    normalized_sds_grad,
    validate_lods_options,
)
from scoredistill.testing.exact_score_prior import ExactScorePrior

S = 1000.0  # the paper's CFG


_one_thread = one_thread_fixture("function")  # tiny models: one intra-op thread is much faster on a shared CPU


def _prior(seed=0):
    return ExactScorePrior.random(num_prompts=2, num_components=3, latent_shape=(4, 4, 4), std=0.2, seed=seed, embed_dim=8, seq_len=3)


def _eps_fn(prior):
    return lambda x, t, emb: prior(x, t, emb).sample


def _setup(B=2, seed=0):
    prior = _prior(seed)
    g = torch.Generator().manual_seed(seed + 10)
    latents = torch.randn(B, 4, 4, 4, generator=g, dtype=torch.float64)
    cond = prior.embedding(0, B)
    uncond = prior.embedding(None, B)
    return prior, latents, cond, uncond, g


def _abar(prior, t):
    return prior.alphas_cumprod[t].view(-1, 1, 1, 1)


def _independent_eq7(prior, latents, t, noise, cond, uncond_learned, s):
    """Eq. 7 straight from the paper with direct prior calls (no pack code)."""
    a = _abar(prior, t)
    z_t = a.sqrt() * latents + (1 - a).sqrt() * noise
    e_y = prior(z_t, t, cond).sample
    e_a = prior(z_t, t, uncond_learned).sample
    return (1 - a) * (e_y + (1 - s) * e_a / s - noise / s)


# ------------------------------------------------------------------ (a) the θ gradient
@pytest.mark.parametrize("merged", [False, True])
def test_theta_grad_equals_eq7_with_the_current_alpha(merged):
    prior, latents, cond, uncond, g = _setup()
    learner = LODSLearner(_eps_fn(prior), "embedding", prior.alphas_cumprod, S, lr=1e-2, merged_forward=merged)
    # move α away from ∅ first so that Eq. 7 differs from normalised SDS
    learner.step(latents, torch.tensor([500, 500]), cond, uncond, generator=g)
    alpha_before = learner.alpha.detach().clone()
    assert not torch.equal(alpha_before, uncond[0].float())
    t = torch.tensor([300, 800])
    noise = torch.randn(latents.shape, generator=g, dtype=torch.float64)
    out = learner.step(latents, t, cond, uncond, noise=noise, generator=g)
    ref = _independent_eq7(prior, latents, t, noise, cond, alpha_before.expand(2, -1, -1), S)
    torch.testing.assert_close(out["grad"], ref, rtol=1e-6, atol=1e-9)
    assert not torch.equal(learner.alpha.detach(), alpha_before)  # (b) ran after (a)


def test_normalized_sds_grad_formula_and_infinite_cfg():
    e_c, e_u, n = torch.randn(3, 2, 4, 3, 3).unbind(0)
    w = torch.rand(2, 1, 1, 1)
    for s in (1.0, 7.5, 1000.0):
        torch.testing.assert_close(normalized_sds_grad(e_c, e_u, n, w, s), w * (e_c + (1 - s) / s * e_u - n / s))
    # s = 1: the reference SDS of Eq. 6, w (ε(y) − ε)
    torch.testing.assert_close(normalized_sds_grad(e_c, e_u, n, w, 1.0), w * (e_c - n))
    torch.testing.assert_close(normalized_sds_grad(e_c, e_u, n, w, math.inf), w * (e_c - e_u))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="guidance_scale"):
            normalized_sds_grad(e_c, e_u, n, w, bad)


@pytest.mark.parametrize("s", [7.5, 1000.0])
def test_without_the_alpha_update_the_gradient_is_normalised_sds(s):
    prior, latents, cond, uncond, g = _setup()
    learner = LODSLearner(_eps_fn(prior), "embedding", prior.alphas_cumprod, s, aux_update=False)
    for step in range(3):
        t = torch.tensor([200 + 100 * step, 900 - 100 * step])
        noise = torch.randn(latents.shape, generator=g, dtype=torch.float64)
        out = learner.step(latents, t, cond, uncond, noise=noise)
        ref = sds_grad(_eps_fn(prior), latents, t, cond, uncond, prior.alphas_cumprod, s, noise=noise) / s
        torch.testing.assert_close(out["grad"], ref, rtol=1e-6, atol=1e-9)
        assert out["aux_loss"] is None
    torch.testing.assert_close(learner.alpha.detach(), uncond[0].float(), rtol=0, atol=0)
    assert learner.aux_steps == 0


# ------------------------------------------------------------------ (b) the update of α
def test_alpha_changes_only_through_eq8_and_gets_no_gradient_from_the_3d_loss():
    prior, latents0, cond, uncond, g = _setup()
    theta = torch.nn.Parameter(latents0.clone())  # the "3D model": latents = θ
    learner = LODSLearner(_eps_fn(prior), "embedding", prior.alphas_cumprod, S, lr=1e-3)
    learner.initialise_alpha(uncond)
    alpha0 = learner.alpha.detach().clone()
    t, aux_t = torch.tensor([400, 600]), torch.tensor([17, 999])
    noise = torch.randn(latents0.shape, generator=g, dtype=torch.float64)
    aux_noise = torch.randn(latents0.shape, generator=g, dtype=torch.float64)

    out = learner.step(theta, t, cond, uncond, noise=noise, aux_t=aux_t, aux_noise=aux_noise)
    loss = grad_to_loss(theta, out["grad"].to(theta.dtype))
    loss.backward()
    assert learner.alpha.grad is None  # nothing from the 3D loss
    torch.testing.assert_close(theta.grad, out["grad"] / 2)

    # the same α step computed independently: AdamW on Eq. 8 = mean ||ε(z_t'; α, t') − ε'||² at detached z
    alpha = torch.nn.Parameter(alpha0.clone())
    opt = torch.optim.AdamW([alpha], lr=1e-3, betas=(0.9, 0.99), eps=1e-15, weight_decay=0.01)
    a = _abar(prior, aux_t)
    z_t = a.sqrt() * latents0 + (1 - a).sqrt() * aux_noise
    eq8 = ((prior(z_t, aux_t, alpha.expand(2, -1, -1)).sample - aux_noise) ** 2).mean()
    eq8.backward()
    opt.step()
    assert out["aux_loss"] == pytest.approx(float(eq8.detach()), rel=1e-6)
    torch.testing.assert_close(learner.alpha.detach(), alpha.detach(), rtol=1e-6, atol=1e-9)
    assert not torch.equal(learner.alpha.detach(), alpha0)


def test_alpha_update_lowers_its_own_loss_on_the_exact_score_prior():
    """The rendered latents are samples of prompt 0; α starts at the null embedding, i.e. the marginal over both
    prompts.  Eq. 8 steps must lower Eq. 8 on a fixed evaluation set of (t', ε') and move α's selection weight
    from the marginal towards prompt 0, not prompt 1.  (The prior selects linearly, ε(α) = Σ_j α_j ε*_j, and the
    slots' ε* differ only at small t', so Eq. 8 is ill-conditioned in α: with random t' it takes ~100s of AdamW
    steps at lr 0.1 to close part of the gap, hence the step count and the partial-gap threshold.)"""
    prior = _prior(3)
    g = torch.Generator().manual_seed(5)
    latents = prior.sample_data(0, 4, generator=g)
    uncond = prior.embedding(None, 4)
    learner = LODSLearner(_eps_fn(prior), "embedding", prior.alphas_cumprod, S, lr=0.1)
    learner.initialise_alpha(uncond)
    t_eval = torch.linspace(20, 980, 16).long().repeat_interleave(4)
    n_eval = torch.randn(64, 4, 4, 4, generator=g, dtype=torch.float64)
    z_eval = latents.repeat(16, 1, 1, 1)

    def eval_loss():
        with torch.no_grad():
            return float(learner.aux_loss(z_eval, uncond.repeat(16, 1, 1), t=t_eval, noise=n_eval))

    before = eval_loss()
    losses = [learner.update(latents, uncond, generator=g) for _ in range(200)]
    after = eval_loss()
    # a natural target: the embedding of the prompt the latents came from
    with torch.no_grad():
        best = float(denoising_loss(prior(add_noise(z_eval, n_eval, prior.alphas_cumprod, t_eval), t_eval, prior.embedding(0, 64)).sample, n_eval))
    assert best < before
    assert before - after > 0.25 * (before - best), (before, after, best)
    w = learner.alpha.detach()[0, :3]  # (prompt 0, prompt 1, marginal)
    assert w[0] > 0.2 and w[1].abs() < 0.1 and w[2] < 0.9, w
    assert learner.aux_steps == 200 and all(math.isfinite(v) for v in losses)


def test_merged_forward_uses_the_theta_step_noise_for_eq8():
    prior, latents, cond, uncond, g = _setup()
    learner = LODSLearner(_eps_fn(prior), "embedding", prior.alphas_cumprod, S, lr=1e-3, merged_forward=True)
    learner.initialise_alpha(uncond)
    alpha0 = learner.alpha.detach().clone()
    t = torch.tensor([250, 750])
    noise = torch.randn(latents.shape, generator=g, dtype=torch.float64)
    out = learner.step(latents, t, cond, uncond, noise=noise)
    a = _abar(prior, t)
    z_t = a.sqrt() * latents + (1 - a).sqrt() * noise
    eq8 = ((prior(z_t, t, alpha0.expand(2, -1, -1)).sample - noise) ** 2).mean()
    assert out["aux_loss"] == pytest.approx(float(eq8), rel=1e-6)


# ------------------------------------------------------------------ cost
@pytest.mark.parametrize("merged,calls,samples", [(False, 2, 3), (True, 2, 2)])
def test_unet_cost_embedding(merged, calls, samples):
    prior, latents, cond, uncond, g = _setup(B=3)
    learner = LODSLearner(_eps_fn(prior), "embedding", prior.alphas_cumprod, S, merged_forward=merged)
    n0 = prior.num_calls
    out = learner.step(latents, torch.tensor([100, 500, 900]), cond, uncond)
    assert (out["unet_calls"], out["unet_samples"], out["unet_backward_samples"]) == (calls, samples * 3, 3)
    assert prior.num_calls - n0 == calls


# ------------------------------------------------------------------ checkpoints
def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_resume_restores_alpha_and_optimizer_exactly():
    prior, latents, cond, uncond, g = _setup()
    kw = dict(lr=1e-2)
    a = LODSLearner(_eps_fn(prior), "embedding", prior.alphas_cumprod, S, **kw)
    for i in range(3):
        a.step(latents, torch.tensor([100 * i + 50, 600]), cond, uncond, generator=g)
    state = _roundtrip(a.state_dict())
    b = LODSLearner(_eps_fn(prior), "embedding", prior.alphas_cumprod, S, **kw)
    b.load_state_dict(state)
    assert torch.equal(a.alpha.detach(), b.alpha.detach())
    assert b.aux_steps == 3
    for i in range(3):
        t = torch.tensor([300, 700 - 10 * i])
        inputs = {n: torch.randn(latents.shape, generator=g, dtype=torch.float64) for n in ("noise", "aux_noise")}
        aux_t = torch.tensor([5 + i, 990 - i])
        oa = a.step(latents, t, cond, uncond, aux_t=aux_t, **inputs)
        ob = b.step(latents, t, cond, uncond, aux_t=aux_t, **inputs)
        assert torch.equal(oa["grad"], ob["grad"])
        assert torch.equal(a.alpha.detach(), b.alpha.detach())  # same Adam moments -> bitwise equal
    # a fresh learner WITHOUT the optimizer state diverges: the moments matter
    c = LODSLearner(_eps_fn(prior), "embedding", prior.alphas_cumprod, S, **kw)
    st = dict(state)
    st["optimizer"] = None
    c.load_state_dict(st)
    c.update(latents, uncond, t=torch.tensor([5, 990]), noise=torch.zeros_like(latents))
    b2 = LODSLearner(_eps_fn(prior), "embedding", prior.alphas_cumprod, S, **kw)
    b2.load_state_dict(state)
    b2.update(latents, uncond, t=torch.tensor([5, 990]), noise=torch.zeros_like(latents))
    assert not torch.equal(c.alpha.detach(), b2.alpha.detach())


def test_state_dict_holds_no_model_weights_and_checks_variant():
    prior, latents, cond, uncond, g = _setup()
    a = LODSLearner(_eps_fn(prior), "embedding", prior.alphas_cumprod, S)
    assert a.state_dict()["alpha"] is None  # before first use
    a.step(latents, torch.tensor([10, 20]), cond, uncond)
    st = a.state_dict()
    tensors = [v for v in st.values() if torch.is_tensor(v)]
    assert sum(v.numel() for v in tensors) == prior.seq_len * prior.embed_dim
    st["variant"] = "lora"
    with pytest.raises(ValueError, match="variant"):
        a.load_state_dict(st)


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(guidance_scale=0.0), "guidance_scale"),
        (dict(guidance_scale=-5.0), "guidance_scale"),
        (dict(variant="vsd"), "variant"),
        (dict(variant="lora", lora_rank=0), "lora_rank"),
        (dict(variant="lora", lora_rank=2.5), "lora_rank"),
        (dict(variant="lora", lora_alpha=0.0), "lora_alpha"),
        (dict(variant="lora", lora_scale=-0.5), "lora_scale"),
        (dict(variant="lora", lora_target_modules=[]), "lora_target_modules"),
        (dict(variant="lora", lora_init="pissa"), "lora_init"),
        (dict(lr=-1e-5), "aux_lr"),
        (dict(optimizer="NotAnOptimizer"), "aux_optimizer"),
        (dict(aux_min_step_percent=0.5, aux_max_step_percent=0.5), "aux_min_step_percent"),
        (dict(aux_min_step_percent=-0.1), "aux_min_step_percent"),
        (dict(weighting_strategy="sqrt"), "weighting_strategy"),
    ],
)
def test_invalid_settings_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        validate_lods_options(**kwargs)


def test_learner_validates_and_lora_needs_a_unet():
    prior = _prior()
    with pytest.raises(ValueError, match="guidance_scale"):
        LODSLearner(_eps_fn(prior), "embedding", prior.alphas_cumprod, 0.0)
    with pytest.raises(ValueError, match="unet"):
        LODSLearner(_eps_fn(prior), "lora", prior.alphas_cumprod, S)
    assert LODSLearner(_eps_fn(prior), "embedding", prior.alphas_cumprod).lr == DEFAULT_LR["embedding"] == 1e-5
    assert DEFAULT_LR["lora"] == 5e-7


# ------------------------------------------------------------------ LoRA on the tiny UNet
@pytest.fixture(scope="module")
def tiny_unet(tiny_sd):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    unet.requires_grad_(False)
    abar = DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler").alphas_cumprod.float()
    return unet, abar


def _unet_eps(unet):
    return lambda x, t, emb: unet(x, t, encoder_hidden_states=emb).sample


def _batched_vs_separate_atol(unet, latents, t, cond, uncond, abar, noise, ref):
    """atol for normalised SDS ``w(t)(ε̃ − ε)/S`` (CFG scale S) computed by separate UNet calls vs one 2B call:
    ``∂/∂ε̃ = w(t)/S`` with ``w = 1 − ᾱ_t`` (tests/harness/tolerances.py)."""
    from harness.tolerances import batching_discrepancy, cfg_atol

    x_t = add_noise(latents, noise, abar, t)
    delta = batching_discrepancy(unet, x_t, t, cond, uncond)
    return cfg_atol(delta, S, (1 - abar[t]) / S, ref, noise / S)


def test_lora_variant_on_the_tiny_unet(tiny_unet):
    import copy

    base, abar = tiny_unet
    unet = copy.deepcopy(base)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    B, E = 2, unet.config.cross_attention_dim
    latents = torch.randn(B, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(2, B, 77, E, generator=g).unbind(0)
    learner = LODSLearner(_unet_eps(unet), "lora", abar, S, lr=1e-2, unet=unet, lora_rank=2, lora_scale=0.5)
    assert learner.lora_params and all(p.dtype == torch.float32 for p in learner.lora_params)
    n_lora = sum(p.numel() for p in learner.lora_params)

    # ψ = 0 at init (B = 0): Eq. 9 == normalised SDS
    t = torch.tensor([200, 700])
    noise = torch.randn(latents.shape, generator=g)
    theta = torch.nn.Parameter(latents.clone())
    out = learner.step(theta, t, cond, uncond, noise=noise, generator=g)
    ref = sds_grad(_unet_eps(base), latents, t, cond, uncond, abar, S, noise=noise) / S
    torch.testing.assert_close(out["grad"], ref, rtol=0, atol=_batched_vs_separate_atol(base, latents, t, cond, uncond, abar, noise, ref))
    assert (out["unet_calls"], out["unet_samples"], out["unet_backward_samples"]) == (3, 3 * B, B)
    grad_to_loss(theta, out["grad"]).backward()
    assert all(p.grad is None for p in learner.lora_params)  # no gradient from the 3D loss
    assert learner.aux_steps == 1 and any(p.abs().sum() > 0 for p in learner.lora_params[1::2])

    # after the update: Eq. 9 with ε_ψ computed independently (adapter on), base branch unchanged
    noise = torch.randn(latents.shape, generator=g)
    lora_before = [p.detach().clone() for p in learner.lora_params]
    learner.aux_update = False
    out = learner.step(latents, t, cond, uncond, noise=noise)
    a = abar[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * latents + (1 - a).sqrt() * noise
    with torch.no_grad():
        e_y = base(z_t, t, encoder_hidden_states=cond).sample
        unet.enable_adapters()
        e_psi = unet(z_t, t, encoder_hidden_states=uncond).sample
        unet.disable_adapters()
        e_plain = unet(z_t, t, encoder_hidden_states=uncond).sample
        e_base = base(z_t, t, encoder_hidden_states=uncond).sample
    assert not torch.allclose(e_psi, e_base, atol=1e-6)  # ψ changed the unconditional branch
    torch.testing.assert_close(e_plain, e_base)  # adapter off -> the frozen UNet
    torch.testing.assert_close(out["grad"], (1 - a) * (e_y + (1 - S) / S * e_psi - noise / S), rtol=1e-4, atol=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(learner.lora_params, lora_before))  # update disabled

    # the frozen weights never move; the LoRA state round-trips exactly without them
    for k, v in unet.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base_state[k.replace(".base_layer", "")]), k
    state = _roundtrip(learner.state_dict())
    assert sum(v.numel() for v in state["lora"]) == n_lora
    unet2 = copy.deepcopy(base)
    other = LODSLearner(_unet_eps(unet2), "lora", abar, S, lr=1e-2, unet=unet2, lora_rank=2, lora_scale=0.5)
    other.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(other.lora_params, learner.lora_params))
    learner.aux_update = other.aux_update = True
    for lr_ in (learner, other):
        lr_.update(latents, uncond, t=torch.tensor([3, 900]), noise=noise)
    assert all(torch.equal(p, q) for p, q in zip(other.lora_params, learner.lora_params))
    with pytest.raises(ValueError, match="LoRA state"):
        unet3 = copy.deepcopy(base)
        LODSLearner(_unet_eps(unet3), "lora", abar, S, unet=unet3, lora_rank=3).load_state_dict(state)


def test_lora_merged_cost_and_scale_zero_is_the_frozen_unet(tiny_unet):
    import copy

    base, abar = tiny_unet
    unet = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    B, E = 2, unet.config.cross_attention_dim
    latents = torch.randn(B, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(2, B, 77, E, generator=g).unbind(0)
    learner = LODSLearner(_unet_eps(unet), "lora", abar, S, lr=1e-1, unet=unet, lora_rank=2, lora_scale=0.0,
                          merged_forward=True, lora_init="default")
    t = torch.tensor([300, 600])
    noise = torch.randn(latents.shape, generator=g)
    out = learner.step(latents, t, cond, uncond, noise=noise)
    assert (out["unet_calls"], out["unet_samples"], out["unet_backward_samples"]) == (2, 2 * B, B)
    out = learner.step(latents, t, cond, uncond, noise=noise)
    # scale 0: ψ has no effect whatever its values -> normalised SDS of the frozen UNet
    ref = sds_grad(_unet_eps(base), latents, t, cond, uncond, abar, S, noise=noise) / S
    torch.testing.assert_close(out["grad"], ref, rtol=0, atol=_batched_vs_separate_atol(base, latents, t, cond, uncond, abar, noise, ref))


def test_denoising_loss_is_mean_squared_error():
    a, b = torch.randn(2, 3, 4, 4).unbind(0)
    assert float(denoising_loss(a, b)) == pytest.approx(float(((a - b) ** 2).mean()))


def test_lora_weight_is_the_effective_scale_in_both_branches(tiny_unet):
    """Paper A.1 "LoRA weight 0.5": every adapted layer computes ``W x + 0.5 · B A x`` (alpha = rank) while the
    learnable branch runs, and ``W x`` otherwise -- checked per layer against the peft A/B tensors."""
    import copy

    from peft.tuners.lora import LoraLayer

    from scoredistill.maths.lods import DEFAULT_LORA_SCALE, add_lora_adapter, lora_branch

    assert DEFAULT_LORA_SCALE == 0.5
    unet = copy.deepcopy(tiny_unet[0])
    params = add_lora_adapter(unet, rank=2)  # default scale: the paper's 0.5
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g))
    layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    assert layers
    for m in layers[:4]:
        x = torch.randn(3, m.in_features, generator=g)
        base = m.base_layer(x)
        delta = m.lora_B["lods"](m.lora_A["lods"](x))
        with torch.no_grad(), lora_branch(unet, True, params):
            on = m(x)
        with torch.no_grad():
            off = m(x)
        torch.testing.assert_close(on, base + 0.5 * delta)
        torch.testing.assert_close(off, base)
