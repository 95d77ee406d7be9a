"""GE3D: text-to-3D generation by 2D editing -- the method's maths as plain functions (no threestudio).

Paper: ``papers/ge3d-text-to-3d-by-2d-editing.txt`` (Li et al., "Text-to-3D Generation by 2D Editing").
Summary: ../shared/METHODS.md section 1.  The threestudio adapter is :mod:`scoredistill.guidance.ge3d_guidance`.

Per optimisation iteration ``k`` of ``K`` and a trajectory of ``n + 1`` time nodes ``t_0 < t_1 < ... < t_n``
(Algorithm 1):

1. noising by DDIM inversion with the unconditional (negative-prompt) embedding ∅, ``i = 0 .. n-1``
   (Alg. 1 lines 8-10, Eq. 6 first line):
   ``x_{t_{i+1}} = sqrt(ᾱ_{t_{i+1}}) (x_{t_i}/sqrt(ᾱ_{t_i}) + δ_{i+1} ε_φ(x_{t_i}, t_i, ∅))``, ``x_{t_0}`` = the render;
2. denoising with CFG along the same nodes, ``x̃_{t_n} = x_{t_n}``, ``i = n-1 .. 0`` (lines 12-15):
   ``x̃_{t_i} = sqrt(ᾱ_{t_i}) (x̃_{t_{i+1}}/sqrt(ᾱ_{t_{i+1}}) − δ_{i+1} ε̃_φ(x̃_{t_{i+1}}, t_{i+1}, y, ∅))``;
3. gradient on the render's latent (line 17, loss Eq. 11): ``Σ_{i=0}^{n-1} ω̃(i, k) (x_{t_i} − x̃_{t_i})``;
4. dynamic balancing coefficient (DBC, Eq. 9-10): ``ω(i, k) = exp(−(k − Δ_i)² / (2σ²))``,
   ``Δ_i = (n − i − 1) K / (n − 1)``, normalised over ``i``; σ = 1000.

with ``δ_{i+1} = sqrt((1−ᾱ_{t_{i+1}})/ᾱ_{t_{i+1}}) − sqrt((1−ᾱ_{t_i})/ᾱ_{t_i})``.  Cost: ``n`` unconditional
UNet evaluations (inversion) + ``n`` CFG evaluations of batch 2 (denoising) = ``3n`` sample-evaluations per
view, the minimum the algorithm needs (the reference evaluates ``(2n + 1)·2``).

Trajectories: a fixed node list (:func:`validate_timesteps`), or the reference behaviour
(:func:`random_trajectory` with :func:`annealed_trajectory_params`): each iteration ``n`` intervals drawn
uniformly from the integers ``[jump_min, jump_max)``, nodes laid downward from the farthest timestep ``t_n``;
``jump_min`` 60→30, ``jump_max`` 80→50 and ``t_n`` 480→300 annealed linearly over training.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..sync import host_only, to_device

from .diffusion import add_noise, ddim_step, linear_anneal

#: ``eps_fn(x (B,C,H,W), t: int) -> ε (B,C,H,W)``
EpsFn = Callable[[torch.Tensor, int], torch.Tensor]
Schedule = Union[float, int, Sequence[float]]


# ----------------------------------------------------------------------------- trajectories
def validate_timesteps(timesteps: Sequence[int], num_train_timesteps: int = 1000, name: str = "timesteps") -> List[int]:
    """Check a fixed trajectory ``[t_0, ..., t_n]`` and return it as python ints.

    Raises:
        ValueError: fewer than 2 nodes (n < 1), a non-integer node, a node outside ``[0, T)``, or nodes that
            are not strictly increasing.
    """
    ts = list(timesteps) if timesteps is not None else []
    if len(ts) < 2:
        raise ValueError(f"{name} must list n + 1 >= 2 time nodes t_0 < ... < t_n (n >= 1), got {ts}")
    out = []
    for t in ts:
        if isinstance(t, bool) or not float(t).is_integer():
            raise ValueError(f"{name} must be integers, got {ts}")
        t = int(t)
        if not 0 <= t < num_train_timesteps:
            raise ValueError(f"{name} must lie in [0, {num_train_timesteps}), got {ts}")
        out.append(t)
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"{name} must be strictly increasing (t_0 < t_1 < ... < t_n), got {out}")
    return out


def schedule_endpoints(value: Schedule, name: str) -> Tuple[float, float]:
    """A constant ``v`` or a ``[start, end]`` pair (annealed linearly over training) → ``(start, end)``.

    Raises:
        ValueError: anything else.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), float(value)
    try:
        vals = [float(v) for v in value]
    except (TypeError, ValueError):
        vals = []
    if len(vals) != 2:
        raise ValueError(f"{name} must be a number or a [start, end] pair, got {value!r}")
    return vals[0], vals[1]


def annealed_trajectory_params(
    step: int,
    total_steps: int,
    jump_min: Schedule = (60, 30),
    jump_max: Schedule = (80, 50),
    max_timestep: Schedule = (480, 300),
) -> Tuple[int, int, int]:
    """Reference schedule: ``(jump_min, jump_max, t_n)`` at training step ``step`` of ``total_steps``, each
    linearly interpolated between its ``[start, end]`` (constants stay constant) and rounded."""
    out = []
    for v, name in ((jump_min, "jump_min"), (jump_max, "jump_max"), (max_timestep, "max_timestep")):
        a, b = schedule_endpoints(v, name)
        out.append(int(round(linear_anneal(a, b, step, total_steps))))
    return out[0], out[1], out[2]


def validate_random_trajectory(
    n: int, jump_min: Schedule, jump_max: Schedule, max_timestep: Schedule, num_train_timesteps: int = 1000
) -> None:
    """Check the reference (random) trajectory settings at both ends of their schedules.

    Requires ``n >= 1``, ``1 <= jump_min < jump_max``, ``max_timestep`` in ``[1, T)``, and
    ``max_timestep >= n (jump_max − 1)`` so that ``t_0 >= 0`` for every draw.

    Raises:
        ValueError: naming the setting and the allowed range.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n_steps (number of trajectory intervals n) must be an integer >= 1, got {n!r}")
    lo = schedule_endpoints(jump_min, "jump_min")
    hi = schedule_endpoints(jump_max, "jump_max")
    tm = schedule_endpoints(max_timestep, "max_timestep")
    for e in range(2):
        if lo[e] < 1:
            raise ValueError(f"jump_min must be >= 1, got {jump_min!r}")
        if hi[e] <= lo[e]:
            raise ValueError(f"jump_max must be > jump_min (intervals are drawn from [jump_min, jump_max)), got {jump_min!r}, {jump_max!r}")
        if not 1 <= tm[e] < num_train_timesteps:
            raise ValueError(f"max_timestep must lie in [1, {num_train_timesteps}), got {max_timestep!r}")
        if tm[e] < n * (hi[e] - 1):
            raise ValueError(
                f"max_timestep ({max_timestep!r}) must be >= n_steps * (jump_max - 1) = {n} * ({jump_max!r} - 1) "
                "so that the nearest node t_0 stays >= 0"
            )


def random_trajectory(
    n: int,
    jump_min: int,
    jump_max: int,
    max_timestep: int,
    generator: Optional[torch.Generator] = None,
) -> List[int]:
    """Reference trajectory: ``t_n = max_timestep``, ``t_i = t_{i+1} − j_{i+1}`` with ``j ~ U{jump_min, ..., jump_max−1}``.

    Returns the ``n + 1`` nodes ascending.  ``t_0`` is clamped at 0 (cannot happen when
    :func:`validate_random_trajectory` holds, up to rounding of annealed values).

    Raises:
        ValueError: ``n < 1`` or ``jump_max <= jump_min`` or nodes that would not be strictly increasing.
    """
    if n < 1:
        raise ValueError(f"n_steps must be >= 1, got {n}")
    if jump_max <= jump_min or jump_min < 1:
        raise ValueError(f"need 1 <= jump_min < jump_max, got {jump_min}, {jump_max}")
    with host_only():  # drawn on the host (CPU generator): no device read
        jumps = torch.randint(jump_min, jump_max, (n,), generator=generator).tolist()
    nodes = [int(max_timestep)]
    for j in reversed(jumps):
        nodes.append(nodes[-1] - int(j))
    nodes = nodes[::-1]
    nodes[0] = max(nodes[0], 0)
    return validate_timesteps(nodes, num_train_timesteps=10**9, name="random trajectory")


# ----------------------------------------------------------------------------- DBC
def dbc_peaks(n: int, total_steps: int) -> torch.Tensor:
    """Δ_i = (n − i − 1)·K/(n − 1), i = 0..n-1 (Eq. 9), float64 ``(n,)``; ``n = 1`` gives ``[0]``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    i = torch.arange(n, dtype=torch.float64)
    return (n - i - 1) * float(total_steps) / (n - 1)


def dbc_weights(n: int, step: int, total_steps: int, sigma: float = 1000.0, enabled: bool = True) -> torch.Tensor:
    """Normalised DBC weights ω̃(i, k), i = 0..n-1 (Eq. 9-10), float64 ``(n,)`` summing to 1.

    ``ω(i, k) = exp(−(k − Δ_i)² / (2σ²))``; the peak of node ``i`` is at iteration Δ_i: the coarsest node
    (``i = n−1``) at ``k = 0``, the finest (``i = 0``) at ``k = K``.  ``enabled=False`` gives uniform weights
    ``1/n`` (DBC off).  Normalisation uses a log-sum-exp, so tiny σ cannot divide by zero.

    Raises:
        ValueError: ``n < 1`` or ``sigma <= 0``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not enabled:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    if sigma <= 0:
        raise ValueError(f"dbc_sigma must be > 0, got {sigma}")
    logw = -((float(step) - dbc_peaks(n, total_steps)) ** 2) / (2.0 * float(sigma) ** 2)
    return torch.softmax(logw, dim=0)


# ----------------------------------------------------------------------------- Algorithm 1
def ge3d_trajectories(
    noise_pred_uncond_fn: EpsFn,
    noise_pred_fn: EpsFn,
    latents: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The two trajectories of Algorithm 1 (lines 4-16).

    Args:
        noise_pred_uncond_fn: ``ε_φ(x, t, ∅)``, called once per inversion step at ``t = t_0 .. t_{n-1}``.
        noise_pred_fn: ``ε̃_φ(x, t, y, ∅)`` (CFG or Perp-Neg), called once per denoising step at
            ``t = t_n .. t_1``.
        latents: ``x_{t_0}``, ``(B, C, H, W)`` (no gradient needed).
        timesteps: ``[t_0, ..., t_n]`` strictly increasing in ``[0, T)``.
    Returns:
        ``(xs, xs_tilde)``: lists of ``n + 1`` tensors; ``xs[i] = x_{t_i}`` (``xs[0]`` is ``latents``),
        ``xs_tilde[i] = x̃_{t_i}`` (``xs_tilde[n] = xs[n]``).
    """
    ts = validate_timesteps(timesteps, alphas_cumprod.shape[0])
    n = len(ts) - 1
    xs = [latents]
    for i in range(n):  # noising: DDIM inversion with ∅
        noise_pred_uncond = noise_pred_uncond_fn(xs[i], ts[i])
        xs.append(ddim_step(xs[i], noise_pred_uncond, alphas_cumprod, ts[i], ts[i + 1]))
    xs_tilde = [None] * (n + 1)
    xs_tilde[n] = xs[n]
    for i in range(n - 1, -1, -1):  # denoising with CFG along the same nodes
        noise_pred = noise_pred_fn(xs_tilde[i + 1], ts[i + 1])
        xs_tilde[i] = ddim_step(xs_tilde[i + 1], noise_pred, alphas_cumprod, ts[i + 1], ts[i])
    return xs, xs_tilde


def ge3d_grad(
    noise_pred_uncond_fn: EpsFn,
    noise_pred_fn: EpsFn,
    latents: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    offset_noise: float = 0.0,
    noise_to_first_node: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GE3D latent gradient ``Σ_{i=0}^{n-1} ω̃_i (x_{t_i} − x̃_{t_i})`` (Alg. 1 line 17, Eq. 11).

    Args:
        noise_pred_uncond_fn, noise_pred_fn, timesteps, alphas_cumprod: see :func:`ge3d_trajectories`.
        latents: the render's latents ``(B, C, H, W)``; used as ``x_{t_0}`` (Alg. 1 line 3).
        weights: ``(n,)`` ω̃ (e.g. :func:`dbc_weights`); default uniform ``1/n``.
        noise_to_first_node: option (not in Alg. 1): start from ``x_{t_0} = add_noise(latents, ε, t_0)``
            with ``ε = N(0, I) + offset_noise · N(0, I)_{per channel}``; the gradient is then taken against
            this noised start.  With it off (default, Alg. 1) ``offset_noise`` must be 0.
    Returns:
        ``grad`` (latents' shape and dtype) and a dict with ``xs``/``xs_tilde`` stacked ``(n+1, B, C, H, W)``,
        ``residuals`` ``(n,)`` (RMS of ``x_{t_i} − x̃_{t_i}``) and ``weights`` ``(n,)``.
    Raises:
        ValueError: bad nodes, weights of the wrong length, or ``offset_noise`` without ``noise_to_first_node``.
    """
    ts = validate_timesteps(timesteps, alphas_cumprod.shape[0])
    n = len(ts) - 1
    if weights is None:
        weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},) for {n + 1} nodes, got {tuple(weights.shape)}")
    if offset_noise < 0:
        raise ValueError(f"offset_noise must be >= 0, got {offset_noise}")
    if offset_noise > 0 and not noise_to_first_node:
        raise ValueError("offset_noise > 0 needs noise_to_first_node=True (Alg. 1 itself adds no random noise)")
    x0 = latents.detach()
    if noise_to_first_node:
        B, C = x0.shape[:2]
        # drawn where the generator lives (the latents' device without one: no host draw + copy per step)
        gdev = x0.device if generator is None else generator.device
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=gdev).to(x0.device)
        if offset_noise > 0:
            noise = noise + offset_noise * torch.randn((B, C) + (1,) * (x0.dim() - 2), generator=generator, dtype=x0.dtype, device=gdev).to(x0.device)
        x0 = add_noise(x0, noise, alphas_cumprod, ts[0])
    xs, xs_tilde = ge3d_trajectories(noise_pred_uncond_fn, noise_pred_fn, x0, ts, alphas_cumprod)
    w = to_device(weights, x0.device).to(dtype=x0.dtype)  # a host tensor: pinned, non-blocking copy
    diffs = [xs[i] - xs_tilde[i] for i in range(n)]
    grad = sum(w[i] * diffs[i] for i in range(n))
    info = {
        "xs": torch.stack(xs),
        "xs_tilde": torch.stack(xs_tilde),
        "residuals": torch.stack([d.pow(2).mean().sqrt() for d in diffs]),
        "weights": w,
    }
    return grad.to(latents.dtype), info


def ge3d_samples_per_view(n: int, perp_neg: bool = False) -> int:
    """UNet sample-evaluations per view and iteration: ``n`` (inversion) + ``2n`` CFG (``4n`` with Perp-Neg)."""
    return n + (4 if perp_neg else 2) * n
