"""Issue 26: activation checkpointing of the UNet (LODS' Eq. 8/10 backward) and of the VAE encoder (the
render -> latents backward): fewer bytes saved for backward (``torch.autograd.graph.saved_tensors_hooks``),
the same gradients (bit for bit on the CPU: the same kernels recompute the same values)."""
import pytest
import torch

from harness import one_thread_fixture, tiny_guidance_config

_one_thread = one_thread_fixture()


class SavedBytes:
    """Bytes kept for backward while active: tensors autograd saves (``saved_tensors_hooks``; each save counted)
    plus, for the checkpointed ``blocks``, the inputs the checkpoint keeps (its own saves bypass the outer hook)."""

    def __init__(self, blocks=()):
        self.bytes = 0
        self.blocks = [b for b in blocks if b is not None]

    def __enter__(self):
        def pack(t):
            self.bytes += t.numel() * t.element_size()
            return t

        def pre(module, args, kwargs):
            if torch.is_grad_enabled() and getattr(module, "_scoredistill_checkpointed", False):
                for v in list(args) + list(kwargs.values()):
                    if isinstance(v, torch.Tensor):
                        self.bytes += v.numel() * v.element_size()

        self._handles = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in self.blocks]
        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        return self._ctx.__exit__(*exc)


def _lods(threestudio_module, tiny_sd, on):
    return threestudio_module.find("lods-guidance")(
        tiny_guidance_config(tiny_sd, image_size=32, unet_activation_checkpointing=on, vae_activation_checkpointing=on)
    )


@pytest.mark.threestudio
def test_unet_checkpointing_in_lods_eq8_saves_memory_same_gradient(tiny_sd, threestudio_module):
    res = {}
    for on in (False, True):
        g = _lods(threestudio_module, tiny_sd, on)
        E = g.unet.config.cross_attention_dim
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(2, 4, 4, 4, generator=gen)
        u = torch.randn(2, 77, E, generator=gen)
        t, noise = torch.tensor([100, 800]), torch.randn(2, 4, 4, 4, generator=gen)
        g.learner.initialise_alpha(u)
        from scoredistill.guidance.memory import unet_blocks

        with SavedBytes(unet_blocks(g.unet)) as sb:
            loss = g.learner.aux_loss(z, u, t=t, noise=noise)
        (grad,) = torch.autograd.grad(loss, [g.learner.alpha])
        res[on] = (sb.bytes, loss.detach(), grad)
    (b_off, l_off, g_off), (b_on, l_on, g_on) = res[False], res[True]
    assert torch.equal(l_off, l_on) and torch.equal(g_off, g_on)
    assert b_on < 0.5 * b_off, (b_on, b_off)


@pytest.mark.threestudio
def test_vae_encoder_checkpointing_saves_memory_same_gradient(tiny_sd, threestudio_module):
    res = {}
    for on in (False, True):
        g = _lods(threestudio_module, tiny_sd, on)
        rgb = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(3)  # the posterior sample
        from scoredistill.guidance.memory import vae_encoder_blocks

        with SavedBytes(vae_encoder_blocks(g.vae)) as sb:
            lat = g.get_latents(rgb)
        (grad,) = torch.autograd.grad((lat * torch.linspace(-1, 1, lat.numel()).reshape(lat.shape)).sum(), [rgb])
        res[on] = (sb.bytes, lat.detach(), grad)
    (b_off, l_off, g_off), (b_on, l_on, g_on) = res[False], res[True]
    assert torch.equal(l_off, l_on) and torch.equal(g_off, g_on)
    assert b_on < 0.5 * b_off, (b_on, b_off)


def test_checkpointing_is_skipped_without_gradient():
    from scoredistill.guidance.memory import enable_activation_checkpointing

    lin = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
    lin.requires_grad_(False)
    assert enable_activation_checkpointing([lin]) == 1 and enable_activation_checkpointing([lin]) == 0
    x = torch.randn(3, 4)
    with SavedBytes() as sb:
        y = lin(x)  # nothing requires grad: plain forward, nothing saved
    assert sb.bytes == 0 and not y.requires_grad
    xr = x.clone().requires_grad_(True)
    with SavedBytes() as sb2:
        y2 = lin(xr)
    y2.sum().backward()
    assert torch.equal(y, y2.detach()) and xr.grad is not None and sb2.bytes == xr.numel() * 4  # only the input
