"""Densification / pruning / opacity reset with ``gsplat.strategy`` on a single shared optimizer.

Plain torch + gsplat, no threestudio import.

gsplat's strategies expect one optimizer per parameter (``{"means": Adam([means]), ...}``).  threestudio
builds a single optimizer with named parameter groups.  :class:`GroupView` exposes one parameter group of
a shared optimizer with the two attributes gsplat's ``strategy.ops`` use (``param_groups`` and ``state``),
so gsplat replaces the parameter inside the shared optimizer and carries/extends its Adam moments.

:class:`GaussianDensifier` wraps ``DefaultStrategy`` (Kerbl et al. 2023, Sec. 5.2: clone small / split
large Gaussians whose mean view-space positional gradient exceeds ``grow_grad2d``, prune transparent and
over-large ones, periodic opacity reset) or ``MCMCStrategy`` (Kheradmand et al. 2024; CUDA only).

Opacity reset: gsplat 1.5.3's ``DefaultStrategy.step_post_backward`` tests
``step % self.reset_every == 0 & step > 0``, which Python parses as ``step % reset_every == (0 & step) > 0``
and is therefore never true, so gsplat never resets opacities.  :class:`GaussianDensifier` performs the
reset the paper describes (every ``reset_every`` steps, opacities clamped to ``2 * prune_opa``) itself with
gsplat's ``strategy.ops.reset_opa`` (idempotent, so a fixed gsplat would not reset twice);
``opacity_reset=False`` reproduces gsplat 1.5.3's behaviour.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import fields
from typing import Any, Dict, Optional

import torch

STRATEGY_TYPES = ("default", "mcmc", "none")


class GroupView:
    """One parameter group of a shared ``torch.optim.Optimizer``, looking like a one-group optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer, group: dict):
        self._optimizer = optimizer
        self.param_groups = [group]

    @property
    def state(self):
        return self._optimizer.state


def group_views(optimizer: torch.optim.Optimizer, names: Dict[str, str]) -> Dict[str, GroupView]:
    """``{param_key: GroupView}`` for groups whose ``"name"`` is ``names[param_key]``.

    Raises:
        ValueError: a named group is missing or holds more than one tensor.
    """
    by_name = {g.get("name"): g for g in optimizer.param_groups}
    out = {}
    for key, group_name in names.items():
        g = by_name.get(group_name)
        if g is None:
            raise ValueError(f"optimizer has no parameter group named {group_name!r} (Gaussian parameter {key!r})")
        if len(g["params"]) != 1:
            raise ValueError(f"optimizer group {group_name!r} must hold exactly one tensor, has {len(g['params'])}")
        out[key] = GroupView(optimizer, g)
    return out


def scheduled_lr(step: int, lr_init: float, lr_final: Optional[float], max_steps: int, delay_steps: int = 0, delay_mult: float = 1.0, mode: str = "exp") -> float:
    """Position learning-rate schedule of 3DGS (``get_expon_lr_func``): log-linear from ``lr_init`` to
    ``lr_final`` over ``max_steps`` (``mode="exp"``), or linear (``mode="linear"``), with an optional
    warm-up ``delay_steps`` scaled by ``delay_mult -> 1`` along a half sine.  ``lr_final=None`` is constant.

    Raises:
        ValueError: negative rates, ``max_steps < 1`` or unknown mode.
    """
    if mode not in ("exp", "linear"):
        raise ValueError(f"position lr schedule mode must be 'exp' or 'linear', got {mode!r}")
    if lr_init < 0 or (lr_final is not None and lr_final < 0):
        raise ValueError("learning rates must be >= 0")
    if lr_final is None:
        return float(lr_init)
    if max_steps < 1:
        raise ValueError(f"position lr max_steps must be >= 1, got {max_steps}")
    if step < 0 or (lr_init == 0.0 and lr_final == 0.0):
        return 0.0
    if delay_steps > 0:
        delay_rate = delay_mult + (1 - delay_mult) * math.sin(0.5 * math.pi * min(max(step / delay_steps, 0.0), 1.0))
    else:
        delay_rate = 1.0
    t = min(max(step / max_steps, 0.0), 1.0)
    if mode == "exp":
        if lr_init <= 0 or lr_final <= 0:
            raise ValueError("the exponential schedule needs lr_init > 0 and lr_final > 0")
        lr = math.exp(math.log(lr_init) * (1 - t) + math.log(lr_final) * t)
    else:
        lr = lr_init * (1 - t) + lr_final * t
    return float(delay_rate * lr)


class GaussianDensifier:
    """gsplat strategy + state + opacity reset for a ``ParameterDict`` and a shared optimizer.

    Args:
        cfg: ``type`` (default | mcmc | none), ``scene_scale`` (default 1.0), ``opacity_reset`` (True), and
            any field of ``gsplat.strategy.DefaultStrategy`` / ``MCMCStrategy`` (e.g. ``grow_grad2d``,
            ``refine_start_iter``, ``refine_every``, ``reset_every``, ``cap_max``).

    Raises:
        ValueError: unknown type or an option the chosen strategy does not have.
    """

    def __init__(self, cfg: Optional[Dict[str, Any]] = None):
        from gsplat.strategy import DefaultStrategy, MCMCStrategy

        cfg = dict(cfg or {})
        self.type = cfg.pop("type", "default")
        if self.type not in STRATEGY_TYPES:
            raise ValueError(f"strategy.type must be one of {STRATEGY_TYPES}, got {self.type!r}")
        self.scene_scale = float(cfg.pop("scene_scale", 1.0))
        self.opacity_reset = bool(cfg.pop("opacity_reset", True))
        self.packed = bool(cfg.pop("packed", False))
        self.strategy = None
        if self.type != "none":
            cls = DefaultStrategy if self.type == "default" else MCMCStrategy
            allowed = {f.name for f in fields(cls)}
            bad = sorted(set(cfg) - allowed)
            if bad:
                raise ValueError(f"strategy options {bad} are not fields of gsplat {cls.__name__} (allowed: {sorted(allowed)})")
            self.strategy = cls(**cfg)
        if self.type == "default":
            self.state = self.strategy.initialize_state(scene_scale=self.scene_scale)
        elif self.type == "mcmc":
            self.state = self.strategy.initialize_state()
        else:
            self.state = {}

    def check_device(self, device: torch.device) -> None:
        if self.type == "mcmc" and torch.device(device).type != "cuda":
            raise ValueError("strategy.type='mcmc' needs CUDA (gsplat's MCMC relocation kernels); use 'default' on CPU")

    def pre_backward(self, params, optimizers, step: int, info: Dict[str, Any]) -> None:
        if self.type == "default" and info.get("means2d") is not None and info["means2d"].requires_grad:
            self.strategy.step_pre_backward(params, optimizers, self.state, step, info)

    @torch.no_grad()
    def post_backward(self, params, optimizers, step: int, info: Dict[str, Any], lr: Optional[float] = None) -> Dict[str, int]:
        """Run the strategy after the backward pass of training step ``step``; returns counts."""
        n_before = int(params["means"].shape[0])
        if self.type == "default":
            means2d = info.get("means2d")
            if means2d is not None and means2d.grad is not None:
                packed = self.packed or info.get("gaussian_ids") is not None  # gsplat packed=True info
                with self._distributed(step, params["means"].device):
                    self.strategy.step_post_backward(params, optimizers, self.state, step, info, packed=packed)
            if self.opacity_reset and step > 0 and step % self.strategy.reset_every == 0 and step < self.strategy.refine_stop_iter:
                from gsplat.strategy.ops import reset_opa

                reset_opa(params=params, optimizers=optimizers, state=self.state, value=self.strategy.prune_opa * 2.0)
        elif self.type == "mcmc":
            with self._distributed(step, params["means"].device):  # relocation / noise samples shared under DDP
                self.strategy.step_post_backward(params, optimizers, self.state, step, info, lr=float(lr or 0.0))
        return {"before": n_before, "after": int(params["means"].shape[0])}

    # ------------------------------------------------------------------ DDP (scoredistill.distributed)
    @contextlib.contextmanager
    def _distributed(self, step: int, device):
        """Under DDP (several ranks): the running statistics are those of the union of the ranks' views and
        the random split samples are shared, so every rank takes the same densification decisions.

        * gsplat's ``_update_state`` runs on zero statistics, the increments (screen-space gradient norms,
          visibility counts; max radii) are summed (max) over the ranks and then added to the state.  Each
          rank's ``means2d.grad`` comes from its loss averaged over its ``B`` views and gsplat scales it by
          ``n_cameras = B``; in one process with the ranks' ``N x B`` views the gradient is ``1/N`` of it and
          the scale ``N x B`` -- the same value, so the union's statistics are exactly the sums.
        * ``split`` draws ``torch.randn`` samples: they are drawn from a generator seeded with a seed shared by
          the ranks (rank 0's, broadcast once) plus the step, so the new Gaussians are identical.

        A no-op in a single process (gsplat's own code path, the process's generator)."""
        from gsplat.strategy import DefaultStrategy

        from scoredistill import distributed as dist

        if not dist.is_distributed() or dist.sync_disabled("densify"):
            yield
            return
        if getattr(self, "_shared_seed", None) is None:
            self._shared_seed = dist.shared_seed()
        strategy = self.strategy
        if not isinstance(strategy, DefaultStrategy):  # MCMC: no gradient statistics, only shared samples
            with dist.shared_rng(self._shared_seed + int(step), device):
                yield
            return
        original = strategy._update_state

        def update_state(params, state, info, packed=False):
            keys = ("grad2d", "count", "radii")
            inc = dict(state)
            for k in keys:
                inc[k] = None
            original(params, inc, info, packed=packed)
            dist.all_reduce_([inc["grad2d"], inc["count"]], op="sum")
            if inc.get("radii") is not None:
                dist.all_reduce_([inc["radii"]], op="max")
            for k in ("grad2d", "count"):
                state[k] = inc[k] if state[k] is None else state[k] + inc[k]
            if inc.get("radii") is not None:
                state["radii"] = inc["radii"] if state["radii"] is None else torch.maximum(state["radii"], inc["radii"])

        strategy._update_state = update_state
        try:
            with dist.shared_rng(self._shared_seed + int(step), device):
                yield
        finally:
            del strategy._update_state  # back to the class method

    def state_dict(self) -> Dict[str, Any]:
        return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in self.state.items()}

    def load_state_dict(self, state: Dict[str, Any], device=None) -> None:
        self.state = {k: (v.to(device) if isinstance(v, torch.Tensor) and device is not None else v) for k, v in state.items()}
