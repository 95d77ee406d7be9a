"""Run threestudio's own, unmodified ``launch.py`` on the CPU (test harness only).

Usage (from a threestudio work tree): ``python cpu_launch.py launch.py --config ... --train ...``

threestudio hard-codes CUDA in two places (../shared/THREESTUDIO_ON_CPU.md):
``threestudio.utils.misc.get_device()`` returns ``cuda:{rank}`` and is imported by name in ~10 modules, and
launch.py builds ``Trainer(accelerator="gpu")``.  This wrapper installs an import hook that replaces
``get_device`` right after ``threestudio.utils.misc`` executes (before anything imports it by name), makes
``pytorch_lightning.Trainer`` use ``accelerator="cpu", devices=1`` (``devices=N`` with Lightning's ``ddp``
strategy on the gloo backend if ``SCOREDISTILL_CPU_DEVICES=N``: N processes, the code path of
``launch.py --gpu 0,1,...``; ranks 1.. are re-launched through this wrapper), puts the stand-ins of ``scoredistill/testing/cpu_stubs/`` on
``sys.path``, and then runs launch.py with ``runpy`` as ``__main__``.
"""
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _package_stubs() -> str:
    """The pack's one copy of the stand-ins (``scoredistill/testing/cpu_stubs``): this checkout's, else the
    importable pack's, found without importing it (its import would import threestudio before the device patch)."""
    import importlib.util

    local = os.path.join(os.path.dirname(os.path.dirname(HERE)), "custom", "scoredistill", "testing", "cpu_stubs")
    if os.path.isdir(local):
        return local
    spec = importlib.util.find_spec("scoredistill")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scoredistill is not importable: pip install -e . or put custom/ on PYTHONPATH")
    return os.path.join(list(spec.submodule_search_locations)[0], "testing", "cpu_stubs")


STUBS = _package_stubs()
sys.path.insert(0, STUBS)


def _package_cpu_launch():
    """The pack's CPU launcher (``scoredistill/testing/cpu_launch.py``: the ``get_device`` patch), loaded by path
    without importing the pack."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_scoredistill_cpu_launch", os.path.join(os.path.dirname(STUBS),
                                                                                          "cpu_launch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_PatchMisc = _package_cpu_launch()._PatchMisc


#: number of CPU processes (DDP ranks) the Trainer uses; >1: strategy ddp with the gloo backend
DEVICES_ENV = "SCOREDISTILL_CPU_DEVICES"
#: folder for per-rank state dumps (``rank{r}-step{s}.pt`` after every training step); unset: none
DUMP_ENV = "SCOREDISTILL_DDP_DUMP"


def cpu_devices() -> int:
    return max(1, int(os.environ.get(DEVICES_ENV, "1") or 1))


def _cpu_copy(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def _dump_callback(folder):
    """A Lightning callback writing each rank's full training state after every step (tests compare ranks)."""
    import pytorch_lightning
    import torch

    class DumpRankState(pytorch_lightning.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            state = {
                "global_step": int(trainer.global_step),
                "world_size": int(trainer.world_size),
                "params": _cpu_copy(pl_module.state_dict()),
                "optimizers": [_cpu_copy(o.state_dict()) for o in trainer.optimizers],
                "views": _cpu_copy({k: batch[k] for k in ("elevation", "azimuth", "camera_distances") if k in batch}),
            }
            guidance = getattr(pl_module, "guidance", None)
            if hasattr(guidance, "guidance_state_dict"):
                state["guidance"] = _cpu_copy(guidance.guidance_state_dict())
            densifier = getattr(pl_module, "densifier", None)
            if densifier is not None:
                state["densifier"] = _cpu_copy(densifier.state_dict())
            os.makedirs(folder, exist_ok=True)
            torch.save(state, os.path.join(folder, f"rank{trainer.global_rank}-step{trainer.global_step}.pt"))

    return DumpRankState()


def install():
    sys.meta_path.insert(0, _PatchMisc())
    import pytorch_lightning

    n_devices = cpu_devices()
    if n_devices > 1:
        # Lightning's DDP launcher re-runs sys.argv for ranks 1..N-1: run them through this wrapper too
        from pytorch_lightning.strategies.launchers import subprocess_script

        def _cmd():
            return [sys.executable, os.path.abspath(__file__), os.path.abspath(sys.argv[0])] + sys.argv[1:]

        subprocess_script._basic_subprocess_cmd = _cmd

    class CPUTrainer(pytorch_lightning.Trainer):
        def __init__(self, *args, **kwargs):
            kwargs["accelerator"] = "cpu"
            kwargs["devices"] = n_devices
            if n_devices > 1:  # launch.py's --gpu 0,1 path (Lightning picks ddp) with the CPU backend
                from pytorch_lightning.strategies import DDPStrategy

                kwargs["strategy"] = DDPStrategy(process_group_backend="gloo")
            if os.environ.get(DUMP_ENV):
                kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [_dump_callback(os.environ[DUMP_ENV])]
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
