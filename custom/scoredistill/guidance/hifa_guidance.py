"""``hifa-guidance``: HiFA's SDS+ (Zhu et al., ICLR 2024, Eq. 2-4) on the pack's shared guidance base.

Per call (Alg. 1 lines 3-6): ``z = E(x)``; ``z_t = α_t z + σ_t ε``; the denoised target ẑ is either the
one-step Tweedie estimate ``(z_t - σ_t ε̂)/α_t`` (``denoised_target: tweedie``, one CFG UNet call) or the
multi-step DDIM chain from t (``denoised_target: ddim``, stride ``ddim_step_ratio·T`` = 250 for the
paper's r = 0.25, η = ``ddim_eta``; ``floor(t/250)+1`` CFG UNet calls); ``x̂ = D(ẑ)``.

The maths is :mod:`scoredistill.maths.hifa`'s: ω(t) (:func:`~scoredistill.maths.hifa.omega_weight`), Eq. 4
(:func:`~scoredistill.maths.hifa.sds_plus_loss`) and its latent gradient
(:func:`~scoredistill.maths.hifa.sds_plus_grad`).  Outputs (weighted by the system's ``lambda_*``, threestudio
naming):

* ``loss_sds``: the latent term ``ω(t)‖z - ẑ‖²`` through the base's reparameterisation, i.e. its gradient
  on z is ``2ω(t)(z - ẑ) = w(t) α_t/σ_t (z - ẑ)`` -- with the Tweedie target exactly DreamFusion's SDS
  gradient ``w(t)(ε̂ - ε)`` (Eq. 2);
* ``loss_sds_img`` (with ``use_img_loss``): the image term ``ω(t)‖x - x̂‖²`` (its value is Eq. 4's image
  term; its gradient equals threestudio's ``use_img_loss`` image gradient); λ_rgb is the system's
  ``lambda_sds_img`` (0.1);
* logs: ``sds_latent_residual`` (``mean ω‖z - ẑ‖²``, the value of Eq. 3), ``timestep``, ``unet_calls_step``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict

import torch
import torch.nn.functional as F

from .._registry import register
from ..maths.diffusion import add_noise, tweedie_x0
from ..maths.hifa import (
    DENOISED_TARGETS,
    OMEGA_WEIGHTINGS,
    ddim_denoise,
    ddim_stride,
    omega_weight,
    sds_plus_grad,
    sds_plus_loss,
)
from ..sync import to_device
from .base import ScoreDistillationGuidance


def _subset_embeddings(text_embeddings, idx: torch.Tensor, batch_size: int):
    """Select batch items ``idx`` from ``(emb, neg_w)`` of ``ScoreDistillationGuidance.text_embeddings_for``."""
    emb, neg_w = text_embeddings
    B = batch_size
    if neg_w is None:
        return torch.cat([emb[:B][idx], emb[B : 2 * B][idx]]), None
    n_neg = (emb.shape[0] - 2 * B) // B
    neg = emb[2 * B :].reshape(B, n_neg, *emb.shape[1:])[idx].reshape(-1, *emb.shape[1:])
    return torch.cat([emb[:B][idx], emb[B : 2 * B][idx], neg]), neg_w[idx]


@register("hifa-guidance")
class HiFAGuidance(ScoreDistillationGuidance):
    @dataclass
    class Config(ScoreDistillationGuidance.Config):
        guidance_scale: float = 100.0
        min_step_percent: Any = 0.3
        max_step_percent: Any = 0.98
        #: "ddim" (multi-step, paper A.1) | "tweedie" (single step)
        denoised_target: str = "ddim"
        #: DDIM stride as a fraction of T (paper r = 0.25 -> steps of 250)
        ddim_step_ratio: float = 0.25
        #: DDIM η (paper η = 1)
        ddim_eta: float = 1.0
        #: compute the image-space term ω‖x - D(ẑ)‖² (output ``loss_sds_img``)
        use_img_loss: bool = True

    cfg: Config

    #: ω(t) strategies (:func:`scoredistill.maths.hifa.omega_weight`): the base's plus "constant" (ω = 1/2,
    #: HiFA's reference code's constant weight; scale it with lambda_sds / lambda_sds_img)
    weighting_strategies = OMEGA_WEIGHTINGS

    def validate_config(self) -> None:
        super().validate_config()
        cfg = self.cfg
        if cfg.denoised_target not in DENOISED_TARGETS:
            raise ValueError(f"denoised_target must be one of {DENOISED_TARGETS}, got {cfg.denoised_target!r}")
        ddim_stride(cfg.ddim_step_ratio, 1000)  # raises ValueError naming ddim_step_ratio
        if not (isinstance(cfg.ddim_eta, (int, float)) and cfg.ddim_eta >= 0):
            raise ValueError(f"ddim_eta must be a number >= 0, got {cfg.ddim_eta!r}")

    def configure(self) -> None:
        super().configure()
        ddim_stride(self.cfg.ddim_step_ratio, self.num_train_timesteps)
        # private copy: set_timesteps mutates the scheduler
        self.ddim_scheduler = copy.deepcopy(self.scheduler)

    def __call__(self, rgb, prompt_utils, elevation, azimuth, camera_distances, rgb_as_latents: bool = False, **kwargs):
        image = None
        if self.cfg.use_img_loss and not rgb_as_latents:
            image = F.interpolate(
                rgb.permute(0, 3, 1, 2), (self.cfg.image_size, self.cfg.image_size), mode="bilinear", align_corners=False
            )
        return super().__call__(
            rgb, prompt_utils, elevation, azimuth, camera_distances, rgb_as_latents=rgb_as_latents, hifa_image=image, **kwargs
        )

    def compute_grad(self, latents, prompt_utils, elevation, azimuth, camera_distances, hifa_image=None, **kwargs) -> Dict[str, Any]:
        B = latents.shape[0]
        calls0 = self.unet_calls
        if self.cfg.denoised_target == "tweedie":
            t = self.sample_timesteps(B)
        else:  # the DDIM target's step count depends on t: drawn on the host, so no device read groups it
            t_host = self.sample_timesteps(B, device="cpu")
            t = to_device(t_host, self.device)  # pinned, non-blocking: no host wait
        emb = self.text_embeddings_for(prompt_utils, elevation, azimuth, camera_distances)
        with torch.no_grad():
            noise = torch.randn_like(latents)
            latents_noisy = add_noise(latents.detach(), noise, self.alphas_cumprod, t)
            if self.cfg.denoised_target == "tweedie":
                noise_pred = self.predict_noise_cfg(
                    latents_noisy, t, prompt_utils, elevation, azimuth, camera_distances, text_embeddings=emb
                )["noise_pred"]
                latents_denoised = tweedie_x0(latents_noisy, noise_pred, self.alphas_cumprod, t)
            else:

                def noise_pred_fn(latents_noisy_k, t_k, idx):
                    sub = _subset_embeddings(emb, idx, B) if idx.numel() != B else emb
                    return self.predict_noise_cfg(
                        latents_noisy_k, t_k, prompt_utils, elevation, azimuth, camera_distances, text_embeddings=sub
                    )["noise_pred"]

                latents_denoised, _ = ddim_denoise(
                    noise_pred_fn, latents_noisy, t_host, self.ddim_scheduler, self.cfg.ddim_step_ratio, self.cfg.ddim_eta
                )
            image_denoised = None
            if hifa_image is not None:
                image_denoised = self.decode_latents(latents_denoised)
                if image_denoised.shape[-2:] != hifa_image.shape[-2:]:
                    image_denoised = F.interpolate(image_denoised, hifa_image.shape[-2:], mode="bilinear", align_corners=False)
        omega = omega_weight(self.alphas_cumprod, t, self.cfg.weighting_strategy).to(latents)
        # Eq. 4 on the detached latents: its values are logged / returned; the latent term's gradient goes through
        # the base's reparameterisation (d(loss_sds)/dz = grad / B = ∇_z mean_b ω‖z - ẑ‖²)
        sds_plus = sds_plus_loss(latents.detach(), latents_denoised, omega, hifa_image, image_denoised)
        out: Dict[str, Any] = {
            "grad": sds_plus_grad(latents, latents_denoised, omega),
            "sds_latent_residual": sds_plus["loss_latent"],
            "timestep": t.float().mean(),
        }
        if hifa_image is not None:
            out["loss_sds_img"] = sds_plus["loss_image"]  # λ_rgb is the system's lambda_sds_img
        out["unet_calls_step"] = self.unet_calls - calls0
        return out
