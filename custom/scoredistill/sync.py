"""Host tensors, host reads and host-to-device copies in the training step (issue 26).

A training step should not wait for the GPU: no ``.item()`` / ``bool(tensor)`` / ``.tolist()`` / ``.cpu()`` /
value-dependent shapes on device tensors, and no copy of pageable host memory to the device (a synchronous
``cudaMemcpy``: ``tensor.to("cuda")`` of a CPU tensor, ``torch.tensor(3.0, device="cuda")``).

:class:`scoredistill.bench.counting.SyncCounter` states on a CPU test run the count a GPU step has.  It tells
host tensors from would-be device tensors by how they were made: a tensor created without a ``device``
argument (a Python-built schedule, a CPU generator's draw), anything computed from host tensors only, and
the tensors registered with :func:`host_tensor` (module constants, schedules built at configure time) stay
on the host in a GPU run; every other tensor would be on the GPU.

* :func:`host_only` marks a block whose reads are of host tensors.  The counter checks the claim: a read
  inside it of a would-be device tensor is still counted.
* :func:`cpu_path` marks a block that runs only when the step's tensors are on the CPU (a GPU run takes
  another path, e.g. gsplat's kernels instead of the CPU rasterizer): the counter does not look inside.
* :func:`to_device` copies a host tensor to a CUDA device from pinned memory without blocking (no sync);
  on the CPU it is the identity.
"""
from __future__ import annotations

import contextlib
import weakref

import numbers

import torch

_depth = 0
#: id -> weak reference of the tensors registered with :func:`host_tensor`
_host: dict = {}


@contextlib.contextmanager
def host_only():
    """Reads inside this block are of host tensors (not device syncs); see the module docstring."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


_cpu_depth = 0


@contextlib.contextmanager
def cpu_path():
    """The block runs only on CPU tensors (a GPU run never executes it); see the module docstring."""
    global _cpu_depth
    _cpu_depth += 1
    try:
        yield
    finally:
        _cpu_depth -= 1


def in_cpu_path() -> bool:
    """Whether a :func:`cpu_path` block is active."""
    return _cpu_depth > 0


def in_host_only() -> bool:
    """Whether a :func:`host_only` block is active."""
    return _depth > 0


def host_tensor(t: torch.Tensor) -> torch.Tensor:
    """Register ``t`` as a tensor that lives on the host in every run (returns ``t``); changes nothing else."""
    key = id(t)
    _host[key] = weakref.ref(t, lambda _r, k=key: _host.pop(k, None))
    return t


def is_registered_host_tensor(t) -> bool:
    """Whether ``t`` was registered with :func:`host_tensor` (and is still alive)."""
    r = _host.get(id(t))
    return r is not None and r() is t


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device`` without a host-device synchronisation.

    Same device: ``t`` itself.  A CPU tensor to a CUDA device: copied into pinned (page-locked) memory and
    from there asynchronously (``non_blocking=True``; the caching host allocator keeps the pinned buffer alive
    until the copy has run), so the host does not wait.  Anything else: ``t.to(device)``.
    """
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    if device.type == "cpu" and t.device.type != "cpu":
        return t.to(device)  # to the host: must wait for the data
    return t.to(device, non_blocking=True)  # same device: ``t`` itself


def log_host(module, name: str, value, **kwargs) -> None:
    """``module.log(name, value, **kwargs)`` (a LightningModule) with a Python number passed as a host tensor.

    Lightning's ``self.log(name, 3.0)`` makes ``torch.tensor(3.0, device=self.device)``: a synchronous
    host-to-device copy per value per step on CUDA (7-21 per step in the H200 run, ``docs/speed.md``).  The logged
    value is the same (Lightning's default float dtype); tensors are passed through unchanged."""
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        value = torch.tensor(value, dtype=torch.get_default_dtype())
    module.log(name, value, **kwargs)
