"""DreamMapping VDM + DCA maths (scoredistill.maths.vdm), without threestudio."""
import copy
import io

import pytest
import torch
import torch.nn as nn

from harness import one_thread_fixture
from scoredistill.maths.diffusion import grad_to_loss
from scoredistill.integrity import CHECKPOINT_KEY, CheckpointedGuidanceMixin
from scoredistill.maths.vdm import (
    DegradationModel,
    LinearOperator,
    ULiteOperator,
    VariationalDistributionMapping,
    build_degradation_model,
    dca_lambda,
    operator_loss,
    validate_operator_config,
    validate_vdm_config,
    vdm_step,
    vdm_weight,
)


_one_thread = one_thread_fixture()  # tiny tensors: one intra-op thread avoids OpenMP spin-waiting


def sd_abar():
    """SD scaled_linear ᾱ computed here independently (float64)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


class CountingEps(nn.Module):
    """A deterministic stand-in UNet ε(x, t, emb) with trainable weights; counts calls and samples."""

    def __init__(self, channels=4, emb_dim=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.proj = nn.Linear(emb_dim, channels)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.calls, self.samples = 0, 0

    def forward(self, x, t, emb):
        self.calls += 1
        self.samples += x.shape[0]
        tt = (t.float() / 1000).view(-1, 1, 1, 1)
        return torch.tanh(self.conv(x)) * (1 + tt) + self.proj(emb.mean(1))[:, :, None, None]


def small_mapping(seed=0, lr=0.01, **kw):
    torch.manual_seed(seed)
    model = build_degradation_model("ulite", (4, 8, 8), widths=(8, 16, 32), **kw)
    return VariationalDistributionMapping(model, lr=lr)


# ----------------------------------------------------------------------------- operator
def test_default_ulite_parameter_count_and_shapes():
    op = ULiteOperator()
    assert op.num_parameters() == 879_252  # stated in the docstring
    assert 0.8e6 < op.num_parameters() < 1.2e6  # "about 1M" (Sec. 4.2)
    for shape in [(2, 4, 32, 32), (1, 4, 5, 7)]:
        x = torch.randn(*shape)
        assert op(x).shape == x.shape


def test_linear_operator_and_learnable_noise():
    m = build_degradation_model("linear", (4, 3, 5), learnable_noise=True)
    assert isinstance(m.operator, LinearOperator)
    x = torch.randn(2, 4, 3, 5)
    assert torch.equal(m(x), x)  # initialised to the identity, zero noise
    with torch.no_grad():
        m.operator.weight.fill_(2.0)
        m.observation_noise.fill_(0.5)
    assert torch.allclose(m(x), 2 * x + 0.5)
    with pytest.raises(ValueError, match="operator_latent_size"):
        m(torch.randn(2, 4, 4, 5))
    # learnable noise on the U-Net operator: M(x) + n
    u = build_degradation_model("ulite", (4, 6, 6), learnable_noise=True, widths=(4, 8))
    with torch.no_grad():
        u.observation_noise.fill_(1.0)
    x = torch.randn(3, 4, 6, 6)
    assert torch.allclose(u(x), u.operator(x) + 1.0, atol=1e-6)


def test_operator_loss_falls_on_fixed_input():
    torch.manual_seed(1)
    eps_in = torch.randn(2, 4, 8, 8)
    noise = 0.7 * eps_in + 0.3 * torch.randn(2, 4, 8, 8)  # a fixed pair, learnable from the input
    # the paper's operator (default widths), the linear ablation, the operator with learnable noise
    for kind, kw in [("ulite", {}), ("linear", {}), ("ulite", {"learnable_noise": True, "widths": (8, 16, 32)})]:
        torch.manual_seed(0)
        mapping = VariationalDistributionMapping(build_degradation_model(kind, (4, 8, 8), **kw), lr=0.01)
        losses = [float(mapping.train_step(eps_in, noise)[1]) for _ in range(15)]
        assert mapping.num_updates == 15
        assert losses[-1] < 0.75 * losses[0], (kind, kw, losses[0], losses[-1])
        assert min(losses[-5:]) < min(losses[:5])
        # exact Eq. 17 value of the first reported loss is the mean squared error before any update
    m2 = small_mapping()
    eps_in, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    before = copy.deepcopy(m2.model)
    out, loss = m2.train_step(eps_in, noise)
    expected = before(eps_in)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(loss, ((expected - noise) ** 2).mean(), atol=1e-6)


# ----------------------------------------------------------------------------- Eq. 18
def test_dca_lambda_follows_eq18_on_both_sides_of_cutoff():
    abar = sd_abar()
    t = torch.tensor([0, 1, 150, 299, 300, 301, 500, 999])
    lam = dca_lambda(abar.float(), t, cutoff=300).reshape(-1).double()
    expected = torch.where(t <= 300, 1 - abar[t], torch.ones(len(t), dtype=torch.float64))
    assert torch.allclose(lam, expected, atol=1e-6)
    assert lam[5:].eq(1).all() and lam[4] < 1  # t=300 annealed (Eq. 18), t>300 not
    assert lam[0] < 0.001  # 1 - ᾱ_0 = β_0 = 0.00085
    # Alg. 1 variant (t < cut-off): only t = 300 changes
    lam_x = dca_lambda(abar.float(), t, cutoff=300, inclusive=False).reshape(-1).double()
    assert lam_x[4] == 1 and torch.allclose(lam_x[:4], expected[:4].double(), atol=1e-6)
    # configurable cut-off, and DCA off
    lam100 = dca_lambda(abar.float(), t, cutoff=100).reshape(-1)
    assert torch.equal(lam100 < 1, t <= 100)
    assert dca_lambda(abar.float(), t, enabled=False).eq(1).all()
    with pytest.raises(ValueError, match="timestep"):
        dca_lambda(abar, torch.tensor([1000]))


def test_weightings():
    abar = sd_abar().float()
    t = torch.tensor([10, 600])
    a = abar[t]
    assert torch.allclose(vdm_weight(abar, t, "sds").reshape(-1), 1 - a)
    assert torch.allclose(vdm_weight(abar, t, "luciddreamer").reshape(-1), ((1 - a) / a).sqrt())
    assert torch.allclose(vdm_weight(abar, t, "fantasia3d").reshape(-1), a.sqrt() * (1 - a))
    assert vdm_weight(abar, t, "uniform").eq(1).all()
    with pytest.raises(ValueError, match="weighting_strategy"):
        vdm_weight(abar, t, "sqrt")
    # "luciddreamer" is VDM's extra: the shared SDS weighting refuses it unless allowed
    from scoredistill.maths.diffusion import sds_weight

    with pytest.raises(ValueError, match="weighting_strategy must be one of"):
        sds_weight(abar, t, "luciddreamer")


# ----------------------------------------------------------------------------- Eq. 19
@pytest.mark.parametrize(
    "operator_input,cfg_form,x_t_jacobian",
    [("cfg", "standard", "dropped"), ("cond", "standard", "dropped"), ("cfg", "paper", "dropped"),
     ("cfg", "standard", "sqrt_alpha_bar")],
)
def test_gradient_equals_eq19_independently_computed(operator_input, cfg_form, x_t_jacobian):
    abar = sd_abar()
    eps_net = CountingEps()
    mapping = small_mapping()
    B = 4
    torch.manual_seed(3)
    latents = torch.randn(B, 4, 8, 8)
    noise = torch.randn_like(latents)
    cond, uncond = torch.randn(B, 5, 8), torch.randn(B, 5, 8)
    t = torch.tensor([50, 300, 301, 900])
    s = 7.5
    psi_before = copy.deepcopy(mapping.model)

    out = vdm_step(eps_net, latents, t, cond, uncond, abar.float(), mapping, guidance_scale=s,
                   operator_input=operator_input, cfg_form=cfg_form, noise=noise, x_t_jacobian=x_t_jacobian)

    # independent computation in float64 where possible
    a = abar[t].view(-1, 1, 1, 1)
    x_t = (a.sqrt() * latents.double() + (1 - a).sqrt() * noise.double()).float()
    with torch.no_grad():
        e_c = eps_net(x_t, t, cond)
        e_u = eps_net(x_t, t, uncond)
    e_cfg = e_u + s * (e_c - e_u) if cfg_form == "standard" else e_c + s * (e_c - e_u)
    m_in = e_cfg if operator_input == "cfg" else e_c
    with torch.no_grad():
        m_out = psi_before(m_in)  # ψ before this step's update (Alg. 1)
    lam = torch.where(t.view(-1, 1, 1, 1) <= 300, 1 - a, torch.ones_like(a))
    w = 1 - a
    if x_t_jacobian == "sqrt_alpha_bar":  # Eq. 19 literally: ∂x_t/∂θ = sqrt(ᾱ_t) ∂x/∂θ
        w = w * a.sqrt()
    expected = (w * (e_cfg.double() - lam * m_out.double())).float()
    assert torch.allclose(out["grad"], expected, atol=1e-4, rtol=1e-4)
    assert torch.allclose(out["lambda_t"].double(), lam.reshape(-1), atol=1e-6)
    assert torch.allclose(out["loss_op"], ((m_out - noise) ** 2).mean(), atol=1e-5)
    # the operator was updated once, with its own optimizer
    assert mapping.num_updates == 1
    assert any(not torch.equal(p, q) for p, q in zip(mapping.model.parameters(), psi_before.parameters()))


def test_one_cfg_unet_call_and_no_gradient_into_unet_or_theta_via_operator():
    abar = sd_abar().float()
    eps_net = CountingEps()
    unet_before = copy.deepcopy(eps_net.state_dict())
    mapping = small_mapping()
    B = 4
    latents = torch.randn(B, 4, 8, 8, requires_grad=True)
    cond, uncond = torch.randn(B, 5, 8), torch.randn(B, 5, 8)
    for step in range(3):
        out = vdm_step(eps_net, latents, torch.randint(0, 1000, (B,)), cond, uncond, abar, mapping)
        assert eps_net.calls == step + 1 and eps_net.samples == 2 * B * (step + 1)  # one CFG call, batch 2B
        assert latents.grad is None  # the operator update does not touch θ's latents
        loss = grad_to_loss(latents, out["grad"])
        loss.backward()
        assert torch.allclose(latents.grad, out["grad"] / B, atol=1e-6)
        latents.grad = None
    assert all(p.grad is None for p in eps_net.parameters())  # no gradient into the diffusion UNet
    for k, v in eps_net.state_dict().items():
        assert torch.equal(v, unet_before[k])
    assert not out["grad"].requires_grad
    # evaluation without training: ψ unchanged
    psi = copy.deepcopy(mapping.model.state_dict())
    vdm_step(eps_net, latents, torch.full((B,), 500), cond, uncond, abar, mapping, train_operator=False)
    assert all(torch.equal(v, mapping.model.state_dict()[k]) for k, v in psi.items())


def test_resume_restores_operator_exactly():
    torch.manual_seed(0)
    eps_in, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    a = small_mapping(seed=0)
    for _ in range(3):
        a.train_step(eps_in, noise)
    buf = io.BytesIO()
    torch.save(a.full_state_dict(), buf)
    buf.seek(0)
    b = small_mapping(seed=123)  # different initial ψ
    b.load_full_state_dict(torch.load(buf, weights_only=True))
    assert b.num_updates == 3
    for (k, v), (k2, v2) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    # continuing gives bit-identical results (optimizer moments restored too)
    for _ in range(2):
        oa, la = a.train_step(eps_in, noise)
        ob, lb = b.train_step(eps_in, noise)
        assert torch.equal(oa, ob) and torch.equal(la, lb)
    with pytest.raises(RuntimeError):
        small_mapping().load_full_state_dict(
            {"model": build_degradation_model("linear", (4, 8, 8)).state_dict(), "optimizer": {}}
        )


def test_clear_config_errors():
    with pytest.raises(ValueError, match="operator_type"):
        validate_operator_config(operator_type="mlp")
    with pytest.raises(ValueError, match="operator_lr"):
        validate_operator_config(operator_lr=0)
    with pytest.raises(ValueError, match="operator_optimizer"):
        validate_operator_config(operator_optimizer="lbfgs")
    with pytest.raises(ValueError, match="operator_widths"):
        validate_operator_config(operator_widths=[16])
    with pytest.raises(ValueError, match="operator_kernel_size"):
        validate_operator_config(operator_kernel_size=4)
    with pytest.raises(ValueError, match="operator_steps_per_iter"):
        validate_operator_config(operator_steps_per_iter=0)
    with pytest.raises(ValueError, match="operator_input"):
        validate_vdm_config(operator_input="uncond")
    with pytest.raises(ValueError, match="cfg_form"):
        validate_vdm_config(cfg_form="x")
    with pytest.raises(ValueError, match="dca_cutoff"):
        validate_vdm_config(dca_cutoff=1001)
    with pytest.raises(ValueError, match="dca_cutoff"):
        validate_vdm_config(dca_cutoff=300.5)
    with pytest.raises(ValueError, match="weighting_strategy"):
        validate_vdm_config(weighting_strategy="sqrt")
    with pytest.raises(ValueError, match="guidance_scale"):
        validate_vdm_config(guidance_scale=-1)
    with pytest.raises(ValueError, match="x_t_jacobian must be one of"):
        validate_vdm_config(x_t_jacobian="sqrt_alpha")
    with pytest.raises(ValueError, match="shape"):
        operator_loss(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 3))


# ----------------------------------------------------------------------------- checkpoint mixin
class _ToyGuidance(CheckpointedGuidanceMixin):
    checkpoint_state_key = "toy"

    def __init__(self, system=None):
        torch.manual_seed(7)
        self.mapping = small_mapping(seed=int(torch.randint(0, 1000, ()).item()))
        self.loaded = None
        self.attach_checkpointing(system)

    def guidance_state_dict(self):
        return self.mapping.full_state_dict()

    def load_guidance_state_dict(self, state):
        self.loaded = copy.deepcopy(state)
        self.mapping.load_full_state_dict(state)


def _toy_system_class(build_in_init: bool):
    import pytorch_lightning as pl  # a dependency of the pack (setup.py)

    class ToySystem(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1)
            if build_in_init:  # like a system building its guidance in configure()
                self.guidance = _ToyGuidance(self)  # the system passes itself down (no call-stack search)

        def on_fit_start(self):  # like threestudio's dreamfusion-system
            if not build_in_init:
                self.guidance = _ToyGuidance(self)

        def training_step(self, batch, batch_idx):
            x = batch[0]
            self.guidance.mapping.train_step(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8))
            return self.lin(x).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return pl, ToySystem


@pytest.mark.parametrize("build_in_init", [False, True])
def test_checkpoint_mixin_saves_and_restores_with_lightning(tmp_path, build_in_init):
    pl, ToySystem = _toy_system_class(build_in_init)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=2)
    kw = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False)
    sys1 = ToySystem()
    trainer = pl.Trainer(max_steps=2, **kw)
    trainer.fit(sys1, data)
    ckpt = str(tmp_path / "last.ckpt")
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)[CHECKPOINT_KEY]["toy"]
    assert saved["num_updates"] == 2
    for k, v in sys1.guidance.mapping.model.state_dict().items():
        assert torch.equal(saved["model"][k], v)

    sys2 = ToySystem()
    trainer2 = pl.Trainer(max_steps=3, **kw)
    trainer2.fit(sys2, data, ckpt_path=ckpt)
    assert sys2.guidance.loaded is not None and sys2.guidance.loaded["num_updates"] == 2
    for k, v in saved["model"].items():
        assert torch.equal(sys2.guidance.loaded["model"][k], v)
    assert sys2.guidance.mapping.num_updates == 3  # restored 2, then one more step


def test_checkpoint_mixin_without_system_warns():
    with pytest.warns(UserWarning, match="attach_checkpointing"):
        g = _ToyGuidance()
    assert g.loaded is None
