"""The finite-step guard in process (issue 13, finding 1): the decision, AMP / DDP cases, the guidances'
internal optimizers (LODS α, VDM M_ψ with BatchNorm), and a pack guidance in a Lightning system built like
threestudio's dreamfusion-system (guidance created in ``on_fit_start``)."""
import copy
import logging

import pytest
import torch

from harness import one_thread_fixture
from scoredistill.integrity import FiniteStepGuard, NonFiniteStepError, install_finite_guard
from scoredistill.maths.lods import LODSLearner
from scoredistill.maths.vdm import VariationalDistributionMapping, build_degradation_model
from scoredistill.testing.exact_score_prior import ExactScorePrior

_one_thread = one_thread_fixture("function")


def _adam(*values):
    ps = [torch.nn.Parameter(torch.tensor(v, dtype=torch.float32)) for v in values]
    return ps, torch.optim.Adam(ps, lr=0.1)


# ------------------------------------------------------------------------------------------ the decision
def test_decision_skips_nonfinite_and_huge_gradients_and_stops_after_the_limit():
    (p,), opt = _adam([1.0, 2.0])
    guard = FiniteStepGuard(3, "system.max_nonfinite_skips")
    for value, skipped in ((1.0, False), (float("nan"), True), (2e19, True), (1e19, False)):  # g² overflows at 1.8e19
        guard.begin_step()
        p.grad = torch.tensor([value, 0.0])
        assert guard.decide(opt) is skipped
        assert (p.grad is None) is skipped
    assert (guard.skips, guard.consecutive) == (2, 0)
    guard.begin_step()
    p.grad = torch.ones(2)
    guard.flag("latent gradient (x)", torch.tensor(True))
    assert guard.decide(opt) and guard.last_reasons == ["latent gradient (x)"]
    for _ in range(2):
        guard.begin_step()
        p.grad = torch.ones(2)
        guard.check_finite("loss", torch.tensor(float("inf")))
        if guard.consecutive < 2:
            guard.decide(opt)
    with pytest.raises(NonFiniteStepError, match=r"3 consecutive optimizer steps .* raise system\.max_nonfinite_skips \(now 3\)"):
        guard.decide(opt)


def test_a_skipped_step_leaves_parameters_and_adam_moments_bitwise_untouched():
    (p,), opt = _adam([1.0, -1.0, 0.5])
    guard = FiniteStepGuard()
    p.grad = torch.tensor([0.1, 0.2, 0.3])
    guard.begin_step()
    assert not guard.decide(opt)
    opt.step()
    before = (p.detach().clone(), copy.deepcopy(opt.state_dict()))
    p.grad = torch.tensor([0.1, float("inf"), 0.3])
    guard.begin_step()
    assert guard.decide(opt)
    opt.step()
    assert torch.equal(p.detach(), before[0])
    after = opt.state_dict()["state"][0]
    for k, v in before[1]["state"][0].items():
        assert torch.equal(after[k], v), k


def test_snapshots_are_restored_on_skip_and_dropped_otherwise():
    (p,), opt = _adam([1.0])
    guard = FiniteStepGuard()
    state = {"alpha": torch.zeros(2)}
    restored = []
    guard.begin_step()
    assert guard.snapshot("g", lambda: state["alpha"].clone(), restored.append)
    assert not guard.snapshot("g", lambda: 1 / 0, restored.append)  # once per step
    state["alpha"] += 5
    p.grad = torch.tensor([float("nan")])
    guard.decide(opt)
    assert len(restored) == 1 and torch.equal(restored[0], torch.zeros(2))


class _Scaler:
    def __init__(self, scale):
        self.scale = scale

    def is_enabled(self):
        return True

    def get_scale(self):
        return self.scale


class _Trainer:
    def __init__(self, scale=None, world_size=1, other_rank_bad=False):
        self.precision_plugin = type("P", (), {"scaler": None if scale is None else _Scaler(scale)})()
        self.world_size = world_size
        self.global_step = 7
        self.strategy = type("S", (), {"reduce_boolean_decision": lambda _s, d, all=True: d or other_rank_bad})()


def test_amp_overflow_is_the_scalers_until_the_scale_is_below_one():
    (p,), opt = _adam([1.0])
    guard = FiniteStepGuard(1)
    guard.begin_step()
    p.grad = torch.tensor([float("inf")])
    assert guard.decide(opt, _Trainer(scale=65536.0))  # GradScaler overflow: skipped, not counted
    assert (guard.amp_overflow_skips, guard.skips, guard.consecutive) == (1, 0, 0)
    guard.begin_step()
    p.grad = torch.tensor([float("inf")])
    with pytest.raises(NonFiniteStepError):  # scale < 1: not amplification any more, a real fault
        guard.decide(opt, _Trainer(scale=0.5))
    guard = FiniteStepGuard(1)
    guard.begin_step()
    p.grad = torch.tensor([1.0])
    guard.flag("loss", True)
    with pytest.raises(NonFiniteStepError):  # a non-finite loss is never the scaler's
        guard.decide(opt, _Trainer(scale=65536.0))


def test_ddp_ranks_take_the_same_decision():
    (p,), opt = _adam([1.0])
    guard = FiniteStepGuard()
    guard.begin_step()
    p.grad = torch.tensor([1.0])
    assert guard.decide(opt, _Trainer(world_size=2, other_rank_bad=True))
    assert guard.last_reasons == ["a non-finite value on another rank"] and p.grad is None


# ------------------------------------------------------------------------------------------ internal optimizers
def test_lods_alpha_update_with_a_nonfinite_loss_is_skipped():
    prior = ExactScorePrior.random(num_prompts=2, num_components=3, latent_shape=(4, 4, 4), std=0.2, seed=0, embed_dim=8, seq_len=3)
    learner = LODSLearner(lambda x, t, e: prior(x, t, e).sample, "embedding", prior.alphas_cumprod, 100.0, lr=1e-2)
    lat = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    cond, uncond = prior.embedding(0, 2), prior.embedding(None, 2)
    learner.step(lat, torch.tensor([100, 600]), cond, uncond)
    alpha, moments = learner.alpha.detach().clone(), copy.deepcopy(learner.optimizer.state_dict())
    bad = lat.clone()
    bad[0, 0, 0, 0] = float("nan")
    out = learner.step(bad, torch.tensor([100, 600]), cond, uncond)
    assert learner.last_update_skipped and learner.nonfinite_skips == 1 and learner.aux_steps == 1
    assert torch.equal(learner.alpha.detach(), alpha)  # on main: α NaN for good
    assert torch.equal(learner.optimizer.state_dict()["state"][0]["exp_avg_sq"], moments["state"][0]["exp_avg_sq"])
    assert not torch.isfinite(out["grad"]).all()  # the θ gradient is honest (the system step is skipped)
    learner.step(lat, torch.tensor([100, 600]), cond, uncond)
    assert not learner.last_update_skipped and learner.aux_steps == 2 and torch.isfinite(learner.alpha).all()


def test_vdm_operator_update_with_a_nonfinite_input_keeps_weights_moments_and_batchnorm_statistics():
    mapping = VariationalDistributionMapping(build_degradation_model("ulite", (4, 8, 8), widths=[4, 8]), lr=0.01)
    eps, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    mapping.train_step(eps, noise)
    before = copy.deepcopy(mapping.full_state_dict())
    bad = eps.clone()
    bad[1, 2, 3, 4] = float("inf")
    mapping.train_step(bad, noise)
    assert mapping.last_update_skipped and mapping.nonfinite_skips == 1 and mapping.num_updates == 1
    after = mapping.full_state_dict()
    for k, v in before["model"].items():  # ψ and BatchNorm running statistics
        assert torch.equal(after["model"][k], v), k
    for i, st in before["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(after["optimizer"]["state"][i][k], v)
    mapping.train_step(eps, noise)
    assert not mapping.last_update_skipped and mapping.num_updates == 2


# ------------------------------------------------------------------------------------------ in a Lightning system
CASES = {
    # CFG 1e30: loss_sds = inf (on main: trained on, exit 0, inf Adam second moments = a frozen image)
    "vdm-cfg-1e30": ("vdm-guidance", dict(guidance_scale=1e30, operator_widths=[8, 16, 32]), False, ("loss",)),
    # a NaN pixel in every render (on main: α NaN for good, every later gradient silently 0)
    "lods-nan-render": ("lods-guidance", dict(guidance_scale=100.0), True, ("LODS α/ψ update (Eq. 8/10)", "latent gradient (lods-guidance)")),
}


@pytest.mark.threestudio
@pytest.mark.parametrize("case", sorted(CASES))
def test_pack_guidance_in_a_lightning_system_never_applies_a_nonfinite_step(threestudio_module, tiny_sd, tmp_path, case, caplog):
    """A dreamfusion-style system (guidance built in on_fit_start, update steps from on_train_batch_start, no call
    of the pack's): every step is non-finite, each is skipped and the 3rd stops the run; the image, its Adam
    state and the guidance's own state were never touched."""
    guidance_type, extra, nan_render, reasons = CASES[case]
    import pytorch_lightning as pl
    from threestudio.utils.base import Updateable

    from harness import make_prompt_utils, tiny_guidance_config

    threestudio = threestudio_module
    prompt_utils = make_prompt_utils(threestudio, tiny_sd, str(tmp_path))
    cfg = tiny_guidance_config(tiny_sd, 32, max_nonfinite_skips=3, **extra)

    class System(pl.LightningModule, Updateable):
        def __init__(self):
            super().__init__()
            self.image = torch.nn.Parameter(torch.zeros(1, 32, 32, 3))

        def on_fit_start(self):
            self.guidance = threestudio.find(guidance_type)(cfg)

        def on_train_batch_start(self, batch, batch_idx):  # what threestudio's BaseSystem does
            self.do_update_step(self.current_epoch, self.global_step)

        def training_step(self, batch, idx):
            z = torch.zeros(1)
            rgb = torch.sigmoid(self.image)
            if nan_render:
                rgb = torch.cat([rgb[:, :1, :1] * float("nan"), rgb[:, :1, 1:]], 2)
                rgb = torch.cat([rgb, torch.sigmoid(self.image)[:, 1:]], 1)
            out = self.guidance(rgb, prompt_utils, z, z, z + 2.0)
            return {"loss": out["loss_sds"]}

        def configure_optimizers(self):
            return torch.optim.Adam([self.image], lr=0.01)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=1)

    system = System()
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with caplog.at_level(logging.WARNING, logger="pytorch_lightning"):
        with pytest.raises(NonFiniteStepError) as err:
            trainer.fit(system)
    msg = str(err.value)
    assert "3 consecutive optimizer steps had non-finite values" in msg
    assert all(r in msg for r in reasons) and "raise system.guidance.max_nonfinite_skips (now 3)" in msg
    assert torch.equal(system.image.detach(), torch.zeros(1, 32, 32, 3))
    assert len(trainer.optimizers[0].state) == 0  # no moment ever written
    if guidance_type == "vdm-guidance":
        assert system.guidance.mapping.num_updates == 0  # M_ψ rolled back every time
    else:
        assert system.guidance.learner.aux_steps == 0 and system.guidance.learner.alpha is None  # α never applied
        assert system.guidance.learner.nonfinite_skips == 3
    assert caplog.text.count("skipped: non-finite") == 3


def test_install_is_idempotent_and_validates_the_setting():
    class M(torch.nn.Module):
        def training_step(self, *a):
            return {"loss": torch.tensor(1.0)}

        def on_before_optimizer_step(self, optimizer):
            pass

    m = M()
    g = install_finite_guard(m, 4, "system.max_nonfinite_skips")
    assert install_finite_guard(m) is g and g.max_consecutive_skips == 4
    install_finite_guard(m, 2, "system.guidance.max_nonfinite_skips")
    assert (g.max_consecutive_skips, g.setting) == (2, "system.guidance.max_nonfinite_skips")
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError, match=r"system\.max_nonfinite_skips must be an integer >= 1"):
            FiniteStepGuard(bad)


def test_the_internal_optimizers_rule_is_the_guards():
    from scoredistill.integrity.finite import step_is_finite

    one = torch.tensor(1.0)
    assert step_is_finite(one, [torch.ones(3), None])
    assert not step_is_finite(torch.tensor(float("inf")), [torch.ones(3)])
    assert not step_is_finite(one, [torch.tensor([float("nan")])])
    assert not step_is_finite(one, [torch.tensor([2e19])])  # Adam's g² would overflow float32
    assert step_is_finite(one, [torch.tensor([1e19])])
