"""GE3D maths (scoredistill.maths.ge3d), no threestudio: Algorithm 1, DBC (Eq. 9-10), trajectories, cost,
behaviour on the exact-score prior vs SDS at CFG 100."""
import math

import pytest
import torch

from harness import one_thread_fixture
from scoredistill.maths.diffusion import cfg_combine, sample_timesteps, sds_grad
from scoredistill.maths import ge3d as G
from scoredistill.testing.exact_score_prior import ExactScorePrior, sd_alphas_cumprod

AC = sd_alphas_cumprod().float()


_single_thread = one_thread_fixture()  # tiny models run fastest single-threaded on a loaded 2-core CPU


# ----------------------------------------------------------------------------- Algorithm 1 on the tiny UNet
@pytest.fixture(scope="module")
def tiny_unet(tiny_sd):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()


def _alg1_transcription(unet, x, timesteps, cond, uncond, lam, weights):
    """Algorithm 1 written out line by line, one view and one embedding per UNet call, δ-form updates."""
    a = [float(AC[t]) for t in timesteps]
    n = len(timesteps) - 1
    grads = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1]
        c, u = cond[b : b + 1], uncond[b : b + 1]
        xs = [xb]  # line 3
        for i in range(n):  # lines 4-11
            eps = unet(xs[i], timesteps[i], encoder_hidden_states=u).sample  # line 8
            delta = math.sqrt((1 - a[i + 1]) / a[i + 1]) - math.sqrt((1 - a[i]) / a[i])  # line 9
            xs.append(math.sqrt(a[i + 1]) * (xs[i] / math.sqrt(a[i]) + delta * eps))  # line 10
        xt = {n: xs[n]}  # line 12
        for i in range(n - 1, -1, -1):  # lines 13-16
            e_u = unet(xt[i + 1], timesteps[i + 1], encoder_hidden_states=u).sample
            e_c = unet(xt[i + 1], timesteps[i + 1], encoder_hidden_states=c).sample
            eps_t = e_u + lam * (e_c - e_u)  # line 14, CFG
            delta = math.sqrt((1 - a[i + 1]) / a[i + 1]) - math.sqrt((1 - a[i]) / a[i])
            xt[i] = math.sqrt(a[i]) * (xt[i + 1] / math.sqrt(a[i + 1]) - delta * eps_t)  # line 15
        grads.append(sum(float(weights[i]) * (xs[i] - xt[i]) for i in range(n)))  # line 17
    return torch.cat(grads)


def test_grad_equals_step_by_step_algorithm_1_and_costs_3n(tiny_unet):
    torch.manual_seed(0)
    B, n = 2, 4
    timesteps = [15, 70, 140, 200, 290]
    x = torch.randn(B, 4, 8, 8)
    cond, uncond = torch.randn(B, 77, 32), torch.randn(B, 77, 32)
    lam = 7.5
    w = G.dbc_weights(n, 300, 1000)
    calls = []

    def unet_counted(xx, t, emb):
        calls.append(xx.shape[0])
        return tiny_unet(xx, torch.full((xx.shape[0],), t), encoder_hidden_states=emb).sample

    def eps_uncond(xx, t):
        return unet_counted(xx, t, uncond)

    def eps_guided(xx, t):  # one batched CFG call, as the adapter does
        e = unet_counted(torch.cat([xx, xx]), t, torch.cat([cond, uncond]))
        e_c, e_u = e.chunk(2)
        return cfg_combine(e_c, e_u, lam)

    with torch.no_grad():
        grad, info = G.ge3d_grad(eps_uncond, eps_guided, x, timesteps, AC, weights=w)
        ref = _alg1_transcription(tiny_unet, x, timesteps, cond, uncond, lam, w)
    assert grad.shape == x.shape
    assert torch.allclose(grad, ref, atol=2e-5, rtol=1e-4), (grad - ref).abs().max()
    assert grad.abs().max() > 1e-3  # not trivially zero
    # cost: n unconditional calls of B, n CFG calls of 2B -> 3n sample-evaluations per view
    assert calls == [B] * n + [2 * B] * n
    assert sum(calls) == 3 * n * B == G.ge3d_samples_per_view(n) * B
    assert G.ge3d_samples_per_view(n, perp_neg=True) == 5 * n
    # trajectories: xs[0] is the input, xs_tilde[n] == xs[n]
    assert torch.equal(info["xs"][0], x) and torch.equal(info["xs_tilde"][n], info["xs"][n])


def test_cfg_one_and_exact_inversion_give_zero_grad():
    """With an ε that does not depend on x and CFG reproducing it, denoising retraces the inversion exactly."""
    const = torch.randn(1, 4, 4, 4)
    eps = lambda x, t: const.expand_as(x)  # noqa: E731
    x = torch.randn(3, 4, 4, 4)
    grad, info = G.ge3d_grad(eps, eps, x, [0, 100, 250, 400], AC)
    assert grad.abs().max() < 1e-4
    assert info["residuals"].max() < 1e-4


def test_grad_weights_are_applied_per_node():
    x = torch.randn(1, 4, 2, 2)
    eu = lambda x, t: torch.zeros_like(x)  # noqa: E731
    eg = lambda x, t: torch.ones_like(x)  # noqa: E731
    ts = [0, 100, 300]
    _, info = G.ge3d_grad(eu, eg, x, ts, AC)
    diffs = info["xs"][:2] - info["xs_tilde"][:2]
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    grad, _ = G.ge3d_grad(eu, eg, x, ts, AC, weights=w)
    assert torch.allclose(grad, 0.25 * diffs[0] + 0.75 * diffs[1], atol=1e-6)
    with pytest.raises(ValueError, match=r"weights must have shape \(2,\)"):
        G.ge3d_grad(eu, eg, x, ts, AC, weights=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="noise_to_first_node"):
        G.ge3d_grad(eu, eg, x, ts, AC, offset_noise=0.1)


def test_noise_to_first_node_uses_forward_noise_with_offset():
    x = torch.zeros(2, 4, 3, 3)
    seen = []

    def eu(xx, t):
        seen.append(xx.clone())
        return torch.zeros_like(xx)

    g1 = torch.Generator().manual_seed(5)
    G.ge3d_grad(eu, eu, x, [100, 200], AC, noise_to_first_node=True, offset_noise=0.1, generator=g1)
    g2 = torch.Generator().manual_seed(5)
    noise = torch.randn(x.shape, generator=g2) + 0.1 * torch.randn((2, 4, 1, 1), generator=g2)
    assert torch.allclose(seen[0], math.sqrt(1 - AC[100]) * noise, atol=1e-6)


# ----------------------------------------------------------------------------- DBC
def _dbc_reference(n, k, K, sigma):
    deltas = [(n - i - 1) * K / (n - 1) for i in range(n)]
    w = [math.exp(-((k - d) ** 2) / (2 * sigma**2)) for d in deltas]
    s = sum(w)
    return [v / s for v in w], deltas


@pytest.mark.parametrize("n, K, sigma", [(6, 5000, 1000.0), (10, 5000, 1000.0), (3, 10000, 500.0)])
def test_dbc_matches_eq_9_10(n, K, sigma):
    for k in [0, 1, K // 3, K // 2, K - 1, K]:
        ref, deltas = _dbc_reference(n, k, K, sigma)
        w = G.dbc_weights(n, k, K, sigma)
        assert w.shape == (n,)
        assert torch.allclose(w, torch.tensor(ref, dtype=torch.float64), atol=1e-12)
        assert w.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert G.dbc_peaks(n, K).tolist() == pytest.approx(deltas)
    assert deltas[n - 1] == 0 and deltas[0] == K
    # each node is the heaviest exactly at its own peak Δ_i
    for i, d in enumerate(deltas):
        assert int(G.dbc_weights(n, round(d), K, sigma).argmax()) == i
    # coarse first: the coarsest node dominates at k = 0 and decays, the finest dominates at k = K and grows
    ks = torch.linspace(0, K, 11).round().long().tolist()
    coarse = [G.dbc_weights(n, k, K, sigma)[n - 1].item() for k in ks]
    fine = [G.dbc_weights(n, k, K, sigma)[0].item() for k in ks]
    assert all(a > b for a, b in zip(coarse, coarse[1:]))
    assert all(a < b for a, b in zip(fine, fine[1:]))


def test_dbc_off_single_node_and_errors():
    assert torch.equal(G.dbc_weights(4, 10, 100, enabled=False), torch.full((4,), 0.25, dtype=torch.float64))
    assert G.dbc_weights(1, 50, 100).tolist() == [1.0]
    with pytest.raises(ValueError, match="dbc_sigma must be > 0"):
        G.dbc_weights(3, 0, 100, sigma=0.0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        G.dbc_weights(0, 0, 100)
    # tiny sigma does not produce NaN
    assert torch.isfinite(G.dbc_weights(5, 37, 1000, sigma=1e-3)).all()


# ----------------------------------------------------------------------------- trajectories
def test_random_trajectory_and_annealing():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        ts = G.random_trajectory(6, 60, 80, 480, generator=g)
        assert len(ts) == 7 and ts[-1] == 480 and ts[0] >= 0
        jumps = [b - a for a, b in zip(ts, ts[1:])]
        assert all(60 <= j < 80 for j in jumps)
    assert G.annealed_trajectory_params(0, 1000) == (60, 80, 480)
    assert G.annealed_trajectory_params(500, 1000) == (45, 65, 390)
    assert G.annealed_trajectory_params(1000, 1000) == (30, 50, 300)
    assert G.annealed_trajectory_params(2000, 1000, 40, [60, 60], 300) == (40, 60, 300)
    # the defaults keep t_0 >= 0 at both ends
    G.validate_random_trajectory(6, (60, 30), (80, 50), (480, 300))


@pytest.mark.parametrize(
    "nodes, match",
    [
        ([100], r"n \+ 1 >= 2 time nodes"),
        ([], r"n >= 1"),
        ([0, 500, 1000], r"must lie in \[0, 1000\)"),
        ([-1, 10], r"must lie in \[0, 1000\)"),
        ([0, 200, 200], "strictly increasing"),
        ([300, 200], "strictly increasing"),
        ([0, 10.5], "integers"),
    ],
)
def test_fixed_trajectory_validation(nodes, match):
    with pytest.raises(ValueError, match=match):
        G.validate_timesteps(nodes)


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 60, 80, 480), "n_steps .* must be an integer >= 1"),
        ((6, 0, 80, 480), "jump_min must be >= 1"),
        ((6, 80, 80, 480), "jump_max must be > jump_min"),
        ((6, 60, 80, 1000), r"max_timestep must lie in \[1, 1000\)"),
        ((6, 60, 80, 400), "max_timestep .* must be >= n_steps"),
        ((6, (60, 30), "x", 480), r"jump_max must be a number or a \[start, end\] pair"),
    ],
)
def test_random_trajectory_validation(args, match):
    with pytest.raises(ValueError, match=match):
        G.validate_random_trajectory(*args)


# ----------------------------------------------------------------------------- behaviour on the exact-score prior
def _rms(x):
    return x.flatten(1).pow(2).mean(-1).sqrt()


def test_ge3d_moves_toward_prompted_mixture_without_sds_cfg100_norm_blowup():
    prior = ExactScorePrior.random(num_prompts=2, num_components=3, latent_shape=(4, 4, 4), std=0.1, seed=0)
    B = 4
    cond, uncond = prior.embedding(0, B), prior.embedding(None, B)

    def eps_uncond(x, t):
        return prior(x, torch.full((B,), t), uncond).sample

    def eps_guided(x, t):
        tt = torch.full((B,), t)
        e_c, e_u = prior(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([cond, uncond])).sample.chunk(2)
        return cfg_combine(e_c, e_u, 7.5)

    g = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(B, 4, 4, 4, generator=g)
    d0 = prior.distance_to_prompt(x0, 0)
    data_rms = _rms(prior.means[0].reshape(3, -1)).float()

    # GE3D at the paper's CFG 7.5: gradient step x <- x - grad, DBC over K = 60 iterations
    K = 60
    x = x0.clone()
    dists = [d0.mean().item()]
    for k in range(K):
        grad, _ = G.ge3d_grad(eps_uncond, eps_guided, x, [20, 70, 120, 170, 220, 270, 320], AC, G.dbc_weights(6, k, K))
        x = x - grad
        dists.append(prior.distance_to_prompt(x, 0).mean().item())
    d_ge3d = prior.distance_to_prompt(x, 0)
    assert (d_ge3d < 0.5 * d0).all(), (d0, d_ge3d)
    assert dists[-1] < dists[K // 2] < dists[0]
    nearest = prior.nearest_component(x, 0)
    assert torch.allclose(_rms(x), data_rms[nearest], rtol=0.1), (_rms(x), data_rms[nearest])

    # SDS at CFG 100 from the same start: latent norm blows past the data norm
    x = x0.clone()
    for _ in range(100):
        t = sample_timesteps(B, 20, 980, generator=g)
        noise = torch.randn(x.shape, generator=g)
        x = x - 0.02 * sds_grad(lambda a, b, c: prior(a, b, c).sample, x, t, cond, uncond, AC, 100.0, noise=noise)
    assert _rms(x).mean() > 1.3 * data_rms.max(), _rms(x)
