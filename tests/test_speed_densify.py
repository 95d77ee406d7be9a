"""Issue 26: the densifier's per-step statistics (gsplat ``DefaultStrategy._update_state``) without host syncs.

gsplat's non-packed path does ``torch.where(sel)`` and ``grads[sel]`` every training step (two GPU syncs);
:func:`scoredistill.geometry.densify.static_update_state` computes the same statistics at static shapes.
"""
import pytest
import torch


def _info(C, N, seed, absgrad=False):
    g = torch.Generator().manual_seed(seed)
    radii = torch.randint(0, 4, (C, N, 2), generator=g, dtype=torch.int32)
    radii[0, 0] = 0  # invisible in camera 0
    radii[:, 1] = 0  # invisible everywhere
    radii[0, 2, 1] = 0  # one axis zero: not visible (gsplat's .all(-1))
    means2d = torch.zeros(C, N, 2, requires_grad=True)
    (means2d * torch.randn(C, N, 2, generator=g)).sum().backward()
    return {"means2d": means2d, "radii": radii, "width": 64, "height": 48, "n_cameras": C, "gaussian_ids": None}


@pytest.mark.parametrize("scale2d", [0, 100])
@pytest.mark.parametrize("C", [1, 4])
def test_static_update_state_equals_gsplats_and_does_not_sync(C, scale2d):
    from gsplat.strategy import DefaultStrategy

    from scoredistill.bench.counting import SyncCounter
    from scoredistill.geometry.densify import static_update_state

    N = 50
    params = {"means": torch.zeros(N, 3)}
    strat = DefaultStrategy(refine_scale2d_stop_iter=scale2d)
    ref, ours = strat.initialize_state(), strat.initialize_state()
    for step in range(3):
        info = _info(C, N, step)
        DefaultStrategy._update_state(strat, params, ref, info)
        with SyncCounter() as c:
            static_update_state(strat, params, ours, info)
        assert c.count == 0, c.sites
        for k in ("grad2d", "count") + (("radii",) if scale2d else ()):
            assert torch.equal(ref[k], ours[k]), (k, ref[k], ours[k])
    assert (ours["count"] > 0).sum() > 0 and ours["count"][1] == 0


def test_densifier_uses_the_static_update():
    from scoredistill.bench.counting import SyncCounter
    from scoredistill.geometry.densify import GaussianDensifier

    N = 20
    dens = GaussianDensifier({"type": "default", "refine_start_iter": 100, "refine_every": 100, "reset_every": 10**6})
    params = {"means": torch.nn.Parameter(torch.zeros(N, 3))}
    info = _info(2, N, 0)
    with SyncCounter() as c:
        dens.post_backward(params, None, 5, info)  # a step that does not refine: statistics only
    assert c.count == 0, c.sites
    assert dens.state["count"].sum() == (info["radii"] > 0).all(-1).sum()
