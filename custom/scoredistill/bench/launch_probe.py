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


def make_probe_callback(out_path: str, stop_after: int):
    import pytorch_lightning as pl
    import torch

    class StepProbe(pl.Callback):
        def __init__(self):
            self.times = []
            self._t0 = None

        def _sync(self):
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._sync()
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._sync()
            self.times.append(time.perf_counter() - self._t0)
            self.write(trainer)
            if stop_after and len(self.times) >= stop_after:
                trainer.should_stop = True

        def write(self, trainer):
            cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            rec = {
                "step_seconds": self.times,
                "max_steps": int(trainer.max_steps),
                "device": torch.cuda.get_device_name() if cuda else "cpu",
                "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
                "peak_rss_bytes": _vm_hwm_bytes(),
            }
            from scoredistill.atomic_io import atomic_write_json

            atomic_write_json(out_path, rec, indent=None, sort_keys=False)

    return StepProbe()


def install(out_path: str, stop_after: int, skip_test: bool = True) -> None:
    import pytorch_lightning

    base = pytorch_lightning.Trainer

    class ProbedTrainer(base):
        def __init__(self, *args, **kwargs):
            kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [make_probe_callback(out_path, stop_after)]
            super().__init__(*args, **kwargs)

        def test(self, *args, **kwargs):
            if skip_test:
                return []
            return super().test(*args, **kwargs)

    pytorch_lightning.Trainer = ProbedTrainer


def main() -> None:
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # run by path: do not shadow top-level modules with this folder's files
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    out = os.environ.get("SCOREDISTILL_PROBE_OUT", "probe.json")
    steps = int(os.environ.get("SCOREDISTILL_PROBE_STEPS", "0"))
    install(os.path.abspath(out), steps, os.environ.get("SCOREDISTILL_PROBE_SKIP_TEST", "1") == "1")
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
