"""Run integrity: no non-finite optimizer step is applied, a guidance's own trainable state lives in the
checkpoints, and a resume continues only its own run.

* :mod:`.finite`: the finite-step guard (:class:`FiniteStepGuard`) and the device-side rule of the guidances'
  internal optimizers (:func:`finite_ok`, :func:`step_if_finite`);
* :mod:`.checkpointing`: what a checkpoint holds (guidance states, the run identity), how it is read
  (``weights_only=True``) and when it may be resumed (:func:`check_resume_compatible`);
* :mod:`.attach`: :func:`attach_run_integrity`, the one entry point that attaches all of it to a system (a
  LightningModule instance), and :class:`RunIntegrity`, what it attached.

How a system gets it -- always by an explicit relation, never found through the call stack:

1. the pack's systems attach themselves (:class:`RunIntegrityMixin`: ``self.attach_run_integrity(...)`` in
   ``configure()``) and hand down each pack guidance they build (``self.run_integrity.add_guidance(guidance)``);
2. a foreign system (e.g. threestudio's ``dreamfusion-system``) may make the one call
   ``attach_run_integrity(system)`` itself;
3. otherwise a pack guidance attaches, at its first ``do_update_step`` (threestudio's
   ``BaseSystem.on_train_batch_start`` calls it on the system's Updateable attributes, before
   ``training_step``), to the LightningModule that holds it as an attribute
   (:func:`lightning_module_holding`), with the same :func:`attach_run_integrity` -- so threestudio's own
   systems get the guard, the resume check and the guidance-state checkpoints unmodified.  A guidance the
   system holds only indirectly (inside a wrapper) needs 1. or 2.

Nothing here imports threestudio; see ``docs/guidance-base.md`` ("Finite steps", "Guidances with their own
trainable state").
"""
from .attach import (
    CheckpointedGuidanceMixin,
    RunIntegrity,
    RunIntegrityMixin,
    attach_run_integrity,
    get_finite_guard,
    get_run_integrity,
    install_finite_guard,
    lightning_module_holding,
)
from .checkpointing import (
    CHECKPOINT_KEY,
    RUN_KEY,
    check_resume_compatible,
    load_checkpoint_file,
    named_leaves,
    non_finite_tensors,
    run_identity,
)
from .finite import (
    DEFAULT_MAX_NONFINITE_SKIPS,
    FiniteStepGuard,
    NonFiniteStepError,
    clone_state,
    finite_ok,
    make_capturable,
    step_if_finite,
    step_is_finite,
    validate_max_nonfinite_skips,
)

__all__ = [
    "CHECKPOINT_KEY",
    "DEFAULT_MAX_NONFINITE_SKIPS",
    "RUN_KEY",
    "CheckpointedGuidanceMixin",
    "FiniteStepGuard",
    "NonFiniteStepError",
    "RunIntegrity",
    "RunIntegrityMixin",
    "attach_run_integrity",
    "check_resume_compatible",
    "clone_state",
    "finite_ok",
    "get_finite_guard",
    "get_run_integrity",
    "install_finite_guard",
    "lightning_module_holding",
    "load_checkpoint_file",
    "make_capturable",
    "named_leaves",
    "non_finite_tensors",
    "run_identity",
    "step_if_finite",
    "step_is_finite",
    "validate_max_nonfinite_skips",
]
