"""Issue 26, after the H200 run: the host-to-device copies and host checks that synchronised on CUDA.

``torch.cuda.set_sync_debug_mode("warn")`` on the H200 found per step: ``diffusion.py:65`` ×24 in GE3D
(``abar_at`` copied its host timestep to the device with a plain ``.to``), ``ge3d.py:269`` (the DBC weights'
copy), ``gsplat_cameras.py:65/66`` (a host constant copied to the device, ``linalg.inv``'s error check) and
Lightning's ``module.py:662`` ×7–21 (``self.log(name, python_number)`` makes ``torch.tensor(v, device=cuda)``).
:class:`scoredistill.bench.counting.SyncCounter` missed them all on the CPU: it did not count host-to-device
copies and trusted ``host_only`` blocks whatever they read.  These tests fail on main (f3fb70f).
"""
import pytest
import torch

from harness import one_thread_fixture

_one_thread = one_thread_fixture()


def test_counter_counts_host_to_device_copies_and_checks_host_only():
    from scoredistill.bench.counting import SyncCounter
    from scoredistill.sync import host_only, host_tensor, to_device

    dev = torch.zeros(3)  # made before the counter: would be on the GPU
    const = host_tensor(torch.tensor([1.0, -1.0, 1.0]))  # a module constant registered as host
    with SyncCounter() as c:
        h = torch.tensor([1, 2])  # host data, no device: a host tensor, no copy
        torch.tensor(3.0, device=dev.device)  # Lightning's self.log(name, 3.0): h2d
        h.to(dev.device)  # pageable host -> device: h2d
        const.to(dev)  # h2d
        dev[h]  # a host index into a device tensor: h2d
        x = to_device(h, dev.device)  # pinned, non-blocking: no sync; the result is a device tensor
        with host_only():
            h.tolist()  # a host read: nothing
            x.tolist()  # claimed host, but a device tensor: counted
        h.to(torch.float32).sum().item()  # dtype change stays on the host: nothing
        dev[:2].copy_(h)  # h2d
    assert c.counts == {"h2d": 5, "tolist": 1}, c.sites
    assert all(s.startswith(("h2d @ test_speed_h2d.py:", "tolist @ test_speed_h2d.py:")) for s in c.sites)
    assert all("/tests/test_speed_h2d.py:" in s for s in c.full_sites)
    assert torch.equal(x, h)  # on the CPU, to_device is the tensor itself


def test_abar_at_host_timesteps_reach_the_device_without_a_sync():
    from scoredistill.bench.counting import SyncCounter
    from scoredistill.maths.diffusion import abar_at

    ac = torch.linspace(0.99, 0.01, 1000)  # would be on the GPU (the guidance's alphas_cumprod)
    like = torch.zeros(2, 4, 8, 8)
    with SyncCounter() as c:
        a = abar_at(ac, 250, like)  # python number (GE3D's trajectory nodes)
        b = abar_at(ac, torch.tensor([10, 900]), like)  # a host schedule tensor
        d = abar_at(ac, torch.arange(2, device=like.device) * 890 + 10, like)  # device timesteps
    assert c.count == 0, c.sites
    assert a.shape == (1, 1, 1, 1) and a.item() == ac[250].item()
    assert torch.equal(b.flatten(), ac[[10, 900]]) and torch.equal(d, b)
    for bad in (1000, -1, [3, 1000]):
        with pytest.raises(ValueError, match=r"timestep must be in \[0, 1000\)"):
            abar_at(ac, bad, like)
    with pytest.raises(ValueError, match=r"timestep must be in \[0, 1000\), got \[5, 1000\]"):
        abar_at(ac, torch.tensor([5, 1000]), like)


def test_camera_conversion_has_no_sync_and_is_exact():
    from scoredistill.bench.counting import SyncCounter
    from scoredistill.renderer.gsplat_cameras import threestudio_to_gsplat_cameras

    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(3, 3, 3))
    c2w = torch.eye(4).repeat(3, 1, 1)
    c2w[:, :3, :3], c2w[:, :3, 3] = q, torch.randn(3, 3)
    fovy = torch.full((3,), 0.7)
    with SyncCounter() as c:
        viewmats, Ks = threestudio_to_gsplat_cameras(c2w, fovy, 32, 24)
    assert c.count == 0, c.sites
    gl_to_cv = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
    ref = torch.linalg.inv(c2w.double() @ gl_to_cv)
    assert torch.allclose(viewmats.double(), ref, atol=1e-6)
    assert torch.equal(viewmats, torch.linalg.inv(c2w @ torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))))
    assert Ks[0, 1, 1].item() == pytest.approx(0.5 * 24 / torch.tan(torch.tensor(0.35)).item())
    with pytest.raises(ValueError, match=r"fovy must be in \(0, pi\) radians, got \[0.0\]"):
        threestudio_to_gsplat_cameras(torch.eye(4)[None], torch.tensor([0.0]), 8, 8)


def test_ge3d_dbc_weights_copy_without_a_sync():
    from scoredistill.bench.counting import SyncCounter
    from scoredistill.maths.ge3d import ge3d_grad

    torch.manual_seed(0)
    ac = torch.linspace(0.99, 0.01, 1000)
    lat = torch.randn(1, 4, 4, 4)
    eps = lambda x, t: 0.1 * x  # noqa: E731
    with SyncCounter() as c:
        w = torch.tensor([0.25, 0.75])  # the DBC weights: built on the host
        grad, info = ge3d_grad(eps, eps, lat, [100, 300, 500], ac, weights=w)
    assert c.count == 0, c.sites
    assert torch.equal(info["weights"], w)


@pytest.mark.threestudio
def test_system_logs_python_numbers_as_host_tensors(threestudio_module):
    """Lightning turns ``self.log(name, 3.0)`` into ``torch.tensor(3.0, device=self.device)``; the systems hand
    it a host tensor of the same value instead."""
    from scoredistill.bench.counting import SyncCounter
    from scoredistill.system.gsplat_system import GsplatSystem

    logged = {}

    class Fake:
        device = torch.zeros(1).device
        _log_host = GsplatSystem._log_host

        def log(self, name, value, **kw):  # Lightning's conversion of a Python number
            if not torch.is_tensor(value):
                value = torch.tensor(value, device=self.device, dtype=torch.get_default_dtype())
            logged[name] = value

    with SyncCounter() as c:
        Fake()._log_host("train/num_gaussians", 1234.0)
        Fake()._log_host("train/ge3d_t0", 981)
    assert c.count == 0, c.sites
    assert logged["train/num_gaussians"].dtype == torch.float32 and logged["train/num_gaussians"].item() == 1234.0
    assert logged["train/ge3d_t0"].item() == 981.0


def test_gpu_busy_is_the_union_of_kernel_intervals():
    """The H200 run's "GPU busy" summed every profiler row's device time (ops and their kernels, and spans
    such as ``Optimizer.step#Adam.step``): more than the wall time.  Now: the union of the kernel intervals."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from scoredistill.bench.launch_probe import _busy_seconds

    def ev(a, b, dev=DeviceType.CUDA, ann=False, name="k"):
        return SimpleNamespace(device_type=dev, is_user_annotation=ann, name=name,
                               time_range=SimpleNamespace(start=a, end=b))

    events = [ev(0, 100), ev(50, 150), ev(300, 400),  # overlapping kernels count once: 150 + 100 us
              ev(0, 1000, ann=True, name="Optimizer.step#Adam.step"),  # an annotation: a span, not work
              ev(0, 5000, dev=DeviceType.CPU, name="aten::conv2d")]  # host-side op
    prof = SimpleNamespace(events=lambda: events)
    busy, how = _busy_seconds(prof, [], None, cuda=True)
    assert busy == pytest.approx(250e-6) and "union" in how
