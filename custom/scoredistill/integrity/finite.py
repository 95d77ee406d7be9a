"""The finite-step guarantee: no optimizer step with a non-finite value is ever applied.

One mechanism for every system the pack's guidances run in (the pack's ``gsplat-system``, ``hifa-system``,
edit systems, and threestudio's own ``dreamfusion-system``), with any system unmodified: the
:class:`FiniteStepGuard` of a system is held by its :class:`~scoredistill.integrity.attach.RunIntegrity`
(attached as the package docstring, :mod:`scoredistill.integrity`, describes), which runs it from two of the
system's Lightning hooks:

* ``training_step``: clears this step's flags, runs the system's step, flags a non-finite returned loss;
* ``on_before_optimizer_step`` (Lightning calls it after backward, after the DDP all-reduce and after AMP
  unscaling, before gradient clipping and ``optimizer.step()``): computes the total parameter-gradient norm
  ``sqrt(Σ_p ‖g_p‖²)`` in float32 (non-finite iff some gradient is non-finite or so large that Adam's second
  moment ``g²`` would overflow), and decides -- with ONE host sync for all checks, and one boolean all-reduce
  across DDP ranks so every rank takes the same decision.

During the step, guidances add flags (:meth:`FiniteStepGuard.flag`): the pack's guidances flag a non-finite
latent gradient (before ``grad_clip``, which would otherwise turn ±inf into ±clip) and a skipped internal
update (LODS α / ψ, VDM ``M_ψ``), and register a snapshot of their own trainable state
(:meth:`FiniteStepGuard.snapshot`).

A skipped step: every parameter gradient of the optimizer is set to ``None`` (torch optimizers then leave
the parameter *and its moments* untouched, Adam's step count included), each registered guidance state is
restored from its snapshot, the step is logged (``WARNING`` naming the failed checks) and counted
(``train/nonfinite_skips``, ``train/nonfinite_consecutive``; ``train/param_grad_norm`` every step).
The trainer's step counter still advances (schedules follow the step index).  ``max_consecutive_skips``
consecutive skips stop the run with :class:`NonFiniteStepError`.

Under AMP with a ``GradScaler`` (``trainer.precision: 16-mixed``), a step whose only non-finite values are
parameter gradients while the loss scale is >= 1 is the scaler's own overflow step (the scaler skips it and
lowers the scale): it is skipped the same way, logged as ``train/amp_overflow_skips`` and not counted
toward the consecutive limit.

Plain python + torch; ``pytorch_lightning`` only through the objects it passes in.  Nothing here imports
threestudio.  See ``docs/guidance-base.md``, "Finite steps".
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

__all__ = [
    "DEFAULT_MAX_NONFINITE_SKIPS",
    "FiniteStepGuard",
    "NonFiniteStepError",
    "clone_state",
    "finite_ok",
    "make_capturable",
    "step_if_finite",
    "step_is_finite",
    "validate_max_nonfinite_skips",
]

#: consecutive skipped steps after which the run stops (``system.max_nonfinite_skips``)
DEFAULT_MAX_NONFINITE_SKIPS = 10

_log = logging.getLogger("pytorch_lightning")  # threestudio's logger: shows up in launch.py's output


class NonFiniteStepError(RuntimeError):
    """Too many consecutive optimizer steps had non-finite values (nothing of them was applied)."""


def validate_max_nonfinite_skips(value: Any, setting: str, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``setting`` unless ``value`` is an integer >= 1 (or ``None`` if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or null (the system's setting)" if allow_none else ""
        raise ValueError(f"{setting} must be an integer >= 1{extra}, got {value!r}")


def clone_state(obj: Any) -> Any:
    """Deep copy of a (nested dict / list / tuple) state with every tensor cloned (detached, same device)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone_state(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clone_state(v) for v in obj)
    return obj


def step_is_finite(loss: Optional[torch.Tensor], grads) -> bool:
    """The finite-step rule for one optimizer step, as one host sync: ``loss`` finite and
    ``sqrt(Σ_g ‖g‖²)`` finite in float32 (so no gradient is non-finite and no Adam ``g²`` overflows); the host
    reading of :func:`finite_ok`."""
    return bool(finite_ok(loss, grads))


def finite_ok(loss: Optional[torch.Tensor], grads) -> torch.Tensor:
    """The finite-step rule (:func:`step_is_finite`) as a 0-dim bool tensor on the device: no host read (issue 26).
    Used by the guidances' own optimizers (LODS α / ψ, VDM ``M_ψ``)."""
    grads = [g for g in grads if g is not None]
    checks = []
    if grads:
        norms = torch._foreach_norm(grads)
        checks.append(torch.isfinite(torch.stack([n.to(norms[0].device, torch.float32) for n in norms]).square().sum()))
    if loss is not None:
        checks.append(torch.isfinite(loss.detach()).all().to(checks[0].device if checks else loss.device))
    if not checks:
        return torch.ones((), dtype=torch.bool)
    return torch.stack(checks).all()


def make_capturable(optimizer_cls, params, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``kwargs`` plus ``capturable=True`` when ``params`` live on CUDA and the optimizer class takes it (Adam,
    AdamW, ...) and the caller did not choose: its step count then lives on the device, so that
    :func:`step_if_finite` decides without a host read.  The update is the same up to float32 rounding (the bias
    corrections are computed on the device)."""
    import inspect

    params = list(params)
    kwargs = dict(kwargs)
    if (params and params[0].is_cuda and "capturable" not in kwargs
            and "capturable" in inspect.signature(optimizer_cls.__init__).parameters):
        kwargs["capturable"] = True
    return kwargs


def step_if_finite(optimizer, ok: torch.Tensor) -> None:
    """``optimizer.step()`` applied only where ``ok`` (0-dim bool tensor, e.g. :func:`finite_ok`) is true, decided
    on the device: parameters and optimizer state tensors are kept and restored with ``torch.where(ok, new, old)``
    -- exact: a skipped step leaves every value bit-identical, a taken step is ``optimizer.step()``.

    Falls back to one host read (``bool(ok)``) for the optimizer's first step (its state is created lazily, and a
    skipped first step must leave it absent) and when some state lives on another device than ``ok`` (e.g.
    torch's non-capturable Adam keeps its step count on the host; see :func:`make_capturable`)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    tensors = [p.data for p in params] + [v for p in params for v in optimizer.state.get(p, {}).values()
                                          if torch.is_tensor(v)]
    if not optimizer.__dict__.get("_scoredistill_stepped") or any(t.device != ok.device for t in tensors):
        if bool(ok):  # host decision (first step / host-held state)
            optimizer.step()
            optimizer.__dict__["_scoredistill_stepped"] = True
        return
    saved = [t.detach().clone() for t in tensors]
    optimizer.step()
    with torch.no_grad():
        for t, old in zip(tensors, saved):
            t.copy_(torch.where(ok, t, old))


class FiniteStepGuard:
    """Per-system state of the finite-step guarantee (see the module docstring).

    Args:
        max_consecutive_skips: consecutive skipped steps that stop the run (integer >= 1).
        setting: the dotted config name of ``max_consecutive_skips`` (for messages).
    Attributes:
        skips: skipped steps so far; consecutive: current run of skipped steps; amp_overflow_skips;
        last_skipped: whether the most recent decision skipped; last_reasons: its failed checks;
        step: index of the current training step (counts ``training_step`` calls).
    """

    def __init__(self, max_consecutive_skips: int = DEFAULT_MAX_NONFINITE_SKIPS, setting: str = "system.max_nonfinite_skips"):
        self.set_limit(max_consecutive_skips, setting)
        self.skips = 0
        self.consecutive = 0
        self.amp_overflow_skips = 0
        self.last_skipped = False
        self.last_reasons: List[str] = []
        self.step = 0
        self._flags: List[Tuple[str, Any]] = []
        self._snapshots: Dict[str, Tuple[Any, Callable[[Any], None]]] = {}

    def set_limit(self, max_consecutive_skips: int, setting: str) -> None:
        validate_max_nonfinite_skips(max_consecutive_skips, setting)
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.setting = setting

    # ------------------------------------------------------------------ during a step
    def begin_step(self) -> None:
        """Start a training step: clear flags and snapshots."""
        self.step += 1
        self._flags = []
        self._snapshots = {}

    def flag(self, reason: str, bad: Any) -> None:
        """Record a check: ``bad`` is a bool or a 0-dim bool tensor (evaluated lazily, at the decision)."""
        self._flags.append((reason, bad))

    def check_finite(self, reason: str, tensor: torch.Tensor) -> torch.Tensor:
        """Flag ``reason`` if ``tensor`` has a non-finite entry; returns the (lazy) 0-dim bool "all finite"."""
        ok = torch.isfinite(tensor.detach()).all()
        self.flag(reason, ~ok)
        return ok

    def check_loss(self, step_output: Any) -> None:
        """Flag a non-finite loss in what ``training_step`` returned (a tensor, a float or a dict with ``loss``)."""
        loss = step_output.get("loss") if isinstance(step_output, dict) else step_output
        if isinstance(loss, torch.Tensor):
            self.check_finite("loss", loss)
        elif isinstance(loss, float) and not math.isfinite(loss):
            self.flag("loss", True)

    def snapshot(self, key: str, take: Callable[[], Any], restore: Callable[[Any], None]) -> bool:
        """Keep ``take()`` (a copy of some trainable state) for this step, once per step and key; ``restore(copy)``
        runs if the step is skipped.  Returns whether a snapshot was taken now."""
        if key in self._snapshots:
            return False
        self._snapshots[key] = (take(), restore)
        return True

    # ------------------------------------------------------------------ the decision
    @staticmethod
    def grad_norm(optimizer) -> Tuple[Optional[torch.Tensor], List[torch.nn.Parameter]]:
        """``(sqrt(Σ_p ‖g_p‖²) in float32 or None, params with a gradient)`` over ``optimizer``'s parameters."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return None, params
        norms = torch._foreach_norm([p.grad for p in params])
        device = norms[0].device
        total = torch.stack([n.to(device, torch.float32) for n in norms]).square().sum().sqrt()
        return total, params

    def decide(self, optimizer, trainer=None, module=None) -> bool:
        """Check this step; on failure skip it (grads to ``None``, guidance states restored).  Returns whether skipped.

        Raises:
            NonFiniteStepError: ``max_consecutive_skips`` consecutive steps were skipped.
        """
        total, params = self.grad_norm(optimizer)
        device = total.device if total is not None else torch.device("cpu")
        names = ["parameter gradient"]
        values = [torch.zeros((), dtype=torch.bool, device=device) if total is None else ~torch.isfinite(total)]
        for reason, bad in self._flags:
            names.append(reason)
            values.append(torch.as_tensor(bad, device=device).reshape(()).bool())
        bad = torch.stack(values).cpu().tolist()  # the one host sync of all checks
        reasons = [n for n, b in zip(names, bad) if b]
        skip = bool(reasons)
        world = getattr(trainer, "world_size", 1) if trainer is not None else 1
        if trainer is not None and world > 1:  # all ranks take the same decision
            skip = bool(trainer.strategy.reduce_boolean_decision(skip, all=False))
            if skip and not reasons:
                reasons = ["a non-finite value on another rank"]
        amp_overflow = False
        if skip and reasons == ["parameter gradient"]:
            scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None) if trainer is not None else None
            if scaler is not None and scaler.is_enabled() and scaler.get_scale() >= 1.0:
                amp_overflow = True
        if module is not None and total is not None:
            _safe_log(module, "train/param_grad_norm", total.detach())
        self.last_skipped, self.last_reasons = skip, reasons
        if not skip:
            self.consecutive = 0
            self._snapshots = {}
            _safe_log(module, "train/nonfinite_skips", float(self.skips))
            _safe_log(module, "train/nonfinite_consecutive", 0.0)
            return False
        for p in params:
            p.grad = None
        for key, (saved, restore) in self._snapshots.items():
            restore(saved)
        self._snapshots = {}
        if amp_overflow:
            self.amp_overflow_skips += 1
            _safe_log(module, "train/amp_overflow_skips", float(self.amp_overflow_skips))
            _log.info(f"scoredistill: step {self._step_label(trainer)} skipped by the AMP GradScaler (gradient overflow)")
            return True
        self.skips += 1
        self.consecutive += 1
        _safe_log(module, "train/nonfinite_skips", float(self.skips))
        _safe_log(module, "train/nonfinite_consecutive", float(self.consecutive))
        norm = "none" if total is None else f"{float(total):.4g}"
        msg = (
            f"scoredistill: optimizer step {self._step_label(trainer)} skipped: non-finite {', '.join(reasons)} "
            f"(parameter gradient norm {norm}); parameters, optimizer moments and guidance state left untouched "
            f"[{self.consecutive} consecutive of at most {self.max_consecutive_skips} ({self.setting}), {self.skips} in total]"
        )
        _log.warning(msg)
        if self.consecutive >= self.max_consecutive_skips:
            raise NonFiniteStepError(
                f"scoredistill: {self.consecutive} consecutive optimizer steps had non-finite values and were skipped "
                f"(last at step {self._step_label(trainer)}: non-finite {', '.join(reasons)}); stopping the run. "
                f"Nothing of these steps was applied, so the last checkpoint holds finite values. Check the inputs and "
                f"settings (e.g. system.guidance.guidance_scale, learning rates, the render), or raise {self.setting} "
                f"(now {self.max_consecutive_skips})."
            )
        return True

    @staticmethod
    def _step_label(trainer) -> str:
        step = getattr(trainer, "global_step", None) if trainer is not None else None
        return "?" if step is None else str(step)


def _safe_log(module, name: str, value) -> None:
    if module is None or getattr(module, "_trainer", None) is None:
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # a host tensor: Lightning would make torch.tensor(value, device=cuda), a synchronous copy per call
        value = torch.tensor(value, dtype=torch.get_default_dtype())
    try:
        module.log(name, value)
    except Exception:  # logging is best effort (e.g. a hook where Lightning forbids self.log)
        pass
