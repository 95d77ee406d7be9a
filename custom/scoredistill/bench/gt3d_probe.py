"""Record a whole threestudio ``launch.py`` run without modifying launch.py (used by :mod:`scoredistill.bench.gt3d_gpu`).

Usage (in a threestudio work tree; run by path, not with ``-m``, so that the CPU harness can patch threestudio
before anything imports it)::

    SCOREDISTILL_GT3D_PROBE_OUT=probe.json python /path/to/scoredistill/bench/gt3d_probe.py \\
        [cpu_launch.py] launch.py --config ... --train --gpu 0 ...

``pytorch_lightning.Trainer`` is replaced by a subclass that adds :class:`RunProbe` to the callbacks; everything
else (the fit, the test, the exports, ``trainer.max_time``) is launch.py's own.  The JSON is rewritten every
``SCOREDISTILL_GT3D_PROBE_EVERY`` steps (default 25), at the end of training and at the end of the test, so a run
killed at the wall budget keeps what it measured:

* ``step_seconds``: wall seconds of every training batch (CUDA synchronised), ``global_step``, ``max_steps``;
* ``gaussians``: ``[(step, count), ...]`` of Gaussian configs (every ``EVERY`` steps and at the end);
* ``peak_allocated_bytes`` / ``peak_reserved_bytes`` (CUDA, the whole process), ``peak_rss_bytes`` (CPU);
* ``t_first_step``, ``train_until`` (the stop: ``SCOREDISTILL_GT3D_TRAIN_SECONDS`` after the first step, bounded
  by ``SCOREDISTILL_GT3D_TRAIN_UNTIL``);
* ``train_end_step``, ``stop_reason`` (``max_steps`` / ``wall_deadline`` (either of those two) /
  ``max_time`` / ``other``), ``test_done``.
"""
from __future__ import annotations

import os
import sys
import time

OUT_ENV = "SCOREDISTILL_GT3D_PROBE_OUT"
EVERY_ENV = "SCOREDISTILL_GT3D_PROBE_EVERY"
#: absolute wall-clock time (epoch seconds) after which training stops (``trainer.should_stop``); then launch.py
#: tests and exports as after any fit.  Unlike ``trainer.max_time`` (counted from the start of training) it does
#: not move with the process' start-up time, which varies when many runs start at once
UNTIL_ENV = "SCOREDISTILL_GT3D_TRAIN_UNTIL"
#: the run's own training window (seconds), counted from ITS first training step (so a slow start-up, e.g. many
#: processes starting at once, does not shorten it); the absolute ``UNTIL_ENV`` still bounds it
WINDOW_ENV = "SCOREDISTILL_GT3D_TRAIN_SECONDS"


def gaussian_count(pl_module):
    """Number of Gaussians of a gsplat geometry (``geometry.params["means"]``), else ``None``."""
    params = getattr(getattr(pl_module, "geometry", None), "params", None)
    try:
        return int(params["means"].shape[0])
    except Exception:
        return None


def make_callback(out_path: str, every: int, until: float = None, window: float = None):
    import pytorch_lightning as pl
    import torch

    from scoredistill.bench.launch_probe import peak_memory  # the probes' one record of peak memory

    class RunProbe(pl.Callback):
        def __init__(self):
            self.rec = {"step_seconds": [], "gaussians": [], "global_step": 0, "max_steps": None,
                        "train_end_step": None, "stop_reason": None, "test_done": False, "t_start": time.time()}
            self._t0 = None
            self._until_hit = False
            self._until = until

        def _stop_at(self, now: float):
            """Called at the first training step: the run's stop is its window from now, bounded by ``until``."""
            if window is not None:
                own = now + window
                self._until = own if self._until is None else min(self._until, own)
                self.rec["t_first_step"] = now
                self.rec["train_until"] = self._until

        @staticmethod
        def _cuda():
            return torch.cuda.is_available() and torch.cuda.is_initialized()

        def _sync(self):
            if self._cuda():
                torch.cuda.synchronize()

        def write(self, trainer, pl_module):
            self.rec.update({"global_step": int(trainer.global_step), "max_steps": int(trainer.max_steps),
                             **peak_memory(), "t_last": time.time()})
            from scoredistill.atomic_io import atomic_write_json

            atomic_write_json(out_path, self.rec, indent=None, sort_keys=False)

        def _count(self, trainer, pl_module):
            n = gaussian_count(pl_module)
            if n is not None and (not self.rec["gaussians"] or self.rec["gaussians"][-1][0] != int(trainer.global_step)):
                self.rec["gaussians"].append([int(trainer.global_step), n])

        def on_train_start(self, trainer, pl_module):
            self._count(trainer, pl_module)
            self.write(trainer, pl_module)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._sync()
            self._t0 = time.perf_counter()
            if "t_first_step" not in self.rec:
                self.rec["t_first_step"] = time.time()
                self._stop_at(self.rec["t_first_step"])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._sync()
            self.rec["step_seconds"].append(time.perf_counter() - self._t0)
            if len(self.rec["step_seconds"]) % every == 0:
                self._count(trainer, pl_module)
                self.write(trainer, pl_module)
            if self._until is not None and time.time() >= self._until:
                self._until_hit = True
                trainer.should_stop = True

        def on_train_end(self, trainer, pl_module):
            self._count(trainer, pl_module)
            step = int(trainer.global_step)
            self.rec["train_end_step"] = step
            if step >= int(trainer.max_steps) > 0:
                self.rec["stop_reason"] = "max_steps"
            elif self._until_hit:
                self.rec["stop_reason"] = "wall_deadline"
            elif any(type(c).__name__ == "Timer" and c.time_remaining() is not None and c.time_remaining() <= 0
                     for c in trainer.callbacks):
                self.rec["stop_reason"] = "max_time"
            else:
                self.rec["stop_reason"] = "other"
            self.write(trainer, pl_module)

        def on_test_end(self, trainer, pl_module):
            self.rec["test_done"] = True
            self.write(trainer, pl_module)

    return RunProbe()


def install(out_path: str, every: int, until: float = None, window: float = None) -> None:
    import pytorch_lightning

    base = pytorch_lightning.Trainer

    class RecordedTrainer(base):
        def __init__(self, *args, **kwargs):
            kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [make_callback(out_path, every, until, window)]
            super().__init__(*args, **kwargs)

    pytorch_lightning.Trainer = RecordedTrainer


def main() -> None:
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # run by path: do not shadow top-level modules with this folder's files
    from scoredistill.bench.launch_probe import run_script_after

    until, window = os.environ.get(UNTIL_ENV), os.environ.get(WINDOW_ENV)
    run_script_after(lambda: install(os.path.abspath(os.environ.get(OUT_ENV, "probe.json")),
                                     max(1, int(os.environ.get(EVERY_ENV, "25"))),
                                     float(until) if until else None, float(window) if window else None), __doc__)


if __name__ == "__main__":
    main()
