"""LODS -- Learn to Optimize Denoising Scores (Yang et al., "Learn to Optimize Denoising Scores for 3D
Generation: A Unified and Improved Diffusion Prior on NeRF and 3D Gaussian Splatting";
../shared/papers/lods-learn-to-optimize-denoising-scores.txt, ../shared/METHODS.md section 2).
Plain torch (+ peft for the LoRA variant), no threestudio.

Notation (diffusers): ``alphas_cumprod[t]`` = ᾱ_t, integer ``t`` in ``[0, T)``; latents ``z`` ``(B, C, H, W)``;
text embeddings ``(B, L, E)``; ``s`` the CFG weight (the paper's ``w``, Eq. 2: ``ε̂ = s ε(y) + (1−s) ε(∅)``);
``w(t)`` the SDS weighting (paper / reference: ``1 − ᾱ_t``).
``eps_fn(x (N,C,H,W), t (N,) long, emb (N,L,E)) -> ε̂ (N,C,H,W)`` is the diffusion UNet.

Algorithm 1-3 (one training step, two parts):

(a) θ update with the normalised SDS whose unconditional branch is learnable, learnable part frozen:
    Eq. 7 (embedding):  ``grad = w(t)·[ ε_φ(z_t; y, t) + (1−s)/s · ε_φ(z_t; α, t) − ε/s ]``
    Eq. 9 (LoRA):       ``grad = w(t)·[ ε_φ(z_t; y, t) + (1−s)/s · ε_ψ(z_t; ∅, t) − ε/s ]``
    (:func:`normalized_sds_grad`).  With α = ∅ / ψ = 0 this is SDS divided by ``s`` (Sec. 3.4: "the same
    results as the original SDS loss by only adjusting the learning rate").
(b) update of the learnable part towards the reference SDS (Eq. 6), UNet frozen, ``z`` detached:
    Eq. 8:  ``‖ε_φ(z_t'; α, t') − ε'‖²`` w.r.t. α;   Eq. 10: ``‖ε_ψ(z_t'; ∅, t') − ε'‖²`` w.r.t. ψ
    (:func:`denoising_loss`, mean over elements as the reference code does).  The reference code draws
    ``t' ~ U{0..999}`` (``[0, 1000)``) and a fresh ``ε'``.

:class:`LODSLearner` holds the learnable part (α, or a peft LoRA adapter on the UNet's attention
projections used only on the unconditional branch), its own optimizer, and does (a)+(b) per step with
exact UNet-call accounting; it has ``state_dict`` / ``load_state_dict`` for checkpoints (only α / LoRA
tensors, the optimizer state and counters: never the frozen UNet).

UNet cost per step, B views (``calls`` / forward samples / backward samples):

=====================  ================================  ======================================
variant                separate (b), default               ``merged_forward`` (Sec. 3.7)
=====================  ================================  ======================================
embedding              2 / 3B / B  ([y;α] batched, α)       2 / 2B / B  (y no-grad, α with grad)
lora                   3 / 3B / B  (y base, ∅ LoRA, ∅ LoRA)  2 / 2B / B  (y base, ∅ LoRA with grad)
=====================  ================================  ======================================

SDS is 1 call / 2B / 0.  Separate (b) is "one additional forward and backward" (Fig. 3); merged reuses the
(a) forward of the learnable branch (same ``z_t``, ``t`` and ``ε``, so ``t'`` follows the (a) timestep
range rather than ``[0, 1000)``) and costs only one extra backward -- the paper reports a small quality
drop for it, so it is off by default.  The LoRA branch cannot be batched with the base-UNet branch (other
weights), hence one more call.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..integrity.finite import finite_ok, make_capturable, step_if_finite
from .diffusion import WEIGHTING_STRATEGIES, EpsFn, add_noise, predict_cond_uncond, sds_weight
from ..distributed import all_reduce_grads_

VARIANTS = ("embedding", "lora")
#: Paper A.1 (T3Bench, NeRF): CFG 1000 for both variants
DEFAULT_GUIDANCE_SCALE = 1000.0
#: Paper A.1: embedding lr 1e-5 (NeRF text-to-3D), LoRA lr 5e-7
DEFAULT_LR = {"embedding": 1e-5, "lora": 5e-7}
#: Paper A.1: "LoRA weight 0.5" (the reference code's ``cross_attention_kwargs={"scale": 0.5}``)
DEFAULT_LORA_SCALE = 0.5
#: The reference's diffusers ``LoRAAttnProcessor`` defaults: rank 4 on q, k, v, out of every attention layer,
#: no alpha scaling (alpha = rank) and Gaussian(0, 1/r) down-projection init, zero up-projection.
DEFAULT_LORA_RANK = 4
DEFAULT_LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
LORA_INITS = ("gaussian", "default")
#: The reference system optimizer for α / ψ: AdamW(betas=(0.9, 0.99), eps=1e-15), torch's default weight decay
DEFAULT_OPTIMIZER = "AdamW"
DEFAULT_OPTIMIZER_ARGS = {"betas": (0.9, 0.99), "eps": 1e-15, "weight_decay": 0.01}
#: Eq. 8/10 timesteps: the reference's ``randint(int(T*0.0), int(T*1.0))``, i.e. uniform on [0, T)
DEFAULT_AUX_STEP_PERCENT = (0.0, 1.0)


# ----------------------------------------------------------------------------- validation
def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_lods_options(
    variant: str = "embedding",
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    lr: Optional[float] = None,
    optimizer: str = DEFAULT_OPTIMIZER,
    aux_min_step_percent: float = DEFAULT_AUX_STEP_PERCENT[0],
    aux_max_step_percent: float = DEFAULT_AUX_STEP_PERCENT[1],
    lora_rank: int = DEFAULT_LORA_RANK,
    lora_alpha: Optional[float] = None,
    lora_scale: float = DEFAULT_LORA_SCALE,
    lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGET_MODULES,
    lora_init: str = "gaussian",
    weighting_strategy: str = "sds",
    num_train_timesteps: int = 1000,
) -> None:
    """Check LODS settings (before any model loads).

    Raises:
        ValueError: naming the setting and its allowed range -- ``variant`` not in :data:`VARIANTS`;
            ``guidance_scale`` not > 0 (``inf`` is allowed here: the 2D "CFG infinity" limit); ``lr`` not a
            finite number >= 0; ``optimizer`` not a ``torch.optim`` class; aux step percents not
            ``0 <= min < max <= 1`` or giving an empty range; LoRA (``variant="lora"`` only): ``lora_rank`` not
            an integer >= 1, ``lora_alpha`` not > 0, ``lora_scale`` not a finite number >= 0, empty
            ``lora_target_modules``, ``lora_init`` not in :data:`LORA_INITS`; unknown ``weighting_strategy``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not _is_number(guidance_scale) or math.isnan(guidance_scale) or guidance_scale <= 0:
        raise ValueError(f"guidance_scale must be a number > 0 (the paper uses 1000), got {guidance_scale!r}")
    if lr is not None and (not _is_number(lr) or not math.isfinite(lr) or lr < 0):
        raise ValueError(f"aux_lr must be a finite number >= 0 (paper: 1e-5 embedding, 5e-7 LoRA), got {lr!r}")
    if not isinstance(optimizer, str) or not isinstance(getattr(torch.optim, optimizer, None), type):
        raise ValueError(f"aux_optimizer must name a torch.optim optimizer (e.g. 'AdamW'), got {optimizer!r}")
    lo, hi = aux_min_step_percent, aux_max_step_percent
    if not (_is_number(lo) and _is_number(hi) and 0.0 <= lo < hi <= 1.0):
        raise ValueError(
            f"aux_min_step_percent / aux_max_step_percent must satisfy 0 <= min < max <= 1, got {lo!r}, {hi!r}"
        )
    if int(num_train_timesteps * lo) >= int(num_train_timesteps * hi):
        raise ValueError(f"aux step range [{lo}, {hi}) holds no integer timestep of T={num_train_timesteps}")
    if weighting_strategy not in WEIGHTING_STRATEGIES:
        raise ValueError(f"weighting_strategy must be one of {WEIGHTING_STRATEGIES}, got {weighting_strategy!r}")
    if variant == "lora":
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
            raise ValueError(f"lora_rank must be an integer >= 1, got {lora_rank!r}")
        if lora_alpha is not None and (not _is_number(lora_alpha) or not math.isfinite(lora_alpha) or lora_alpha <= 0):
            raise ValueError(f"lora_alpha must be a finite number > 0 (or null = rank), got {lora_alpha!r}")
        if not _is_number(lora_scale) or not math.isfinite(lora_scale) or lora_scale < 0:
            raise ValueError(f"lora_scale must be a finite number >= 0 (paper: 0.5), got {lora_scale!r}")
        if isinstance(lora_target_modules, str) or not lora_target_modules or not all(
            isinstance(m, str) and m for m in lora_target_modules
        ):
            raise ValueError(f"lora_target_modules must be a non-empty list of module names, got {lora_target_modules!r}")
        if lora_init not in LORA_INITS:
            raise ValueError(f"lora_init must be one of {LORA_INITS}, got {lora_init!r}")


# ----------------------------------------------------------------------------- the equations
def normalized_sds_grad(
    noise_pred_text: torch.Tensor,
    noise_pred_uncond: torch.Tensor,
    noise: torch.Tensor,
    weight: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """Eq. 7 / Eq. 9: ``w(t)·[ ε(z_t; y) + (1−s)/s · ε_learn(z_t) − ε/s ]``.

    Args:
        noise_pred_text: ``(B, C, H, W)`` ε_φ(z_t; y, t), frozen conditional branch.
        noise_pred_uncond: same shape, the learnable unconditional branch ε_φ(z_t; α, t) (Eq. 7) or
            ε_ψ(z_t; ∅, t) (Eq. 9); detached here.
        noise: the ε used to build ``z_t``.
        weight: w(t), broadcastable (``(B, 1, 1, 1)``).
        guidance_scale: ``s > 0``; ``inf`` gives the limit ``w(t)·(ε(y) − ε_learn)`` (paper's 2D setting).
    Returns:
        ``(B, C, H, W)`` gradient on the latents (no graph).
    Raises:
        ValueError: ``guidance_scale <= 0`` or NaN.
    """
    s = float(guidance_scale)
    if math.isnan(s) or s <= 0:
        raise ValueError(f"guidance_scale must be > 0, got {guidance_scale!r}")
    noise_pred_text, noise_pred_uncond, n = noise_pred_text.detach(), noise_pred_uncond.detach(), noise.detach()
    if math.isinf(s):
        return weight * (noise_pred_text - noise_pred_uncond)
    return weight * (noise_pred_text + ((1.0 - s) / s) * noise_pred_uncond - n / s)


def denoising_loss(noise_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Eq. 8 / Eq. 10: ``‖ε_learn(z_t') − ε'‖²`` as the mean over all elements (the reference's
    ``F.mse_loss(..., reduction="mean")``, in float32).  Differentiable in ``noise_pred``."""
    return F.mse_loss(noise_pred.float(), noise.detach().float(), reduction="mean")


def sample_aux_timesteps(
    batch_size: int,
    num_train_timesteps: int = 1000,
    min_step_percent: float = DEFAULT_AUX_STEP_PERCENT[0],
    max_step_percent: float = DEFAULT_AUX_STEP_PERCENT[1],
    device=None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Eq. 8/10 timesteps ``(batch_size,)`` uniform on ``[int(T·min), int(T·max))`` (half-open, as the reference)."""
    lo, hi = int(num_train_timesteps * min_step_percent), int(num_train_timesteps * max_step_percent)
    return torch.randint(lo, hi, (batch_size,), dtype=torch.long, device=device, generator=generator)


# ----------------------------------------------------------------------------- LoRA helpers
def add_lora_adapter(
    unet,
    rank: int = DEFAULT_LORA_RANK,
    alpha: Optional[float] = None,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGET_MODULES,
    scale: float = DEFAULT_LORA_SCALE,
    adapter_name: str = "lods",
    init: str = "gaussian",
) -> List[torch.nn.Parameter]:
    """Add a peft LoRA adapter (``unet.add_adapter(LoraConfig(...))``) for the learnable unconditional branch ψ.

    Effective update of a target linear layer: ``scale · (alpha / rank) · B A x`` with ``B = 0`` at init, so
    ε_ψ = ε_φ initially (Sec. 3.6).  The LoRA parameters are kept in float32 (trained with their own
    optimizer) whatever the UNet dtype; the adapter is left *disabled* -- use :func:`lora_branch`.

    Returns:
        the LoRA parameters (in a stable order).
    Raises:
        ValueError: no module of ``unet`` matches ``target_modules``.
    """
    from peft import LoraConfig

    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(rank if alpha is None else alpha),
        target_modules=list(target_modules),
        init_lora_weights=True if init == "default" else "gaussian",
        lora_dropout=0.0,
    )
    try:
        unet.add_adapter(config, adapter_name=adapter_name)
    except ValueError as e:
        raise ValueError(f"lora_target_modules {list(target_modules)} do not match the UNet: {e}") from None
    unet.set_adapters([adapter_name], weights=[float(scale)])
    params = [p for n, p in unet.named_parameters() if "lora_" in n and f".{adapter_name}." in n]
    if not params:
        raise ValueError(f"lora_target_modules {list(target_modules)} matched no LoRA-capable module of the UNet")
    for p in params:
        p.data = p.data.float()
    unet.disable_adapters()
    for p in params:
        p.requires_grad_(True)
    return params


@contextmanager
def lora_branch(unet, enabled: bool, params: Sequence[torch.nn.Parameter] = ()):
    """Run the UNet with the LoRA adapter on (ε_ψ) or off (ε_φ); restores 'off' on exit.

    peft's ``disable_adapters`` also clears ``requires_grad`` of the LoRA tensors; ``params`` are set
    trainable again on exit so that a loss built inside the block can still be differentiated (a disabled
    adapter is skipped by the forward, so this has no other effect)."""
    if enabled:
        unet.enable_adapters()
    try:
        yield unet
    finally:
        if enabled:
            unet.disable_adapters()
            for p in params:
                p.requires_grad_(True)


# ----------------------------------------------------------------------------- the learner
class LODSLearner:
    """LODS step (a)+(b) with the learnable part and its own optimizer (Algorithms 2 and 3).

    Args:
        eps_fn: ``eps_fn(x, t, emb) -> ε̂``, the diffusion UNet (frozen; gradients may flow through it).
        variant: ``"embedding"`` (learnable α, Eq. 7/8) or ``"lora"`` (ψ, Eq. 9/10).
        alphas_cumprod: ``(T,)`` ᾱ.
        guidance_scale: ``s`` of Eq. 7/9 (paper 1000).
        lr: learning rate of α / ψ (default :data:`DEFAULT_LR` per variant; 0 freezes them).
        optimizer, optimizer_args: a ``torch.optim`` class name and kwargs (default the reference's AdamW).
        aux_update: do step (b); ``False`` keeps α = ∅ / ψ = 0, i.e. normalised SDS (= SDS / s).
        merged_forward: reuse the (a) forward of the learnable branch for (b) (Sec. 3.7).
        aux_min_step_percent, aux_max_step_percent: Eq. 8/10 timesteps uniform on ``[int(T·min), int(T·max))``.
        weighting_strategy: w(t) (``"sds"`` = 1−ᾱ_t, the paper's).
        unet: the ``UNet2DConditionModel`` (LoRA variant: the adapter is added to it).
        lora_*: see :func:`add_lora_adapter`.
        batch_cond_uncond: embedding variant without merging: evaluate [y; α] in ONE batched call.

    The learnable embedding α is ``(L, E)`` float32, shared by all views, created on first use from the
    unconditional embedding passed to :meth:`step` (``uncond[0]``, the prompt processor's null / negative
    embedding) unless restored by :meth:`load_state_dict`.

    Counters: ``unet_calls``, ``unet_samples`` (forward), ``unet_backward_samples``, ``aux_steps`` (cumulative).

    Raises:
        ValueError: invalid settings (see :func:`validate_lods_options`); ``variant="lora"`` without ``unet``.
    """

    def __init__(
        self,
        eps_fn: EpsFn,
        variant: str,
        alphas_cumprod: torch.Tensor,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        lr: Optional[float] = None,
        optimizer: str = DEFAULT_OPTIMIZER,
        optimizer_args: Optional[Dict[str, Any]] = None,
        aux_update: bool = True,
        merged_forward: bool = False,
        aux_min_step_percent: float = DEFAULT_AUX_STEP_PERCENT[0],
        aux_max_step_percent: float = DEFAULT_AUX_STEP_PERCENT[1],
        weighting_strategy: str = "sds",
        unet=None,
        lora_rank: int = DEFAULT_LORA_RANK,
        lora_alpha: Optional[float] = None,
        lora_scale: float = DEFAULT_LORA_SCALE,
        lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGET_MODULES,
        lora_init: str = "gaussian",
        lora_adapter_name: str = "lods",
        batch_cond_uncond: bool = True,
    ):
        T = int(alphas_cumprod.shape[0])
        validate_lods_options(
            variant, guidance_scale, lr, optimizer, aux_min_step_percent, aux_max_step_percent,
            lora_rank, lora_alpha, lora_scale, lora_target_modules, lora_init, weighting_strategy, T,
        )
        if variant == "lora" and unet is None:
            raise ValueError("variant 'lora' needs the UNet (unet=...) to add the LoRA adapter to")
        self.eps_fn = eps_fn
        self.variant = variant
        self.alphas_cumprod = alphas_cumprod
        self.num_train_timesteps = T
        self.guidance_scale = float(guidance_scale)
        self.lr = DEFAULT_LR[variant] if lr is None else float(lr)
        self.optimizer_name = optimizer
        args = dict(DEFAULT_OPTIMIZER_ARGS if optimizer == DEFAULT_OPTIMIZER else {})
        args.update(dict(optimizer_args or {}))
        if "betas" in args:
            args["betas"] = tuple(args["betas"])
        self.optimizer_args = args
        self.aux_update = bool(aux_update)
        self.merged_forward = bool(merged_forward)
        self.aux_step_percent = (float(aux_min_step_percent), float(aux_max_step_percent))
        self.weighting_strategy = weighting_strategy
        self.batch_cond_uncond = bool(batch_cond_uncond)
        self.unet = unet
        self.lora_adapter_name = lora_adapter_name
        self.alpha: Optional[torch.nn.Parameter] = None
        self.lora_params: List[torch.nn.Parameter] = []
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.unet_calls = 0
        self.unet_samples = 0
        self.unet_backward_samples = 0
        #: Eq. 8/10 updates skipped for a non-finite loss / gradient, and whether the last one was
        self.nonfinite_skips = 0
        self.last_update_skipped = False
        self.aux_steps = 0
        if variant == "lora":
            # the adapter is switched on for the LoRA branch's call only: a checkpointed block would recompute it
            # without the adapter in the backward, so the UNet's activation checkpointing is off for this variant
            for m in unet.modules():
                if getattr(m, "_scoredistill_checkpointed", False):
                    m._scoredistill_checkpoint_off = True
            self.lora_params = add_lora_adapter(
                unet, lora_rank, lora_alpha, lora_target_modules, lora_scale, lora_adapter_name, lora_init
            )
            self._make_optimizer()

    # ------------------------------------------------------------------ parameters
    def parameters(self) -> List[torch.nn.Parameter]:
        """The learnable parameters (α, or the LoRA tensors); empty before α is initialised."""
        if self.variant == "embedding":
            return [] if self.alpha is None else [self.alpha]
        return list(self.lora_params)

    def _make_optimizer(self) -> None:
        cls = getattr(torch.optim, self.optimizer_name)
        self.optimizer = cls(self.parameters(), lr=self.lr, **make_capturable(cls, self.parameters(), self.optimizer_args))

    def initialise_alpha(self, uncond: torch.Tensor) -> None:
        """α ← the unconditional (null) embedding (Alg. 2 line 2); ``uncond`` ``(L, E)`` or ``(B, L, E)`` (first used)."""
        if uncond.dim() == 3:
            uncond = uncond[0]
        self.alpha = torch.nn.Parameter(uncond.detach().clone().float())
        self._make_optimizer()

    @property
    def initialised(self) -> bool:
        return self.variant == "lora" or self.alpha is not None

    # ------------------------------------------------------------------ the branches
    def _call(self, x, t, emb, backward: bool = False):
        self.unet_calls += 1
        self.unet_samples += x.shape[0]
        if backward:
            self.unet_backward_samples += x.shape[0]
        return self.eps_fn(x, t, emb)

    def _alpha_batch(self, B: int, like: torch.Tensor) -> torch.Tensor:
        return self.alpha.to(like.device).unsqueeze(0).expand(B, *self.alpha.shape)

    def learnable_branch(self, latents_noisy: torch.Tensor, t: torch.Tensor, uncond: torch.Tensor, backward: bool = False):
        """ε_φ(x_t; α, t) (embedding) or ε_ψ(x_t; ∅, t) (LoRA); differentiable w.r.t. α / ψ."""
        if self.variant == "embedding":
            return self._call(latents_noisy, t, self._alpha_batch(latents_noisy.shape[0], latents_noisy), backward)
        with lora_branch(self.unet, True, self.lora_params):
            return self._call(latents_noisy, t, uncond, backward)

    def predict(self, latents_noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor):
        """``(ε(x_t; y, t), ε_learn(x_t, t))`` without gradients (step (a), separate mode)."""
        B = latents_noisy.shape[0]
        with torch.no_grad():
            if self.variant == "embedding" and self.batch_cond_uncond:
                return predict_cond_uncond(self._call, latents_noisy, t, cond, self._alpha_batch(B, cond).to(cond.dtype))
            noise_pred_text = self._call(latents_noisy, t, cond)
            noise_pred_uncond = self.learnable_branch(latents_noisy, t, uncond)
            return noise_pred_text, noise_pred_uncond

    # ------------------------------------------------------------------ step (b)
    def _apply_aux_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Optimizer step of α / ψ on ``loss``, only if the loss and every gradient are finite (else skipped:
        α / ψ and the optimizer moments untouched, ``nonfinite_skips`` counted).  Returns whether it was applied,
        as a 0-dim bool tensor: the decision is taken on the device (:func:`~.finite.step_if_finite`), so the
        counters ``aux_steps`` / ``nonfinite_skips`` and ``last_update_skipped`` are 0-dim device tensors after the
        first update (read them when logging)."""
        params = self.parameters()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.to(p.dtype)
        # DDP: average over the ranks before any use of the gradient (union-batch Eq. 8/10; no-op in one process),
        # and before the finite check, so every rank takes the same skip decision (a NaN on one rank reaches all)
        all_reduce_grads_(params, part="guidance")
        ok = finite_ok(loss, [p.grad for p in params])  # decided on the device: no host read per step
        step_if_finite(self.optimizer, ok)
        self.optimizer.zero_grad(set_to_none=True)
        skipped = ~ok
        self.last_update_skipped = skipped
        self.nonfinite_skips = self.nonfinite_skips + skipped.long()
        self.aux_steps = self.aux_steps + ok.long()
        return ok

    def aux_loss(
        self,
        latents: torch.Tensor,
        uncond: torch.Tensor,
        t: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Eq. 8 / Eq. 10 loss at detached ``latents`` (``t`` default: :func:`sample_aux_timesteps`; ``noise``
        default fresh N(0, I)); differentiable w.r.t. α / ψ only."""
        z = latents.detach()
        B = z.shape[0]
        if t is None:
            t = sample_aux_timesteps(B, self.num_train_timesteps, *self.aux_step_percent, device=z.device, generator=generator)
        if noise is None:
            noise = torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=generator)
        latents_noisy = add_noise(z, noise, self.alphas_cumprod, t)
        with torch.enable_grad():
            return denoising_loss(self.learnable_branch(latents_noisy, t, uncond, backward=True), noise)

    def update(self, latents, uncond, t=None, noise=None, generator=None) -> torch.Tensor:
        """One step (b): Eq. 8/10 at detached latents, optimizer step on α / ψ.  Returns the loss value (a detached
        0-dim tensor: no host read)."""
        loss = self.aux_loss(latents, uncond, t, noise, generator)
        self._apply_aux_loss(loss)
        return loss.detach()

    # ------------------------------------------------------------------ one LODS step
    def step(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        noise: Optional[torch.Tensor] = None,
        aux_t: Optional[torch.Tensor] = None,
        aux_noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Dict[str, Any]:
        """(a) the θ gradient of Eq. 7/9 with the current α / ψ, then (b) one α / ψ update (if enabled).

        Args:
            latents: ``(B, C, H, W)`` rendered latents (only read, detached).
            t: ``(B,)`` long timesteps of (a) (the caller's [min_step, max_step] sampling).
            cond, uncond: ``(B, L, E)`` conditional and unconditional (null / negative) embeddings.
            noise: ε of (a) (default fresh).  aux_t, aux_noise: t', ε' of (b) (defaults: sampled).
        Returns:
            dict: ``grad`` ``(B, C, H, W)`` (no graph), ``noise_pred_text``, ``noise_pred_uncond``, ``latents_noisy``,
            ``aux_loss`` (detached 0-dim tensor or None), and this step's ``unet_calls`` / ``unet_samples`` /
            ``unet_backward_samples``.
        """
        c0, s0, b0 = self.unet_calls, self.unet_samples, self.unet_backward_samples
        self.last_update_skipped = False
        z = latents.detach()
        if self.variant == "embedding" and self.alpha is None:
            self.initialise_alpha(uncond)
        if noise is None:
            noise = torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=generator)
        t = torch.as_tensor(t, device=z.device).long().reshape(-1)
        if t.numel() == 1 and z.shape[0] > 1:
            t = t.expand(z.shape[0])
        latents_noisy = add_noise(z, noise, self.alphas_cumprod, t)
        aux_loss = None
        if self.aux_update and self.merged_forward:
            with torch.no_grad():
                noise_pred_text = self._call(latents_noisy, t, cond)
            with torch.enable_grad():
                noise_pred_uncond_graph = self.learnable_branch(latents_noisy, t, uncond, backward=True)
                loss = denoising_loss(noise_pred_uncond_graph, noise)
            noise_pred_uncond = noise_pred_uncond_graph.detach()
        else:
            noise_pred_text, noise_pred_uncond = self.predict(latents_noisy, t, cond, uncond)
        w = sds_weight(self.alphas_cumprod, t, self.weighting_strategy, like=z)
        grad = normalized_sds_grad(noise_pred_text, noise_pred_uncond, noise, w, self.guidance_scale)
        if self.aux_update:
            if self.merged_forward:
                self._apply_aux_loss(loss)
                aux_loss = loss.detach()
            else:
                aux_loss = self.update(z, uncond, aux_t, aux_noise, generator)
        return {
            "grad": grad,
            "noise_pred_text": noise_pred_text.detach(),
            "noise_pred_uncond": noise_pred_uncond.detach(),
            "latents_noisy": latents_noisy.detach(),
            "aux_loss": aux_loss,
            "unet_calls": self.unet_calls - c0,
            "unet_samples": self.unet_samples - s0,
            "unet_backward_samples": self.unet_backward_samples - b0,
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, to_cpu: bool = True) -> Dict[str, Any]:
        """α / LoRA tensors (CPU copies; ``to_cpu=False``: copies on their device), optimizer state and counters
        -- no frozen UNet weights.  Loadable with ``torch.load(..., weights_only=True)``."""
        copy = (lambda t: t.detach().cpu().clone()) if to_cpu else (lambda t: t.detach().clone())
        return {
            "variant": self.variant,
            "alpha": None if self.alpha is None else copy(self.alpha),
            "lora": [copy(p) for p in self.lora_params],
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "aux_steps": int(self.aux_steps) if to_cpu else self.aux_steps,
            "unet_calls": self.unet_calls,
            "unet_samples": self.unet_samples,
            "unet_backward_samples": self.unet_backward_samples,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore exactly what :meth:`state_dict` saved.

        Raises:
            ValueError: the state is of another variant, or LoRA tensors do not match this adapter.
        """
        if state.get("variant") != self.variant:
            raise ValueError(f"LODS state is for variant {state.get('variant')!r}, this guidance is {self.variant!r}")
        if self.variant == "embedding":
            if state.get("alpha") is None:
                self.alpha, self.optimizer = None, None
            else:
                device = self.alphas_cumprod.device
                self.alpha = torch.nn.Parameter(state["alpha"].detach().clone().float().to(device))
                self._make_optimizer()
        else:
            saved = state.get("lora") or []
            if len(saved) != len(self.lora_params) or any(a.shape != p.shape for a, p in zip(saved, self.lora_params)):
                raise ValueError("LODS LoRA state does not match this LoRA adapter (rank / target modules differ)")
            with torch.no_grad():
                for p, v in zip(self.lora_params, saved):
                    p.copy_(v.to(p.device, p.dtype))
        if state.get("optimizer") is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.aux_steps = int(state.get("aux_steps", 0))
        self.unet_calls = int(state.get("unet_calls", 0))
        self.unet_samples = int(state.get("unet_samples", 0))
        self.unet_backward_samples = int(state.get("unet_backward_samples", 0))
