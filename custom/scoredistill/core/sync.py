"""Marking host-side tensor reads that are not GPU synchronisations.

A training step should not wait for the GPU (issue 26): no ``.item()`` / ``bool(tensor)`` / ``.tolist()`` /
``.cpu()`` / value-dependent shapes on device tensors.  Some reads in the step are of tensors that live on the
host in every run (a schedule built in Python, a CPU ``torch.Generator``'s draws, the argument check of a
CPU-only branch).  :func:`host_only` marks such a block, so that
:class:`scoredistill.bench.counting.SyncCounter`, which on a CPU test run cannot tell host tensors from
would-be device tensors, does not count them.  It changes nothing else.
"""
from __future__ import annotations

import contextlib

_depth = 0


@contextlib.contextmanager
def host_only():
    """Reads inside this block are of host tensors (not device syncs); see the module docstring."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def in_host_only() -> bool:
    """Whether a :func:`host_only` block is active."""
    return _depth > 0
