"""DreamMapping: variational distribution mapping (VDM) with distribution coefficient annealing (DCA).

Paper: Cai, Wang, Liang, Shao, Chen, Zhan, Wang, "DreamMapping: High-Fidelity Text-to-3D Generation via
Variational Distribution Mapping" (``../shared/papers/dreammapping-vdm.txt``; ``METHODS.md`` §3).
Plain tensor maths and ``torch.nn`` modules; nothing here imports threestudio (the threestudio adapter is
:mod:`scoredistill.guidance.vdm_guidance`).

The method in one paragraph.  Rendered latents ``x_0`` are treated as *degraded* samples of the diffusion
model, ``x_0 = M(x̂_0) + n`` (Eq. 12).  A small learnable degradation operator ``M_ψ`` (Eq. 13) is trained every
step on the noise-prediction level (Eq. 17)::

    L_op(ψ) = E ‖ M_ψ(ε_φ(x_t, t, y)) − ε ‖²                                   (Eq. 17)

and the 3D parameters θ get the gradient (Eq. 19)::

    ∇_θ L_VDM = E[ ω(t) · ( ε_φ(x_t, t, y) − λ_t · M_ψ(ε_φ(x_t, t, y)) ) · ∂x/∂θ ]   (Eq. 19)

with the DCA coefficient (Eq. 18)::

    λ_t = 1            if t >  t_cut     (t_cut = 300 in the paper)
    λ_t = 1 − ᾱ_t      if t <= t_cut

The UNet Jacobian is skipped (as in SDS) and ``M_ψ`` is trained without any backward pass through the
diffusion UNet: its input is the detached noise prediction.  Per step the whole method costs one CFG UNet
evaluation (batch ``2B``), one operator forward and one operator backward.

Choices where the paper is silent or ambiguous (each is a switch; see ``docs/vdm.md``):

* ``ε_φ(x_t, t, y)`` in Eq. 19's first term is the CFG prediction (the paper runs CFG 7.5; Sec. 1 and 4.6).
  The operator's input is an explicit option, :data:`OPERATOR_INPUTS`: ``"cfg"`` (default; the same
  symbol ε_φ(x_t, t, y) appears in both places of Eq. 19 and in Eq. 17) or ``"cond"`` (the conditional
  prediction ``ε_φ(x_t, t, y)`` without guidance).
* CFG form, :data:`CFG_FORMS`: ``"standard"`` ``ε(∅) + s(ε(y) − ε(∅))`` (diffusers / LucidDreamer,
  the convention in which "7.5" is usually quoted; default) or ``"paper"`` = the paper's Eq. 4,
  ``ε(y) + s(ε(y) − ε(∅))`` (= ``"standard"`` with ``s + 1``).
* DCA boundary: Eq. 18 uses ``t <= t_cut`` for the annealed branch, Alg. 1 line 7 uses ``t < t_cut``;
  they differ only at ``t = t_cut``.  ``inclusive=True`` (default) follows Eq. 18.
* Eq. 19 multiplies by ``∂x_t/∂θ = sqrt(ᾱ_t) ∂x/∂θ``; like SDS (Eq. 8) the constant ``sqrt(ᾱ_t)`` is
  absorbed into ω(t), so the returned gradient is w.r.t. the clean latents ``x``.
* Operator loss reduction: mean over all elements (``F.mse_loss``); with Adam the scale does not matter.
* Update order (Alg. 1): both losses are formed with the *current* ψ, then ψ is updated; the θ gradient
  therefore uses ``M_ψ`` before this step's update (one operator forward).  ``refresh_after_update=True``
  re-evaluates ``M_ψ`` after the update (one more operator forward).

Contents:

* :class:`ULiteOperator` -- the default non-linear ``M_ψ`` (a light U-Net in the spirit of U-Lite,
  Dinh et al. 2023, 879,252 parameters).
* :class:`LinearOperator` -- the ablation "linear operator": a learnable latent-shaped tensor (Fig. 7).
* :class:`DegradationModel` -- operator plus optional learnable observation noise ``n`` (Eq. 12; Fig. 7).
* :func:`build_degradation_model` -- factory from config values (validates them).
* :func:`dca_lambda` (Eq. 18), :func:`operator_loss` (Eq. 17), :func:`vdm_grad` (Eq. 19),
  :func:`guided_noise` (CFG), :func:`vdm_weight` (ω(t)).
* :class:`VariationalDistributionMapping` -- operator + its own optimizer, one training step, state dicts.
* :func:`vdm_update` -- the VDM part of a step given the noise predictions (what the adapter runs after its
  one CFG / Perp-Neg UNet call); :func:`vdm_step` -- a full step given a noise-prediction function.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from scoredistill.distributed import all_reduce_grads_
from scoredistill.integrity.finite import finite_ok, make_capturable, step_if_finite
from scoredistill.maths.diffusion import (
    WEIGHTING_STRATEGIES,
    EpsFn,
    Timestep,
    abar_at,
    add_noise,
    cfg_combine,
    predict_cond_uncond,
    sds_weight,
)

#: operator kinds: the paper's non-linear U-Net operator and the linear ablation (a learnable tensor)
OPERATOR_TYPES = ("ulite", "linear")
#: what the operator receives: the CFG prediction or the conditional prediction
OPERATOR_INPUTS = ("cfg", "cond")
#: classifier-free guidance conventions
CFG_FORMS = ("standard", "paper")
#: the ∂x_t/∂x = sqrt(ᾱ_t) factor of Eq. 19's ∂x_t/∂θ: "dropped" (default, as SDS practice and the paper's own
#: Eq. 8-9, which write ∂x/∂θ) | "sqrt_alpha_bar" (Eq. 19 taken literally: the gradient times sqrt(ᾱ_t))
X_T_JACOBIANS = ("dropped", "sqrt_alpha_bar")
#: ω(t) choices: DreamFusion's 1−ᾱ_t, uniform, Fantasia3D's sqrt(ᾱ)(1−ᾱ), LucidDreamer's sqrt((1−ᾱ)/ᾱ)
VDM_WEIGHTINGS = WEIGHTING_STRATEGIES + ("luciddreamer",)
#: optimizers for ψ
OPERATOR_OPTIMIZERS = ("adam", "adamw", "sgd")
#: paper defaults
DEFAULT_DCA_CUTOFF = 300
DEFAULT_OPERATOR_LR = 0.01
DEFAULT_ULITE_WIDTHS = (16, 32, 64, 128, 256, 512)


# ============================================================================ operators
class AxialDepthwise(nn.Module):
    """Axial depthwise mixer ``x + DW_{k×1}(x) + DW_{1×k}(x)`` (the U-Lite building block).

    Two depthwise convolutions, one vertical (``k×1``) and one horizontal (``1×k``), with optional dilation
    and "same" padding, added to the identity.  Shape-preserving: ``(B, C, H, W) -> (B, C, H, W)``.
    Parameters: ``2·C·k + 2·C``.
    """

    def __init__(self, channels: int, kernel_size: int = 7, dilation: int = 1):
        super().__init__()
        pad = dilation * (kernel_size - 1) // 2
        self.vertical = nn.Conv2d(channels, channels, (kernel_size, 1), padding=(pad, 0), dilation=dilation, groups=channels)
        self.horizontal = nn.Conv2d(channels, channels, (1, kernel_size), padding=(0, pad), dilation=dilation, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.vertical(x) + self.horizontal(x)


def _norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm on the current batch's statistics, always (no running statistics): ``M_ψ`` is trained at every
    step and applied to the same batch it is trained on, so train/eval modes behave identically."""
    return nn.BatchNorm2d(channels, track_running_stats=False)


class _Down(nn.Module):
    """Encoder stage: axial mixer → BN (the skip) → 1×1 conv (widen) → 2×2 max-pool → GELU."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int):
        super().__init__()
        self.mix = AxialDepthwise(c_in, kernel_size)
        self.norm = _norm(c_in)
        self.widen = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        skip = self.norm(self.mix(x))
        return F.gelu(F.max_pool2d(self.widen(skip), 2)), skip


class _Bottleneck(nn.Module):
    """Bottleneck: 1×1 conv to C/4, three dilated 3-tap axial mixers (dilation 1, 2, 3) in parallel with the
    identity, concatenated (C channels), BN, 1×1 conv back to C, GELU."""

    def __init__(self, channels: int):
        super().__init__()
        quarter = max(channels // 4, 1)
        self.reduce = nn.Conv2d(channels, quarter, 1)
        self.branches = nn.ModuleList(AxialDepthwise(quarter, 3, dilation=d) for d in (1, 2, 3))
        self.norm = _norm(4 * quarter)
        self.expand = nn.Conv2d(4 * quarter, channels, 1)

    def forward(self, x):
        x = self.reduce(x)
        x = torch.cat([x] + [b(x) for b in self.branches], dim=1)
        return F.gelu(self.expand(self.norm(x)))


class _Up(nn.Module):
    """Decoder stage: ×2 nearest upsampling, concat skip, 1×1 conv (narrow) → BN → axial mixer → 1×1 conv → GELU."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int):
        super().__init__()
        self.narrow = nn.Conv2d(c_in + c_out, c_out, 1)
        self.norm = _norm(c_out)
        self.mix = AxialDepthwise(c_out, kernel_size)
        self.project = nn.Conv2d(c_out, c_out, 1)

    def forward(self, x, skip):
        x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
        x = torch.cat([x, skip], dim=1)
        return F.gelu(self.project(self.mix(self.norm(self.narrow(x)))))


class ULiteOperator(nn.Module):
    """Non-linear degradation operator ``M_ψ`` (DreamMapping Eq. 13, Sec. 4.2): a light U-Net in the spirit of
    U-Lite (Dinh, Nguyen, Tran, Pham, "1M parameters are enough? A lightweight CNN-based model for medical
    image segmentation", APSIPA ASC 2023).  Written for this pack (no code taken from U-Lite).

    Architecture (default ``widths = (16, 32, 64, 128, 256, 512)``, ``kernel_size = 7``, 4 → 4 channels):

    * stem: 7×7 conv, 4 → 16 channels;
    * 5 encoder stages ``widths[i] → widths[i+1]``: axial depthwise mixer (``x + DW_7×1 x + DW_1×7 x``),
      BatchNorm (kept as the skip), 1×1 conv, 2×2 max-pool, GELU;
    * bottleneck at 512 channels: 1×1 conv to 128, three axial 3-tap depthwise mixers with dilation 1, 2, 3
      concatenated with their input (512), BatchNorm, 1×1 conv, GELU;
    * 5 decoder stages (mirror): nearest ×2 upsampling, concat skip, 1×1 conv, BatchNorm, axial mixer,
      1×1 conv, GELU;
    * head: 1×1 conv 16 → 4 channels (+ the input if ``residual``).

    Parameter count with the defaults: **879,252** (≈ 0.9 M, U-Lite's own size class; asserted in the tests;
    :meth:`num_parameters`).

    Input / output: ``(B, 4, H, W) -> (B, 4, H, W)`` for any ``H, W >= 1``.  The input is zero-padded on the
    bottom/right to a multiple of ``2**depth`` (for ``B = 1`` to at least ``2**(depth+1)``, so every BatchNorm
    sees more than one value per channel), and the output is cropped back.  SD 2.1-base latents (64×64) need
    no padding.  BatchNorm always normalises with the batch's statistics (no running statistics), so the
    output does not depend on train/eval mode.

    Args:
        in_channels, out_channels: latent channels (4 for Stable Diffusion).
        widths: channels per level (``len(widths) - 1`` = number of down-samplings); smaller values make
            cheap test operators.
        kernel_size: axial mixer length (odd).
        residual: add the input to the output (``M(x) = x + U(x)``); not in the paper, off by default.
    Raises:
        ValueError: fewer than 2 widths, a non-positive width or an even ``kernel_size``.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        widths: Sequence[int] = DEFAULT_ULITE_WIDTHS,
        kernel_size: int = 7,
        residual: bool = False,
    ):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"operator_widths must list at least 2 positive channel counts, got {widths}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"operator_kernel_size must be an odd integer >= 1, got {kernel_size}")
        if residual and in_channels != out_channels:
            raise ValueError("operator_residual needs in_channels == out_channels")
        self.widths = widths
        self.depth = len(widths) - 1
        self.residual = residual
        self.stem = nn.Conv2d(in_channels, widths[0], 7, padding=3)
        self.down = nn.ModuleList(_Down(widths[i], widths[i + 1], kernel_size) for i in range(self.depth))
        self.bottleneck = _Bottleneck(widths[-1])
        self.up = nn.ModuleList(_Up(widths[i + 1], widths[i], kernel_size) for i in reversed(range(self.depth)))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _padded_size(self, n: int, batch: int) -> int:
        m = 2**self.depth
        return max(int(math.ceil(n / m)) * m, m if batch > 1 else 2 * m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"operator input must be (B, C, H, W), got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        Hp, Wp = self._padded_size(H, x.shape[0]), self._padded_size(W, x.shape[0])
        h = F.pad(x, (0, Wp - W, 0, Hp - H)) if (Hp, Wp) != (H, W) else x
        h = self.stem(h)
        skips = []
        for stage in self.down:
            h, s = stage(h)
            skips.append(s)
        h = self.bottleneck(h)
        for stage, s in zip(self.up, reversed(skips)):
            h = stage(h, s)
        out = self.head(h)[..., :H, :W]
        return x + out if self.residual else out


class LinearOperator(nn.Module):
    """Linear degradation operator of the ablation (DreamMapping Sec. 4.6, Fig. 7): ``M(x) = A ⊙ x`` with a
    learnable tensor ``A`` "matching the dimensions of ε_φ(x_t, t, y)", i.e. latent-shaped ``(C, H, W)``,
    shared by all views; initialised to ones (the identity map).

    Input / output ``(B, C, H, W)``.
    Raises:
        ValueError: the input's ``(C, H, W)`` differs from the tensor's shape.
    """

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(*shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != tuple(self.weight.shape):
            raise ValueError(
                f"linear operator has shape {tuple(self.weight.shape)} but the latents are {tuple(x.shape[1:])}; "
                "set operator_latent_size to the latent resolution"
            )
        return x * self.weight


class DegradationModel(nn.Module):
    """The degradation model of Eq. 12 on the noise-prediction level: ``M(ε̂) + n``.

    ``n`` is the learnable observation noise of the ablation (Fig. 7: "a tensor equivalent in size to the
    predicted noise", latent-shaped ``(C, H, W)``, initialised to zeros) or absent (the paper's choice, Eq. 13).
    """

    def __init__(self, operator: nn.Module, noise_shape: Optional[Sequence[int]] = None):
        super().__init__()
        self.operator = operator
        self.observation_noise = nn.Parameter(torch.zeros(*noise_shape)) if noise_shape is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.operator(x)
        if self.observation_noise is not None:
            if tuple(out.shape[1:]) != tuple(self.observation_noise.shape):
                raise ValueError(
                    f"observation noise has shape {tuple(self.observation_noise.shape)} but the latents are "
                    f"{tuple(out.shape[1:])}; set operator_latent_size to the latent resolution"
                )
            out = out + self.observation_noise
        return out


def validate_operator_config(
    operator_type: str = "ulite",
    operator_lr: float = DEFAULT_OPERATOR_LR,
    operator_optimizer: str = "adam",
    operator_widths: Sequence[int] = DEFAULT_ULITE_WIDTHS,
    operator_kernel_size: int = 7,
    operator_steps_per_iter: int = 1,
    latent_shape: Optional[Sequence[int]] = None,
    learnable_noise: bool = False,
) -> None:
    """Check the operator settings; raises ``ValueError`` naming the setting and its allowed values."""
    if operator_type not in OPERATOR_TYPES:
        raise ValueError(f"operator_type must be one of {OPERATOR_TYPES}, got {operator_type!r}")
    if operator_optimizer not in OPERATOR_OPTIMIZERS:
        raise ValueError(f"operator_optimizer must be one of {OPERATOR_OPTIMIZERS}, got {operator_optimizer!r}")
    if not (isinstance(operator_lr, (int, float)) and operator_lr > 0 and math.isfinite(operator_lr)):
        raise ValueError(f"operator_lr must be a finite number > 0, got {operator_lr!r}")
    if not (isinstance(operator_steps_per_iter, int) and operator_steps_per_iter >= 1):
        raise ValueError(f"operator_steps_per_iter must be an integer >= 1, got {operator_steps_per_iter!r}")
    widths = list(operator_widths)
    if len(widths) < 2 or any((not isinstance(w, int)) or w < 1 for w in widths):
        raise ValueError(f"operator_widths must list at least 2 positive integers, got {widths}")
    if not (isinstance(operator_kernel_size, int) and operator_kernel_size >= 1 and operator_kernel_size % 2 == 1):
        raise ValueError(f"operator_kernel_size must be an odd integer >= 1, got {operator_kernel_size!r}")
    if (operator_type == "linear" or learnable_noise) and latent_shape is not None:
        if len(latent_shape) != 3 or any(int(s) < 1 for s in latent_shape):
            raise ValueError(f"latent shape must be (C, H, W) with positive sizes, got {tuple(latent_shape)}")


def build_degradation_model(
    operator_type: str = "ulite",
    latent_shape: Sequence[int] = (4, 64, 64),
    learnable_noise: bool = False,
    widths: Sequence[int] = DEFAULT_ULITE_WIDTHS,
    kernel_size: int = 7,
    residual: bool = False,
) -> DegradationModel:
    """The degradation model for the settings (``latent_shape = (C, H, W)``; H, W used by the linear operator
    and the learnable noise only; C by all).

    Raises:
        ValueError: unknown ``operator_type`` or bad widths / kernel size.
    """
    validate_operator_config(operator_type, operator_widths=widths, operator_kernel_size=kernel_size,
                             latent_shape=latent_shape, learnable_noise=learnable_noise)
    C = int(latent_shape[0])
    if operator_type == "ulite":
        op = ULiteOperator(C, C, widths=widths, kernel_size=kernel_size, residual=residual)
    else:
        op = LinearOperator(latent_shape)
    return DegradationModel(op, tuple(latent_shape) if learnable_noise else None)


# ============================================================================ equations
def dca_lambda(
    alphas_cumprod: torch.Tensor,
    t: Timestep,
    cutoff: int = DEFAULT_DCA_CUTOFF,
    enabled: bool = True,
    inclusive: bool = True,
    like: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Distribution coefficient annealing, DreamMapping Eq. 18::

        λ_t = 1          for t > cutoff
        λ_t = 1 − ᾱ_t    for t <= cutoff      (t < cutoff with inclusive=False, Alg. 1 line 7)

    Args:
        alphas_cumprod: ``(T,)`` ᾱ.
        t: int or ``(B,)`` integer timesteps in ``[0, T)``.
        cutoff: the cut-off timestep (paper: 300; ablated 100 ≈ no DCA, 500 over-smooths).
        enabled: ``False`` gives ``λ_t = 1`` everywhere (the "VDM without DCA" ablation).
        like: tensor to broadcast against (default ``(B, 1, 1, 1)``).
    Returns:
        ``(B, 1, ..., 1)`` in ``(0, 1]``, in ``like``'s dtype (float32 by default).
    Raises:
        ValueError: timestep outside ``[0, T)``.
    """
    if like is None:
        like = torch.empty(1, 1, 1, 1, device=alphas_cumprod.device, dtype=torch.float32)
    a = abar_at(alphas_cumprod, t, like)
    if not enabled:
        return torch.ones_like(a)
    tt = torch.as_tensor(t, device=a.device).long().reshape(a.shape)
    annealed = tt <= cutoff if inclusive else tt < cutoff
    return torch.where(annealed, 1 - a, torch.ones_like(a))


def vdm_weight(alphas_cumprod: torch.Tensor, t: Timestep, strategy: str = "sds", like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ω(t) of Eq. 19, ``(B, 1, 1, 1)``.  The paper leaves ω unspecified ("a time-dependent weighting
    function", Eq. 7); ``"sds"`` = 1−ᾱ_t (DreamFusion, default), ``"uniform"`` = 1, ``"fantasia3d"`` =
    sqrt(ᾱ_t)(1−ᾱ_t), ``"luciddreamer"`` = sqrt((1−ᾱ_t)/ᾱ_t) (the weighting of the LucidDreamer code base the
    paper's implementation started from, Sec. 4.2).

    Raises:
        ValueError: unknown ``strategy``.
    """
    if like is None:
        like = torch.empty(1, 1, 1, 1, device=alphas_cumprod.device, dtype=torch.float32)
    return sds_weight(alphas_cumprod, t, strategy, like=like, allowed=VDM_WEIGHTINGS)


def guided_noise(noise_pred_text: torch.Tensor, noise_pred_uncond: torch.Tensor, scale: float, form: str = "standard") -> torch.Tensor:
    """CFG noise prediction: ``"standard"`` ``ε(∅) + s(ε(y) − ε(∅))``; ``"paper"`` (Eq. 4) ``ε(y) + s(ε(y) − ε(∅))``.

    Raises:
        ValueError: unknown ``form``.
    """
    if form not in CFG_FORMS:
        raise ValueError(f"cfg_form must be one of {CFG_FORMS}, got {form!r}")
    return cfg_combine(noise_pred_text, noise_pred_uncond, scale if form == "standard" else scale + 1.0)


def operator_loss(predicted: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Eq. 17: ``‖M_ψ(ε_φ(x_t, t, y)) − ε‖²``, averaged over all elements (scalar).

    Args:
        predicted: ``(B, C, H, W)`` operator output ``M_ψ(·)`` (in the graph of ψ).
        noise: ``(B, C, H, W)`` the ε used to noise the latents.
    """
    if predicted.shape != noise.shape:
        raise ValueError(f"operator output shape {tuple(predicted.shape)} != noise shape {tuple(noise.shape)}")
    return F.mse_loss(predicted, noise.to(predicted.dtype))


def vdm_grad(noise_pred: torch.Tensor, operator_out: torch.Tensor, lam: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Eq. 19 (without the Jacobian ∂x/∂θ): ``ω(t) · (ε_φ(x_t, t, y) − λ_t · M_ψ(ε_φ(x_t, t, y)))``.

    Args:
        noise_pred: ``(B, C, H, W)`` the (CFG) noise prediction ε̃_φ(x_t, t, y).
        operator_out: ``(B, C, H, W)`` ``M_ψ(·)`` (detached here).
        lam, weight: ``(B, 1, 1, 1)`` (or broadcastable) λ_t and ω(t).
    Returns:
        ``(B, C, H, W)`` gradient on the clean latents, detached.
    """
    return (weight * (noise_pred - lam * operator_out.detach())).detach()


# ============================================================================ operator training
class VariationalDistributionMapping(nn.Module):
    """``M_ψ`` with its own optimizer: the trainable part of VDM (Eq. 17), kept inside the guidance.

    Args:
        model: the degradation model (:func:`build_degradation_model`).
        lr: learning rate of ψ (paper: 0.01, Sec. 4.2).
        optimizer: ``"adam"`` (default; the paper gives only the learning rate), ``"adamw"`` or ``"sgd"``.
        steps_per_iter: operator updates per guidance call (paper: 1).
    The module's ``state_dict`` holds ψ (and BatchNorm statistics); :meth:`full_state_dict` adds the
    optimizer state and the update counter, which is what checkpoints store.
    """

    def __init__(self, model: nn.Module, lr: float = DEFAULT_OPERATOR_LR, optimizer: str = "adam", steps_per_iter: int = 1):
        super().__init__()
        validate_operator_config(operator_lr=lr, operator_optimizer=optimizer, operator_steps_per_iter=steps_per_iter)
        self.model = model
        self.lr = float(lr)
        self.optimizer_name = optimizer
        self.steps_per_iter = int(steps_per_iter)
        self.num_updates = 0
        #: Eq. 17 updates skipped for a non-finite input / loss / gradient, and whether this call's was
        self.nonfinite_skips = 0
        self.last_update_skipped = False
        self.optimizer = self._make_optimizer()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = list(self.model.parameters())
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, **make_capturable(torch.optim.Adam, params, {}))
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, **make_capturable(torch.optim.AdamW, params, {}))
        return torch.optim.SGD(params, lr=self.lr)

    def forward(self, eps: torch.Tensor) -> torch.Tensor:
        """``M_ψ(eps)`` in ψ's dtype/device, returned in ``eps``'s dtype (graph to ψ kept)."""
        p = next(self.model.parameters())
        return self.model(eps.detach().to(device=p.device, dtype=p.dtype)).to(eps.dtype)

    def train_step(self, eps: torch.Tensor, noise: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Eq. 17 update(s) of ψ on a detached input.

        Runs ``steps_per_iter`` optimizer steps (stopping at the first with a non-finite input, loss or
        gradient, which is skipped: ψ, its moments and BatchNorm statistics untouched; ``last_update_skipped``
        and ``nonfinite_skips`` record it, as 0-dim device tensors, like ``num_updates``: decided on the device,
        no host read); returns ``(M_ψ(eps) of the first forward, detached; loss of the
        first forward, detached scalar)`` -- i.e. the operator output and loss with ψ *before* this call's
        update(s) (Alg. 1 forms L_op and L_VDM with the same ψ).  Gradients never reach ``eps`` (detached) or
        anything outside ψ.
        """
        # decided on the device (issue 26: no host read per step): the forward always runs in train mode; a
        # non-finite input, loss or gradient leaves ψ, its moments and the BatchNorm statistics bit-identical
        # (restored with torch.where by step_if_finite), and stops the later updates of this call
        ok_all = (torch.isfinite(eps.detach()).all() & torch.isfinite(noise).all()).reshape(())
        self.model.train()
        first_out, first_loss = None, None
        with torch.enable_grad():
            for _ in range(self.steps_per_iter):
                buffers = list(self.model.buffers())
                saved = [b.detach().clone() for b in buffers]
                out = self(eps)
                loss = operator_loss(out.float(), noise.float())
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # DDP: average over the ranks before any use of the gradient (union-batch Eq. 17; no-op in one
                # process) -- before the finite check, so every rank takes the same skip decision
                all_reduce_grads_(self.model.parameters(), part="guidance")
                if first_out is None:
                    first_out, first_loss = out.detach(), loss.detach()
                ok_all = ok_all & finite_ok(loss, [p.grad for p in self.model.parameters()]).to(ok_all.device)
                with torch.no_grad():  # BatchNorm statistics of a skipped step: back to their values before it
                    for b_, old in zip(buffers, saved):
                        b_.copy_(torch.where(ok_all, b_, old))
                step_if_finite(self.optimizer, ok_all)
                self.num_updates = self.num_updates + ok_all.long()
        self.last_update_skipped = ~ok_all
        self.nonfinite_skips = self.nonfinite_skips + (~ok_all).long()
        return first_out, first_loss

    def full_state_dict(self) -> Dict[str, object]:
        """``{"model": ψ state, "optimizer": optimizer state, "num_updates": int}`` (tensors on their devices)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "num_updates": self.num_updates,
        }

    def load_full_state_dict(self, state: Dict[str, object]) -> None:
        """Restore what :meth:`full_state_dict` returned (exactly: ψ, BN statistics, optimizer moments).

        Raises:
            RuntimeError: the stored operator does not match this one's architecture.
        """
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.num_updates = int(state.get("num_updates", 0))


# ============================================================================ one VDM step
def validate_vdm_config(
    guidance_scale: float = 7.5,
    operator_input: str = "cfg",
    cfg_form: str = "standard",
    dca_cutoff: int = DEFAULT_DCA_CUTOFF,
    weighting_strategy: str = "sds",
    num_train_timesteps: int = 1000,
    x_t_jacobian: str = "dropped",
) -> None:
    """Check the VDM settings; raises ``ValueError`` naming the setting and its allowed values."""
    if x_t_jacobian not in X_T_JACOBIANS:
        raise ValueError(f"x_t_jacobian must be one of {X_T_JACOBIANS}, got {x_t_jacobian!r}")
    if operator_input not in OPERATOR_INPUTS:
        raise ValueError(f"operator_input must be one of {OPERATOR_INPUTS}, got {operator_input!r}")
    if cfg_form not in CFG_FORMS:
        raise ValueError(f"cfg_form must be one of {CFG_FORMS}, got {cfg_form!r}")
    if weighting_strategy not in VDM_WEIGHTINGS:
        raise ValueError(f"weighting_strategy must be one of {VDM_WEIGHTINGS}, got {weighting_strategy!r}")
    if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    if not (isinstance(dca_cutoff, int) and not isinstance(dca_cutoff, bool) and 0 <= dca_cutoff <= num_train_timesteps):
        raise ValueError(f"dca_cutoff must be an integer timestep in [0, {num_train_timesteps}], got {dca_cutoff!r}")


def vdm_update(
    noise_pred: torch.Tensor,
    noise_pred_text: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    mapping: VariationalDistributionMapping,
    operator_input: str = "cfg",
    dca: bool = True,
    dca_cutoff: int = DEFAULT_DCA_CUTOFF,
    dca_inclusive: bool = True,
    weighting_strategy: str = "sds",
    train_operator: bool = True,
    refresh_after_update: bool = False,
    x_t_jacobian: str = "dropped",
) -> Dict[str, torch.Tensor]:
    """The VDM part of a step, given this step's noise predictions (Alg. 1 lines 7-13).

    ``x_t_jacobian``: Eq. 19 multiplies by ∂x_t/∂θ = sqrt(ᾱ_t) ∂x/∂θ; ``"dropped"`` (default) omits the
    sqrt(ᾱ_t), as DreamFusion's SDS and the paper's own Eq. 8-9 (∂x/∂θ) do -- it is a t-dependent scale that
    ω(t) can absorb, and keeping it would make VDM's weighting differ from the SDS it is compared with at the
    same ω; ``"sqrt_alpha_bar"`` keeps it (Eq. 19 literally).

    Args:
        noise_pred: ``(B, C, H, W)`` guided prediction ε_φ(x_t, t, y) (CFG; Eq. 19's first term).
        noise_pred_text: ``(B, C, H, W)`` conditional prediction ε_φ(x_t, t, y) (the operator's input if ``operator_input="cond"``).
        noise: ``(B, C, H, W)`` the ε used to form x_t (Eq. 17's target).
        t: ``(B,)`` integer timesteps.
        mapping: ``M_ψ`` and its optimizer; trained once (``steps_per_iter`` times) here if ``train_operator``.
    Returns:
        ``grad`` (Eq. 19, detached), ``loss_op`` (Eq. 17, ψ before the update), ``lambda_t`` ``(B,)``,
        ``weight`` ``(B,)``, ``operator_out``.
    Raises:
        ValueError: bad ``operator_input`` / ``weighting_strategy`` / timesteps.
    """
    if operator_input not in OPERATOR_INPUTS:
        raise ValueError(f"operator_input must be one of {OPERATOR_INPUTS}, got {operator_input!r}")
    noise_pred, noise_pred_text = noise_pred.detach(), noise_pred_text.detach()
    op_in = noise_pred if operator_input == "cfg" else noise_pred_text
    if train_operator:
        op_out, loss_op = mapping.train_step(op_in, noise)
        if refresh_after_update:
            with torch.no_grad():
                op_out = mapping(op_in).detach()
    else:
        with torch.no_grad():
            op_out = mapping(op_in).detach()
            loss_op = operator_loss(op_out.float(), noise.float())
    if x_t_jacobian not in X_T_JACOBIANS:
        raise ValueError(f"x_t_jacobian must be one of {X_T_JACOBIANS}, got {x_t_jacobian!r}")
    lam = dca_lambda(alphas_cumprod, t, dca_cutoff, dca, dca_inclusive, like=noise_pred)
    w = vdm_weight(alphas_cumprod, t, weighting_strategy, like=noise_pred)
    if x_t_jacobian == "sqrt_alpha_bar":
        a = alphas_cumprod.to(noise_pred.device, torch.float32)[torch.as_tensor(t, device=noise_pred.device).long().reshape(-1)]
        w = w * a.sqrt().reshape(w.shape).to(w.dtype)
    return {
        "grad": vdm_grad(noise_pred, op_out, lam, w),
        "loss_op": loss_op,
        "lambda_t": lam.reshape(-1),
        "weight": w.reshape(-1),
        "operator_out": op_out,
    }


def vdm_step(
    eps_fn: EpsFn,
    latents: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    mapping: VariationalDistributionMapping,
    guidance_scale: float = 7.5,
    operator_input: str = "cfg",
    cfg_form: str = "standard",
    dca: bool = True,
    dca_cutoff: int = DEFAULT_DCA_CUTOFF,
    dca_inclusive: bool = True,
    weighting_strategy: str = "sds",
    noise: Optional[torch.Tensor] = None,
    train_operator: bool = True,
    refresh_after_update: bool = False,
    x_t_jacobian: str = "dropped",
) -> Dict[str, torch.Tensor]:
    """One VDM + DCA step (Alg. 1 lines 5-13): noise, one CFG UNet call, operator update, θ gradient.

    Args:
        eps_fn: ``eps_fn(x (2B,C,H,W), t (2B,), emb (2B,L,E)) -> ε̂ (2B,C,H,W)``; called exactly once, with
            the conditional half first, under ``torch.no_grad()``.
        latents: ``(B, C, H, W)`` clean latents x (may require grad; only a detached copy is used).
        t: ``(B,)`` integer timesteps; cond, uncond: ``(B, L, E)`` text embeddings.
        alphas_cumprod: ``(T,)``.
        mapping: the operator with its optimizer.
        train_operator: run the Eq. 17 update (``False``: only evaluate ``M_ψ``, e.g. for validation).
        noise: ε (default ``randn_like(latents)``).
    Returns:
        :func:`vdm_update`'s dict plus ``noise``, ``noise_pred`` (CFG), ``noise_pred_text``,
        ``noise_pred_uncond``, ``timesteps``.
    Raises:
        ValueError: a bad setting (:func:`validate_vdm_config`).
    """
    validate_vdm_config(guidance_scale, operator_input, cfg_form, dca_cutoff, weighting_strategy, alphas_cumprod.shape[0], x_t_jacobian)
    latents = latents.detach()
    if noise is None:
        noise = torch.randn_like(latents)
    t = torch.as_tensor(t, device=latents.device).long().reshape(-1)
    if t.numel() == 1 and latents.shape[0] > 1:
        t = t.expand(latents.shape[0])
    with torch.no_grad():
        latents_noisy = add_noise(latents, noise, alphas_cumprod, t)
        noise_pred_text, noise_pred_uncond = (e.detach() for e in predict_cond_uncond(eps_fn, latents_noisy, t, cond, uncond))
        noise_pred = guided_noise(noise_pred_text, noise_pred_uncond, guidance_scale, cfg_form)
    out = vdm_update(noise_pred, noise_pred_text, noise, t, alphas_cumprod, mapping, operator_input, dca, dca_cutoff,
                     dca_inclusive, weighting_strategy, train_operator, refresh_after_update, x_t_jacobian)
    out.update(noise=noise, noise_pred=noise_pred, noise_pred_text=noise_pred_text, noise_pred_uncond=noise_pred_uncond, timesteps=t)
    return out
