"""The per-step overhead probes (scoredistill.bench.guidance_overhead) and the removed host-device syncs."""
import pytest
import torch

from harness import make_prompt_utils, one_thread_fixture, tiny_guidance_config

_one_thread = one_thread_fixture()


def test_host_read_counter_counts_value_reads():
    from scoredistill.bench.guidance_overhead import HostReadCounter

    x = torch.tensor([3.0])
    with HostReadCounter() as c:
        x.item(), int(x), float(x), x.tolist(), bool(x > 0)
        y = x * 2  # tensor maths: no read
    assert c.count == 5
    with HostReadCounter() as c2:
        pass
    assert c2.count == 0 and float(y) == 6.0  # restored: reads outside are not counted


def test_model_timer_counts_module_time_once():
    from scoredistill.bench.guidance_overhead import ModelTimer

    inner = torch.nn.Linear(64, 64)
    outer = torch.nn.Sequential(inner, torch.nn.Tanh())
    timer = ModelTimer([outer, inner])  # nested: counted once
    x = torch.randn(8, 64, requires_grad=True)
    import time

    t0 = time.perf_counter()
    outer(x).sum().backward()
    total = time.perf_counter() - t0
    assert 0 < timer.seconds <= total
    assert timer._depth == 0
    timer.remove()
    s = timer.seconds
    outer(x).sum().backward()
    assert timer.seconds == s  # hooks removed


@pytest.mark.threestudio
def test_measure_overhead_on_a_tiny_guidance(tiny_sd, threestudio_module, tmp_path):
    from scoredistill.bench.guidance_overhead import measure_overhead

    pu = make_prompt_utils(threestudio_module, tiny_sd, tmp_path)
    g = threestudio_module.find("uds-guidance")(tiny_guidance_config(tiny_sd, image_size=32))
    r = measure_overhead(g, pu, steps=1, warmup=1)
    assert r["unet_calls"] == 1
    assert 0 < r["model_seconds"] <= r["step_seconds"]
    assert 0 <= r["overhead_share"] < 1
    assert r["host_reads"] >= 0


@pytest.mark.threestudio
def test_ge3d_logs_read_no_device_values(tiny_sd, threestudio_module, tmp_path):
    """GE3D's per-step logs: DBC weights from the host tensor (floats), residuals left as 0-d tensors (read only
    when the system logs them) -- no per-step ``.tolist()`` of device results."""
    pu = make_prompt_utils(threestudio_module, tiny_sd, tmp_path)
    g = threestudio_module.find("ge3d-guidance")(tiny_guidance_config(tiny_sd, image_size=16, trainer_max_steps=100))
    out = g(torch.rand(1, 16, 16, 3), pu, torch.tensor([10.0]), torch.tensor([0.0]), torch.tensor([2.0]))
    n = out["ge3d_n"]
    assert sum(out[f"ge3d_w{i}"] for i in range(n)) == pytest.approx(1.0)
    assert all(isinstance(out[f"ge3d_w{i}"], float) for i in range(n))
    res = [out[f"ge3d_res{i}"] for i in range(n)]
    assert all(torch.is_tensor(r) and r.dim() == 0 and not r.requires_grad and torch.isfinite(r) for r in res)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_abar_at_and_add_noise_do_not_sync_on_cuda():
    from scoredistill.maths.diffusion import abar_at, add_noise

    abar = torch.linspace(0.999, 0.01, 1000, device="cuda")
    x = torch.randn(2, 4, 8, 8, device="cuda")
    t = torch.tensor([10, 900], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        add_noise(x, torch.randn_like(x), abar, t)
        abar_at(abar, t, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(ValueError, match=r"timestep must be in \[0, 1000\)"):
        abar_at(abar, 1000, x)  # python numbers are still checked on the host
