"""Integration (threestudio launch.py on CPU, tiny SD): generate with configs/uds-gs.yaml, export the PLY with
``--export``, then edit that PLY with configs/uds-edit-gs.yaml; the edit starts from the exported asset and
its frozen source stays unchanged."""
import csv
import glob
import os

import pytest
import torch

from harness import REPO, gs_cpu_overrides, nerf_cpu_overrides, run_launch, tiny_overrides

pytestmark = [pytest.mark.threestudio, pytest.mark.slow]

ENV = {"OMP_NUM_THREADS": "1"}


def _common(tiny_sd, max_steps):
    return tiny_overrides(tiny_sd, "data.batch_size=2", "seed=0", prompt=None, image_size=16, max_steps=max_steps)


def _gen_overrides(tiny_sd, max_steps=3):
    return _common(tiny_sd, max_steps) + gs_cpu_overrides() + [
        "system.prompt_processor.prompt=a photo of a man",
        "system.guidance.x0_estimator=ddim",
        "system.guidance.ddim_steps=2",
        "system.guidance.negative_prompt=blurry",
    ]


def _rows(trial):
    return list(csv.DictReader(open(glob.glob(os.path.join(trial, "csv_logs", "*", "metrics.csv"))[0])))


def test_generate_export_then_edit_the_exported_ply(tiny_sd, tmp_path):
    from scoredistill.geometry.gaussian_ply import load_gaussians_ply

    exp_root = str(tmp_path / "outputs")
    gen_cfg = os.path.join(REPO, "configs", "uds-gs.yaml")
    trial = run_launch(gen_cfg, _gen_overrides(tiny_sd), mode="--train", exp_root=exp_root, env=ENV)
    assert "uds-guidance" in open(os.path.join(trial, "configs", "parsed.yaml")).read()
    train = [r for r in _rows(trial) if r.get("train/loss_sds")]
    assert len(train) == 3 and all(float(r["train/uds_cls_norm"]) > 0 for r in train)
    last = os.path.join(trial, "ckpts", "last.ckpt")
    assert os.path.isfile(last), run_launch.last_output[-3000:]
    # export
    trial_x = run_launch(gen_cfg, _gen_overrides(tiny_sd) + [f"resume={last}"], mode="--export", exp_root=exp_root, env=ENV)
    ply = os.path.join(trial_x, "save", "it3-export", "gaussians.ply")
    assert os.path.isfile(ply), run_launch.last_output[-3000:]
    asset = load_gaussians_ply(ply, sh_degree=0)
    n = asset["means"].shape[0]
    assert n > 0

    # edit the exported PLY
    edit_root = str(tmp_path / "edit")
    edit_cfg = os.path.join(REPO, "configs", "uds-edit-gs.yaml")
    edit = run_launch(
        edit_cfg,
        _common(tiny_sd, 2)
        + [
            f"system.source_ply={ply}",
            "system.source_prompt=a photo of a man",
            "system.prompt_processor.prompt=a photo of a batman",
        ],
        mode="--train",
        exp_root=edit_root,
        env=ENV,
    )
    out = run_launch.last_output
    assert f"source and target from {ply} ({n} Gaussians)" in out
    assert "edit source unchanged: True" in out
    assert "gsplat-edit-system" in open(os.path.join(edit, "configs", "parsed.yaml")).read()
    assert len([r for r in _rows(edit) if r.get("train/loss_sds")]) == 2
    # the edited target started from the exported asset: same Gaussians, moved by at most 2 small Adam steps
    sd = torch.load(os.path.join(edit, "ckpts", "last.ckpt"), map_location="cpu", weights_only=True)["state_dict"]
    means = sd["geometry.params.means"]
    assert means.shape == asset["means"].shape
    assert (means - asset["means"]).abs().max().item() < 0.01
    assert not torch.equal(sd["geometry.params.sh0"], asset["sh0"])  # ... and was edited (trained)
    # the frozen source is not part of the system's state
    assert not any(k.startswith("_source") for k in sd)
    # the edit's own PLY is written at the end of training
    assert glob.glob(os.path.join(edit, "save", "it2-export", "gaussians.ply"))


def _nerf_cpu(tiny_sd, max_steps):
    """The NeRF configs made CPU-runnable: pure-torch encodings and the pack's volume renderer."""
    return _common(tiny_sd, max_steps) + ["data.batch_size=1"] + nerf_cpu_overrides()


def test_nerf_generate_then_edit_the_checkpoint(tiny_sd, tmp_path):
    exp_root = str(tmp_path / "outputs")
    trial = run_launch(
        os.path.join(REPO, "configs", "uds-nerf.yaml"),
        _nerf_cpu(tiny_sd, 2) + ["system.prompt_processor.prompt=a hamburger"],
        mode="--train", exp_root=exp_root, env=ENV,
    )
    ckpt = os.path.join(trial, "ckpts", "last.ckpt")
    assert os.path.isfile(ckpt), run_launch.last_output[-3000:]
    src_sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    edit = run_launch(
        os.path.join(REPO, "configs", "uds-edit-nerf.yaml"),
        _nerf_cpu(tiny_sd, 2)
        + [
            f"system.source_checkpoint={ckpt}",
            "system.source_prompt=a hamburger",
            "system.prompt_processor.prompt=a cheeseburger",
        ],
        mode="--train", exp_root=str(tmp_path / "edit"), env=ENV,
    )
    out = run_launch.last_output
    assert f"source and target from {ckpt}" in out
    assert "edit source unchanged: True" in out
    assert len([r for r in _rows(edit) if r.get("train/loss_sds")]) == 2
    sd = torch.load(os.path.join(edit, "ckpts", "last.ckpt"), map_location="cpu", weights_only=True)["state_dict"]
    geo = [k for k in src_sd if k.startswith("geometry.") and src_sd[k].is_floating_point()]
    assert geo and all(sd[k].shape == src_sd[k].shape for k in geo)
    # started from the checkpoint (2 small steps away from it) and was trained
    assert max((sd[k] - src_sd[k]).abs().max().item() for k in geo) < 0.1
    assert any(not torch.equal(sd[k], src_sd[k]) for k in geo)


def test_gs_edit_identical_prompts_unchanged_target_zero_gradient(tiny_sd, tmp_path):
    """Same source and target prompt, target = source: every step's Eq. 14 gradient is exactly zero and the
    target stays identical to the source (nothing moves it)."""
    from scoredistill.geometry.gaussian_init import params_from_points, sample_sphere
    from scoredistill.geometry.gaussian_ply import load_gaussians_ply, save_gaussians_ply

    g = torch.Generator().manual_seed(0)
    pts = sample_sphere(200, 0.5, generator=g)
    ply = save_gaussians_ply(str(tmp_path / "asset.ply"), params_from_points(pts, torch.rand(200, 3, generator=g), 0, 0.5, None))
    edit = run_launch(
        os.path.join(REPO, "configs", "uds-edit-gs.yaml"),
        _common(tiny_sd, 3)
        + [f"system.source_ply={ply}", "system.source_prompt=a photo of a man", "system.prompt_processor.prompt=a photo of a man"],
        mode="--train", exp_root=str(tmp_path / "edit"), env=ENV,
    )
    rows = [r for r in _rows(edit) if r.get("train/grad_norm")]
    assert len(rows) == 3 and all(float(r["train/grad_norm"]) == 0.0 for r in rows)
    sd = torch.load(os.path.join(edit, "ckpts", "last.ckpt"), map_location="cpu", weights_only=True)["state_dict"]
    asset = load_gaussians_ply(ply, sh_degree=0)
    for k, v in asset.items():
        assert torch.equal(sd[f"geometry.params.{k}"], v), k
