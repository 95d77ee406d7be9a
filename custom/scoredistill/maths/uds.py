"""UDS -- Unified Distillation Sampling (Miao et al., ICML 2025, "Rethinking Score Distilling Sampling
for 3D Edit and Generation"; ../shared/papers/uds-rethinking-sds.txt).  Plain functions over tensors,
no threestudio.

Notation (diffusers): ``alphas_cumprod[t]`` = ᾱ_t with integer ``t`` in ``[0, T)`` (the paper's
``t ~ U(1, 1000)`` is ``t ∈ [0, 999]`` here); latents ``(B, C, H, W)``; text embeddings ``(B, L, E)``.
``eps_fn(x (N,C,H,W), t (N,) long, emb (N,L,E)) -> ε̂ (N,C,H,W)`` is the (frozen) diffusion UNet; every
function below evaluates it in as few *batched* calls as the shapes allow and reports the number of calls.

Terms
-----
* classifier term (Eq. 5):      ``δ^cls_{x_t}(y) = ε_φ(x_t, t, y) − ε_φ(x_t, t, ∅)``
* x̂_0 from the UNCONDITIONAL prediction (Sec. 4.3), two estimators (Alg. 1 line 7 / 17):
    - ``"tweedie"`` (Eq. 10): ``x̂_0 = (x_t − sqrt(1−ᾱ_t) ε_φ(x_t,t,∅)) / sqrt(ᾱ_t)`` -- one UNet call
      (shared with the classifier term's ``ε_φ(x_t,t,∅)``, so no extra call);
    - ``"ddim"`` (Eq. 15): ``n = ddim_steps`` deterministic unconditional DDIM steps from ``t`` to 0 over
      the nodes ``τ_k = floor(t (n−k)/n)``, ``k = 0..n−1``, then the last node's Tweedie estimate (the
      DDIM step to ᾱ = 1, diffusers' ``set_alpha_to_one``).  ``n`` UNet calls, the first shared with the
      classifier term; ``ddim_steps = 1`` is exactly Tweedie.
* generation (Alg. 1 lines 13-19, Eq. 16-17, Eq. 19), ONE ε shared by both noisings:
    ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1−ᾱ_t) ε``,  ``x_{t−c} = sqrt(ᾱ_{t−c}) x_0 + sqrt(1−ᾱ_{t−c}) ε``
    ``grad = ω(t) · ( s·(x̂_0^t − x̂_0^{t−c}) + w·(δ^cls_{x_t}(y) − δ^cls_{x_t}(y_neg)) )``
  with ``s = +1`` for the printed sign (``recon_sign="printed"``, Eq. 16 / Alg. 1) and ``s = −1`` for the
  reading of Sec. 4.3 / ISM (``recon_sign="reversed"``: x̂_0^{t−c} − x̂_0^t); see :data:`DEFAULT_RECON_SIGN`
  for the default and the measurement behind it.  Eq. 16 has no negative term; Eq. 17 adds it
  (``δ^cls_{x_t^neg} = ε_φ(x_t,t,y_neg) − ε_φ(x_t,t,∅)`` at the same ``x_t``).  ``t − c`` is clamped at 0.
* editing (Alg. 1 lines 4-11, Eq. 14), shared ε and camera, source render ``x_0^src`` of a frozen model:
    ``grad = ω(t) · ( x̂_0^tgt − x̂_0^src + w·(δ^cls_{x_t^tgt}(y_tgt) − δ^cls_{x_t^src}(y_src)) )``
  applied to the target only (the source latents are detached).
* ω(t): :func:`scoredistill.maths.diffusion.sds_weight` (the paper leaves ω(t) unspecified; Eq. 19 applies
  it to both terms, which is what is done here).

UNet cost per step (B views, n = ddim_steps; tweedie ≡ n = 1), each row one batched call:
* generation: call 1 = ``[x_t|y, x_t|∅, (x_t|y_neg), x_{t−c}|∅]`` (3B or 4B samples); calls 2..n =
  the two DDIM chains ``[x_t-chain, x_{t−c}-chain]`` (2B each).  Total ``n`` calls.
* editing: call 1 = ``[x^tgt|y_tgt, x^tgt|∅, x^src|y_src, x^src|∅]`` (4B); calls 2..n = ``[tgt-chain,
  src-chain]`` (2B each).  Total ``n`` calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from .diffusion import WEIGHTING_STRATEGIES, EpsFn, add_noise, ddim_step, sds_weight, tweedie_x0

MODES = ("generation", "editing")
X0_ESTIMATORS = ("tweedie", "ddim")
RECON_SIGNS = ("printed", "reversed")

#: Default sign of the generation reconstruction term.  Decided by the exact-score benchmark
#: (tests/test_uds_sign_benchmark.py, docs/uds.md): see the module docstring of that test.
DEFAULT_RECON_SIGN = "reversed"
#: Default interval c (the paper gives none; LucidDreamer's ISM, the 3DGS framework UDS was run in, uses 80).
DEFAULT_INTERVAL = 80
#: Paper's CFG weight for both tasks (Sec. 4.1, Fig. 2: "ours is 7.5").
DEFAULT_GUIDANCE_SCALE = 7.5
#: Default number of DDIM steps of the Eq. 15 estimator (not given in the paper; our choice).
DEFAULT_DDIM_STEPS = 5


def validate_uds_options(
    mode: str = "generation",
    x0_estimator: str = "tweedie",
    ddim_steps: int = DEFAULT_DDIM_STEPS,
    interval: int = DEFAULT_INTERVAL,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    recon_sign: str = DEFAULT_RECON_SIGN,
    weighting_strategy: str = "sds",
    num_train_timesteps: int = 1000,
) -> None:
    """Check UDS settings; raises ``ValueError`` naming the setting and the allowed values.

    Raises:
        ValueError: ``mode`` not in :data:`MODES`; ``x0_estimator`` not in :data:`X0_ESTIMATORS`;
            ``ddim_steps`` not an integer in ``[1, num_train_timesteps]``; ``interval`` not an integer in
            ``[1, num_train_timesteps − 1]``; ``guidance_scale`` negative or not finite; ``recon_sign`` not
            in :data:`RECON_SIGNS`; ``weighting_strategy`` not in ``WEIGHTING_STRATEGIES``.
    """
    if mode not in MODES:
        raise ValueError(f"uds-guidance: mode must be one of {MODES}, got {mode!r}")
    if x0_estimator not in X0_ESTIMATORS:
        raise ValueError(f"uds-guidance: x0_estimator must be one of {X0_ESTIMATORS}, got {x0_estimator!r}")
    if isinstance(ddim_steps, bool) or not isinstance(ddim_steps, int) or not 1 <= ddim_steps <= num_train_timesteps:
        raise ValueError(f"uds-guidance: ddim_steps must be an integer in [1, {num_train_timesteps}], got {ddim_steps!r}")
    if isinstance(interval, bool) or not isinstance(interval, int) or not 1 <= interval <= num_train_timesteps - 1:
        raise ValueError(f"uds-guidance: interval must be an integer in [1, {num_train_timesteps - 1}], got {interval!r}")
    try:
        gs = float(guidance_scale)
    except (TypeError, ValueError):
        gs = float("nan")
    if not (gs >= 0.0 and gs != float("inf")):
        raise ValueError(f"uds-guidance: guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    if recon_sign not in RECON_SIGNS:
        raise ValueError(f"uds-guidance: recon_sign must be one of {RECON_SIGNS}, got {recon_sign!r}")
    if weighting_strategy not in WEIGHTING_STRATEGIES:
        raise ValueError(
            f"uds-guidance: weighting_strategy must be one of {WEIGHTING_STRATEGIES}, got {weighting_strategy!r}"
        )


def classifier_delta(noise_pred_text: torch.Tensor, noise_pred_uncond: torch.Tensor) -> torch.Tensor:
    """``δ^cls = ε_φ(x_t,t,y) − ε_φ(x_t,t,∅)`` (UDS Eq. 5)."""
    return noise_pred_text - noise_pred_uncond


def interval_timestep(t: torch.Tensor, interval: int) -> torch.Tensor:
    """``t − c`` clamped at 0 (``t``: ``(B,)`` long)."""
    return (t - int(interval)).clamp_min(0)


def ddim_node_timesteps(t: torch.Tensor, num_steps: int) -> torch.Tensor:
    """DDIM nodes of the Eq. 15 estimator: ``τ_k = floor(t·(n−k)/n)``, ``k = 0..n−1`` → ``(n, B)`` long.

    ``τ_0 = t``; the chain ends with the DDIM step from ``τ_{n−1}`` to ᾱ = 1 (x̂_0).
    """
    t = torch.as_tensor(t).long().reshape(-1)
    k = torch.arange(num_steps, device=t.device)
    return torch.div(t[None, :] * (num_steps - k[:, None]), num_steps, rounding_mode="floor")


def ddim_x0_chain(
    eps_fn: EpsFn,
    latents_noisy: torch.Tensor,
    t: torch.Tensor,
    uncond: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    num_steps: int,
    noise_pred_uncond_first: torch.Tensor,
) -> Tuple[torch.Tensor, int]:
    """x̂_0 by deterministic unconditional DDIM sampling (UDS Eq. 15), batched over the chains in ``latents_noisy``.

    Args:
        latents_noisy: ``(N, C, H, W)`` start points x_t (several chains concatenated, each with its own ``t``).
        t: ``(N,)`` long start timesteps.
        uncond: ``(N, L, E)`` unconditional embeddings.
        num_steps: ``n >= 1`` UNet evaluations per chain (nodes from :func:`ddim_node_timesteps`).
        noise_pred_uncond_first: ``ε_φ(x_t, t, ∅)`` ``(N, C, H, W)``, already computed (the first node's prediction).
    Returns:
        ``(x̂_0 (N, C, H, W), number of eps_fn calls made = n − 1)``.
    """
    nodes = ddim_node_timesteps(t, num_steps)
    x, noise_pred_uncond, calls = latents_noisy, noise_pred_uncond_first, 0
    for k in range(1, num_steps):
        x = ddim_step(x, noise_pred_uncond, alphas_cumprod, nodes[k - 1], nodes[k])
        noise_pred_uncond = eps_fn(x, nodes[k], uncond)
        calls += 1
    return tweedie_x0(x, noise_pred_uncond, alphas_cumprod, nodes[-1]), calls


def estimate_x0(
    eps_fn: EpsFn,
    latents_noisy: torch.Tensor,
    t: torch.Tensor,
    uncond: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise_pred_uncond: torch.Tensor,
    estimator: str = "tweedie",
    ddim_steps: int = DEFAULT_DDIM_STEPS,
) -> Tuple[torch.Tensor, int]:
    """x̂_0 from the unconditional prediction: ``"tweedie"`` (Eq. 10, no extra call) or ``"ddim"`` (Eq. 15).

    Returns ``(x̂_0, extra eps_fn calls)``.  Raises ``ValueError`` for an unknown ``estimator``.
    """
    if estimator == "tweedie":
        return tweedie_x0(latents_noisy, noise_pred_uncond, alphas_cumprod, t), 0
    if estimator == "ddim":
        return ddim_x0_chain(eps_fn, latents_noisy, t, uncond, alphas_cumprod, ddim_steps, noise_pred_uncond)
    raise ValueError(f"uds-guidance: x0_estimator must be one of {X0_ESTIMATORS}, got {estimator!r}")


@dataclass
class UDSTerms:
    """Result of one UDS evaluation.  All tensors ``(B, C, H, W)`` except ``t``/``t_prev`` ``(B,)``.

    ``grad = weight · (recon + guidance_scale · cls)``; ``recon`` already carries the sign;
    ``x0_a``/``x0_b`` are (x̂_0^t, x̂_0^{t−c}) for generation and (x̂_0^tgt, x̂_0^src) for editing.
    """

    grad: torch.Tensor
    recon: torch.Tensor
    cls: torch.Tensor
    x0_a: torch.Tensor
    x0_b: torch.Tensor
    weight: torch.Tensor
    t: torch.Tensor
    t_prev: Optional[torch.Tensor] = None
    unet_calls: int = 0
    unet_samples: int = 0
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)


class _CountingEps:
    def __init__(self, eps_fn: EpsFn):
        self.eps_fn, self.calls, self.samples = eps_fn, 0, 0

    def __call__(self, x, t, emb):
        self.calls += 1
        self.samples += x.shape[0]
        return self.eps_fn(x, t, emb)


def _as_batch_t(t, B: int, device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device).long().reshape(-1)
    if t.numel() == 1 and B > 1:
        t = t.expand(B)
    if t.shape[0] != B:
        raise ValueError(f"t must have {B} entries (one per view), got {t.shape[0]}")
    return t


@torch.no_grad()
def uds_generation_grad(
    eps_fn: EpsFn,
    latents: torch.Tensor,
    t,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    interval: int = DEFAULT_INTERVAL,
    neg: Optional[torch.Tensor] = None,
    x0_estimator: str = "tweedie",
    ddim_steps: int = DEFAULT_DDIM_STEPS,
    recon_sign: str = DEFAULT_RECON_SIGN,
    weighting_strategy: str = "sds",
    noise: Optional[torch.Tensor] = None,
) -> UDSTerms:
    """UDS generation gradient on the latents (Alg. 1 lines 13-19, Eq. 16 / Eq. 17 with ``neg``, Eq. 19).

    Args:
        eps_fn: the UNet, see module docstring.
        latents: ``x_0`` ``(B, C, H, W)`` (rendered latents; detached here).
        t: ``(B,)`` (or scalar) integer timesteps in ``[0, T)``.
        cond, uncond: ``(B, L, E)`` embeddings of ``y`` and ``∅``; neg: optional ``(B, L, E)`` of ``y_neg``.
        guidance_scale: ``w`` (paper 7.5); interval: ``c`` (``t − c`` clamped at 0).
        x0_estimator: ``"tweedie"`` (Eq. 10) or ``"ddim"`` (Eq. 15, ``ddim_steps`` UNet calls per chain).
        recon_sign: ``"printed"`` (x̂_0^t − x̂_0^{t−c}, Eq. 16) or ``"reversed"`` (x̂_0^{t−c} − x̂_0^t).
        weighting_strategy: ω(t), see :func:`scoredistill.maths.diffusion.sds_weight`.
        noise: the shared ε (default ``torch.randn(latents.shape)``, independent of memory layout).
    Returns:
        :class:`UDSTerms` (``x0_a`` = x̂_0^t, ``x0_b`` = x̂_0^{t−c}); ``unet_calls`` = ``1`` (tweedie) or
        ``ddim_steps``.
    Raises:
        ValueError: invalid option (see :func:`validate_uds_options`) or mismatched shapes.
    """
    validate_uds_options("generation", x0_estimator, ddim_steps, interval, guidance_scale, recon_sign,
                         weighting_strategy, alphas_cumprod.shape[0])
    x0 = latents.detach()
    B = x0.shape[0]
    t = _as_batch_t(t, B, x0.device)
    for name, emb in (("cond", cond), ("uncond", uncond), ("neg", neg)):
        if emb is not None and emb.shape[0] != B:
            raise ValueError(f"{name} embeddings must have batch {B}, got {emb.shape[0]}")
    if noise is None:
        noise = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device)
    t_prev = interval_timestep(t, interval)
    latents_noisy = add_noise(x0, noise, alphas_cumprod, t)
    latents_noisy_prev = add_noise(x0, noise, alphas_cumprod, t_prev)  # the SAME ε (Alg. 1 line 15)
    f = _CountingEps(eps_fn)
    xs, ts, es = [latents_noisy, latents_noisy], [t, t], [cond, uncond]
    if neg is not None:
        xs.append(latents_noisy), ts.append(t), es.append(neg)
    xs.append(latents_noisy_prev), ts.append(t_prev), es.append(uncond)
    out = f(torch.cat(xs), torch.cat(ts), torch.cat(es))
    parts = out.split(B)
    noise_pred_text, noise_pred_uncond = parts[0], parts[1]
    noise_pred_neg = parts[2] if neg is not None else None
    noise_pred_uncond_prev = parts[-1]
    cls = classifier_delta(noise_pred_text, noise_pred_uncond)
    if noise_pred_neg is not None:
        cls = cls - classifier_delta(noise_pred_neg, noise_pred_uncond)  # Eq. 17: δ^cls(y) − δ^cls(y_neg) = ε(y) − ε(y_neg)
    x0s, _ = estimate_x0(f, torch.cat([latents_noisy, latents_noisy_prev]), torch.cat([t, t_prev]), torch.cat([uncond, uncond]),
                         alphas_cumprod, torch.cat([noise_pred_uncond, noise_pred_uncond_prev]), x0_estimator, ddim_steps)
    x0_t, x0_p = x0s.split(B)
    recon = x0_t - x0_p if recon_sign == "printed" else x0_p - x0_t
    weight = sds_weight(alphas_cumprod, t, weighting_strategy, like=x0)
    grad = weight * (recon + float(guidance_scale) * cls)
    return UDSTerms(grad=grad, recon=recon, cls=cls, x0_a=x0_t, x0_b=x0_p, weight=weight, t=t, t_prev=t_prev,
                    unet_calls=f.calls, unet_samples=f.samples)


@torch.no_grad()
def uds_editing_grad(
    eps_fn: EpsFn,
    latents_tgt: torch.Tensor,
    latents_src: torch.Tensor,
    t,
    cond_tgt: torch.Tensor,
    cond_src: torch.Tensor,
    uncond: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    x0_estimator: str = "tweedie",
    ddim_steps: int = DEFAULT_DDIM_STEPS,
    weighting_strategy: str = "sds",
    noise: Optional[torch.Tensor] = None,
    uncond_src: Optional[torch.Tensor] = None,
) -> UDSTerms:
    """UDS editing gradient on the TARGET latents (Alg. 1 lines 4-11, Eq. 14, Eq. 19).

    ``grad = ω(t)·( x̂_0^tgt − x̂_0^src + w·(δ^cls_{x_t^tgt}(y_tgt) − δ^cls_{x_t^src}(y_src)) )`` with one ε
    shared by ``x_t^tgt`` and ``x_t^src`` (same t, same camera).

    Args:
        latents_tgt, latents_src: ``(B, C, H, W)`` target / source renders' latents (both detached here;
            the gradient is meant for the target only).
        t: ``(B,)`` or scalar timesteps.
        cond_tgt, cond_src: ``(B, L, E)`` embeddings of ``y_tgt`` / ``y_src``; uncond: ``(B, L, E)`` of ∅
            (``uncond_src`` optionally a different ∅ for the source branch, default ``uncond``).
        guidance_scale, x0_estimator, ddim_steps, weighting_strategy, noise: as in :func:`uds_generation_grad`.
    Returns:
        :class:`UDSTerms` (``x0_a`` = x̂_0^tgt, ``x0_b`` = x̂_0^src, ``t_prev`` None); ``unet_calls`` = 1 or
        ``ddim_steps``.
    Raises:
        ValueError: invalid option or mismatched shapes (target/source latents must have the same shape).
    """
    validate_uds_options("editing", x0_estimator, ddim_steps, 1, guidance_scale, DEFAULT_RECON_SIGN,
                         weighting_strategy, alphas_cumprod.shape[0])
    if latents_tgt.shape != latents_src.shape:
        raise ValueError(
            f"source latents {tuple(latents_src.shape)} must match target latents {tuple(latents_tgt.shape)}"
        )
    x_tgt, x_src = latents_tgt.detach(), latents_src.detach().to(latents_tgt.dtype)
    B = x_tgt.shape[0]
    t = _as_batch_t(t, B, x_tgt.device)
    if uncond_src is None:
        uncond_src = uncond
    for name, emb in (("cond_tgt", cond_tgt), ("cond_src", cond_src), ("uncond", uncond), ("uncond_src", uncond_src)):
        if emb.shape[0] != B:
            raise ValueError(f"{name} embeddings must have batch {B}, got {emb.shape[0]}")
    if noise is None:
        noise = torch.randn(x_tgt.shape, dtype=x_tgt.dtype, device=x_tgt.device)
    latents_noisy_tgt = add_noise(x_tgt, noise, alphas_cumprod, t)
    latents_noisy_src = add_noise(x_src, noise, alphas_cumprod, t)  # the SAME ε
    f = _CountingEps(eps_fn)
    out = f(torch.cat([latents_noisy_tgt, latents_noisy_tgt, latents_noisy_src, latents_noisy_src]), torch.cat([t, t, t, t]),
            torch.cat([cond_tgt, uncond, cond_src, uncond_src]))
    noise_pred_text_tgt, noise_pred_uncond_tgt, noise_pred_text_src, noise_pred_uncond_src = out.split(B)
    cls = classifier_delta(noise_pred_text_tgt, noise_pred_uncond_tgt) - classifier_delta(noise_pred_text_src, noise_pred_uncond_src)
    x0s, _ = estimate_x0(f, torch.cat([latents_noisy_tgt, latents_noisy_src]), torch.cat([t, t]), torch.cat([uncond, uncond_src]),
                         alphas_cumprod, torch.cat([noise_pred_uncond_tgt, noise_pred_uncond_src]), x0_estimator, ddim_steps)
    x0_tgt, x0_src = x0s.split(B)
    recon = x0_tgt - x0_src
    weight = sds_weight(alphas_cumprod, t, weighting_strategy, like=x_tgt)
    grad = weight * (recon + float(guidance_scale) * cls)
    return UDSTerms(grad=grad, recon=recon, cls=cls, x0_a=x0_tgt, x0_b=x0_src, weight=weight, t=t,
                    unet_calls=f.calls, unet_samples=f.samples)
