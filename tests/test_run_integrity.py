"""Attaching run integrity (scoredistill.integrity, issue 25): the one call ``attach_run_integrity(system)`` on a
foreign LightningModule, the systems' mixin, and the holder a guidance attaches to when no system called.
In process, no threestudio (the threestudio systems: test_finite_guard.py, test_lods_guidance.py and the launch.py
runs of test_finite_steps.py / test_vdm_guidance.py)."""
import pytest
import torch

from harness import one_thread_fixture
from scoredistill.integrity import (
    CHECKPOINT_KEY,
    RUN_KEY,
    CheckpointedGuidanceMixin,
    NonFiniteStepError,
    RunIntegrity,
    RunIntegrityMixin,
    attach_run_integrity,
    get_finite_guard,
    get_run_integrity,
    lightning_module_holding,
)

pl = pytest.importorskip("pytorch_lightning")
_one_thread = one_thread_fixture("function")

KW = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
          enable_checkpointing=False)


def _data(*xs):
    return torch.utils.data.DataLoader(torch.tensor(xs, dtype=torch.float32).reshape(-1, 1), batch_size=1)


class _Foreign(pl.LightningModule):
    """A system that is none of the pack's: it only makes the one call."""

    def __init__(self, limit=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        attach_run_integrity(self, limit, "foreign.max_nonfinite_skips")

    def training_step(self, batch, batch_idx):
        return (self.w * batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.1)


def test_a_foreign_lightning_module_making_the_one_call_gets_the_guard_and_the_resume_record(tmp_path):
    system = _Foreign()
    integrity = get_run_integrity(system)
    assert integrity.guard is get_finite_guard(system) and integrity.resume_check
    hook = system.training_step
    assert attach_run_integrity(system) is integrity and system.training_step is hook  # idempotent, hooked once
    trainer = pl.Trainer(max_steps=3, **KW)
    trainer.fit(system, _data(1.0, float("nan"), 1.0))
    guard = get_finite_guard(system)
    assert (guard.skips, guard.consecutive, guard.max_consecutive_skips) == (1, 0, 10)
    torch.testing.assert_close(system.w.detach(), torch.full((2,), 0.8))  # two SGD steps of 0.1, the NaN one skipped
    path = str(tmp_path / "last.ckpt")
    trainer.save_checkpoint(path)
    assert RUN_KEY in torch.load(path, weights_only=True)
    with pytest.raises(NonFiniteStepError, match=r"2 consecutive .* raise foreign\.max_nonfinite_skips \(now 2\)"):
        pl.Trainer(max_steps=3, **KW).fit(_Foreign(2), _data(float("nan"), float("inf"), 1.0))


class _Toy(CheckpointedGuidanceMixin):
    checkpoint_state_key = "toy"

    def __init__(self):
        self.count = torch.zeros(())

    def guidance_state_dict(self):
        return {"count": self.count.clone()}

    def load_guidance_state_dict(self, state):
        self.count = state["count"].clone()


class _PackLike(RunIntegrityMixin, pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.guidance = _Toy()
        self.attach_run_integrity(3, "system.max_nonfinite_skips")


def test_the_mixin_attaches_the_system_and_the_guidances_it_holds():
    system = _PackLike()
    assert isinstance(system.run_integrity, RunIntegrity) and system.run_integrity.guard.max_consecutive_skips == 3
    assert system.guidance.checkpoint_attached and system.run_integrity.guidances == {"toy": system.guidance}
    system.guidance.count += 2
    ckpt = {}
    system.on_save_checkpoint(ckpt)
    assert ckpt[CHECKPOINT_KEY]["toy"]["count"] == 2 and RUN_KEY in ckpt
    later = _Toy()  # handed down later (a guidance built in on_fit_start), under the same key: replaces it
    assert system.run_integrity.add_guidance(later) and system.run_integrity.guidances == {"toy": later}
    assert system.run_integrity.add_guidance(object()) is False  # not a pack guidance: left alone


def test_a_guidance_finds_the_lightning_module_holding_it():
    class G:
        pass

    g = G()
    a, b = _Foreign(), _Foreign()
    assert lightning_module_holding(g) is None
    a.guidance = g
    assert lightning_module_holding(g) is a
    b.guidance = g
    assert lightning_module_holding(g) is None  # two holders: ambiguous, the system must attach explicitly
    del b.guidance
    holder = {"g": g}  # held by a plain dict only (e.g. a wrapper's): not a module's attribute
    del a.guidance
    assert lightning_module_holding(g) is None and holder
