"""Run a script (threestudio's ``launch.py``, unmodified) counting the UNet's forward samples.

Usage: ``python /path/to/scoredistill/suite/count_launch.py SCRIPT ARGS...`` (SCRIPT may itself be a wrapper
that runs launch.py with ``runpy``, such as the tests' ``cpu_launch.py``).  It is run as a file, not with
``-m``: importing the ``scoredistill`` package would import threestudio (to register the pack) before
launch.py -- or a wrapper such as ``cpu_launch.py`` -- sets it up; this file imports nothing of the pack.

Before the script runs, ``diffusers.UNet2DConditionModel.forward`` is wrapped to add the batch size of every
call's ``sample`` (so a CFG batch ``[x_t, x_t]`` of B views counts 2B; the same unit as
:class:`scoredistill.bench.counting.CountingUNet`'s ``samples``).  Every UNet of the process is counted:
the guidance's, a LoRA-adapted one (LODS), threestudio's own ``stable-diffusion-guidance``.  At exit the
totals are written atomically as JSON (``{"unet_calls": ..., "unet_samples": ...}``) to the file named by
``$SCOREDISTILL_UNET_COUNT_FILE`` (nothing is written when it is unset).
"""
from __future__ import annotations

import atexit
import os
import runpy
import sys

COUNT_ENV = "SCOREDISTILL_UNET_COUNT_FILE"
COUNTS = {"unet_calls": 0, "unet_samples": 0}


def install() -> bool:
    """Wrap ``UNet2DConditionModel.forward`` (once); ``False`` when diffusers is not importable."""
    try:
        from diffusers import UNet2DConditionModel
    except Exception:
        return False
    forward = UNet2DConditionModel.forward
    if getattr(forward, "_scoredistill_counted", False):
        return True

    def counted_forward(self, sample, *args, **kwargs):
        COUNTS["unet_calls"] += 1
        COUNTS["unet_samples"] += int(sample.shape[0])
        return forward(self, sample, *args, **kwargs)

    counted_forward._scoredistill_counted = True
    counted_forward.__wrapped__ = forward
    UNet2DConditionModel.forward = counted_forward
    return True


def _write() -> None:
    path = os.environ.get(COUNT_ENV)
    if path:
        from scoredistill.atomic_io import atomic_write_json

        atomic_write_json(path, dict(COUNTS), indent=None, sort_keys=False)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m scoredistill.suite.count_launch SCRIPT [ARGS...]")
    install()
    atexit.register(_write)
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path[0] = os.getcwd()  # as if the script had been started from the working folder
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
