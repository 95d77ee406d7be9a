"""threestudio geometry ``gsplat-gaussian-splatting``: a set of 3D Gaussians (adapter over
``gaussian_params.py``, ``spherical_harmonics.py``, ``gaussian_ply.py``, ``gaussian_init.py``).

The parameters live in ``self.params`` (an ``nn.ParameterDict`` with gsplat's keys ``means, scales, quats,
opacities, sh0, shN``; see :mod:`scoredistill.geometry.gaussian_params`) and are also reachable as attributes
``geometry.means`` etc., so threestudio's optimizer config can name them (``geometry.means``).
The number of Gaussians changes during densification; loading a state dict resizes the parameters to the
stored shapes (checkpoints of densified models load into a freshly initialised geometry).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

import threestudio
from threestudio.models.geometry.base import BaseGeometry

from scoredistill._registry import register
from scoredistill.geometry import gaussian_init, gaussian_params, gaussian_ply, spherical_harmonics
from scoredistill.settings import INF, check_range, in_range, parse_settings

INIT_METHODS = ("sphere", "box", "point_cloud", "mesh", "shap_e", "ply", "empty")


@register("gsplat-gaussian-splatting")
class GsplatGaussianSplatting(BaseGeometry):
    @dataclass
    class Config(BaseGeometry.Config):
        #: maximum SH degree (0..3); the active degree grows by one every ``sh_degree_interval`` steps
        sh_degree: int = 0
        sh_degree_interval: int = 1000
        #: sphere | box | point_cloud (.ply points) | mesh (.obj/.ply surface) | shap_e (text) | ply (3DGS PLY) | empty
        init: str = "sphere"
        init_path: Optional[str] = None
        #: points drawn from the shape / mesh surface / Shap-E mesh (before upsampling)
        num_points: int = 4096
        #: sphere radius / box half extent
        init_radius: float = 0.5
        init_sphere_surface: bool = False
        #: RGB in [0, 1] for shapes and colourless sources; None = uniform random colours
        init_color: Optional[List[float]] = None
        init_opacity: float = 0.1
        #: isotropic initial std; None = 3DGS's sqrt(mean squared distance to 3 nearest neighbours)
        init_scale: Optional[float] = None
        #: grow the cloud to this many points (0 = off): parents + N(0, upsample_jitter^2) offsets
        upsample_to: int = 0
        upsample_jitter: float = 0.02
        upsample_color_jitter: float = 0.0
        #: placement of loaded/generated clouds: y-up -> z-up swap, rotation about z (deg), scale, offset
        init_swap_yz: bool = False
        init_rotation_deg_z: float = 0.0
        init_scale_factor: float = 1.0
        init_offset: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
        #: Shap-E (diffusers ShapEPipeline) text-to-3D initialisation
        shap_e_prompt: Optional[str] = None
        shap_e_model: str = "openai/shap-e"
        shap_e_guidance_scale: float = 15.0
        shap_e_num_inference_steps: int = 64
        shap_e_frame_size: int = 256
        seed: int = 0
        #: init: ply / load_ply with a file of a HIGHER SH degree than sh_degree: false = refuse (3DGS's loader
        #: asserts the band count), true = drop the extra bands explicitly. A lower degree is zero-padded.
        drop_sh_bands: bool = False
        #: active SH degree at step 0; null = 0, or the PLY's degree for init: ply (the imported asset keeps
        #: its view-dependent colour from the first step); the 3DGS schedule never lowers it
        initial_active_sh_degree: Optional[int] = None

    cfg: Config

    def configure(self) -> None:
        super().configure()
        self._check_config()
        self.max_sh_degree = int(self.cfg.sh_degree)
        params = self._initial_params()
        floor = self.cfg.initial_active_sh_degree
        if floor is None:
            floor = getattr(self, "_file_sh_degree", 0)
        #: the 3DGS schedule starts here (a PLY's own degree for init: ply) and never goes below it
        self.min_active_sh_degree = min(int(floor), self.max_sh_degree)
        self.active_sh_degree = (
            max(self.min_active_sh_degree, 0) if self.cfg.sh_degree_interval > 0 else self.max_sh_degree
        )
        self.params = nn.ParameterDict({k: nn.Parameter(v.contiguous()) for k, v in params.items()})

    # ------------------------------------------------------------------------------------------
    def _check_config(self) -> None:
        self.validate_settings(self.cfg, prefix=getattr(self, "_setting_prefix", "system.geometry"))

    def _initial_params(self) -> Dict[str, torch.Tensor]:
        c = self.cfg
        gen = torch.Generator().manual_seed(c.seed)
        k = spherical_harmonics.num_sh_bases(c.sh_degree)
        if c.init == "empty":
            return {
                "means": torch.zeros(0, 3), "scales": torch.zeros(0, 3), "quats": torch.zeros(0, 4),
                "opacities": torch.zeros(0), "sh0": torch.zeros(0, 1, 3), "shN": torch.zeros(0, k - 1, 3),
            }
        prefix = getattr(self, "_setting_prefix", "system.geometry")
        if c.init == "ply":
            loaded = gaussian_ply.load_gaussians_ply(
                c.init_path, sh_degree=c.sh_degree, drop_sh_bands=c.drop_sh_bands,
                setting=f"{prefix}.init_path", sh_setting=f"{prefix}.sh_degree",
            )
            self._file_sh_degree = min(gaussian_ply.ply_sh_degree(c.init_path), int(c.sh_degree))
            return loaded
        colors = None
        if c.init == "sphere":
            points = gaussian_init.sample_sphere(c.num_points, c.init_radius, surface=c.init_sphere_surface, generator=gen)
        elif c.init == "box":
            points = gaussian_init.sample_box(c.num_points, c.init_radius, generator=gen)
        elif c.init == "point_cloud":
            points, colors = gaussian_init.load_point_cloud(c.init_path, setting=f"{prefix}.init_path")
        elif c.init == "mesh":
            verts, faces, vcol = gaussian_init.load_mesh(c.init_path)
            points, colors = gaussian_init.sample_mesh_surface(verts, faces, c.num_points, vcol, generator=gen)
        else:  # shap_e
            verts, faces, channels = gaussian_init.run_shap_e(
                c.shap_e_prompt, c.shap_e_model, c.shap_e_guidance_scale, c.shap_e_num_inference_steps,
                c.shap_e_frame_size, device=str(self.device), seed=c.seed,
            )
            points, colors = gaussian_init.shap_e_mesh_to_points(verts, faces, channels, c.num_points, generator=gen)
        if c.init in ("point_cloud", "mesh", "shap_e"):
            points = gaussian_init.apply_init_transform(points, c.init_scale_factor, c.init_rotation_deg_z, c.init_swap_yz, c.init_offset)
        if colors is None:
            if c.init_color is not None:
                colors = torch.tensor(c.init_color, dtype=torch.float32).expand(points.shape[0], 3).clone()
            else:
                colors = torch.rand(points.shape[0], 3, generator=gen)
        if c.upsample_to > 0:
            points, colors = gaussian_init.upsample_points(points, colors, c.upsample_to, c.upsample_jitter, c.upsample_color_jitter, generator=gen)
        return gaussian_init.params_from_points(points, colors, c.sh_degree, c.init_opacity, c.init_scale)

    # ------------------------------------------------------------------------------------------
    @property
    def means(self) -> nn.Parameter:
        return self.params["means"]

    @property
    def scales(self) -> nn.Parameter:
        return self.params["scales"]

    @property
    def quats(self) -> nn.Parameter:
        return self.params["quats"]

    @property
    def opacities(self) -> nn.Parameter:
        return self.params["opacities"]

    @property
    def sh0(self) -> nn.Parameter:
        return self.params["sh0"]

    @property
    def shN(self) -> nn.Parameter:
        return self.params["shN"]

    @property
    def num_gaussians(self) -> int:
        return int(self.params["means"].shape[0])

    def activated(self) -> Dict[str, torch.Tensor]:
        """``means, scales (>0), quats (unit), opacities (0..1), colors [N, K, 3]`` (see gaussian_params.activated)."""
        return gaussian_params.activated(dict(self.params.items()))

    def export_params(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.params.items()}

    def save_ply(self, path: str) -> str:
        return gaussian_ply.save_gaussians_ply(path, dict(self.params.items()))

    def load_ply(self, path: str) -> None:
        loaded = gaussian_ply.load_gaussians_ply(
            path, sh_degree=self.max_sh_degree, drop_sh_bands=self.cfg.drop_sh_bands, sh_setting="system.geometry.sh_degree"
        )
        dev = self.params["means"].device
        for k, v in loaded.items():
            self.params[k] = nn.Parameter(v.to(dev))

    def export(self, *args, **kwargs) -> Dict[str, Any]:
        return {"gaussians": self.export_params()}

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False):
        scheduled = spherical_harmonics.active_sh_degree_at(global_step, self.max_sh_degree, self.cfg.sh_degree_interval)
        self.active_sh_degree = max(scheduled, int(getattr(self, "min_active_sh_degree", 0)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # densified checkpoints hold a different number of Gaussians: resize before copying
        for k in list(self.params.keys()):
            key = f"{prefix}params.{k}"
            if key in state_dict and state_dict[key].shape != self.params[k].shape:
                cur = self.params[k]
                self.params[k] = nn.Parameter(
                    torch.empty(state_dict[key].shape, dtype=cur.dtype, device=cur.device), requires_grad=cur.requires_grad
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    @classmethod
    def validate_settings(cls, cfg: Any, prefix: str = "system.geometry") -> "GsplatGaussianSplatting.Config":
        """Parse and check a ``gsplat-gaussian-splatting`` config (``system.geometry``) without loading anything.

        Every number must be finite (:func:`scoredistill.settings.check_range`); ``init_path`` must exist for the
        file initialisers and ``shap_e_prompt`` be given for ``init: shap_e``.  Returns the parsed ``Config``.

        Raises:
            ValueError: naming the full dotted setting (``{prefix}.init_radius``, ...) and its allowed range.
        """
        c = parse_settings(cls.Config, cfg, prefix)

        def num(name, low=-INF, high=INF, open_low=False, open_high=False, integer=False, optional=False):
            check_range(getattr(c, name), f"{prefix}.{name}", low, high, open_low, open_high, integer, optional)

        if c.init not in INIT_METHODS:
            raise ValueError(f"{prefix}.init must be one of {INIT_METHODS}, got {c.init!r}")
        num("sh_degree", 0, 3, integer=True)
        num("sh_degree_interval", integer=True)
        num("initial_active_sh_degree", 0, 3, integer=True, optional=True)
        if c.init in ("point_cloud", "mesh", "ply"):
            if not c.init_path:
                raise ValueError(f"{prefix}.init={c.init!r} needs {prefix}.init_path")
            if not os.path.isfile(str(c.init_path)):
                raise ValueError(f"{prefix}.init_path = {str(c.init_path)!r}: no such file")
        if c.init == "shap_e":
            prompt = c.shap_e_prompt
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{prefix}.init='shap_e' needs {prefix}.shap_e_prompt (a non-empty text), got {prompt!r}")
        num("num_points", 1, integer=True)
        num("init_opacity", 0.0, 1.0, open_low=True, open_high=True)
        num("init_radius", 0, open_low=True)
        num("init_scale", 0, open_low=True, optional=True)
        num("upsample_to", 0, integer=True)
        num("upsample_jitter", 0)
        num("upsample_color_jitter", 0)
        num("init_rotation_deg_z")
        num("init_scale_factor", 0, open_low=True)
        num("shap_e_guidance_scale", 0, open_low=True)
        num("shap_e_num_inference_steps", 1, integer=True)
        num("shap_e_frame_size", 8, integer=True)
        offset = c.init_offset
        if offset is None or len(offset) != 3 or not all(in_range(v) for v in offset):
            raise ValueError(f"{prefix}.init_offset must be 3 finite numbers, got {offset!r}")
        color = c.init_color
        if color is not None and (len(color) != 3 or not all(in_range(v, 0.0, 1.0) for v in color)):
            raise ValueError(f"{prefix}.init_color must be 3 values in [0, 1] or null, got {color!r}")
        return c
