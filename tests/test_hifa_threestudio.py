"""Integration: HiFA's renderer, guidance and system in threestudio (CPU, tiny models)."""
import csv
import glob
import math
import os

import pytest
import torch

pytestmark = pytest.mark.threestudio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from harness.tolerances import batching_discrepancy, cfg_atol  # noqa: E402


# ------------------------------------------------------------------ renderer

class ShellGeometry(torch.nn.Module):
    """Density: a thin spherical shell of radius 0.5 (a sharp peak along every ray that hits it)."""

    def __init__(self, width=0.01, height=400.0):
        super().__init__()
        self.width, self.height = width, height
        self.feat = torch.nn.Parameter(torch.zeros(3))

    def forward(self, points, output_normal=False):
        r = points.norm(dim=-1, keepdim=True)
        density = self.height * torch.exp(-0.5 * ((r - 0.5) / self.width) ** 2)
        return {"density": density, "features": self.feat.expand(points.shape[0], 3) + 0.0 * points}


def _rays(H=6, W=6, spread=0.25):
    o = torch.tensor([0.0, 0.0, -2.5]).expand(1, H, W, 3).contiguous()
    ys, xs = torch.meshgrid(torch.linspace(-spread, spread, H), torch.linspace(-spread, spread, W), indexing="ij")
    d = torch.stack([xs, ys, torch.ones_like(xs)], -1)[None]
    return o, d / d.norm(dim=-1, keepdim=True)


def _renderer(ts, geometry, **kw):
    mat = ts.find("no-material")({"n_output_dims": 3, "color_activation": "sigmoid"})
    bg = ts.find("solid-color-background")({"color": [1.0, 1.0, 1.0]})
    cfg = {"radius": 1.0, "num_samples_per_ray": 32, "num_samples_per_ray_importance": 16}
    cfg.update(kw)
    return ts.find("kernel-smoothed-volume-renderer")(cfg, geometry=geometry, material=mat, background=bg)


def _torch_volume(ts):
    return ts.find("implicit-volume")(
        {
            "radius": 1.0,
            "normal_type": None,
            "pos_encoding_config": {"otype": "ProgressiveBandFrequency", "n_frequencies": 4},
            "mlp_network_config": {"otype": "VanillaMLP", "activation": "ReLU", "output_activation": "none", "n_neurons": 16, "n_hidden_layers": 1},
        }
    )


def test_renderer_outputs_gradients_and_z_variance(threestudio_module):
    from scoredistill.maths.hifa import ray_depth_statistics

    ts = threestudio_module
    torch.manual_seed(0)
    geo = _torch_volume(ts)
    r = _renderer(ts, geo)
    o, d = _rays()
    out = r(o, d, torch.zeros(1, 3))
    R, S = 36, 48
    for k, shape in {"comp_rgb": (1, 6, 6, 3), "opacity": (1, 6, 6, 1), "depth": (1, 6, 6, 1), "z_variance": (1, 6, 6, 1),
                     "weights": (R * S, 1), "t_points": (R * S, 1), "t_intervals": (R * S, 1), "ray_indices": (R * S,)}.items():
        assert tuple(out[k].shape) == shape, k
    w = out["weights"].view(R, S)
    z = out["t_points"].view(R, S)
    assert torch.all(z[:, 1:] >= z[:, :-1])  # coarse ∪ fine, sorted
    opacity, mu, var = ray_depth_statistics(w, z)
    torch.testing.assert_close(out["opacity"].view(-1), opacity)
    torch.testing.assert_close(out["depth"].view(-1), (w * z).sum(-1))
    torch.testing.assert_close(out["z_variance"].view(-1), var * (opacity > 0.5).float())
    # intervals partition [near, far] of each ray
    sums = out["t_intervals"].view(R, S).sum(-1)
    assert torch.all(sums > 0.5) and torch.all(sums < 2.0 * math.sqrt(3))
    (out["comp_rgb"].mean() + out["opacity"].mean()).backward()
    assert all(p.grad is not None for p in geo.parameters())
    assert sum(float(p.grad.abs().sum()) for p in geo.parameters()) > 0
    # evaluation: deterministic, chunked render equals the unchunked one
    r.eval()
    with torch.no_grad():
        a = r(o, d, torch.zeros(1, 3))
        r.cfg.eval_chunk_size = 7
        b = r(o, d, torch.zeros(1, 3))
    for k in ("comp_rgb", "opacity", "depth", "z_variance"):
        torch.testing.assert_close(a[k], b[k])
    # a ray that misses the bounding box is empty
    o2 = torch.tensor([[[[0.0, 3.0, -2.5]]]])
    d2 = torch.tensor([[[[0.0, 0.0, 1.0]]]])
    with torch.no_grad():
        miss = r(o2, d2, torch.zeros(1, 3))
    assert float(miss["opacity"]) == 0.0
    torch.testing.assert_close(miss["comp_rgb"].view(3), torch.ones(3))


def test_renderer_kernel_smoothing_samples_the_peak_neighbourhood(threestudio_module):
    """Same rays, same coarse samples: the boxcar-smoothed sampler puts more fine samples in the coarse bins
    next to the density peak than the unsmoothed one."""
    ts = threestudio_module
    geo = ShellGeometry()
    o, d = _rays(4, 4, 0.1)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    counts = {}
    for kernel in ("none", "boxcar"):
        r = _renderer(ts, geo, kernel_smoothing=kernel, num_samples_per_ray=32, num_samples_per_ray_importance=32)
        r.eval()  # deterministic coarse samples and u
        with torch.no_grad():
            smp = r.sample_along_rays(o, d)
        edges, w = smp["edges"], smp["coarse_weights"]
        peak = w.argmax(-1)
        t = smp["t"]
        lo = edges.gather(1, (peak - 1)[:, None])
        hi = edges.gather(1, (peak + 2)[:, None])
        c_lo = edges.gather(1, peak[:, None])
        c_hi = edges.gather(1, (peak + 1)[:, None])
        nbhd = (t >= lo) & (t < hi) & ~((t >= c_lo) & (t < c_hi))
        counts[kernel] = int(nbhd.sum())
    assert counts["boxcar"] > counts["none"] + 16 * 8, counts  # ≥ 8 more per ray on average
    with pytest.raises(ValueError, match="kernel"):
        _renderer(ts, geo, kernel_smoothing=[1, 1])


# ------------------------------------------------------------------ guidance

class _PromptUtils:
    use_perp_neg = False

    def __init__(self, cond, uncond):
        self.cond, self.uncond = cond, uncond

    def get_text_embeddings(self, elevation, azimuth, camera_distances, view_dependent_prompting=True):
        B = elevation.shape[0]
        return torch.cat([self.cond.expand(B, -1, -1), self.uncond.expand(B, -1, -1)])


def _guidance(ts, tiny_sd, **kw):
    cfg = dict(pretrained_model_name_or_path=tiny_sd, half_precision_weights=False, image_size=32, guidance_scale=7.5)
    cfg.update(kw)
    return ts.find("hifa-guidance")(cfg)


@pytest.fixture(scope="module")
def prompt_utils():
    g = torch.Generator().manual_seed(0)
    return _PromptUtils(torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g))


def _independent_cfg_eps(guidance, z, t, pu, s):
    B = z.shape[0]
    tt = torch.full((B,), int(t)) if not torch.is_tensor(t) or t.dim() == 0 else t
    e_c = guidance.unet(z, tt, encoder_hidden_states=pu.cond.expand(B, -1, -1)).sample
    e_u = guidance.unet(z, tt, encoder_hidden_states=pu.uncond.expand(B, -1, -1)).sample
    return e_u + s * (e_c - e_u)


def _fixed_step_inputs(g, t):
    """Make ``g`` sample the timesteps ``t`` (B,) and return one step's inputs for a batch of B: elevation, azimuth,
    camera distance, latents (B, 4, 16, 16) and the rendered image (B, 3, 32, 32), both requiring grad."""
    B = t.shape[0]
    g.sample_timesteps = lambda n, generator=None, device=None: t
    latents = torch.randn(B, 4, 16, 16).requires_grad_(True)
    image = torch.rand(B, 3, 32, 32).requires_grad_(True)
    return torch.zeros(B), torch.zeros(B), torch.full((B,), 2.0), latents, image


def test_hifa_guidance_tweedie_sds_plus_equals_eq4(threestudio_module, tiny_sd, prompt_utils):
    ts = threestudio_module
    g = _guidance(ts, tiny_sd, denoised_target="tweedie")
    B = 2
    t = torch.tensor([300, 700])
    elev, azim, dist, latents, image = _fixed_step_inputs(g, t)
    torch.manual_seed(5)
    out = g.compute_grad(latents, prompt_utils, elev, azim, dist, hifa_image=image)
    assert out["unet_calls_step"] == 1  # one batched CFG call
    # independent Eq. 4 with the same noise
    torch.manual_seed(5)
    noise = torch.randn_like(latents)
    abar = g.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    with torch.no_grad():
        z_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        eps = _independent_cfg_eps(g, z_t, t, prompt_utils, 7.5)
        z_hat = (z_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        x_hat = (g.vae.decode(z_hat / g.vae.config.scaling_factor).sample * 0.5 + 0.5).clamp(0, 1)
    omega = (1 - abar) * abar.sqrt() / (2 * (1 - abar).sqrt())  # ω(t) = w_sds(t) α_t / (2 σ_t)
    lat_term = (omega.view(-1) * ((latents - z_hat) ** 2).flatten(1).sum(-1)).mean()
    img_term = (omega.view(-1) * ((image - x_hat) ** 2).flatten(1).sum(-1)).mean()
    # Tolerances from the arithmetic (tests/harness/tolerances.py): the guidance makes ONE 2B CFG call, the
    # reference two B calls; their float32 discrepancy δ on these inputs, pushed through ∂q/∂ε̃ of each quantity.
    sigma_over_alpha = ((1 - abar) / abar).sqrt()
    delta = batching_discrepancy(g.unet, z_t, t, prompt_utils.cond.expand(B, -1, -1), prompt_utils.uncond.expand(B, -1, -1))
    # latent term: the base turns grad into loss_sds with d/dz = grad / B = ∇_z lat_term; ∂(grad/B)/∂ε̃ = 2ωσ/(αB)
    (gz,) = torch.autograd.grad(lat_term, latents)
    atol = cfg_atol(delta, 7.5, 2 * omega * sigma_over_alpha / B, latents, z_hat)
    torch.testing.assert_close(out["grad"] / B, gz, rtol=0, atol=atol)
    # residual Σ ω |z − ẑ|² / B: ∂/∂ε̃ summed over the elements = 2ωσ/α Σ|z − ẑ| / B
    res_gain = (2 * omega.view(-1) * sigma_over_alpha.view(-1) * (latents - z_hat).detach().abs().flatten(1).sum(-1)).sum() / B
    torch.testing.assert_close(out["sds_latent_residual"], lat_term.detach(), rtol=1e-5, atol=cfg_atol(delta, 7.5, res_gain))
    # ... which is DreamFusion's SDS gradient w(t)(ε̂ - ε) (Eq. 2); ∂/∂ε̃ = w(t) = 1 - ᾱ
    atol = cfg_atol(delta, 7.5, 1 - abar, eps, noise, latents / sigma_over_alpha)
    torch.testing.assert_close(out["grad"], (1 - abar) * (eps - noise), rtol=0, atol=atol)
    torch.testing.assert_close(out["loss_sds_img"], img_term, rtol=1e-4, atol=1e-6)
    (gi,) = torch.autograd.grad(out["loss_sds_img"], image)
    (gi_ref,) = torch.autograd.grad(img_term, image)
    torch.testing.assert_close(gi, gi_ref)


def test_hifa_guidance_ddim_target_and_unet_count(threestudio_module, tiny_sd, prompt_utils):
    ts = threestudio_module
    g = _guidance(ts, tiny_sd, denoised_target="ddim", ddim_eta=0.0, use_img_loss=False)
    t = torch.tensor([620])
    g.sample_timesteps = lambda n, generator=None, device=None: t
    latents = torch.randn(1, 4, 16, 16)
    torch.manual_seed(3)
    calls0 = g.unet_calls
    out = g.compute_grad(latents, prompt_utils, torch.zeros(1), torch.zeros(1), torch.full((1,), 2.0))
    assert g.unet_calls - calls0 == 3 == out["unet_calls_step"]  # 620 -> 370 -> 120 -> (<0)
    assert "loss_sds_img" not in out
    torch.manual_seed(3)
    noise = torch.randn_like(latents)
    abar = g.scheduler.alphas_cumprod.float()
    with torch.no_grad():
        z = abar[620].sqrt() * latents + (1 - abar[620]).sqrt() * noise
        for tau in (620, 370, 120):
            eps = _independent_cfg_eps(g, z, tau, prompt_utils, 7.5)
            a_t = abar[tau]
            a_p = abar[tau - 250] if tau >= 250 else abar[0]
            x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            z = a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps  # DDIM, η = 0
    omega = (1 - abar[620]) * abar[620].sqrt() / (2 * (1 - abar[620]).sqrt())
    torch.testing.assert_close(out["grad"], 2 * omega * (latents - z), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", ["tweedie", "ddim"])
def test_hifa_guidance_outputs_are_its_eq4_functions(threestudio_module, tiny_sd, prompt_utils, target):
    """The adapter's SDS+ outputs are ``sds_plus_loss`` (Eq. 4) and ``sds_plus_grad`` of its own inputs, bit for bit:
    the same ẑ (same noise, same batched UNet calls), x̂ = D(ẑ) and ω(t)."""
    from scoredistill.maths import hifa
    from scoredistill.maths.diffusion import add_noise, tweedie_x0

    ts = threestudio_module
    g = _guidance(ts, tiny_sd, denoised_target=target, ddim_eta=0.0)
    B = 2
    t = torch.tensor([300, 700]) if target == "tweedie" else torch.tensor([620, 620])
    elev, azim, dist, latents, image = _fixed_step_inputs(g, t)
    torch.manual_seed(11)
    out = g.compute_grad(latents, prompt_utils, elev, azim, dist, hifa_image=image)
    torch.manual_seed(11)
    with torch.no_grad():
        noise = torch.randn_like(latents)
        latents_noisy = add_noise(latents.detach(), noise, g.alphas_cumprod, t)
        emb = g.text_embeddings_for(prompt_utils, elev, azim, dist)

        def noise_pred_fn(x, tt, idx=None):
            return g.predict_noise_cfg(x, tt, prompt_utils, elev, azim, dist, text_embeddings=emb)["noise_pred"]

        if target == "tweedie":
            latents_denoised = tweedie_x0(latents_noisy, noise_pred_fn(latents_noisy, t), g.alphas_cumprod, t)
        else:
            latents_denoised, _ = hifa.ddim_denoise(noise_pred_fn, latents_noisy, t, g.ddim_scheduler, 0.25, 0.0)
        image_denoised = torch.nn.functional.interpolate(g.decode_latents(latents_denoised), (32, 32), mode="bilinear",
                                                         align_corners=False)
    omega = hifa.omega_weight(g.alphas_cumprod, t, g.cfg.weighting_strategy)
    ref = hifa.sds_plus_loss(latents, latents_denoised, omega, image, image_denoised)
    assert torch.equal(out["grad"], hifa.sds_plus_grad(latents, latents_denoised, omega))
    assert torch.equal(out["sds_latent_residual"], ref["loss_latent"].detach())
    assert torch.equal(out["loss_sds_img"], ref["loss_image"])
    (gi,) = torch.autograd.grad(out["loss_sds_img"], image)
    (gi_ref,) = torch.autograd.grad(ref["loss_image"], image)
    assert torch.equal(gi, gi_ref)
    # the latent gradient is B times that of Eq. 4's batch-mean latent term (the base divides by B again)
    (gz,) = torch.autograd.grad(ref["loss_latent"], latents)
    torch.testing.assert_close(out["grad"] / B, gz)


def test_hifa_guidance_rejects_bad_config_before_loading(threestudio_module):
    ts = threestudio_module
    for kw, name in [({"ddim_step_ratio": 0.3}, "ddim_step_ratio"), ({"denoised_target": "x0"}, "denoised_target"),
                     ({"ddim_eta": -1.0}, "ddim_eta")]:
        with pytest.raises(ValueError, match=name):
            ts.find("hifa-guidance")(dict(pretrained_model_name_or_path="/nonexistent/sd", **kw))


# ------------------------------------------------------------------ launch.py end to end

def _metrics(trial):
    path = glob.glob(os.path.join(trial, "csv_logs", "**", "metrics.csv"), recursive=True)
    assert path, os.listdir(trial)
    rows = list(csv.DictReader(open(path[0])))
    return [r for r in rows if r.get("train/loss_sds")]


def _overrides(tiny_sd):
    from harness import tiny_dpt_path

    return [
        "system.prompt_processor.prompt=a hamburger",
        f"system.prompt_processor.pretrained_model_name_or_path={tiny_sd}",
        f"system.guidance.pretrained_model_name_or_path={tiny_sd}",
        f"system.disparity_model_name_or_path={tiny_dpt_path()}",
    ]


#: configs/hifa.yaml made tiny and tcnn-free (what configs/hifa-cpu-smoke.yaml spells out)
TINY = [
    "data.width=32", "data.height=32", "data.eval_width=32", "data.eval_height=32",
    "data.n_val_views=1", "data.n_test_views=2",
    "system.geometry.pos_encoding_config.otype=ProgressiveBandFrequency",
    "system.geometry.pos_encoding_config.n_frequencies=4",
    "system.geometry.mlp_network_config.n_neurons=16",
    "system.material.dir_encoding_config.otype=ProgressiveBandFrequency",
    "system.material.dir_encoding_config.n_frequencies=2",
    "system.material.mlp_network_config.otype=VanillaMLP",
    "system.material.mlp_network_config.n_hidden_layers=1",
    "system.background.dir_encoding_config.otype=ProgressiveBandFrequency",
    "system.background.dir_encoding_config.n_frequencies=2",
    "system.renderer.num_samples_per_ray=16", "system.renderer.num_samples_per_ray_importance=8",
    "system.prompt_processor.spawn=false",
    "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.precision=32",
]


def _swap_guidance(tmp_path, guidance_type, guidance_cfg):
    """configs/hifa.yaml with another guidance (its section replaced, not merged)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(REPO, "configs", "hifa.yaml"))
    cfg.system.guidance_type = guidance_type
    cfg.system.guidance = guidance_cfg
    path = os.path.join(str(tmp_path), f"hifa-{guidance_type}.yaml")
    OmegaConf.save(cfg, path)
    return path


def test_launch_hifa_yaml_end_to_end(tiny_sd):
    from harness import run_launch

    guidance = ["system.guidance.half_precision_weights=false", "system.guidance.image_size=32"]
    trial = run_launch(os.path.join(REPO, "configs", "hifa.yaml"), _overrides(tiny_sd) + TINY + guidance)
    assert glob.glob(os.path.join(trial, "ckpts", "last.ckpt"))
    assert glob.glob(os.path.join(trial, "save", "it4-test", "*.png"))
    rows = _metrics(trial)
    assert len(rows) == 4
    # Eq. 5: t = 980 - 680 sqrt(step / 4), one t per step; DDIM r = 0.25 costs floor(t/250)+1 CFG calls
    ts_ = [float(r["train/timestep"]) for r in rows]
    assert ts_ == [round(980 - 680 * math.sqrt(s / 4)) for s in range(4)]
    assert [int(float(r["train/unet_calls_step"])) for r in rows] == [int(t // 250) + 1 for t in ts_]
    for key in ("train/loss_sds", "train/loss_sds_img", "train/loss_z_variance", "train/loss_disparity"):
        assert all(math.isfinite(float(r[key])) for r in rows), key
    # λ_d annealed as λ_d (1 - sqrt(step/4))
    lam = [float(r["train_params/lambda_disparity_effective"]) for r in rows]
    assert lam == pytest.approx([0.1 * (1 - math.sqrt(s / 4)) for s in range(4)], rel=1e-5)


def test_system_switches_threestudio_image_term_on(threestudio_module):
    from omegaconf import OmegaConf

    sys_cls = threestudio_module.find("hifa-system")
    g = OmegaConf.create({"guidance_scale": 100.0})
    assert sys_cls.guidance_config("stable-diffusion-guidance", g, True)["use_img_loss"] is True
    assert "use_img_loss" not in sys_cls.guidance_config("stable-diffusion-guidance", g, False)
    assert "use_img_loss" not in sys_cls.guidance_config("ge3d-guidance", g, True)


def test_launch_hifa_with_threestudio_sd_guidance(tmp_path):
    """threestudio's guidance in the HiFA recipe, with its image term (``use_img_loss``, switched on by the
    system).  That term decodes at a hard-coded 64x64 latent size (SD's x8 VAE at 512x512), so this run uses
    the tiny SD with a x8 VAE."""
    from harness import run_launch, tiny_sd_f8_path

    sd = tiny_sd_f8_path()
    config = _swap_guidance(
        tmp_path, "stable-diffusion-guidance",
        {"pretrained_model_name_or_path": sd, "half_precision_weights": False, "guidance_scale": 100.0},
    )
    ov = _overrides(sd) + TINY + [
        "trainer.max_steps=2", "trainer.val_check_interval=2", "system.loss.lambda_disparity=0.",
    ]
    trial = run_launch(config, ov)
    rows = _metrics(trial)
    assert len(rows) == 2 and all(math.isfinite(float(r["train/loss_sds"])) for r in rows)
    assert all(math.isfinite(float(r["train/loss_sds_img"])) for r in rows)  # SDS+ image term (Eq. 4)
    # the system's Eq. 5 annealing drives threestudio's guidance too
    assert [float(r["train/min_step"]) for r in rows] == [980.0, round(980 - 680 * math.sqrt(0.5))]
    assert [float(r["train/max_step"]) for r in rows] == [980.0, round(980 - 680 * math.sqrt(0.5))]


def test_launch_hifa_with_ge3d_guidance(tiny_sd, threestudio_module, tmp_path):
    import scoredistill

    assert "ge3d-guidance" in scoredistill.REGISTERED_NAMES
    from harness import run_launch

    config = _swap_guidance(
        tmp_path, "ge3d-guidance",
        {"pretrained_model_name_or_path": tiny_sd, "half_precision_weights": False, "image_size": 32, "guidance_scale": 7.5},
    )
    ov = _overrides(tiny_sd) + TINY + ["trainer.max_steps=2", "trainer.val_check_interval=2"]
    trial = run_launch(config, ov)
    rows = _metrics(trial)
    assert len(rows) == 2 and all(math.isfinite(float(r["train/loss_sds"])) for r in rows)
    assert all(not r.get("train/loss_sds_img") for r in rows)  # GE3D has no image term: latent SDS+ only
    assert all(math.isfinite(float(r["train/loss_z_variance"])) for r in rows)


def test_cpu_smoke_config_is_hifa_yaml_made_tiny(threestudio_module):
    """configs/hifa-cpu-smoke.yaml parses in threestudio and differs from hifa.yaml only in size/encodings."""
    from threestudio.utils.config import load_config

    full = load_config(os.path.join(REPO, "configs", "hifa.yaml"), cli_args=["system.prompt_processor.prompt=x"])
    smoke = load_config(os.path.join(REPO, "configs", "hifa-cpu-smoke.yaml"), cli_args=["system.prompt_processor.prompt=x"])
    assert smoke.system_type == full.system_type == "hifa-system"
    s, f = smoke.system, full.system
    assert s.renderer_type == f.renderer_type == "kernel-smoothed-volume-renderer"
    assert s.guidance_type == f.guidance_type == "hifa-guidance"
    # the reference code's relative strengths (tests/test_hifa_faithful.py measures them)
    assert list(s.loss.lambda_z_variance) == [0, 0.0, 3.0, smoke.trainer.max_steps // 2]  # warm-up: first half
    assert {**dict(s.loss), "lambda_z_variance": None} == {**dict(f.loss), "lambda_z_variance": None}
    assert dict(f.loss) == {
        "lambda_sds": 0.05, "lambda_sds_img": 0.005, "lambda_z_variance": [0, 0.0, 3.0, 5000], "lambda_disparity": 0.1,
        "lambda_orient": 0.0, "lambda_sparsity": 0.0, "lambda_opaque": 0.0,
    }
    assert f.guidance.weighting_strategy == s.guidance.weighting_strategy == "constant"
    assert f.z_variance_reduction == s.z_variance_reduction == "sum"
    assert f.disparity_reduction == s.disparity_reduction == "reference"
    assert list(f.random_step_percent_range) == [0.02, 0.98]
    assert f.guidance.guidance_scale == 100.0 and f.guidance.denoised_target == "ddim" and f.guidance.ddim_step_ratio == 0.25
    assert f.timestep_annealing == s.timestep_annealing == "sqrt" and f.anneal_total_steps == 10000
    assert full.trainer.max_steps == 10000 and full.data.width == full.data.height == 512
    assert f.optimizer.params["geometry.encoding"].lr == 0.01 and f.optimizer.params["geometry.density_network"].lr == 0.001
    for enc in (s.geometry.pos_encoding_config, s.material.dir_encoding_config, s.background.dir_encoding_config):
        assert enc.otype == "ProgressiveBandFrequency"  # no tiny-cuda-nn
    assert s.material.mlp_network_config.otype == "VanillaMLP" and smoke.trainer.precision == 32


def test_hifa_guidance_constant_weighting(threestudio_module, tiny_sd, prompt_utils):
    g = _guidance(threestudio_module, tiny_sd, denoised_target="tweedie", weighting_strategy="constant", use_img_loss=False)
    g.sample_timesteps = lambda n, generator=None: torch.tensor([400])
    latents = torch.randn(1, 4, 16, 16)
    torch.manual_seed(1)
    out = g.compute_grad(latents, prompt_utils, torch.zeros(1), torch.zeros(1), torch.full((1,), 2.0))
    torch.manual_seed(1)
    noise = torch.randn_like(latents)
    a = g.scheduler.alphas_cumprod[400].float()
    with torch.no_grad():
        z_t = a.sqrt() * latents + (1 - a).sqrt() * noise
        z_hat = (z_t - (1 - a).sqrt() * _independent_cfg_eps(g, z_t, 400, prompt_utils, 7.5)) / a.sqrt()
    delta = batching_discrepancy(g.unet, z_t, torch.tensor([400]), prompt_utils.cond, prompt_utils.uncond)
    atol = cfg_atol(delta, 7.5, ((1 - a) / a).sqrt(), latents, z_hat)  # ∂(z - ẑ)/∂ε̃ = σ/α
    torch.testing.assert_close(out["grad"], latents - z_hat, rtol=0, atol=atol)  # 2 ω (z - ẑ), ω = 1/2


def test_system_rejects_bad_hifa_settings(threestudio_module):
    """hifa-system's own settings are checked (ValueError naming the setting) before anything loads."""
    import types

    from threestudio.utils.config import parse_structured

    sys_cls = threestudio_module.find("hifa-system")
    check = lambda **kw: sys_cls.validate_hifa_config(types.SimpleNamespace(cfg=parse_structured(sys_cls.Config, kw)))
    check()  # defaults are valid
    check(disparity_reduction="sum")
    for name, bad in [("disparity_reduction", "max"), ("timestep_annealing", "exp"), ("z_variance_reduction", "median"),
                      ("disparity_loss", "l1"), ("disparity_schedule", "cos")]:
        with pytest.raises(ValueError, match=f"system.{name}"):
            check(**{name: bad})


# ------------------------------------------------------------------ issue 14: mask once, ablation range, DPT input

def _fake_system(sys_cls, **cfg):
    import types

    from threestudio.utils.config import parse_structured

    return types.SimpleNamespace(cfg=parse_structured(sys_cls.Config, cfg), RENDERER_ZVAR_MASK=sys_cls.RENDERER_ZVAR_MASK)


def test_system_applies_the_z_variance_mask_once(threestudio_module):
    """A system threshold below the renderer's 0.5 takes effect (the unmasked output is masked once, by the
    system); with a renderer that only has the masked output such a threshold is refused."""
    from scoredistill.maths.hifa import z_variance_loss_from_maps

    sys_cls = threestudio_module.find("hifa-system")
    opacity = torch.tensor([0.2, 0.4, 0.45, 0.7, 0.9]).view(1, 5, 1, 1)
    var = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).view(1, 5, 1, 1)
    out = {"opacity": opacity, "z_variance_unmasked": var, "z_variance": var * (opacity > 0.5)}
    low = _fake_system(sys_cls, z_variance_opacity_threshold=0.3, z_variance_reduction="sum")
    assert float(sys_cls.z_variance_term(low, out)) == pytest.approx(2.0 + 3.0 + 4.0 + 5.0)
    high = _fake_system(sys_cls, z_variance_opacity_threshold=0.8, z_variance_reduction="sum")
    assert float(sys_cls.z_variance_term(high, out)) == pytest.approx(5.0)
    # threestudio's nerf-volume-renderer: z_variance only, already masked at 0.5
    ts_out = {"opacity": opacity, "z_variance": var * (opacity > 0.5)}
    assert float(sys_cls.z_variance_term(high, ts_out)) == pytest.approx(5.0)
    mid = _fake_system(sys_cls, z_variance_opacity_threshold=0.5, z_variance_reduction="mean")
    torch.testing.assert_close(sys_cls.z_variance_term(mid, ts_out), z_variance_loss_from_maps(var, opacity, 0.5, "mean"))
    with pytest.raises(ValueError, match="system.z_variance_opacity_threshold"):
        sys_cls.z_variance_term(low, ts_out)


def test_renderer_outputs_unmasked_z_variance(threestudio_module):
    from scoredistill.maths.hifa import ray_depth_statistics

    r = _renderer(threestudio_module, ShellGeometry(), num_samples_per_ray=32, num_samples_per_ray_importance=16)
    r.train()
    o, d = _rays(4, 4, spread=0.6)
    out = r(o, d, torch.zeros(1, 3))
    assert "z_variance_unmasked" in out and out["z_variance_unmasked"].shape == out["z_variance"].shape
    mask = (out["opacity"] > 0.5).float()
    torch.testing.assert_close(out["z_variance"], out["z_variance_unmasked"] * mask)


def test_random_ablation_samples_the_papers_range(threestudio_module):
    """``timestep_annealing: random`` draws t in [0.02 T, 0.98 T] (DreamFusion's range, the reference code's
    ``20 + 960 U``), not the annealing range [0.3 T, 0.98 T]."""
    import types

    sys_cls = threestudio_module.find("hifa-system")
    fake = _fake_system(sys_cls, timestep_annealing="random", anneal_total_steps=100)
    fake.guidance = types.SimpleNamespace(num_train_timesteps=1000, min_step=0, max_step=0)
    torch.manual_seed(0)
    ts_ = []
    for step in range(300):
        sys_cls._apply_annealing(fake, step)
        assert fake.guidance.min_step == fake.guidance.max_step
        ts_.append(fake.guidance.min_step)
    assert min(ts_) >= 20 and max(ts_) <= 980
    assert sum(t < 300 for t in ts_) > 60  # ~29% of U[20, 980] lies below the annealing range
    with pytest.raises(ValueError, match="system.random_step_percent_range"):
        sys_cls.validate_hifa_config(_fake_system(sys_cls, random_step_percent_range=[0.5, 0.1]))


def test_system_dpt_input_and_disparity_through_an_analytic_depth_model(threestudio_module, tmp_path):
    """The system reads the DPT input settings from the checkpoint's processor config (transformers), and its
    disparity term on a non-constant depth model (an analytic stand-in with DPT's call signature) is the
    fit / Pearson loss of the prediction: ~0 for the matching relief, sign-blind for fit, not for Pearson."""
    import json
    import types

    from scoredistill.maths.hifa import disparity_fit_loss, disparity_pearson_loss, dpt_preprocess

    sys_cls = threestudio_module.find("hifa-system")
    with open(tmp_path / "preprocessor_config.json", "w") as f:
        json.dump({"do_normalize": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                   "resample": 2, "size": 64, "feature_extractor_type": "DPTFeatureExtractor"}, f)
    settings = sys_cls.dpt_input_settings(str(tmp_path), 384)
    assert settings["size"] == (64, 64) and settings["resample"] == 2
    assert sys_cls.dpt_input_settings(str(tmp_path / "missing"), 48)["size"] == (48, 48)  # DPT defaults, bilinear

    class AnalyticDPT(torch.nn.Module):
        def forward(self, pixel_values):
            return types.SimpleNamespace(predicted_depth=5.0 * (pixel_values * 0.5 + 0.5).mean(1) + 1.0)

    H = 32
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, H), indexing="ij")
    relief = torch.exp(-((xx - 0.3) ** 2 + yy ** 2) * 4)[None]
    opacity = torch.where(xx ** 2 + yy ** 2 < 0.8, 0.95, 0.1)[None]

    def run(disparity, loss):
        fake = _fake_system(sys_cls, disparity_loss=loss, disparity_reduction="mean")
        fake.dpt, fake._dpt_input = AnalyticDPT(), settings
        depth = (opacity / disparity).requires_grad_(True)
        out = {"comp_rgb": relief[..., None].expand(1, H, H, 3), "opacity": opacity[..., None], "depth": depth[..., None]}
        value = sys_cls.disparity_loss(fake, out)
        value.backward()
        return float(value), depth.grad

    good, inv = 0.3 + 0.6 * relief, 0.9 - 0.6 * relief
    fit_good, g = run(good, "fit")
    fit_inv, _ = run(inv, "fit")
    pear_good, _ = run(good, "pearson")
    pear_inv, _ = run(inv, "pearson")
    # the system's value is the maths on the analytic prediction
    pred = AnalyticDPT()(dpt_preprocess(relief[:, None].expand(1, 3, H, H), **settings)).predicted_depth
    pred = torch.nn.functional.interpolate(pred[:, None], (H, H), mode="bicubic", align_corners=False)[:, 0]
    mask = opacity > 0.5
    assert fit_good == pytest.approx(float(disparity_fit_loss(good, pred, mask)["loss"]), rel=1e-4, abs=1e-7)
    assert pear_inv == pytest.approx(float(disparity_pearson_loss(inv, pred, mask)), rel=1e-5)
    assert fit_good < 1e-2 and pear_good < 1e-2
    assert fit_inv == pytest.approx(fit_good, rel=1e-3, abs=1e-6)  # fit is blind to the relief's sign
    assert pear_inv > 1.9  # Pearson is not
    assert g[~mask].abs().sum() == 0
