"""Shared Stable Diffusion guidance base for the pack's score-distillation guidances (threestudio adapter).

:class:`ScoreDistillationGuidance` is a threestudio ``BaseObject`` (like threestudio's own
``stable-diffusion-guidance``; the frozen diffusion model is not part of the system's state dict).  It does
everything the pack's guidances share, once:

* config validation (:meth:`validate_config`, extended by subclasses) **before** any model loads;
* loading ``UNet2DConditionModel``, ``AutoencoderKL`` and ``DDIMScheduler`` from
  ``pretrained_model_name_or_path`` (a hub id or a local folder), frozen;
* :meth:`forward_unet` (counts ``unet_calls`` and ``unet_samples``: the exact cost), VAE
  :meth:`encode_images` / :meth:`decode_latents`, :meth:`get_latents` from threestudio renders;
* text embeddings from threestudio's prompt processor output (view-dependent prompts, negative prompt as
  the unconditional branch, Perp-Neg): :meth:`get_text_embeddings`, :meth:`get_text_embeddings_perp_neg`,
  and :meth:`predict_noise_cfg` (CFG or Perp-Neg in ONE batched UNet call);
* timestep range from (scheduled) ``min/max_step_percent``, :meth:`sample_timesteps`, :meth:`update_step`;
* ``__call__``: renders → latents → the subclass's :meth:`compute_grad` → ``loss_sds`` (threestudio's
  reparameterisation, :func:`scoredistill.maths.diffusion.grad_to_loss`), ``grad_norm`` and the subclass's logs.

:class:`CheckpointedScoreDistillationGuidance` adds a guidance's own trainable state to the system's Lightning
checkpoints (:mod:`scoredistill.integrity.checkpointing`; used by ``lods-guidance`` and ``vdm-guidance``).

Both take part in run integrity (:mod:`scoredistill.integrity`): the system they run in passes itself down
(:meth:`ScoreDistillationGuidance.attach_run_integrity`), or, when it made no call (threestudio's own
systems), the guidance attaches to the LightningModule holding it at its first :meth:`do_update_step`.

They register no name themselves; subclasses register with ``scoredistill._registry.register``.
See ``docs/guidance-base.md``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import threestudio
from threestudio.utils.base import BaseObject
from threestudio.utils.misc import C, config_to_primitive

from ..maths.diffusion import (
    WEIGHTING_STRATEGIES,
    cfg_combine,
    grad_to_loss,
    perp_neg_combine,
    sample_timesteps,
    step_range,
)
from ..integrity import (
    CheckpointedGuidanceMixin,
    RunIntegrity,
    attach_run_integrity,
    clone_state,
    get_finite_guard,
    lightning_module_holding,
    validate_max_nonfinite_skips,
)
from .memory import load_models as load_memory_options_models
from ..settings import check_range, in_range
from .memory import validate_memory_options


def _C(value: Any, epoch: int, global_step: int) -> float:
    """threestudio's ``C()`` that also accepts plain python lists (configs built from dicts in code)."""
    if isinstance(value, (list, tuple)):
        from omegaconf import OmegaConf

        value = OmegaConf.create(list(value))
    return C(value, epoch, global_step)


def _primitive(value: Any) -> Any:
    from omegaconf import OmegaConf

    return config_to_primitive(value) if OmegaConf.is_config(value) else value


def _milestones(value: Any, max_steps: int) -> set:
    steps = {0, max_steps}
    if not isinstance(value, (int, float)) and value is not None:
        value = _primitive(value)
        if isinstance(value, (list, tuple)):
            steps.update(int(v) for v in value if isinstance(v, int) and v >= 0)
    return steps


def _schedule_values(value: Any, steps) -> list:
    """Values a threestudio ``C()`` scalar/schedule takes at the given global steps.

    Raises:
        ValueError: not a number nor a valid schedule list.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a number or a threestudio schedule list, got {value!r}")
    if isinstance(value, (int, float)):
        return [float(value)] * len(steps)
    value = _primitive(value)
    if not isinstance(value, (list, tuple)) or len(value) < 3:
        raise ValueError(f"expected a number or a threestudio schedule list, got {value!r}")
    try:
        return [float(_C(value, 0, s)) for s in steps]
    except (AssertionError, TypeError, ZeroDivisionError) as e:
        raise ValueError(f"invalid threestudio schedule {value!r} ({e!r})") from None


def _schedule_values_named(name: str, value: Any, steps) -> list:
    try:
        return _schedule_values(value, steps)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


class ScoreDistillationGuidance(BaseObject):
    """Base class of the pack's Stable Diffusion score-distillation guidances.

    Subclasses implement :meth:`compute_grad` and may extend ``Config``, :meth:`validate_config`,
    :meth:`configure` (call ``super().configure()`` first) and :meth:`update_step` (call super).
    """

    @dataclass
    class Config(BaseObject.Config):
        #: hub id or local folder of a Stable Diffusion pipeline (unet/, vae/, scheduler/ subfolders)
        pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-2-1-base"
        #: load UNet/VAE in float16 (use false on CPU)
        half_precision_weights: bool = True
        #: CFG scale s in ε̃ = ε(∅) + s(ε(y) − ε(∅)); must be > 0
        guidance_scale: float = 7.5
        #: timestep range as fractions of T (numbers or threestudio C() schedules)
        min_step_percent: Any = 0.02
        max_step_percent: Any = 0.98
        #: "sds" (1-ᾱ_t) | "uniform" | "fantasia3d" (sqrt(ᾱ_t)(1-ᾱ_t)); subclasses may allow more
        #: (class attribute ``weighting_strategies``)
        weighting_strategy: str = "sds"
        #: pick the prompt processor's front/side/back/overhead embedding per view
        view_dependent_prompting: bool = True
        #: renders are resized to image_size² before VAE encoding (latents: image_size / VAE factor)
        image_size: int = 512
        #: clamp the latent gradient to [-v, v] (number or C() schedule); None = off
        grad_clip: Optional[Any] = None
        #: K, the trainer's max steps (set ${trainer.max_steps} in configs)
        trainer_max_steps: int = 10000
        # memory / speed options (threestudio's names; scoredistill.guidance.memory, docs/guidance-base.md)
        enable_memory_efficient_attention: bool = False
        #: with enable_memory_efficient_attention: "auto" (xformers on CUDA if installed, else SDPA) | "sdpa" | "xformers"
        memory_efficient_attention_backend: str = "auto"
        enable_attention_slicing: bool = False
        attention_slice_size: Any = 1
        enable_channels_last_format: bool = False
        enable_sequential_cpu_offload: bool = False
        token_merging: bool = False
        token_merging_params: Optional[dict] = field(default_factory=dict)
        #: torch.compile the UNet (nn.Module.compile(**compile_unet_params))
        compile_unet: bool = False
        compile_unet_params: Optional[dict] = field(default_factory=dict)
        #: recompute the UNet blocks' activations in the backward where a gradient flows through the UNet
        #: (LODS' Eq. 8/10 loss): same values, less memory (scoredistill.guidance.memory).  true | false |
        #: "auto" (default: on for a CUDA device with less than 24 GiB, off otherwise; measured on the H200:
        #: peak 19.6 -> 11.1 GiB for lods-embedding-gs but 14-36% slower steps)
        unet_activation_checkpointing: Any = "auto"
        #: the same for the VAE encoder in the render -> latents backward (one more encoder forward per step)
        vae_activation_checkpointing: Any = "auto"
        #: consecutive skipped (non-finite) optimizer steps that stop the run; null = the system's
        #: ``system.max_nonfinite_skips`` (pack systems) or 10 (e.g. threestudio's dreamfusion-system)
        max_nonfinite_skips: Optional[int] = None

    cfg: Config

    #: the ``weighting_strategy`` values :meth:`validate_config` accepts (subclasses may extend it, e.g.
    #: ``vdm-guidance`` adds ``"luciddreamer"``; see :func:`scoredistill.maths.diffusion.sds_weight`)
    weighting_strategies: Tuple[str, ...] = WEIGHTING_STRATEGIES
    #: whether ``guidance_scale: .inf`` is accepted (a guidance whose maths has the s → ∞ limit, e.g.
    #: ``lods-guidance``'s 2D setting, paper A.1); the base's own CFG combination never sees it then
    allows_infinite_guidance_scale: bool = False

    # ------------------------------------------------------------------ configuration
    def validate_config(self) -> None:
        """Check settings; raise ``ValueError`` naming the setting and its allowed range. Runs before loading."""
        cfg = self.cfg
        if not cfg.pretrained_model_name_or_path:
            raise ValueError("pretrained_model_name_or_path must be a non-empty hub id or folder")
        gs = cfg.guidance_scale
        inf_ok = self.allows_infinite_guidance_scale and isinstance(gs, (int, float)) and gs == math.inf
        if not inf_ok:
            check_range(gs, "guidance_scale", 0, open_low=True, note=" or inf" if self.allows_infinite_guidance_scale else "")
        if cfg.weighting_strategy not in self.weighting_strategies:
            raise ValueError(
                f"weighting_strategy must be one of {self.weighting_strategies}, got {cfg.weighting_strategy!r}"
            )
        check_range(cfg.trainer_max_steps, "trainer_max_steps", 1, integer=True)
        if not isinstance(cfg.image_size, int) or cfg.image_size < 8 or cfg.image_size % 8:
            raise ValueError(f"image_size must be a positive multiple of 8, got {cfg.image_size!r}")
        steps = sorted(_milestones(cfg.min_step_percent, cfg.trainer_max_steps) | _milestones(cfg.max_step_percent, cfg.trainer_max_steps))
        lo_vals = _schedule_values_named("min_step_percent", cfg.min_step_percent, steps)
        hi_vals = _schedule_values_named("max_step_percent", cfg.max_step_percent, steps)
        for name, vals in (("min_step_percent", lo_vals), ("max_step_percent", hi_vals)):
            if not all(in_range(v, 0, 1) for v in vals):
                raise ValueError(f"{name} must be in [0, 1] at every step, got {vals} at steps {steps}")
        for st, lo, hi in zip(steps, lo_vals, hi_vals):
            if lo > hi:
                raise ValueError(f"min_step_percent ({lo}) must be <= max_step_percent ({hi}) (at step {st})")
        if cfg.grad_clip is not None:
            clip_vals = _schedule_values_named("grad_clip", cfg.grad_clip, sorted(_milestones(cfg.grad_clip, cfg.trainer_max_steps)))
            if any(v <= 0 for v in clip_vals):
                raise ValueError(f"grad_clip must be > 0 (or null to disable), got {clip_vals}")
        validate_max_nonfinite_skips(cfg.max_nonfinite_skips, "system.guidance.max_nonfinite_skips", allow_none=True)

    # ------------------------------------------------------------------ run integrity (finite steps, resume)
    def attach_run_integrity(self, system) -> RunIntegrity:
        """Attach run integrity (:mod:`scoredistill.integrity`) to ``system``, the LightningModule this guidance
        runs in, and return it (idempotent): the finite-step guard -- with this guidance's
        ``max_nonfinite_skips`` when set -- and the resume check.  Called by the system
        (:meth:`~scoredistill.integrity.RunIntegrity.add_guidance`) or, for a system that made no call, at this
        guidance's first :meth:`do_update_step`."""
        if self.__dict__.get("_integrity_system") is not system:
            attach_run_integrity(system, self.cfg.max_nonfinite_skips, "system.guidance.max_nonfinite_skips")
            # private: threestudio's do_update_step visits public attributes
            self.__dict__["_integrity_system"] = system
        return RunIntegrity.of(system)

    @property
    def finite_guard(self):
        """The :class:`~scoredistill.integrity.FiniteStepGuard` of the system this guidance runs in, or ``None``."""
        return get_finite_guard(self.__dict__.get("_integrity_system"))

    @property
    def guard_name(self) -> str:
        """The registered name (e.g. ``hifa-guidance``) used in finite-step messages; else the class name."""
        key = getattr(self, "checkpoint_state_key", None)
        if key:
            return key
        from .._registry import REGISTERED_NAMES, _identity

        ident = _identity(type(self))
        return next((n for n, i in REGISTERED_NAMES.items() if i == ident), type(self).__name__)

    def rollback_state(self) -> Optional[Any]:
        """A copy of the guidance's own trainable state for the finite-step rollback (``None``: it has none)."""
        return None

    def restore_rollback_state(self, state: Any) -> None:
        """Restore :meth:`rollback_state` output (a skipped step leaves the guidance state untouched)."""

    def do_update_step(self, epoch: int, global_step: int, on_load_weights: bool = False):
        if "_integrity_system" not in self.__dict__:
            # first update step and no system attached this guidance (a foreign system, e.g. threestudio's
            # dreamfusion-system: its on_train_batch_start calls do_update_step before training_step): attach to
            # the LightningModule holding this guidance as an attribute; looked up once
            self.__dict__["_integrity_system"] = None
            system = lightning_module_holding(self)
            if system is not None:
                self.attach_run_integrity(system)
        super().do_update_step(epoch, global_step, on_load_weights=on_load_weights)

    def configure(self) -> None:
        self.validate_config()
        validate_memory_options(self.cfg, self.device)
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        path = self.cfg.pretrained_model_name_or_path
        threestudio.info(f"Loading Stable Diffusion from {path} ...")
        self.weights_dtype = torch.float16 if self.cfg.half_precision_weights else torch.float32
        self.unet, self.vae = load_memory_options_models(
            self.cfg, UNet2DConditionModel, AutoencoderKL, path, self.device, self.weights_dtype, log=threestudio.info
        )
        self.scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
        self.num_train_timesteps: int = int(self.scheduler.config.num_train_timesteps)
        #: ᾱ_t, (T,) float32 on the device; ``alphas`` is threestudio's name for the same tensor
        self.alphas_cumprod: torch.Tensor = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.alphas = self.alphas_cumprod
        self.vae_scale_factor: int = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_size: int = self.cfg.image_size // self.vae_scale_factor
        self.unet_calls = 0
        self.unet_samples = 0
        self.grad_clip_val: Optional[float] = None
        self.epoch = 0
        self.global_step = 0
        self.set_min_max_steps(_C(self.cfg.min_step_percent, 0, 0), _C(self.cfg.max_step_percent, 0, 0))
        threestudio.info("Loaded Stable Diffusion!")

    # ------------------------------------------------------------------ timesteps
    def set_min_max_steps(self, min_step_percent: float, max_step_percent: float) -> None:
        """``min_step, max_step = int(T·min%), int(T·max%)`` (threestudio convention), clipped to ``[0, T-1]``."""
        self.min_step, self.max_step = step_range(min_step_percent, max_step_percent, self.num_train_timesteps)

    def sample_timesteps(self, batch_size: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """``(batch_size,)`` long timesteps uniform on ``[min_step, max_step]``, on ``device`` (default: the
        guidance's device; ``"cpu"`` for a schedule the host must read without waiting on the GPU)."""
        return sample_timesteps(
            batch_size, self.min_step, self.max_step, device=self.device if device is None else device, generator=generator
        )

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        self.epoch, self.global_step = epoch, global_step
        if self.cfg.grad_clip is not None:
            self.grad_clip_val = _C(self.cfg.grad_clip, epoch, global_step)
        self.set_min_max_steps(
            _C(self.cfg.min_step_percent, epoch, global_step), _C(self.cfg.max_step_percent, epoch, global_step)
        )

    # ------------------------------------------------------------------ models
    def forward_unet(self, latents: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """ε_φ(latents, t, encoder_hidden_states) in the latents' dtype; counts ``unet_calls``/``unet_samples``.

        Args: latents ``(N, 4, h, w)``; t scalar or ``(N,)``; encoder_hidden_states ``(N, 77, E)``.
        Gradients flow if the caller enables them (the weights are frozen).
        """
        self.unet_calls += 1
        self.unet_samples += latents.shape[0]
        input_dtype = latents.dtype
        t = torch.as_tensor(t, device=latents.device)
        with torch.autocast(device_type=latents.device.type, enabled=False):
            out = self.unet(
                latents.to(self.weights_dtype),
                t.to(self.weights_dtype),
                encoder_hidden_states=encoder_hidden_states.to(latents.device, self.weights_dtype),
            ).sample
        return out.to(input_dtype)

    def encode_images(self, imgs: torch.Tensor) -> torch.Tensor:
        """VAE-encode images ``(B, 3, H, W)`` in [0, 1] → latents ``(B, 4, H/f, W/f)`` (sampled, × scaling_factor)."""
        input_dtype = imgs.dtype
        with torch.autocast(device_type=imgs.device.type, enabled=False):
            posterior = self.vae.encode((imgs * 2.0 - 1.0).to(self.weights_dtype)).latent_dist
            latents = posterior.sample() * self.vae.config.scaling_factor
        return latents.to(input_dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode latents ``(B, 4, h, w)`` → images ``(B, 3, h·f, w·f)`` in [0, 1]."""
        input_dtype = latents.dtype
        with torch.autocast(device_type=latents.device.type, enabled=False):
            image = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.weights_dtype)).sample
        return (image * 0.5 + 0.5).clamp(0, 1).to(input_dtype)

    def get_latents(self, rgb_BHWC: torch.Tensor, rgb_as_latents: bool = False) -> torch.Tensor:
        """Latents ``(B, 4, s, s)`` (``s = image_size / VAE factor``) from a render ``(B, H, W, C)``.

        ``rgb_as_latents``: the render already has 4 latent channels; it is bilinearly resized to ``s``.
        Otherwise the RGB render (values in [0, 1]) is resized to ``image_size`` and VAE-encoded (with grad).
        """
        rgb = rgb_BHWC.permute(0, 3, 1, 2)
        if rgb_as_latents:
            return F.interpolate(rgb, (self.latent_size, self.latent_size), mode="bilinear", align_corners=False)
        rgb = F.interpolate(rgb, (self.cfg.image_size, self.cfg.image_size), mode="bilinear", align_corners=False)
        return self.encode_images(rgb)

    # ------------------------------------------------------------------ text embeddings
    def get_text_embeddings(self, prompt_utils, elevation, azimuth, camera_distances) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cond (B, 77, E), uncond (B, 77, E))`` from threestudio's ``PromptProcessorOutput``.

        View-dependent (front/side/back/overhead) when ``view_dependent_prompting``; ``uncond`` is the prompt
        processor's unconditional embedding, i.e. the negative prompt's when one is configured.
        """
        emb = prompt_utils.get_text_embeddings(elevation, azimuth, camera_distances, self.cfg.view_dependent_prompting)
        cond, uncond = emb.to(self.device).chunk(2)
        return cond, uncond

    def get_text_embeddings_perp_neg(self, prompt_utils, elevation, azimuth, camera_distances):
        """Perp-Neg embeddings ``(4B, 77, E)`` = [pos (B), uncond (B), neg (2B, interleaved per view)] and the
        negative weights ``(B, 2)`` (already negative), from threestudio's prompt processor."""
        emb, w = prompt_utils.get_text_embeddings_perp_neg(
            elevation, azimuth, camera_distances, self.cfg.view_dependent_prompting
        )
        return emb.to(self.device), w.to(self.device)

    def predict_noise_cfg(
        self,
        latents_noisy: torch.Tensor,
        t: torch.Tensor,
        prompt_utils,
        elevation,
        azimuth,
        camera_distances,
        guidance_scale: Optional[float] = None,
        text_embeddings: Optional[Any] = None,
    ) -> Dict[str, torch.Tensor]:
        """Guided noise prediction in ONE batched UNet call.

        Without Perp-Neg: batch ``2B`` (cond, uncond), ``noise_pred = cfg_combine(cond, uncond, s)``.
        With ``prompt_utils.use_perp_neg``: batch ``4B`` (pos, uncond, two negatives),
        ``noise_pred = perp_neg_combine(...)`` (GE3D supplementary Eq. 17).

        Args:
            latents_noisy: ``(B, 4, h, w)``; t: ``(B,)`` long.
            guidance_scale: overrides ``cfg.guidance_scale``.
            text_embeddings: precomputed output of :meth:`text_embeddings_for` (to avoid recomputing per step).
        Returns:
            dict with ``noise_pred`` (guided ε̃), ``noise_pred_text`` (ε(y), the positive prompt's),
            ``noise_pred_uncond`` (ε(∅)).
        """
        s = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        B = latents_noisy.shape[0]
        t = torch.as_tensor(t, device=latents_noisy.device)
        if t.dim() == 0:
            t = t.expand(B)
        if text_embeddings is None:
            text_embeddings = self.text_embeddings_for(prompt_utils, elevation, azimuth, camera_distances)
        emb, neg_w = text_embeddings
        n_rep = emb.shape[0] // B
        noise_pred_all = self.forward_unet(torch.cat([latents_noisy] * n_rep), torch.cat([t] * n_rep), emb)
        noise_pred_text, noise_pred_uncond = noise_pred_all[:B], noise_pred_all[B : 2 * B]
        if neg_w is None:
            noise_pred = cfg_combine(noise_pred_text, noise_pred_uncond, s)
        else:
            noise_pred = perp_neg_combine(noise_pred_text, noise_pred_uncond, noise_pred_all[2 * B :], neg_w, s)
        return {"noise_pred": noise_pred, "noise_pred_text": noise_pred_text, "noise_pred_uncond": noise_pred_uncond}

    def text_embeddings_for(self, prompt_utils, elevation, azimuth, camera_distances):
        """``(emb, neg_weights)`` for :meth:`predict_noise_cfg`: ``emb`` is ``(2B, 77, E)`` = [cond; uncond] and
        ``neg_weights`` ``None``, or with Perp-Neg ``(4B, 77, E)`` and ``(B, 2)``."""
        if getattr(prompt_utils, "use_perp_neg", False):
            return self.get_text_embeddings_perp_neg(prompt_utils, elevation, azimuth, camera_distances)
        cond, uncond = self.get_text_embeddings(prompt_utils, elevation, azimuth, camera_distances)
        return torch.cat([cond, uncond]), None

    # ------------------------------------------------------------------ the guidance
    def __init_subclass__(cls, **kwargs):
        """Each guidance's ``validate_config`` raises with the full setting name (``system.guidance.guidance_scale``).

        The (own or inherited) ``validate_config`` of every subclass is wrapped once with
        :func:`scoredistill.settings.run_qualified`, which rewrites the first bare field name of the message.
        """
        super().__init_subclass__(**kwargs)
        fn = getattr(cls, "validate_config")
        if getattr(fn, "_scoredistill_qualified", False) and "validate_config" not in cls.__dict__:
            return  # inherited an already wrapped one

        def validate_config(self, _fn=fn):
            from ..settings import run_qualified

            run_qualified(lambda: _fn(self), "system.guidance", type(self).Config)

        validate_config.__doc__ = fn.__doc__
        validate_config._scoredistill_qualified = True
        cls.validate_config = validate_config

    def compute_grad(self, latents, prompt_utils, elevation, azimuth, camera_distances, **kwargs) -> Dict[str, Any]:
        """Subclass hook: return ``{"grad": (same shape as latents), ...}``; other entries are returned as logs
        (scalars or tensors; entries named ``loss_*`` are extra losses weighted by ``lambda_*`` in the system)."""
        raise NotImplementedError

    def __call__(
        self,
        rgb: torch.Tensor,
        prompt_utils,
        elevation: torch.Tensor,
        azimuth: torch.Tensor,
        camera_distances: torch.Tensor,
        rgb_as_latents: bool = False,
        **kwargs,
    ) -> Dict[str, Any]:
        """Render ``(B, H, W, 3)`` (or 4 latent channels with ``rgb_as_latents``) → guidance outputs.

        Returns ``{"loss_sds", "grad_norm", "min_step", "max_step", **subclass logs}``, where
        ``d loss_sds / d latents = grad / B`` (:func:`scoredistill.maths.diffusion.grad_to_loss`).
        """
        kwargs.pop("guidance_eval", None)
        guard = self.finite_guard
        if guard is not None:  # keep the own state of this step (restored if the step is skipped)
            guard.snapshot(self.guard_name, self.rollback_state, self.restore_rollback_state)
        latents = self.get_latents(rgb, rgb_as_latents=rgb_as_latents)
        out = dict(self.compute_grad(latents, prompt_utils, elevation, azimuth, camera_distances, **kwargs))
        grad = out.pop("grad").to(latents.dtype)
        # no nan_to_num (it turns ±inf into ±3.4e38): a non-finite gradient makes the step skipped
        if guard is not None:
            guard.check_finite(f"latent gradient ({self.guard_name})", grad)
        if self.grad_clip_val is not None:
            grad = grad.clamp(-self.grad_clip_val, self.grad_clip_val)
        result = {
            "loss_sds": grad_to_loss(latents, grad),
            "grad_norm": grad.norm(),
            "min_step": self.min_step,
            "max_step": self.max_step,
        }
        result.update(out)
        return result


class CheckpointedScoreDistillationGuidance(CheckpointedGuidanceMixin, ScoreDistillationGuidance):
    """A :class:`ScoreDistillationGuidance` with its own trainable state (e.g. LODS' α / ψ, VDM's ``M_ψ``) that
    is saved in and restored from the system's Lightning checkpoints under
    ``checkpoint["scoredistill_guidance_states"][checkpoint_state_key]``
    (:mod:`scoredistill.integrity.checkpointing`), with any threestudio system, unmodified.

    Subclasses define :meth:`guidance_state_dict` / :meth:`load_guidance_state_dict` and
    ``checkpoint_state_key`` (their registered name).  With ``auto_attach`` (default) the state joins the
    checkpoints of the system the guidance attaches to (:meth:`attach_run_integrity`: from the system, or from
    the holder at the first ``do_update_step``); without it, only through ``guidance.attach_checkpointing(system)``.
    """

    @dataclass
    class Config(ScoreDistillationGuidance.Config):
        #: carry this guidance's state in the checkpoints of the system it attaches to (scoredistill.integrity)
        auto_attach: bool = True

    cfg: Config

    def attach_run_integrity(self, system) -> RunIntegrity:
        """:meth:`ScoreDistillationGuidance.attach_run_integrity`, and with ``auto_attach`` this guidance's state
        in ``system``'s checkpoints (restored now if the trainer is already resuming)."""
        integrity = super().attach_run_integrity(system)
        if self.cfg.auto_attach:
            integrity.checkpoint_guidance(self)
        return integrity

    # threestudio / torch-style names of the guidance state
    def state_dict(self) -> Dict[str, Any]:
        """:meth:`guidance_state_dict` (the guidance's own trainable state; no frozen SD weights)."""
        return self.guidance_state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """:meth:`load_guidance_state_dict`."""
        self.load_guidance_state_dict(state)

    def rollback_state(self) -> Dict[str, Any]:
        """A detached copy of :meth:`guidance_state_dict` (parameters, optimizer moments, counters)."""
        return clone_state(self.guidance_state_dict())

    def restore_rollback_state(self, state: Dict[str, Any]) -> None:
        self.load_guidance_state_dict(state)
