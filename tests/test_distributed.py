"""scoredistill.distributed on 2 gloo CPU processes (torch.multiprocessing): every synchronised quantity equals
the one-process value on the union of the ranks' batches, and the ranks agree.

* :class:`SyncedBatchNorm2d`: outputs, running statistics and (averaged) parameter gradients of 2 ranks with
  half batches = ``nn.BatchNorm2d`` on the whole batch;
* :func:`all_reduce_grads_` averages, :func:`broadcast_` copies rank 0, :func:`shared_seed` / :func:`shared_rng`
  give equal draws and restore each rank's own generator;
* :class:`GaussianDensifier` under DDP: gsplat's screen-space gradient statistics of 2 ranks with one camera
  each = one process with both cameras; a densification step gives identical Gaussians on both ranks.
"""
import os

import pytest
import torch
import torch.multiprocessing as mp

from scoredistill import distributed as D

WORLD = 2


def _init(rank, init_file):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def _bn_worker(rank, init_file, out, track):
    _init(rank, init_file)
    try:
        torch.manual_seed(0)
        x = torch.randn(4, 3, 5, 5) * 2 + 1
        w = torch.randn(4, 3, 5, 5)
        bn = torch.nn.BatchNorm2d(3, track_running_stats=track)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        D.convert_batchnorm(bn)
        assert type(bn) is D.SyncedBatchNorm2d
        local = slice(2 * rank, 2 * rank + 2)
        y = bn(x[local])
        loss = (y * w[local]).mean()  # the union loss is the mean of the two ranks' (equal-size) losses
        loss.backward()
        D.all_reduce_grads_(bn.parameters())
        torch.save({"y": y.detach(), "grad_w": bn.weight.grad, "grad_b": bn.bias.grad, "state": bn.state_dict()},
                   os.path.join(out, f"bn{rank}.pt"))
    finally:
        torch.distributed.barrier()  # both ranks done with every collective before teardown (gloo aborts otherwise)
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("track", [True, False])
def test_synced_batchnorm_equals_batchnorm_on_the_union(tmp_path, track):
    mp.spawn(_bn_worker, args=(str(tmp_path / "init"), str(tmp_path), track), nprocs=WORLD)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    w = torch.randn(4, 3, 5, 5)
    bn = torch.nn.BatchNorm2d(3, track_running_stats=track)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    y = bn(x)
    (y * w).mean().backward()
    r = [torch.load(tmp_path / f"bn{i}.pt", weights_only=False) for i in range(WORLD)]
    torch.testing.assert_close(torch.cat([r[0]["y"], r[1]["y"]]), y.detach(), atol=1e-5, rtol=1e-5)
    for i in range(WORLD):
        torch.testing.assert_close(r[i]["grad_w"], bn.weight.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r[i]["grad_b"], bn.bias.grad, atol=1e-6, rtol=1e-5)
        for k, v in bn.state_dict().items():
            torch.testing.assert_close(r[i]["state"][k], v, atol=1e-6, rtol=1e-5)
    assert torch.equal(r[0]["grad_w"], r[1]["grad_w"])  # bit-identical on the ranks


def _helpers_worker(rank, init_file, out):
    _init(rank, init_file)
    try:
        torch.manual_seed(100 + rank)  # threestudio: seed + rank
        p = torch.nn.Parameter(torch.full((3,), float(rank)))
        p.grad = torch.full((3,), 2.0 * (rank + 1))
        q = torch.nn.Parameter(torch.randn(2, 2))
        D.broadcast_([q])
        n = D.all_reduce_grads_([p, q])  # q has no gradient: skipped
        seed = D.shared_seed()
        own_before = torch.get_rng_state()
        with D.shared_rng(seed):
            shared = torch.randn(5)
        own_after = torch.get_rng_state()
        m = torch.tensor([1.0 + rank])
        D.all_reduce_([m], op="max")
        torch.save({"grad": p.grad, "n": n, "q": q.detach(), "seed": seed, "shared": shared,
                    "rng_kept": torch.equal(own_before, own_after), "max": m, "ws": D.world_size(), "rank": D.rank()},
                   os.path.join(out, f"h{rank}.pt"))
    finally:
        torch.distributed.barrier()  # both ranks done with every collective before teardown (gloo aborts otherwise)
        torch.distributed.destroy_process_group()


def test_reduce_broadcast_and_shared_seed(tmp_path):
    mp.spawn(_helpers_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    r = [torch.load(tmp_path / f"h{i}.pt", weights_only=False) for i in range(WORLD)]
    for i in range(WORLD):
        assert torch.equal(r[i]["grad"], torch.full((3,), 3.0))  # mean of 2 and 4
        assert r[i]["n"] == 1 and r[i]["rng_kept"] and r[i]["ws"] == 2 and r[i]["rank"] == i
        assert torch.equal(r[i]["max"], torch.tensor([2.0]))
    assert torch.equal(r[0]["q"], r[1]["q"])
    assert r[0]["seed"] == r[1]["seed"] and torch.equal(r[0]["shared"], r[1]["shared"])


def test_single_process_is_a_no_op():
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 5.0)
    assert not D.is_distributed() and D.world_size() == 1 and D.rank() == 0
    assert D.all_reduce_grads_([p]) == 0 and torch.equal(p.grad, torch.full((2,), 5.0))
    assert not D.broadcast_([p]) and not D.all_reduce_([p.grad])
    assert not D.disable_ddp_grad_sync(torch.nn.Linear(1, 1))


# ------------------------------------------------------------------------------------------- densification
N = 12


def _gaussians(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "means": torch.randn(N, 3, generator=g) * 0.3,
        "scales": torch.log(torch.rand(N, 3, generator=g) * 0.05 + 0.01),
        "quats": torch.nn.functional.normalize(torch.randn(N, 4, generator=g), dim=-1),
        "opacities": torch.logit(torch.rand(N, generator=g) * 0.5 + 0.25),
        "sh0": torch.rand(N, 1, 3, generator=g),
        "shN": torch.zeros(N, 0, 3),
    }


def _screen(seed, cameras):
    """Synthetic gsplat ``info`` for ``cameras`` views: ``means2d`` gradient per view and radii (some invisible)."""
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(cameras, N, 2, generator=g) * 1e-3
    radii = (torch.rand(cameras, N, 2, generator=g) * 6).floor()
    return grads, radii


def _setup(params_init):
    from scoredistill.geometry.densify import GaussianDensifier, group_views

    params = torch.nn.ParameterDict({k: torch.nn.Parameter(v.clone()) for k, v in params_init.items()})
    opt = torch.optim.Adam([{"params": [params[k]], "name": k, "lr": 1e-3} for k in params])
    dens = GaussianDensifier({"type": "default", "refine_start_iter": 0, "refine_every": 2, "grow_grad2d": 2e-4,
                              "grow_scale3d": 0.01, "reset_every": 1000})
    return params, dens, group_views(opt, {k: k for k in params})


def _post(dens, params, views, step, grads, radii, cameras):
    means2d = torch.zeros(cameras, N, 2, requires_grad=True)
    means2d.grad = grads.clone()
    info = {"means2d": means2d, "radii": radii, "width": 32, "height": 32, "n_cameras": cameras,
            "gaussian_ids": None}
    return dens.post_backward(params, views, step, info)


def _densify_worker(rank, init_file, out):
    _init(rank, init_file)
    try:
        torch.manual_seed(7 + rank)  # different per-rank generators, as under threestudio
        params, dens, views = _setup(_gaussians())
        stats = []
        for step in (0, 1):  # no refinement at step 0 / 1 (refine_every 2): statistics only
            grads, radii = _screen(step, 2)
            _post(dens, params, views, step, grads[rank : rank + 1], radii[rank : rank + 1], 1)
            stats.append({k: dens.state[k].clone() for k in ("grad2d", "count")})
        grads, radii = _screen(2, 2)
        counts = _post(dens, params, views, 2, grads[rank : rank + 1], radii[rank : rank + 1], 1)  # refine
        torch.save({"stats": stats, "counts": counts, "params": {k: v.detach() for k, v in params.items()}},
                   os.path.join(out, f"d{rank}.pt"))
    finally:
        torch.distributed.barrier()  # both ranks done with every collective before teardown (gloo aborts otherwise)
        torch.distributed.destroy_process_group()


def test_densifier_statistics_are_the_union_and_decisions_identical(tmp_path):
    mp.spawn(_densify_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    r = [torch.load(tmp_path / f"d{i}.pt", weights_only=False) for i in range(WORLD)]
    # one process with both cameras: its loss is the mean over 2 views, so each view's means2d gradient is half
    params, dens, views = _setup(_gaussians())
    for step in (0, 1):
        grads, radii = _screen(step, 2)
        _post(dens, params, views, step, grads / WORLD, radii, 2)
        for i in range(WORLD):
            torch.testing.assert_close(r[i]["stats"][step]["grad2d"], dens.state["grad2d"], atol=1e-9, rtol=1e-6)
            assert torch.equal(r[i]["stats"][step]["count"], dens.state["count"])
    assert dens.state["count"].max() > 1  # some Gaussians seen by both ranks' cameras
    # the refinement: same decision and the same new (randomly split) Gaussians on both ranks
    assert r[0]["counts"] == r[1]["counts"] and r[0]["counts"]["after"] != N
    for k in r[0]["params"]:
        assert torch.equal(r[0]["params"][k], r[1]["params"][k]), k


def _warn_worker(rank, init_file, out):
    _init(rank, init_file)
    try:
        from types import SimpleNamespace

        msgs = D.warn_uneven_eval_views(SimpleNamespace(n_val_views=3, n_test_views=120), lambda m: None)
        torch.save(msgs, os.path.join(out, f"w{rank}.pt"))
    finally:
        torch.distributed.barrier()  # both ranks done with every collective before teardown (gloo aborts otherwise)
        torch.distributed.destroy_process_group()


def test_eval_views_not_a_multiple_of_the_ranks_warn(tmp_path):
    from types import SimpleNamespace

    assert D.warn_uneven_eval_views(SimpleNamespace(n_val_views=3, n_test_views=5), lambda m: None) == []  # 1 process
    mp.spawn(_warn_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    msgs = torch.load(tmp_path / "w0.pt")
    assert len(msgs) == 1 and msgs[0].startswith("data.n_val_views=3 is not a multiple of the 2 GPUs")
