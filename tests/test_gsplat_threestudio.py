"""threestudio integration of the Gaussian modules: configs/gs-sds.yaml trains, densifies, validates,
checkpoints, renders a test video and writes a PLY on the CPU; --test / --export resume from the checkpoint.

threestudio's ``stable-diffusion-guidance`` always resizes renders to 512x512.  The shared tiny SD folder has a
x2 VAE, which makes 256x256 latents and self-attention over 65,536 tokens in the UNet's first block: one
guidance call then takes minutes of CPU (measured: step 0 had not finished after 2 CPU-minutes).  These tests
therefore build a variant with the real SD geometry (a x8 VAE: 512 -> 64x64 latents) from the same tiny text
encoder and tokenizer.
"""
import glob
import os
import re

import pytest
import torch

from harness import CACHE, run_launch, tiny_sd_f8_path

pytestmark = [pytest.mark.threestudio, pytest.mark.slow]

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "gs-sds.yaml")


def _overrides(sd, exp_root):
    return [
        f"system.guidance.pretrained_model_name_or_path={sd}",
        f"system.prompt_processor.pretrained_model_name_or_path={sd}",
        "system.prompt_processor.spawn=false",
        "system.guidance.half_precision_weights=false",
        "system.prompt_processor.prompt=a red ball",
        "trainer.precision=32",
        "data.width=32", "data.height=32", "data.eval_width=32", "data.eval_height=32",
        "data.batch_size=1", "data.n_val_views=1", "data.n_test_views=4",  # 3 trips a torch.cross dim bug in threestudio
        "trainer.max_steps=2", "trainer.val_check_interval=2",
        "system.geometry.init=sphere", "system.geometry.num_points=200", "system.geometry.upsample_to=0",
        # densify at step 1 whatever the gradient size: clone/split everything visible
        "system.strategy.refine_start_iter=0", "system.strategy.refine_every=1", "system.strategy.grow_grad2d=0.0",
        "system.position_lr.max_steps=2",
        f"exp_root_dir={exp_root}",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    exp_root = str(tmp_path_factory.mktemp("gs-sds"))
    sd = tiny_sd_f8_path()
    trial = run_launch(CONFIG, _overrides(sd, exp_root), mode="--train", exp_root=exp_root)
    return trial, run_launch.last_output, sd, exp_root


def _ckpt_params(ckpt_path):
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    return state, {k.split(".")[-1]: v for k, v in state["state_dict"].items() if k.startswith("geometry.params.")}


def test_gs_sds_trains_densifies_validates_and_exports(trained):
    from scoredistill.geometry.gaussian_ply import load_gaussians_ply

    trial, output, _, _ = trained
    save = os.path.join(trial, "save")
    m = re.findall(r"step (\d+): densification (\d+) -> (\d+) Gaussians", output)
    assert m, output[-3000:]
    assert int(m[0][1]) == 200 and int(m[-1][2]) != 200
    assert os.path.isfile(os.path.join(save, "it2-0.png"))  # validation image
    assert os.path.isfile(os.path.join(save, "it2-test.mp4"))  # test video
    ckpts = glob.glob(os.path.join(trial, "ckpts", "*.ckpt"))
    assert ckpts
    state, params = _ckpt_params(os.path.join(trial, "ckpts", "last.ckpt"))
    n = params["means"].shape[0]
    assert n == int(m[-1][2]) and state["gsplat_num_gaussians"] == n
    assert "gsplat_strategy_state" in state
    # PLY written at the end of training re-imports bit-exactly (== the checkpointed parameters)
    ply = os.path.join(save, "it2-export", "gaussians.ply")
    back = load_gaussians_ply(ply)
    for k, v in params.items():
        assert torch.equal(back[k], v), k
    assert f"test rendered {n} Gaussians" in output


def test_gs_sds_test_and_export_resume_with_same_count(trained):
    from scoredistill.geometry.gaussian_ply import load_gaussians_ply

    trial, _, sd, exp_root = trained
    ckpt = os.path.join(trial, "ckpts", "last.ckpt")
    _, params = _ckpt_params(ckpt)
    n = params["means"].shape[0]
    parsed = os.path.join(trial, "configs", "parsed.yaml")
    run_launch(parsed, [f"resume={ckpt}", f"exp_root_dir={exp_root}"], mode="--test", exp_root=exp_root)
    out = run_launch.last_output
    assert f"test rendered {n} Gaussians" in out, out[-3000:]
    run_launch(parsed, [f"resume={ckpt}", f"exp_root_dir={exp_root}"], mode="--export", exp_root=exp_root)
    exported = glob.glob(os.path.join(trial, "save", "it*-export", "gaussians.ply"))
    assert exported
    back = load_gaussians_ply(exported[0])
    for k, v in params.items():
        assert torch.equal(back[k], v), k
    # training resumes from the densified checkpoint (parameters and Adam moments of n Gaussians) and goes on
    run_launch(parsed, [f"resume={ckpt}", f"exp_root_dir={exp_root}", "trainer.max_steps=3"], mode="--train", exp_root=exp_root)
    out = run_launch.last_output
    m = re.findall(r"step (\d+): densification (\d+) -> (\d+) Gaussians", out)
    assert m and m[0][0] == "2" and int(m[0][1]) == n, out[-3000:]
    _, params3 = _ckpt_params(os.path.join(trial, "ckpts", "last.ckpt"))
    assert params3["means"].shape[0] == int(m[-1][2])


# ------------------------------------------------------------------------------------------------
# in-process adapter checks


def _geometry(threestudio_module, **cfg):
    return threestudio_module.find("gsplat-gaussian-splatting")(cfg)


def test_geometry_config_errors_before_anything_loads(threestudio_module):
    with pytest.raises(ValueError, match="geometry.init must be one of"):
        _geometry(threestudio_module, init="cube")
    with pytest.raises(ValueError, match="needs system.geometry.init_path"):
        _geometry(threestudio_module, init="mesh")
    with pytest.raises(ValueError, match="needs system.geometry.shap_e_prompt"):
        _geometry(threestudio_module, init="shap_e")  # raised before ShapEPipeline would download anything
    with pytest.raises(ValueError, match=r"system\.geometry\.sh_degree must be an integer in \[0, 3\], got"):
        _geometry(threestudio_module, sh_degree=5)
    with pytest.raises(ValueError, match="init_opacity"):
        _geometry(threestudio_module, init_opacity=0.0)


def test_geometry_state_dict_resizes_and_ply_init(threestudio_module, tmp_path):
    small = _geometry(threestudio_module, init="box", num_points=10, sh_degree=1, init_radius=0.3)
    big = _geometry(threestudio_module, init="sphere", num_points=30, sh_degree=1)
    assert big.num_gaussians == 30
    big.load_state_dict(small.state_dict())
    assert big.num_gaussians == 10
    for k in small.params:
        assert torch.equal(big.params[k], small.params[k])
    assert small.params["means"].abs().max() <= 0.3
    ply = small.save_ply(str(tmp_path / "g.ply"))
    again = _geometry(threestudio_module, init="ply", init_path=ply, sh_degree=1)
    for k in small.params:
        assert torch.equal(again.params[k], small.params[k])
    # init: ply starts at the file's SH degree (issue 14 item 5); the schedule never lowers it
    assert again.active_sh_degree == 1
    again.do_update_step(0, 0)
    assert again.active_sh_degree == 1
    # progressive SH degree of 3DGS for the other initialisers
    small.do_update_step(0, 999)
    assert small.active_sh_degree == 0
    small.do_update_step(0, 1000)
    assert small.active_sh_degree == 1


def test_rasterizer_outputs_and_background(threestudio_module):
    from scoredistill.geometry.gaussian_init import params_from_points

    geo = _geometry(threestudio_module, init="sphere", num_points=1)
    p = params_from_points(torch.zeros(1, 3), torch.tensor([[1.0, 0.0, 0.0]]), init_opacity=0.9, init_scale=0.2)
    for k, v in p.items():
        geo.params[k] = torch.nn.Parameter(v)
    material = threestudio_module.find("no-material")({})
    bg = threestudio_module.find("solid-color-background")({"color": [0.0, 0.0, 1.0]})
    renderer = threestudio_module.find("gsplat-rasterizer")({}, geometry=geo, material=material, background=bg)
    c2w = torch.eye(4)
    c2w[:3, :3] = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    c2w[0, 3] = 2.0
    c2w = torch.stack([c2w, c2w])
    out = renderer(c2w=c2w, fovy=torch.tensor([0.8, 0.8]), height=16, width=24)
    assert out["comp_rgb"].shape == (2, 16, 24, 3) and out["opacity"].shape == (2, 16, 24, 1)
    assert out["depth"].shape == (2, 16, 24, 1)
    assert torch.allclose(out["comp_rgb"], out["comp_rgb_fg"] + (1 - out["opacity"]) * torch.tensor([0.0, 0.0, 1.0]))
    centre = out["opacity"][0, 7:9, 11:13, 0]
    assert (centre > 0.8).all() and out["opacity"].max() <= 0.9 and out["opacity"][0, 0, 0, 0] < 0.05
    assert abs(out["depth"][0, 8, 12, 0].item() - 2.0) < 1e-3
    assert out["comp_rgb"][0, 8, 12, 0] > 0.8 and out["comp_rgb"][0, 0, 0, 2] > 0.95
    with pytest.raises(ValueError, match="renderer.backend"):
        threestudio_module.find("gsplat-rasterizer")({"backend": "opengl"}, geometry=geo, material=material, background=bg)


def test_gaussians_train_under_threestudio_dreamfusion_system(tmp_path):
    """The renderer's outputs are threestudio-shaped: plain dreamfusion-system trains the Gaussians."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONFIG)
    system = cfg.system
    for key in ("strategy", "position_lr", "save_ply_on_train_end", "ply_name", "visualize_depth"):
        system.pop(key, None)
    cfg.system_type = "dreamfusion-system"
    system.exporter.save_via_file = True
    system.loss = {"lambda_sds": 1.0, "lambda_orient": 0.0, "lambda_sparsity": 0.0, "lambda_opaque": 0.0}
    system.optimizer = {"name": "Adam", "args": {"lr": 0.01, "eps": 1.0e-15}}
    path = tmp_path / "gs-sds-dreamfusion.yaml"
    OmegaConf.save(cfg, path, resolve=False)
    exp_root = str(tmp_path / "out")
    overrides = [o for o in _overrides(tiny_sd_f8_path(), exp_root) if not o.startswith(("system.strategy", "system.position_lr"))]
    trial = run_launch(str(path), overrides, mode="--train", exp_root=exp_root)
    assert os.path.isfile(os.path.join(trial, "save", "it2-test.mp4"))
    ckpt = os.path.join(trial, "ckpts", "last.ckpt")
    _, params = _ckpt_params(ckpt)
    assert params["means"].shape == (200, 3)  # no densification without gsplat-system
    run_launch(os.path.join(trial, "configs", "parsed.yaml"), [f"resume={ckpt}", f"exp_root_dir={exp_root}"], mode="--export", exp_root=exp_root)
    from scoredistill.geometry.gaussian_ply import load_gaussians_ply

    back = load_gaussians_ply(glob.glob(os.path.join(trial, "save", "it*-export", "gaussians.ply"))[0])
    assert torch.equal(back["means"], params["means"])
