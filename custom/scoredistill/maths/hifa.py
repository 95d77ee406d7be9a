"""HiFA maths (Zhu, Zhuang & Koyejo, "HiFA: High-fidelity Text-to-3D Generation with Advanced
Diffusion Guidance", ICLR 2024), as plain functions over tensors.  No threestudio import.

Contents (paper equation in brackets):

* SDS+ [Eq. 2-4]: :func:`omega_weight`, the denoised target ẑ -- one step (Eq. 2, Alg. 1 line 5:
  :func:`scoredistill.maths.diffusion.tweedie_x0`) or the DDIM chain :func:`ddim_denoise` --,
  :func:`sds_plus_loss` (Eq. 4) and its latent gradient :func:`sds_plus_grad`.
* Timestep annealing [Eq. 5 / Alg. 1 line 2]: :func:`annealing_fraction`, :func:`annealed_timestep`.
* z-variance [Eq. 6-8]: :func:`ray_depth_statistics`, :func:`z_variance_loss`,
  :func:`z_variance_loss_from_maps`.
* Kernel smoothing of the coarse PDF [Sec. 4.2]: :func:`resolve_kernel`, :func:`kernel_smooth`,
  and inverse-CDF importance resampling :func:`sample_pdf`.
* Disparity regularisation [Sec. 3 / A.1]: :func:`dpt_preprocess`, :func:`disparity_fit_loss`,
  :func:`disparity_pearson_loss`, :func:`disparity_lambda`.

Conventions: ``alphas_cumprod`` is the diffusion schedule's cumulative product ᾱ (shape ``(T,)``),
``α_t = sqrt(ᾱ_t)`` and ``σ_t = sqrt(1 - ᾱ_t)`` as in the paper's ``z_t = α_t z + σ_t ε``; ᾱ_t, w(t), the forward
process and the one-step estimate are the shared ones of :mod:`scoredistill.maths.diffusion`.  Code names:
``latents`` (z), ``latents_noisy`` (z_t), ``latents_target`` / ``latents_denoised`` (ẑ), ``noise_pred`` (the
guided ε̂).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..sync import host_only, to_device
from .diffusion import abar_at, sds_weight

# ----------------------------------------------------------------------------------------------
# SDS+ (Eq. 2-4)
# ----------------------------------------------------------------------------------------------

#: weighting strategies for ω(t); see :func:`omega_weight`
OMEGA_WEIGHTINGS = ("sds", "uniform", "fantasia3d", "constant")
#: denoised-target estimators for ẑ
DENOISED_TARGETS = ("tweedie", "ddim")


def omega_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, weighting: str = "sds") -> torch.Tensor:
    """ω(t) of Eq. 3-4, shape ``(B,)`` (float32, on ``alphas_cumprod``'s device).

    Eq. 2 rewrites the SDS gradient ``w(t)(ε̂ - ε)`` as ``w(t) α_t/σ_t (z - ẑ)``; Eq. 3 folds "the
    coefficients related to t" into ω(t).  Here ``ω(t) = w(t) α_t / (2 σ_t)`` so that
    ``∇_z ω(t)‖z - ẑ‖² = w(t) α_t/σ_t (z - ẑ)``, i.e. the latent term of SDS+ with the one-step
    (Tweedie) target has exactly DreamFusion's SDS gradient with weighting ``w``
    (:func:`scoredistill.maths.diffusion.sds_weight`):

    * ``"sds"``: ``w = 1 - ᾱ_t`` (DreamFusion / threestudio default),
    * ``"uniform"``: ``w = 1``,
    * ``"fantasia3d"``: ``w = sqrt(ᾱ_t)(1 - ᾱ_t)``,
    * ``"constant"``: ``ω = 1/2`` for every t (gradient ``z - ẑ``; HiFA's reference code uses a
      constant weight, 0.05 there -- set ``lambda_sds`` to scale).

    Raises:
        ValueError: unknown ``weighting``; a timestep outside ``[0, T)``.
    """
    if weighting not in OMEGA_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {OMEGA_WEIGHTINGS}, got {weighting!r}")
    per_item = torch.empty(0, dtype=torch.float32, device=alphas_cumprod.device)  # ᾱ_t shaped (B,)
    a = abar_at(alphas_cumprod, t, per_item)
    if weighting == "constant":
        return torch.full_like(a, 0.5)
    w = sds_weight(alphas_cumprod, t, weighting, like=per_item)
    return w * a.sqrt() / (2.0 * (1.0 - a).sqrt())


def ddim_stride(ratio: float, num_train_timesteps: int) -> int:
    """Timestep stride of the multi-step DDIM target: ``round(ratio * T)``.

    Interpretation of the paper's ``r = 0.25`` (A.1, "DDIM with r = 0.25, η = 1"): r is the DDIM step
    size as a fraction of the training schedule, so each DDIM step jumps ``0.25 T = 250`` timesteps
    (HiFA's reference code: 4 DDIM inference steps over T = 1000, stepping ``t, t-250, t-500, ...``
    down past 0).  A denoising chain from ``t`` therefore costs ``floor(t / stride) + 1`` UNet
    evaluations (each a CFG batch).

    Raises:
        ValueError: ``ratio`` not in (0, 1] or the stride does not divide T (diffusers' DDIM step
            uses ``T // num_inference_steps`` as its stride).
    """
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"ddim_step_ratio must be in (0, 1], got {ratio}")
    stride = int(round(ratio * num_train_timesteps))
    if stride < 1 or num_train_timesteps % stride != 0:
        raise ValueError(
            f"ddim_step_ratio * num_train_timesteps = {ratio} * {num_train_timesteps} must be an integer "
            f"stride dividing num_train_timesteps (e.g. 0.25 -> 250)"
        )
    return stride


def ddim_schedule(t: int, stride: int) -> list:
    """Timesteps visited by the multi-step target from ``t``: ``[t, t - stride, ...]`` (all ≥ 0)."""
    return list(range(int(t), -1, -int(stride)))


def ddim_denoise(
    noise_pred_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    latents_noisy: torch.Tensor,
    t: torch.Tensor,
    scheduler,
    ratio: float = 0.25,
    eta: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, int]:
    """Multi-step DDIM denoised target ẑ (HiFA A.1/A.2: "iterative denoising of ẑ_t until t = 0").

    Runs diffusers' ``DDIMScheduler.step`` from ``t`` with stride :func:`ddim_stride` (``ratio``) and
    noise weight ``eta`` until the previous timestep drops below 0 (the last step lands on
    ``scheduler.final_alpha_cumprod``), and returns the final sample.

    Args:
        noise_pred_fn: ``noise_pred_fn(z, t_batch, idx) -> ε̂`` (already classifier-free-guided), one UNet batch
            call; ``idx`` (long) are the batch items in ``z`` (to select their conditioning).
        latents_noisy: ``(B, C, h, w)`` z_t, the noisy latents at ``t``.
        t: ``(B,)`` timesteps; items with equal t are denoised together (one call per step).
        scheduler: a ``diffusers.DDIMScheduler`` used only for this (``set_timesteps`` is called on it).
        ratio: DDIM stride as a fraction of T (paper r = 0.25).
        eta: DDIM η (paper η = 1); the η-noise is drawn with ``generator`` as ``variance_noise``.

    Returns:
        ``(ẑ, n_calls)`` with ``n_calls`` the number of ``noise_pred_fn`` calls.

    Raises:
        ValueError: bad ``ratio`` (see :func:`ddim_stride`) or ``eta < 0``.
    """
    if eta < 0:
        raise ValueError(f"ddim_eta must be >= 0, got {eta}")
    T = int(scheduler.config.num_train_timesteps)
    stride = ddim_stride(ratio, T)
    scheduler.set_timesteps(T // stride)
    out = torch.empty_like(latents_noisy)
    n_calls = 0
    # the number of DDIM steps depends on each t: the grouping runs on a host copy of t (pass t on the CPU, as
    # hifa-guidance does, and nothing here waits for the device; a device t costs one copy to the host)
    t_host = t.long() if t.device.type == "cpu" else t.long().cpu()
    for t0 in _host_values(t_host):
        with host_only():
            idx = to_device((t_host == t0).nonzero(as_tuple=True)[0], latents_noisy.device)
        z = latents_noisy[idx]
        for tau in ddim_schedule(t0, stride):
            tb = torch.full((z.shape[0],), tau, dtype=torch.long, device=z.device)
            noise_pred = noise_pred_fn(z, tb, idx)
            n_calls += 1
            noise = None
            if eta > 0:
                noise = torch.randn(z.shape, generator=generator, device=z.device if generator is None else generator.device, dtype=z.dtype).to(z.device)
            z = scheduler.step(noise_pred, tau, z, eta=eta, variance_noise=noise).prev_sample
        out[idx] = z
    return out, n_calls


def _host_values(t_host: torch.Tensor) -> list:
    with host_only():
        return torch.unique(t_host).tolist()


def sds_plus_loss(
    latents: torch.Tensor,
    latents_target: torch.Tensor,
    omega: torch.Tensor,
    image: Optional[torch.Tensor] = None,
    image_target: Optional[torch.Tensor] = None,
    lambda_rgb: float = 0.1,
) -> Dict[str, torch.Tensor]:
    """SDS+ loss, Eq. 4: ``E[ω(t)(‖z - ẑ‖² + λ_rgb ‖x - x̂‖²)]`` with ẑ, x̂ = D(ẑ) stop-gradient.

    The squared norms are summed over all elements of an item; the expectation is the batch mean.

    Args:
        latents: ``(B, C, h, w)`` z = E(x) (with grad).  latents_target: ẑ (detached here).
        omega: ``(B,)`` ω(t) (:func:`omega_weight`).
        image, image_target: ``(B, 3, H, W)`` rendered x in [0, 1] and decoded x̂; optional.
        lambda_rgb: λ_rgb (paper 0.1).

    Returns:
        ``{"loss_latent": mean ω‖z-ẑ‖², "loss_image": mean ω‖x-x̂‖² (0 without images),
        "loss": loss_latent + λ_rgb loss_image}``.
    """
    B = latents.shape[0]
    om = omega.reshape(B).to(latents)
    lat = (om * ((latents - latents_target.detach()) ** 2).reshape(B, -1).sum(-1)).mean()
    if image is not None and image_target is not None:
        img = (om.to(image) * ((image - image_target.detach()) ** 2).reshape(B, -1).sum(-1)).mean()
    else:
        img = torch.zeros((), dtype=latents.dtype, device=latents.device)
    return {"loss_latent": lat, "loss_image": img, "loss": lat + lambda_rgb * img}


def sds_plus_grad(latents: torch.Tensor, latents_target: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """Per-item gradient of Eq. 4's latent term, ``∇_z ω(t)‖z - ẑ‖² = 2ω(t)(z - ẑ)`` (ẑ stop-gradient).

    With :func:`omega_weight` this is ``w(t) α_t/σ_t (z - ẑ)`` (Eq. 2), DreamFusion's SDS gradient for the
    one-step target.  ``B`` times the gradient of :func:`sds_plus_loss`'s ``loss_latent`` (a batch mean); what
    ``hifa-guidance`` hands to the guidance base, whose reparameterisation divides by ``B`` again.

    Args:
        latents: ``(B, C, h, w)`` z (detached here).  latents_target: ẑ (detached here).
        omega: ``(B,)`` ω(t).

    Returns:
        ``(B, C, h, w)`` gradient, in the latents' dtype.
    """
    om = omega.to(latents).reshape(-1, *([1] * (latents.dim() - 1)))
    return 2.0 * om * (latents.detach() - latents_target.detach())


# ----------------------------------------------------------------------------------------------
# Timestep annealing (Eq. 5)
# ----------------------------------------------------------------------------------------------

#: Eq. 5 ("sqrt") and the ablated alternatives of Fig. 7
ANNEALING_SCHEDULES = ("sqrt", "linear", "cosine", "random")


def annealing_fraction(
    step: int, total_steps: int, schedule: str = "sqrt", generator: Optional[torch.Generator] = None
) -> float:
    """Progress p ∈ [0, 1] of the timestep schedule at ``step`` (``t = t_max - (t_max - t_min) p``).

    * ``"sqrt"``: ``p = sqrt(step / total)`` (Eq. 5),
    * ``"linear"``: ``p = step / total``,
    * ``"cosine"``: ``p = (1 - cos(π step / total)) / 2``,
    * ``"random"``: ``p ~ U[0, 1]`` (DreamFusion's random timesteps).

    ``step`` is clamped to ``[0, total_steps]``.

    Raises:
        ValueError: unknown schedule or ``total_steps <= 0``.
    """
    if schedule not in ANNEALING_SCHEDULES:
        raise ValueError(f"timestep annealing schedule must be one of {ANNEALING_SCHEDULES}, got {schedule!r}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    s = min(max(float(step), 0.0), float(total_steps)) / float(total_steps)
    if schedule == "sqrt":
        return math.sqrt(s)
    if schedule == "linear":
        return s
    if schedule == "cosine":
        return (1.0 - math.cos(math.pi * s)) / 2.0
    return float(torch.rand((), generator=generator).item())


def annealed_timestep(
    step: int,
    total_steps: int,
    t_min: int,
    t_max: int,
    schedule: str = "sqrt",
    generator: Optional[torch.Generator] = None,
) -> int:
    """Timestep of Eq. 5: ``t = t_max - (t_max - t_min) p(step)``, rounded to the nearest integer.

    One t per optimisation step (Alg. 1 line 2).  ``p`` from :func:`annealing_fraction`.

    Raises:
        ValueError: ``not 0 <= t_min <= t_max`` or a bad schedule / total.
    """
    if not (0 <= t_min <= t_max):
        raise ValueError(f"timestep range must satisfy 0 <= t_min <= t_max, got t_min={t_min}, t_max={t_max}")
    p = annealing_fraction(step, total_steps, schedule, generator)
    return int(round(t_max - (t_max - t_min) * p))


# ----------------------------------------------------------------------------------------------
# z-variance (Eq. 6-8)
# ----------------------------------------------------------------------------------------------

ZVAR_REDUCTIONS = ("mean", "masked_mean", "sum")


def ray_depth_statistics(
    weights: torch.Tensor, z: torch.Tensor, eps: float = 1e-5
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-ray opacity Σν, depth mean μ (Eq. 6) and z-variance σ² (Eq. 7).

    Args:
        weights: ``(..., N)`` rendering weights ν_i ≥ 0.  z: ``(..., N)`` sample depths z_i.
        eps: lower clamp of Σν in the normalisation ν_i / Σν.

    Returns:
        ``(opacity, mu, var)`` each ``(...)``.
    """
    opacity = weights.sum(-1)
    p = weights / opacity.clamp(min=eps).unsqueeze(-1)
    mu = (p * z).sum(-1)
    var = (p * (z - mu.unsqueeze(-1)) ** 2).sum(-1)
    return opacity, mu, var


def z_variance_loss_from_maps(
    z_variance: torch.Tensor, opacity: torch.Tensor, threshold: float = 0.5, reduction: str = "mean"
) -> torch.Tensor:
    """Eq. 8 from per-ray σ² and opacity (any matching shapes, e.g. ``(B, H, W, 1)``).

    ``δ_r = 1[Σν > threshold]`` (the mask is not differentiated).  Reductions:

    * ``"mean"``: ``E_r[δ_r σ²_r]`` over all rays -- Eq. 8 as written (default),
    * ``"masked_mean"``: mean of σ² over the rays with δ_r = 1 (threestudio's ``dreamfusion-system``;
      0 when no ray passes),
    * ``"sum"``: ``Σ_r δ_r σ²_r`` (HiFA's reference code).

    Raises:
        ValueError: unknown reduction.
    """
    if reduction not in ZVAR_REDUCTIONS:
        raise ValueError(f"z-variance reduction must be one of {ZVAR_REDUCTIONS}, got {reduction!r}")
    mask = (opacity.detach() > threshold).to(z_variance.dtype)
    masked = z_variance * mask
    if reduction == "mean":
        return masked.mean()
    if reduction == "sum":
        return masked.sum()
    return masked.sum() / mask.sum().clamp(min=1.0)


def z_variance_loss(
    weights: torch.Tensor, z: torch.Tensor, threshold: float = 0.5, reduction: str = "mean"
) -> torch.Tensor:
    """L_zvar of Eq. 8 from per-ray weights ``(R, N)`` and depths ``(R, N)``."""
    opacity, _, var = ray_depth_statistics(weights, z)
    return z_variance_loss_from_maps(var, opacity, threshold, reduction)


# ----------------------------------------------------------------------------------------------
# Kernel smoothing and importance resampling (Sec. 4.2)
# ----------------------------------------------------------------------------------------------

#: named kernels: the paper's boxcar K = [1, 1, 1] and the reference code's trapezoidal option
KERNELS = {"boxcar": (1.0, 1.0, 1.0), "trapezoidal": (0.125, 0.75, 0.125)}
KS_PADDINGS = ("zero", "replicate")


def resolve_kernel(kernel: Union[None, str, Sequence[float]]) -> Optional[Tuple[float, ...]]:
    """Kernel from a name (``"boxcar"``, ``"trapezoidal"``, ``"none"``), a list of weights, or None.

    Raises:
        ValueError: unknown name; a list that is empty, of even length, has a negative weight or a
            non-positive sum.
    """
    if kernel is None:
        return None
    if isinstance(kernel, str):
        if kernel.lower() in ("none", "naive", ""):
            return None
        if kernel not in KERNELS:
            raise ValueError(f"kernel_smoothing must be one of {list(KERNELS) + ['none']} or a list, got {kernel!r}")
        return KERNELS[kernel]
    k = tuple(float(v) for v in kernel)
    if len(k) == 0 or len(k) % 2 == 0:
        raise ValueError(f"kernel_smoothing kernel must have odd length, got {list(k)}")
    if min(k) < 0 or sum(k) <= 0:
        raise ValueError(f"kernel_smoothing kernel must be non-negative with a positive sum, got {list(k)}")
    return k


def kernel_smooth(
    weights: torch.Tensor, kernel: Union[str, Sequence[float]] = "boxcar", padding: str = "zero"
) -> torch.Tensor:
    """Kernel smoothing of the coarse weights along each ray (HiFA Sec. 4.2).

    ``v_i ← Σ_j K_j v_{i+j-⌊|K|/2⌋} / Σ_j K_j`` (j = 0..|K|-1: a window centred on i; the paper prints
    j = 1..N, which would shift it by one sample -- the text's "moving average of neighboring PDF values"
    and the reference code's symmetric ``torch.roll(±1)`` are centred).  Samples outside the ray are
    **not** wrapped around (HiFA's reference code uses ``torch.roll``, which lets the first and last
    samples of a ray leak into each other): ``padding="zero"`` treats them as 0 (the formula with
    no density outside the sampled interval), ``"replicate"`` repeats the end weights.

    Args:
        weights: ``(..., N)``.
        kernel: name or odd-length list (:func:`resolve_kernel`); ``"none"`` returns ``weights``.

    Returns:
        ``(..., N)`` smoothed weights.

    Raises:
        ValueError: bad kernel or padding.
    """
    if padding not in KS_PADDINGS:
        raise ValueError(f"kernel_smoothing padding must be one of {KS_PADDINGS}, got {padding!r}")
    k = resolve_kernel(kernel)
    if k is None:
        return weights
    shape = weights.shape
    n = shape[-1]
    x = weights.reshape(-1, 1, n)
    half = len(k) // 2
    if half > 0:
        if padding == "zero":
            x = F.pad(x, (half, half))
        else:
            x = F.pad(x, (half, half), mode="replicate")
    kt = torch.tensor(k, dtype=weights.dtype, device=weights.device)
    kt = (kt / kt.sum()).view(1, 1, -1)
    return F.conv1d(x, kt).reshape(shape)


def sample_pdf(
    bins: torch.Tensor,
    weights: torch.Tensor,
    n_samples: int,
    deterministic: bool = False,
    generator: Optional[torch.Generator] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Inverse-CDF importance sampling of a piecewise-constant PDF along each ray (NeRF).

    Args:
        bins: ``(R, M + 1)`` increasing bin edges.  weights: ``(R, M)`` bin weights (≥ 0); ``eps`` is
            added so that empty rays sample uniformly.
        n_samples: samples per ray.  deterministic: use ``u = (k + 0.5) / n`` instead of ``U[0, 1)``.

    Returns:
        ``(R, n_samples)`` samples in ``[bins[:, 0], bins[:, -1]]``, sorted, without gradient.
    """
    bins = bins.detach()
    w = weights.detach() + eps
    pdf = w / w.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[..., :1]), torch.cumsum(pdf, -1)], -1)
    cdf[..., -1] = 1.0
    R = cdf.shape[0]
    if deterministic:
        u = torch.linspace(0.5 / n_samples, 1.0 - 0.5 / n_samples, n_samples, device=cdf.device, dtype=cdf.dtype)
        u = u.expand(R, n_samples).contiguous()
    else:
        u = torch.rand((R, n_samples), generator=generator, device=generator.device if generator is not None else cdf.device, dtype=cdf.dtype).to(cdf.device)
    idx = torch.searchsorted(cdf, u, right=True)
    below = (idx - 1).clamp(min=0, max=cdf.shape[-1] - 1)
    above = idx.clamp(max=cdf.shape[-1] - 1)
    c0, c1 = cdf.gather(-1, below), cdf.gather(-1, above)
    b0, b1 = bins.gather(-1, below), bins.gather(-1, above)
    denom = c1 - c0
    denom = torch.where(denom < 1e-12, torch.ones_like(denom), denom)
    frac = ((u - c0) / denom).clamp(0.0, 1.0)
    samples = b0 + frac * (b1 - b0)
    return torch.sort(samples, -1).values


# ----------------------------------------------------------------------------------------------
# Disparity regularisation (A.1: pre-trained dense prediction model)
# ----------------------------------------------------------------------------------------------

DISPARITY_LOSSES = ("fit", "pearson")
#: per-image reduction of the squared fit residual: "mean" over the masked pixels, "sum" (a squared norm
#: like Eq. 4's terms) or "reference" (HiFA's reference code: the mean times the fixed factor
#: :data:`REFERENCE_DISPARITY_SCALE`)
DISPARITY_REDUCTIONS = ("mean", "sum", "reference")
DISPARITY_SCHEDULES = ("constant", "anneal", "quadratic")
#: HiFA's reference code's fit-loss factor ``256² · w / 2`` with its constant SDS weight ``w = 0.05``
#: (``lambda_depthreg * mean(error²) / 2 * w * (256 * 256)``); its SDS+ terms carry the same ``w / 2``,
#: which the pack's configs put into ``lambda_sds`` = 0.05 with ``weighting_strategy: constant`` (ω = 1/2)
REFERENCE_DISPARITY_SCALE = 256.0 * 256.0 * 0.05 / 2.0

#: ``PIL.Image.Resampling`` codes (the ``resample`` of a ``DPTImageProcessor`` config) -> torch modes;
#: PIL resamples with a support widened by the downscale factor, i.e. antialiased (``antialias=True``)
PIL_RESAMPLE_TO_TORCH = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


def dpt_resize_output_size(
    in_size: Tuple[int, int], size: Tuple[int, int], keep_aspect_ratio: bool = False, ensure_multiple_of: int = 1
) -> Tuple[int, int]:
    """Output ``(height, width)`` of DPT's resize (``DPTImageProcessor``'s ``get_resize_output_image_size``):
    without ``keep_aspect_ratio`` the target ``size``; with it the scale closest to 1 of the two is used for
    both sides; each side rounded to a multiple of ``ensure_multiple_of``."""
    (in_h, in_w), (out_h, out_w) = in_size, size
    m = max(int(ensure_multiple_of), 1)

    def constrain(v: float) -> int:
        x = round(v / m) * m
        return int(max(x, m))

    sh, sw = out_h / in_h, out_w / in_w
    if keep_aspect_ratio:
        if abs(1 - sw) < abs(1 - sh):
            sh = sw
        else:
            sw = sh
    return constrain(sh * in_h), constrain(sw * in_w)


def dpt_preprocess(
    images: torch.Tensor,
    size: Tuple[int, int],
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    resample: int = 2,
    antialias: bool = True,
    keep_aspect_ratio: bool = False,
    ensure_multiple_of: int = 1,
    do_normalize: bool = True,
) -> torch.Tensor:
    """DPT input from rendered images ``(B, 3, H, W)`` in [0, 1], with ``DPTImageProcessor``'s semantics
    (resize to ``size`` with the config's ``resample``, ``keep_aspect_ratio``, ``ensure_multiple_of``; rescale;
    normalise with ``image_mean`` / ``image_std``) but in torch, on the images' device, without the uint8
    round trip.  ``resample`` is a PIL code (:data:`PIL_RESAMPLE_TO_TORCH`: 0 nearest, 2 bilinear -- the DPT
    checkpoints' configs --, 3 bicubic); PIL's resize is antialiased when it downscales, so is this one
    (``antialias=True``); PIL's bicubic output is clipped to the pixel range, so is this one.
    Against ``DPTImageProcessor`` on a uint8 image (the test ``test_dpt_preprocess_matches_dpt_image_processor``):
    max difference 2/255 ≈ 0.0078 (normalised units, std 0.5) with bilinear, i.e. PIL's uint8 rounding of its
    output; about 0.01 (≤ 0.02) with bicubic (PIL rounds between its two passes).

    Raises:
        ValueError: a ``resample`` code torch has no counterpart for (1 Lanczos, 4 box, 5 Hamming).
    """
    if int(resample) not in PIL_RESAMPLE_TO_TORCH:
        raise ValueError(
            f"DPT resample must be one of the PIL codes {sorted(PIL_RESAMPLE_TO_TORCH)} (nearest, bilinear, bicubic), got {resample!r}"
        )
    mode = PIL_RESAMPLE_TO_TORCH[int(resample)]
    out_size = dpt_resize_output_size(tuple(images.shape[-2:]), tuple(size), keep_aspect_ratio, ensure_multiple_of)
    if mode == "nearest-exact":
        x = F.interpolate(images, size=out_size, mode=mode)
    else:
        x = F.interpolate(images, size=out_size, mode=mode, align_corners=False, antialias=antialias)
        if mode == "bicubic":
            x = x.clamp(0.0, 1.0)
    if not do_normalize:
        return x
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def dpt_processor_settings(processor, image_size: Optional[int] = None) -> Dict[str, object]:
    """The :func:`dpt_preprocess` keyword arguments of a ``DPTImageProcessor`` (as loaded by
    ``DPTImageProcessor.from_pretrained`` from a checkpoint's ``preprocessor_config.json``): ``size``,
    ``resample``, ``keep_aspect_ratio``, ``ensure_multiple_of``, ``image_mean``/``image_std``,
    ``do_normalize``.  ``image_size`` overrides the size (square).

    Raises:
        ValueError: the processor resizes with a mode torch lacks, or does not resize / rescale by 1/255
            (the renders are already in [0, 1]; a processor without those steps is not DPT's).
    """
    size = getattr(processor, "size", None)
    if size is not None and not isinstance(size, (dict, int, float)):  # transformers >= 5: SizeDict
        size = {k: getattr(size, k) for k in ("height", "width", "shortest_edge") if getattr(size, k, None) is not None}
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            size = (int(size["height"]), int(size["width"]))
        elif "shortest_edge" in size:
            size = (int(size["shortest_edge"]),) * 2
        else:
            raise ValueError(f"DPT processor size {size!r} has no height/width")
    elif isinstance(size, (int, float)):
        size = (int(size), int(size))
    if image_size is not None:
        size = (int(image_size), int(image_size))
    if not getattr(processor, "do_resize", True) and image_size is None:
        raise ValueError("the DPT processor does not resize (do_resize: false); set system.disparity_image_size")
    rf = getattr(processor, "rescale_factor", 1 / 255)
    if getattr(processor, "do_rescale", True) and abs(float(rf) - 1 / 255) > 1e-9:
        raise ValueError(f"the DPT processor rescales by {rf}, not 1/255: renders in [0, 1] cannot be fed as it expects")
    resample = getattr(processor, "resample", 2)
    resample = int(getattr(resample, "value", resample))
    if resample not in PIL_RESAMPLE_TO_TORCH:
        raise ValueError(f"DPT processor resample {resample} has no torch counterpart; allowed {sorted(PIL_RESAMPLE_TO_TORCH)}")
    return dict(
        size=size,
        mean=tuple(float(v) for v in getattr(processor, "image_mean", (0.5, 0.5, 0.5))),
        std=tuple(float(v) for v in getattr(processor, "image_std", (0.5, 0.5, 0.5))),
        resample=resample,
        keep_aspect_ratio=bool(getattr(processor, "keep_aspect_ratio", False)),
        ensure_multiple_of=int(getattr(processor, "ensure_multiple_of", 1) or 1),
        do_normalize=bool(getattr(processor, "do_normalize", True)),
    )


def _normalise(v: torch.Tensor) -> torch.Tensor:
    return (v - v.mean()) / v.std().clamp(min=1e-8)


def disparity_fit_loss(
    rendered_disparity: torch.Tensor, predicted_disparity: torch.Tensor, mask: torch.Tensor, reduction: str = "mean"
) -> Dict[str, torch.Tensor]:
    """Least-squares disparity regulariser, per image, on pixels where ``mask`` (opacity > 0.5).

    The prediction (relative disparity, arbitrary affine scale) is normalised to zero mean and unit
    standard deviation over the mask, ``d̃``; the rendered disparity is centred, ``p = d - mean(d)``,
    and fitted with the least-squares scale ``s = Σ p d̃ / Σ p²`` (not detached, as in HiFA's reference
    code).  Loss per image: ``mean((s p - d̃)²)`` over the masked pixels (``reduction="mean"``) or
    ``Σ (s p - d̃)²`` (``"sum"``) or the reference code's ``mean · 256² · 0.05 / 2`` (``"reference"``,
    :data:`REFERENCE_DISPARITY_SCALE`); the result is the mean over images with at least 2 masked pixels.

    Sign blindness: with ``d̃`` normalised by its (unbiased) std, the minimised residual is
    ``mean = (1 - 1/n)(1 - ρ²)``, ρ the Pearson correlation of ``d`` and the prediction on the mask, so a
    relief and its inverse (``-d``) give the same loss (``s`` turns negative); the Pearson variant
    ``1 - ρ`` tells them apart.

    The paper gives λ_d = 0.1 but not the loss's normalisation.  ``"mean"`` makes the term independent of
    the render size.  HiFA's reference code multiplies the mean by ``256² · w / 2``, ``w`` = 0.05 being the
    same factor ``w / 2`` its SDS+ terms ``Σ(z − ẑ)² · w / 2`` carry, so relative to SDS+ its disparity term
    is scaled like a per-image squared norm (Σ ≈ 256² · mean at 512² with ~¼ of the pixels masked).
    ``"reference"`` reproduces it exactly with ``configs/hifa.yaml``'s SDS+ weighting (constant ω = 1/2,
    ``lambda_sds`` = w = 0.05; measured in ``tests/test_hifa_faithful.py``); ``"sum"`` approximately; with
    ``"mean"`` and ω = w(t) α_t/(2σ_t) the term acts ~10⁴ times weaker relative to SDS+.

    Args:
        rendered_disparity, predicted_disparity: ``(B, H, W)``; mask: ``(B, H, W)`` bool.
        reduction: :data:`DISPARITY_REDUCTIONS`.

    Returns:
        ``{"loss": scalar, "scale": (B,) s (NaN for skipped images), "shift": (B,)}`` with
        ``s d + shift ≈ d̃`` on the mask.

    Raises:
        ValueError: unknown ``reduction``.
    """
    if reduction not in DISPARITY_REDUCTIONS:
        raise ValueError(f"disparity reduction must be one of {DISPARITY_REDUCTIONS}, got {reduction!r}")
    B = rendered_disparity.shape[0]
    losses, scales, shifts = [], [], []
    for b in range(B):
        m = mask[b]
        if int(m.sum()) < 2:
            scales.append(rendered_disparity.new_tensor(float("nan")))
            shifts.append(rendered_disparity.new_tensor(float("nan")))
            continue
        target = _normalise(predicted_disparity[b][m].detach())
        d = rendered_disparity[b][m]
        p = d - d.mean()
        s = (p * target).sum() / (p ** 2).sum().clamp(min=1e-12)
        sq = (s * p - target) ** 2
        if reduction == "sum":
            losses.append(sq.sum())
        else:
            losses.append(sq.mean() * (REFERENCE_DISPARITY_SCALE if reduction == "reference" else 1.0))
        scales.append(s.detach())
        shifts.append((-s * d.mean()).detach())
    loss = torch.stack(losses).mean() if losses else rendered_disparity.sum() * 0.0
    return {"loss": loss, "scale": torch.stack(scales), "shift": torch.stack(shifts)}


def disparity_pearson_loss(
    rendered_disparity: torch.Tensor, predicted_disparity: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Pearson variant: mean over images of ``1 - corr(d_rendered, d_predicted)`` on the mask.

    Scale- and shift-invariant in both arguments.  (HiFA's reference code correlates rendered *depth*
    with the reciprocal of the prediction; here both sides are disparities, consistent with the fit.)
    """
    losses = []
    for b in range(rendered_disparity.shape[0]):
        m = mask[b]
        if int(m.sum()) < 2:
            continue
        x = rendered_disparity[b][m]
        y = predicted_disparity[b][m].detach()
        xc, yc = x - x.mean(), y - y.mean()
        corr = (xc * yc).sum() / (xc.norm() * yc.norm()).clamp(min=1e-12)
        losses.append(1.0 - corr)
    return torch.stack(losses).mean() if losses else rendered_disparity.sum() * 0.0


def disparity_lambda(lambda_d: float, progress: float, schedule: str = "anneal") -> float:
    """λ_d at annealing progress ``p`` (:func:`annealing_fraction`): ``"constant"`` λ_d,
    ``"anneal"`` λ_d (1 - p) (reference default), ``"quadratic"`` 4 λ_d p (1 - p).

    Raises:
        ValueError: unknown schedule.
    """
    if schedule not in DISPARITY_SCHEDULES:
        raise ValueError(f"disparity schedule must be one of {DISPARITY_SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return float(lambda_d)
    if schedule == "anneal":
        return float(lambda_d) * (1.0 - progress)
    return float(lambda_d) * 4.0 * progress * (1.0 - progress)
