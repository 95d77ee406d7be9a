"""Editing systems: a frozen SOURCE asset rendered from the target's camera every step (UDS editing, Eq. 14).

Both systems keep two copies of an existing asset: the trainable TARGET (the system's ``geometry``, initialised
from the asset) and a frozen SOURCE (outside the module tree: not in ``state_dict``, checkpoints or the
optimizer; ``requires_grad=False``; rendered under ``torch.no_grad()``).  Each training step the source is
rendered with the same batch (camera) as the target, composited over the TARGET's background of that step
(``source_rgb = src_fg + (1 − src_opacity) · target_bg``, so random background augmentation is shared), and
passed to the guidance as ``source_rgb=`` together with ``source_prompt_utils=`` (the source prompt's
prompt-processor output, or ``None`` = the target prompt).  Any guidance accepting these keywords works;
the pack's is ``uds-guidance`` with ``mode: editing``.

* ``gsplat-edit-system`` (subclass of ``gsplat-system``): the asset is a 3DGS PLY (``system.source_ply``, e.g.
  the ``gaussians.ply`` exported by a pack run).  The target geometry is initialised from the same PLY
  (``geometry.init: ply``, set here).  The source is rendered with the target's active SH degree, so an
  unchanged target renders bit-identically to the source.
* ``nerf-edit-system`` (subclass of threestudio's ``dreamfusion-system``): the asset is a threestudio
  checkpoint (``system.source_checkpoint``, e.g. ``<trial>/ckpts/last.ckpt`` of an ``implicit-volume`` run).
  Geometry, material and renderer state (occupancy grid) of the source are built from the checkpoint's own
  ``configs/parsed.yaml`` (threestudio's ``geometry_convert_from`` layout) and weights; the target is the
  whole checkpoint loaded through threestudio's ``system.weights`` mechanism (set here).  The source is
  rendered in eval mode (deterministic ray marching), the target in training mode (stratified samples).

At the end of training both systems check that the source is bit-identical to what was loaded and log
``edit source unchanged: True`` (an exception is raised otherwise).

Errors (``ValueError``, before any model loads): missing/nonexistent ``source_ply`` / ``source_checkpoint``;
a checkpoint without its trial's ``configs/parsed.yaml``.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

import threestudio
from threestudio.systems.dreamfusion import DreamFusion
from threestudio.utils.base import Updateable

from scoredistill._registry import register
from scoredistill.integrity import DEFAULT_MAX_NONFINITE_SKIPS, RunIntegrityMixin
from scoredistill.system.gsplat_system import GsplatSystem
from scoredistill.validation import defer_config_snapshot, validate_system_settings


class _SourceMixin:
    """Source-asset plumbing shared by the edit systems (frozen source, source prompt, guidance kwargs)."""

    def _freeze_source(self, *modules) -> None:
        for m in modules:
            if m is None:
                continue
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
        self._source_snapshot = {
            f"{i}.{k}": v.detach().clone()
            for i, m in enumerate(modules) if m is not None for k, v in m.state_dict().items()
        }

    def _source_modules(self):
        raise NotImplementedError

    def _move_source(self) -> None:
        for m in self._source_modules():
            if m is not None:
                m.to(self.device)

    def source_unchanged(self) -> bool:
        now = {
            f"{i}.{k}": v.detach().cpu()
            for i, m in enumerate(self._source_modules()) if m is not None for k, v in m.state_dict().items()
        }
        return set(now) == set(self._source_snapshot) and all(
            torch.equal(now[k], self._source_snapshot[k].cpu()) for k in now
        )

    def _make_source_prompt_processor(self) -> None:
        self.source_prompt_processor = None
        if self.cfg.source_prompt is not None:
            pp_cfg = copy.deepcopy(self.cfg.prompt_processor)
            pp_cfg["prompt"] = self.cfg.source_prompt
            self.source_prompt_processor = threestudio.find(self.cfg.prompt_processor_type)(pp_cfg)

    def _render_source(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        raise NotImplementedError

    def source_guidance_kwargs(self, batch: Dict[str, Any], out: Dict[str, Any]) -> Dict[str, Any]:
        """``{"source_rgb": (B,H,W,3) detached, "source_prompt_utils": ... or None}`` for this step's batch."""
        with torch.no_grad():
            src = self._render_source(batch)
            bg = out["comp_rgb_bg"].detach() if "comp_rgb_bg" in out else src["comp_rgb_bg"]
            source_rgb = src["comp_rgb_fg"] + (1.0 - src["opacity"]) * bg
        spu = self.source_prompt_processor() if self.source_prompt_processor is not None else None
        return {"source_rgb": source_rgb.detach(), "source_prompt_utils": spu}

    def _check_source_at_end(self) -> None:
        ok = self.source_unchanged()
        threestudio.info(f"edit source unchanged: {ok}")
        if not ok:
            raise RuntimeError("the frozen edit source changed during training")


@register("gsplat-edit-system")
class GsplatEditSystem(_SourceMixin, GsplatSystem):
    @dataclass
    class Config(GsplatSystem.Config):
        #: 3DGS PLY of the asset to edit (source and initial target), e.g. <trial>/save/itN-export/gaussians.ply
        source_ply: str = ""
        #: source prompt y_src; null = the target prompt (system.prompt_processor.prompt)
        source_prompt: Optional[str] = None

    cfg: Config

    def configure(self) -> None:
        path = self.cfg.source_ply
        if not path:
            raise ValueError("gsplat-edit-system: system.source_ply must be the path of a 3DGS PLY to edit")
        if not os.path.isfile(path):
            raise ValueError(f"gsplat-edit-system: system.source_ply {path!r} does not exist")
        if not (self.resumed or self.cfg.weights):
            # the target starts from the source asset
            self.cfg.geometry["init"] = "ply"
            self.cfg.geometry["init_path"] = path
        super().configure()
        src_cfg = copy.deepcopy(self.cfg.geometry)
        src_cfg["init"], src_cfg["init_path"] = "ply", path
        geometry = threestudio.find(self.cfg.geometry_type)(src_cfg)
        renderer = threestudio.find(self.cfg.renderer_type)(
            self.cfg.renderer, geometry=geometry, material=self.material, background=self.background
        )
        self._source = {"geometry": geometry, "renderer": renderer}  # plain dict: not a submodule
        self._freeze_source(geometry)
        threestudio.info(f"gsplat-edit-system: source and target from {path} ({geometry.num_gaussians} Gaussians)")

    def _source_modules(self):
        return [self._source["geometry"]]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._move_source()
        self._make_source_prompt_processor()

    def _render_source(self, batch):
        geo = self._source["geometry"]
        geo.active_sh_degree = min(int(getattr(self.geometry, "active_sh_degree", 0)), geo.max_sh_degree)
        return self._source["renderer"](**batch)

    def guidance_kwargs(self, batch: Dict[str, Any], out: Dict[str, Any]) -> Dict[str, Any]:
        kwargs = dict(super().guidance_kwargs(batch, out))
        kwargs.update(self.source_guidance_kwargs(batch, out))
        return kwargs

    def on_train_end(self) -> None:
        self._check_source_at_end()
        super().on_train_end()


class _GuidanceWithSource(Updateable):
    """Wraps the system's guidance so threestudio's ``dreamfusion-system`` training step passes the source."""

    def __init__(self, system, guidance):
        self._system, self._guidance = system, guidance

    def __call__(self, rgb, prompt_utils, *args, **kwargs):
        extra = self._system.source_guidance_kwargs(kwargs, self._system._last_out)
        return self._guidance(rgb, prompt_utils, *args, **kwargs, **extra)

    def do_update_step(self, epoch: int, global_step: int, on_load_weights: bool = False):
        self._guidance.do_update_step(epoch, global_step, on_load_weights=on_load_weights)

    def do_update_step_end(self, epoch: int, global_step: int):
        self._guidance.do_update_step_end(epoch, global_step)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._guidance, name)


@register("nerf-edit-system")
class NerfEditSystem(RunIntegrityMixin, _SourceMixin, DreamFusion):
    @dataclass
    class Config(DreamFusion.Config):
        #: threestudio checkpoint of the asset to edit (its trial folder must hold configs/parsed.yaml)
        source_checkpoint: str = ""
        #: source prompt y_src; null = the target prompt
        source_prompt: Optional[str] = None
        #: consecutive skipped (non-finite) optimizer steps that stop the run (scoredistill.integrity.finite)
        max_nonfinite_skips: int = DEFAULT_MAX_NONFINITE_SKIPS

    cfg: Config

    def configure(self) -> None:
        from threestudio.utils.config import load_config, parse_structured

        self.attach_run_integrity(self.cfg.max_nonfinite_skips, "system.max_nonfinite_skips")
        from threestudio.utils.misc import load_module_weights

        validate_system_settings(self)  # before the source checkpoint and any model load
        ckpt = self.cfg.source_checkpoint
        if not ckpt:
            raise ValueError("nerf-edit-system: system.source_checkpoint must be a threestudio checkpoint to edit")
        if not os.path.isfile(ckpt):
            raise ValueError(f"nerf-edit-system: system.source_checkpoint {ckpt!r} does not exist")
        parsed = os.path.join(os.path.dirname(ckpt), "..", "configs", "parsed.yaml")
        if not os.path.isfile(parsed):
            raise ValueError(f"nerf-edit-system: {parsed} not found (source_checkpoint must be <trial>/ckpts/*.ckpt)")
        if not (self.resumed or self.cfg.weights):
            self.cfg.weights = ckpt  # the target starts from the whole source system (BaseSystem.load_weights)
        super().configure()
        prev = parse_structured(DreamFusion.Config, load_config(parsed).system)
        if prev.geometry_type != self.cfg.geometry_type:
            raise ValueError(
                f"nerf-edit-system: the checkpoint's geometry_type {prev.geometry_type!r} differs from "
                f"system.geometry_type {self.cfg.geometry_type!r}"
            )
        geometry = threestudio.find(prev.geometry_type)(prev.geometry)
        sd, epoch, step = load_module_weights(ckpt, module_name="geometry", map_location="cpu")
        geometry.load_state_dict(sd, strict=False)
        geometry.do_update_step(epoch, step, on_load_weights=True)
        material = threestudio.find(prev.material_type)(prev.material)
        sd, _, _ = load_module_weights(ckpt, module_name="material", map_location="cpu")
        material.load_state_dict(sd, strict=False)
        material.do_update_step(epoch, step, on_load_weights=True)
        renderer = threestudio.find(self.cfg.renderer_type)(
            self.cfg.renderer, geometry=geometry, material=material, background=self.background
        )
        sd, _, _ = load_module_weights(ckpt, module_name="renderer", map_location="cpu")
        renderer.load_state_dict(sd, strict=False)
        self._source = {"geometry": geometry, "material": material, "renderer": renderer}
        self._freeze_source(geometry, material, renderer)
        self._last_out: Dict[str, Any] = {}
        threestudio.info(f"nerf-edit-system: source and target from {ckpt}")

    def _source_modules(self):
        return [self._source["geometry"], self._source["material"], self._source["renderer"]]

    def forward(self, batch):
        out = super().forward(batch)
        self._last_out = out
        return out

    def setup(self, stage: Optional[str] = None) -> None:
        defer_config_snapshot(getattr(self, "_trainer", None))  # a failed start keeps an existing trial's configs

    def on_fit_start(self) -> None:
        super().on_fit_start()  # creates prompt_processor and guidance
        self.run_integrity.add_guidance(self.guidance)  # before the wrapper: the guidance itself attaches
        self._move_source()
        self._make_source_prompt_processor()
        self.guidance = _GuidanceWithSource(self, self.guidance)

    def _render_source(self, batch):
        return self._source["renderer"](**batch)

    def on_train_end(self) -> None:
        self._check_source_at_end()
        super().on_train_end()
