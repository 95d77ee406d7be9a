"""threestudio adapter: ``ge3d-guidance`` (GE3D, text-to-3D by 2D editing; maths in :mod:`.ge3d`).

Returns ``loss_sds`` (so ``dreamfusion-system``'s ``lambda_sds`` weights it), ``grad_norm``, the trajectory
``ge3d_t0 .. ge3d_t{n}``, the DBC weights ``ge3d_w0 .. ge3d_w{n-1}`` and the per-node residual RMS
``ge3d_res0 ..`` as scalars.  Configuration in ``docs/ge3d.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from .._registry import register
from ..sync import host_only
from .base import ScoreDistillationGuidance, _primitive
from ..maths.ge3d import (
    annealed_trajectory_params,
    dbc_weights,
    ge3d_grad,
    random_trajectory,
    validate_random_trajectory,
    validate_timesteps,
)

#: SD's number of training timesteps, used to validate nodes before the scheduler is loaded
_T_DEFAULT = 1000
TRAJECTORIES = ("random", "fixed")


@register("ge3d-guidance")
class GE3DGuidance(ScoreDistillationGuidance):
    """GE3D guidance (Algorithm 1 with DBC, Eq. 9-11).  Exactly ``n`` unconditional + ``n`` CFG (batch 2B)
    UNet calls per iteration for ``B`` views (Perp-Neg: batch 4B)."""

    @dataclass
    class Config(ScoreDistillationGuidance.Config):
        guidance_scale: float = 7.5
        #: "random": n intervals redrawn every iteration from [jump_min, jump_max); "fixed": ``timesteps``
        trajectory: str = "random"
        #: number of intervals n (random trajectory); fixed trajectories have n = len(timesteps) - 1
        n_steps: int = 6
        #: fixed nodes [t_0, ..., t_n], strictly increasing in [0, 1000)
        timesteps: Optional[List[int]] = None
        #: random trajectory: interval bounds [jump_min, jump_max) and farthest node t_n; each a number or
        #: [start, end] annealed linearly over trainer_max_steps.  Default: the paper's setting (Sec. 4: intervals
        #: of 60-80, constant; farthest node 480).  The authors' reference code anneals instead:
        #: jump_min [60, 30], jump_max [80, 50], max_timestep [480, 300].
        jump_min: Any = 60
        jump_max: Any = 80
        max_timestep: Any = 480
        #: dynamic balancing coefficient (Eq. 9-10); off = uniform 1/n
        dbc: bool = True
        dbc_sigma: float = 1000.0
        #: option (not in Alg. 1): forward-noise the render to t_0 before inversion, with per-channel offset noise
        noise_to_first_node: bool = False
        offset_noise: float = 0.0

    cfg: Config

    def validate_config(self) -> None:
        super().validate_config()
        cfg = self.cfg
        if cfg.trajectory not in TRAJECTORIES:
            raise ValueError(f"trajectory must be one of {TRAJECTORIES}, got {cfg.trajectory!r}")
        if cfg.trajectory == "fixed":
            if cfg.timesteps is None:
                raise ValueError("trajectory 'fixed' needs timesteps: [t_0, ..., t_n] (n >= 1)")
            validate_timesteps(list(_primitive(cfg.timesteps)), _T_DEFAULT)
        else:
            validate_random_trajectory(
                cfg.n_steps, _primitive(cfg.jump_min), _primitive(cfg.jump_max), _primitive(cfg.max_timestep), _T_DEFAULT
            )
        if not cfg.dbc_sigma > 0:
            raise ValueError(f"dbc_sigma must be > 0, got {cfg.dbc_sigma}")
        if cfg.offset_noise < 0:
            raise ValueError(f"offset_noise must be >= 0, got {cfg.offset_noise}")
        if cfg.offset_noise > 0 and not cfg.noise_to_first_node:
            raise ValueError("offset_noise > 0 needs noise_to_first_node: true (Algorithm 1 adds no random noise)")

    def configure(self) -> None:
        super().configure()
        if self.cfg.trajectory == "fixed":
            self.fixed_timesteps = validate_timesteps(list(_primitive(self.cfg.timesteps)), self.num_train_timesteps)
        self.last_timesteps: List[int] = []
        self.last_weights: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ per-iteration trajectory and weights
    @property
    def n_intervals(self) -> int:
        return len(self.fixed_timesteps) - 1 if self.cfg.trajectory == "fixed" else self.cfg.n_steps

    def current_timesteps(self, generator: Optional[torch.Generator] = None) -> List[int]:
        """Nodes ``[t_0, ..., t_n]`` for this iteration (fixed, or drawn with the annealed reference schedule)."""
        if self.cfg.trajectory == "fixed":
            return list(self.fixed_timesteps)
        jmin, jmax, tmax = annealed_trajectory_params(
            self.global_step,
            self.cfg.trainer_max_steps,
            _primitive(self.cfg.jump_min),
            _primitive(self.cfg.jump_max),
            _primitive(self.cfg.max_timestep),
        )
        return random_trajectory(self.cfg.n_steps, jmin, max(jmax, jmin + 1), tmax, generator=generator)

    def current_weights(self) -> torch.Tensor:
        """ω̃(i, k) at k = global_step, K = trainer_max_steps (Eq. 9-10), or uniform with ``dbc: false``."""
        return dbc_weights(self.n_intervals, self.global_step, self.cfg.trainer_max_steps, self.cfg.dbc_sigma, self.cfg.dbc)

    # ------------------------------------------------------------------ Algorithm 1
    def compute_grad(self, latents, prompt_utils, elevation, azimuth, camera_distances, **kwargs):
        B = latents.shape[0]
        timesteps = self.current_timesteps()
        weights = self.current_weights()
        emb = self.text_embeddings_for(prompt_utils, elevation, azimuth, camera_distances)
        uncond = emb[0][B : 2 * B]  # ∅: the prompt processor's unconditional / negative-prompt embedding

        def tvec(t: int) -> torch.Tensor:
            return torch.full((B,), int(t), dtype=torch.long, device=latents.device)

        def noise_pred_uncond_fn(x, t):
            return self.forward_unet(x, tvec(t), uncond)

        def noise_pred_fn(x, t):
            return self.predict_noise_cfg(x, tvec(t), prompt_utils, elevation, azimuth, camera_distances, text_embeddings=emb)["noise_pred"]

        with torch.no_grad():
            grad, info = ge3d_grad(
                noise_pred_uncond_fn,
                noise_pred_fn,
                latents.detach(),
                timesteps,
                self.alphas_cumprod,
                weights=weights,
                offset_noise=self.cfg.offset_noise,
                noise_to_first_node=self.cfg.noise_to_first_node,
            )
        self.last_timesteps, self.last_weights = timesteps, info["weights"]
        out = {"grad": grad, "ge3d_n": len(timesteps) - 1}
        for i, t in enumerate(timesteps):
            out[f"ge3d_t{i}"] = int(t)
        # weights: the host tensor of current_weights() (no device read); residuals stay 0-d device tensors, read
        # only when the system logs them (a .tolist() here would wait for the whole step's GPU work each step)
        with host_only():
            for i, w in enumerate(weights.tolist()):
                out[f"ge3d_w{i}"] = float(w)
        for i in range(len(timesteps) - 1):
            out[f"ge3d_res{i}"] = info["residuals"][i].detach()
        return out
