"""Fault injection for launch.py tests (tests only): non-finite values at chosen training steps.

``cpu_launch.py`` calls :func:`install` when ``SCOREDISTILL_TEST_FAULTS`` holds a JSON spec, e.g.
``{"latent_grad": {"steps": [1], "value": "inf"}}``.  Faults (``steps``: trainer global steps, or ``"all"``;
``value``: ``"inf"``, ``"-inf"`` or ``"nan"``):

* ``latent_grad`` -- one entry of the gradient a pack guidance's ``compute_grad`` returns;
* ``render`` -- one pixel of the render a pack guidance receives (so a guidance's own update sees it too);
* ``param_grad`` -- one entry of the first parameter gradient after backward (threestudio ``BaseSystem``).

The classes are patched right after their modules execute (an import hook), so nothing is imported early.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys

import torch

ENV = "SCOREDISTILL_TEST_FAULTS"


def _hit(fault, step) -> bool:
    steps = fault.get("steps", "all")
    return steps == "all" or int(step) in set(int(s) for s in steps)


def _value(fault) -> float:
    return float(fault.get("value", "inf"))


def _patch_guidance_base(module, spec) -> None:
    cls = module.ScoreDistillationGuidance
    original_call = cls.__call__

    def __call__(self, rgb, *args, **kwargs):
        step = getattr(self, "global_step", 0)
        if "render" in spec and _hit(spec["render"], step):
            rgb = rgb.clone(memory_format=torch.contiguous_format)
            rgb.view(-1)[0] = _value(spec["render"])
        if "latent_grad" in spec and "compute_grad" not in self.__dict__:
            inner = self.compute_grad

            def compute_grad(*a, _inner=inner, _self=self, **k):
                out = _inner(*a, **k)
                if _hit(spec["latent_grad"], getattr(_self, "global_step", 0)):
                    grad = out["grad"].clone(memory_format=torch.contiguous_format)
                    grad.view(-1)[0] = _value(spec["latent_grad"])
                    out = dict(out, grad=grad)
                return out

            self.__dict__["compute_grad"] = compute_grad
        return original_call(self, rgb, *args, **kwargs)

    cls.__call__ = __call__


def _patch_system_base(module, spec) -> None:
    cls = module.BaseSystem

    def on_after_backward(self):
        if "param_grad" in spec and _hit(spec["param_grad"], self.true_global_step):
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.view(-1)[0] = _value(spec["param_grad"])
                    break

    cls.on_after_backward = on_after_backward


_PATCHES = {
    "scoredistill.guidance.base": _patch_guidance_base,
    "threestudio.systems.base": _patch_system_base,
}


class _Patcher(importlib.abc.MetaPathFinder):
    def __init__(self, spec):
        self.spec = spec

    def find_spec(self, fullname, path, target=None):
        patch = _PATCHES.get(fullname)
        if patch is None:
            return None
        found = importlib.machinery.PathFinder.find_spec(fullname, path)
        if found is None:
            return None
        original_exec = found.loader.exec_module

        def exec_module(module, _orig=original_exec, _patch=patch):
            _orig(module)
            _patch(module, self.spec)

        found.loader.exec_module = exec_module
        return found


def install() -> None:
    spec = json.loads(os.environ.get(ENV, "") or "{}")
    if spec:
        sys.meta_path.insert(0, _Patcher(spec))
