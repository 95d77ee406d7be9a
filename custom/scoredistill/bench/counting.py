"""Exact cost accounting of a diffusion UNet: forward sample-evaluations and backward passes.

:class:`CountingUNet` wraps any module with the diffusers ``UNet2DConditionModel`` call signature
(``unet(sample, timestep, encoder_hidden_states, ...) -> output with .sample``) -- a real UNet, the tiny
UNet of :mod:`scoredistill.testing.tiny_models` or the exact-score prior -- and counts

* ``calls``: forward calls; ``samples``: forward *sample*-evaluations (the batch size of each call, so one
  call on a CFG batch ``[x_t, x_t]`` of ``B`` views counts ``2B``);
* ``backward_calls`` / ``backward_samples``: backward passes through the UNet, counted by a gradient hook
  on the output of each forward that is in the autograd graph; the hook fires once for every backward
  pass that reaches that output (so a forward whose output is used in two ``.backward()`` calls counts
  twice, and a forward under ``torch.no_grad()`` or whose output receives no gradient counts zero).

Everything else (attributes such as ``config``, ``dtype``, ``device``, ``add_adapter``) is forwarded to the
wrapped module, so the wrapper can stand in for the UNet in code that inspects it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class UNetCost:
    """A snapshot of the counters (see :class:`CountingUNet`)."""

    calls: int = 0
    samples: int = 0
    backward_calls: int = 0
    backward_samples: int = 0

    def __sub__(self, other: "UNetCost") -> "UNetCost":
        return UNetCost(
            self.calls - other.calls,
            self.samples - other.samples,
            self.backward_calls - other.backward_calls,
            self.backward_samples - other.backward_samples,
        )

    def per(self, n: int) -> dict:
        """Counts divided by ``n`` (e.g. the number of optimisation steps), as a dict of floats."""
        if n <= 0:
            raise ValueError(f"n must be >= 1, got {n}")
        return {k: getattr(self, k) / n for k in ("calls", "samples", "backward_calls", "backward_samples")}


class CountingUNet(nn.Module):
    """Counting wrapper around a diffusers-style UNet (see module docstring).

    Args:
        unet: the wrapped module; called as ``unet(sample, timestep, encoder_hidden_states, **kwargs)``.

    The wrapper also offers :meth:`eps`, the ``eps_fn(x, t, emb) -> noise_pred`` callable convention of
    :mod:`scoredistill.core.diffusion` (``t`` a ``(N,)`` long tensor).
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.reset()

    # ------------------------------------------------------------------ counters
    def reset(self) -> None:
        self.calls = 0
        self.samples = 0
        self.backward_calls = 0
        self.backward_samples = 0

    def snapshot(self) -> UNetCost:
        return UNetCost(self.calls, self.samples, self.backward_calls, self.backward_samples)

    # ------------------------------------------------------------------ calls
    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *args, **kwargs):
        n = int(sample.shape[0])
        self.calls += 1
        self.samples += n
        out = self.unet(sample, timestep, encoder_hidden_states, *args, **kwargs)
        pred = out[0] if isinstance(out, tuple) else out.sample
        if pred.requires_grad:
            def _hook(grad, n=n):
                self.backward_calls += 1
                self.backward_samples += n
                return grad

            pred.register_hook(_hook)
        return out

    def eps(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``ε̂ = unet(x, t, emb).sample`` cast back to ``x``'s dtype (the UNet may run in another dtype)."""
        out = self.forward(x.to(self.dtype), t, emb.to(self.dtype))
        return out.sample.to(x.dtype)

    # ------------------------------------------------------------------ pass-through
    @property
    def dtype(self) -> torch.dtype:
        d = getattr(self.unet, "dtype", None)
        if isinstance(d, torch.dtype):
            return d
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        d = getattr(self.unet, "device", None)
        if isinstance(d, torch.device):
            return d
        return next(self.unet.parameters()).device

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)


# ---------------------------------------------------------------------------------------------- host syncs
#: Tensor methods / torch functions that wait for the device when their tensor lives on a GPU: value reads
#: into Python, device-to-host copies, and ops whose output shape depends on tensor values.
SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
                "masked_select", "unique", "unique_consecutive", "argwhere")


def _is_sync_call(func, args, kwargs) -> str:
    """The name of ``func`` if calling it on ``args`` synchronises a GPU, else ``""``."""
    name = getattr(func, "__name__", "")
    if name == "where" and len(args) == 1 and not kwargs:  # torch.where(cond): nonzero
        return "where(cond)"
    if name in SYNC_METHODS:
        return name
    if name == "__getitem__" and len(args) > 1:  # boolean-mask indexing: data-dependent shape
        idx = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx):
            return "__getitem__[bool mask]"
    if name == "repeat_interleave" and "output_size" not in kwargs and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return "repeat_interleave"
    return ""


def _called_from_torch_optim() -> bool:
    """Whether the innermost caller outside torch's override machinery is in ``torch/optim`` (an optimizer's
    host-side step count; Lightning runs the whole training step inside ``optimizer.step(closure)``, so this is
    decided by the calling frame, not by optimizer hooks)."""
    import sys

    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename.replace("\\", "/")
        if not (name.endswith("torch/overrides.py") or name.endswith("bench/counting.py") or "torch/utils/_device" in name):
            return "/torch/optim/" in name
        f = f.f_back
    return False


class SyncCounter(torch.overrides.TorchFunctionMode):
    """Counts the calls that would synchronise the host with a GPU, while active (a ``TorchFunctionMode``).

    Counted: value reads into Python (``item``, ``tolist``, ``bool()``/``int()``/``float()``/``__index__``),
    copies to the host (``cpu()``, ``numpy()``; not ``to(device)``, which
    cannot be told from a host copy on a CPU run -- the pack's step code uses ``.cpu()``) and value-dependent shapes (``nonzero``,
    ``masked_select``, ``unique``, one-argument ``where``, boolean-mask indexing, ``repeat_interleave``
    without ``output_size``) -- the calls ``torch.cuda.set_sync_debug_mode("warn")`` reports on CUDA, counted on
    any device, so that a CPU test states the count a GPU step would have.  Calls on tensors that stay on the
    host in a GPU run (e.g. a Python-built schedule) are counted too unless the tensor is listed in ``ignore``
    or the call runs inside :func:`scoredistill.core.sync.host_only` (reads of host tensors the code marks as
    such) or inside ``torch.optim.Optimizer.step`` (torch's optimizers keep their step count on the host unless
    ``capturable``; their device maths does not read values).

    ``counts`` maps each call name to its count; ``count`` is the total; ``where`` keeps the first ``keep``
    call sites (``file:line`` of the caller) for messages.
    """

    def __init__(self, keep: int = 50):
        super().__init__()
        self.counts: dict = {}
        self.sites: list = []
        self._keep = keep
        self._paused = 0

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        from ..core.sync import in_host_only

        if not self._paused and not in_host_only():
            name = _is_sync_call(func, args, kwargs)
            if name and _called_from_torch_optim():
                name = ""
            if name:
                self.counts[name] = self.counts.get(name, 0) + 1
                if len(self.sites) < self._keep:
                    import traceback

                    frames = [f for f in traceback.extract_stack()[:-1] if "torch/" not in f.filename
                              and "counting.py" not in f.filename]
                    site = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
                    self.sites.append(f"{name} @ {site}")
        return func(*args, **kwargs)
