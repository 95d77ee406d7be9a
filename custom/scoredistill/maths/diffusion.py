"""Diffusion maths shared by the pack's guidances (plain functions over tensors, no threestudio).

Notation (diffusers / threestudio, ../shared/METHODS.md): ``alphas_cumprod[t]`` = ᾱ_t, ``a_t = sqrt(ᾱ_t)``,
``s_t = sqrt(1 - ᾱ_t)``; latents are SD latents ``(B, 4, h, w)``.  Code names (threestudio's) for the papers'
symbols: ``latents`` x_0 / z, ``latents_noisy`` x_t / z_t, ``noise`` ε, ``noise_pred_text`` ε_φ(x_t, t, y),
``noise_pred_uncond`` ε_φ(x_t, t, ∅), ``noise_pred_neg`` ε_φ(x_t, t, y_neg), ``noise_pred`` the guided ε̃_φ (or
any single prediction ε̂); ``eps_fn`` is the UNet ε_φ itself.

Timesteps ``t`` are integers in ``[0, T)`` (``T = alphas_cumprod.shape[0]``, 1000 for SD), given as a python
int, a 0-d tensor or a ``(B,)`` tensor (one per sample).  Every function broadcasts ``ᾱ_t`` over the
trailing dimensions of the latents.  Float arithmetic is done in the latents' dtype.

Contents:

* :func:`grad_to_loss` -- threestudio's reparameterisation: a loss whose gradient w.r.t. latents is ``grad``.
* :func:`cfg_combine` -- classifier-free guidance ``ε(∅) + s (ε(y) − ε(∅))``.
* :func:`perpendicular_component`, :func:`perp_neg_combine` -- Perp-Neg (Armandpour et al. 2023;
  GE3D supplementary Eq. 17).
* :func:`add_noise` (DDPM forward, GE3D Eq. 1), :func:`tweedie_x0` (one-step x̂_0),
  :func:`ddim_step` (deterministic DDIM move between any two timesteps, GE3D Eq. 2 / Eq. 6),
  :func:`ddim_delta` (δ of GE3D Eq. 6 / Alg. 1 line 9).
* :func:`abar_at` -- ᾱ_t gathered for integer timesteps and shaped to broadcast against latents.
* :func:`sds_weight` -- w(t) of SDS (``sds`` = 1-ᾱ_t, ``uniform`` = 1, ``fantasia3d`` = sqrt(ᾱ_t)(1-ᾱ_t);
  on request ``luciddreamer`` = sqrt((1-ᾱ_t)/ᾱ_t)).
* timestep helpers: :func:`percent_to_step`, :func:`step_range`, :func:`sample_timesteps`,
  :func:`linear_anneal` (HiFA's Eq. 5 schedule is :func:`scoredistill.maths.hifa.annealed_timestep`).
* :func:`predict_cond_uncond` -- ``(ε(x_t; y), ε(x_t; ∅))`` in one batched (2B) noise-prediction call.
* :func:`sds_grad` -- plain SDS (DreamFusion) gradient with CFG, used as the baseline in benchmarks/tests.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..sync import to_device

Timestep = Union[int, torch.Tensor]

#: SDS weighting strategies accepted by :func:`sds_weight` by default
WEIGHTING_STRATEGIES = ("sds", "uniform", "fantasia3d")
#: every weighting :func:`sds_weight` can compute (a guidance may allow ``"luciddreamer"`` too, e.g. VDM)
ALL_WEIGHTING_STRATEGIES = WEIGHTING_STRATEGIES + ("luciddreamer",)


# ----------------------------------------------------------------------------- helpers
def abar_at(alphas_cumprod: torch.Tensor, t: Timestep, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t gathered and shaped to broadcast against ``like`` ``(B, ...)``: ``(B or 1, 1, ..., 1)``.

    Raises:
        ValueError: a timestep outside ``[0, T)``.
    """
    T = alphas_cumprod.shape[0]
    if not torch.is_tensor(t):  # python numbers / numpy: a host tensor (checked on the host below, then copied)
        t = torch.as_tensor(t)
    if t.is_floating_point():
        t = t.round()
    t = t.long()
    if t.numel():
        # the same call on every device: CUDA checks on the device (no host sync; fails at the next sync),
        # the CPU checks now (a host read, no device involved)
        try:
            torch._assert_async(((t >= 0) & (t < T)).all(), f"timestep must be in [0, {T})")
        except RuntimeError:
            raise ValueError(f"timestep must be in [0, {T}), got {t.tolist()}") from None
    # a host timestep (python numbers, a host schedule) goes to the device from pinned memory, non-blocking
    # (a plain .to(cuda) of pageable memory is a synchronous copy: 2 per UNet call of GE3D on the H200)
    a = alphas_cumprod[to_device(t.reshape(-1), alphas_cumprod.device)].to(device=like.device, dtype=like.dtype)
    return a.reshape(-1, *([1] * (like.dim() - 1)))


# ----------------------------------------------------------------------------- loss
def grad_to_loss(latents: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """threestudio's reparameterisation trick: a scalar loss whose gradient w.r.t. the latents is ``grad / B``.

    ``loss = 0.5 * sum((latents - (latents - grad).detach())**2) / B`` so ``d loss / d latents = grad / B``:
    exactly ``grad`` for one view, and the per-view gradients averaged over the batch of ``B`` views
    (threestudio's ``stable-diffusion-guidance`` convention, kept so ``lambda_sds`` means the same thing).

    Args:
        latents: ``(B, ...)`` tensor in the autograd graph.
        grad: same shape as ``latents`` (detached here).
    Raises:
        ValueError: shapes differ.
    """
    if grad.shape != latents.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} != latents shape {tuple(latents.shape)}")
    target = (latents - grad).detach()
    return 0.5 * F.mse_loss(latents, target, reduction="sum") / latents.shape[0]


# ----------------------------------------------------------------------------- guidance combinations
def cfg_combine(noise_pred_text: torch.Tensor, noise_pred_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``ε̃ = ε(∅) + s·(ε(y) − ε(∅))`` (GE3D after Eq. 4; Ho & Salimans 2022).

    ``scale = 1`` gives the conditional prediction, ``0`` the unconditional one.  (threestudio's SDS uses
    ``ε(y) + s·(ε(y) − ε(∅))``, i.e. this with ``s + 1``.)
    """
    return noise_pred_uncond + scale * (noise_pred_text - noise_pred_uncond)


def perpendicular_component(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Component of ``x`` perpendicular to ``y``, per sample: ``x − <x,y>/<y,y> · y`` (shapes ``(B, ...)``)."""
    B = x.shape[0]
    xf, yf = x.reshape(B, -1), y.reshape(B, -1)
    coef = (xf * yf).sum(-1, keepdim=True) / (yf * yf).sum(-1, keepdim=True).clamp_min(eps)
    return (xf - coef * yf).reshape(x.shape)


def perp_neg_combine(
    noise_pred_text: torch.Tensor,
    noise_pred_uncond: torch.Tensor,
    noise_pred_neg: torch.Tensor,
    neg_weights: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Perp-Neg guidance (GE3D supplementary Eq. 17; Armandpour et al. 2023).

    ``ε̃ = ε(∅) + s·[ (ε(y_pos) − ε(∅)) + Σ_i w_i · perp(ε(y_neg_i) − ε(∅), ε(y_pos) − ε(∅)) ]``

    The weights follow threestudio's prompt processor (``get_text_embeddings_perp_neg``), which returns
    them already negative, so they are *added*.

    Args:
        noise_pred_text, noise_pred_uncond: ``(B, C, H, W)`` ε(y_pos), ε(∅).
        noise_pred_neg: ``(B*N, C, H, W)`` ε(y_neg_i), negatives interleaved per sample (sample b's i-th at ``b*N + i``),
            as threestudio orders them.
        neg_weights: ``(B, N)``.
    """
    B = noise_pred_text.shape[0]
    N = neg_weights.shape[-1]
    if noise_pred_neg.shape[0] != B * N:
        raise ValueError(f"noise_pred_neg must have B*N = {B * N} samples, got {noise_pred_neg.shape[0]}")
    e_pos = noise_pred_text - noise_pred_uncond
    acc = torch.zeros_like(e_pos)
    for i in range(N):
        e_neg = noise_pred_neg[i::N] - noise_pred_uncond
        acc = acc + neg_weights[:, i].to(e_pos).view(-1, *([1] * (e_pos.dim() - 1))) * perpendicular_component(e_neg, e_pos)
    return noise_pred_uncond + scale * (e_pos + acc)


# ----------------------------------------------------------------------------- forward process / DDIM
def add_noise(latents: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: Timestep) -> torch.Tensor:
    """``latents_noisy`` ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε`` of ``latents`` x_0 (GE3D Eq. 1; identical to
    ``DDPMScheduler.add_noise``)."""
    a = abar_at(alphas_cumprod, t, latents)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def tweedie_x0(latents_noisy: torch.Tensor, noise_pred: torch.Tensor, alphas_cumprod: torch.Tensor, t: Timestep) -> torch.Tensor:
    """One-step estimate ``x̂_0 = (x_t − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t)`` of ``latents_noisy`` x_t and ``noise_pred`` ε̂
    (Tweedie; GE3D Eq. 4)."""
    a = abar_at(alphas_cumprod, t, latents_noisy)
    return (latents_noisy - (1 - a).sqrt() * noise_pred) / a.sqrt()


def ddim_delta(alphas_cumprod: torch.Tensor, t_from: Timestep, t_to: Timestep, like: torch.Tensor) -> torch.Tensor:
    """``δ = sqrt((1−ᾱ_to)/ᾱ_to) − sqrt((1−ᾱ_from)/ᾱ_from)`` (GE3D Eq. 6, Alg. 1 line 9 with from=t_i, to=t_{i+1}),
    shaped to broadcast against ``like``."""
    a_f = abar_at(alphas_cumprod, t_from, like)
    a_t = abar_at(alphas_cumprod, t_to, like)
    return ((1 - a_t) / a_t).sqrt() - ((1 - a_f) / a_f).sqrt()


def ddim_step(
    latents_noisy: torch.Tensor, noise_pred: torch.Tensor, alphas_cumprod: torch.Tensor, t_from: Timestep, t_to: Timestep
) -> torch.Tensor:
    """Deterministic DDIM move (η = 0) from timestep ``t_from`` to ``t_to`` (either direction), GE3D Eq. 2:

    ``x_to = sqrt(ᾱ_to) · (x_from − sqrt(1−ᾱ_from) ε̂) / sqrt(ᾱ_from) + sqrt(1−ᾱ_to) ε̂``

    which equals the Eq. 6 form ``sqrt(ᾱ_to) · (x_from / sqrt(ᾱ_from) + δ ε̂)`` with δ from :func:`ddim_delta`.
    ``t_to > t_from`` is DDIM inversion (noising), ``t_to < t_from`` a DDIM sampling step.

    Args:
        latents_noisy: ``(B, ...)`` x_from, the latents at ``t_from``; noise_pred: same shape, ε̂ evaluated at
            ``(x_from, t_from)`` for sampling or at the inversion's current point for noising.
    """
    a_f = abar_at(alphas_cumprod, t_from, latents_noisy)
    a_t = abar_at(alphas_cumprod, t_to, latents_noisy)
    x0 = (latents_noisy - (1 - a_f).sqrt() * noise_pred) / a_f.sqrt()
    return a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise_pred


# ----------------------------------------------------------------------------- weighting
def sds_weight(
    alphas_cumprod: torch.Tensor,
    t: Timestep,
    strategy: str = "sds",
    like: Optional[torch.Tensor] = None,
    allowed: Sequence[str] = WEIGHTING_STRATEGIES,
) -> torch.Tensor:
    """SDS weighting w(t), shaped ``(B, 1, 1, 1)`` (or to broadcast against ``like``; default dtype: ᾱ's).

    ``"sds"``: ``1 − ᾱ_t`` (DreamFusion / threestudio default); ``"uniform"``: 1;
    ``"fantasia3d"``: ``sqrt(ᾱ_t)(1 − ᾱ_t)``; ``"luciddreamer"``: ``sqrt((1 − ᾱ_t)/ᾱ_t)`` (only if in ``allowed``,
    e.g. DreamMapping's :data:`scoredistill.maths.vdm.VDM_WEIGHTINGS`).

    Raises:
        ValueError: ``strategy`` not in ``allowed`` (a subset of :data:`ALL_WEIGHTING_STRATEGIES`).
    """
    if strategy not in allowed or strategy not in ALL_WEIGHTING_STRATEGIES:
        raise ValueError(f"weighting_strategy must be one of {tuple(allowed)}, got {strategy!r}")
    if like is None:
        like = torch.empty(1, 1, 1, 1, dtype=alphas_cumprod.dtype, device=alphas_cumprod.device)
    a = abar_at(alphas_cumprod, t, like)
    if strategy == "sds":
        return 1 - a
    if strategy == "uniform":
        return torch.ones_like(a)
    if strategy == "fantasia3d":
        return a.sqrt() * (1 - a)
    return ((1 - a) / a).sqrt()


# ----------------------------------------------------------------------------- timesteps
def percent_to_step(percent: float, num_train_timesteps: int = 1000) -> int:
    """threestudio's convention ``int(T * percent)`` (e.g. 0.02 → 20, 0.98 → 980 for T = 1000)."""
    return int(num_train_timesteps * percent)


def step_range(min_percent: float, max_percent: float, num_train_timesteps: int = 1000) -> Tuple[int, int]:
    """``(min_step, max_step)`` from percentages, clipped to ``[0, T-1]``.

    Raises:
        ValueError: percentages outside ``[0, 1]`` or ``min_percent > max_percent``.
    """
    if not (0.0 <= min_percent <= 1.0 and 0.0 <= max_percent <= 1.0):
        raise ValueError(f"min/max_step_percent must be in [0, 1], got {min_percent}, {max_percent}")
    if min_percent > max_percent:
        raise ValueError(f"min_step_percent ({min_percent}) must be <= max_step_percent ({max_percent})")
    lo = min(percent_to_step(min_percent, num_train_timesteps), num_train_timesteps - 1)
    hi = min(percent_to_step(max_percent, num_train_timesteps), num_train_timesteps - 1)
    return lo, hi


def sample_timesteps(
    batch_size: int,
    min_step: int,
    max_step: int,
    device=None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``(batch_size,)`` long tensor uniform on the integers ``[min_step, max_step]`` (both inclusive)."""
    return torch.randint(min_step, max_step + 1, (batch_size,), dtype=torch.long, device=device, generator=generator)


def linear_anneal(start: float, end: float, step: int, total_steps: int) -> float:
    """Linear interpolation ``start → end`` over ``[0, total_steps]``, clamped (``total_steps <= 0`` gives ``end``)."""
    if total_steps <= 0:
        return float(end)
    r = min(max(step / total_steps, 0.0), 1.0)
    return float(start + (end - start) * r)


# ----------------------------------------------------------------------------- SDS baseline
EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def predict_cond_uncond(
    eps_fn: EpsFn, latents_noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(noise_pred_text, noise_pred_uncond)`` = ``(ε(x_t, t, cond), ε(x_t, t, uncond))`` from ONE ``eps_fn`` call
    of batch ``2B`` (conditional half first).

    Args: latents_noisy ``(B, C, H, W)``; t ``(B,)``; cond, uncond ``(B, L, E)``.  Gradients flow if the caller
    enables them.
    """
    noise_pred_text, noise_pred_uncond = eps_fn(
        torch.cat([latents_noisy, latents_noisy]), torch.cat([t, t]), torch.cat([cond, uncond])
    ).chunk(2)
    return noise_pred_text, noise_pred_uncond


@torch.no_grad()
def sds_grad(
    eps_fn: EpsFn,
    latents: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    guidance_scale: float = 100.0,
    noise: Optional[torch.Tensor] = None,
    weighting_strategy: str = "sds",
) -> torch.Tensor:
    """DreamFusion SDS gradient ``w(t)·(ε̃_φ(x_t, t, y) − ε)`` with CFG (one batch-2B UNet call).

    Args:
        eps_fn: ``eps_fn(x (N,C,H,W), t (N,), emb (N,L,E)) -> ε̂ (N,C,H,W)``.
        latents: ``(B, C, H, W)``; t: ``(B,)``; cond, uncond: ``(B, L, E)``.
        guidance_scale: CFG scale s in :func:`cfg_combine`'s convention.
        noise: ε (default ``randn_like(latents)``).
    Returns:
        ``(B, C, H, W)`` gradient on the latents.
    """
    if noise is None:
        noise = torch.randn_like(latents)
    latents_noisy = add_noise(latents, noise, alphas_cumprod, t)
    noise_pred_text, noise_pred_uncond = predict_cond_uncond(eps_fn, latents_noisy, t, cond, uncond)
    return sds_weight(alphas_cumprod, t, weighting_strategy, like=latents) * (cfg_combine(noise_pred_text, noise_pred_uncond, guidance_scale) - noise)
