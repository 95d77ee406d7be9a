"""Attaching run integrity to a system: :func:`attach_run_integrity`, the one entry point.

A system (a ``pytorch_lightning.LightningModule`` *instance*) gets one :class:`RunIntegrity`, made at the first
attach and kept on the instance.  It holds the system's finite-step guard (:mod:`.finite`), its resume check and
the registry of guidances whose own trainable state its checkpoints carry (:mod:`.checkpointing`), and runs them
from four of the system's Lightning hooks.  Lightning has no other place for them: the guard must run *around*
``training_step`` (its loss) and *after* the system's own ``on_before_optimizer_step`` (the pack's
``gsplat-system`` all-reduces its gradients there; a ``Callback``'s hook runs before the module's), and a
foreign system's trainer (threestudio's ``launch.py``) takes no callbacks from the pack.  So the one
:class:`RunIntegrity` object wraps the instance's ``training_step``, ``on_before_optimizer_step``,
``on_save_checkpoint`` and ``on_load_checkpoint`` once, each wrapper chaining to the class's hook; what the
wrappers do depends on what is attached (a guard, the resume check, checkpointed guidances).

Who attaches (see :mod:`scoredistill.integrity`): pack systems call it themselves (:class:`RunIntegrityMixin`)
and hand down the guidances they build (:meth:`RunIntegrity.add_guidance`); a foreign system may make the one
call :func:`attach_run_integrity` itself; otherwise a pack guidance attaches, at its first update step, to the
LightningModule that holds it as an attribute (:func:`lightning_module_holding`).

Plain python + torch (``pytorch_lightning`` imported lazily to recognise systems); nothing here imports
threestudio.
"""
from __future__ import annotations

import gc
import warnings
from typing import Any, Callable, Dict, Optional

from .checkpointing import (
    CHECKPOINT_KEY,
    RUN_KEY,
    check_resume_compatible,
    load_checkpoint_file,
    run_identity,
    running_ckpt_path,
)
from .finite import DEFAULT_MAX_NONFINITE_SKIPS, FiniteStepGuard

__all__ = [
    "CheckpointedGuidanceMixin",
    "RunIntegrity",
    "RunIntegrityMixin",
    "attach_run_integrity",
    "get_finite_guard",
    "get_run_integrity",
    "install_finite_guard",
    "lightning_module_holding",
]

#: attribute of a system instance holding its :class:`RunIntegrity`
_ATTR = "_scoredistill_run_integrity"


def _lightning_module_class():
    try:
        import pytorch_lightning as pl
    except ImportError:  # pragma: no cover - lightning is a threestudio dependency
        return None
    return pl.LightningModule


def _chain(hook: Callable, original: Callable, name: str) -> Callable:
    """``hook(original, *args, **kwargs)`` as a plain function (Lightning inspects the hooks it calls: a plain
    ``(*args, **kwargs)`` signature takes ``batch_idx`` and counts as overridden, like the system's own)."""

    def wrapper(*args, **kwargs):
        return hook(original, *args, **kwargs)

    wrapper.__name__ = wrapper.__qualname__ = name
    return wrapper


class RunIntegrity:
    """Run integrity of one system: its finite-step guard, its resume check, its checkpointed guidances.

    Made by :meth:`of` (once per system instance; use :func:`attach_run_integrity`), which wraps the instance's
    :data:`HOOKS` (those it has) with this object's methods of the same names.

    Attributes:
        system: the LightningModule instance.
        guard: its :class:`~.finite.FiniteStepGuard`, or ``None`` (not attached).
        resume_check: whether checkpoints record the run identity and resumes are checked
            (:func:`~.checkpointing.check_resume_compatible`).
        checked_resume: the checkpoint path already checked (``None``: none yet).
        guidances: ``{checkpoint key: guidance}``, the guidances whose state the checkpoints carry
            (:class:`CheckpointedGuidanceMixin`).
    """

    #: the system's Lightning hooks that run integrity wraps (see the module docstring for why hooks)
    HOOKS = ("training_step", "on_before_optimizer_step", "on_save_checkpoint", "on_load_checkpoint")

    def __init__(self, system) -> None:
        self.system = system
        self.guard: Optional[FiniteStepGuard] = None
        self.resume_check = False
        self.checked_resume: Optional[str] = None
        self.guidances: Dict[str, Any] = {}

    @classmethod
    def of(cls, system) -> "RunIntegrity":
        """The :class:`RunIntegrity` of ``system``, made and hooked in now if it has none."""
        integrity = system.__dict__.get(_ATTR)
        if integrity is None:
            integrity = cls(system)
            system.__dict__[_ATTR] = integrity
            for name in cls.HOOKS:
                original = getattr(system, name, None)
                if original is not None:
                    system.__dict__[name] = _chain(getattr(integrity, name), original, name)
        return integrity

    # ------------------------------------------------------------------ what is attached
    def enable_guard(self, max_consecutive_skips: Optional[int] = None, setting: Optional[str] = None) -> FiniteStepGuard:
        """The system's finite-step guard, made now if it has none.  A call with ``max_consecutive_skips`` set
        replaces the limit (and the setting name used in messages; validated: ``ValueError`` naming it)."""
        if self.guard is None:
            self.guard = FiniteStepGuard(
                DEFAULT_MAX_NONFINITE_SKIPS if max_consecutive_skips is None else max_consecutive_skips,
                setting or "system.max_nonfinite_skips",
            )
        elif max_consecutive_skips is not None:
            self.guard.set_limit(max_consecutive_skips, setting or self.guard.setting)
        return self.guard

    def enable_resume_check(self) -> None:
        """Checkpoints record :func:`~.checkpointing.run_identity` and a resume runs
        :func:`~.checkpointing.check_resume_compatible` (in ``on_load_checkpoint``, before the state dict loads).
        If the trainer is already resuming (``trainer.ckpt_path``: attached after Lightning's restore, e.g. from
        ``on_fit_start``) and that file was not checked yet, it is read and checked now."""
        self.resume_check = True
        path = running_ckpt_path(self.system)
        if path and self.checked_resume != path:
            check_resume_compatible(self.system, load_checkpoint_file(path), path)
            self.checked_resume = path

    def checkpoint_guidance(self, guidance: "CheckpointedGuidanceMixin") -> None:
        """Carry ``guidance``'s own state in the system's checkpoints, under its key (idempotent).  If the trainer
        is already resuming, the state is read from ``trainer.ckpt_path`` now, before the guidance's first step."""
        if guidance.__dict__.get("_checkpoint_system") is self.system:
            return
        self.guidances[guidance._checkpoint_key()] = guidance
        # private name: threestudio's Updateable.do_update_step visits every public attribute, and a public
        # reference back to the (Updateable) system would recurse
        guidance.__dict__["_checkpoint_system"] = self.system
        guidance._restore_from_running_resume(self.system)

    def add_guidance(self, guidance: Any) -> bool:
        """Attach a guidance the system holds (the system hands it down, explicitly).

        A pack guidance attaches through its own ``attach_run_integrity(system)`` (its ``max_nonfinite_skips``,
        its checkpointed state); a bare :class:`CheckpointedGuidanceMixin` gets its state checkpointed; anything
        else (e.g. threestudio's own guidances) is left alone.  Returns whether the guidance was attached."""
        if _takes_part(guidance):
            guidance.attach_run_integrity(self.system)
            return True
        if isinstance(guidance, CheckpointedGuidanceMixin):
            self.checkpoint_guidance(guidance)
            return True
        return False

    # ------------------------------------------------------------------ the system's hooks (around ``original``)
    def training_step(self, original: Callable, *args, **kwargs):
        if self.guard is None:
            return original(*args, **kwargs)
        self.guard.begin_step()
        out = original(*args, **kwargs)
        self.guard.check_loss(out)
        return out

    def on_before_optimizer_step(self, original: Callable, optimizer, *args, **kwargs) -> None:
        original(optimizer, *args, **kwargs)
        if self.guard is not None:
            self.guard.decide(optimizer, getattr(self.system, "_trainer", None), self.system)

    def on_save_checkpoint(self, original: Callable, checkpoint: Dict[str, Any], *args, **kwargs) -> None:
        original(checkpoint, *args, **kwargs)
        if self.resume_check:
            checkpoint[RUN_KEY] = run_identity(self.system)
        if self.guidances:
            states = checkpoint.setdefault(CHECKPOINT_KEY, {})
            for key, guidance in self.guidances.items():
                states[key] = guidance.guidance_state_dict()

    def on_load_checkpoint(self, original: Callable, checkpoint: Dict[str, Any], *args, **kwargs) -> None:
        path = running_ckpt_path(self.system)
        if self.resume_check:
            check_resume_compatible(self.system, checkpoint, path or "<checkpoint>")
            self.checked_resume = path
        original(checkpoint, *args, **kwargs)
        if self.guidances:
            states = checkpoint.get(CHECKPOINT_KEY) or {}
            for key, guidance in self.guidances.items():
                if key not in states:
                    raise ValueError(guidance._missing_state_message(path or "<checkpoint>", states))
                guidance._load_checkpointed_state(states[key])


def attach_run_integrity(system, max_nonfinite_skips: Optional[int] = None, setting: Optional[str] = None) -> RunIntegrity:
    """Attach run integrity to the LightningModule instance ``system`` (idempotent) and return its
    :class:`RunIntegrity`: the finite-step guard (``max_nonfinite_skips``: the consecutive skips that stop the run,
    named ``setting`` in messages; ``None`` keeps the current limit, default 10) and the resume check; guidances
    join with :meth:`RunIntegrity.add_guidance`.

    Raises:
        ValueError: ``max_nonfinite_skips`` is not an integer >= 1 (naming ``setting``), or the trainer is already
            resuming from a checkpoint of another run.
    """
    integrity = RunIntegrity.of(system)
    integrity.enable_guard(max_nonfinite_skips, setting)
    integrity.enable_resume_check()
    return integrity


def get_run_integrity(system) -> Optional[RunIntegrity]:
    """The :class:`RunIntegrity` attached to ``system``, or ``None``."""
    return None if system is None else system.__dict__.get(_ATTR)


def get_finite_guard(system) -> Optional[FiniteStepGuard]:
    """The finite-step guard attached to ``system`` (a LightningModule instance), or ``None``."""
    integrity = get_run_integrity(system)
    return None if integrity is None else integrity.guard


def install_finite_guard(
    system, max_consecutive_skips: Optional[int] = None, setting: Optional[str] = None
) -> FiniteStepGuard:
    """The finite-step guard alone (no resume check): attached to ``system`` (idempotent) and returned; a later
    call with ``max_consecutive_skips`` set replaces the limit (:meth:`RunIntegrity.enable_guard`)."""
    return RunIntegrity.of(system).enable_guard(max_consecutive_skips, setting)


def lightning_module_holding(obj: Any):
    """The LightningModule that holds ``obj`` as an attribute (``obj`` is a value of its ``__dict__``), or ``None``
    (no module, or several, hold it).

    Found from the garbage collector's referrers of ``obj`` (the instance dicts holding it, or the instance
    itself where Python keeps the attributes inline), then of those dicts (their instances): two scans of the
    heap, meant for one call per object -- a pack guidance's first update step.
    """
    module_cls = _lightning_module_class()
    if module_cls is None:
        return None
    referrers = gc.get_referrers(obj)
    dicts = [r for r in referrers if type(r) is dict]
    owners = [r for r in referrers if isinstance(r, module_cls)]
    if dicts:
        owners += [r for r in gc.get_referrers(*dicts) if isinstance(r, module_cls) and any(vars(r) is d for d in dicts)]
    del referrers, dicts
    holders = []
    for module in owners:
        if any(v is obj for v in vars(module).values()) and not any(module is h for h in holders):
            holders.append(module)
    return holders[0] if len(holders) == 1 else None


def _takes_part(guidance: Any) -> bool:
    """Whether ``guidance`` attaches itself (its class defines ``attach_run_integrity(system)``, e.g. the pack's
    ``ScoreDistillationGuidance``); systems (:class:`RunIntegrityMixin`) do not count."""
    return callable(getattr(type(guidance), "attach_run_integrity", None)) and not isinstance(guidance, RunIntegrityMixin)


class RunIntegrityMixin:
    """For systems (LightningModules) that attach run integrity themselves, with one call.

    :meth:`attach_run_integrity` (early in ``configure()``: it validates the limit before any model loads)
    attaches the system and every pack guidance it already holds; a guidance built later (``on_fit_start``) is
    handed down with ``self.run_integrity.add_guidance(self.guidance)``.  The pack's ``gsplat-system``,
    ``gsplat-edit-system``, ``hifa-system`` and ``nerf-edit-system`` use it.
    """

    def attach_run_integrity(
        self, max_nonfinite_skips: Optional[int] = None, setting: str = "system.max_nonfinite_skips"
    ) -> RunIntegrity:
        """:func:`attach_run_integrity` for this system, then :meth:`RunIntegrity.add_guidance` for each pack
        guidance among its attributes.  Idempotent."""
        integrity = attach_run_integrity(self, max_nonfinite_skips, setting)
        for value in list(vars(self).values()):
            if value is not self and (_takes_part(value) or isinstance(value, CheckpointedGuidanceMixin)):
                integrity.add_guidance(value)
        return integrity

    @property
    def run_integrity(self) -> Optional[RunIntegrity]:
        """This system's :class:`RunIntegrity` (``None`` before :meth:`attach_run_integrity`)."""
        return get_run_integrity(self)


class CheckpointedGuidanceMixin:
    """Save / restore a guidance's own trainable state with Lightning checkpoints, with any system, unmodified.

    Subclasses define :meth:`guidance_state_dict` and :meth:`load_guidance_state_dict`, optionally
    ``checkpoint_state_key``.  The state joins a system's checkpoints through its :class:`RunIntegrity`
    (:meth:`RunIntegrity.checkpoint_guidance`): from :meth:`attach_checkpointing` (``system`` given), from the
    system (:meth:`RunIntegrity.add_guidance`) or, for the pack's ``CheckpointedScoreDistillationGuidance``, when
    it attaches to its holder at its first update step.  The format: :mod:`.checkpointing`.
    """

    #: entry name under ``checkpoint[CHECKPOINT_KEY]``; ``None``: the class name
    checkpoint_state_key: Optional[str] = None

    def guidance_state_dict(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_guidance_state_dict(self, state: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _checkpoint_key(self) -> str:
        return self.checkpoint_state_key or type(self).__name__

    @property
    def checkpoint_attached(self) -> bool:
        """Whether a LightningModule's checkpoints carry this guidance's state (``self._checkpoint_system``)."""
        return self.__dict__.get("_checkpoint_system") is not None

    def attach_checkpointing(self, system=None, warn: bool = True) -> bool:
        """Carry this guidance's state in ``system``'s checkpoints (idempotent per system).

        Returns ``True`` if attached, ``False`` (with a ``UserWarning`` if ``warn``) if no system was given.
        """
        if system is None:
            if warn:
                warnings.warn(
                    f"{type(self).__name__}: no LightningModule given; the guidance's trainable state will not be "
                    "saved with checkpoints (call attach_checkpointing(system) explicitly)"
                )
            return False
        RunIntegrity.of(system).checkpoint_guidance(self)
        return True

    def _missing_state_message(self, path, states: dict) -> str:
        held = f"the state of {', '.join(sorted(states))}" if states else "no guidance state"
        return (
            f"resume={path}: the checkpoint holds no trained state of '{self._checkpoint_key()}' "
            f"(checkpoint['{CHECKPOINT_KEY}'] has {held}): it was trained with another guidance than this "
            "config's system.guidance_type. Resume with the checkpoint's own config, or start a new trial "
            "(system.weights=<checkpoint> loads only the module weights)"
        )

    def _load_checkpointed_state(self, state: dict) -> None:
        self.load_guidance_state_dict(state)
        self.__dict__["_checkpoint_restored"] = True

    def _restore_from_running_resume(self, system) -> bool:
        """If ``system``'s trainer is resuming from ``trainer.ckpt_path`` and this guidance has not been restored
        by the load hook, load its state from that file.  Returns whether a state was loaded."""
        if self.__dict__.get("_checkpoint_restored"):
            return False
        ckpt_path = running_ckpt_path(system)
        if not ckpt_path:
            return False
        states = load_checkpoint_file(ckpt_path).get(CHECKPOINT_KEY) or {}
        state = states.get(self._checkpoint_key())
        if state is None:
            raise ValueError(self._missing_state_message(ckpt_path, states))
        self._load_checkpointed_state(state)
        return True
