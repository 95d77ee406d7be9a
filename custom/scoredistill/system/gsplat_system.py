"""threestudio system ``gsplat-system``: score distillation on 3D Gaussians with gsplat densification.

Training is threestudio's ``dreamfusion-system`` loop: render, call the guidance as
``self.guidance(out["comp_rgb"], prompt_utils, **batch, **self.guidance_kwargs(batch, out), rgb_as_latents=False)``
and sum every returned ``loss_*`` times its ``system.loss.lambda_*`` (threestudio ``C()`` schedules).
On top of it:

* one optimizer with a parameter group per Gaussian parameter (``geometry.means`` ... ``geometry.shN``),
  lrs from ``system.optimizer.params`` (defaults of 3DGS for any group not given), and the scheduled
  position lr ``system.position_lr`` (3DGS's log-linear decay);
* densify / prune / opacity reset after every optimizer step with ``gsplat.strategy``
  (``system.strategy``, see :mod:`scoredistill.geometry.densify`);
* checkpoints hold the current (densified) Gaussians and the strategy's running state; resuming resizes the
  geometry first;
* validation / test images and the test video like dreamfusion-system, and the PLY written at the end of
  training (``system.save_ply_on_train_end``) and by ``--export`` (exporter ``gsplat-ply-exporter``);
* multi-GPU (``launch.py --gpu 0,1``, Lightning DDP): the system averages the gradients of its current
  (densified) Gaussians over the ranks itself (DDP's own reduction, whose buckets hold the tensors of before
  densification, is switched off), the densifier uses the union's statistics and a shared seed, and the PLY
  and test video are written by rank 0 -- see :mod:`scoredistill.distributed` and ``docs/multi-gpu.md``.

Extension points for other methods: :meth:`guidance_kwargs` (extra guidance arguments per step, e.g. a
frozen source render for UDS editing) and :meth:`extra_losses` (additional named ``loss_*`` terms).
"""
from __future__ import annotations

import os
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

import threestudio
from threestudio.systems.base import BaseLift3DSystem
from threestudio.systems.utils import get_parameters, parse_scheduler

from scoredistill import distributed
from scoredistill._registry import register
from scoredistill.sync import log_host
from scoredistill.geometry.densify import GaussianDensifier, group_views, scheduled_lr
from scoredistill.geometry.gaussian_params import PARAM_KEYS
from scoredistill.geometry.gaussian_ply import save_gaussians_ply
from scoredistill.settings import check_range
from scoredistill.validation import defer_config_snapshot, validate_system_settings
from scoredistill.integrity import DEFAULT_MAX_NONFINITE_SKIPS, RunIntegrityMixin, get_finite_guard

#: learning rates of the reference 3DGS implementation (position lr before scene-extent scaling)
DEFAULT_LRS = {
    "means": 1.6e-4,
    "scales": 5e-3,
    "quats": 1e-3,
    "opacities": 5e-2,
    "sh0": 2.5e-3,
    "shN": 2.5e-3 / 20.0,
}


@register("gsplat-system")
class GsplatSystem(RunIntegrityMixin, BaseLift3DSystem):
    @dataclass
    class Config(BaseLift3DSystem.Config):
        #: gsplat strategy: type default | mcmc | none, scene_scale, opacity_reset, DefaultStrategy/MCMCStrategy fields
        strategy: dict = field(default_factory=lambda: {"type": "default"})
        #: scheduled position lr: {lr_init, lr_final (null = constant), max_steps, delay_steps, delay_mult, mode exp|linear}
        position_lr: Optional[dict] = None
        save_ply_on_train_end: bool = True
        ply_name: str = "gaussians.ply"
        #: also write the depth map in validation/test grids
        visualize_depth: bool = False
        #: consecutive skipped (non-finite) optimizer steps that stop the run (scoredistill.integrity.finite)
        max_nonfinite_skips: int = DEFAULT_MAX_NONFINITE_SKIPS

    cfg: Config

    # ------------------------------------------------------------------------------------------
    def configure(self) -> None:
        if (self.resumed or self.cfg.weights) and self.cfg.geometry.get("init", "sphere") != "empty":
            # the checkpoint brings the Gaussians: skip (possibly expensive) initialisation; an imported PLY's
            # SH degree stays the floor of the active degree (it is read from the PLY header only)
            if (
                self.cfg.geometry.get("init") == "ply"
                and self.cfg.geometry.get("initial_active_sh_degree") is None
                and self.cfg.geometry.get("init_path")
                and os.path.isfile(str(self.cfg.geometry.get("init_path")))
            ):
                from scoredistill.geometry.gaussian_ply import ply_sh_degree

                file_degree = ply_sh_degree(str(self.cfg.geometry["init_path"]), "system.geometry.init_path")
                self.cfg.geometry["initial_active_sh_degree"] = min(file_degree, int(self.cfg.geometry.get("sh_degree", 0)))
            self.cfg.geometry["init"] = "empty"
        # every setting (prompt, guidance, geometry, renderer, strategy, exporter) before Shap-E / models load
        validate_system_settings(self)
        if not isinstance(self.cfg.ply_name, str) or not self.cfg.ply_name.endswith(".ply"):
            raise ValueError(f"system.ply_name must be a file name ending with .ply, got {self.cfg.ply_name!r}")
        # run integrity: finite-step guard (validates system.max_nonfinite_skips) and resume check, before models load
        self.attach_run_integrity(self.cfg.max_nonfinite_skips, "system.max_nonfinite_skips")
        self.densifier = GaussianDensifier(dict(self.cfg.strategy))  # validates before models load
        if self.cfg.position_lr is not None:
            self._position_lr(0)  # validate
        super().configure()
        self._step_info: Optional[Dict[str, Any]] = None
        self._step_index: int = 0
        self._pending_strategy_state = None

    def setup(self, stage: Optional[str] = None) -> None:
        # threestudio's config snapshot is written after the guidance loaded (a failed start keeps the trial's files)
        defer_config_snapshot(getattr(self, "_trainer", None))

    def _position_lr(self, step: int) -> float:
        p = dict(self.cfg.position_lr)
        for key in ("lr_init", "lr_final", "max_steps", "delay_steps", "delay_mult"):
            check_range(p.get(key), f"system.position_lr.{key}", optional=True)
        return scheduled_lr(
            step,
            float(p.get("lr_init", DEFAULT_LRS["means"])),
            None if p.get("lr_final") is None else float(p["lr_final"]),
            int(p.get("max_steps", 30000)),
            int(p.get("delay_steps", 0)),
            float(p.get("delay_mult", 1.0)),
            str(p.get("mode", "exp")),
        )

    def configure_optimizers(self):
        opt_cfg = self.cfg.optimizer
        given = dict(opt_cfg.get("params", {}) or {})
        groups = []
        for key in PARAM_KEYS:
            name = f"geometry.{key}"
            args = dict(given.pop(name, {"lr": DEFAULT_LRS[key]}))
            groups.append({"params": [self.geometry.params[key]], "name": name, **args})
        for name, args in given.items():
            if name.startswith("geometry"):
                raise ValueError(f"system.optimizer.params.{name}: Gaussian groups are geometry.{{{', '.join(PARAM_KEYS)}}}")
            params = get_parameters(self, name)
            params = [params] if isinstance(params, torch.nn.Parameter) else list(params)
            groups.append({"params": params, "name": name, **dict(args)})
        name = opt_cfg.get("name", "Adam")
        if not hasattr(torch.optim, name):
            raise ValueError(f"system.optimizer.name must be a torch.optim optimizer, got {name!r}")
        optim = getattr(torch.optim, name)(groups, **dict(opt_cfg.get("args", {}) or {}))
        self._gs_optimizer = optim
        ret = {"optimizer": optim}
        if self.cfg.scheduler is not None:
            ret["lr_scheduler"] = parse_scheduler(self.cfg.scheduler, optim)
        return ret

    def _views(self):
        return group_views(self._gs_optimizer, {k: f"geometry.{k}" for k in PARAM_KEYS})

    # ------------------------------------------------------------------------------------------
    def forward(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return self.renderer(**batch)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.densifier.check_device(self.geometry.params["means"].device)
        if self._pending_strategy_state is not None:
            self.densifier.load_state_dict(self._pending_strategy_state, device=self.geometry.params["means"].device)
            self._pending_strategy_state = None
        self.prompt_processor = threestudio.find(self.cfg.prompt_processor_type)(self.cfg.prompt_processor)
        self.guidance = threestudio.find(self.cfg.guidance_type)(self.cfg.guidance)
        self.run_integrity.add_guidance(self.guidance)  # a pack guidance: its limit, its checkpointed state
        # DDP: densification replaces the parameter tensors, which DDP's buckets / hooks would not follow;
        # DDP's reduction is switched off and on_before_optimizer_step averages the current gradients instead
        if distributed.is_distributed() and not distributed.sync_disabled("system"):
            distributed.disable_ddp_grad_sync(self.trainer.strategy.model)
        distributed.warn_uneven_eval_views(getattr(getattr(self.trainer, "datamodule", None), "cfg", None), threestudio.warn)

    def on_before_optimizer_step(self, optimizer) -> None:
        # DDP: gradients of the optimizer's current parameters averaged over the ranks (union of their views),
        # before anything reads them (no-op in one process)
        distributed.all_reduce_grads_(
            [p for g in optimizer.param_groups for p in g["params"]], part="system"
        )
        super().on_before_optimizer_step(optimizer)

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False):
        if self.cfg.position_lr is not None and getattr(self, "_gs_optimizer", None) is not None:
            lr = self._position_lr(global_step)
            for g in self._gs_optimizer.param_groups:
                if g.get("name") == "geometry.means":
                    g["lr"] = lr

    def guidance_kwargs(self, batch: Dict[str, Any], out: Dict[str, Any]) -> Dict[str, Any]:
        """Extra keyword arguments for the guidance call (hook for subclasses; none here)."""
        return {}

    def extra_losses(self, batch: Dict[str, Any], out: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Additional ``loss_*`` terms weighted by ``system.loss.lambda_*`` (hook; MCMC regularisers here)."""
        losses = {}
        if self._lambda("lambda_opacity_reg") > 0:
            losses["loss_opacity_reg"] = torch.sigmoid(self.geometry.params["opacities"]).abs().mean()
        if self._lambda("lambda_scale_reg") > 0:
            losses["loss_scale_reg"] = torch.exp(self.geometry.params["scales"]).abs().mean()
        return losses

    def _lambda(self, name: str) -> float:
        if name not in self.cfg.loss:
            return 0.0
        return float(self.C(self.cfg.loss[name]))

    def _log_host(self, name, value, **kwargs):
        log_host(self, name, value, **kwargs)  # no host-to-device copy per logged number (scoredistill.sync.log_host)

    def training_step(self, batch, batch_idx):
        step = self.true_global_step
        if self.geometry.num_gaussians == 0:  # otherwise an unrelated autograd error ("does not require grad")
            raise RuntimeError(
                f"gsplat-system: no Gaussians left to optimise at step {step} (all pruned: check "
                f"system.strategy.prune_opa / prune_scale3d / prune_scale2d, or the init)"
            )
        out = self(batch)
        info = out.get("gsplat_info") or {}
        if self.densifier.type != "none":
            self.densifier.pre_backward(self.geometry.params, None, step, info)
        prompt_utils = self.prompt_processor()
        guidance_out = self.guidance(
            out["comp_rgb"], prompt_utils, **batch, **self.guidance_kwargs(batch, out), rgb_as_latents=False
        )
        loss = 0.0
        terms = dict(guidance_out)
        terms.update(self.extra_losses(batch, out))
        for name, value in terms.items():
            if not (isinstance(value, torch.Tensor) and value.numel() > 1):
                self._log_host(f"train/{name}", value)
            if name.startswith("loss_"):
                lam = name.replace("loss_", "lambda_")
                if lam not in self.cfg.loss:
                    raise ValueError(f"system.loss.{lam} is not set but the guidance/system returns {name}")
                loss = loss + value * self.C(self.cfg.loss[lam])
        if self._lambda("lambda_sparsity") > 0:  # dreamfusion-system's opacity sparsity term
            loss_sparsity = (out["opacity"] ** 2 + 0.01).sqrt().mean()
            self._log_host("train/loss_sparsity", loss_sparsity)
            loss = loss + loss_sparsity * self._lambda("lambda_sparsity")
        self._log_host("train/num_gaussians", float(self.geometry.num_gaussians))
        for name, value in self.cfg.loss.items():
            self._log_host(f"train_params/{name}", self.C(value))
        self._step_info = info
        self._step_index = step
        return {"loss": loss}

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        # densify right after the optimizer step (before any checkpoint callback of this batch runs)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._densify()

    def _densify(self) -> None:
        guard = get_finite_guard(self)
        if guard is not None and guard.last_skipped:  # a skipped (non-finite) step: no densification statistics
            self._step_info = None
            return
        if self._step_info is None or self.densifier.type == "none":
            self._step_info = None
            return
        lr = None
        for g in self._gs_optimizer.param_groups:
            if g.get("name") == "geometry.means":
                lr = g["lr"]
        counts = self.densifier.post_backward(self.geometry.params, self._views(), self._step_index, self._step_info, lr=lr)
        if counts["before"] != counts["after"]:
            threestudio.info(f"step {self._step_index}: densification {counts['before']} -> {counts['after']} Gaussians")
        self._step_info = None

    # ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["gsplat_strategy_state"] = self.densifier.state_dict()
        checkpoint["gsplat_num_gaussians"] = self.geometry.num_gaussians

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        shN = (checkpoint.get("state_dict") or {}).get("geometry.params.shN")
        want = self.cfg.geometry.get("sh_degree", 0)
        if isinstance(shN, torch.Tensor) and shN.dim() == 3:
            have = math.isqrt(shN.shape[1] + 1) - 1
            if have != want:
                path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
                raise ValueError(
                    f"resume={path or '<checkpoint>'}: the checkpoint's Gaussians have SH degree {have} "
                    f"(geometry.params.shN of shape {tuple(shN.shape)}), this config has system.geometry.sh_degree={want}; "
                    f"resume with system.geometry.sh_degree={have}, or start a new trial"
                )
        if "gsplat_strategy_state" in checkpoint:
            self._pending_strategy_state = checkpoint["gsplat_strategy_state"]

    # ------------------------------------------------------------------------------------------
    def _image_grid(self, out):
        items = [{"type": "rgb", "img": out["comp_rgb"][0], "kwargs": {"data_format": "HWC"}}]
        if self.cfg.visualize_depth:
            items.append({"type": "grayscale", "img": out["depth"][0, :, :, 0], "kwargs": {}})
        items.append({"type": "grayscale", "img": out["opacity"][0, :, :, 0], "kwargs": {"cmap": None, "data_range": (0, 1)}})
        return items

    def validation_step(self, batch, batch_idx):
        out = self(batch)
        self.save_image_grid(
            f"it{self.true_global_step}-{batch['index'][0]}.png", self._image_grid(out),
            name="validation_step", step=self.true_global_step,
        )

    def on_validation_epoch_end(self):
        pass

    def test_step(self, batch, batch_idx):
        out = self(batch)
        self.save_image_grid(
            f"it{self.true_global_step}-test/{batch['index'][0]}.png", self._image_grid(out),
            name="test_step", step=self.true_global_step,
        )

    def on_test_epoch_end(self):
        if distributed.is_distributed():  # DDP: every rank wrote its share of the test views; one video
            self.trainer.strategy.barrier()
        if self.global_rank == 0:
            self.save_img_sequence(
                f"it{self.true_global_step}-test", f"it{self.true_global_step}-test", r"(\d+)\.png",
                save_format="mp4", fps=30, name="test", step=self.true_global_step,
            )
        threestudio.info(f"test rendered {self.geometry.num_gaussians} Gaussians")

    def on_train_end(self) -> None:
        if self.cfg.save_ply_on_train_end and self._save_dir is not None and self.global_rank == 0:  # DDP: once
            path = self.save_gaussian_ply(f"it{self.true_global_step}-export/{self.cfg.ply_name}", dict(self.geometry.params.items()))
            threestudio.info(f"saved {self.geometry.num_gaussians} Gaussians to {path}")

    # SaverMixin-style saver used by the gsplat-ply-exporter (save_type "gaussian_ply")
    def save_gaussian_ply(self, filename: str, params: Dict[str, torch.Tensor]) -> str:
        if self.global_rank != 0:  # DDP (e.g. --export on N GPUs): the ranks hold the same Gaussians; write once
            return self.get_save_path(filename)
        return save_gaussians_ply(self.get_save_path(filename), params)

    # SaverMixin-style saver used by the gsplat-mesh-exporter (save_type "gsplat_mesh")
    def save_gsplat_mesh(self, filename: str, files: Dict[str, bytes]) -> str:
        """Write ``files`` (name -> bytes) next to ``filename`` in the trial folder, replacing the previous set of
        ``<filename>.*`` mesh files as a whole (``gaussian_mesh.write_file_set``)."""
        from scoredistill.exporter.gaussian_mesh import write_file_set

        folder = os.path.dirname(self.get_save_path(filename))
        write_file_set(folder, files, os.path.basename(filename))
        return folder
