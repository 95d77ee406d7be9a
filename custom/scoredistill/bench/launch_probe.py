"""Measure seconds per iteration and peak memory of a threestudio ``launch.py`` run, without modifying launch.py.

Usage (in a threestudio work tree)::

    SCOREDISTILL_PROBE_OUT=probe.json SCOREDISTILL_PROBE_STEPS=8 \\
        python /path/to/scoredistill/bench/launch_probe.py launch.py --config configs/x.yaml --train --gpu 0 ...

Run it by path, not with ``-m``: importing the ``scoredistill`` package first would import threestudio before
the script (e.g. the CPU harness' ``cpu_launch.py``) can patch it.

The first argument is the script to run as ``__main__`` (``launch.py``, or the test harness'
``cpu_launch.py launch.py ...`` on the CPU).  Before it runs, ``pytorch_lightning.Trainer`` is replaced by a
subclass that adds :class:`StepProbe` to the callbacks and (``SCOREDISTILL_PROBE_SKIP_TEST``, default 1) makes
``Trainer.test`` a no-op, so the run ends after the measured training steps instead of rendering the test views.

:class:`StepProbe` times every training batch (``on_train_batch_start`` → ``on_train_batch_end``, CUDA
synchronised), stops the fit after ``SCOREDISTILL_PROBE_STEPS`` batches (``trainer.should_stop``: the
config -- its ``trainer.max_steps`` and every schedule over it -- is left as the paper sets it) and writes
``SCOREDISTILL_PROBE_OUT`` (JSON): per-step seconds, ``trainer.max_steps``, peak memory (CUDA:
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over the whole process; CPU: peak resident set
``VmHWM``).

With ``SCOREDISTILL_PROBE_PROFILE=1`` (issue 26) the last three of the ``SCOREDISTILL_PROBE_STEPS`` steps are
instrumented, one thing each, and the earlier ones stay plain (``plain_steps``: their indices, for s/it):

* ``profile`` (third-last step): GPU time per part of the step from CUDA events (no sync inside the step) --
  ``render`` (the system's renderer forward), ``vae`` (VAE encoder / decoder forwards), ``unet`` (UNet
  forwards, nested calls once), ``backward`` (Lightning's backward of the step's loss), ``optimizer``
  (``Optimizer.step`` of every optimizer, the guidance's own included; for Lightning's closure step from the
  end of the backward: the finite-step decision and the update), ``densify`` (``_densify`` of pack
  systems), ``step`` (batch start → end) and ``other = step − Σ parts`` (the guidance's and system's remaining
  maths and the GPU idle while the host works);
* ``syncs`` (second-last step): the number of synchronising CUDA calls under
  ``torch.cuda.set_sync_debug_mode("warn")`` and their call sites;
* ``kernels`` (last step): ``torch.profiler`` -- GPU busy time (sum of kernel time), wall time, their difference
  (``host_gap_seconds``: time the GPU waits for the host) and the top operators by GPU time.
"""
from __future__ import annotations

import os
import re
import runpy
import sys
import time


def _vm_hwm_bytes():
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def peak_memory() -> dict:
    """The process' peak memory so far, as both probes record it: ``device`` (the CUDA device's name, or ``cpu``),
    ``peak_allocated_bytes`` / ``peak_reserved_bytes`` (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``
    over the whole process; ``None`` without an initialised CUDA) and ``peak_rss_bytes`` (CPU: peak resident set,
    ``VmHWM``)."""
    import torch

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"device": torch.cuda.get_device_name() if cuda else "cpu",
            "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
            "peak_rss_bytes": _vm_hwm_bytes()}


class _EventParts:
    """CUDA-event timing of parts of one step (forward hooks on modules, wrapped functions); read after a sync."""

    def __init__(self):
        import torch

        self.torch = torch
        self.pairs = {}
        self._open = {}
        self._depth = {}
        self._handles = []
        self._restore = []

    def _ev(self):
        if not (self.torch.cuda.is_available() and self.torch.cuda.is_initialized()):
            return time.perf_counter()  # CPU run: synchronous, wall time
        e = self.torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    @staticmethod
    def _elapsed(a, b):
        return (b - a) if isinstance(a, float) else a.elapsed_time(b) / 1000.0

    def enter(self, name):
        d = self._depth.get(name, 0)
        if d == 0:
            self._open[name] = self._ev()
        self._depth[name] = d + 1

    def exit(self, name):
        self._depth[name] -= 1
        if self._depth[name] == 0:
            self.pairs.setdefault(name, []).append((self._open.pop(name), self._ev()))

    def hook_module(self, name, module):
        if module is None:
            return
        self._handles += [module.register_forward_pre_hook(lambda *a, _n=name: self.enter(_n)),
                          module.register_forward_hook(lambda *a, _n=name: self.exit(_n))]

    def wrap(self, name, obj, attr):
        fn = getattr(obj, attr, None)
        if fn is None:
            return
        had = attr in obj.__dict__

        def wrapped(*a, _fn=fn, **k):
            self.enter(name)
            try:
                return _fn(*a, **k)
            finally:
                self.exit(name)

        setattr(obj, attr, wrapped)
        self._restore.append((obj, attr, fn if had else None))

    def remove(self):
        for h in self._handles:
            h.remove()
        for obj, attr, fn in self._restore:
            if fn is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, fn)
        self._handles, self._restore = [], []

    def seconds(self):
        return {k: sum(self._elapsed(a, b) for a, b in v) for k, v in self.pairs.items()}


def _busy_seconds(prof, key_averages, dev, cuda: bool):
    """Seconds the device was busy in the profiled step, and how that was measured.

    CUDA: the union of the kernel (and memcpy/memset) intervals on the device timeline, so kernels that overlap
    (several streams) count once, and neither the ops' device time (the sum of their kernels) nor user
    annotations such as ``Optimizer.step#Adam.step`` (a span, not work) are added on top.  The H200 run
    (2026-12-04) summed ``self_device_time_total`` over every profiler row instead, which counted each kernel
    twice (once as itself, once under its op) plus the annotations: "busy" > wall.  CPU run: the ops' own CPU
    time (``self_cpu_time_total``, no double counting) stands in.
    """
    if not cuda:
        return sum(dev(e) for e in key_averages) / 1e6, "CPU run: sum of the ops' self CPU time"
    from torch.autograd import DeviceType

    spans = []
    for e in prof.events():
        if getattr(e, "device_type", None) != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            continue
        if str(getattr(e, "name", "")).startswith("ProfilerStep"):
            continue
        tr = e.time_range
        spans.append((tr.start, tr.end))
    spans.sort()
    total, cur_s, cur_e = 0.0, None, None
    for a, b in spans:
        if cur_e is None or a > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / 1e6, "union of the device kernel intervals (overlaps once, no annotations)"


def make_probe_callback(out_path: str, stop_after: int, profile: bool = False):
    import pytorch_lightning as pl
    import torch

    class StepProbe(pl.Callback):
        def __init__(self):
            self.times = []
            self._t0 = None
            self.extra = {}
            self._mode = None
            self._parts = None
            self._opt_hooks = []

        def _kind(self, index):
            """Which instrumentation step ``index`` gets (profile mode, CUDA only): None = a plain step."""
            if not (profile and stop_after >= 6):
                return None
            return {stop_after - 3: "profile", stop_after - 2: "syncs", stop_after - 1: "kernels"}.get(index)

        def _start_parts(self, pl_module):
            parts = _EventParts()
            guidance = getattr(pl_module, "guidance", None)
            parts.hook_module("unet", getattr(guidance, "unet", None))
            vae = getattr(guidance, "vae", None)
            parts.hook_module("vae", getattr(vae, "encoder", None))
            parts.hook_module("vae", getattr(vae, "decoder", None))
            parts.hook_module("render", getattr(pl_module, "renderer", None))
            if "_densify" in dir(pl_module):
                parts.wrap("densify", pl_module, "_densify")
            from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

            def pre(opt, args, kwargs):
                if any(callable(v) for v in list(args) + list(kwargs.values())):
                    self._main_step = True  # Lightning's step(closure): the closure (forward, backward) runs first
                else:
                    parts.enter("optimizer")

            def post(opt, args, kwargs):
                if any(callable(v) for v in list(args) + list(kwargs.values())):
                    if self._main_open:
                        parts.exit("optimizer")
                    self._main_step = self._main_open = False
                else:
                    parts.exit("optimizer")

            self._main_step = self._main_open = False
            self._opt_hooks = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
            parts.enter("step")
            self._parts = parts

        def on_before_backward(self, trainer, pl_module, loss):
            if self._parts is not None:
                self._parts.enter("backward")

        def on_after_backward(self, trainer, pl_module):
            if self._parts is not None:
                self._parts.exit("backward")
                if self._main_step and not self._main_open:  # the update after the closure's backward
                    self._parts.enter("optimizer")
                    self._main_open = True

        @staticmethod
        def _cuda():
            return torch.cuda.is_available() and torch.cuda.is_initialized()

        def _sync(self):
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._sync()
            self._mode = self._kind(len(self.times))
            if self._mode == "profile":
                self._start_parts(pl_module)
            elif self._mode == "syncs" and self._cuda():
                import warnings

                self._warn_ctx = warnings.catch_warnings(record=True)
                self._warnings = self._warn_ctx.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            elif self._mode == "syncs":  # CPU run: the calls that would synchronise a GPU (bench.counting)
                from scoredistill.bench.counting import SyncCounter

                self._counter = SyncCounter().__enter__()
            elif self._mode == "kernels":
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if self._cuda() else [])
                self._prof = torch.profiler.profile(activities=acts)
                self._prof.__enter__()
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self._mode == "syncs" and not self._cuda():
                self._counter.__exit__(None, None, None)
                sites = {}
                for site in self._counter.full_sites:  # full paths (basenames were ambiguous: module.py)
                    sites[site] = sites.get(site, 0) + 1
                self.extra["syncs"] = {"step": len(self.times), "count": self._counter.count, "sites": sites,
                                       "how": "CPU run: scoredistill.bench.counting.SyncCounter (calls that would sync a GPU)"}
            elif self._mode == "syncs":  # before this probe's own synchronize
                torch.cuda.set_sync_debug_mode(0)
                self._warn_ctx.__exit__(None, None, None)
                msgs = [w for w in self._warnings if "synchroniz" in str(w.message)]
                sites = {}
                for w in msgs:
                    key = f"{w.filename}:{w.lineno}"  # full path (a basename such as module.py is ambiguous)
                    sites[key] = sites.get(key, 0) + 1
                self.extra["syncs"] = {"step": len(self.times), "count": len(msgs),
                                       "sites": dict(sorted(sites.items(), key=lambda kv: -kv[1])),
                                       "how": 'torch.cuda.set_sync_debug_mode("warn")'}
            if self._mode == "profile":
                self._parts.exit("step")
            self._sync()
            self.times.append(time.perf_counter() - self._t0)
            if self._mode == "profile":
                secs = self._parts.seconds()
                self._parts.remove()
                for h in self._opt_hooks:
                    h.remove()
                self._parts = None
                step = secs.pop("step", 0.0)
                parts = {k: secs.get(k, 0.0) for k in ("render", "vae", "unet", "backward", "optimizer", "densify")}
                self.extra["profile"] = {"step": len(self.times) - 1, "wall_seconds": self.times[-1],
                                         "gpu_step_seconds": step, "parts_seconds": parts,
                                         "other_seconds": step - sum(parts.values())}
            elif self._mode == "kernels":
                self._prof.__exit__(None, None, None)
                ka = self._prof.key_averages()
                if self._cuda():
                    dev = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))
                else:  # CPU run: the ops' own CPU time stands in for the device time
                    dev = lambda e: e.self_cpu_time_total
                busy, how = _busy_seconds(self._prof, ka, dev, self._cuda())
                top = sorted(ka, key=dev, reverse=True)[:15]
                self.extra["kernels"] = {"step": len(self.times) - 1, "wall_seconds": self.times[-1],
                                         "gpu_busy_seconds": busy, "host_gap_seconds": self.times[-1] - busy,
                                         "busy_how": how,
                                         "top_ops": [{"name": e.key[:80], "gpu_seconds": dev(e) / 1e6, "calls": e.count}
                                                     for e in top]}
                self._prof = None
            self._mode = None
            self.write(trainer)
            if stop_after and len(self.times) >= stop_after:
                trainer.should_stop = True

        def write(self, trainer):
            rec = {
                "step_seconds": self.times,
                "max_steps": int(trainer.max_steps),
                **peak_memory(),
                "plain_steps": [i for i in range(len(self.times)) if self._kind(i) is None],
                **self.extra,
            }
            from scoredistill.atomic_io import atomic_write_json

            atomic_write_json(out_path, rec, indent=None, sort_keys=False)

    return StepProbe()


def install(out_path: str, stop_after: int, skip_test: bool = True, profile: bool = False) -> None:
    import pytorch_lightning

    base = pytorch_lightning.Trainer

    class ProbedTrainer(base):
        def __init__(self, *args, **kwargs):
            kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [make_probe_callback(out_path, stop_after, profile)]
            super().__init__(*args, **kwargs)

        def test(self, *args, **kwargs):
            if skip_test:
                return []
            return super().test(*args, **kwargs)

    pytorch_lightning.Trainer = ProbedTrainer


def run_script_after(install_probe, usage: str) -> None:
    """Run ``sys.argv[1]`` (``launch.py`` or another wrapper) as ``__main__`` with the arguments after it as its
    ``sys.argv``, after ``install_probe()``; ``usage`` is printed (exit) when no script is given.  The shared
    tail of the probe wrappers (this module's and :mod:`scoredistill.bench.gt3d_probe`'s ``main``)."""
    if len(sys.argv) < 2:
        raise SystemExit(usage)
    install_probe()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


def main() -> None:
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # run by path: do not shadow top-level modules with this folder's files
    out = os.environ.get("SCOREDISTILL_PROBE_OUT", "probe.json")
    steps = int(os.environ.get("SCOREDISTILL_PROBE_STEPS", "0"))
    run_script_after(lambda: install(os.path.abspath(out), steps, os.environ.get("SCOREDISTILL_PROBE_SKIP_TEST", "1") == "1",
                                     os.environ.get("SCOREDISTILL_PROBE_PROFILE", "0") == "1"), __doc__)


if __name__ == "__main__":
    main()
