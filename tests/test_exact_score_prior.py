"""The exact-score prior is exact: its noise prediction equals a Monte Carlo posterior mean of the noise."""
import math

import pytest
import torch

from scoredistill.testing.exact_score_prior import ExactScorePrior, sd_alphas_cumprod


def test_sd_alphas_cumprod_matches_diffusers_scheduler():
    from diffusers import DDIMScheduler

    from scoredistill.testing.tiny_models import SD_SCHEDULER_CONFIG

    sched = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    torch.testing.assert_close(sd_alphas_cumprod().float(), sched.alphas_cumprod.float(), rtol=1e-6, atol=1e-7)


def _mc_eps(prior, x_t, t, prompt, n=400_000, seed=0):
    """E[eps | x_t] by self-normalised importance sampling: x0 ~ q_prompt, weights N(x_t; a x0, s^2 I)."""
    g = torch.Generator().manual_seed(seed)
    log_w, mu, s = prior.mixture(prompt)
    k = torch.multinomial(log_w.exp().float(), n, replacement=True, generator=g)
    x0 = mu[k] + s[k, None] * torch.randn(n, mu.shape[1], generator=g, dtype=torch.float64)
    abar = prior.alphas_cumprod[t]
    a, sig = abar.sqrt(), (1 - abar).sqrt()
    x = x_t.reshape(1, -1).double()
    logp = -((x - a * x0) ** 2).sum(-1) / (2 * sig**2)
    w = torch.softmax(logp, 0)
    eps = (x - a * x0) / sig  # noise that maps x0 to x_t
    return (w[:, None] * eps).sum(0).reshape(x_t.shape)


@pytest.mark.parametrize("t", [50, 400, 900])
@pytest.mark.parametrize("prompt", [0, 1, None])
def test_noise_prediction_equals_monte_carlo_posterior_mean(t, prompt):
    prior = ExactScorePrior.random(num_prompts=2, num_components=3, latent_shape=(2, 1, 1), std=0.3, seed=1)
    emb = prior.embedding(prompt)
    g = torch.Generator().manual_seed(2)
    x0 = prior.sample_data(prompt, 1, generator=g)
    abar = prior.alphas_cumprod[t]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    eps = prior(x_t.float(), torch.tensor([t]), emb).sample.double()
    ref = _mc_eps(prior, x_t, t, prompt)
    torch.testing.assert_close(eps, ref, atol=1.5e-2, rtol=0)


def test_single_gaussian_closed_form():
    """One component N(mu, s^2 I): eps* = sigma (x_t - a mu) / (a^2 s^2 + sigma^2)."""
    mu = torch.randn(1, 1, 4, 2, 2, dtype=torch.float64)
    prior = ExactScorePrior(mu, torch.tensor([[0.5]]))
    x_t = torch.randn(3, 4, 2, 2)
    t = torch.tensor([10, 500, 999])
    abar = sd_alphas_cumprod()[t].view(-1, 1, 1, 1)
    a, sig = abar.sqrt(), (1 - abar).sqrt()
    expected = sig * (x_t.double() - a * mu[0, 0]) / (a**2 * 0.25 + sig**2)
    out = prior(x_t, t, prior.embedding(0, 3)).sample
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_unconditional_is_marginal_and_condition_selects_prompt():
    prior = ExactScorePrior.random(num_prompts=2, num_components=1, latent_shape=(4, 2, 2), mean_scale=3.0, std=0.05)
    x0 = prior.means[0, 0].float()[None]
    t = torch.tensor([20])
    # at low noise, the posterior mean under prompt 0 at its own mean is that mean
    m0 = prior.posterior_mean_x0(x0, t, prior.embedding(0))
    # at high noise with a narrow component, prompt 1's posterior mean is (nearly) its own mean
    m1 = prior.posterior_mean_x0(x0, torch.tensor([900]), prior.embedding(1))
    mu = prior.posterior_mean_x0(x0, t, prior.embedding(None))
    assert (m0 - prior.means[0, 0]).abs().max() < 0.05
    assert (m1 - prior.means[1, 0]).abs().max() < 0.05
    assert (mu - prior.means[0, 0]).abs().max() < 0.05  # the marginal contains prompt 0's component


def test_gradients_flow_to_sample_and_embedding_and_calls_are_counted():
    prior = ExactScorePrior.random(latent_shape=(4, 4, 4))
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    emb = prior.embedding(None, 2).requires_grad_(True)
    out = prior(x, torch.tensor([300, 300]), emb).sample
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert emb.grad is not None and emb.grad[:, 0, :3].abs().sum() > 0
    assert emb.grad[:, 1:].abs().sum() == 0 and emb.grad[:, 0, 3:].abs().sum() == 0  # only the selection channels
    assert prior.num_calls == 1 and prior.num_samples == 2


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="stds must be > 0"):
        ExactScorePrior(torch.zeros(1, 1, 4, 2, 2), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="embed_dim"):
        ExactScorePrior(torch.zeros(4, 1, 4, 2, 2), torch.ones(4, 1), embed_dim=3)
    prior = ExactScorePrior.random()
    with pytest.raises(ValueError, match="prompt must be in"):
        prior.embedding(5)
    with pytest.raises(ValueError, match="sample must have shape"):
        prior(torch.zeros(1, 4, 3, 3), torch.tensor([1]), prior.embedding(0))
    x = torch.zeros(2, *prior.latent_shape)
    with pytest.raises(ValueError, match="encoder_hidden_states must have shape"):
        prior(x, torch.tensor([1, 1]), torch.zeros(2, 77, 2))  # fewer than P + 1 = 3 selection channels
    with pytest.raises(ValueError, match="encoder_hidden_states must have shape"):
        prior(x, torch.tensor([1, 1]), torch.zeros(2, 32))
    with pytest.raises(ValueError, match="encoder_hidden_states must have batch size"):
        prior(x, torch.tensor([1, 1]), prior.embedding(0, 3))
    with pytest.raises(ValueError, match="prompt_weights"):
        ExactScorePrior(torch.zeros(2, 1, 4, 2, 2), torch.ones(2, 1), prompt_weights=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="weights must be non-negative"):
        ExactScorePrior(torch.zeros(2, 1, 4, 2, 2), torch.ones(2, 1), weights=torch.zeros(2, 1))


# ------------------------------------------------------------------ exact conditioning (linear selection)
def _two_far_prompts(D_shape=(4, 4, 4)):
    """Two prompts whose components are far apart (RMS ~1.4), narrow (s = 0.1)."""
    return ExactScorePrior.random(num_prompts=2, num_components=2, latent_shape=D_shape, std=0.1, seed=4)


def _single_prompt_prior(prior, p):
    """An independent prior holding only prompt p's components: its eps for prompt 0 is q_p's exact eps."""
    return ExactScorePrior(prior.means[p : p + 1].clone(), prior.stds[p : p + 1].clone(),
                           weights=prior.weights[p : p + 1].clone(), embed_dim=prior.embed_dim, seq_len=prior.seq_len)


@pytest.mark.parametrize("t", [5, 20, 100, 500, 950])
@pytest.mark.parametrize("p", [0, 1])
def test_conditional_eps_has_no_leak_from_the_other_prompt(t, p):
    """A latent sitting on the *other* prompt's component, at small noise, conditioned on prompt p: the
    prediction must be q_p's exact noise (the single-prompt prior's), not pulled towards the other prompt.
    (The old soft-max selection, 50 x one-hot logits, left weight e^-50 on the other prompt, which the
    likelihood ratio ~e^(D |mu_0 - mu_1|^2 / 2 var) overwhelms at small t.)"""
    prior = _two_far_prompts()
    other = 1 - p
    g = torch.Generator().manual_seed(7)
    x0 = prior.means[other, 0] + 0.1 * torch.randn(prior.latent_shape, generator=g, dtype=torch.float64)
    abar = prior.alphas_cumprod[t]
    x_t = (abar.sqrt() * x0 + (1 - abar).sqrt() * 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64))[None]
    tt = torch.tensor([t])
    eps = prior(x_t, tt, prior.embedding(p).double()).sample
    ref = _single_prompt_prior(prior, p)(x_t, tt, _single_prompt_prior(prior, p).embedding(0).double()).sample
    torch.testing.assert_close(eps, ref, rtol=1e-10, atol=1e-10)
    # and it is far from the other prompt's eps (the leak would have made them equal)
    eps_other = prior(x_t, tt, prior.embedding(other).double()).sample
    if t <= 100:
        assert (eps - eps_other).pow(2).mean().sqrt() > 1.0


def test_unconditional_eps_is_the_marginal_and_linear_weights_combine_slots():
    prior = _two_far_prompts((2, 1, 1))
    x_t = torch.randn(3, 2, 1, 1, dtype=torch.float64)
    t = torch.tensor([30, 300, 900])
    # the marginal, built independently: one prompt holding all P*K components with weights rho_p pi_{p,k}
    marg = ExactScorePrior(prior.means.reshape(1, -1, *prior.latent_shape), prior.stds.reshape(1, -1),
                           weights=(prior.prompt_weights[:, None] * prior.weights).reshape(1, -1))
    torch.testing.assert_close(prior(x_t, t, prior.embedding(None, 3).double()).sample,
                               marg(x_t, t, marg.embedding(0, 3).double()).sample, rtol=1e-10, atol=1e-10)
    # any weights: the linear combination of the slots' exact eps (here CFG at s = 7.5)
    e = [prior(x_t, t, prior.embedding(j, 3).double()).sample for j in (0, 1, None)]
    emb = 7.5 * prior.embedding(0, 3).double() - 6.5 * prior.embedding(None, 3).double()
    torch.testing.assert_close(prior(x_t, t, emb).sample, 7.5 * e[0] - 6.5 * e[2], rtol=1e-10, atol=1e-10)
    # a (1, L, E) embedding broadcasts over the batch
    torch.testing.assert_close(prior(x_t, t, prior.embedding(1, 1).double()).sample, e[1], rtol=0, atol=0)


def test_conditional_eps_matches_monte_carlo_near_the_other_prompt():
    """Monte Carlo posterior mean (x0 ~ q_0 only) for a latent between prompt 0 and prompt 1's components at a
    small t: the prior's eps under prompt 0 agrees, and differs from the marginal's."""
    prior = ExactScorePrior.random(num_prompts=2, num_components=2, latent_shape=(2, 1, 1), std=0.3, seed=1)
    t = 100
    abar = prior.alphas_cumprod[t]
    # 70 % of the way from prompt 0's first component to prompt 1's first component
    x0 = 0.3 * prior.means[0, 0] + 0.7 * prior.means[1, 0]
    x_t = (abar.sqrt() * x0)[None]
    eps = prior(x_t, torch.tensor([t]), prior.embedding(0).double()).sample
    ref = _mc_eps(prior, x_t, t, 0, n=1_000_000)
    torch.testing.assert_close(eps, ref, atol=2e-2, rtol=0)
    eps_marg = prior(x_t, torch.tensor([t]), prior.embedding(None).double()).sample
    assert (eps - eps_marg).abs().max() > 0.2


def test_selection_gradient_is_each_slots_eps():
    """d eps / d w_j = eps*_j: O(1), not the e^-50-suppressed gradient of a saturated soft-max."""
    prior = _two_far_prompts()
    x_t = torch.randn(2, *prior.latent_shape, dtype=torch.float64)
    t = torch.tensor([40, 700])
    emb = prior.embedding(None, 2).double().requires_grad_(True)
    v = torch.randn(x_t.shape, dtype=torch.float64)
    (prior(x_t, t, emb).sample * v).sum().backward()
    for j, prompt in enumerate((0, 1, None)):
        e_j = prior(x_t, t, prior.embedding(prompt, 2).double()).sample
        torch.testing.assert_close(emb.grad[:, 0, j], (e_j * v).sum((1, 2, 3)), rtol=1e-10, atol=1e-10)
    assert emb.grad[:, 0, :2].abs().min() > 1e-3
    assert torch.isfinite(emb.grad).all()
