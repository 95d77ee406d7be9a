"""threestudio guidance ``vdm-guidance``: DreamMapping's variational distribution mapping (VDM) with
distribution coefficient annealing (DCA).

Thin adapter over :mod:`scoredistill.maths.vdm` (the maths: Eq. 17-19, the operator ``M_ψ``) on the pack's
shared :class:`scoredistill.guidance.base.ScoreDistillationGuidance` (SD loading, text embeddings, timesteps,
``loss_sds``).  Per call with ``B`` views (Alg. 1):

1. ``t ~ U[min_step, max_step]`` (default ``[0, 999]``: the paper's ``t ~ U(0, 1000)``), ``ε ~ N(0, I)``,
   ``x_t = sqrt(ᾱ_t) x + sqrt(1−ᾱ_t) ε``;
2. ONE UNet call of batch ``2B`` (conditional + unconditional; ``4B`` with the prompt processor's Perp-Neg)
   under ``torch.no_grad`` -- no backward through the diffusion UNet, ever;
3. one Eq. 17 update of ``M_ψ`` on the detached prediction by the guidance's own optimizer (lr 0.01);
4. ``grad = ω(t)(ε̃ − λ_t M_ψ(ε_in))`` (Eq. 19 with DCA Eq. 18), returned as ``loss_sds``
   (``d loss_sds / d latents = grad / B``), so ``lambda_sds`` of any threestudio system applies.

An Eq. 17 update with a non-finite input, loss or gradient is skipped (ψ, moments and BatchNorm statistics
untouched; logged as ``vdm_operator_nonfinite_skips``) and makes the system's step skipped too
(:mod:`scoredistill.integrity.finite`).

Logged (not losses): ``vdm_operator_loss`` (Eq. 17 before the update), ``vdm_operator_updates``,
``vdm_lambda`` (mean λ_t), ``vdm_timestep`` (mean t), ``vdm_unet_calls`` / ``vdm_unet_samples`` (this call).

Checkpoints: ``M_ψ`` (and its Adam moments) are saved in every Lightning checkpoint under
``checkpoint["scoredistill_guidance_states"]["vdm-guidance"]`` and restored on resume, with any system
(``dreamfusion-system``, the pack's ``gsplat-system``) unmodified -- the pack's one mechanism,
:mod:`scoredistill.integrity` through
:class:`scoredistill.guidance.base.CheckpointedScoreDistillationGuidance`; see ``docs/vdm.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

import threestudio

from .._registry import register
from ..distributed import broadcast_, convert_batchnorm, is_distributed, module_state_tensors
from ..maths.diffusion import add_noise
from .base import CheckpointedScoreDistillationGuidance
from ..maths.vdm import (
    DEFAULT_DCA_CUTOFF,
    DEFAULT_OPERATOR_LR,
    DEFAULT_ULITE_WIDTHS,
    VDM_WEIGHTINGS,
    VariationalDistributionMapping,
    build_degradation_model,
    validate_operator_config,
    validate_vdm_config,
    vdm_update,
)

__all__ = ["VDMGuidance"]


@register("vdm-guidance")
class VDMGuidance(CheckpointedScoreDistillationGuidance):
    """DreamMapping VDM + DCA guidance; see the module docstring and ``docs/vdm.md``."""

    checkpoint_state_key = "vdm-guidance"
    weighting_strategies = VDM_WEIGHTINGS

    @dataclass
    class Config(CheckpointedScoreDistillationGuidance.Config):
        #: CFG scale (paper: 7.5); see cfg_form for the convention
        guidance_scale: float = 7.5
        #: "standard": ε(∅) + s(ε(y) − ε(∅)) | "paper": the paper's Eq. 4, ε(y) + s(ε(y) − ε(∅))
        cfg_form: str = "standard"
        #: t ~ U(0, 1000) (Alg. 1 line 5): [int(1000·0), min(int(1000·1), 999)] = [0, 999]
        min_step_percent: Any = 0.0
        max_step_percent: Any = 1.0
        #: ω(t): "sds" (1−ᾱ_t) | "uniform" | "fantasia3d" | "luciddreamer" (sqrt((1−ᾱ_t)/ᾱ_t))
        weighting_strategy: str = "sds"
        #: M_ψ's input: "cfg" (the guided prediction, as in Eq. 17/19) | "cond" (the conditional prediction)
        operator_input: str = "cfg"
        #: "ulite" (the paper's non-linear U-Net) | "linear" (ablation: a learnable latent-shaped tensor)
        operator_type: str = "ulite"
        #: ablation: learnable observation noise n added to the operator output (Eq. 12)
        learnable_noise: bool = False
        #: optimizer of ψ (paper: lr 0.01; optimizer unspecified, Adam by default)
        operator_lr: float = DEFAULT_OPERATOR_LR
        operator_optimizer: str = "adam"
        operator_steps_per_iter: int = 1
        #: U-Net channels per level (5 down-samplings by default, 879,252 parameters) and axial kernel
        operator_widths: List[int] = field(default_factory=lambda: list(DEFAULT_ULITE_WIDTHS))
        operator_kernel_size: int = 7
        #: add the input to the U-Net's output (not in the paper)
        operator_residual: bool = False
        #: latent H = W for the linear operator / learnable noise (null: image_size / VAE factor)
        operator_latent_size: Optional[int] = None
        #: re-evaluate M_ψ after its update for the θ gradient (Alg. 1 uses ψ before the update: false)
        refresh_operator_after_update: bool = False
        #: DCA (Eq. 18): λ_t = 1−ᾱ_t for t <= dca_cutoff (t < dca_cutoff if not dca_inclusive, Alg. 1), else 1
        dca: bool = True
        dca_cutoff: int = DEFAULT_DCA_CUTOFF
        dca_inclusive: bool = True
        #: Eq. 19's ∂x_t/∂θ = sqrt(ᾱ_t)·∂x/∂θ: "dropped" (SDS practice, the paper's Eq. 8-9) | "sqrt_alpha_bar"
        x_t_jacobian: str = "dropped"

    cfg: Config

    # ------------------------------------------------------------------ configuration
    def validate_config(self) -> None:
        super().validate_config()
        c = self.cfg
        validate_vdm_config(
            c.guidance_scale, c.operator_input, c.cfg_form, c.dca_cutoff, c.weighting_strategy, x_t_jacobian=c.x_t_jacobian
        )
        validate_operator_config(
            operator_type=c.operator_type,
            operator_lr=c.operator_lr,
            operator_optimizer=c.operator_optimizer,
            operator_widths=list(c.operator_widths),
            operator_kernel_size=c.operator_kernel_size,
            operator_steps_per_iter=c.operator_steps_per_iter,
            learnable_noise=c.learnable_noise,
        )
        if c.operator_latent_size is not None and (
            isinstance(c.operator_latent_size, bool) or not isinstance(c.operator_latent_size, int) or c.operator_latent_size < 1
        ):
            raise ValueError(f"operator_latent_size must be a positive integer or null, got {c.operator_latent_size!r}")

    def configure(self) -> None:
        super().configure()
        c = self.cfg
        size = c.operator_latent_size or self.latent_size
        channels = int(self.unet.config.in_channels)
        model = build_degradation_model(
            c.operator_type,
            (channels, size, size),
            learnable_noise=c.learnable_noise,
            widths=list(c.operator_widths),
            kernel_size=c.operator_kernel_size,
            residual=c.operator_residual,
        ).to(self.device)
        # DDP: BatchNorm with the union batch's statistics, ψ from rank 0 (its init is seeded seed + rank);
        # VariationalDistributionMapping averages ψ's gradients over the ranks (scoredistill.distributed)
        if is_distributed():
            convert_batchnorm(model)
        broadcast_(module_state_tensors(model), part="guidance_init")
        self.mapping = VariationalDistributionMapping(
            model, lr=c.operator_lr, optimizer=c.operator_optimizer, steps_per_iter=c.operator_steps_per_iter
        )
        n_params = sum(p.numel() for p in model.parameters())
        threestudio.info(
            f"VDM: operator {c.operator_type}{' + learnable noise' if c.learnable_noise else ''} "
            f"({n_params:,} parameters, input {c.operator_input}, lr {c.operator_lr}), CFG {c.guidance_scale}, "
            f"DCA {'cut-off ' + str(c.dca_cutoff) if c.dca else 'off'}"
        )

    # ------------------------------------------------------------------ the guidance
    def compute_grad(self, latents, prompt_utils, elevation, azimuth, camera_distances, **kwargs) -> Dict[str, Any]:
        """Eq. 19 gradient with DCA, after one Eq. 17 update of ``M_ψ`` (see the module docstring)."""
        c = self.cfg
        B = latents.shape[0]
        calls0, samples0 = self.unet_calls, self.unet_samples
        latents = latents.detach()
        t = self.sample_timesteps(B)
        noise = torch.randn_like(latents)
        scale = c.guidance_scale if c.cfg_form == "standard" else c.guidance_scale + 1.0
        with torch.no_grad():
            latents_noisy = add_noise(latents, noise, self.alphas_cumprod, t)
            pred = self.predict_noise_cfg(latents_noisy, t, prompt_utils, elevation, azimuth, camera_distances, guidance_scale=scale)
        out = vdm_update(
            pred["noise_pred"],
            pred["noise_pred_text"],
            noise,
            t,
            self.alphas_cumprod,
            self.mapping,
            operator_input=c.operator_input,
            dca=c.dca,
            dca_cutoff=c.dca_cutoff,
            dca_inclusive=c.dca_inclusive,
            weighting_strategy=c.weighting_strategy,
            train_operator=True,
            refresh_after_update=c.refresh_operator_after_update,
            x_t_jacobian=c.x_t_jacobian,
        )
        guard = self.finite_guard
        if guard is not None:  # lazy 0-dim tensor, read at the guard's one decision: the step is skipped, M_ψ rolled back
            guard.flag("VDM operator update (Eq. 17)", self.mapping.last_update_skipped)
        return {
            "grad": out["grad"],
            "vdm_operator_nonfinite_skips": self.mapping.nonfinite_skips,
            "vdm_operator_loss": out["loss_op"],
            "vdm_operator_updates": self.mapping.num_updates,
            "vdm_lambda": out["lambda_t"].mean(),
            "vdm_timestep": t.float().mean(),
            "vdm_unet_calls": self.unet_calls - calls0,
            "vdm_unet_samples": self.unet_samples - samples0,
        }

    # ------------------------------------------------------------------ state
    def parameters(self) -> List[torch.nn.Parameter]:
        """ψ (trained by the guidance's own optimizer; not part of any system optimizer)."""
        return list(self.mapping.model.parameters())

    def guidance_state_dict(self) -> Dict[str, Any]:
        """ψ, its optimizer state and update count, plus the operator settings (checked on load)."""
        c = self.cfg
        return {
            "operator_type": c.operator_type,
            "learnable_noise": c.learnable_noise,
            "mapping": self.mapping.full_state_dict(),
        }

    def restore_rollback_state(self, state: Dict[str, Any]) -> None:
        """Finite-step rollback (the copy of :meth:`guidance_state_dict` taken at this step's first call)."""
        self.mapping.load_full_state_dict(state["mapping"])

    def load_guidance_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`guidance_state_dict` output exactly.

        Raises:
            ValueError: the checkpoint's operator_type / learnable_noise differ from this config.
        """
        c = self.cfg
        for key in ("operator_type", "learnable_noise"):
            if state.get(key) != getattr(c, key):
                raise ValueError(
                    f"vdm-guidance: checkpoint has {key}={state.get(key)!r} but the config has {getattr(c, key)!r}"
                )
        self.mapping.load_full_state_dict(state["mapping"])
        threestudio.info(f"vdm-guidance: operator restored ({self.mapping.num_updates} updates)")
