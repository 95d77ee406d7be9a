"""Run threestudio's own, unmodified ``launch.py`` on the CPU (test harness only).

Usage (from a threestudio work tree): ``python cpu_launch.py launch.py --config ... --train ...``

threestudio hard-codes CUDA in two places (../shared/THREESTUDIO_ON_CPU.md):
``threestudio.utils.misc.get_device()`` returns ``cuda:{rank}`` and is imported by name in ~10 modules, and
launch.py builds ``Trainer(accelerator="gpu")``.  This wrapper installs an import hook that replaces
``get_device`` right after ``threestudio.utils.misc`` executes (before anything imports it by name), makes
``pytorch_lightning.Trainer`` use ``accelerator="cpu", devices=1``, puts the stand-ins of ``stubs/`` on
``sys.path``, and then runs launch.py with ``runpy`` as ``__main__``.
"""
import importlib.abc
import importlib.machinery
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "stubs"))


class _PatchMisc(importlib.abc.MetaPathFinder):
    target = "threestudio.utils.misc"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None:
            return None
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            import torch

            module.get_device = lambda: torch.device("cpu")

        loader.exec_module = exec_module
        return spec


def install():
    sys.meta_path.insert(0, _PatchMisc())
    import pytorch_lightning

    class CPUTrainer(pytorch_lightning.Trainer):
        def __init__(self, *args, **kwargs):
            kwargs["accelerator"] = "cpu"
            kwargs["devices"] = 1
            super().__init__(*args, **kwargs)

    pytorch_lightning.Trainer = CPUTrainer


if __name__ == "__main__":
    install()
    if os.environ.get("SCOREDISTILL_TEST_FAULTS"):  # fault injection for the finite-step tests (faults.py)
        sys.path.insert(0, HERE)
        import faults

        faults.install()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
