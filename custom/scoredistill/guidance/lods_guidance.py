"""threestudio guidance ``lods-guidance``: LODS (Learn to Optimize Denoising Scores), ``variant: embedding | lora``.

Thin adapter over :class:`scoredistill.maths.lods.LODSLearner` (the maths: Eq. 7-10) on the pack's shared
:class:`scoredistill.guidance.base.ScoreDistillationGuidance` (SD loading, text embeddings, timesteps,
``loss_sds``).  Per call (``B`` views):

(a) ``t ~ U[min_step, max_step]`` (max annealed 0.98 → 0.5 at step 5000 by default), ``grad`` of Eq. 7
    (embedding α) or Eq. 9 (LoRA ψ on the unconditional branch), weighted by ``w(t) = 1 − ᾱ_t``; returned as
    ``loss_sds`` (``d loss_sds / d latents = grad / B``) so ``lambda_sds`` of any threestudio system applies;
(b) one update of α / ψ on Eq. 8 / Eq. 10 with the guidance's OWN optimizer (``aux_optimizer``, ``aux_lr``;
    paper: 1e-5 embedding, 5e-7 LoRA), latents detached, ``t' ~ U[0, 1000)``.  α / ψ never receive a
    gradient from the system's loss and are not in the system's optimizer, so the guidance works unchanged
    in ``dreamfusion-system``, the pack's ``gsplat-system`` or any other system.

An Eq. 8/10 update with a non-finite loss or gradient is skipped (α / ψ and moments untouched; logged as
``lods_aux_nonfinite_skips``) and makes the system's step skipped too (:mod:`scoredistill.integrity.finite`).

Logged (not losses): ``lods_aux_loss`` (Eq. 8/10 value), ``lods_aux_steps``, and this call's UNet cost
``lods_unet_calls`` / ``lods_unet_samples`` / ``lods_unet_backward_samples``.

Checkpoints
-----------
α / ψ and their optimizer state (:meth:`LODSGuidance.guidance_state_dict`; never the frozen SD weights) are
saved in every Lightning checkpoint under ``checkpoint["scoredistill_guidance_states"]["lods-guidance"]`` and
restored on resume, with any system (``dreamfusion-system``, the pack's ``gsplat-system``) unmodified -- the
pack's one mechanism, :mod:`scoredistill.integrity` through
:class:`scoredistill.guidance.base.CheckpointedScoreDistillationGuidance` (``auto_attach: true``: with the run
integrity the system attaches, or, for a system that makes no call, attached to its holder at the first update
step; or explicitly ``guidance.attach_checkpointing(system)``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

import threestudio
from threestudio.utils.misc import config_to_primitive

from .._registry import register
from ..distributed import broadcast_
from .base import CheckpointedScoreDistillationGuidance
from ..integrity.checkpointing import CHECKPOINT_KEY
from ..integrity.finite import clone_state
from ..maths.lods import (
    DEFAULT_AUX_STEP_PERCENT,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_LORA_RANK,
    DEFAULT_LORA_SCALE,
    DEFAULT_LORA_TARGET_MODULES,
    LODSLearner,
    validate_lods_options,
)

__all__ = ["CHECKPOINT_KEY", "LODSGuidance"]


@register("lods-guidance")
class LODSGuidance(CheckpointedScoreDistillationGuidance):
    """LODS guidance (paper Algorithms 2 and 3); see the module docstring and ``docs/lods.md``."""

    checkpoint_state_key = "lods-guidance"
    #: ``guidance_scale: .inf`` is the paper's 2D setting (A.1, "CFG infinity"): Eq. 7/9 in the limit
    #: ``w(t)·(ε(y) − ε_learn)`` (:func:`scoredistill.maths.lods.normalized_sds_grad`); this guidance never
    #: uses the base's CFG combination, so the base's finite-scale check is relaxed for it
    allows_infinite_guidance_scale = True

    @dataclass
    class Config(CheckpointedScoreDistillationGuidance.Config):
        #: s of Eq. 7/9 (paper A.1: 1000 for NeRF text-to-3D; image-to-3D 100; 2D: infinity, ``.inf`` in YAML,
        #: ``inf`` on the command line); must be > 0
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE
        #: reference schedule: 0.98 until step 5000, then 0.5 (threestudio C() list)
        max_step_percent: Any = field(default_factory=lambda: [5000, 0.98, 0.5, 5001])
        #: "embedding" (learnable unconditional embedding α, Eq. 7-8) | "lora" (LoRA ψ, Eq. 9-10)
        variant: str = "embedding"
        #: step (b); false = normalised SDS (Eq. 7 with α = ∅), i.e. SDS / s
        aux_update: bool = True
        #: learning rate of α / ψ; null = paper default per variant (1e-5 embedding, 5e-7 LoRA)
        aux_lr: Optional[float] = None
        #: torch.optim class and kwargs of α / ψ (reference: the system's AdamW, betas (0.9, 0.99), eps 1e-15)
        aux_optimizer: str = "AdamW"
        aux_optimizer_args: dict = field(
            default_factory=lambda: {"betas": [0.9, 0.99], "eps": 1.0e-15, "weight_decay": 0.01}
        )
        #: Eq. 8/10 timesteps uniform on [int(T·min), int(T·max)) (reference: [0, 1000))
        aux_min_step_percent: float = DEFAULT_AUX_STEP_PERCENT[0]
        aux_max_step_percent: float = DEFAULT_AUX_STEP_PERCENT[1]
        #: reuse step (a)'s learnable-branch forward for (b): one extra backward only (Sec. 3.7)
        merged_forward: bool = False
        #: LoRA variant: rank, alpha (null = rank, i.e. no extra scaling), scale ("LoRA weight", paper 0.5),
        #: target modules (attention projections), init ("gaussian" A ~ N(0, 1/r) as diffusers' LoRA layers |
        #: "default": peft's Kaiming init); B = 0 either way, so ψ starts as the frozen UNet
        lora_rank: int = DEFAULT_LORA_RANK
        lora_alpha: Optional[float] = None
        lora_scale: float = DEFAULT_LORA_SCALE
        lora_target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGET_MODULES))
        lora_init: str = "gaussian"

    cfg: Config

    # ------------------------------------------------------------------ configuration
    def validate_config(self) -> None:
        super().validate_config()
        c = self.cfg
        args = c.aux_optimizer_args
        if not hasattr(args, "keys"):
            raise ValueError(f"aux_optimizer_args must be a mapping of optimizer kwargs, got {args!r}")
        validate_lods_options(**self._lods_options())

    def _lods_options(self) -> Dict[str, Any]:
        """The config values shared by :func:`validate_lods_options` and :class:`LODSLearner`."""
        c = self.cfg
        return dict(
            variant=c.variant,
            guidance_scale=c.guidance_scale,
            lr=c.aux_lr,
            optimizer=c.aux_optimizer,
            aux_min_step_percent=c.aux_min_step_percent,
            aux_max_step_percent=c.aux_max_step_percent,
            lora_rank=c.lora_rank,
            lora_alpha=c.lora_alpha,
            lora_scale=c.lora_scale,
            lora_target_modules=list(c.lora_target_modules),
            lora_init=c.lora_init,
            weighting_strategy=c.weighting_strategy,
        )

    def configure(self) -> None:
        super().configure()
        c = self.cfg
        self.learner = LODSLearner(
            self.forward_unet,
            alphas_cumprod=self.alphas_cumprod,
            optimizer_args=config_to_primitive(c.aux_optimizer_args),
            aux_update=c.aux_update,
            merged_forward=c.merged_forward,
            unet=self.unet,
            **self._lods_options(),
        )
        # DDP: every rank starts from rank 0's α / LoRA ψ (the LoRA A init is random, seeded seed + rank);
        # LODSLearner averages their gradients over the ranks before each step (scoredistill.distributed)
        broadcast_(self.learner.parameters(), part="guidance_init")
        threestudio.info(
            f"LODS ({c.variant}): s={c.guidance_scale}, aux lr={self.learner.lr}, "
            f"{'merged' if c.merged_forward else 'separate'} Eq. {'8' if c.variant == 'embedding' else '10'} step"
        )

    # ------------------------------------------------------------------ the guidance
    def compute_grad(self, latents, prompt_utils, elevation, azimuth, camera_distances, **kwargs) -> Dict[str, Any]:
        """Eq. 7 / Eq. 9 gradient for θ, then one Eq. 8 / Eq. 10 step of α / ψ (see module docstring)."""
        cond, uncond = self.get_text_embeddings(prompt_utils, elevation, azimuth, camera_distances)
        t = self.sample_timesteps(latents.shape[0])
        out = self.learner.step(latents, t, cond.to(latents.dtype), uncond.to(latents.dtype))
        logs = {
            "grad": out["grad"],
            "lods_aux_steps": self.learner.aux_steps,
            "lods_unet_calls": out["unet_calls"],
            "lods_unet_samples": out["unet_samples"],
            "lods_unet_backward_samples": out["unet_backward_samples"],
        }
        if out["aux_loss"] is not None:
            logs["lods_aux_loss"] = out["aux_loss"]
        logs["lods_aux_nonfinite_skips"] = self.learner.nonfinite_skips
        guard = self.finite_guard
        if guard is not None:
            # lazy 0-dim tensor (read at the guard's one decision): the whole step is skipped and α / ψ rolled back
            guard.flag("LODS α/ψ update (Eq. 8/10)", self.learner.last_update_skipped)
        return logs

    # ------------------------------------------------------------------ state
    def parameters(self) -> List[torch.nn.Parameter]:
        """α or the LoRA tensors (trained by the guidance's own optimizer)."""
        return self.learner.parameters()

    def guidance_state_dict(self) -> Dict[str, Any]:
        """α / LoRA tensors, their optimizer state and counters (no frozen SD weights)."""
        return self.learner.state_dict()

    def rollback_state(self) -> Dict[str, Any]:
        """Copy of α / ψ, moments and counters on their device (no host copy per step) for the finite-step rollback."""
        return clone_state(self.learner.state_dict(to_cpu=False))

    def restore_rollback_state(self, state: Dict[str, Any]) -> None:
        self.learner.load_state_dict(state)

    def load_guidance_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`guidance_state_dict` output. Raises ``ValueError`` on a variant / LoRA-shape mismatch."""
        self.learner.load_state_dict(state)
        threestudio.info(f"lods-guidance: restored {self.cfg.variant} state (aux step {self.learner.aux_steps})")
