"""Per-step overhead of a guidance outside its UNet and VAE: the share of step time spent elsewhere (same run).

:class:`ModelTimer` puts forward and (full) backward hooks on the UNet and the VAE's encoder / decoder /
quant convs and accumulates the wall time spent inside them (nested calls counted once; on CUDA the hooks
synchronise, so the split is exact there too, at the price of those syncs).  :func:`measure_overhead` runs
``warmup + steps`` guidance steps -- ``guidance(rgb, prompt_utils, ...)``, ``loss_sds.backward()`` (plus the
guidance's other ``loss_*`` outputs), ``update_step`` -- and returns ``overhead_share = 1 − model_time /
step_time`` over the measured steps.  What it counts as overhead: timestep sampling, noise, text embeddings,
the method's tensor maths, host-device syncs, logs, LoRA / operator bookkeeping, optimiser steps of the
method's own parameters and Python.  Not counted: rendering (the guidance gets a fixed render).

The command (``benchmarks/overhead.py``) runs each registered guidance on the tiny SD on the CPU.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Iterable, Optional

import torch


class ModelTimer:
    """Wall time inside the hooked modules (forward and backward), nested calls counted once."""

    def __init__(self, modules: Iterable[torch.nn.Module]):
        self._cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.seconds = 0.0
        self._depth = 0
        self._t0 = 0.0
        self._handles = []
        for m in modules:
            if m is None:
                continue
            self._handles += [
                m.register_forward_pre_hook(lambda *a: self._enter()),
                m.register_forward_hook(lambda *a: self._exit()),
                m.register_full_backward_pre_hook(lambda *a: self._enter()),
                m.register_full_backward_hook(lambda *a: self._exit()),
            ]

    @staticmethod
    def sync():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def _sync(self):
        if self._cuda:
            torch.cuda.synchronize()

    def _enter(self):
        if self._depth == 0:
            self._sync()
            self._t0 = time.perf_counter()
        self._depth += 1

    def _exit(self):
        self._depth -= 1
        if self._depth == 0:
            self._sync()
            self.seconds += time.perf_counter() - self._t0

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


class HostReadCounter:
    """Counts reads of tensor values into Python (``item``, ``tolist``, ``int()``, ``float()``, ``bool()``) while
    active: each is a host-device synchronisation when the tensor lives on a GPU.  On the CPU it counts every
    such read (also of tensors that would stay on the host on a GPU run, e.g. GE3D's DBC weights) -- an upper
    bound of the syncs per step, comparable before / after a change."""

    _NAMES = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")

    def __init__(self):
        self.count = 0
        self._orig = {}

    def __enter__(self):
        for name in self._NAMES:
            orig = getattr(torch.Tensor, name)
            self._orig[name] = orig

            def wrapper(t, *a, _orig=orig, **k):
                self.count += 1
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(torch.Tensor, name, orig)
        self._orig = {}


def model_modules(guidance) -> list:
    vae = guidance.vae
    return [guidance.unet, vae.encoder, getattr(vae, "quant_conv", None), vae.decoder, getattr(vae, "post_quant_conv", None)]


def measure_overhead(guidance, prompt_utils, batch: int = 1, render_size: int = 32, steps: int = 3, warmup: int = 1,
                     seed: int = 0) -> Dict[str, Any]:
    """``{"step_seconds", "model_seconds", "overhead_seconds", "overhead_share", "unet_calls", "host_reads"}`` per
    step (means; ``host_reads``: :class:`HostReadCounter` over one extra step after the timed ones)."""
    g = torch.Generator().manual_seed(seed)
    device = guidance.device
    rgb = torch.rand(batch, render_size, render_size, 3, generator=g).to(device).requires_grad_(True)
    elev = torch.full((batch,), 15.0, device=device)
    azim = torch.linspace(-180, 180, batch + 1, device=device)[:batch]
    dist = torch.full((batch,), 2.0, device=device)
    timer = ModelTimer(model_modules(guidance))
    total = model = 0.0
    calls0 = guidance.unet_calls
    try:
        for i in range(warmup + steps):
            guidance.update_step(0, i)
            if i == warmup:
                timer.seconds = 0.0
                calls0 = guidance.unet_calls
            ModelTimer.sync()
            t0 = time.perf_counter()
            out = guidance(rgb, prompt_utils, elev, azim, dist)
            loss = sum(v for k, v in out.items() if k.startswith("loss_") and torch.is_tensor(v) and v.requires_grad)
            loss.backward()
            rgb.grad = None
            ModelTimer.sync()
            if i >= warmup:
                total += time.perf_counter() - t0
        model = timer.seconds
        calls = (guidance.unet_calls - calls0) / steps
    finally:
        timer.remove()
    with HostReadCounter() as reads:  # one more step, untimed (the counter's wrappers cost time)
        guidance.update_step(0, warmup + steps)
        out = guidance(rgb, prompt_utils, elev, azim, dist)
        sum(v for k, v in out.items() if k.startswith("loss_") and torch.is_tensor(v) and v.requires_grad).backward()
    return {
        "step_seconds": total / steps,
        "model_seconds": model / steps,
        "overhead_seconds": (total - model) / steps,
        "overhead_share": (total - model) / total if total > 0 else None,
        "unet_calls": calls,
        "host_reads": reads.count,
    }
