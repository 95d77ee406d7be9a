"""Which sign of UDS's generation reconstruction term converges?  Measured on the exact-score prior.

Eq. 16 / Alg. 1 print ``x̂_0^t − x̂_0^{t−c}``; Sec. 4.3 and the ISM term it replaces point the other way
(../shared/METHODS.md §4).  Free latent particles (no renderer) are optimised with Adam on the UDS generation
gradient under the exact Gaussian-mixture score (``scoredistill.testing.exact_score_prior``), prompt 0,
Tweedie x̂_0, c = 80, t ~ U(20, 980).  Metrics: RMS distance of a particle to the nearest component mean of
prompt 0 and the particle's RMS norm (data have RMS norm ≈ 1, components std 0.1).

Why (single Gaussian N(μ, s²I), γ_t = ᾱ_t s² / (ᾱ_t s² + 1 − ᾱ_t) decreasing in t):
``E_ε[x̂_0^t − x̂_0^{t−c}] = −(γ_{t−c} − γ_t)(x_0 − μ)``, so gradient DESCENT on the printed sign pushes x_0 away
from the data (a repulsive, unbounded term), while the reversed sign pulls it towards μ.

Run ``python tests/test_uds_sign_benchmark.py`` for the table quoted in docs/uds.md.
"""
import torch

from harness import one_intraop_thread
from scoredistill.maths.uds import DEFAULT_RECON_SIGN, uds_generation_grad
from scoredistill.testing.exact_score_prior import ExactScorePrior


def run_particles(sign, guidance_scale, steps=300, lr=0.05, n=8, interval=80, seed=0, estimator="tweedie"):
    """Returns (mean distance to prompt 0, mean RMS norm) after ``steps`` Adam steps."""
    with one_intraop_thread():  # tiny tensors: threading only adds overhead on a shared CPU
        return _run_particles(sign, guidance_scale, steps, lr, n, interval, seed, estimator)


def _run_particles(sign, guidance_scale, steps, lr, n, interval, seed, estimator):
    prior = ExactScorePrior.random(num_prompts=2, num_components=3, latent_shape=(4, 4, 4), std=0.1, seed=0)
    ac = prior.alphas_cumprod.float()
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, 4, 4, 4, generator=g) * 0.5).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    cond, unc = prior.embedding(0, n), prior.embedding(None, n)
    eps_fn = lambda z, t, e: prior(z, t, e).sample  # noqa: E731
    for _ in range(steps):
        t = torch.randint(20, 981, (n,), generator=g)
        noise = torch.randn(x.shape, generator=g)
        res = uds_generation_grad(eps_fn, x, t, cond, unc, ac, guidance_scale=guidance_scale, interval=interval,
                                  recon_sign=sign, noise=noise, x0_estimator=estimator, ddim_steps=3)
        opt.zero_grad()
        x.grad = res.grad
        opt.step()
    x = x.detach()
    dist = prior.distance_to_prompt(x, 0).mean().item()
    norm = (x.reshape(n, -1).norm(dim=1) / x[0].numel() ** 0.5).mean().item()
    return dist, norm


def test_reconstruction_term_alone_printed_sign_diverges_reversed_contracts():
    d_p, n_p = run_particles("printed", 0.0, steps=100)
    d_r, n_r = run_particles("reversed", 0.0, steps=100)
    assert n_p > 1.5  # started at RMS norm 0.5; the printed term is repulsive
    assert n_r < 0.6 and d_r < 1.0


def test_paper_setting_w7_5_reversed_stays_bounded_and_closer():
    d_p, n_p = run_particles("printed", 7.5, steps=150)
    d_r, n_r = run_particles("reversed", 7.5, steps=150)
    assert d_r < d_p and n_r < n_p
    # the printed sign keeps drifting away: more steps, larger norm
    d_p2, n_p2 = run_particles("printed", 7.5, steps=300)
    assert n_p2 > n_p + 0.3


def test_default_is_the_converging_sign():
    assert DEFAULT_RECON_SIGN == "reversed"


if __name__ == "__main__":
    print("sign      w    steps  dist-to-prompt0  rms-norm")
    for w in (0.0, 7.5):
        for steps in (300, 1000, 3000):
            for sign in ("printed", "reversed"):
                d, n = run_particles(sign, w, steps=steps, lr=0.02 if steps > 300 else 0.05, n=16)
                print(f"{sign:9s} {w:4.1f} {steps:6d}  {d:15.3f}  {n:8.3f}", flush=True)
