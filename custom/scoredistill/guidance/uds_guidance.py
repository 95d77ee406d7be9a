"""threestudio adapter: ``uds-guidance`` (UDS, Unified Distillation Sampling; maths in :mod:`.uds`).

``mode: generation`` (Alg. 1, Eq. 16-17) works in any system that calls the guidance like threestudio's
``dreamfusion-system`` (``dreamfusion-system``, ``gsplat-system``).  ``mode: editing`` (Eq. 14) needs the
frozen source asset's render from the same camera: the call gets ``source_rgb=`` (``(B, H, W, 3)`` like the
target render, or 4 latent channels with ``rgb_as_latents``) and optionally ``source_prompt_utils=`` (the
source prompt's prompt-processor output; default: the target's, i.e. identical prompts).  The systems
``gsplat-edit-system`` and ``nerf-edit-system`` (:mod:`scoredistill.system.uds_edit_system`) provide both.

Returns ``loss_sds`` (so ``lambda_sds`` weights it), ``grad_norm``, ``min_step``/``max_step`` and the scalars
``uds_t`` (mean timestep), ``uds_recon_norm``, ``uds_cls_norm`` (norms of the two terms of Eq. 18 before ω(t)).

Editing: target and source renders are VAE-encoded in ONE call with the SAME posterior noise (the VAE
encoder samples its latent distribution like threestudio's guidance), so an unchanged target encodes to the
source's latents exactly and the Eq. 14 gradient vanishes for identical prompts.  The source latents are
detached: no gradient reaches the source model.

Configuration and defaults: ``docs/uds.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

import threestudio

from .._registry import register
from .base import ScoreDistillationGuidance
from ..maths.uds import (
    DEFAULT_DDIM_STEPS,
    DEFAULT_INTERVAL,
    DEFAULT_RECON_SIGN,
    uds_editing_grad,
    uds_generation_grad,
    validate_uds_options,
)


@register("uds-guidance")
class UDSGuidance(ScoreDistillationGuidance):
    """UDS guidance.  UNet cost per step for ``B`` views (one batched call each, ``n`` = ``ddim_steps``, 1 for
    Tweedie): generation ``n`` calls, the first of ``3B`` samples (``4B`` with ``negative_prompt``), then
    ``2B``; editing ``n`` calls, the first of ``4B``, then ``2B``."""

    @dataclass
    class Config(ScoreDistillationGuidance.Config):
        #: "generation" (Alg. 1, Eq. 16/17) | "editing" (Eq. 14, needs source_rgb from an edit system)
        mode: str = "generation"
        #: w, the classifier-free guidance weight of the paper (7.5 for both tasks)
        guidance_scale: float = 7.5
        #: t ~ U(1, 1000) (Alg. 1 line 3) = diffusers indices [0, 999]; C() schedules anneal it
        min_step_percent: Any = 0.0
        max_step_percent: Any = 1.0
        #: x̂_0 estimator: "tweedie" (Eq. 10) | "ddim" (Eq. 15, ddim_steps deterministic unconditional steps)
        x0_estimator: str = "tweedie"
        ddim_steps: int = DEFAULT_DDIM_STEPS
        #: c, the timestep interval of Eq. 16 (generation); t - c is clamped at 0
        interval: int = DEFAULT_INTERVAL
        #: generation reconstruction sign: "reversed" (x̂_0^{t-c} - x̂_0^t, default, see docs/uds.md) |
        #: "printed" (x̂_0^t - x̂_0^{t-c}, as printed in Eq. 16 / Alg. 1)
        recon_sign: str = DEFAULT_RECON_SIGN
        #: Eq. 17's negative classifier term: a negative prompt encoded once with the pipeline's own text
        #: encoder (null = Eq. 16, no negative term).  ∅ stays the prompt processor's unconditional embedding.
        negative_prompt: Optional[str] = None

    cfg: Config

    def validate_config(self) -> None:
        super().validate_config()
        c = self.cfg
        validate_uds_options(c.mode, c.x0_estimator, c.ddim_steps, c.interval, c.guidance_scale, c.recon_sign,
                             c.weighting_strategy)
        if c.negative_prompt is not None and not isinstance(c.negative_prompt, str):
            raise ValueError(f"uds-guidance: negative_prompt must be a string or null, got {c.negative_prompt!r}")
        if c.negative_prompt is not None and c.mode == "editing":
            raise ValueError("uds-guidance: negative_prompt (Eq. 17) applies to mode: generation only")

    def configure(self) -> None:
        super().configure()
        validate_uds_options(self.cfg.mode, self.cfg.x0_estimator, self.cfg.ddim_steps, self.cfg.interval,
                             self.cfg.guidance_scale, self.cfg.recon_sign, self.cfg.weighting_strategy,
                             self.num_train_timesteps)
        self.neg_embedding: Optional[torch.Tensor] = None
        if self.cfg.negative_prompt is not None:
            self.neg_embedding = self._encode_prompt(self.cfg.negative_prompt)
        self._pending_source = None
        self._source_latents: Optional[torch.Tensor] = None

    @torch.no_grad()
    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        """``(1, 77, E)`` CLIP text embedding of ``prompt`` with the pipeline's tokenizer/text encoder (freed after)."""
        from transformers import AutoTokenizer, CLIPTextModel

        path = self.cfg.pretrained_model_name_or_path
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").to(self.device).eval()
        tokens = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        emb = encoder(tokens.input_ids.to(self.device))[0].float()
        del encoder
        threestudio.info(f"uds-guidance: negative prompt [{prompt}] encoded for Eq. 17")
        return emb

    # ------------------------------------------------------------------ editing: paired encoding
    def __call__(self, rgb, prompt_utils, elevation, azimuth, camera_distances, rgb_as_latents: bool = False,
                 source_rgb: Optional[torch.Tensor] = None, **kwargs):
        if self.cfg.mode == "editing":
            if source_rgb is None:
                raise ValueError(
                    "uds-guidance (mode: editing) needs source_rgb, the frozen source asset rendered from the same "
                    "camera: use system_type gsplat-edit-system or nerf-edit-system"
                )
            if tuple(source_rgb.shape) != tuple(rgb.shape):
                raise ValueError(f"source_rgb shape {tuple(source_rgb.shape)} must equal the render's {tuple(rgb.shape)}")
            self._pending_source = source_rgb.detach()
        try:
            return super().__call__(rgb, prompt_utils, elevation, azimuth, camera_distances,
                                    rgb_as_latents=rgb_as_latents, **kwargs)
        finally:
            self._pending_source = None
            self._source_latents = None

    def get_latents(self, rgb_BHWC: torch.Tensor, rgb_as_latents: bool = False) -> torch.Tensor:
        """As the base; in editing mode the pending source render is encoded in the same VAE call with the same
        posterior noise, its latents kept (detached) in ``self._source_latents``."""
        src = self._pending_source
        if src is None:
            return super().get_latents(rgb_BHWC, rgb_as_latents)
        B = rgb_BHWC.shape[0]
        both = torch.cat([rgb_BHWC, src.to(rgb_BHWC)]).permute(0, 3, 1, 2)
        if rgb_as_latents:
            lat = F.interpolate(both, (self.latent_size, self.latent_size), mode="bilinear", align_corners=False)
        else:
            imgs = F.interpolate(both, (self.cfg.image_size, self.cfg.image_size), mode="bilinear", align_corners=False)
            with torch.autocast(device_type=imgs.device.type, enabled=False):
                dist = self.vae.encode((imgs * 2.0 - 1.0).to(self.weights_dtype)).latent_dist
                noise = torch.randn_like(dist.mean[:B]).repeat(2, 1, 1, 1)  # shared posterior noise
                lat = (dist.mean + dist.std * noise) * self.vae.config.scaling_factor
            lat = lat.to(rgb_BHWC.dtype)
        self._source_latents = lat[B:].detach()
        return lat[:B]

    # ------------------------------------------------------------------ the gradient
    def compute_grad(self, latents, prompt_utils, elevation, azimuth, camera_distances,
                     source_prompt_utils=None, **kwargs):
        B = latents.shape[0]
        t = self.sample_timesteps(B)
        cond, uncond = self.get_text_embeddings(prompt_utils, elevation, azimuth, camera_distances)
        common = dict(guidance_scale=self.cfg.guidance_scale, x0_estimator=self.cfg.x0_estimator,
                      ddim_steps=self.cfg.ddim_steps, weighting_strategy=self.cfg.weighting_strategy)
        if self.cfg.mode == "generation":
            neg = None if self.neg_embedding is None else self.neg_embedding.to(cond).expand(B, -1, -1)
            res = uds_generation_grad(self.forward_unet, latents, t, cond, uncond, self.alphas_cumprod,
                                      interval=self.cfg.interval, neg=neg, recon_sign=self.cfg.recon_sign, **common)
        else:
            if self._source_latents is None:
                raise ValueError("uds-guidance (mode: editing): no source latents (call the guidance with source_rgb=)")
            src_utils = prompt_utils if source_prompt_utils is None else source_prompt_utils
            cond_src, uncond_src = self.get_text_embeddings(src_utils, elevation, azimuth, camera_distances)
            res = uds_editing_grad(self.forward_unet, latents, self._source_latents, t, cond, cond_src, uncond,
                                   self.alphas_cumprod, uncond_src=uncond_src, **common)
        return {
            "grad": res.grad,
            "uds_t": t.float().mean(),
            "uds_recon_norm": res.recon.norm(),
            "uds_cls_norm": res.cls.norm(),
        }
