"""Checkpointing of a guidance's own trainable state (networks, optimizers) with PyTorch Lightning checkpoints.

Used by ``lods-guidance`` (α / LoRA ψ and their optimizer) and ``vdm-guidance`` (the operator ``M_ψ`` and its
optimizer).  Plain python + torch (+ ``pytorch_lightning`` imported lazily to recognise systems); nothing here
imports threestudio.

The problem: threestudio guidances are plain objects (``BaseObject``, not ``nn.Module``), built by the
system, usually in ``on_fit_start`` -- *after* Lightning restored the module from
``trainer.fit(ckpt_path=...)`` -- so their trainable state is neither in the system's ``state_dict`` nor
restorable through it (registering it as a submodule would even break the strict load of a system that has
no guidance yet: unexpected keys).

The mechanism (:meth:`CheckpointedGuidanceMixin.attach_checkpointing`):

* save: the system *instance's* ``on_save_checkpoint`` is wrapped (once per instance, chaining to what the
  system already does) so that every Lightning checkpoint gets
  ``checkpoint[CHECKPOINT_KEY][key] = guidance.guidance_state_dict()`` -- a top-level entry outside
  ``state_dict``, so strict loading is unaffected;
* load: the instance's ``on_load_checkpoint`` is wrapped likewise (covers guidances built in the system's
  ``configure``, i.e. before Lightning's restore);
* running resume: if the system's trainer is already restoring a checkpoint (``trainer.ckpt_path`` set: the
  ``on_fit_start`` case) the state is read from that file when the guidance attaches, before its first step.

Several guidances on one system share the wrapped hooks and are stored under different keys
(``checkpoint_state_key``, default the class name).  Weights loaded with threestudio's ``system.weights``
(not a resume) do not carry guidance state.

Resume compatibility (:func:`attach_resume_check`, attached by every pack guidance and pack system): each
checkpoint also records the run's identity (``checkpoint["scoredistill_run"]``: ``guidance_type``,
``geometry_type``, ``geometry.sh_degree`` where the geometry has one), and a resume whose config differs
-- or whose checkpoint holds the trained state of another guidance, or none for a guidance that keeps one --
is refused with a ``ValueError`` naming the checkpoint and the setting, before any step.

A checkpoint holding a NaN or inf in a module weight, a guidance state or an optimizer moment is refused the
same way, naming the tensor (before: every step was skipped as non-finite, the run exited 0 and wrote a PLY of
NaNs that the pack's own loader refuses).

Files are read with ``torch.load(weights_only=True)`` only (no fallback to full unpickling: a checkpoint
holding pickled objects is refused, never executed).
"""
from __future__ import annotations

import inspect
import pickle
import warnings
from typing import Any, Dict, Optional

import torch

__all__ = [
    "CHECKPOINT_KEY",
    "RUN_KEY",
    "CheckpointedGuidanceMixin",
    "attach_resume_check",
    "check_resume_compatible",
    "find_calling_lightning_module",
    "load_checkpoint_file",
    "non_finite_tensors",
    "run_identity",
]

#: top-level key of a Lightning checkpoint under which guidance states are stored (a dict: key -> state)
CHECKPOINT_KEY = "scoredistill_guidance_states"
#: attribute of a system instance holding the registry {key: guidance} of attached guidances
_REGISTRY_ATTR = "_scoredistill_checkpointed_guidances"
#: top-level key of a Lightning checkpoint holding the run identity (:func:`run_identity`)
RUN_KEY = "scoredistill_run"
#: attribute of a system instance: the resume check is attached (value: the checkpoint path checked, or None)
_RESUME_ATTR = "_scoredistill_resume_check"


def _lightning_module_class():
    try:
        import pytorch_lightning as pl
    except ImportError:  # pragma: no cover - lightning is a threestudio dependency
        return None
    return pl.LightningModule


def find_calling_lightning_module(max_depth: int = 30, holding: Any = None, _frame=None):
    """The nearest ``pytorch_lightning.LightningModule`` bound to ``self`` in the calling frames, or ``None``.

    threestudio systems build their guidance inside a method (``configure`` or ``on_fit_start``) and call
    ``do_update_step`` on their ``Updateable`` attributes from ``on_train_batch_start``, so the system is
    ``self`` a few frames up.

    Args:
        max_depth: number of frames above the caller to inspect.
        holding: if given, only a module that holds this object as an attribute qualifies.
    """
    module_cls = _lightning_module_class()
    if module_cls is None:
        return None
    frame = _frame if _frame is not None else inspect.currentframe().f_back
    try:
        for _ in range(max_depth + 1):
            if frame is None:
                return None
            obj = frame.f_locals.get("self")
            if isinstance(obj, module_cls) and (holding is None or any(v is holding for v in vars(obj).values())):
                return obj
            frame = frame.f_back
        return None
    finally:
        del frame


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors, containers and primitive values only.

    Raises:
        ValueError: the file holds other pickled objects (refused: never unpickled), naming the file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load checkpoint {path}: it holds pickled objects other than tensors and plain containers, "
            f"and scoredistill reads checkpoints with torch.load(weights_only=True) only ({str(e).splitlines()[0]})"
        ) from None


# ------------------------------------------------------------------------------------------ resume compatibility
def run_identity(system) -> Dict[str, Any]:
    """What a resume must keep: ``{"guidance_type", "geometry_type", "geometry.sh_degree"}`` from ``system.cfg``
    (entries the system's config does not have are left out)."""
    cfg = getattr(system, "cfg", None)
    ident: Dict[str, Any] = {}
    for key in ("guidance_type", "geometry_type"):
        value = getattr(cfg, key, None) if cfg is not None else None
        if isinstance(value, str):
            ident[key] = value
    geometry = getattr(cfg, "geometry", None) if cfg is not None else None
    try:
        sh = geometry.get("sh_degree") if geometry is not None else None
    except Exception:
        sh = None
    if isinstance(sh, int) and not isinstance(sh, bool):
        ident["geometry.sh_degree"] = int(sh)
    return ident


def check_resume_compatible(system, checkpoint: Dict[str, Any], path: Any) -> None:
    """Refuse to resume ``system`` from ``checkpoint`` (read from ``path``) if it belongs to another run.

    Compared: the stored :func:`run_identity` (checkpoints written with the pack's hooks) with this config, and
    the guidance states the checkpoint holds (``checkpoint[CHECKPOINT_KEY]``: keys are the guidances' registered
    names) with ``system.guidance_type``.

    Raises:
        ValueError: naming the checkpoint, each differing setting, and what to do.
    """
    current = run_identity(system)
    stored = checkpoint.get(RUN_KEY)
    problems = []
    if isinstance(stored, dict):
        for key, value in stored.items():
            if key in current and current[key] != value:
                problems.append(f"it was trained with system.{key}={value!r}, this config has system.{key}={current[key]!r}")
    guidance = current.get("guidance_type")
    states = checkpoint.get(CHECKPOINT_KEY) or {}
    foreign = sorted(k for k in states if k != guidance)
    if guidance and foreign and not any(p.startswith("it was trained with system.guidance_type") for p in problems):
        problems.append(
            f"it holds the trained state of {', '.join(foreign)} (checkpoint['{CHECKPOINT_KEY}']), "
            f"not of this config's system.guidance_type={guidance!r}"
        )
    bad = non_finite_tensors(checkpoint)
    if bad:
        shown = "; ".join(f"{name}: {n} of {total} values" for name, n, total in bad[:5])
        more = f" (and {len(bad) - 5} more tensors)" if len(bad) > 5 else ""
        problems.append(f"it holds non-finite (NaN/inf) tensors: {shown}{more} -- every step from it would be "
                        "skipped; resume from an earlier checkpoint of the trial (ckpts/epoch=*-step=*.ckpt)")
    if problems:
        raise ValueError(
            f"resume={path}: this checkpoint cannot be resumed with this config: {'; '.join(problems)}. A resume "
            "continues the checkpoint's own run: resume with its trial's configs/parsed.yaml, or start a new trial "
            "(system.weights=<checkpoint> loads only the module weights)"
        )


#: checkpoint entries whose floating-point tensors must be finite for a resume (module weights, the guidances' own
#: trained state, the optimizer's moments)
_FINITE_KEYS = ("state_dict", CHECKPOINT_KEY, "optimizer_states")


def non_finite_tensors(checkpoint: Dict[str, Any]):
    """``[(name, non_finite_count, numel)]`` of every floating-point tensor under :data:`_FINITE_KEYS` holding NaN
    or inf, named by its path (``state_dict['geometry.params.means']``)."""
    out = []

    def walk(value, name):
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex():
                n = int((~torch.isfinite(value)).sum())
                if n:
                    out.append((name, n, value.numel()))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{name}[{k!r}]")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{name}[{i}]")

    for key in _FINITE_KEYS:
        if key in checkpoint:
            walk(checkpoint[key], key)
    return out


def _running_ckpt_path(system) -> Optional[str]:
    trainer = getattr(system, "_trainer", None)
    return getattr(trainer, "ckpt_path", None) if trainer is not None else None


def attach_resume_check(system) -> None:
    """Make ``system``'s checkpoints record :func:`run_identity` and its resumes run :func:`check_resume_compatible`
    (idempotent).  Wraps the instance's ``on_save_checkpoint`` / ``on_load_checkpoint`` (Lightning calls the
    latter before loading the state dict); if the trainer is already resuming (``trainer.ckpt_path``: a system
    part built in ``on_fit_start``), the file is read and checked now."""
    if _RESUME_ATTR not in system.__dict__:
        system.__dict__[_RESUME_ATTR] = None
        original_save = system.on_save_checkpoint
        original_load = system.on_load_checkpoint

        def on_save_checkpoint(checkpoint, _orig=original_save, _system=system):
            _orig(checkpoint)
            checkpoint[RUN_KEY] = run_identity(_system)

        def on_load_checkpoint(checkpoint, _orig=original_load, _system=system):
            path = _running_ckpt_path(_system)
            check_resume_compatible(_system, checkpoint, path or "<checkpoint>")
            _system.__dict__[_RESUME_ATTR] = path
            _orig(checkpoint)

        system.__dict__["on_save_checkpoint"] = on_save_checkpoint
        system.__dict__["on_load_checkpoint"] = on_load_checkpoint
    path = _running_ckpt_path(system)
    if path and system.__dict__.get(_RESUME_ATTR) != path:
        check_resume_compatible(system, load_checkpoint_file(path), path)
        system.__dict__[_RESUME_ATTR] = path


class CheckpointedGuidanceMixin:
    """Save / restore a guidance's own trainable state with Lightning checkpoints, with any system, unmodified.

    Subclasses define :meth:`guidance_state_dict` and :meth:`load_guidance_state_dict`, optionally
    ``checkpoint_state_key``, and attach with :meth:`attach_checkpointing` (at the end of construction; the
    system is found on the call stack unless passed) and/or :meth:`attach_checkpointing_from_caller` (from
    ``do_update_step``: a lazy fallback for a guidance built outside a system method).  See the module
    docstring for the mechanism.
    """

    #: entry name under ``checkpoint[CHECKPOINT_KEY]``; ``None``: the class name
    checkpoint_state_key: Optional[str] = None

    def guidance_state_dict(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_guidance_state_dict(self, state: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _checkpoint_key(self) -> str:
        return self.checkpoint_state_key or type(self).__name__

    # the system is kept under a private name: threestudio's ``Updateable.do_update_step`` visits every public
    # attribute, and a public reference back to the (Updateable) system would recurse
    @property
    def checkpoint_attached(self) -> bool:
        """Whether a LightningModule's checkpoints carry this guidance's state (``self._checkpoint_system``)."""
        return self.__dict__.get("_checkpoint_system") is not None

    def attach_checkpointing(self, system=None, warn: bool = True) -> bool:
        """Hook this guidance's state into ``system``'s checkpoints (idempotent per system).

        ``system=None``: the nearest LightningModule on the call stack (:func:`find_calling_lightning_module`).
        Returns ``True`` if attached, ``False`` (with a ``UserWarning`` if ``warn``) if no LightningModule was found.
        """
        if system is None:
            system = find_calling_lightning_module(_frame=inspect.currentframe().f_back)
        if system is None:
            if warn:
                warnings.warn(
                    f"{type(self).__name__}: no LightningModule found; the guidance's trainable state will not be "
                    "saved with checkpoints (call attach_checkpointing(system) explicitly)"
                )
            return False
        if self.__dict__.get("_checkpoint_system") is system:
            return True
        registry = system.__dict__.get(_REGISTRY_ATTR)
        if registry is None:
            registry = {}
            system.__dict__[_REGISTRY_ATTR] = registry
            original_save = system.on_save_checkpoint
            original_load = system.on_load_checkpoint

            def on_save_checkpoint(checkpoint, _orig=original_save, _reg=registry):
                _orig(checkpoint)
                states = checkpoint.setdefault(CHECKPOINT_KEY, {})
                for key, guidance in _reg.items():
                    states[key] = guidance.guidance_state_dict()

            def on_load_checkpoint(checkpoint, _orig=original_load, _reg=registry):
                _orig(checkpoint)
                states = checkpoint.get(CHECKPOINT_KEY) or {}
                for key, guidance in _reg.items():
                    if key not in states:
                        raise ValueError(guidance._missing_state_message(_running_ckpt_path(system) or "<checkpoint>", states))
                    guidance._load_checkpointed_state(states[key])

            system.__dict__["on_save_checkpoint"] = on_save_checkpoint
            system.__dict__["on_load_checkpoint"] = on_load_checkpoint
        registry[self._checkpoint_key()] = self
        self.__dict__["_checkpoint_system"] = system
        self._restore_from_running_resume(system)
        return True

    def attach_checkpointing_from_caller(self, max_depth: int = 4) -> bool:
        """Attach to the LightningModule found a few frames up that *holds this guidance as an attribute*
        (threestudio's ``BaseSystem.on_train_batch_start`` calls ``do_update_step`` on its Updateable
        attributes; call this from ``do_update_step``).  No-op if already attached.  Returns whether the
        guidance is attached afterwards."""
        if self.checkpoint_attached:
            return True
        system = find_calling_lightning_module(max_depth, holding=self, _frame=inspect.currentframe().f_back)
        return system is not None and self.attach_checkpointing(system)

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
        trainer = getattr(system, "_trainer", None)
        ckpt_path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
        if not ckpt_path:
            return False
        states = load_checkpoint_file(ckpt_path).get(CHECKPOINT_KEY) or {}
        state = states.get(self._checkpoint_key())
        if state is None:
            raise ValueError(self._missing_state_message(ckpt_path, states))
        self._load_checkpointed_state(state)
        return True
