"""HiFA maths (scoredistill.maths.hifa) against the paper's equations, computed independently."""
import math

import pytest
import torch
from diffusers import DDIMScheduler

from scoredistill.maths import hifa
from scoredistill.maths.diffusion import tweedie_x0
from scoredistill.testing.exact_score_prior import sd_alphas_cumprod
from scoredistill.testing.tiny_models import SD_SCHEDULER_CONFIG

ABAR = sd_alphas_cumprod().float()


def _eps_fn_factory(counter):
    def eps_fn(z, t, idx):
        counter.append(int(t[0]))
        return 0.3 * z + 0.01 * t.float().view(-1, 1, 1, 1) / 100.0

    return eps_fn


# ------------------------------------------------------------------ SDS+ (Eq. 2-4)

def test_omega_makes_latent_term_gradient_equal_dreamfusion_sds():
    """Eq. 2: ∇_z ω‖z - ẑ‖² with the Tweedie target equals w(t)(ε̂ - ε) for each weighting."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    eps_hat = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([120, 870])
    a = ABAR[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * z + (1 - a).sqrt() * eps
    z_hat = tweedie_x0(z_t, eps_hat, ABAR, t)
    for weighting, w in [("sds", 1 - a), ("uniform", torch.ones_like(a)), ("fantasia3d", a.sqrt() * (1 - a))]:
        zz = z.clone().requires_grad_(True)
        om = hifa.omega_weight(ABAR, t, weighting)
        loss = hifa.sds_plus_loss(zz, z_hat, om)["loss_latent"] * z.shape[0]  # undo batch mean
        (grad,) = torch.autograd.grad(loss, zz)
        torch.testing.assert_close(grad, w * (eps_hat - eps), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(hifa.sds_plus_grad(z, z_hat, om), grad)  # B · ∇ loss_latent
        # ω(t) = w(t) α_t / (2 σ_t) written out, w(t) from the shared sds_weight's closed forms
        torch.testing.assert_close(om, (w * a.sqrt() / (2 * (1 - a).sqrt())).view(-1))
    assert torch.allclose(hifa.omega_weight(ABAR, t, "constant"), torch.full((2,), 0.5))
    with pytest.raises(ValueError, match="weighting"):
        hifa.omega_weight(ABAR, t, "nope")
    with pytest.raises(ValueError, match="timestep"):
        hifa.omega_weight(ABAR, torch.tensor([1000]), "sds")


def test_sds_plus_equals_eq4_tweedie_target():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 4, 4, generator=g)
    x = torch.rand(3, 3, 8, 8, generator=g)
    x_hat = torch.rand(3, 3, 8, 8, generator=g)
    z_t = torch.randn(3, 4, 4, 4, generator=g)
    eps_hat = torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([50, 500, 950])
    z_hat = tweedie_x0(z_t, eps_hat, ABAR, t)
    # independent: Alg. 1 line 5 and Eq. 4 written out item by item
    expected = 0.0
    for b in range(3):
        ab = float(ABAR[t[b]])
        zh = (z_t[b] - math.sqrt(1 - ab) * eps_hat[b]) / math.sqrt(ab)
        torch.testing.assert_close(z_hat[b], zh)
        om = (1 - ab) * math.sqrt(ab) / (2 * math.sqrt(1 - ab))
        expected += om * (((z[b] - zh) ** 2).sum() + 0.1 * ((x[b] - x_hat[b]) ** 2).sum())
    expected = expected / 3
    out = hifa.sds_plus_loss(z, z_hat, hifa.omega_weight(ABAR, t, "sds"), x, x_hat, lambda_rgb=0.1)
    torch.testing.assert_close(out["loss"], torch.as_tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["loss_latent"] + 0.1 * out["loss_image"])


def test_ddim_target_matches_song_et_al_eq12_and_counts_calls():
    """Multi-step target: DDIM (Song et al. 2021, Eq. 12) with stride r·T = 250 and η, written out."""
    sched = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    abar = sched.alphas_cumprod
    g = torch.Generator().manual_seed(2)
    z_t = torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([620, 620, 130])
    for eta in (0.0, 1.0):
        calls = []
        gen = torch.Generator().manual_seed(7)
        z_hat, n = hifa.ddim_denoise(_eps_fn_factory(calls), z_t, t, sched, ratio=0.25, eta=eta, generator=gen)
        # t=620: 620, 370, 120 -> 3 calls; t=130: 130 -> 1 call (one call per step per distinct t)
        assert n == 4 and sorted(calls) == [120, 130, 370, 620]
        # independent recomputation, same noise order (t values ascending: 130 group first)
        gen = torch.Generator().manual_seed(7)
        expected = torch.empty_like(z_t)
        for t0, idx in ((130, [2]), (620, [0, 1])):
            z = z_t[idx]
            for tau in range(t0, -1, -250):
                eps = 0.3 * z + 0.01 * tau / 100.0
                a_t = float(abar[tau])
                a_p = float(abar[tau - 250]) if tau - 250 >= 0 else float(abar[0])  # set_alpha_to_one=False
                x0 = (z - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
                sig = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
                z = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sig**2) * eps
                if eta > 0:
                    z = z + sig * torch.randn(z.shape, generator=gen)
            expected[idx] = z
        torch.testing.assert_close(z_hat, expected, rtol=1e-4, atol=1e-5)


def test_sds_plus_equals_eq4_ddim_target():
    sched = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 4, 4, 4, generator=g)
    z_t = torch.randn(1, 4, 4, 4, generator=g)
    t = torch.tensor([999])
    z_hat, n = hifa.ddim_denoise(_eps_fn_factory([]), z_t, t, sched, ratio=0.25, eta=0.0)
    assert n == 4  # 999, 749, 499, 249
    om = hifa.omega_weight(ABAR, t, "sds")
    out = hifa.sds_plus_loss(z, z_hat, om)
    torch.testing.assert_close(out["loss"], om[0] * ((z - z_hat) ** 2).sum())
    assert float(out["loss_image"]) == 0.0


def test_ddim_ratio_validation():
    assert hifa.ddim_stride(0.25, 1000) == 250
    assert hifa.ddim_schedule(999, 250) == [999, 749, 499, 249]
    with pytest.raises(ValueError, match="ddim_step_ratio"):
        hifa.ddim_stride(0.3, 1000)
    with pytest.raises(ValueError, match="ddim_step_ratio"):
        hifa.ddim_stride(0.0, 1000)


# ------------------------------------------------------------------ timestep annealing (Eq. 5)

def test_annealed_timestep_follows_eq5_and_alternatives():
    t_min, t_max, total = 300, 980, 10000
    for it in (0, 1, 37, 2500, 5000, 9999, 10000, 12000):
        s = min(it, total) / total
        assert hifa.annealed_timestep(it, total, t_min, t_max, "sqrt") == round(t_max - (t_max - t_min) * math.sqrt(s))
        assert hifa.annealed_timestep(it, total, t_min, t_max, "linear") == round(t_max - (t_max - t_min) * s)
        assert hifa.annealed_timestep(it, total, t_min, t_max, "cosine") == round(
            t_max - (t_max - t_min) * (1 - math.cos(math.pi * s)) / 2
        )
    assert hifa.annealed_timestep(0, total, t_min, t_max) == t_max
    assert hifa.annealed_timestep(total, total, t_min, t_max) == t_min
    # sqrt decreases steeply first: a quarter of training already covers half the range
    assert hifa.annealed_timestep(2500, total, t_min, t_max) == (t_max + t_min) // 2
    assert hifa.annealed_timestep(25, 100, 20, 980) == 980 - 960 * 0.5  # Eq. 5 over the threestudio range
    g = torch.Generator().manual_seed(0)
    rs = [hifa.annealed_timestep(5000, total, t_min, t_max, "random", g) for _ in range(200)]
    assert min(rs) >= t_min and max(rs) <= t_max and len(set(rs)) > 50
    with pytest.raises(ValueError, match="schedule"):
        hifa.annealed_timestep(0, total, t_min, t_max, "exp")
    with pytest.raises(ValueError, match="t_min"):
        hifa.annealed_timestep(0, total, 500, 100)


# ------------------------------------------------------------------ z-variance (Eq. 6-8)

def test_z_variance_equals_eq7_eq8_on_hand_built_rays():
    z = torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 4)
    weights = torch.tensor(
        [
            [0.0, 0.9, 0.0, 0.0],  # delta distribution, opaque -> variance 0
            [0.2, 0.2, 0.2, 0.2],  # uniform, Σν = 0.8
            [0.3, 0.0, 0.0, 0.3],  # two spikes, Σν = 0.6
            [0.1, 0.1, 0.1, 0.1],  # Σν = 0.4 -> masked out (background)
        ]
    )
    opacity, mu, var = hifa.ray_depth_statistics(weights, z)
    # Eq. 6/7 by hand
    torch.testing.assert_close(opacity, torch.tensor([0.9, 0.8, 0.6, 0.4]))
    torch.testing.assert_close(mu, torch.tensor([2.0, 2.5, 2.5, 2.5]))
    torch.testing.assert_close(var, torch.tensor([0.0, 1.25, 2.25, 1.25]))
    # Eq. 8: E_r[δ_r σ²], δ = [1, 1, 1, 0]
    torch.testing.assert_close(hifa.z_variance_loss(weights, z), torch.tensor((0 + 1.25 + 2.25) / 4))
    torch.testing.assert_close(hifa.z_variance_loss(weights, z, reduction="masked_mean"), torch.tensor(3.5 / 3))
    torch.testing.assert_close(hifa.z_variance_loss(weights, z, reduction="sum"), torch.tensor(3.5))
    assert float(hifa.z_variance_loss(weights[:1], z[:1])) == 0.0
    # gradient flows to the weights but not through the mask
    w = weights.clone().requires_grad_(True)
    hifa.z_variance_loss(w, z).backward()
    assert torch.all(w.grad[3] == 0) and w.grad[2].abs().sum() > 0
    with pytest.raises(ValueError, match="reduction"):
        hifa.z_variance_loss(weights, z, reduction="max")


# ------------------------------------------------------------------ kernel smoothing

def test_kernel_smoothing_matches_direct_convolution_without_wraparound():
    g = torch.Generator().manual_seed(4)
    v = torch.rand(5, 12, generator=g)
    for name, k in [("boxcar", [1.0, 1.0, 1.0]), ("trapezoidal", [0.125, 0.75, 0.125]), ([1, 2, 5, 2, 1], [1, 2, 5, 2, 1])]:
        out = hifa.kernel_smooth(v, name)
        ks = sum(k)
        h = len(k) // 2
        expected = torch.zeros_like(v)
        for r in range(5):
            for i in range(12):
                acc = 0.0
                for j in range(len(k)):
                    m = i + j - h
                    if 0 <= m < 12:  # zero outside the ray: no wrap-around
                        acc += k[j] * float(v[r, m])
                expected[r, i] = acc / ks
        torch.testing.assert_close(out, expected)
    # ray ends are not wrapped: a spike at the last sample leaves the first sample untouched
    spike = torch.zeros(1, 8)
    spike[0, -1] = 1.0
    sm = hifa.kernel_smooth(spike, "boxcar")
    assert float(sm[0, 0]) == 0.0 and float(sm[0, -2]) == pytest.approx(1 / 3)
    rolled = (spike + torch.roll(spike, 1, -1) + torch.roll(spike, -1, -1)) / 3  # reference code
    assert float(rolled[0, 0]) > 0  # the behaviour avoided here
    rep = hifa.kernel_smooth(spike, "boxcar", padding="replicate")
    assert float(rep[0, -1]) == pytest.approx(2 / 3) and float(rep[0, 0]) == 0.0
    assert hifa.kernel_smooth(v, "none") is v
    for bad in ([1, 1], [1, -1, 1], "gauss"):
        with pytest.raises(ValueError, match="kernel"):
            hifa.kernel_smooth(v, bad)


def test_sample_pdf_inverse_cdf():
    bins = torch.linspace(0.0, 1.0, 5).expand(2, 5)
    weights = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    s = hifa.sample_pdf(bins, weights, 8, deterministic=True, eps=0.0)
    assert torch.all((s[0] >= 0.25) & (s[0] <= 0.5))
    torch.testing.assert_close(s[1], (torch.arange(8) + 0.5) / 8)
    r = hifa.sample_pdf(bins, weights, 64, generator=torch.Generator().manual_seed(0))
    assert r.shape == (2, 64) and torch.all(r[:, 1:] >= r[:, :-1])


def test_smoothed_sampler_covers_the_peak_neighbourhood():
    """With a sharp coarse peak, kernel smoothing puts more fine samples in the peak's neighbouring bins."""
    n_rays, n_coarse = 16, 32
    bins = torch.linspace(0.0, 1.0, n_coarse + 1).expand(n_rays, -1)
    weights = torch.full((n_rays, n_coarse), 1e-4)
    peak = torch.randint(4, n_coarse - 4, (n_rays,), generator=torch.Generator().manual_seed(0))
    weights[torch.arange(n_rays), peak] = 1.0
    lo = (peak - 1).float() / n_coarse
    hi = (peak + 2).float() / n_coarse
    centre_lo, centre_hi = peak.float() / n_coarse, (peak + 1).float() / n_coarse
    counts = {}
    for name in ("none", "boxcar"):
        w = hifa.kernel_smooth(weights, name)
        s = hifa.sample_pdf(bins, w, 64, generator=torch.Generator().manual_seed(1))
        in_nbhd = (s >= lo[:, None]) & (s < hi[:, None]) & ~((s >= centre_lo[:, None]) & (s < centre_hi[:, None]))
        counts[name] = int(in_nbhd.sum())
    assert counts["none"] < n_rays * 2  # unsmoothed: nearly everything in the single peak bin
    assert counts["boxcar"] > n_rays * 30  # smoothed: about 2/3 of 64 samples in the two neighbours
    assert counts["boxcar"] > 10 * max(counts["none"], 1)


# ------------------------------------------------------------------ disparity regularisation

def test_disparity_fit_recovers_known_scale():
    g = torch.Generator().manual_seed(5)
    pred = torch.rand(2, 8, 8, generator=g) * 3 + 1  # DPT-like relative disparity
    mask = torch.rand(2, 8, 8, generator=g) > 0.3
    target = torch.stack([(pred[b] - pred[b][mask[b]].mean()) / pred[b][mask[b]].std() for b in range(2)])
    scale, shift = torch.tensor([2.5, 0.2]), torch.tensor([0.7, -1.0])
    rendered = (target - shift.view(2, 1, 1)) / scale.view(2, 1, 1)  # rendered = (d̃ - shift)/scale on the mask
    rendered = torch.where(mask, rendered, torch.full_like(rendered, 100.0))  # junk off the mask
    out = hifa.disparity_fit_loss(rendered, pred, mask)
    torch.testing.assert_close(out["scale"], scale, rtol=1e-4, atol=1e-5)
    assert float(out["loss"]) < 1e-8
    # a wrong shape of disparity gives a positive loss with a gradient
    r = (rendered + 0.3 * torch.rand(2, 8, 8, generator=g)).requires_grad_(True)
    out = hifa.disparity_fit_loss(r, pred, mask)
    out["loss"].backward()
    assert float(out["loss"].detach()) > 1e-4 and r.grad[~mask].abs().sum() == 0 and r.grad[mask].abs().sum() > 0
    # Pearson variant is affine-invariant
    p = hifa.disparity_pearson_loss(3 * pred + 1, pred, mask)
    assert abs(float(p)) < 1e-6
    assert float(hifa.disparity_pearson_loss(-pred, pred, mask)) == pytest.approx(2.0, abs=1e-5)
    # empty masks: zero loss, still differentiable
    z = hifa.disparity_fit_loss(r, pred, torch.zeros_like(mask))
    assert float(z["loss"]) == 0.0 and z["loss"].requires_grad


def test_disparity_fit_reduction_mean_and_sum():
    """``reduction="sum"`` is the per-image squared norm of the fit residual = n_masked · the mean."""
    g = torch.Generator().manual_seed(6)
    pred = torch.rand(2, 8, 8, generator=g) + 0.5
    rendered = torch.rand(2, 8, 8, generator=g) + 0.5
    mask = torch.rand(2, 8, 8, generator=g) > 0.4
    n = mask.reshape(2, -1).sum(-1).float()
    per_image = []
    for b in range(2):  # the residual written out: s p - d̃ with p centred rendered, d̃ normalised prediction
        d, y = rendered[b][mask[b]], pred[b][mask[b]]
        t = (y - y.mean()) / y.std()
        p = d - d.mean()
        s = (p * t).sum() / (p * p).sum()
        per_image.append(((s * p - t) ** 2).sum())
    per_image = torch.stack(per_image)
    mean = hifa.disparity_fit_loss(rendered, pred, mask)["loss"]
    total = hifa.disparity_fit_loss(rendered, pred, mask, reduction="sum")["loss"]
    torch.testing.assert_close(mean, (per_image / n).mean())
    torch.testing.assert_close(total, per_image.mean())
    with pytest.raises(ValueError, match="disparity reduction"):
        hifa.disparity_fit_loss(rendered, pred, mask, reduction="max")


def test_disparity_lambda_schedules_and_dpt_preprocess():
    assert hifa.disparity_lambda(0.1, 0.25, "constant") == 0.1
    assert hifa.disparity_lambda(0.1, 0.25, "anneal") == pytest.approx(0.075)
    assert hifa.disparity_lambda(0.1, 0.5, "quadratic") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="disparity schedule"):
        hifa.disparity_lambda(0.1, 0.5, "cos")
    x = torch.full((1, 3, 16, 16), 0.75)
    y = hifa.dpt_preprocess(x, (32, 32))
    assert y.shape == (1, 3, 32, 32)
    torch.testing.assert_close(y, torch.full_like(y, 0.5))
