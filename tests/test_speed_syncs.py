"""Issue 26: no host-device synchronisation in the training step of the pack's guidances.

:class:`scoredistill.bench.counting.SyncCounter` (a ``TorchFunctionMode``) counts the calls that wait for a
GPU (``item``, ``tolist``, ``bool()``, ``int()``, ``float()``, ``cpu()``, ``nonzero``, ``unique``, boolean-mask
indexing, ...) on any device, so these CPU tests state the count a CUDA step has: 0 for every pack guidance in a
step after the first (LODS / VDM take their own optimizer's first step with one host decision: its state is
created lazily).  The counter knows host tensors by how they were made (see its docstring): a read of a
would-be device tensor counts even inside :func:`scoredistill.sync.host_only`, and host-to-device copies
count too (since the H200 run; ``tests/test_speed_h2d.py``).

On main (4852393) these tests fail: device syncs in LODS (the α/ψ finite check ``bool`` and ``float(loss)``: 2
per step), VDM (the input and update finite checks: 2), HiFA's DDIM target (``unique``/``tolist``/``nonzero``
of the device timesteps: 4 calls), and unmarked host reads (``abar_at``'s CPU-only range check, GE3D's host
trajectory draw) that were no GPU syncs: GE3D 50, LODS 8, VDM 8, UDS 8, HiFA 6 / 2 counted calls.
"""
import pytest
import torch

from harness import make_prompt_utils, one_thread_fixture, tiny_guidance_config

_one_thread = one_thread_fixture()


def test_sync_counter_counts_the_syncing_calls_only():
    from scoredistill.bench.counting import SyncCounter
    from scoredistill.sync import host_only

    x = torch.tensor([3.0, 0.0])
    with SyncCounter() as c:
        x[0].item(); float(x[0]); bool(x[0] > 0); x.tolist(); x.cpu(); x.nonzero(); x[x > 0]; torch.where(x > 0)
        torch.unique(x)
        y = (x * 2).sum() + torch.where(x > 0, x, -x).max()  # device maths: nothing
        with host_only():
            x.tolist()  # x would be on the GPU: host_only's claim is checked, so this counts
            h = torch.tensor([1.0, 2.0])  # made without a device: a host tensor
            (h * 2).tolist(); int(h[0]); torch.randint(0, 5, (3,)).tolist()  # host reads: not counted
    assert c.counts == {"item": 1, "__float__": 1, "__bool__": 1, "tolist": 2, "cpu": 1, "nonzero": 1,
                        "__getitem__[bool mask]": 1, "where(cond)": 1, "unique": 1}
    assert c.count == 10 and len(c.sites) == 10 and c.sites[0].startswith("item @ test_speed_syncs.py:")
    assert c.full_sites[0].endswith("/tests/test_speed_syncs.py:" + c.sites[0].rsplit(":", 1)[1])
    with SyncCounter() as c2:  # torch's optimizers keep their step count on the host: not a device sync
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.Adam([p], lr=0.1)
        p.grad = torch.ones(3)
        opt.step()
    assert c2.count == 0 and float(y) == 9.0


def _params_and_state(opt, p):
    return [p.detach().clone()] + [v.clone() for v in opt.state[p].values()]


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
def test_step_if_finite_is_the_optimizer_step_or_nothing(cls):
    """The device-side decision: a taken step equals ``optimizer.step()`` bit for bit; a skipped one leaves the
    parameter, the moments and the step count bit-identical (first step: host decision)."""
    from scoredistill.integrity.finite import finite_ok, step_if_finite

    kw = {"momentum": 0.9} if cls is torch.optim.SGD else {}
    torch.manual_seed(0)
    p0 = torch.randn(5)
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    oa, ob = cls([a], lr=0.1, **kw), cls([b], lr=0.1, **kw)
    for i, g in enumerate([torch.randn(5), torch.randn(5), torch.tensor([1.0, float("nan"), 0, 0, 0]), torch.randn(5)]):
        a.grad, b.grad = g.clone(), g.clone()
        ok = finite_ok(None, [b.grad])
        if bool(torch.isfinite(g).all()):
            oa.step()
        before = _params_and_state(ob, b) if ob.state else None
        step_if_finite(ob, ok)
        if not bool(ok):
            assert all(torch.equal(x, y) for x, y in zip(before, _params_and_state(ob, b)))
        for x, y in zip(_params_and_state(oa, a), _params_and_state(ob, b)):
            assert torch.equal(x, y), (i, x, y)


GUIDANCES = [
    ("ge3d-guidance", {}),
    ("lods-guidance", {}),
    ("lods-guidance", {"variant": "lora"}),
    ("vdm-guidance", {}),
    ("uds-guidance", {}),
    ("hifa-guidance", {}),
    ("hifa-guidance", {"denoised_target": "tweedie"}),
]


@pytest.mark.threestudio
@pytest.mark.parametrize("name,extra", GUIDANCES, ids=[f"{n}{'-' + '-'.join(map(str, e.values())) if e else ''}" for n, e in GUIDANCES])
def test_guidance_step_has_no_host_sync(name, extra, tiny_sd, threestudio_module, tmp_path):
    """One step (guidance call + backward of its losses) after two warm-up steps: 0 syncing calls."""
    from scoredistill.bench.counting import SyncCounter

    pu = make_prompt_utils(threestudio_module, tiny_sd, tmp_path)
    g = threestudio_module.find(name)(tiny_guidance_config(tiny_sd, image_size=16, trainer_max_steps=100, **extra))
    rgb = torch.rand(2, 16, 16, 3, requires_grad=True)
    el, az, d = torch.tensor([10.0, 20.0]), torch.tensor([0.0, 90.0]), torch.tensor([2.0, 2.0])
    for i in range(3):
        g.update_step(0, i)
        with SyncCounter() as c:
            out = g(rgb, pu, el, az, d)
            loss = sum(v for k, v in out.items() if k.startswith("loss_") and torch.is_tensor(v) and v.requires_grad)
            loss.backward()
    assert c.count == 0, c.sites
    assert torch.isfinite(rgb.grad).all()
