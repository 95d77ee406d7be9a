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
import functools
import math
from dataclasses import fields
from typing import Any, Dict, Optional

import torch

from scoredistill.settings import check_range, is_number, plain

STRATEGY_TYPES = ("default", "mcmc", "none")

#: allowed ranges of the gsplat strategy fields: name -> keyword arguments of :func:`scoredistill.settings.check_range`
_DEFAULT_RANGES = {
    "prune_opa": dict(low=0.0, high=1.0, open_high=True),
    "grow_grad2d": dict(low=0.0),  # 0 = grow every visible Gaussian
    "grow_scale3d": dict(low=0.0, open_low=True),
    "grow_scale2d": dict(low=0.0, open_low=True),
    "prune_scale3d": dict(low=0.0, open_low=True),
    "prune_scale2d": dict(low=0.0, open_low=True),
    "refine_scale2d_stop_iter": dict(low=0, integer=True),
    "refine_start_iter": dict(low=0, integer=True),
    "refine_stop_iter": dict(low=0, integer=True),
    "reset_every": dict(low=1, integer=True),
    "refine_every": dict(low=1, integer=True),
    "pause_refine_after_reset": dict(low=0, integer=True),
}
_MCMC_RANGES = {
    "cap_max": dict(low=1, integer=True),
    "noise_lr": dict(low=0.0),
    "refine_start_iter": dict(low=0, integer=True),
    "refine_stop_iter": dict(low=0, integer=True),
    "refine_every": dict(low=1, integer=True),
    "min_opacity": dict(low=0.0, high=1.0, open_high=True),
}


def validate_strategy_config(cfg: Optional[Dict[str, Any]], renderer_cfg: Optional[Dict[str, Any]] = None,
                             prefix: str = "system.strategy", renderer_prefix: str = "system.renderer") -> None:
    """Check a densification config (``system.strategy``) without building anything.

    Ranges: ``prune_opa`` in [0, 1); ``grow_grad2d``, ``grow_scale*``, ``prune_scale*`` > 0;
    ``refine_every``, ``reset_every`` >= 1 (gsplat takes ``step % every``); iteration counts >= 0;
    ``scene_scale`` > 0; ``max_num`` >= 0 (0 = no cap; ``default`` only, MCMC has ``cap_max``); MCMC
    ``cap_max`` >= 1, ``noise_lr`` >= 0, ``min_opacity`` in [0, 1); every number finite.  ``absgrad: true``
    and ``packed: true`` need the renderer's matching output (``{renderer_prefix}.absgrad`` / ``.packed``).

    Raises:
        ValueError: naming the full dotted setting and its allowed range.
    """
    from gsplat.strategy import DefaultStrategy, MCMCStrategy

    cfg = dict(cfg or {})
    typ = cfg.pop("type", "default")
    if typ not in STRATEGY_TYPES:
        raise ValueError(f"{prefix}.type must be one of {STRATEGY_TYPES}, got {typ!r}")
    if "scene_scale" in cfg:
        check_range(cfg.pop("scene_scale"), f"{prefix}.scene_scale", 0.0, open_low=True)
    for flag in ("opacity_reset", "packed"):
        if flag in cfg and not isinstance(cfg[flag], bool):
            raise ValueError(f"{prefix}.{flag} must be true or false, got {cfg[flag]!r}")
    packed = bool(cfg.pop("packed", False))
    cfg.pop("opacity_reset", None)
    max_num = cfg.pop("max_num", 0)
    check_range(max_num, f"{prefix}.max_num", 0, integer=True)
    if typ == "none":
        return
    cls = DefaultStrategy if typ == "default" else MCMCStrategy
    allowed = {f.name for f in fields(cls)}
    bad = sorted(set(cfg) - allowed)
    if bad:
        raise ValueError(
            f"{prefix}: strategy options {bad} are not fields of gsplat {cls.__name__} "
            f"(allowed: {sorted(allowed | {'type', 'scene_scale', 'opacity_reset', 'packed', 'max_num'})})"
        )
    if typ == "mcmc" and max_num:
        raise ValueError(f"{prefix}.max_num is for type: default; MCMC caps the count with {prefix}.cap_max")
    ranges = _DEFAULT_RANGES if typ == "default" else _MCMC_RANGES
    defaults = {f.name: f.default for f in fields(cls)}
    for name, allowed in ranges.items():
        check_range(cfg.get(name, defaults[name]), f"{prefix}.{name}", **allowed)
    for flag in ("absgrad", "revised_opacity", "verbose"):
        if flag in cfg and not isinstance(cfg[flag], bool):
            raise ValueError(f"{prefix}.{flag} must be true or false, got {cfg[flag]!r}")
    if typ == "default" and cfg.get("key_for_gradient", "means2d") != "means2d":
        raise ValueError(f"{prefix}.key_for_gradient must be 'means2d' (gsplat-rasterizer's output), got {cfg['key_for_gradient']!r}")
    r = dict(renderer_cfg or {})
    if typ == "default" and cfg.get("absgrad", False) and not r.get("absgrad", False):
        raise ValueError(
            f"{prefix}.absgrad: true reads the absolute 2D gradients, which the renderer only computes with "
            f"{renderer_prefix}.absgrad: true (gsplat CUDA); set both or neither"
        )
    if packed and not r.get("packed", False):
        raise ValueError(
            f"{prefix}.packed: true needs packed rasterizer output ({renderer_prefix}.packed: true, gsplat CUDA); "
            f"leave {prefix}.packed unset: the densifier detects packed output by itself"
        )


def check_strategy_schedule(strategy: Any, prefix: str = "system.strategy") -> None:
    """Densification schedules that would silently never densify or never let opacity grow.

    * ``refine_start_iter > refine_stop_iter``: gsplat refines only for ``start < step < stop``, so nothing was
      ever densified;
    * ``reset_every < refine_every`` (with ``opacity_reset``): every opacity is reset to ``2 * prune_opa`` more
      often than the model refines, so no Gaussian can become opaque between two resets.
    To turn densification off use ``type: none``; to turn resets off ``opacity_reset: false``.
    """
    st = plain(strategy) or {}
    if not isinstance(st, dict) or st.get("type", "default") != "default":
        return
    start, stop = st.get("refine_start_iter"), st.get("refine_stop_iter")
    if is_number(start) and is_number(stop) and start > stop:
        raise ValueError(f"{prefix}.refine_start_iter ({start}) must be <= {prefix}.refine_stop_iter ({stop}): "
                         f"densification runs only between them (to turn it off: {prefix}.type: none)")
    every, reset = st.get("refine_every"), st.get("reset_every")
    if st.get("opacity_reset", True) and is_number(every) and is_number(reset) and reset < every:
        raise ValueError(f"{prefix}.reset_every ({reset}) must be >= {prefix}.refine_every ({every}): opacities "
                         "reset more often than the model refines never grow (to turn resets off: "
                         f"{prefix}.opacity_reset: false)")


def validate_settings(cfg: Any, prefix: str = "system.strategy", renderer_cfg: Optional[Dict[str, Any]] = None,
                      renderer_prefix: str = "system.renderer") -> None:
    """The densification schedule's own check (``system.strategy``), before anything is built: every option in
    its range (:func:`validate_strategy_config`), then a schedule that densifies (:func:`check_strategy_schedule`).

    ``renderer_cfg``: the ``gsplat-rasterizer`` settings (``absgrad`` / ``packed`` must match), ``{}`` for another
    renderer.
    """
    validate_strategy_config(dict(cfg or {}), dict(renderer_cfg or {}), prefix, renderer_prefix)
    check_strategy_schedule(cfg, prefix)


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


def static_update_state(strategy, params, state: Dict[str, Any], info: Dict[str, Any], packed: bool = False) -> None:
    """gsplat ``DefaultStrategy._update_state`` (the running screen-space gradient / visibility / radius
    statistics of every training step) at static shapes: no host-device sync (issue 26).

    gsplat's non-packed path selects the visible (camera, Gaussian) pairs with ``torch.where(sel)`` and
    ``grads[sel]`` -- two data-dependent shapes, i.e. two GPU syncs per step.  Here every camera's contribution is
    added with ``torch.where(sel[c], value, 0)`` in gsplat's order (camera 0 first), which gives the same float32
    sums (``x + 0.0 = x``); the radius update reproduces gsplat's index-put (the value of the last camera that
    sees a Gaussian, from the statistics before this step).  The packed path has no data-dependent shape and is
    gsplat's own.
    """
    if packed:
        return type(strategy)._update_state(strategy, params, state, info, packed=True)
    for key in ["width", "height", "n_cameras", "radii", "gaussian_ids", strategy.key_for_gradient]:
        assert key in info, f"{key} is required but missing."
    g = info[strategy.key_for_gradient]
    grads = (g.absgrad if strategy.absgrad else g.grad).clone()
    grads[..., 0] *= info["width"] / 2.0 * info["n_cameras"]
    grads[..., 1] *= info["height"] / 2.0 * info["n_cameras"]
    n_gaussian = len(list(params.values())[0])
    if state["grad2d"] is None:
        state["grad2d"] = torch.zeros(n_gaussian, device=grads.device)
    if state["count"] is None:
        state["count"] = torch.zeros(n_gaussian, device=grads.device)
    if strategy.refine_scale2d_stop_iter > 0 and state["radii"] is None:
        state["radii"] = torch.zeros(n_gaussian, device=grads.device)
    sel = (info["radii"] > 0.0).all(dim=-1)  # [C, N]
    norms = grads.norm(dim=-1)  # [C, N]
    zero = norms.new_zeros(())
    for c in range(sel.shape[0]):
        state["grad2d"].add_(torch.where(sel[c], norms[c], zero))
        state["count"].add_(sel[c].to(state["count"].dtype))
    if strategy.refine_scale2d_stop_iter > 0:
        r = info["radii"].max(dim=-1).values / float(max(info["width"], info["height"]))  # [C, N]
        old = state["radii"]
        new = old
        for c in range(sel.shape[0]):
            new = torch.where(sel[c], torch.maximum(old, r[c].to(old.dtype)), new)
        state["radii"].copy_(new)


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
        validate_strategy_config(dict(cfg, type=self.type), {"absgrad": True, "packed": True})  # ranges, finiteness
        #: cap on the Gaussian count (threestudio-3dgs's ``max_num``); 0 = no cap
        self.max_num = int(cfg.pop("max_num", 0))
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
            # the running statistics without host-device syncs (issue 26; same values, see static_update_state)
            self.strategy._update_state = functools.partial(static_update_state, self.strategy)
        elif self.type == "mcmc":
            self.state = self.strategy.initialize_state()
        else:
            self.state = {}

    def check_device(self, device: torch.device) -> None:
        if self.type == "mcmc" and torch.device(device).type != "cuda":
            raise ValueError("strategy.type='mcmc' needs CUDA (gsplat's MCMC relocation kernels); use 'default' on CPU")
        if torch.device(device).type != "cuda":
            if self.type == "default" and self.strategy.absgrad:
                raise ValueError("system.strategy.absgrad: true needs gsplat's CUDA rasterizer (the CPU fallback has no absgrad)")
            if self.packed:
                raise ValueError("system.strategy.packed: true needs gsplat's CUDA rasterizer (the CPU fallback is non-packed)")

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
                is_packed = info.get("gaussian_ids") is not None  # gsplat packed=True info
                if self.packed and not is_packed:
                    raise ValueError("system.strategy.packed: true but the renderer's output is not packed (set system.renderer.packed: true on CUDA)")
                if self.strategy.absgrad and getattr(means2d, "absgrad", None) is None:
                    raise ValueError("system.strategy.absgrad: true but the renderer computed no absgrad (set system.renderer.absgrad: true on CUDA)")
                at_cap = self.max_num > 0 and n_before >= self.max_num
                saved = self.strategy.grow_grad2d
                if at_cap:  # threestudio-3dgs: no densification once the count reaches max_num (pruning goes on)
                    self.strategy.grow_grad2d = float("inf")
                try:
                    with self._distributed(step, params["means"].device):
                        self.strategy.step_post_backward(params, optimizers, self.state, step, info, packed=is_packed)
                finally:
                    self.strategy.grow_grad2d = saved
                self._enforce_max_num(params, optimizers)
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
            strategy._update_state = original  # back to the static update

    def _enforce_max_num(self, params, optimizers) -> None:
        """Hard cap: a refinement that overshoots ``max_num`` drops the least opaque Gaussians (gsplat's ``remove``)."""
        n = int(params["means"].shape[0])
        if self.max_num <= 0 or n <= self.max_num:
            return
        from gsplat.strategy.ops import remove

        order = torch.argsort(params["opacities"].detach().reshape(n), descending=True, stable=True)
        mask = torch.zeros(n, dtype=torch.bool, device=params["means"].device)
        mask[order[self.max_num:]] = True
        remove(params=params, optimizers=optimizers, state=self.state, mask=mask)

    def state_dict(self) -> Dict[str, Any]:
        return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in self.state.items()}

    def load_state_dict(self, state: Dict[str, Any], device=None) -> None:
        self.state = {k: (v.to(device) if isinstance(v, torch.Tensor) and device is not None else v) for k, v in state.items()}
