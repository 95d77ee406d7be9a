"""Multi-GPU semantics under threestudio's Lightning DDP, on the CPU: ``launch.py --gpu 0,1`` run as 2 processes
(gloo backend) by the harness (``tests/harness/cpu_launch.py``, ``SCOREDISTILL_CPU_DEVICES=2``).

Every rank dumps its whole state after every training step (``SCOREDISTILL_DDP_DUMP``: the system's
``state_dict`` -- Gaussians or NeRF --, the optimizer state, the guidance's own state -- LODS α, VDM operator and
their optimizers --, gsplat's densification statistics) and the tests assert that the two ranks are identical
(max difference <= 1e-6) while their views differ (threestudio seeds ``seed + rank``), for gs-sds with
densification during the run, lods-embedding-gs, vdm-gs and lods-lora-nerf, and that 2-rank resumes continue
(gs-sds: Gaussians + densification state, vdm-gs: the guidance's operator).
See README "Multi-GPU" and :mod:`scoredistill.distributed`.
"""
import glob
import os

import pytest
import torch

from harness import gs_cpu_overrides, nerf_cpu_overrides, run_launch, tiny_overrides, tiny_sd_f8_path

pytestmark = [pytest.mark.threestudio, pytest.mark.slow]

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(os.path.dirname(HERE), "configs")
TOL = 1e-6


def _flatten(obj, prefix=""):
    """``{dotted.key: tensor | value}`` of nested dicts / lists (optimizer and guidance states)."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = obj
    return out


def max_rank_difference(a, b):
    """``(max |a - b| over every tensor of two rank dumps, number of tensors compared)``; structure, shapes and
    non-tensor values must match exactly (AssertionError otherwise)."""
    fa, fb = _flatten(a), _flatten(b)
    assert fa.keys() == fb.keys(), sorted(set(fa) ^ set(fb))[:10]
    worst, n = 0.0, 0
    for key, va in fa.items():
        vb = fb[key]
        if isinstance(va, torch.Tensor):
            assert va.shape == vb.shape, f"{key}: {tuple(va.shape)} vs {tuple(vb.shape)}"
            if va.numel():
                d = (va.double() - vb.double()).abs().max().item()
                worst = max(worst, d if d == d else float("inf"))  # NaN counts as a difference
            n += 1
        else:
            assert va == vb, f"{key}: {va!r} vs {vb!r}"
    return worst, n


def _dumps(folder):
    by_step = {}
    for path in glob.glob(os.path.join(folder, "rank*-step*.pt")):
        name = os.path.basename(path)[4:-3]
        rank, step = name.split("-step")
        by_step.setdefault(int(step), {})[int(rank)] = torch.load(path, map_location="cpu", weights_only=False)
    return by_step


def run_two_ranks(config, overrides, exp_root, dump, extra_env=None):
    env = {"SCOREDISTILL_DDP_DUMP": dump}
    env.update(extra_env or {})
    trial = run_launch(config, overrides, exp_root=exp_root, gpu="0,1", env=env)
    return trial, _dumps(dump)


def assert_ranks_identical(by_step, steps):
    """Both ranks dumped every step in ``steps`` with identical states and different views; returns the max diff."""
    assert sorted(by_step) == list(steps), sorted(by_step)
    worst = 0.0
    for step in steps:
        r = by_step[step]
        assert sorted(r) == [0, 1], (step, sorted(r))
        assert r[0]["world_size"] == 2
        views0, views1 = r[0].pop("views"), r[1].pop("views")
        assert any(not torch.equal(views0[k], views1[k]) for k in views0), f"step {step}: both ranks had the same views"
        d, n = max_rank_difference(r[0], r[1])
        assert n > 0
        assert d <= TOL, f"step {step}: ranks differ by {d}"
        worst = max(worst, d)
    print(f"ranks compared at steps {list(steps)}: {n} tensors, max |rank0 - rank1| = {worst:.3g}")
    return worst


# ---------------------------------------------------------------------------------------------------- configs
def _gs_sds_overrides(sd, steps):
    return [
        f"system.guidance.pretrained_model_name_or_path={sd}",
        f"system.prompt_processor.pretrained_model_name_or_path={sd}",
        "system.prompt_processor.spawn=false",
        "system.guidance.half_precision_weights=false",
        "system.prompt_processor.prompt=a red ball",
        "trainer.precision=32",
        "data.width=32", "data.height=32", "data.eval_width=32", "data.eval_height=32",
        "data.batch_size=1", "data.n_val_views=2", "data.n_test_views=4",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
        "system.geometry.init=sphere", "system.geometry.num_points=200", "system.geometry.upsample_to=0",
        # densify (clone/split everything the union of views saw) and reset opacities at step index 2
        "system.strategy.refine_start_iter=0", "system.strategy.refine_every=2", "system.strategy.grow_grad2d=0.0",
        "system.strategy.reset_every=2", "system.strategy.pause_refine_after_reset=0",
        f"system.position_lr.max_steps={steps}",
        "checkpoint.every_n_train_steps=2",
    ]


def test_gs_sds_two_ranks_identical_with_densification_then_resume(tmp_path):
    sd = tiny_sd_f8_path()
    cfg = os.path.join(CONFIGS, "gs-sds.yaml")
    trial, by_step = run_two_ranks(cfg, _gs_sds_overrides(sd, 4), str(tmp_path / "out"), str(tmp_path / "dump"))
    assert_ranks_identical(by_step, range(1, 5))
    counts = [by_step[s][0]["params"]["geometry.params.means"].shape[0] for s in range(1, 5)]
    assert counts[0] == 200 and counts[-1] > counts[0], counts  # densified during the run
    # written once, by rank 0: one PLY, one checkpoint folder, one video; every test view rendered by one rank
    save = os.path.join(trial, "save")
    assert len(glob.glob(os.path.join(save, "it4-export", "*.ply"))) == 1
    assert os.path.exists(os.path.join(trial, "ckpts", "last.ckpt"))
    assert sorted(os.listdir(os.path.join(save, "it4-test"))) == [f"{i}.png" for i in range(4)]
    assert os.path.exists(os.path.join(save, "it4-test.mp4"))
    # 2-rank resume from step 2 continues identically on both ranks
    ckpt = glob.glob(os.path.join(trial, "ckpts", "*step=2*.ckpt"))
    assert ckpt, os.listdir(os.path.join(trial, "ckpts"))
    _, resumed = run_two_ranks(
        cfg, _gs_sds_overrides(sd, 4) + [f"resume={ckpt[0]}"], str(tmp_path / "out2"), str(tmp_path / "dump2")
    )
    assert_ranks_identical(resumed, range(3, 5))
    n2 = torch.load(ckpt[0], map_location="cpu", weights_only=False)["gsplat_num_gaussians"]
    assert resumed[3][0]["params"]["geometry.params.means"].shape[0] >= n2


def _tiny(tiny_sd, steps, *extra):
    # 2 validation / 2 test views: one per rank (Lightning's DistributedSampler splits them)
    return tiny_overrides(tiny_sd, *extra, "data.n_val_views=2", "data.n_test_views=2", prompt="a red ball", max_steps=steps)


def test_lods_embedding_gs_two_ranks_identical(tiny_sd, tmp_path):
    cfg = os.path.join(CONFIGS, "lods-embedding-gs.yaml")
    _, by_step = run_two_ranks(cfg, _tiny(tiny_sd, 3, *gs_cpu_overrides(num_points=256)), str(tmp_path / "out"),
                               str(tmp_path / "dump"))
    assert_ranks_identical(by_step, range(1, 4))
    g = by_step[3][0]["guidance"]
    assert g["aux_steps"] == 3 and g["alpha"].shape == (77, 32)
    assert not torch.equal(g["alpha"], by_step[1][0]["guidance"]["alpha"])  # α trained (identically on both ranks)


def test_vdm_gs_two_ranks_identical_then_resume(tiny_sd, tmp_path):
    cfg = os.path.join(CONFIGS, "vdm-gs.yaml")
    overrides = _tiny(tiny_sd, 3, *gs_cpu_overrides(num_points=256), "system.guidance.operator_widths=[8,16,32]",
                      "checkpoint.every_n_train_steps=2")
    trial, by_step = run_two_ranks(cfg, overrides, str(tmp_path / "out"), str(tmp_path / "dump"))
    assert_ranks_identical(by_step, range(1, 4))
    m = by_step[3][0]["guidance"]["mapping"]
    assert m["num_updates"] == 3 and m["optimizer"]["state"]  # ψ and its Adam moments compared above
    # 2-rank resume from step 2: each rank restores the operator from the checkpoint and they stay identical
    ckpt = glob.glob(os.path.join(trial, "ckpts", "*step=2*.ckpt"))
    assert ckpt, os.listdir(os.path.join(trial, "ckpts"))
    _, resumed = run_two_ranks(cfg, overrides + [f"resume={ckpt[0]}"], str(tmp_path / "out2"), str(tmp_path / "dump2"))
    assert "vdm-guidance: operator restored (2 updates)" in run_launch.last_output  # (threestudio logs on rank 0)
    assert_ranks_identical(resumed, [3])  # rank 1 restored too: same ψ, same Adam moments, same update count
    assert resumed[3][0]["guidance"]["mapping"]["num_updates"] == 3


def test_lods_lora_nerf_two_ranks_identical(tiny_sd, tmp_path):
    cfg = os.path.join(CONFIGS, "lods-lora-nerf.yaml")
    overrides = _tiny(tiny_sd, 3, *nerf_cpu_overrides(tiny_mlp=True), "data.batch_size=1", "system.guidance.lora_rank=2")
    _, by_step = run_two_ranks(cfg, overrides, str(tmp_path / "out"), str(tmp_path / "dump"))
    assert_ranks_identical(by_step, range(1, 4))
    assert by_step[3][0]["guidance"]["aux_steps"] == 3
    assert any(k.startswith("geometry.") for k in by_step[3][0]["params"])  # NeRF weights: DDP's own reduction
