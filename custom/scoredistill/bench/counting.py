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
    :mod:`scoredistill.maths.diffusion` (``t`` a ``(N,)`` long tensor).
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
    def _unet_property(self, name: str, kind: type):
        """The wrapped UNet's ``name`` (``dtype`` / ``device``) when it has one of type ``kind`` (diffusers models
        do), else that of its first parameter."""
        d = getattr(self.unet, name, None)
        return d if isinstance(d, kind) else getattr(next(self.unet.parameters()), name)

    @property
    def dtype(self) -> torch.dtype:
        return self._unet_property("dtype", torch.dtype)

    @property
    def device(self) -> torch.device:
        return self._unet_property("device", torch.device)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)


# ---------------------------------------------------------------------------------------------- host syncs
#: Tensor methods / torch functions that wait for the device when their tensor lives on a GPU: value reads
#: into Python, device-to-host copies, ops whose output shape depends on tensor values, and the linear-algebra
#: calls that check their result on the host (``torch.linalg.inv`` reads the LAPACK ``info``: ``inv_ex`` does not).
SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
                "masked_select", "unique", "unique_consecutive", "argwhere", "linalg_inv", "inverse")
#: functions that make a tensor from host data (a copy to the device when given a device)
_FROM_DATA = ("tensor", "as_tensor", "asarray", "scalar_tensor")


def _is_sync_call(func, args, kwargs) -> str:
    """The name of ``func`` if calling it on ``args`` synchronises a GPU when its tensor is there, else ``""``."""
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


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


def _names_device(d) -> bool:
    """Whether a ``device`` argument means the compute device (anything but the literal ``"cpu"``: a
    ``torch.device`` is taken from a tensor, e.g. ``x.device``, which is the GPU in a GPU run)."""
    if d is None:
        return False
    if isinstance(d, str):
        return d != "cpu"
    return isinstance(d, (torch.device, int))


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

    Counted, on tensors that would live on the GPU: value reads into Python (``item``, ``tolist``,
    ``bool()``/``int()``/``float()``/``__index__``), copies to the host (``cpu()``, ``numpy()``), value-dependent
    shapes (``nonzero``, ``masked_select``, ``unique``, one-argument ``where``, boolean-mask indexing,
    ``repeat_interleave`` without ``output_size``) and ``linalg.inv`` (its error check reads the result) -- the
    calls ``torch.cuda.set_sync_debug_mode("warn")`` reports on CUDA.  Counted too, as ``"h2d"``: copies of host
    data to the device (``torch.tensor(data, device=...)``, ``host.to(device)`` / ``.cuda()`` / ``dev.copy_(host)``
    without ``non_blocking=True``, indexing a device tensor with a host index tensor): a synchronous
    ``cudaMemcpy`` from pageable memory on CUDA.

    Which tensors are host tensors (see :mod:`scoredistill.sync`): the ones made while the counter is
    active without a ``device`` argument (or with ``device="cpu"``), the results of ops on host tensors only,
    their ``.cpu()`` copies, and the ones registered with :func:`scoredistill.sync.host_tensor`.  Every
    other tensor -- made before the counter started (parameters, inputs) or with a ``device`` -- would be on the
    GPU, so a read of it counts, also inside :func:`scoredistill.sync.host_only` (the block's claim is
    checked, not trusted).  Code inside :func:`scoredistill.sync.cpu_path` (taken only on CPU tensors, e.g.
    the CPU rasterizer) is not looked at.  Reads inside ``torch.optim.Optimizer.step`` are not counted (torch's optimizers keep
    their step count on the host unless ``capturable``; their device maths does not read values).

    ``counts`` maps each call name to its count; ``count`` is the total; ``sites`` keeps the first ``keep``
    call sites (``name @ file:line`` of the caller, the file's full path in ``full_sites``) for messages.
    """

    def __init__(self, keep: int = 50):
        super().__init__()
        self.counts: dict = {}
        self.sites: list = []
        self.full_sites: list = []
        self._keep = keep
        self._paused = 0
        self._host: dict = {}

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    # -- host tensors
    def is_host(self, t) -> bool:
        """Whether ``t`` would stay on the host in a GPU run (see the class docstring)."""
        from ..sync import is_registered_host_tensor

        if not isinstance(t, torch.Tensor):
            return False
        r = self._host.get(id(t))
        return (r is not None and r() is t) or is_registered_host_tensor(t)

    def _mark(self, out) -> None:
        import weakref

        for t in _tensors(out):
            key = id(t)
            try:
                self._host[key] = weakref.ref(t, lambda _r, k=key, h=self._host: h.pop(k, None))
            except TypeError:
                pass

    def _h2d(self, name, args, kwargs) -> bool:
        """Whether the call copies host data to the device (see the class docstring)."""
        if kwargs.get("non_blocking") is True:
            return False
        if name in _FROM_DATA:
            data = args[0] if args else kwargs.get("data")
            src_host = not isinstance(data, torch.Tensor) or self.is_host(data)
            return src_host and _names_device(kwargs.get("device"))
        if name in ("to", "cuda", "copy_") and args and isinstance(args[0], torch.Tensor):
            if name == "copy_":
                return len(args) > 1 and self.is_host(args[1]) and not self.is_host(args[0]) \
                    and not (len(args) > 2 and args[2] is True)
            if not self.is_host(args[0]):
                return False
            if name == "cuda":
                return True
            if len(args) > 2 and args[2] is True:  # to(device, dtype, non_blocking)
                return False
            targets = list(args[1:2]) + [kwargs.get("device")]
            for d in targets:
                if isinstance(d, torch.Tensor):
                    return not self.is_host(d)
                if _names_device(d):
                    return True
            return False
        if name == "__getitem__" and len(args) > 1 and not self.is_host(args[0]):
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            return any(isinstance(i, torch.Tensor) and i.dtype != torch.bool and self.is_host(i) for i in idx)
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        call = ""
        from ..sync import in_cpu_path

        if in_cpu_path():  # a path a GPU run never takes
            return func(*args, **kwargs)
        if not self._paused:
            call = _is_sync_call(func, args, kwargs)
            if call and args and self.is_host(args[0]):
                call = ""  # a read of a host tensor: no device sync
            if not call and self._h2d(name, args, kwargs):
                call = "h2d"
            if call and _called_from_torch_optim():
                call = ""
            if call:
                self.counts[call] = self.counts.get(call, 0) + 1
                if len(self.sites) < self._keep:
                    import traceback

                    frames = [f for f in traceback.extract_stack()[:-1] if "torch/" not in f.filename
                              and "counting.py" not in f.filename]
                    full = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
                    self.sites.append(f"{call} @ {full.rsplit('/', 1)[-1]}")
                    self.full_sites.append(f"{call} @ {full}")
        out = func(*args, **kwargs)
        if not self._paused:
            ins = _tensors(list(args) + list(kwargs.values()))
            if call == "h2d" or name == "cuda" or (name == "to" and self._h2d_target(args, kwargs)):
                # now on the device; a CPU run's .to() returns the host tensor itself: a fresh alias stands for
                # the device copy, so the host tensor stays a host tensor
                if args and out is args[0] and self.is_host(out):
                    out = out.view_as(out)
            elif name in ("cpu", "numpy"):
                if not (args and out is args[0]):  # (a CPU run's .cpu() returns the tensor itself: unchanged)
                    self._mark(out)
            elif not ins:
                if not _names_device(kwargs.get("device")):
                    self._mark(out)  # made on the host
            elif name == "to":
                if self.is_host(args[0]):
                    self._mark(out)
            elif all(self.is_host(t) for t in ins):
                self._mark(out)
        return out

    def _h2d_target(self, args, kwargs) -> bool:
        for d in list(args[1:2]) + [kwargs.get("device")]:
            if isinstance(d, torch.Tensor):
                return not self.is_host(d)
            if _names_device(d):
                return True
        return False
