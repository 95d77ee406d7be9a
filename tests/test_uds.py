"""UDS maths (scoredistill.maths.uds) against the paper's equations computed independently.

The reference computations below evaluate the UNet one sample-group at a time (never batched), write
Tweedie (Eq. 10) and the DDIM update (Eq. 15) out from ``alphas_cumprod`` directly, and combine the
terms as printed in Eq. 14 / 16 / 17 / 19.
"""
import math

import pytest
import torch

from scoredistill.maths import uds
from scoredistill.testing.exact_score_prior import ExactScorePrior

B, SHAPE = 3, (4, 4, 4)


@pytest.fixture(scope="module")
def prior():
    return ExactScorePrior.random(num_prompts=3, num_components=2, latent_shape=SHAPE, std=0.2, seed=3)


def _eps(prior):
    def fn(x, t, emb):
        return prior(x, t, emb).sample

    return fn


def _abar(prior, t):
    return prior.alphas_cumprod.float()[t].view(-1, 1, 1, 1)


def _ref_tweedie(x, eps, abar):  # Eq. 10 with the unconditional prediction
    return (x - torch.sqrt(1 - abar) * eps) / torch.sqrt(abar)


def _ref_x0(prior, x_t, t, uncond, estimator, n):
    """Reference x̂_0 for one group of samples with per-sample timesteps, one sample at a time."""
    out = []
    for i in range(x_t.shape[0]):
        x, ti = x_t[i : i + 1], int(t[i])
        u = uncond[i : i + 1]
        if estimator == "tweedie":
            e = prior(x, torch.tensor([ti]), u).sample
            out.append(_ref_tweedie(x, e, _abar(prior, torch.tensor([ti]))))
            continue
        nodes = [math.floor(ti * (n - k) / n) for k in range(n)]
        for k in range(n):
            tk = torch.tensor([nodes[k]])
            e = prior(x, tk, u).sample
            a = _abar(prior, tk)
            x0 = _ref_tweedie(x, e, a)
            if k + 1 < n:  # Eq. 15: x_prev = sqrt(ᾱ_prev)·x̂_0 + sqrt(1−ᾱ_prev)·ε(x_t, t, ∅)
                ap = _abar(prior, torch.tensor([nodes[k + 1]]))
                x = torch.sqrt(ap) * x0 + torch.sqrt(1 - ap) * e
        out.append(x0)
    return torch.cat(out)


def _setup(prior, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, *SHAPE, generator=g)
    noise = torch.randn(B, *SHAPE, generator=g)
    t = torch.tensor([999, 431, 57])
    return x0, noise, t


@pytest.mark.parametrize("estimator,n", [("tweedie", 1), ("ddim", 1), ("ddim", 4)])
@pytest.mark.parametrize("use_neg", [False, True])
@pytest.mark.parametrize("sign", ["printed", "reversed"])
def test_generation_grad_equals_eq16_17(prior, estimator, n, use_neg, sign):
    x0, noise, t = _setup(prior)
    c, w = 80, 7.5
    cond, uncond, neg = prior.embedding(0, B), prior.embedding(None, B), prior.embedding(1, B)
    got = uds.uds_generation_grad(
        _eps(prior), x0, t, cond, uncond, prior.alphas_cumprod.float(), guidance_scale=w, interval=c,
        neg=neg if use_neg else None, x0_estimator=estimator, ddim_steps=n, recon_sign=sign, noise=noise,
    )
    # reference
    a_t = _abar(prior, t)
    t_prev = torch.clamp(t - c, min=0)
    a_p = _abar(prior, t_prev)
    x_t = torch.sqrt(a_t) * x0 + torch.sqrt(1 - a_t) * noise
    x_p = torch.sqrt(a_p) * x0 + torch.sqrt(1 - a_p) * noise  # shared ε
    e_y = torch.cat([prior(x_t[i : i + 1], t[i : i + 1], cond[i : i + 1]).sample for i in range(B)])
    e_0 = torch.cat([prior(x_t[i : i + 1], t[i : i + 1], uncond[i : i + 1]).sample for i in range(B)])
    d_cls = e_y - e_0
    if use_neg:
        e_n = torch.cat([prior(x_t[i : i + 1], t[i : i + 1], neg[i : i + 1]).sample for i in range(B)])
        d_cls = d_cls - (e_n - e_0)  # Eq. 17
    x0_t = _ref_x0(prior, x_t, t, uncond, estimator, n)
    x0_p = _ref_x0(prior, x_p, t_prev, uncond, estimator, n)
    recon = x0_t - x0_p if sign == "printed" else x0_p - x0_t
    expected = (1 - a_t) * (recon + w * d_cls)  # Eq. 19 with ω(t) = 1 − ᾱ_t
    torch.testing.assert_close(got.grad, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.x0_a, x0_t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.x0_b, x0_p, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.t_prev, t_prev)
    # UNet cost: ONE batched call of 3B (4B with neg) samples, then n-1 calls of 2B (the two DDIM chains)
    first = (4 if use_neg else 3) * B
    assert got.unet_calls == n
    assert got.unet_samples == first + (n - 1) * 2 * B


def test_printed_and_reversed_signs_differ_only_in_recon(prior):
    x0, noise, t = _setup(prior, seed=5)
    args = (_eps(prior), x0, t, prior.embedding(0, B), prior.embedding(None, B), prior.alphas_cumprod.float())
    p = uds.uds_generation_grad(*args, noise=noise, recon_sign="printed")
    r = uds.uds_generation_grad(*args, noise=noise, recon_sign="reversed")
    torch.testing.assert_close(p.recon, -r.recon)
    torch.testing.assert_close(p.cls, r.cls)
    assert not torch.allclose(p.grad, r.grad)


@pytest.mark.parametrize("estimator,n", [("tweedie", 1), ("ddim", 3)])
def test_editing_grad_equals_eq14(prior, estimator, n):
    g = torch.Generator().manual_seed(11)
    x_tgt = torch.randn(B, *SHAPE, generator=g)
    x_src = torch.randn(B, *SHAPE, generator=g)
    noise = torch.randn(B, *SHAPE, generator=g)
    t = torch.tensor([900, 500, 120])
    y_tgt, y_src, unc = prior.embedding(1, B), prior.embedding(0, B), prior.embedding(None, B)
    w = 7.5
    got = uds.uds_editing_grad(
        _eps(prior), x_tgt, x_src, t, y_tgt, y_src, unc, prior.alphas_cumprod.float(), guidance_scale=w,
        x0_estimator=estimator, ddim_steps=n, noise=noise, weighting_strategy="uniform",
    )
    a = _abar(prior, t)
    xt_tgt = torch.sqrt(a) * x_tgt + torch.sqrt(1 - a) * noise
    xt_src = torch.sqrt(a) * x_src + torch.sqrt(1 - a) * noise

    def one(x, emb):
        return torch.cat([prior(x[i : i + 1], t[i : i + 1], emb[i : i + 1]).sample for i in range(B)])

    d_tgt = one(xt_tgt, y_tgt) - one(xt_tgt, unc)
    d_src = one(xt_src, y_src) - one(xt_src, unc)
    expected = _ref_x0(prior, xt_tgt, t, unc, estimator, n) - _ref_x0(prior, xt_src, t, unc, estimator, n) + w * (d_tgt - d_src)
    torch.testing.assert_close(got.grad, expected, rtol=1e-4, atol=1e-5)
    assert got.unet_calls == n
    assert got.unet_samples == 4 * B + (n - 1) * 2 * B


@pytest.mark.parametrize("estimator", ["tweedie", "ddim"])
def test_editing_identical_prompts_unchanged_target_gives_zero(prior, estimator):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, *SHAPE, generator=g)
    y = prior.embedding(2, B)
    res = uds.uds_editing_grad(_eps(prior), x.clone(), x.clone(), torch.tensor([700, 300, 20]), y, y.clone(),
                               prior.embedding(None, B), prior.alphas_cumprod.float(), x0_estimator=estimator,
                               ddim_steps=3)
    assert res.grad.abs().max().item() < 1e-6
    # ... while a changed target gets a non-zero gradient pulling it back towards the source
    res2 = uds.uds_editing_grad(_eps(prior), x + 0.5, x, torch.tensor([700, 300, 20]), y, y,
                                prior.embedding(None, B), prior.alphas_cumprod.float(), x0_estimator=estimator,
                                ddim_steps=3, guidance_scale=0.0, weighting_strategy="uniform")
    assert res2.grad.abs().max().item() > 1e-2


def test_editing_source_gets_no_gradient_and_target_gets_eq14(prior):
    """grad_to_loss on the target: d loss/d target = grad/B; the source latents are never in the graph."""
    from scoredistill.maths.diffusion import grad_to_loss

    g = torch.Generator().manual_seed(4)
    tgt = torch.randn(B, *SHAPE, generator=g).requires_grad_(True)
    src = torch.randn(B, *SHAPE, generator=g).requires_grad_(True)
    src_before = src.detach().clone()
    res = uds.uds_editing_grad(_eps(prior), tgt, src, torch.tensor([600, 600, 600]), prior.embedding(1, B),
                               prior.embedding(0, B), prior.embedding(None, B), prior.alphas_cumprod.float())
    grad_to_loss(tgt, res.grad).backward()
    torch.testing.assert_close(tgt.grad, res.grad / B)
    assert src.grad is None
    assert torch.equal(src.detach(), src_before)


def test_ddim_nodes_and_one_step_ddim_is_tweedie(prior):
    nodes = uds.ddim_node_timesteps(torch.tensor([999, 10, 0]), 4)
    assert nodes.tolist() == [[999, 10, 0], [749, 7, 0], [499, 5, 0], [249, 2, 0]]
    x0, noise, t = _setup(prior)
    args = (_eps(prior), x0, t, prior.embedding(0, B), prior.embedding(None, B), prior.alphas_cumprod.float())
    a = uds.uds_generation_grad(*args, noise=noise, x0_estimator="tweedie")
    b = uds.uds_generation_grad(*args, noise=noise, x0_estimator="ddim", ddim_steps=1)
    torch.testing.assert_close(a.grad, b.grad)


def test_ddim_estimator_is_closer_to_the_exact_ode_endpoint(prior):
    """Eq. 15 with more steps approaches the probability-flow ODE endpoint (many-step DDIM)."""
    x0, noise, t = _setup(prior)
    t = torch.full((B,), 800)
    a = _abar(prior, t)
    x_t = torch.sqrt(a) * x0 + torch.sqrt(1 - a) * noise
    unc = prior.embedding(None, B)
    e = prior(x_t, t, unc).sample
    ac = prior.alphas_cumprod.float()
    ref, _ = uds.estimate_x0(_eps(prior), x_t, t, unc, ac, e, "ddim", 50)
    errs = [(uds.estimate_x0(_eps(prior), x_t, t, unc, ac, e, "ddim", n)[0] - ref).norm().item() for n in (1, 3, 10)]
    assert errs[0] > errs[1] > errs[2]


def test_interval_clamps_at_zero():
    assert uds.interval_timestep(torch.tensor([5, 80, 500]), 80).tolist() == [0, 0, 420]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mode="edit"), "mode must be one of"),
        (dict(x0_estimator="ode"), "x0_estimator must be one of"),
        (dict(ddim_steps=0), r"ddim_steps must be an integer in \[1, 1000\]"),
        (dict(ddim_steps=2.5), "ddim_steps must be an integer"),
        (dict(interval=0), r"interval must be an integer in \[1, 999\]"),
        (dict(interval=1000), r"interval must be an integer in \[1, 999\]"),
        (dict(guidance_scale=-1.0), "guidance_scale must be a finite number >= 0"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number >= 0"),
        (dict(recon_sign="plus"), "recon_sign must be one of"),
        (dict(weighting_strategy="cosine"), "weighting_strategy must be one of"),
    ],
)
def test_clear_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        uds.validate_uds_options(**kwargs)


def test_shape_errors(prior):
    x = torch.zeros(B, *SHAPE)
    e = prior.embedding(0, B)
    with pytest.raises(ValueError, match="source latents"):
        uds.uds_editing_grad(_eps(prior), x, torch.zeros(1, *SHAPE), 10, e, e, e, prior.alphas_cumprod.float())
    with pytest.raises(ValueError, match="cond embeddings must have batch 3"):
        uds.uds_generation_grad(_eps(prior), x, 10, e[:1], e, prior.alphas_cumprod.float())
