"""Run threestudio's own, unmodified ``launch.py`` on the CPU (``scoredistill demo``, the benchmarks' CPU scale).

Usage (from a threestudio work tree): ``python -m scoredistill.demo.cpu_launch launch.py --config ... --train ...``
(the demo's name for this module), or by path: ``python .../scoredistill/testing/cpu_launch.py launch.py ...``.

threestudio hard-codes CUDA in two places: ``threestudio.utils.misc.get_device()`` returns ``cuda:{rank}`` (and is
imported by name in ~10 modules), and launch.py builds ``Trainer(accelerator="gpu")``.  :func:`install` adds an
import hook that replaces ``get_device`` right after ``threestudio.utils.misc`` executes (before anything imports
it by name), makes ``pytorch_lightning.Trainer`` use ``accelerator="cpu", devices=1``, and serves the stand-ins
of ``cpu_stubs/`` for CUDA-only packages that are not installed (:class:`StubFinder`, after every real finder:
an installed package always wins).  ``SCOREDISTILL_PROGRESS_FILE``: the trainer writes ``step max_steps`` there
after every training step (the demo's progress bar).  Then the ``scoredistill.*`` model modules that the command's
model folders name are imported (:mod:`.gt_prior_launch`), and launch.py runs with ``runpy`` as ``__main__``.
"""
import importlib.abc
import importlib.machinery
import os
import runpy
import sys

STUBS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_stubs")
#: top-level names served from ``cpu_stubs/`` when not installed
STUB_NAMES = ("torchvision", "tinycudann", "nvdiffrast", "controlnet_aux", "_unavailable")
PROGRESS_ENV = "SCOREDISTILL_PROGRESS_FILE"


class StubFinder(importlib.abc.MetaPathFinder):
    """Finds the stand-ins of ``cpu_stubs/``; appended to ``sys.meta_path`` so that real packages come first."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in STUB_NAMES:
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [STUBS])


class _PatchMisc(importlib.abc.MetaPathFinder):
    target = "threestudio.utils.misc"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None:
            return None
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            import torch

            module.get_device = lambda: torch.device("cpu")

        spec.loader.exec_module = exec_module
        return spec


def install_import_hooks() -> None:
    """The CPU device patch and the stand-ins (idempotent); enough to import threestudio in this process."""
    if not any(isinstance(f, _PatchMisc) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchMisc())
    if not any(isinstance(f, StubFinder) for f in sys.meta_path):
        sys.meta_path.append(StubFinder())


def _progress_callback(path):
    import pytorch_lightning

    class WriteProgress(pytorch_lightning.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"{trainer.global_step} {trainer.max_steps}\n")
            os.replace(tmp, path)

    return WriteProgress()


def install() -> None:
    """Import hooks plus a CPU ``pytorch_lightning.Trainer`` (one process)."""
    install_import_hooks()
    import pytorch_lightning

    class CPUTrainer(pytorch_lightning.Trainer):
        def __init__(self, *args, **kwargs):
            kwargs["accelerator"] = "cpu"
            kwargs["devices"] = 1
            if os.environ.get(PROGRESS_ENV):
                kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [_progress_callback(os.environ[PROGRESS_ENV])]
            super().__init__(*args, **kwargs)

    pytorch_lightning.Trainer = CPUTrainer


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python -m scoredistill.demo.cpu_launch launch.py --config ... --train ...")
    install()
    script = argv[0]
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    if os.path.basename(script) == "launch.py":
        # the model classes the command's model folders name (the ground-truth prior of the demo and the
        # benchmarks), which threestudio's own guidance loads through diffusers (see gt_prior_launch.py)
        from scoredistill.testing.gt_prior_launch import import_pack_modules_named

        import_pack_modules_named(argv[1:])
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
