"""Run integrity: the finite-step guard (:mod:`.finite`) and guidance state in checkpoints with resume checks
(:mod:`.checkpointing`)."""
