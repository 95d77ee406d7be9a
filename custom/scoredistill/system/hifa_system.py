"""``hifa-system``: HiFA's complete single-stage recipe (Zhu et al., ICLR 2024) as a threestudio system.

Total loss (Eq. 9 plus the disparity term of A.1)::

    L = λ_sds·loss_sds + λ_sds_img·loss_sds_img          (SDS+, Eq. 4: latent + λ_rgb image residual)
      + λ_z_variance·L_zvar                               (Eq. 6-8)
      + λ_disparity(t)·L_disparity                        (DPT disparity, least-squares fit or Pearson)
      + threestudio's sparsity / opaque / orient terms    (λ = 0 switches any of them off)

* **SDS+** comes from the guidance: every ``loss_*`` it returns is weighted by ``system.loss.lambda_*``.
  ``hifa-guidance`` returns ``loss_sds`` and ``loss_sds_img``; threestudio's ``stable-diffusion-guidance``
  returns both when ``use_img_loss`` is on (this system switches it on unless ``sds_plus_image_term: false``);
  the pack's other guidances (``ge3d-guidance``, ``lods-guidance``, ...) return ``loss_sds`` only, and the
  recipe then runs with the latent term (a warning says so once).
* **Timestep annealing** (Eq. 5): each step the system sets the guidance's ``min_step = max_step = t`` with
  ``t = t_max - (t_max - t_min)·p(step)``, ``p`` = sqrt / linear / cosine / random
  (``timestep_annealing``; ``none`` leaves the guidance's own sampling alone).  Works with every guidance
  exposing threestudio's ``min_step``/``max_step`` attributes.
* **z-variance** from the renderer's ``z_variance_unmasked`` (``kernel-smoothed-volume-renderer``) or masked
  ``z_variance`` (threestudio's ``nerf-volume-renderer``, thresholds >= 0.5 only) and ``opacity``, the mask
  δ_r = 1[opacity > z_variance_opacity_threshold] applied once (:meth:`HiFASystem.z_variance_term`), reduction
  ``z_variance_reduction`` (``configs/hifa.yaml``: ``sum``, the reference code's).
* **Disparity**: ``transformers.DPTForDepthEstimation.from_pretrained(disparity_model_name_or_path)`` predicts
  relative disparity from the (detached) render; the input follows the checkpoint's own processor
  (``DPTImageProcessor.from_pretrained``: size, resample, keep_aspect_ratio, ensure_multiple_of, mean/std),
  applied in torch (:func:`scoredistill.maths.hifa.dpt_preprocess`); the rendered disparity ``opacity / depth``
  is fitted on pixels with opacity > 0.5 (:func:`scoredistill.maths.hifa.disparity_fit_loss`, per-image
  ``mean``, ``sum`` or ``reference`` (mean · 256² · 0.05/2) of the squared residual by ``disparity_reduction``,
  or the Pearson variant); ``λ_d`` follows ``disparity_schedule`` (``anneal``: ``λ_d (1 - p)``, reference
  default).
* Relative strengths: ``configs/hifa.yaml`` sets those of HiFA's reference code (constant SDS weight, sums);
  the literal reading is a set of overrides (``docs/hifa.md``, "Regulariser strengths").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
import torch.nn.functional as F

import threestudio
from threestudio.systems.base import BaseLift3DSystem
from threestudio.systems.dreamfusion import DreamFusion
from threestudio.utils.misc import config_to_primitive
from threestudio.utils.ops import binary_cross_entropy, dot

from .._registry import register
from ..sync import log_host
from ..settings import check_range
from ..validation import defer_config_snapshot, validate_system_settings
from ..integrity import DEFAULT_MAX_NONFINITE_SKIPS, RunIntegrityMixin
from ..maths.hifa import (
    ANNEALING_SCHEDULES,
    DISPARITY_LOSSES,
    DISPARITY_REDUCTIONS,
    DISPARITY_SCHEDULES,
    ZVAR_REDUCTIONS,
    annealed_timestep,
    annealing_fraction,
    disparity_fit_loss,
    disparity_lambda,
    disparity_pearson_loss,
    dpt_preprocess,
    dpt_processor_settings,
    z_variance_loss_from_maps,
)

#: guidances whose outputs include the SDS+ image term
IMAGE_TERM_GUIDANCES = ("hifa-guidance", "stable-diffusion-guidance")


def _uses(value: Any) -> bool:
    """True if a threestudio loss weight (a number or a C() schedule list) is ever non-zero."""
    try:
        value = config_to_primitive(value)
    except Exception:
        pass
    if isinstance(value, (list, tuple)):
        values = value[1:3] if len(value) == 4 else value[0:2]  # [start_step,] start_value, end_value, end_step
        return any(float(v) != 0 for v in values)
    return float(value) != 0


@register("hifa-system")
class HiFASystem(RunIntegrityMixin, DreamFusion):
    @dataclass
    class Config(DreamFusion.Config):
        #: Eq. 5 "sqrt" | "linear" | "cosine" | "random" | "none" (leave the guidance's own timesteps)
        timestep_annealing: str = "sqrt"
        #: t_min, t_max of Eq. 5 as fractions of T (reference code: 0.3, 0.98)
        anneal_min_step_percent: float = 0.3
        anneal_max_step_percent: float = 0.98
        #: t range of the ``random`` ablation (Fig. 7: "the random sampling adopted in prior works", i.e.
        #: DreamFusion's t ~ U[0.02 T, 0.98 T]; HiFA's reference code: ``t = 20 + 960 U``)
        random_step_percent_range: List[float] = field(default_factory=lambda: [0.02, 0.98])
        #: total_iter of Eq. 5 (set to ${trainer.max_steps})
        anneal_total_steps: int = 10000
        #: switch threestudio's stable-diffusion-guidance image-space term (use_img_loss) on
        sds_plus_image_term: bool = True
        #: Eq. 8 reduction: "mean" (E_r[δ_r σ²], as written) | "masked_mean" (threestudio) | "sum" (reference code)
        z_variance_reduction: str = "mean"
        z_variance_opacity_threshold: float = 0.5
        #: DPT checkpoint (hub id or folder) for the disparity regulariser; loaded only if lambda_disparity != 0
        disparity_model_name_or_path: str = "Intel/dpt-hybrid-midas"
        #: "fit" (least-squares scale on normalised disparity) | "pearson"
        disparity_loss: str = "fit"
        #: "fit" residual per image: "mean" over the masked pixels | "sum" | "reference" (mean · 256² · 0.05/2,
        #: the reference code's; hifa.yaml)
        disparity_reduction: str = "mean"
        #: "anneal" (λ_d (1-p)) | "constant" | "quadratic" (4 λ_d p (1-p)); p = the annealing progress
        disparity_schedule: str = "anneal"
        disparity_opacity_threshold: float = 0.5
        #: DPT input size; None = from the checkpoint's preprocessor_config.json / config.image_size
        disparity_image_size: Optional[int] = None
        #: consecutive skipped (non-finite) optimizer steps that stop the run (scoredistill.integrity.finite)
        max_nonfinite_skips: int = DEFAULT_MAX_NONFINITE_SKIPS

    cfg: Config

    # ------------------------------------------------------------------ configuration
    def validate_hifa_config(self) -> None:
        cfg = self.cfg
        if cfg.timestep_annealing not in ANNEALING_SCHEDULES + ("none",):
            raise ValueError(
                f"system.timestep_annealing must be one of {ANNEALING_SCHEDULES + ('none',)}, got {cfg.timestep_annealing!r}"
            )
        lo, hi = cfg.anneal_min_step_percent, cfg.anneal_max_step_percent
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(
                f"system.anneal_min_step_percent / anneal_max_step_percent must satisfy 0 <= min <= max <= 1, got {lo}, {hi}"
            )
        rr = list(cfg.random_step_percent_range)
        if len(rr) != 2 or not (0.0 <= rr[0] <= rr[1] <= 1.0):
            raise ValueError(
                f"system.random_step_percent_range must be [min, max] with 0 <= min <= max <= 1, got {rr}"
            )
        check_range(cfg.anneal_total_steps, "system.anneal_total_steps", 1, integer=True)
        if cfg.z_variance_reduction not in ZVAR_REDUCTIONS:
            raise ValueError(f"system.z_variance_reduction must be one of {ZVAR_REDUCTIONS}, got {cfg.z_variance_reduction!r}")
        if cfg.disparity_loss not in DISPARITY_LOSSES:
            raise ValueError(f"system.disparity_loss must be one of {DISPARITY_LOSSES}, got {cfg.disparity_loss!r}")
        if cfg.disparity_reduction not in DISPARITY_REDUCTIONS:
            raise ValueError(
                f"system.disparity_reduction must be one of {DISPARITY_REDUCTIONS}, got {cfg.disparity_reduction!r}"
            )
        if cfg.disparity_schedule not in DISPARITY_SCHEDULES:
            raise ValueError(f"system.disparity_schedule must be one of {DISPARITY_SCHEDULES}, got {cfg.disparity_schedule!r}")
        for name in ("z_variance_opacity_threshold", "disparity_opacity_threshold"):
            check_range(getattr(cfg, name), f"system.{name}", 0, 1, open_high=True)
        check_range(cfg.disparity_image_size, "system.disparity_image_size", 8, integer=True, optional=True)

    def configure(self) -> None:
        self.validate_hifa_config()
        # prompt, guidance (as this system will build it), geometry, renderer settings before anything loads
        validate_system_settings(
            self, guidance_cfg=self.guidance_config(self.cfg.guidance_type, self.cfg.guidance, self.cfg.sds_plus_image_term)
        )
        self.attach_run_integrity(self.cfg.max_nonfinite_skips, "system.max_nonfinite_skips")
        super().configure()
        self._warned_no_img = False

    def setup(self, stage: Optional[str] = None) -> None:
        defer_config_snapshot(getattr(self, "_trainer", None))  # a failed start keeps an existing trial's configs

    def on_fit_start(self) -> None:
        BaseLift3DSystem.on_fit_start(self)
        self.prompt_processor = threestudio.find(self.cfg.prompt_processor_type)(self.cfg.prompt_processor)
        guidance_cfg = self.guidance_config(self.cfg.guidance_type, self.cfg.guidance, self.cfg.sds_plus_image_term)
        self.guidance = threestudio.find(self.cfg.guidance_type)(guidance_cfg)
        self.run_integrity.add_guidance(self.guidance)
        if self.cfg.timestep_annealing != "none":
            for attr in ("min_step", "max_step", "num_train_timesteps"):
                if not hasattr(self.guidance, attr):
                    raise ValueError(
                        f"system.timestep_annealing={self.cfg.timestep_annealing!r} needs a guidance with threestudio's "
                        f"'{attr}' attribute; {self.cfg.guidance_type} has none (set system.timestep_annealing: none)"
                    )
            self._apply_annealing(self.true_global_step)
        self.dpt = None
        if _uses(self.cfg.loss.get("lambda_disparity", 0.0)):
            self._load_dpt()

    @staticmethod
    def guidance_config(guidance_type: str, guidance_cfg, image_term: bool):
        """The guidance's config, with threestudio's ``use_img_loss`` switched on for SDS+ when
        ``guidance_type`` is ``stable-diffusion-guidance`` and ``image_term`` is set."""
        if guidance_type == "stable-diffusion-guidance" and image_term:
            guidance_cfg = dict(config_to_primitive(guidance_cfg))
            guidance_cfg["use_img_loss"] = True
        return guidance_cfg

    def _load_dpt(self) -> None:
        from transformers import DPTForDepthEstimation

        path = self.cfg.disparity_model_name_or_path
        threestudio.info(f"Loading DPT disparity model from {path} ...")
        dpt = DPTForDepthEstimation.from_pretrained(path).to(self.device).eval()
        for p in dpt.parameters():
            p.requires_grad_(False)
        # not an nn.Module attribute: stays out of the system's state dict and optimizer
        self.__dict__["dpt"] = dpt
        self._dpt_input = self.dpt_input_settings(path, int(dpt.config.image_size), self.cfg.disparity_image_size)

    @staticmethod
    def dpt_input_settings(path: str, model_image_size: int, image_size: Optional[int] = None) -> dict:
        """:func:`scoredistill.maths.hifa.dpt_preprocess` settings from the checkpoint's own processor config
        (``DPTImageProcessor.from_pretrained``: size, resample, keep_aspect_ratio, ensure_multiple_of,
        mean/std).  A checkpoint without ``preprocessor_config.json`` gets DPT's published settings at the
        model's ``image_size``: bilinear (resample 2), mean = std = 0.5 (a warning says so)."""
        import warnings

        from transformers import DPTImageProcessor

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                processor = DPTImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as e:
            threestudio.warn(
                f"{path} has no readable preprocessor_config.json ({type(e).__name__}); DPT input: "
                f"{model_image_size}², bilinear, mean = std = 0.5"
            )
            processor = DPTImageProcessor(size={"height": model_image_size, "width": model_image_size}, resample=2)
        return dpt_processor_settings(processor, image_size)

    # ------------------------------------------------------------------ schedules
    def annealing_progress(self, step: int) -> float:
        sched = self.cfg.timestep_annealing
        sched = "sqrt" if sched in ("none", "random") else sched
        return annealing_fraction(step, self.cfg.anneal_total_steps, sched)

    def _apply_annealing(self, step: int) -> None:
        T = int(self.guidance.num_train_timesteps)
        lo, hi = self.cfg.anneal_min_step_percent, self.cfg.anneal_max_step_percent
        if self.cfg.timestep_annealing == "random":
            lo, hi = self.cfg.random_step_percent_range
        t_min = min(int(T * lo), T - 1)
        t_max = min(int(T * hi), T - 1)
        t = annealed_timestep(step, self.cfg.anneal_total_steps, t_min, t_max, self.cfg.timestep_annealing)
        self.guidance.min_step = t
        self.guidance.max_step = t

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        # runs after the guidance's own update_step (threestudio's Updateable order), so this wins
        if self.cfg.timestep_annealing != "none" and "guidance" in self.__dict__:
            self._apply_annealing(global_step)

    # ------------------------------------------------------------------ losses
    def disparity_loss(self, out) -> torch.Tensor:
        rgb = out["comp_rgb"].permute(0, 3, 1, 2)
        H, W = rgb.shape[-2:]
        with torch.no_grad():
            pix = dpt_preprocess(rgb.detach().float(), **self._dpt_input)
            pred = self.dpt(pixel_values=pix).predicted_depth
            pred = F.interpolate(pred[:, None], (H, W), mode="bicubic", align_corners=False)[:, 0]
        opacity = out["opacity"][..., 0]
        depth = out["depth"][..., 0]
        mask = (opacity.detach() > self.cfg.disparity_opacity_threshold) & (depth.detach() > 1e-6)
        disparity = opacity / depth.clamp(min=1e-6)  # 1 / (depth normalised by opacity)
        if self.cfg.disparity_loss == "fit":
            return disparity_fit_loss(disparity, pred, mask, self.cfg.disparity_reduction)["loss"]
        return disparity_pearson_loss(disparity, pred, mask)

    #: opacity threshold at which renderers that only output a masked ``z_variance`` (threestudio's
    #: ``nerf-volume-renderer``) have already masked it
    RENDERER_ZVAR_MASK = 0.5

    def z_variance_term(self, out) -> torch.Tensor:
        """L_zvar (Eq. 8) with the mask δ_r = 1[opacity > system.z_variance_opacity_threshold] applied once.

        Uses the renderer's unmasked ``z_variance_unmasked`` (``kernel-smoothed-volume-renderer``) when present;
        a renderer with only the masked ``z_variance`` (threestudio's, masked at opacity > 0.5) is accepted for
        thresholds >= 0.5 (re-masking at a higher threshold is the same as masking once), a lower threshold
        is refused (the renderer's mask would silently win).
        """
        if "z_variance_unmasked" in out:
            z_var = out["z_variance_unmasked"]
        elif "z_variance" in out:
            if self.cfg.z_variance_opacity_threshold < self.RENDERER_ZVAR_MASK:
                raise ValueError(
                    f"system.z_variance_opacity_threshold={self.cfg.z_variance_opacity_threshold} < "
                    f"{self.RENDERER_ZVAR_MASK} needs a renderer with an unmasked z-variance output "
                    "(z_variance_unmasked: kernel-smoothed-volume-renderer); this renderer's z_variance is already "
                    f"masked at opacity > {self.RENDERER_ZVAR_MASK}"
                )
            z_var = out["z_variance"]
        else:
            raise ValueError(
                "system.loss.lambda_z_variance > 0 needs a renderer with a z_variance output "
                "(kernel-smoothed-volume-renderer, nerf-volume-renderer)"
            )
        return z_variance_loss_from_maps(
            z_var, out["opacity"], self.cfg.z_variance_opacity_threshold, self.cfg.z_variance_reduction
        )

    def _log_host(self, name, value, **kwargs):
        log_host(self, name, value, **kwargs)  # no host-to-device copy per logged number (scoredistill.sync.log_host)

    def training_step(self, batch, batch_idx):
        out = self(batch)
        prompt_utils = self.prompt_processor()
        guidance_out = self.guidance(out["comp_rgb"], prompt_utils, **batch, rgb_as_latents=False)
        loss = 0.0
        for name, value in guidance_out.items():
            if not (isinstance(value, torch.Tensor) and value.numel() > 1):
                self._log_host(f"train/{name}", value)
            if name.startswith("loss_"):
                lam = name.replace("loss_", "lambda_")
                if lam not in self.cfg.loss:
                    raise ValueError(f"guidance returned {name} but system.loss.{lam} is not set")
                loss += value * self.C(self.cfg.loss[lam])
        if "loss_sds_img" not in guidance_out and _uses(self.cfg.loss.get("lambda_sds_img", 0.0)) and not self._warned_no_img:
            threestudio.warn(
                f"{self.cfg.guidance_type} returns no image-space term (loss_sds_img): SDS+ runs with its latent term only"
            )
            self._warned_no_img = True

        lam_z = self.C(self.cfg.loss.get("lambda_z_variance", 0.0))
        if _uses(self.cfg.loss.get("lambda_z_variance", 0.0)):  # logged also while a warm-up holds λ at 0
            loss_z = self.z_variance_term(out)
            self._log_host("train/loss_z_variance", loss_z)
            loss += lam_z * loss_z

        lam_d = self.C(self.cfg.loss.get("lambda_disparity", 0.0))
        if lam_d != 0 and self.dpt is not None:
            lam_d = disparity_lambda(lam_d, self.annealing_progress(self.true_global_step), self.cfg.disparity_schedule)
            loss_d = self.disparity_loss(out)
            self._log_host("train/loss_disparity", loss_d)
            self._log_host("train_params/lambda_disparity_effective", lam_d)
            loss += lam_d * loss_d

        if self.C(self.cfg.loss.get("lambda_orient", 0.0)) > 0:
            if "normal" not in out:
                raise ValueError("system.loss.lambda_orient > 0 needs normals (geometry.normal_type) in the render")
            loss_orient = (
                out["weights"].detach() * dot(out["normal"], out["t_dirs"]).clamp_min(0.0) ** 2
            ).sum() / (out["opacity"] > 0).sum()
            self._log_host("train/loss_orient", loss_orient)
            loss += loss_orient * self.C(self.cfg.loss.lambda_orient)
        lam_s = self.C(self.cfg.loss.get("lambda_sparsity", 0.0))
        if lam_s != 0:
            loss_sparsity = (out["opacity"] ** 2 + 0.01).sqrt().mean()
            self._log_host("train/loss_sparsity", loss_sparsity)
            loss += lam_s * loss_sparsity
        lam_o = self.C(self.cfg.loss.get("lambda_opaque", 0.0))
        if lam_o != 0:
            opacity_clamped = out["opacity"].clamp(1.0e-3, 1.0 - 1.0e-3)
            loss_opaque = binary_cross_entropy(opacity_clamped, opacity_clamped)
            self._log_host("train/loss_opaque", loss_opaque)
            loss += lam_o * loss_opaque
        if hasattr(self.guidance, "min_step"):
            self._log_host("train/annealed_t", float(self.guidance.min_step))
        for name, value in self.cfg.loss.items():
            self._log_host(f"train_params/{name}", self.C(value))
        return {"loss": loss}
