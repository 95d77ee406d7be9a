"""Guidance state in Lightning checkpoints, and the resume rule: what a checkpoint holds and when it may be resumed.

Used by ``lods-guidance`` (α / LoRA ψ and their optimizer) and ``vdm-guidance`` (the operator ``M_ψ`` and its
optimizer).  Plain python + torch; nothing here imports threestudio or Lightning (the hooks that write and read
these entries are :class:`scoredistill.integrity.attach.RunIntegrity`'s).

The problem: threestudio guidances are plain objects (``BaseObject``, not ``nn.Module``), built by the
system, usually in ``on_fit_start`` -- *after* Lightning restored the module from
``trainer.fit(ckpt_path=...)`` -- so their trainable state is neither in the system's ``state_dict`` nor
restorable through it (registering it as a submodule would even break the strict load of a system that has
no guidance yet: unexpected keys).

The format: every Lightning checkpoint of a system with run integrity attached gets
``checkpoint[CHECKPOINT_KEY][key] = guidance.guidance_state_dict()`` for each checkpointed guidance -- a
top-level entry outside ``state_dict``, so strict loading is unaffected; several guidances on one system are
stored under different keys (``checkpoint_state_key``, default the class name).  A load restores them (a
guidance built in ``configure``, before Lightning's restore); a guidance that attaches while the trainer is
already restoring (``trainer.ckpt_path`` set: the ``on_fit_start`` case) reads its state from that file
before its first step.  Weights loaded with threestudio's ``system.weights`` (not a resume) do not carry
guidance state.

Resume compatibility (:func:`check_resume_compatible`): each checkpoint also records the run's identity
(``checkpoint["scoredistill_run"]``, :func:`run_identity`: ``guidance_type``, ``geometry_type``,
``geometry.sh_degree`` where the geometry has one), and a resume whose config differs -- or whose checkpoint
holds the trained state of another guidance, or none for a guidance that keeps one -- is refused with a
``ValueError`` naming the checkpoint and the setting, before any step.

A checkpoint holding a NaN or inf in a module weight, a guidance state or an optimizer moment is refused the
same way, naming the tensor (:func:`non_finite_tensors`; before: every step was skipped as non-finite, the run
exited 0 and wrote a PLY of NaNs that the pack's own loader refuses).

Files are read with ``torch.load(weights_only=True)`` only (:func:`load_checkpoint_file`; no fallback to full
unpickling: a checkpoint holding pickled objects is refused, never executed).
"""
from __future__ import annotations

import pickle
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

__all__ = [
    "CHECKPOINT_KEY",
    "RUN_KEY",
    "check_resume_compatible",
    "load_checkpoint_file",
    "named_leaves",
    "non_finite_tensors",
    "run_identity",
    "running_ckpt_path",
]

#: top-level key of a Lightning checkpoint under which guidance states are stored (a dict: key -> state)
CHECKPOINT_KEY = "scoredistill_guidance_states"
#: top-level key of a Lightning checkpoint holding the run identity (:func:`run_identity`)
RUN_KEY = "scoredistill_run"


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


def named_leaves(tree: Any, name: str, dotted: bool = False) -> Iterator[Tuple[str, Any]]:
    """``(path, value)`` of every leaf (not a dict / list / tuple) of a nested container, named from ``name``:
    ``name['key'][0]``, or ``name.key[0]`` with ``dotted`` (config settings)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from named_leaves(v, f"{name}.{k}" if dotted else f"{name}[{k!r}]", dotted)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from named_leaves(v, f"{name}[{i}]", dotted)
    else:
        yield name, tree


def non_finite_tensors(checkpoint: Dict[str, Any]):
    """``[(name, non_finite_count, numel)]`` of every floating-point tensor under :data:`_FINITE_KEYS` holding NaN
    or inf, named by its path (``state_dict['geometry.params.means']``)."""
    out = []
    for key in _FINITE_KEYS:
        if key not in checkpoint:
            continue
        for name, value in named_leaves(checkpoint[key], key):
            if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
                n = int((~torch.isfinite(value)).sum())
                if n:
                    out.append((name, n, value.numel()))
    return out


def running_ckpt_path(system) -> Optional[str]:
    """The checkpoint ``system``'s trainer is resuming from (``trainer.ckpt_path``), or ``None``."""
    trainer = getattr(system, "_trainer", None)
    return getattr(trainer, "ckpt_path", None) if trainer is not None else None
